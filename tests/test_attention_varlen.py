"""dsr_kernels.attention_varlen: packed variable-length sequences, against the per-sequence definition."""

import math
from dataclasses import dataclass

import pytest
import torch
from test_attention import CPU, requires_interpreter

import dsr_kernels
from dsr_kernels import BackendUnavailable, attention_varlen
from dsr_kernels.attention_call import AttentionCall, Causal
from dsr_kernels.reference.attention import attention_ref
from utils import assert_within_eager_error


@dataclass(frozen=True)
class VarlenCase:
    seqlens_q: tuple[int, ...]
    seqlens_k: tuple[int, ...]
    H: int = 2
    Hk: int | None = None
    D: int = 64
    Dv: int | None = None
    R: int = 0
    per_sequence_registers: bool = False
    sinks: bool = False
    causal: bool = False
    prefix: int = 0
    dtype: torch.dtype = torch.float32

    def __str__(self) -> str:
        parts = ["q" + ",".join(map(str, self.seqlens_q)), "k" + ",".join(map(str, self.seqlens_k))]
        parts += [f"h{self.H}", f"hk{self.Hk}" if self.Hk else "", f"d{self.D}", f"dv{self.Dv}" if self.Dv else ""]
        parts += [f"r{self.R}" + ("seq" if self.per_sequence_registers else "") if self.R else ""]
        parts += [
            "sinks" if self.sinks else "",
            "causal" if self.causal else "",
            f"prefix{self.prefix}" if self.prefix else "",
        ]
        return "-".join(p for p in parts + [str(self.dtype).replace("torch.", "")] if p)


CASES = [
    VarlenCase((1, 147, 113), (147, 1, 203), D=72, R=4, sinks=True),  # flash-attn's seqlen pairs, packed
    VarlenCase((113, 0, 37), (211, 5, 0), D=80, R=36, causal=True, dtype=torch.bfloat16),  # empty sequences
    VarlenCase((50, 29), (50, 29), H=4, Hk=2, D=64, Dv=40, R=1, per_sequence_registers=True, dtype=torch.float16),
    VarlenCase((7, 64, 3, 20), (9, 64, 3, 1), H=3, Hk=1, D=32, sinks=True, causal=True, prefix=2),
    VarlenCase((31,), (31,), D=16, dtype=torch.bfloat16),  # one sequence
    # random sequence lengths (seeded), as flash-attn's varlen tests draw them
    VarlenCase(
        tuple(torch.randint(0, 90, (6,), generator=torch.Generator().manual_seed(7)).tolist()),
        tuple(torch.randint(1, 130, (6,), generator=torch.Generator().manual_seed(8)).tolist()),
        H=4,
        Hk=2,
        D=80,
        R=4,
        sinks=True,
        causal=True,
        dtype=torch.float16,
    ),  # fmt: skip
]


def _inputs(case: VarlenCase, seed: int = 0):
    g = torch.Generator().manual_seed(seed + len(str(case)))

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(case.dtype)

    Tq, Tk, S = sum(case.seqlens_q), sum(case.seqlens_k), len(case.seqlens_q)
    Hk, Dv = case.Hk or case.H, case.Dv or case.D
    x = dict(q=rand(Tq, case.H, case.D), k=rand(Tk, Hk, case.D), v=rand(Tk, Hk, Dv))
    if case.R:
        lead = (S, case.H) if case.per_sequence_registers else (case.H,)
        x["kv_registers"] = (rand(*lead, case.R, case.D, scale=2.0), rand(*lead, case.R, Dv))
    if case.sinks:
        x["sinks"] = (torch.randn(case.H, generator=g) + 1.0).to(case.dtype)
    cu = [
        torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
        for lens in (case.seqlens_q, case.seqlens_k)
    ]
    return x, cu[0], cu[1]


