"""dsr_kernels.backends: one registry for every op: explain(), resolve(), and the ops going through it.

conftest.py sets TRITON_INTERPRET=1 on a machine without a GPU, so Triton is available on
CPU tensors here: the tests make a backend unavailable through its reason function (a
patched registry entry) or with a case that is unavailable whatever the environment
(CUDA kernels on CPU tensors, Triton on float64). They never switch the interpreter off:
triton imported in that state would stay compiled-mode for the rest of the session.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

import dsr_kernels
from dsr_kernels import BackendUnavailable, attention, backends, norm_modulate, ttr_activation
from dsr_kernels._extension import extension_loaded
from dsr_kernels.types import Backend

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]

# How each op is called with backend=..., on a small CPU input of dtype ``dtype``.
CALLS = {
    "attention": lambda backend, dtype=torch.float32: attention(
        *[torch.randn(1, 2, 9, 16, dtype=dtype)] * 3, backend=backend
    ),
    "norm_modulate": lambda backend, dtype=torch.float32: norm_modulate(
        torch.randn(2, 5, 8, dtype=dtype), backend=backend
    ),
    "ttr_activation": lambda backend, dtype=torch.float32: ttr_activation(
        torch.randn(2, 5, 8, dtype=dtype), [1, 3], backend=backend
    ),
}


def _patched(monkeypatch, op: str, **reasons) -> None:
    """Replace the reason function of the named backends of ``op`` (a string: always unavailable; None: available)."""

    def fixed(reason):
        return lambda device, dtype: reason

    table = tuple(
        dataclasses.replace(b, unavailable_reason=fixed(reasons[b.name])) if b.name in reasons else b
        for b in backends.BACKENDS[op]
    )
    monkeypatch.setitem(backends.BACKENDS, op, table)


def _cuda_like(dtype=torch.float32):
    """What resolve() reads of a tensor (device and dtype), for a CUDA tensor on a machine without one."""
    return SimpleNamespace(device=torch.device("cuda"), dtype=dtype)


def test_registry_has_one_entry_per_op():
    assert backends.OPS == tuple(backends.BACKENDS) == ("attention", "norm_modulate", "ttr_activation")
    assert set(backends.OPS) == {"attention", "norm_modulate", "ttr_activation"}
    assert set(CALLS) == set(backends.OPS), "a new op needs its CALLS line here"
    for op, table in backends.BACKENDS.items():
        assert table and all(isinstance(b, Backend) for b in table), op
        assert len({b.name for b in table}) == len(table), f"{op}: a backend name twice"
        assert backends.names(op) == tuple(b.name for b in table)
        assert tuple(dsr_kernels.explain(op, "cpu")) == backends.names(op)
    assert backends.names("attention") == ("triton", "cpu", "torch", "reference")
    assert backends.names("norm_modulate") == backends.names("ttr_activation") == ("cuda", "cpu", "triton", "reference")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", backends.OPS)
def test_explain_lists_every_backend_with_a_reason(op, device):
    for dtype in (torch.float32, torch.float64):
        table = dsr_kernels.explain(op, device, dtype)
        assert tuple(table) == backends.names(op)
        for name, reason in table.items():
            assert isinstance(reason, str) and reason, (op, name)
        assert table["reference"] == "available"
    assert "float64" in dsr_kernels.explain(op, device, torch.float64)["triton"]
    assert dsr_kernels.explain(op, torch.device(device)) == dsr_kernels.explain(op, device)


def test_explain_says_why_on_the_wrong_device():
    for op in ("norm_modulate", "ttr_activation"):
        assert dsr_kernels.explain(op, "cpu")["cuda"] == "backend 'cuda' runs cuda tensors, not cpu ones"
        assert dsr_kernels.explain(op, "cuda")["cpu"] == "backend 'cpu' runs cpu tensors, not cuda ones"
        cpu = dsr_kernels.explain(op, "cpu")["cpu"]
        assert (cpu == "available") if extension_loaded() else ("not importable" in cpu), cpu
    assert (
        dsr_kernels.explain("attention", "meta")["triton"] == "backend 'triton' runs cuda or cpu tensors, not meta ones"
    )
    assert dsr_kernels.explain("attention", "meta")["torch"] == "available"
    if not torch.cuda.is_available():  # no backend claims a device that is not there
        for op in backends.OPS:
            for name, reason in dsr_kernels.explain(op, "cuda").items():
                assert reason.startswith("no CUDA device here") or "not cuda ones" in reason, (op, name, reason)


def test_explain_unknown_op_lists_the_ops():
    with pytest.raises(ValueError, match="'attention', 'norm_modulate', 'ttr_activation'"):
        dsr_kernels.explain("layer_norm")


@pytest.mark.parametrize("op", backends.OPS)
def test_unknown_backend_name_lists_the_valid_ones(op):
    valid = ("auto",) + backends.names(op)
    with pytest.raises(ValueError) as info:
        backends.resolve(op, "gpu", torch.zeros(1))
    assert str(valid) in str(info.value) and "'gpu'" in str(info.value)
    with pytest.raises(ValueError) as info:
        CALLS[op]("gpu")
    assert str(valid) in str(info.value) and "'backend'" in str(info.value)


@pytest.mark.parametrize("op", ["norm_modulate", "ttr_activation"])
def test_explicit_cuda_on_cpu_tensors_raises_with_the_reason(op):
    with pytest.raises(BackendUnavailable, match="backend 'cuda' runs cuda tensors, not cpu ones"):
        CALLS[op]("cuda")


@pytest.mark.parametrize("op", backends.OPS)
def test_explicit_triton_on_float64_raises_with_the_reason(op):
    with pytest.raises(BackendUnavailable, match=r"backend 'triton' takes float16, bfloat16, float32 tensors"):
        CALLS[op]("triton", torch.float64)


@pytest.mark.parametrize("op", backends.OPS)
def test_explicit_unavailable_backend_raises_and_never_falls_back(monkeypatch, op):
    """Whatever makes a backend unavailable, the op raises with that reason (no other backend runs)."""
    _patched(monkeypatch, op, triton="no triton today", reference="no reference today")
    for name in ("triton", "reference"):
        with pytest.raises(BackendUnavailable, match=rf"{op}\(backend='{name}'\).*: no {name} today"):
            CALLS[op](name)


@pytest.mark.parametrize("op", backends.OPS)
def test_auto_on_cpu(op):
    """The compiled "cpu" kernels when built (attention: fp16/bf16/fp32 only), else attention "torch" and the
    other ops' reference. Never Triton, even where its interpreter makes it available on CPU tensors."""
    built = dsr_kernels.explain(op, "cpu")["cpu"] == "available"
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        fallback = "torch" if op == "attention" else "reference"
        cpu_takes = op != "attention" or dtype != torch.float64
        expected = "cpu" if built and cpu_takes else fallback
        assert backends.resolve(op, "auto", torch.zeros(1, dtype=dtype)) == expected
    assert backends.resolve(op, "auto", torch.zeros(1, device="meta")) == {"attention": "torch"}.get(op, "reference")


