"""dsr_kernels.norm_modulate: compiled CPU/CUDA kernels and Triton against the float64 reference."""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import pytest
import torch

import dsr_kernels
from dsr_kernels import BackendUnavailable, norm_modulate
from dsr_kernels._extension import extension_loaded
from dsr_kernels.backends import triton_interpreting
from dsr_kernels.ops import norm_modulate as nm_ops
from dsr_kernels.reference.norm_modulate import norm_modulate_ref
from utils import assert_close, assert_within_eager_error


@dataclass(frozen=True)
class Case:
    B: int = 2
    N: int = 257
    D: int = 72
    R: int = 0
    shared: bool = True
    kind: str = "layernorm"
    modulate: bool = True
    affine: bool = False
    dtype: torch.dtype = torch.float32

    def __str__(self) -> str:
        parts = [f"B{self.B}N{self.N}D{self.D}R{self.R}", self.kind]
        parts += ["shared" if self.shared else "per_sample"] if self.R else []
        parts += ["modulate"] if self.modulate else []
        parts += ["affine"] if self.affine else []
        return "-".join(parts + [str(self.dtype).replace("torch.", "")])


CASES = [
    Case(N=256, D=1152, R=36, dtype=torch.bfloat16),  # DiT-XL at DSR's register_start block
    Case(N=292, D=72, R=1, shared=False, kind="rmsnorm", affine=True),
    Case(B=1, N=1, D=1153, R=36, affine=True, dtype=torch.float16),
    Case(N=257, D=1153, kind="rmsnorm", affine=True, dtype=torch.bfloat16),  # LightningDiT: RMSNorm with weight
    Case(N=7, D=72, R=36, shared=False, modulate=False, affine=True),
    Case(B=3, N=1, D=1152, modulate=False, dtype=torch.float16),
    Case(B=1, N=3, D=8192, R=1, kind="rmsnorm", dtype=torch.bfloat16),
    Case(B=2, N=65, D=72, R=0, kind="layernorm", affine=True, dtype=torch.float32),
]


