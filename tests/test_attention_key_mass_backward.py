"""Key mass from the backward: ``key_mass_in_backward`` leaves the per-key attention mass to
the backward's dK/dV pass, which fills the forward's ``stats.key_mass`` in place. It must
equal the forward-computed key mass (the tolerance rule of tests/utils.py against the
float64 reference), leave the gradients as they are, and reach the user through
``dsr_kernels.outliers.record_training_statistics``.
"""

from dataclasses import dataclass

import pytest
import torch
from test_attention import CPU, requires_interpreter

import dsr_kernels
from dsr_kernels.attention_call import AttentionCall, Causal
from dsr_kernels.ops.attention import run
from dsr_kernels.reference.attention import attention_ref
from utils import assert_within_eager_error

BACKENDS = [CPU, "torch", pytest.param("triton", marks=requires_interpreter)]


@dataclass(frozen=True)
class Case:
    N: int = 37
    Nq: int | None = None
    H: int = 2
    Hk: int | None = None
    D: int = 16
    R: int = 0
    sinks: bool = False
    causal: bool = False
    key_mask: bool = False

    def __str__(self) -> str:
        flags = [f"n{self.N}", f"nq{self.Nq}" if self.Nq else "", f"hk{self.Hk}" if self.Hk else "", f"r{self.R}"]
        flags += ["sinks" if self.sinks else "", "causal" if self.causal else "", "km" if self.key_mask else ""]
        return "-".join(f for f in flags if f)


CASES = [
    Case(),
    Case(R=1, sinks=True),
    Case(R=5, causal=True, Nq=29),
    Case(Hk=1, R=5, key_mask=True),
]