def test_auto_on_cpu_runs_what_resolve_says(monkeypatch):
    """The ops dispatch through the registry: making the auto choice unavailable moves auto to the next one."""
    from dsr_kernels.ops import norm_modulate as nm_ops

    _patched(monkeypatch, "norm_modulate", cpu="compiled kernels switched off")
    assert backends.resolve("norm_modulate", "auto", torch.zeros(1)) == "reference"
    seen, real = [], nm_ops.norm_modulate_ref
    monkeypatch.setattr(nm_ops, "norm_modulate_ref", lambda *a, **k: seen.append("reference") or real(*a, **k))
    res = norm_modulate(torch.randn(2, 5, 8), registers=torch.randn(3, 8))
    assert seen == ["reference"]
    assert res.out.shape == (2, 8, 8) and res.residual.shape == (2, 8, 8)


def test_auto_on_cuda_prefers_in_table_order(monkeypatch):
    """attention: Triton, else "torch"; norm_modulate / ttr_activation: the CUDA kernels, then Triton, then the
    reference. Checked on the table with patched reasons, so that it runs without a GPU."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # as on a machine with one
    for op in ("norm_modulate", "ttr_activation"):
        _patched(monkeypatch, op, cuda=None, triton=None)
        assert backends.resolve(op, "auto", _cuda_like()) == "cuda"
        _patched(monkeypatch, op, cuda="not built with CUDA", triton=None)
        assert backends.resolve(op, "auto", _cuda_like()) == "triton"
        assert backends.resolve(op, "auto", _cuda_like(torch.float64)) == "reference"
        _patched(monkeypatch, op, cuda="not built with CUDA", triton="not installed")
        assert backends.resolve(op, "auto", _cuda_like()) == "reference"
    _patched(monkeypatch, "attention", triton=None)
    assert backends.resolve("attention", "auto", _cuda_like()) == "triton"
    assert backends.resolve("attention", "auto", _cuda_like(torch.float64)) == "torch"
    _patched(monkeypatch, "attention", triton="not installed")
    assert backends.resolve("attention", "auto", _cuda_like()) == "torch"


def test_auto_with_nothing_available_lists_every_backend(monkeypatch):
    _patched(monkeypatch, "attention", cpu="reason zero", torch="reason one", reference="reason two")
    with pytest.raises(BackendUnavailable) as info:
        backends.resolve("attention", "auto", torch.zeros(1))
    message = str(info.value)
    parts = ("triton: auto does not pick it for cpu tensors", "cpu: reason zero", "torch: reason one")
    for part in (*parts, "reference: reason two"):
        assert part in message, message


def test_backend_checks_device_then_dtype_then_its_reason(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # as on a machine with one
    calls = []

    def reason(device, dtype):
        calls.append((device.type, dtype))
        return "the build is missing"

    b = Backend("fast", ("cuda",), (torch.float16,), reason)
    assert b.why_not(torch.device("cpu"), torch.float16) == "backend 'fast' runs cuda tensors, not cpu ones"
    assert b.why_not(torch.device("cuda"), torch.float32) == "backend 'fast' takes float16 tensors, not torch.float32"
    assert calls == []
    assert b.why_not(torch.device("cuda"), torch.float16) == "the build is missing"
    assert calls == [("cuda", torch.float16)]
    assert b.picked_by_auto(torch.device("cuda"))
    assert not dataclasses.replace(b, auto_devices=()).picked_by_auto(torch.device("cuda"))
    assert Backend("any", None, (torch.float32,)).why_not(torch.device("meta"), torch.float32) is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert b.why_not(torch.device("cuda"), torch.float16).startswith("no CUDA device here")


def test_importing_the_package_imports_no_triton_and_no_cycle():
    """backends.py imports the implementations' declarations, never an ops module or triton itself."""
    code = (
        "import sys\n"
        "import dsr_kernels.backends as b\n"
        "assert 'triton' not in sys.modules, 'import dsr_kernels imported triton'\n"
        "import dsr_kernels, torch\n"
        "dsr_kernels.explain('attention', 'cpu')\n"
        "assert 'triton' not in sys.modules, 'explain() imported triton with the interpreter off'\n"
        "assert torch.__file__ != dsr_kernels.torch.__file__\n"
        "print('ok')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]


def test_a_backend_without_a_feature_is_skipped_by_auto_and_refused_by_name(monkeypatch):
    """A backend that declares it lacks a feature (Backend.lacks): auto takes the next one, a request by name raises."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # as on a machine with one
    _patched(monkeypatch, "attention", triton=None)
    table = list(backends.BACKENDS["attention"])
    table[0] = dataclasses.replace(table[0], lacks=("varlen",))
    monkeypatch.setitem(backends.BACKENDS, "attention", tuple(table))
    assert backends.resolve("attention", "auto", _cuda_like()) == "triton"
    assert backends.resolve("attention", "auto", _cuda_like(), ("varlen",)) == "torch"
    with pytest.raises(BackendUnavailable, match="does not support packed variable-length sequences"):
        backends.resolve("attention", "triton", _cuda_like(), ("varlen",))
    assert table[0].missing(()) is None and "value head dim" not in (table[0].missing(("varlen",)) or "")