def _leaves(x, dtype=None):
    out, wrt = {}, []
    for name, t in x.items():
        ts = t if isinstance(t, tuple) else (t,)
        new = tuple((u.detach().to(dtype) if dtype else u.detach().clone()).requires_grad_() for u in ts)
        wrt += list(new)
        out[name] = new if isinstance(t, tuple) else new[0]
    return out, wrt


def _eager(case, x, cu_q, cu_k, compute_dtype):
    """The definition at compute_dtype, one sequence at a time (attention_ref)."""
    kw, wrt = _leaves(x)
    S = len(case.seqlens_q)
    outs, lse = [], []
    for s in range(S):
        q0, q1, k0, k1 = cu_q[s].item(), cu_q[s + 1].item(), cu_k[s].item(), cu_k[s + 1].item()
        if q1 == q0:
            continue
        regs = None
        if "kv_registers" in kw:
            regs = tuple(t if t.dim() == 3 else t[s : s + 1] for t in kw["kv_registers"])
        o, st = attention_ref(
            kw["q"][q0:q1].transpose(0, 1)[None], kw["k"][k0:k1].transpose(0, 1)[None],
            kw["v"][k0:k1].transpose(0, 1)[None], kv_registers=regs, sinks=kw.get("sinks"),
            causal_offset=(k1 - k0) - (q1 - q0) if case.causal else None,
            num_prefix_tokens=min(case.prefix, k1 - k0), compute_dtype=compute_dtype,
        )  # fmt: skip
        outs.append(o[0].transpose(0, 1))
        lse.append(st.lse[0])
    out = torch.cat(outs)
    return out, torch.cat(lse, -1), wrt


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("backend", [CPU, "torch", pytest.param("triton", marks=requires_interpreter)])
def test_varlen_matches_the_per_sequence_definition(case, backend):
    check_varlen(case, backend)


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES, ids=str)
def test_varlen_triton_cuda_matches_the_per_sequence_definition(case):
    check_varlen(case, "triton", device="cuda")


def check_varlen(case, backend, device="cpu"):
    x, cu_q, cu_k = _inputs(case)
    on_device = {n: tuple(u.to(device) for u in t) if isinstance(t, tuple) else t.to(device) for n, t in x.items()}
    kw, wrt = _leaves(on_device)
    out, stats = attention_varlen(
        **kw, cu_seqlens_q=cu_q.to(device), cu_seqlens_k=cu_k.to(device), causal=case.causal,
        num_prefix_tokens=case.prefix, return_stats=True, backend=backend,
    )  # fmt: skip
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(case.dtype)
    grads = [g.cpu() for g in torch.autograd.grad(out, wrt, dout.to(device))]
    out, stats = out.detach().cpu(), type(stats)(*(t.cpu() for t in stats))
    Tq, S = sum(case.seqlens_q), len(case.seqlens_q)
    assert out.shape == (Tq, case.H, case.Dv or case.D) and out.dtype == case.dtype
    assert stats.lse.shape == (case.H, Tq) and stats.key_mass.shape == (S, case.H, case.R + max(case.seqlens_k))
    ref_out, ref_lse, ref_wrt = _eager(case, x, cu_q, cu_k, torch.float64)
    eager_out, eager_lse, eager_wrt = _eager(case, x, cu_q, cu_k, case.dtype)
    K = max(max(case.seqlens_q) * case.H // (case.Hk or case.H), case.R + max(case.seqlens_k), case.D)
    assert_within_eager_error("out", out, ref_out, eager_out, case.dtype, reduction=K)
    keep = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(stats.lse), keep)
    assert_within_eager_error("lse", stats.lse[keep], ref_lse[keep], eager_lse[keep], case.dtype, reduction=K)
    # the statistics per sequence: those of the batch op on that sequence alone
    for s in range(S):
        q0, q1, k0, k1 = cu_q[s].item(), cu_q[s + 1].item(), cu_k[s].item(), cu_k[s + 1].item()
        nk = k1 - k0
        assert stats.key_mass[s, :, case.R + nk :].abs().max() == 0 if case.R + nk < stats.key_mass.shape[-1] else True
        if q1 > q0:
            total = stats.key_mass[s].sum(-1)  # every query puts 1 - p_sink on the keys
            expected = (
                (1 - torch.exp(x["sinks"].float()[:, None] - stats.lse[:, q0:q1])).sum(-1) if case.sinks else None
            )
            if expected is not None:
                torch.testing.assert_close(total, expected, atol=1e-3 * (q1 - q0), rtol=1e-2)
    ref_grads = torch.autograd.grad(ref_out, ref_wrt, dout.double())
    eager_grads = torch.autograd.grad(eager_out, eager_wrt, dout)
    names = [
        n
        for n in ("q", "k", "v", "rk", "rv", "sinks")
        if n in ("q", "k", "v") or (n in ("rk", "rv") and case.R) or (n == "sinks" and case.sinks)
    ]
    for name, g, r, e in zip(names, grads, ref_grads, eager_grads, strict=True):
        assert g.shape == r.shape and g.dtype == case.dtype
        assert_within_eager_error(f"d{name}", g, r, e, case.dtype, reduction=K)


