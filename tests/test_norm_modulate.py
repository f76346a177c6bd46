"""dsr_kernels.norm_modulate: compiled CPU/CUDA kernels and Triton against the float64 reference."""

from __future__ import annotations

import os
import subprocess
import sys
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


def _at_odd_offset(t: torch.Tensor) -> torch.Tensor:
    """t's values in a contiguous view one element into its storage: not 16-byte aligned, and
    contiguous, so that nothing on the way (``.contiguous()``) copies it into an aligned buffer."""
    return torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)[1:].view(t.shape).copy_(t)


def check_unaligned(backend: str, device: str) -> None:
    """x, registers and dout at an odd storage offset against the same values aligned.

    D = 1152 is a multiple of every vector width, so only the pointers are unaligned. The
    CPU kernel's forward loads and stores without alignment assumptions: the same bits.
    """
    B, N, D, R = 2, 33, 1152, 4
    g = torch.Generator().manual_seed(3)
    x, shift, scale, regs, dout = (
        torch.randn(*s, generator=g).to(device=device, dtype=torch.bfloat16)
        for s in ((B, N, D), (B, D), (B, D), (R, D), (B, R + N, D))
    )
    odd = [_at_odd_offset(t) for t in (x, regs, dout)]
    for t in odd:
        assert t.is_contiguous() and t.contiguous().data_ptr() == t.data_ptr() and t.data_ptr() % 16 != 0

    def run(x, regs, dout):
        x, regs = x.requires_grad_(True), regs.requires_grad_(True)
        res = norm_modulate(x, shift, scale, registers=regs, return_norms=True, backend=backend)
        return (res.out, res.residual, res.norms, *torch.autograd.grad(res.out, (x, regs), dout))

    got = run(*odd)
    want = run(x.clone(), regs.clone(), dout)
    ref = norm_modulate_ref(x.double(), shift.double(), scale.double(), registers=regs.double(), return_norms=True)
    names = ("out", "residual", "norms", "dx", "dregisters")
    for name, a, b in zip(names, got, want, strict=True):
        if backend == "cpu" and name in names[:3]:
            assert torch.equal(a, b), name
        assert_close(name, a, b, atol=0.05 if name in ("dx", "dregisters") else 0.02)
    assert_close("out vs reference", got[0], ref.out, atol=0.05)


@requires_extension
def test_cpu_unaligned_inputs():
    check_unaligned("cpu", "cpu")


@pytest.mark.gpu
def test_cuda_unaligned_rows_take_the_scalar_path():
    """D = 1153 (odd), and pointers 2 bytes off 16-byte alignment: no 16-byte loads, same answers."""
    check_case(Case(N=33, D=1153, R=4, affine=True, dtype=torch.bfloat16), "cuda", device="cuda")
    check_unaligned("cuda", "cuda")