def make_inputs(case: Case, device: str = "cpu", seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(zlib.crc32(str(case).encode()) + seed)

    def rand(*shape, mean=0.0, std=1.0):
        return (torch.randn(*shape, generator=g) * std + mean).to(device=device, dtype=case.dtype)

    B, N, D = case.B, case.N, case.D
    # A non-zero mean and a few large tokens: what DiT residual streams look like.
    x = rand(B, N, D, mean=0.5, std=2.0)
    x[:, : min(N, 2)] *= 20.0
    inputs = dict(x=x)
    if case.modulate:
        inputs.update(shift=rand(B, D, std=0.5), scale=rand(B, D, std=0.5))
    if case.affine:
        inputs.update(weight=rand(D, mean=1.0, std=0.2), bias=rand(D, std=0.2))
    if case.R:
        inputs["registers"] = rand(*((case.R, D) if case.shared else (B, case.R, D)))
    return inputs


def _leaves(inputs: dict, dtype: torch.dtype | None):
    out, wrt = {}, []
    for name, t in inputs.items():
        t = t.detach().clone() if dtype is None else t.detach().to(dtype)
        out[name] = t.requires_grad_(True)
        wrt.append(out[name])
    return out, wrt


def _loss_grads(out, residual, wrt, dout, dres):
    loss = (out * dout.to(out.dtype)).sum()
    if residual is not None:
        loss = loss + (residual * dres.to(residual.dtype)).sum()
    return torch.autograd.grad(loss, wrt)


def check_case(case: Case, backend: str, device: str = "cpu", seed: int = 0) -> None:
    inputs = make_inputs(case, device, seed)
    T = case.N + case.R
    dout = torch.randn(case.B, T, case.D, device=device).to(case.dtype)
    dres = torch.randn(case.B, T, case.D, device=device).to(case.dtype)

    kw, wrt = _leaves(inputs, None)
    res = norm_modulate(**kw, kind=case.kind, return_norms=True, backend=backend)
    assert res.out.shape == (case.B, T, case.D) and res.out.dtype == case.dtype
    assert res.norms.shape == (case.B, T) and res.norms.dtype == torch.float32
    grads = _loss_grads(res.out, res.residual, wrt, dout, dres)

    cpu = {k: v.cpu() for k, v in inputs.items()}
    kw64, wrt64 = _leaves(cpu, torch.float64)
    ref = norm_modulate_ref(**kw64, kind=case.kind, return_norms=True)
    ref_grads = _loss_grads(ref.out, ref.residual, wrt64, dout.cpu().double(), dres.cpu().double())
    kw_e, wrt_e = _leaves(cpu, None)
    eager = norm_modulate_ref(**kw_e, kind=case.kind, return_norms=True, compute_dtype=case.dtype)
    eager_grads = _loss_grads(eager.out, eager.residual, wrt_e, dout.cpu(), dres.cpu())

    assert_within_eager_error("out", res.out, ref.out, eager.out, case.dtype)
    if case.R:
        assert torch.equal(res.residual.cpu(), eager.residual), "residual must be an exact copy"
    else:
        assert res.residual is None
    assert_within_eager_error("norms", res.norms, ref.norms, eager.norms, case.dtype)
    for name, got, r, e in zip(inputs, grads, ref_grads, eager_grads, strict=True):
        assert got.shape == inputs[name].shape and got.dtype == case.dtype, name
        assert_within_eager_error(f"d{name}", got, r, e, case.dtype)


requires_extension = pytest.mark.skipif(not extension_loaded(), reason="dsr_kernels._C is not built")
requires_interpreter = pytest.mark.skipif(
    not triton_interpreting(), reason="Triton on CPU tensors needs TRITON_INTERPRET=1 (a GPU is present)"
)


@requires_extension
@pytest.mark.parametrize("case", CASES, ids=str)
def test_cpu_kernels_match_reference(case):
    check_case(case, "cpu")


@requires_interpreter
@pytest.mark.parametrize("case", CASES, ids=str)
def test_triton_matches_reference(case):
    check_case(case, "triton")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_cuda_and_triton_on_gpu_match_reference(case, backend):
    check_case(case, backend, device="cuda")


@pytest.mark.gpu
def test_cuda_unaligned_rows_take_the_scalar_path():
    """D = 1153 (odd) and a storage offset: no 16-byte loads, same answers."""
    case = Case(N=33, D=1153, R=4, affine=True, dtype=torch.bfloat16)
    check_case(case, "cuda", device="cuda")
    x = torch.randn(2, 34, 1152, device="cuda", dtype=torch.bfloat16)[:, 1:]  # offset rows
    out = norm_modulate(x, backend="cuda").out
    assert_close("offset", out, norm_modulate(x.contiguous(), backend="reference").out, atol=0.05)


@requires_extension
def test_cpu_gradcheck_float64():
    B, N, D, R = 2, 3, 5, 2
    args = [
        torch.randn(*s, dtype=torch.float64, requires_grad=True)
        for s in ((B, N, D), (B, D), (B, D), (D,), (D,), (R, D))
    ]
    for kind in ("layernorm", "rmsnorm"):

        def f(x, shift, scale, weight, bias, registers, kind=kind):
            res = norm_modulate(
                x, shift, scale, weight=weight, bias=bias, registers=registers, kind=kind, backend="cpu"
            )
            return res.out, res.residual

        assert torch.autograd.gradcheck(f, args)


def test_reference_gradcheck_float64():
    args = [torch.randn(*s, dtype=torch.float64, requires_grad=True) for s in ((2, 3, 5), (2, 5), (2, 5), (2, 2, 5))]

    def f(x, shift, scale, registers):
        return norm_modulate_ref(x, shift, scale, registers=registers, kind="rmsnorm").out

    assert torch.autograd.gradcheck(f, args)


@requires_extension
def test_cpu_backward_is_deterministic_across_thread_counts():
    case = Case(B=3, N=200, D=1152, R=36, affine=True)
    inputs = make_inputs(case)
    dout = torch.randn(case.B, case.N + case.R, case.D)
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 1):
            torch.set_num_threads(n)
            kw, wrt = _leaves(inputs, None)
            res = norm_modulate(**kw, backend="cpu")
            results.append(torch.autograd.grad(res.out, wrt, dout))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(results[0], results[1], strict=True):
        assert torch.equal(a, b)
    for a, b in zip(results[0], results[2], strict=True):
        assert torch.equal(a, b)


@requires_extension
def test_shared_register_gradients_are_summed_over_batch():
    x = torch.randn(3, 10, 64)
    regs = torch.randn(4, 64, requires_grad=True)
    res = norm_modulate(x, registers=regs, backend="cpu")
    (res.out.square().sum() + res.residual.sum()).backward()
    regs_b = regs.detach()[None].repeat(3, 1, 1).requires_grad_()
    res_b = norm_modulate(x, registers=regs_b, backend="cpu")
    (res_b.out.square().sum() + res_b.residual.sum()).backward()
    assert_close("dregisters", regs.grad, regs_b.grad.sum(0), atol=1e-5)


@pytest.mark.parametrize(
    "backend", [pytest.param("cpu", marks=requires_extension), pytest.param("triton", marks=requires_interpreter)]
)
def test_opcheck(backend):
    op = torch.ops.dsr_kernels.norm_modulate_fwd if backend == "cpu" else torch.ops.dsr_kernels.norm_modulate_fwd_triton
    x = torch.randn(2, 5, 24, requires_grad=True)
    shift, scale, w, regs = (torch.randn(*s, requires_grad=True) for s in ((2, 24), (2, 24), (24,), (3, 24)))
    torch.library.opcheck(op.default, (x, shift, scale, w, None, regs, "layernorm", 1e-6, True, True))
    torch.library.opcheck(op.default, (x, None, scale, None, None, None, "rmsnorm", 1e-5, False, False))