def test_varlen_equals_the_batch_op_on_equal_lengths():
    B, N, H, D = 3, 37, 2, 32
    q, k, v = (torch.randn(B, N, H, D) for _ in range(3))
    cu = torch.arange(0, (B + 1) * N, N, dtype=torch.int32)
    out, stats = attention_varlen(
        q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), cu, cu, causal=True, return_stats=True
    )
    ref, ref_stats = dsr_kernels.attention(*(t.transpose(1, 2) for t in (q, k, v)), causal=True, return_stats=True)
    torch.testing.assert_close(out, ref.transpose(1, 2).flatten(0, 1), atol=2e-6, rtol=0)
    torch.testing.assert_close(stats.key_mass, ref_stats.key_mass, atol=2e-5, rtol=0)
    torch.testing.assert_close(stats.entropy, ref_stats.entropy.transpose(0, 1).flatten(1), atol=2e-5, rtol=0)


@pytest.mark.parametrize("backend", [CPU])
def test_varlen_cpu_kernel_is_bitwise_the_same_for_any_thread_count(backend):
    case = VarlenCase((57, 0, 129, 3), (60, 7, 129, 0), H=4, Hk=2, D=40, R=3, sinks=True, causal=True)
    x, cu_q, cu_k = _inputs(case)
    threads, results = torch.get_num_threads(), []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            kw, wrt = _leaves(x)
            out, stats = attention_varlen(
                **kw, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, causal=True, return_stats=True, backend=backend
            )
            results.append([out, *stats, *torch.autograd.grad(out.square().sum(), wrt)])
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            assert torch.equal(a, b)


def test_varlen_bad_input():
    q, k = torch.randn(10, 2, 16), torch.randn(12, 2, 16)
    cu_q, cu_k = torch.tensor([0, 4, 10], dtype=torch.int32), torch.tensor([0, 5, 12], dtype=torch.int32)
    cases = [
        (dict(q=q[None]), ValueError, "'q' must be 3-D \\[Tq, H, D\\]"),
        (
            dict(cu_seqlens_q=torch.tensor([0, 4, 11], dtype=torch.int32)),
            ValueError,
            "'cu_seqlens_q' must rise from 0 to 10",
        ),
        (dict(cu_seqlens_k=torch.tensor([0, 7, 5, 12], dtype=torch.int32)), ValueError, "'cu_seqlens_k' must rise"),
        (dict(cu_seqlens_k=torch.tensor([0, 12], dtype=torch.int32)), ValueError, "one offset per sequence"),
        (dict(cu_seqlens_q=cu_q.float()), ValueError, "int32 / int64"),
        (dict(max_seqlen_k=3), ValueError, "'max_seqlen_k' must be an int >= the longest sequence \\(7\\)"),
        (
            dict(kv_registers=(torch.randn(3, 2, 4, 16), torch.randn(3, 2, 4, 16))),
            ValueError,
            "\\[S=2, H=2, R, D=16\\]",
        ),
        (dict(k=torch.randn(12, 3, 16), v=torch.randn(12, 3, 16)), ValueError, "Hk dividing H=2"),
    ]
    for change, error, words in cases:
        kw = dict(q=q, k=k, v=k, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k) | change
        with pytest.raises(error, match=words):
            attention_varlen(**kw)
    with pytest.raises(BackendUnavailable, match="takes float16, bfloat16, float32 tensors, not torch.float64"):
        attention_varlen(q.double(), k.double(), k.double(), cu_q, cu_k, backend="triton")