NAN_BACKENDS = [
    pytest.param("cpu", marks=requires_extension),
    pytest.param("triton", marks=requires_interpreter),
    "reference",
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", ["layernorm", "rmsnorm"])
@pytest.mark.parametrize("backend", NAN_BACKENDS)
def test_nan_in_x_propagates_to_its_token(backend, kind, dtype):
    """A NaN in a token makes that token's out, norm and moments NaN (max |h| too, as torch.amax:
    a larger value in the row must not hide it); the other tokens are untouched."""
    B, N, D, R = 2, 6, 37, 3  # D = 37: a NaN in a vector block and one in a row's tail
    g = torch.Generator().manual_seed(4)
    x, shift, scale = (torch.randn(*s, generator=g).to(dtype) for s in ((B, N, D), (B, D), (B, D)))
    regs = torch.randn(R, D, generator=g).to(dtype)
    nan_at = [(0, 0, 0), (1, 2, 5), (1, 4, 36)]
    for b, n, d in nan_at:
        x[b, n, d] = float("nan")
        x[b, n, (d + 1) % D] = 100.0  # the largest |h| of the row
    res, moments = nm_ops.norm_modulate_with_moments(
        x, shift, scale, weight=None, bias=None, kind=kind, eps=1e-6, registers=regs,
        return_norms=True, return_moments=True, backend=backend,
    )  # fmt: skip
    nan_rows = torch.zeros(B, R + N, dtype=torch.bool)
    for b, n, _ in nan_at:
        nan_rows[b, R + n] = True
    for name, t in (("max |h|", moments[..., 0]), ("sum h^4", moments[..., 1]), ("norms", res.norms)):
        assert torch.equal(t.isnan(), nan_rows), f"{name}: NaN at {t.isnan().nonzero().tolist()}"
    assert torch.equal(res.out.isnan().all(-1), nan_rows) and torch.equal(res.out.isnan().any(-1), nan_rows)
    h = res.residual.double()
    ok = ~nan_rows
    assert_close("max |h|", moments[..., 0][ok], h.abs().amax(-1)[ok], atol=0, rtol=1e-6)
    assert_close("sum h^4", moments[..., 1][ok], h.pow(4).sum(-1)[ok], atol=0, rtol=1e-5)
    ref = norm_modulate_ref(x, shift, scale, kind=kind, registers=regs)
    assert_close("out", res.out[ok], ref.out[ok], atol=0.05 if dtype == torch.bfloat16 else 1e-5)


_ISA_RUN = """
import sys, torch, dsr_kernels._C as C
from dsr_kernels.ops import norm_modulate as nm
g = torch.Generator().manual_seed(5)
results = {}
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    for D in (5, 16, 37, 1152, 1153):
        for kind in ("layernorm", "rmsnorm"):
            x, shift, scale = (torch.randn(*s, generator=g).to(dtype) for s in ((2, 7, D), (2, D), (2, D)))
            x = x * 3 + 1
            if D > 5:  # a NaN row (its gradients are NaN too: the rows without one are compared as well)
                x[1, 3, D // 2] = float("nan")
            regs = torch.randn(3, D, generator=g).to(dtype)
            weight = torch.randn(D, generator=g).to(dtype) if kind == "rmsnorm" else None
            leaves = [t.requires_grad_(True) for t in (x, shift, scale, regs, weight) if t is not None]
            res, moments = nm.norm_modulate_with_moments(
                x, shift, scale, weight=weight, bias=None, kind=kind, eps=1e-6, registers=regs,
                return_norms=True, return_moments=True, backend="cpu",
            )
            dout, dres = (torch.randn(res.out.shape, generator=g).to(dtype) for _ in range(2))
            grads = torch.autograd.grad((res.out, res.residual), leaves, (dout, dres))
            results[f"{dtype} D{D} {kind}"] = (res.out, res.residual, res.norms, moments, *grads)
torch.save(results, sys.argv[1])
print(C.cpu_capability())
"""


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bit patterns (NaN compares equal to the same NaN)."""
    return t.contiguous().view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


@requires_extension
def test_cpu_instruction_sets_give_the_same_bits(tmp_path):
    """The vector code for each instruction set this processor has (DSR_CPU_CAPABILITY caps the pick, one
    process each) computes bit-identical outputs, statistics and gradients: dtypes, tails, NaN rows."""
    order = ["default", "avx2", "avx512"]
    runs = {}
    for capability in order:
        path = tmp_path / f"{capability}.pt"
        env = dict(os.environ, DSR_CPU_CAPABILITY=capability)
        run = subprocess.run(
            [sys.executable, "-c", _ISA_RUN, str(path)], env=env, capture_output=True, text=True, timeout=300
        )
        assert run.returncode == 0, run.stderr[-3000:]
        picked = run.stdout.strip().splitlines()[-1]
        assert order.index(picked) <= order.index(capability), (capability, picked)
        runs[picked] = torch.load(path)
    assert "default" in runs
    base = runs.pop("default")
    for picked, results in runs.items():
        for key, tensors in base.items():
            names = ("out", "residual", "norms", "moments", "dx", "dshift", "dscale", "dregisters", "dweight")
            for name, a, b in zip(names, tensors, results[key], strict=False):
                assert torch.equal(_bits(a), _bits(b)), f"{picked} vs default, {key}: {name} differs"


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

    monkeypatch.setattr(nm_ops, "resolve", no_launch)  # validation comes first
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


ZERO_R_BACKENDS = [
    pytest.param("cpu", marks=requires_extension),
    pytest.param("triton", marks=requires_interpreter),
    "reference",
]


@pytest.mark.parametrize("layout", ["shared", "per_sample"])
@pytest.mark.parametrize("backend", ZERO_R_BACKENDS)
def test_zero_registers_are_no_registers(backend, layout):
    """registers [0, D] or [B, 0, D] give exactly what no registers give: no residual, T = N, same gradients."""
    B, N, D = 2, 5, 24
    g = torch.Generator().manual_seed(1)
    x, shift, scale, weight = (torch.randn(*s, generator=g) for s in ((B, N, D), (B, D), (B, D), (D,)))
    dout = torch.randn(B, N, D, generator=g)

    def run(registers):
        leaves = [t.clone().requires_grad_(True) for t in (x, shift, scale, weight)]
        res = norm_modulate(*leaves[:3], weight=leaves[3], registers=registers, return_norms=True, backend=backend)
        (res.out * dout).sum().backward()  # the registers (R = 0) get no gradient, and the backward runs
        return res, [t.grad for t in leaves]

    regs = torch.zeros((0, D) if layout == "shared" else (B, 0, D), requires_grad=True)
    got, got_grads = run(regs)
    want, want_grads = run(None)
    assert got.residual is None and want.residual is None
    assert got.out.shape == (B, N, D) and got.norms.shape == (B, N)
    assert torch.equal(got.out, want.out) and torch.equal(got.norms, want.norms)
    for name, a, b in zip(("dx", "dshift", "dscale", "dweight"), got_grads, want_grads, strict=True):
        assert torch.equal(a, b), name
    ref = norm_modulate_ref(x, shift, scale, weight=weight, registers=regs.detach(), return_norms=True)
    assert ref.residual is None
    assert_close("out", got.out, ref.out, atol=1e-4)
    assert_close("norms", got.norms, ref.norms, atol=1e-4)


@pytest.mark.parametrize("layout", ["shared", "per_sample"])
@pytest.mark.parametrize("backend", ZERO_R_BACKENDS[:2])
def test_zero_registers_fake_shapes(backend, layout):
    """Under fake tensors (the Meta / register_fake kernels torch.compile traces with) R = 0 is no registers too."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    B, N, D = 2, 5, 24
    with FakeTensorMode():
        x, scale = torch.empty(B, N, D), torch.empty(B, D)
        regs = torch.empty((0, D) if layout == "shared" else (B, 0, D))
        res = norm_modulate(x, None, scale, registers=regs, return_norms=True, backend=backend)
        assert res.residual is None
        assert res.out.shape == (B, N, D) and res.norms.shape == (B, N)


def test_direct_op_with_zero_registers_agrees_with_its_fake_kernel():
    """torch.ops.dsr_kernels.norm_modulate_fwd / _bwd called directly with R = 0: the Meta kernels give the
    real kernels' shapes (no residual, no register gradient), so FakeTensor tracing matches the run."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    if not hasattr(torch.ops.dsr_kernels, "norm_modulate_fwd"):
        pytest.skip("the compiled extension is not built: " + str(dsr_kernels.explain("norm_modulate", "cpu")["cpu"]))
    x, regs = torch.randn(2, 5, 16), torch.zeros(0, 16)
    real = torch.ops.dsr_kernels.norm_modulate_fwd(x, None, None, None, None, regs, "layernorm", 1e-6, True, False)
    with FakeTensorMode() as mode:
        fake = torch.ops.dsr_kernels.norm_modulate_fwd(
            mode.from_tensor(x), None, None, None, None, mode.from_tensor(regs), "layernorm", 1e-6, True, False
        )
    assert [tuple(t.shape) for t in fake] == [tuple(t.shape) for t in real]
    assert tuple(real[1].shape) == (0,)  # no residual without registers
    dout = torch.randn_like(real[0])
    args = (dout, None, x, None, None, None, None, regs, real[4], real[5], "layernorm")
    real_g = torch.ops.dsr_kernels.norm_modulate_bwd(*args)
    with FakeTensorMode() as mode:
        fake_args = tuple(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args)
        fake_g = torch.ops.dsr_kernels.norm_modulate_bwd(*fake_args)
    assert [tuple(t.shape) for t in fake_g] == [tuple(t.shape) for t in real_g]