@requires_extension
def test_torch_compile_fullgraph():
    torch._dynamo.reset()

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.registers = torch.nn.Parameter(torch.randn(4, 32))
            self.ada = torch.nn.Linear(16, 64)

        def forward(self, x, c):
            shift, scale = self.ada(c).chunk(2, dim=-1)
            res = norm_modulate(x, shift, scale, registers=self.registers, return_norms=True)
            return res.out.sum(-1) + res.norms

    block = Block()
    x, c = torch.randn(2, 9, 32), torch.randn(2, 16)
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    out = compiled(x, c)
    assert_close("compiled", out, block(x, c), atol=1e-5)
    out.sum().backward()
    assert block.registers.grad is not None


def _good():
    return dict(x=torch.randn(2, 5, 8), shift=torch.randn(2, 8), scale=torch.randn(2, 8))


BAD = [
    ("x rank", lambda a: a.update(x=torch.randn(5, 8)), ValueError, ["'x'", "[B, N, D]", "[5, 8]"]),
    ("x dtype", lambda a: a.update(x=torch.ones(2, 5, 8, dtype=torch.int32)), TypeError, ["'x'", "torch.int32"]),
    ("shift shape", lambda a: a.update(shift=torch.randn(2, 7)), ValueError, ["'shift'", "[B=2, D=8]", "[2, 7]"]),
    ("scale shape", lambda a: a.update(scale=torch.randn(8)), ValueError, ["'scale'", "[B=2, D=8]", "[8]"]),
    (
        "registers width",
        lambda a: a.update(registers=torch.randn(3, 7)),
        ValueError,
        ["'registers'", "[R, D=8]", "[3, 7]"],
    ),
    ("registers batch", lambda a: a.update(registers=torch.randn(3, 4, 8)), ValueError, ["'registers'", "B=2"]),
    ("weight length", lambda a: a.update(weight=torch.randn(9)), ValueError, ["'weight'", "[D=8]", "[9]"]),
    ("bias length", lambda a: a.update(bias=torch.randn(2, 8)), ValueError, ["'bias'", "[D=8]", "[2, 8]"]),
    ("eps zero", lambda a: a.update(eps=0.0), ValueError, ["'eps'", "> 0", "0.0"]),
    ("eps negative", lambda a: a.update(eps=-1e-6), ValueError, ["'eps'"]),
    ("kind", lambda a: a.update(kind="batchnorm"), ValueError, ["'kind'", "'batchnorm'"]),
    ("dtype mix", lambda a: a.update(shift=torch.randn(2, 8).half()), TypeError, ["'shift'", "torch.float16"]),
    ("device mix", lambda a: a.update(scale=torch.randn(2, 8, device="meta")), ValueError, ["'scale'", "meta"]),
    ("backend", lambda a: a.update(backend="mps"), ValueError, ["'backend'", "'mps'"]),
]


@pytest.mark.parametrize("mutate, exc, words", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_raises_before_launch(monkeypatch, mutate, exc, words):
    def no_launch(*_a, **_k):
        raise AssertionError("an implementation ran before validation failed")

    monkeypatch.setattr(nm_ops, "_resolve_backend", no_launch)  # validation comes first
    args = _good()
    mutate(args)
    with pytest.raises(exc) as info:
        norm_modulate(**args)
    for word in words:
        assert word in str(info.value), f"{word!r} not in {info.value}"


def test_explicit_backend_that_cannot_run_raises(monkeypatch):
    x = torch.randn(1, 2, 8)
    with pytest.raises(BackendUnavailable, match="backend 'cuda' runs cuda tensors"):
        norm_modulate(x, backend="cuda")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BackendUnavailable, match="TRITON_INTERPRET=1"):
        norm_modulate(x, backend="triton")


def test_auto_backend_and_explain():
    table = dsr_kernels.explain("norm_modulate", "cpu")
    assert table["reference"] == "available"
    assert ("available" if extension_loaded() else "not importable") in table["cpu"]
    assert "cpu tensors" in dsr_kernels.explain("norm_modulate", "cuda")["cpu"]


def test_empty_sequence_with_registers():
    """N = 0 tokens: the output is the registers alone."""
    x = torch.randn(2, 0, 8)
    regs = torch.randn(3, 8)
    res = norm_modulate(x, registers=regs, return_norms=True)
    ref = norm_modulate_ref(x, registers=regs, return_norms=True)
    assert_close("out", res.out, ref.out, atol=1e-5)
    assert torch.equal(res.residual, ref.residual)