def test_varlen_key_mass_and_lse_of_empty_sequences():
    q, k = torch.randn(5, 2, 8), torch.randn(4, 2, 8)
    cu_q, cu_k = torch.tensor([0, 0, 5], dtype=torch.int32), torch.tensor([0, 4, 4], dtype=torch.int32)
    out, stats = attention_varlen(q, k, k, cu_q, cu_k, return_stats=True)  # sequence 1: queries, no keys
    assert out.abs().max() == 0 and torch.isneginf(stats.lse).all() and stats.key_mass.abs().max() == 0
    assert not math.isnan(stats.entropy.sum().item())


def test_flash_attn_varlen_family():
    torch.manual_seed(0)
    lens = [5, 0, 17, 9]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    T, H, D = sum(lens), 4, 32
    qkv = torch.randn(T, 3, H, D, requires_grad=True)
    out, lse, probs = dsr_kernels.flash_attn_varlen_qkvpacked_func(
        qkv, cu, max(lens), causal=True, return_attn_probs=True
    )
    q, k, v = (t.detach().requires_grad_() for t in qkv.unbind(1))
    ref = attention_varlen(q, k, v, cu, cu, causal=True)
    assert probs is None and lse.shape == (H, T)
    torch.testing.assert_close(out, ref, atol=0, rtol=0)
    (g,) = torch.autograd.grad(out.sum(), qkv)
    assert g.shape == qkv.shape
    kv = torch.randn(T, 2, 2, D)  # GQA: 2 K/V heads
    out = dsr_kernels.flash_attn_varlen_kvpacked_func(q.detach(), kv, cu, cu, max(lens), max(lens))
    torch.testing.assert_close(out, attention_varlen(q.detach(), kv[:, 0], kv[:, 1], cu, cu), atol=0, rtol=0)
    out = dsr_kernels.flash_attn_varlen_func(q.detach(), k.detach(), v.detach(), cu, cu, max(lens), max(lens))
    torch.testing.assert_close(out, attention_varlen(q.detach(), k.detach(), v.detach(), cu, cu), atol=0, rtol=0)
    # flash-attn's lse convention: +inf where a query sees nothing (bottom-right causal, nq > nk)
    cu_k = torch.tensor([0, 2, 2, 4, 6], dtype=torch.int32)
    _, lse, _ = dsr_kernels.flash_attn_varlen_func(
        q.detach(), k.detach()[:6], v.detach()[:6], cu, cu_k, max(lens), 2, causal=True, return_attn_probs=True
    )
    assert torch.isposinf(lse[:, :3]).all() and torch.isfinite(lse[:, 3:5]).all()
    with pytest.raises(NotImplementedError, match="block_table"):
        dsr_kernels.flash_attn_varlen_func(q, k, v, cu, cu, 17, 17, block_table=torch.zeros(1))
    with pytest.raises(ValueError, match="'qkv' must be 4-D \\[T, 3, H, D\\]"):
        dsr_kernels.flash_attn_varlen_qkvpacked_func(qkv[None], cu, 17)


