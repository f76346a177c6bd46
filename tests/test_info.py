"""``dsr-kernels info`` (dsr_kernels.info): every op's backends, the extension's state, runs without CUDA."""

import subprocess
import sys
import textwrap

import pytest
import torch

import dsr_kernels
from dsr_kernels import _extension
from dsr_kernels._extension import extension_loaded
from dsr_kernels.backends import OPS
from dsr_kernels.info import collect, render


def test_ops_registry_lists_the_ops_with_backends():
    assert set(OPS) >= {"attention", "norm_modulate", "ttr_activation"}
    with pytest.raises(ValueError, match="'attention', 'norm_modulate', 'ttr_activation'"):
        dsr_kernels.explain("layer_norm", "cpu")


def test_versions_extension_cpu_and_gpu_lines():
    info = dict(collect())
    for key in ("dsr_kernels", "git commit", "torch", "triton", "python", "cpu", "cpu kernels isa", "torch threads"):
        assert info[key], key
    assert info["dsr_kernels"].startswith(dsr_kernels.__version__)
    assert info["torch"].startswith(torch.__version__)
    assert info["torch threads"] == str(torch.get_num_threads())
    if extension_loaded():
        assert info["extension"] == f"built ({_extension._C.__file__})"
        assert info["extension CUDA kernels"].startswith(("yes", "no ("))
        assert info["cpu kernels isa"].split()[0] in ("default", "avx2", "avx512")
    else:
        assert "not importable" in info["extension"] and "pip install" in info["extension"]
    gpu = [value for key, value in collect() if key.startswith("gpu")]
    assert gpu and (all("compute capability" in v for v in gpu) or gpu[0].startswith("no CUDA device: "))


def test_every_op_and_backend_appears_with_its_reason():
    info = dict(collect())
    for op in OPS:
        for backend, reason in dsr_kernels.explain(op, "cpu").items():
            assert info[f"{op} [cpu] {backend}"] == reason


def test_runs_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    lines = collect()
    info = dict(lines)
    assert info["gpu"].startswith("no CUDA device: "), info["gpu"]
    assert not [key for key, _ in lines if "[cuda]" in key]
    text = render(lines)
    assert len(text.splitlines()) == len(lines)
    for key, value in lines:
        assert f"{key}  " in text and value in text


def test_without_the_extension():
    code = """
        import sys
        sys.modules["dsr_kernels._C"] = None  # as if installed with DSR_SKIP_BUILD=1
        from dsr_kernels.info import collect, render
        info = dict(collect())
        assert "not built" in info["extension"] and "DSR_SKIP_BUILD=1" in info["extension"], info["extension"]
        assert info["extension CUDA kernels"].startswith("no"), info
        assert info["cpu kernels isa"].startswith("none"), info
        assert "not built" in info["norm_modulate [cpu] cpu"], info
        print(render(collect()))
        """
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ttr_activation [cpu] reference" in result.stdout