def _inputs(case: Case, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    B, H, Hk, N, D = 2, case.H, case.Hk or case.H, case.N, case.D

    def rand(*shape):
        return torch.randn(*shape, generator=g).requires_grad_()

    x = dict(q=rand(B, H, case.Nq or N, D), k=rand(B, Hk, N, D), v=rand(B, Hk, N, D))
    kw = dict(causal=case.causal, num_prefix_tokens=2)
    if case.R:
        kw["kv_registers"] = (rand(H, case.R, D), rand(H, case.R, D))
    if case.sinks:
        kw["sinks"] = rand(H)
    if case.key_mask:
        km = torch.rand(B, N, generator=g) > 0.3
        km[:, -1] = False
        kw["key_mask"] = km
    return x, kw


def _grads(x, kw):
    leaves = [*x.values(), *kw.get("kv_registers", ()), *([kw["sinks"]] if "sinks" in kw else [])]
    return [t.grad.clone() for t in leaves]


def _clear(x, kw):
    for t in [*x.values(), *kw.get("kv_registers", ()), *([kw["sinks"]] if "sinks" in kw else [])]:
        t.grad = None


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_key_mass_equals_the_forward_one(case, backend):
    x, kw = _inputs(case)
    dout = torch.randn(2, case.H, case.Nq or case.N, case.D, generator=torch.Generator().manual_seed(1))
    out, fwd_stats = dsr_kernels.attention(**x, **kw, return_stats=True, backend=backend)
    out.backward(dout)
    fwd_grads = _grads(x, kw)
    _clear(x, kw)

    out2, stats = dsr_kernels.attention(**x, **kw, return_stats=True, key_mass_in_backward=True, backend=backend)
    assert stats.key_mass.shape == fwd_stats.key_mass.shape and stats.key_mass.isnan().all()  # not yet
    torch.testing.assert_close(stats.entropy, fwd_stats.entropy, rtol=0, atol=0)
    torch.testing.assert_close(stats.register_share, fwd_stats.register_share, rtol=0, atol=0)
    out2.backward(dout)

    with torch.no_grad():
        x64 = {n: t.double() for n, t in x.items()}
        kw64 = dict(kw)
        if "kv_registers" in kw:
            kw64["kv_registers"] = tuple(t.double() for t in kw["kv_registers"])
        if "sinks" in kw:
            kw64["sinks"] = kw["sinks"].double()
        causal = kw64.pop("causal")
        _, ref = attention_ref(**x64, **kw64, causal_offset=case.N - (case.Nq or case.N) if causal else None)
    assert_within_eager_error("key_mass", stats.key_mass, ref.key_mass, fwd_stats.key_mass, torch.float32, reduction=64)
    # The gradients are the ones the backward gives without the key mass.
    exact = backend != "torch"  # (torch: the chunked path instead of PyTorch's flash kernel)
    for got, want in zip(_grads(x, kw), fwd_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=0 if exact else 1e-5, atol=0 if exact else 1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_key_mass_of_packed_sequences(backend):
    g = torch.Generator().manual_seed(3)
    lens, H, D, R = [5, 0, 13], 2, 16, 1
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    T = sum(lens)
    q, k, v = (torch.randn(T, H, D, generator=g).requires_grad_() for _ in range(3))
    rk, rv = (torch.randn(H, R, D, generator=g) for _ in range(2))
    call = AttentionCall(
        q=q, k=k, v=v, rk=rk, rv=rv, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=max(lens),
        max_seqlen_k=max(lens) + 2, causal=int(Causal.BOTTOM_RIGHT), scale=D**-0.5, return_stats=True,
    )  # fmt: skip
    _, fwd_stats = run(call, backend)
    out, stats = run(call.replace(key_mass_in_backward=True), backend)
    out.sum().backward()
    assert stats.key_mass.shape == fwd_stats.key_mass.shape
    torch.testing.assert_close(stats.key_mass, fwd_stats.key_mass, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", [CPU, "torch"])
def test_attention_varlen_takes_the_option(backend):
    """The public packed-sequence function passes key_mass_in_backward into its call."""
    g = torch.Generator().manual_seed(4)
    cu = torch.tensor([0, 5, 5, 14])
    q, k, v = (torch.randn(14, 2, 16, generator=g).requires_grad_() for _ in range(3))
    regs = tuple(torch.randn(2, 3, 16, generator=g).requires_grad_() for _ in range(2))
    kw = dict(kv_registers=regs, return_stats=True, backend=backend)
    out, stats = dsr_kernels.attention_varlen(q, k, v, cu, cu, key_mass_in_backward=True, **kw)
    out.sum().backward()
    _, expected = dsr_kernels.attention_varlen(q, k, v, cu, cu, **kw)
    torch.testing.assert_close(stats.key_mass, expected.key_mass, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", [CPU, "torch"])
def test_without_a_backward_the_forward_computes_it(backend):
    x, kw = _inputs(Case(R=1))
    with torch.no_grad():
        _, stats = dsr_kernels.attention(**x, **kw, return_stats=True, key_mass_in_backward=True, backend=backend)
    _, want = dsr_kernels.attention(**x, **kw, return_stats=True, backend=backend)
    torch.testing.assert_close(stats.key_mass, want.key_mass, rtol=0, atol=0)


def test_record_training_statistics_on_a_tiny_dit():
    from dsr_kernels.models.dit import DiT
    from dsr_kernels.outliers import record_training_statistics

    cfg = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=3)
    torch.manual_seed(0)
    model = DiT(**cfg)
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([3, 500]), torch.tensor([0, 2])
    with record_training_statistics(model) as stats:
        loss = model(x, t, y).square().mean()
        assert stats.pending()  # the key mass comes with the backward
        loss.backward()
    assert not stats.pending()
    layers = stats.attention()
    assert len(layers) == cfg["depth"]
    for layer, per_call in layers.items():
        (s,) = per_call
        assert torch.isfinite(s.key_mass).all(), layer
        # every query's mass: sum over keys = number of queries (no sinks)
        torch.testing.assert_close(s.key_mass.sum(-1), torch.full_like(s.key_mass[..., 0], s.lse.shape[-1]))
    rows = [r for r in stats.records() if r.layer.startswith("blocks.")]
    assert len(rows) == cfg["depth"] and all(r.top1pct_key_share is not None for r in rows)
    # The same step without recording: no stats, same loss.
    torch.manual_seed(0)
    model2 = DiT(**cfg)
    assert torch.equal(model2(x, t, y).square().mean(), loss.detach())


@pytest.mark.parametrize("backend", [CPU, "torch"])
def test_opcheck(backend):
    x, kw = _inputs(Case(N=11, R=2, sinks=True, causal=True))
    call = AttentionCall(
        q=x["q"], k=x["k"], v=x["v"], rk=kw["kv_registers"][0], rv=kw["kv_registers"][1], sinks=kw["sinks"],
        causal=int(Causal.BOTTOM_RIGHT), num_prefix_tokens=2, scale=0.25, return_stats=True, key_mass_in_backward=True,
    )  # fmt: skip
    args = (*call.as_args(), backend)
    # (not test_aot_dispatch: the eager backward writes into the forward's key_mass output,
    # a side effect no graph has; under torch.compile run() leaves the key mass to the forward)
    checks = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(torch.ops.dsr_kernels.attention_fwd.default, args, test_utils=checks)
    out, lse = torch.ops.dsr_kernels.attention_fwd(*args)[:2]
    detached = call.replace(**{n: getattr(call, n).detach() for n in ("q", "k", "v", "rk", "rv", "sinks")})
    bwd_args = (torch.randn_like(out), out.detach(), lse.detach(), *detached.as_args(), backend)
    torch.library.opcheck(torch.ops.dsr_kernels.attention_bwd_key_mass.default, bwd_args)


def test_under_torch_compile_the_forward_computes_it():
    x, kw = _inputs(Case(N=13, R=1))

    def f(q, k, v):
        return dsr_kernels.attention(q, k, v, **kw, return_stats=True, key_mass_in_backward=True, backend="torch")

    out, stats = torch.compile(f, fullgraph=True)(**x)
    _, want = dsr_kernels.attention(**x, **kw, return_stats=True, backend="torch")
    torch.testing.assert_close(stats.key_mass, want.key_mass, rtol=1e-5, atol=1e-5)