@pytest.mark.skipif(dsr_kernels.explain("attention", "cpu")["cpu"] != "available", reason="the cpu kernel is not built")
def test_varlen_op_opcheck_and_compile():
    case = VarlenCase((5, 0, 11), (7, 3, 11), H=2, Hk=1, D=16, R=2, sinks=True, causal=True)
    x, cu_q, cu_k = _inputs(case)
    rk, rv = x["kv_registers"]
    call = AttentionCall(
        q=x["q"],
        k=x["k"],
        v=x["v"],
        rk=rk,
        rv=rv,
        sinks=x["sinks"],
        cu_seqlens_q=cu_q,
        cu_seqlens_k=cu_k,
        max_seqlen_q=11,
        max_seqlen_k=11,
        causal=int(Causal.BOTTOM_RIGHT),
        scale=0.25,
        return_stats=True,
    )
    torch.library.opcheck(torch.ops.dsr_kernels.attention_fwd.default, (*call.as_args(), "cpu"))

    def f(q, k, v):
        return attention_varlen(q, k, v, cu_q, cu_k, max_seqlen_q=11, max_seqlen_k=11, backend="cpu")

    torch.testing.assert_close(torch.compile(f, fullgraph=False)(x["q"], x["k"], x["v"]), f(x["q"], x["k"], x["v"]))


@pytest.mark.parametrize("backend", [CPU, "torch", "reference", pytest.param("triton", marks=requires_interpreter)])
def test_generous_max_seqlen_k_and_prefix_past_the_longest_sequence(backend):
    """flash-attn's callers pass a max_seqlen_k above the longest key sequence: key_mass is
    [S, H, R + max_seqlen_k] with zeros past each sequence's keys, on every backend alike; a
    num_prefix_tokens above the longest sequence counts every key of each."""
    cu = torch.tensor([0, 13], dtype=torch.int32)
    q, k, v = (torch.randn(13, 2, 16) for _ in range(3))
    _, ref = attention_varlen(q, k, v, cu, cu, max_seqlen_k=16, num_prefix_tokens=20, return_stats=True,
                              backend="reference")  # fmt: skip
    _, got = attention_varlen(q, k, v, cu, cu, max_seqlen_k=16, num_prefix_tokens=20, return_stats=True,
                              backend=backend)  # fmt: skip
    assert got.key_mass.shape == (1, 2, 16) and torch.equal(got.key_mass[..., 13:], torch.zeros(1, 2, 3))
    for name in ("lse", "entropy", "register_share", "key_mass"):
        torch.testing.assert_close(getattr(got, name), getattr(ref, name), atol=1e-5, rtol=1e-5)
    assert torch.allclose(got.register_share, torch.ones(2, 13))
    out, lse, _ = dsr_kernels.flash_attn_varlen_func(q, k, v, cu, cu, 13, 16, return_attn_probs=True)
    assert out.shape == (13, 2, 16) and lse.shape == (2, 13)


@pytest.mark.parametrize("backend", [CPU, "torch", pytest.param("triton", marks=requires_interpreter)])
def test_varlen_pooled_gradient_and_expanded_rows(backend):
    """attention_varlen(...).sum(0): the gradient is expanded along the packed tokens."""
    cu = torch.tensor([0, 5, 5, 17])
    q, k, v = (torch.randn(17, 2, 8, requires_grad=True) for _ in range(3))
    k_expanded = torch.randn(1, 2, 8).expand(17, 2, 8)

    def grads(be):
        for t in (q, k, v):
            t.grad = None
        attention_varlen(q, k, v, cu, cu, backend=be).sum(0).pow(2).sum().backward()
        return [t.grad.clone() for t in (q, k, v)]

    for name, got, ref in zip("qkv", grads(backend), grads("reference"), strict=True):
        torch.testing.assert_close(got, ref, atol=2e-4, rtol=1e-4, msg=f"d{name}")
    out = attention_varlen(q.detach(), k_expanded, v.detach(), cu, cu, backend=backend)
    torch.testing.assert_close(out, attention_varlen(q.detach(), k_expanded, v.detach(), cu, cu, backend="reference"),
                               atol=1e-5, rtol=1e-5)  # fmt: skip
