"""Layouts and values, drawn by hypothesis: every backend of every op against the reference.

Each example lays the operands out as real code does (tests/layouts.py: transposed
storage, stepped and narrowed slices, odd storage offsets, a strided last dim,
``expand`` along any dim, ``unfold``'s overlapping rows), plants NaN or +-inf in one
element, row or column of one operand (or none), scales the logits up to 4x, and
compares each backend's outputs, statistics and gradients with the float64 reference
under the tolerance rule (tests/utils.py: at most 2x the error of eager PyTorch at the
input dtype, plus a few ulps), NaN and inf positions exactly: that is the NaN contract
of docs/attention.md, "NaN and inf", which the reference defines.

CI runs a fixed, derandomised budget (the "dsr-ci" profile, set in conftest.py); run more
with ``pytest tests/test_properties.py --hypothesis-profile=dsr-thorough``.
"""

from __future__ import annotations

import math

import torch
from hypothesis import given
from hypothesis import strategies as st
from layouts import Layout, layouts, plant

import dsr_kernels
from dsr_kernels.backends import explain
from dsr_kernels.reference.attention import attention_ref
from dsr_kernels.reference.norm_modulate import norm_modulate_ref
from dsr_kernels.reference.ttr_activation import PATCH_VALUES, REGISTER_VALUES, ttr_activation_ref
from utils import assert_close, max_abs_err, ulp_atol

SPECIALS = (float("nan"), float("inf"), float("-inf"))


def _backends(op: str, dtype: torch.dtype) -> list[str]:
    """The backends of ``op`` that run ``dtype`` CPU tensors here (Triton in its interpreter, which
    conftest switches on without a GPU; with one, the gpu-marked tests run Triton instead)."""
    return [n for n, why in explain(op, "cpu", dtype).items() if why == "available" and n != "reference"]


def _compare(
    name: str,
    got,
    ref,
    eager,
    dtype,
    *,
    reduction: int,
    loose: bool = False,
    extra_nan: bool = False,
    fewer_nan: bool = False,
    terms: float = 0.0,
    terms_dtype: torch.dtype = torch.float32,
) -> None:
    """got vs the float64 reference: 2x eager's error + ulps; NaN / inf positions exactly.

    terms: the magnitude of the products a gradient sums (|dO| |v| |q| scale Dv for dq,
    dk), whose float32 rounding bounds a kernel's error where the result cancels: the
    FlashAttention backward's dP - delta, delta = rowsum(dO * out), is a difference of
    two such sums rounded in different orders (a single key: exactly 0 in eager, the
    rounding of |dO| |v| in a kernel). Adds the float32 floor, 2 sqrt(K) ulps, at that
    magnitude, and 2 ulps of ``terms_dtype`` where the summands themselves are rounded to
    it (norm_modulate's dx in bf16, summed over an expanded dim by autograd).

    loose: an inf was planted where a probability multiplies it (a value row): whether
    p * inf is inf or NaN then depends on p underflowing at the backend's precision, so
    only the positions of non-finite elements are compared there.
    extra_nan: a NaN value row of a masked key (gradients): the backends' delta =
    rowsum(dO * out) carries the forward's 0 * NaN into rows whose reference gradient
    (autograd's sum p dP, masked keys left out) stays finite (docs/attention.md, "NaN and inf"). Every
    NaN of the reference must be there; more are allowed; finite values must agree.
    fewer_nan: a non-finite incoming gradient row with keys hidden from it (gradients): the
    reference's autograd multiplies it by their probability of exactly 0 (NaN at those
    keys); the kernels skip blocks of hidden keys and may leave them finite
    (docs/attention.md, "NaN and inf"). Non-finite only where the reference is; finite
    values must agree.
    """
    if got is None or ref is None:
        assert got is None and ref is None, f"{name}: {got is None=} but {ref is None=}"
        return
    g, r = got.detach().double(), ref.detach().double()
    if extra_nan:
        missing = torch.isnan(r) & ~torch.isnan(g)
        assert not missing.any(), f"{name}: NaN of the reference missing at {int(missing.sum())} places"
        keep = ~torch.isnan(g)
        g, r, eager = g.where(keep, 0.0), r.where(keep, 0.0), eager.detach().double().where(keep, 0.0)
    if fewer_nan:
        extra = ~torch.isfinite(g) & torch.isfinite(r)
        assert not extra.any(), f"{name}: non-finite where the reference is finite at {int(extra.sum())} places"
        keep = torch.isfinite(g) & torch.isfinite(r)
        g, r, eager = g.where(keep, 0.0), r.where(keep, 0.0), eager.detach().double().where(keep, 0.0)
    elif loose:
        assert torch.equal(torch.isfinite(g), torch.isfinite(r)), (
            f"{name}: non-finite at {int((~torch.isfinite(g)).sum())} places, the reference at "
            f"{int((~torch.isfinite(r)).sum())}"
        )
        keep = torch.isfinite(r)
        g, r, eager = g.where(keep, 0.0), r.where(keep, 0.0), eager.detach().double().where(keep, 0.0)
    atol = 2.0 * max_abs_err(eager, r) + ulp_atol(r, dtype, reduction=reduction)
    atol += 2.0 * max(reduction, 16) ** 0.5 * torch.finfo(torch.float32).eps * terms
    if terms_dtype != torch.float32:
        atol += 2.0 * torch.finfo(terms_dtype).eps * terms
    assert_close(name, g, r, atol=atol)


def _finite_max(*tensors) -> float:
    """The largest finite |x| over the tensors (1 when none)."""
    m = 1.0
    for t in tensors:
        if t is not None:
            t = t.detach().double()
            t = t[torch.isfinite(t)]
            if t.numel():
                m = max(m, float(t.abs().max()))
    return m


def _grad_terms(scale: float, Dv: int, ops: dict) -> float:
    """_compare's ``terms`` for attention gradients: scale Dv |dO| |values| |queries or keys|, over
    the operands present (q / k / v / rk / rv, or the drop-ins' query / key / value)."""
    x = {n: v for n, (_, v) in ops.items()}
    values = [x.get(n) for n in ("v", "rv", "value")]
    queries_keys = [x.get(n) for n in ("q", "k", "rk", "query", "key")]
    return scale * Dv * _finite_max(x["dout"]) * _finite_max(*values) * _finite_max(*queries_keys)


def _compare_attention(where, got, ref, eager, dtype, reduction, loose, extra_nan, terms, fewer_nan=False) -> None:
    """(out, stats, grads) of one backend against the reference's, under _compare's rules
    (fewer_nan: for the gradients only)."""
    _compare(f"out ({where})", got[0], ref[0], eager[0], dtype, reduction=reduction, loose=loose)
    # (p = exp(s - lse) carries lse's rounding, eps |lse|, into every statistic)
    for field in ("lse", "entropy", "register_share", "key_mass"):
        _compare(f"{field} ({where})", getattr(got[1], field), getattr(ref[1], field), getattr(eager[1], field),
                 torch.float32 if dtype == torch.float32 else dtype, reduction=reduction,
                 terms=_finite_max(ref[1].lse))  # fmt: skip
    for name, grad in ref[2].items():
        _compare(
            f"d{name} ({where})", got[2][name], grad, eager[2][name], dtype,
            reduction=reduction, loose=loose and not extra_nan, extra_nan=extra_nan, fewer_nan=fewer_nan,
            terms=terms,
        )  # fmt: skip


# ----------------------------------------------------------------------------- attention


@st.composite
def attention_calls(draw):
    dtype = draw(st.sampled_from([torch.float32, torch.float32, torch.float32, torch.bfloat16]))
    B, Hk, G = draw(st.integers(1, 2)), draw(st.integers(1, 2)), draw(st.integers(1, 2))
    Nq = draw(st.integers(1, 37))
    Nk = draw(st.one_of(st.just(Nq), st.integers(1, 37)))
    D = draw(st.sampled_from([1, 3, 8, 16, 24]))
    Dv = draw(st.sampled_from([D, D, 5]))
    R = draw(st.sampled_from([0, 0, 1, 3]))
    call = dict(
        dtype=dtype, B=B, H=Hk * G, Hk=Hk, Nq=Nq, Nk=Nk, D=D, Dv=Dv, R=R,
        per_sample=R > 0 and draw(st.booleans()),
        sinks=draw(st.booleans()), key_mask=draw(st.booleans()), causal=draw(st.booleans()),
        attn_mask=draw(st.sampled_from([None, None, "bool", "float"])),
        mask_4d=draw(st.booleans()),
        prefix=draw(st.integers(0, Nk)),
        # (bf16 up to 2: at 4 its logits' rounding leaves eager bf16 a lucky baseline on a few terms)
        logit_scale=draw(st.sampled_from([1.0, 1.0, 2.0] + ([4.0] if dtype == torch.float32 else []))),
        seed=draw(st.integers(0, 2**31 - 1)),
    )  # fmt: skip
    call["layouts"] = {
        name: draw(layouts(ndim))
        for name, ndim in (("q", 4), ("k", 4), ("v", 4), ("rk", 4), ("rv", 4), ("sinks", 1), ("key_mask", 2),
                           ("attn_mask", 4), ("dout", 4))
    }  # fmt: skip
    operands = ["q", "k", "v", "sinks", "attn_mask", "dout"] + (["rk", "rv"] if R else [])
    target = draw(st.sampled_from([None, None, None] + operands))
    if target == "attn_mask" and call["attn_mask"] != "float":
        target = None
    if target == "sinks" and not call["sinks"]:
        target = None
    call["special"] = None
    if target is not None:
        call["special"] = (
            target,
            draw(st.sampled_from(["element", "row", "column"])),
            draw(st.sampled_from(SPECIALS)),
            tuple(draw(st.lists(st.integers(0, 99), min_size=4, max_size=4))),
        )
    return call


def _attention_operands(c: dict) -> dict:
    """Logical values (float64) of every operand, the special value planted, the layouts applied."""
    g = torch.Generator().manual_seed(c["seed"])
    B, H, Hk, Nq, Nk, D, Dv, R = (c[n] for n in ("B", "H", "Hk", "Nq", "Nk", "D", "Dv", "R"))
    shapes = {
        "q": (B, H, Nq, D), "k": (B, Hk, Nk, D), "v": (B, Hk, Nk, Dv),
        "rk": (B, H, R, D) if c["per_sample"] else (H, R, D), "rv": (B, H, R, Dv) if c["per_sample"] else (H, R, Dv),
        "sinks": (H,), "dout": (B, H, Nq, Dv),
        "attn_mask": (B, H, Nq, Nk) if c["mask_4d"] else (Nq, Nk), "key_mask": (B, Nk),
    }  # fmt: skip
    vals = {}
    for name, shape in shapes.items():
        if name in ("rk", "rv") and not R:
            continue
        x = torch.randn(shape, generator=g, dtype=torch.float64)
        if name in ("q", "rk"):
            x = x * c["logit_scale"]
        if name == "key_mask":
            x = torch.rand(shape, generator=g) < 0.8
        if name == "attn_mask" and c["attn_mask"] == "bool":
            x = torch.rand(shape, generator=g) < 0.8
        vals[name] = x
    if c["special"] is not None:
        target, where, value, index = c["special"]
        vals[target] = plant(vals[target], where, value, index)
    layout = dict(c["layouts"])
    for name in ("rk", "rv"):  # their dims: [H, R, D] when shared
        if name in vals and vals[name].dim() == 3:
            layout[name] = Layout(layout[name].kind, min(layout[name].dim, 2))
    if not c["mask_4d"]:
        layout["attn_mask"] = Layout(layout["attn_mask"].kind, min(layout["attn_mask"].dim, 1))
    return {name: (layout[name], layout[name].values(x)) for name, x in vals.items()}


def _run_attention(c: dict, ops: dict, backend: str, dtype: torch.dtype):
    """out, stats and the gradients of every differentiable operand's storage, for one backend."""
    bases, views = {}, {}
    for name, (lay, x) in ops.items():
        floating = name not in ("key_mask",) and not (name == "attn_mask" and c["attn_mask"] == "bool")
        base = lay.base(x.to(dtype) if floating else x)
        if name in ("q", "k", "v", "rk", "rv", "sinks"):
            base.requires_grad_()
        bases[name], views[name] = base, lay.build(base, x.shape)
    kw = dict(
        kv_registers=(views["rk"], views["rv"]) if c["R"] else None,
        sinks=views["sinks"] if c["sinks"] else None,
        key_mask=views["key_mask"] if c["key_mask"] else None,
        attn_mask=views["attn_mask"] if c["attn_mask"] else None,
        num_prefix_tokens=c["prefix"],
    )
    if backend in ("reference", "eager"):
        out, stats = attention_ref(
            views["q"], views["k"], views["v"], causal_offset=(c["Nk"] - c["Nq"]) if c["causal"] else None,
            compute_dtype=torch.float64 if backend == "reference" else dtype, **kw,
        )  # fmt: skip
    else:
        out, stats = dsr_kernels.attention(
            views["q"], views["k"], views["v"], causal=c["causal"], return_stats=True, backend=backend, **kw
        )
    out.backward(views["dout"])
    used = ("q", "k", "v", "rk", "rv") + (("sinks",) if kw["sinks"] is not None else ())
    grads = {n: bases[n].grad for n in used if n in bases}
    return out, stats, grads


@given(c=attention_calls())
def test_attention_layouts_and_values(c):
    dtype = c["dtype"]
    ops = _attention_operands(c)
    ref = _run_attention(c, ops, "reference", torch.float64)
    eager = _run_attention(c, ops, "eager", dtype)
    special = c["special"]
    # (an inf in the values or the incoming gradient: inf or NaN by the order of the sums)
    loose = special is not None and special[0] in ("v", "rv", "dout") and math.isinf(special[2])
    hides_keys = c["key_mask"] or c["causal"] or c["attn_mask"] == "bool"
    extra_nan = special is not None and special[0] == "v" and hides_keys
    fewer_nan = special is not None and special[0] == "dout" and hides_keys
    reduction = max(c["Nq"], c["Nk"] + c["R"], c["D"])
    terms = _grad_terms(c["D"] ** -0.5, c["Dv"], ops)
    for backend in _backends("attention", dtype):
        got = _run_attention(c, ops, backend, dtype)
        _compare_attention(f"{backend} {c}", got, ref, eager, dtype, reduction, loose, extra_nan, terms, fewer_nan)


# ----------------------------------------------------------------------------- attention_varlen


@st.composite
def varlen_calls(draw):
    S = draw(st.integers(1, 4))
    Hk, G = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    R = draw(st.sampled_from([0, 0, 1, 3]))
    lengths_q = draw(st.lists(st.integers(0, 12), min_size=S, max_size=S))
    same = draw(st.booleans())
    lengths_k = lengths_q if same else draw(st.lists(st.integers(0, 12), min_size=S, max_size=S))
    D = draw(st.sampled_from([1, 8, 16, 24]))
    sinks = draw(st.booleans())
    target = draw(
        st.sampled_from(
            [None, None, "q", "k", "v", "dout"] + (["rk", "rv"] if R else []) + (["sinks"] if sinks else [])
        )
    )
    dtype = draw(st.sampled_from([torch.float32, torch.float32, torch.bfloat16]))
    return dict(
        dtype=dtype,
        S=S, H=Hk * G, Hk=Hk, D=D, Dv=draw(st.sampled_from([D, 5])), R=R,
        lengths_q=lengths_q, lengths_k=lengths_k,
        per_sequence=R > 0 and draw(st.booleans()), sinks=sinks,
        # also through flash_attn_varlen_func (which has no prefix tokens: prefix 0 then)
        dropin=(dropin := draw(st.booleans())),
        causal=draw(st.booleans()), prefix=0 if dropin else draw(st.integers(0, 16)),
        extra_max_k=draw(st.sampled_from([0, 0, 3])),  # a generous max_seqlen_k (flash-attn's callers pass one)
        logit_scale=draw(st.sampled_from([1.0, 1.0, 2.0] + ([4.0] if dtype == torch.float32 else []))),
        layouts={n: draw(layouts(nd)) for n, nd in (("q", 3), ("k", 3), ("v", 3), ("dout", 3), ("rk", 4), ("rv", 4),
                                                    ("sinks", 1))},  # fmt: skip
        special=None if target is None else (
            target, draw(st.sampled_from(["element", "row", "column"])), draw(st.sampled_from(SPECIALS)),
            tuple(draw(st.lists(st.integers(0, 99), min_size=3, max_size=3))),
        ),
        seed=draw(st.integers(0, 2**31 - 1)),
    )  # fmt: skip


def _varlen_ref(q, k, v, cu_q, cu_k, regs, sinks, causal, prefix, max_k, compute_dtype):
    """The definition per sequence (attention_ref), packed as attention_varlen packs its results."""
    Tq, H, _ = q.shape
    S, R = len(cu_q) - 1, 0 if regs is None else regs[0].shape[-2]
    outs, lse = [], torch.full((H, Tq), -math.inf)
    ent, share, mass = torch.zeros(H, Tq), torch.zeros(H, Tq), torch.zeros(S, H, R + max_k)
    for s in range(S):
        (q0, q1), (k0, k1) = (cu_q[s], cu_q[s + 1]), (cu_k[s], cu_k[s + 1])
        if q1 == q0:
            continue
        reg = None if regs is None else tuple(t if t.dim() == 3 else t[s : s + 1] for t in regs)
        qs, ks, vs = (t.transpose(0, 1)[None] for t in (q[q0:q1], k[k0:k1], v[k0:k1]))
        o, st_ = attention_ref(
            qs, ks, vs, kv_registers=reg, sinks=sinks, causal_offset=(k1 - k0) - (q1 - q0) if causal else None,
            num_prefix_tokens=min(prefix, k1 - k0), compute_dtype=compute_dtype,
        )  # fmt: skip
        outs.append((q0, q1, o[0].transpose(0, 1)))
        lse[:, q0:q1], ent[:, q0:q1], share[:, q0:q1] = st_.lse[0], st_.entropy[0], st_.register_share[0]
        mass[s, :, : R + k1 - k0] = st_.key_mass[0]
    pieces, end = [], 0
    for q0, q1, o in outs:
        pieces += [q.new_zeros(q0 - end, H, v.shape[2]), o]
        end = q1
    out = torch.cat(pieces + [q.new_zeros(Tq - end, H, v.shape[2])]).to(q.dtype)
    return out, dsr_kernels.AttentionStats(lse, ent, share, mass)


def _run_varlen(c: dict, ops: dict, backend: str, dtype: torch.dtype):
    bases, views = {}, {}
    for name, (lay, x) in ops.items():
        base = lay.base(x.to(dtype))
        if name in ("q", "k", "v", "rk", "rv", "sinks"):
            base.requires_grad_()
        bases[name], views[name] = base, lay.build(base, x.shape)
    cu_q = [0, *torch.tensor(c["lengths_q"]).cumsum(0).tolist()]
    cu_k = [0, *torch.tensor(c["lengths_k"]).cumsum(0).tolist()]
    max_k = max(c["lengths_k"]) + c["extra_max_k"]
    regs = (views["rk"], views["rv"]) if c["R"] else None
    sinks = views["sinks"] if c["sinks"] else None
    if backend in ("reference", "eager"):
        out, stats = _varlen_ref(
            views["q"], views["k"], views["v"], cu_q, cu_k, regs, sinks, c["causal"], c["prefix"], max_k,
            torch.float64 if backend == "reference" else dtype,
        )  # fmt: skip
    elif backend == "flash_attn_varlen_func":  # the drop-in, on "auto"
        out, stats = dsr_kernels.flash_attn_varlen_func(
            views["q"], views["k"], views["v"], torch.tensor(cu_q, dtype=torch.int32),
            torch.tensor(cu_k, dtype=torch.int32), max(c["lengths_q"]), max_k, causal=c["causal"],
            kv_registers=regs, sinks=sinks, return_stats=True,
        )  # fmt: skip
    else:
        out, stats = dsr_kernels.attention_varlen(
            views["q"], views["k"], views["v"], torch.tensor(cu_q, dtype=torch.int32), torch.tensor(cu_k),
            max_seqlen_k=max_k, kv_registers=regs, sinks=sinks, causal=c["causal"], num_prefix_tokens=c["prefix"],
            return_stats=True, backend=backend,
        )  # fmt: skip
    if out.requires_grad:
        out.backward(views["dout"])
    names = ("q", "k", "v", "rk", "rv") + (("sinks",) if c["sinks"] else ())
    # (no sequence with a query: the reference's out is built without them, so no gradient reaches them: zeros)
    return out, stats, {n: torch.zeros_like(bases[n]) if bases[n].grad is None else bases[n].grad
                        for n in names if n in bases}  # fmt: skip


@given(c=varlen_calls())
def test_attention_varlen_layouts_and_values(c):
    dtype, H, Hk, D, Dv, R = c["dtype"], c["H"], c["Hk"], c["D"], c["Dv"], c["R"]
    Tq, Tk, S = sum(c["lengths_q"]), sum(c["lengths_k"]), c["S"]
    g = torch.Generator().manual_seed(c["seed"])
    shapes = {"q": (Tq, H, D), "k": (Tk, Hk, D), "v": (Tk, Hk, Dv), "dout": (Tq, H, Dv), "sinks": (H,)}
    if R:
        shapes["rk"], shapes["rv"] = ((S, H, R, D), (S, H, R, Dv)) if c["per_sequence"] else ((H, R, D), (H, R, Dv))
    vals = {n: torch.randn(s, generator=g, dtype=torch.float64) for n, s in shapes.items()}
    for n in ("q", "rk"):
        if n in vals:
            vals[n] = vals[n] * c["logit_scale"]
    if c["special"] is not None and vals[c["special"][0]].numel():
        target, where, value, index = c["special"]
        vals[target] = plant(vals[target], where, value, index)
    lays = {n: c["layouts"][n] for n in vals}
    for n in ("rk", "rv"):  # [H, R, D] when shared by the sequences
        if n in vals and vals[n].dim() == 3:
            lays[n] = Layout(lays[n].kind, min(lays[n].dim, 2))
    ops = {n: (lays[n], lays[n].values(x)) for n, x in vals.items()}
    ref = _run_varlen(c, ops, "reference", torch.float64)
    eager = _run_varlen(c, ops, "eager", dtype)
    special = c["special"]
    # (an inf in the values or the incoming gradient: inf or NaN by the order of the sums)
    loose = special is not None and special[0] in ("v", "rv", "dout") and math.isinf(special[2])
    extra_nan = special is not None and special[0] == "v" and c["causal"]
    fewer_nan = special is not None and special[0] == "dout" and c["causal"]
    reduction = max(max(c["lengths_q"] + [1]), max(c["lengths_k"] + [1]) + R, D)
    terms = _grad_terms(D**-0.5, Dv, ops)
    for backend in _backends("attention", dtype) + (["flash_attn_varlen_func"] if c["dropin"] else []):
        got = _run_varlen(c, ops, backend, dtype)
        _compare_attention(f"{backend} {c}", got, ref, eager, dtype, reduction, loose, extra_nan, terms, fewer_nan)


# ----------------------------------------------------------------------------- drop-ins


@st.composite
def sdpa_calls(draw):
    H = draw(st.integers(1, 3))
    L, Sk = draw(st.integers(1, 20)), draw(st.integers(1, 20))
    E = draw(st.sampled_from([1, 8, 16]))
    target = draw(st.sampled_from([None, None, "query", "key", "value", "attn_mask"]))
    return dict(
        dtype=draw(st.sampled_from([torch.float32, torch.float32, torch.bfloat16])),
        B=draw(st.integers(1, 2)), H=H, L=L, S=Sk, E=E, Ev=draw(st.sampled_from([E, 3])),
        attn_mask=draw(st.sampled_from([None, "bool", "float"])), is_causal=draw(st.booleans()),
        scale=draw(st.sampled_from([None, 0.5, 2.0])),
        layouts={n: draw(layouts(4)) for n in ("query", "key", "value", "attn_mask", "dout")},
        special=None if target is None else (
            target, draw(st.sampled_from(["element", "row", "column"])), draw(st.sampled_from(SPECIALS)),
            tuple(draw(st.lists(st.integers(0, 99), min_size=4, max_size=4))),
        ),
        seed=draw(st.integers(0, 2**31 - 1)),
    )  # fmt: skip


def _sdpa_reference(query, key, value, attn_mask, is_causal, scale, dtype):
    """torch's SDPA contract, computed as the definition: a causal mask is the top-left triangle."""
    L, Sk = query.shape[-2], key.shape[-2]
    if is_causal:
        tri = torch.ones(L, Sk, dtype=torch.bool).tril()
        attn_mask = tri if attn_mask is None else None  # (is_causal with a mask raises, as torch)
    out, _ = attention_ref(query, key, value, attn_mask=attn_mask, scale=scale, compute_dtype=dtype)
    return out


@given(c=sdpa_calls())
def test_scaled_dot_product_attention_layouts_and_values(c):
    from dsr_kernels import scaled_dot_product_attention

    dtype, B, H, L, Sk, E, Ev = (c[n] for n in ("dtype", "B", "H", "L", "S", "E", "Ev"))
    if c["is_causal"] and c["attn_mask"] is not None:
        c["attn_mask"] = None
    g = torch.Generator().manual_seed(c["seed"])
    shapes = {"query": (B, H, L, E), "key": (B, H, Sk, E), "value": (B, H, Sk, Ev), "dout": (B, H, L, Ev),
              "attn_mask": (B, H, L, Sk)}  # fmt: skip
    vals = {n: torch.randn(s, generator=g, dtype=torch.float64) for n, s in shapes.items()}
    if c["attn_mask"] == "bool":
        vals["attn_mask"] = torch.rand(shapes["attn_mask"], generator=g) < 0.8
    if c["special"] is not None and not (c["special"][0] == "attn_mask" and c["attn_mask"] != "float"):
        target, where, value, index = c["special"]
        vals[target] = plant(vals[target], where, value, index)
    ops = {n: (c["layouts"][n], c["layouts"][n].values(x)) for n, x in vals.items()}

    def run(backend, cdtype):
        bases, views = {}, {}
        for n, (lay, x) in ops.items():
            floating = x.is_floating_point()
            base = lay.base(x.to(cdtype) if floating else x)
            if n in ("query", "key", "value"):
                base.requires_grad_()
            bases[n], views[n] = base, lay.build(base, x.shape)
        mask = views["attn_mask"] if c["attn_mask"] else None
        if backend in ("reference", "eager"):
            out = _sdpa_reference(views["query"], views["key"], views["value"], mask, c["is_causal"], c["scale"],
                                  torch.float64 if backend == "reference" else cdtype)  # fmt: skip
        else:
            out = scaled_dot_product_attention(
                views["query"], views["key"], views["value"], attn_mask=mask, is_causal=c["is_causal"],
                scale=c["scale"], backend=backend,
            )  # fmt: skip
        out.backward(views["dout"])
        return out, {n: bases[n].grad for n in ("query", "key", "value")}

    ref, eager = run("reference", torch.float64), run("eager", dtype)
    special = c["special"]
    loose = special is not None and special[0] == "value" and math.isinf(special[2])
    extra_nan = special is not None and special[0] == "value" and (c["is_causal"] or c["attn_mask"] == "bool")
    terms = _grad_terms(c["scale"] or E**-0.5, Ev, ops)
    for backend in _backends("attention", dtype):
        got = run(backend, dtype)
        where = f"{backend} {c}"
        _compare(f"out ({where})", got[0], ref[0], eager[0], dtype, reduction=max(L, Sk, E), loose=loose)
        for n in ref[1]:
            _compare(f"d{n} ({where})", got[1][n], ref[1][n], eager[1][n], dtype, reduction=max(L, Sk, E),
                     loose=loose and not extra_nan, extra_nan=extra_nan, terms=terms)  # fmt: skip


@given(c=sdpa_calls(), causal=st.booleans())
def test_flash_attn_func_layouts_and_values(c, causal):
    """flash-attn's [B, N, H, D] layout, every layout of it, against the definition (auto backend)."""
    from dsr_kernels import flash_attn_func

    dtype, B, H, L, Sk, E = (c[n] for n in ("dtype", "B", "H", "L", "S", "E"))
    g = torch.Generator().manual_seed(c["seed"])
    shapes = {"query": (B, L, H, E), "key": (B, Sk, H, E), "value": (B, Sk, H, E), "dout": (B, L, H, E)}
    vals = {n: torch.randn(s, generator=g, dtype=torch.float64) for n, s in shapes.items()}
    special = c["special"] if c["special"] is not None and c["special"][0] != "attn_mask" else None
    if special is not None:
        target, where, value, index = special
        vals[target] = plant(vals[target], where, value, index)
    ops = {n: (c["layouts"][n], c["layouts"][n].values(x)) for n, x in vals.items()}

    def run(backend, cdtype):
        bases, views = {}, {}
        for n, (lay, x) in ops.items():
            bases[n] = lay.base(x.to(cdtype)).requires_grad_(n != "dout")
            views[n] = lay.build(bases[n], x.shape)
        q, k, v = (views[n] for n in ("query", "key", "value"))
        if backend in ("reference", "eager"):
            out, _ = attention_ref(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal_offset=Sk - L if causal else None,
                scale=c["scale"], compute_dtype=torch.float64 if backend == "reference" else cdtype,
            )  # fmt: skip
            out = out.transpose(1, 2)
        else:
            out = flash_attn_func(q, k, v, softmax_scale=c["scale"], causal=causal)
        out.backward(views["dout"])
        return out, {n: bases[n].grad for n in ("query", "key", "value")}

    ref, eager, got = run("reference", torch.float64), run("eager", dtype), run("auto", dtype)
    loose = special is not None and special[0] == "value" and math.isinf(special[2])
    extra_nan = special is not None and special[0] == "value" and causal
    terms = _grad_terms(c["scale"] or E**-0.5, E, ops)
    where = f"{c} causal={causal}"
    _compare(f"out ({where})", got[0], ref[0], eager[0], dtype, reduction=max(L, Sk, E), loose=loose)
    for n in ref[1]:
        _compare(f"d{n} ({where})", got[1][n], ref[1][n], eager[1][n], dtype, reduction=max(L, Sk, E),
                 loose=loose and not extra_nan, extra_nan=extra_nan, terms=terms)  # fmt: skip


@given(c=sdpa_calls(), packing=st.sampled_from(["kv", "qkv"]), causal=st.booleans(), layout=layouts(5))
def test_flash_attn_packed_layouts_and_values(c, packing, causal, layout):
    """flash_attn_kvpacked_func ([B, Sk, 2, H, E]) and flash_attn_qkvpacked_func ([B, N, 3, H, E]),
    the packed tensor in every layout, against the definition on the same views (auto backend)."""
    from dsr_kernels import flash_attn_kvpacked_func, flash_attn_qkvpacked_func

    dtype, B, H, L, E = (c[n] for n in ("dtype", "B", "H", "L", "E"))
    Sk = L if packing == "qkv" else c["S"]
    g = torch.Generator().manual_seed(c["seed"])
    n_packed = 3 if packing == "qkv" else 2
    vals = {
        "query": torch.randn(B, L, H, E, generator=g, dtype=torch.float64),
        "packed": torch.randn(B, Sk, n_packed, H, E, generator=g, dtype=torch.float64),
        "dout": torch.randn(B, L, H, E, generator=g, dtype=torch.float64),
    }
    special = c["special"] if c["special"] is not None and c["special"][0] != "attn_mask" else None
    if special is not None:  # into q, k or v, wherever it is packed
        target, where, value, index = special
        part = {"query": 0, "key": n_packed - 2, "value": n_packed - 1}[target]
        if target == "query" and packing == "kv":
            vals["query"] = plant(vals["query"], where, value, index)
        else:
            vals["packed"][:, :, part] = plant(vals["packed"][:, :, part], where, value, index)
    lays = {"query": c["layouts"]["query"], "packed": layout, "dout": c["layouts"]["dout"]}
    ops = {n: (lays[n], lays[n].values(x)) for n, x in vals.items()}

    def run(backend, cdtype):
        bases, views = {}, {}
        for n, (lay, x) in ops.items():
            bases[n] = lay.base(x.to(cdtype)).requires_grad_(n != "dout")
            views[n] = lay.build(bases[n], x.shape)
        parts = views["packed"].unbind(2)
        q, k, v = parts if packing == "qkv" else (views["query"], *parts)
        if backend in ("reference", "eager"):
            out, _ = attention_ref(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal_offset=Sk - L if causal else None,
                scale=c["scale"], compute_dtype=torch.float64 if backend == "reference" else cdtype,
            )  # fmt: skip
            out = out.transpose(1, 2)
        elif packing == "qkv":
            out = flash_attn_qkvpacked_func(views["packed"], softmax_scale=c["scale"], causal=causal)
        else:
            out = flash_attn_kvpacked_func(views["query"], views["packed"], softmax_scale=c["scale"], causal=causal)
        out.backward(views["dout"])
        return out, {n: bases[n].grad for n in (["packed"] if packing == "qkv" else ["query", "packed"])}

    ref, eager, got = run("reference", torch.float64), run("eager", dtype), run("auto", dtype)
    # (what the layout made of the values: expanded along the packing dim, k is v, and q too)
    value = ops["packed"][1].unbind(2)[-1]
    loose = bool(value.isinf().any())
    extra_nan = not bool(value.isfinite().all()) and causal  # (as a planted value row with hidden keys)
    parts = vals["packed"].unbind(2)
    terms = (c["scale"] or E**-0.5) * E * _finite_max(vals["dout"]) * _finite_max(parts[-1])
    terms *= _finite_max(vals["query"], *parts[:-1])
    where = f"{c} {packing} causal={causal} {layout}"
    _compare(f"out ({where})", got[0], ref[0], eager[0], dtype, reduction=max(L, Sk, E), loose=loose)
    for n in ref[1]:
        _compare(f"d{n} ({where})", got[1][n], ref[1][n], eager[1][n], dtype, reduction=max(L, Sk, E),
                 loose=loose and not extra_nan, extra_nan=extra_nan, terms=terms)  # fmt: skip


# ----------------------------------------------------------------------------- norm_modulate


@st.composite
def norm_modulate_calls(draw):
    R = draw(st.sampled_from([0, 1, 3]))
    target = draw(st.sampled_from([None, None, "x", "shift", "scale", "registers"]))
    return dict(
        dtype=draw(st.sampled_from([torch.float32, torch.float32, torch.bfloat16])),
        B=draw(st.integers(1, 3)), N=draw(st.integers(1, 13)), D=draw(st.sampled_from([1, 8, 72, 33])), R=R,
        per_sample=R > 0 and draw(st.booleans()), kind=draw(st.sampled_from(["layernorm", "rmsnorm"])),
        modulate=draw(st.booleans()), affine=draw(st.booleans()),
        layouts={n: draw(layouts(3)) for n in ("x", "shift", "scale", "weight", "bias", "registers", "dout")},
        special=None if target is None or (target == "registers" and R == 0) else (
            target, draw(st.sampled_from(["element", "row", "column"])), draw(st.sampled_from(SPECIALS)),
            tuple(draw(st.lists(st.integers(0, 99), min_size=3, max_size=3))),
        ),
        seed=draw(st.integers(0, 2**31 - 1)),
    )  # fmt: skip


@given(c=norm_modulate_calls())
def test_norm_modulate_layouts_and_values(c):
    dtype, B, N, D, R = c["dtype"], c["B"], c["N"], c["D"], c["R"]
    g = torch.Generator().manual_seed(c["seed"])
    shapes = {"x": (B, N, D), "shift": (B, D), "scale": (B, D), "weight": (D,), "bias": (D,), "dout": (B, R + N, D)}
    if R:
        shapes["registers"] = (B, R, D) if c["per_sample"] else (R, D)
    vals = {n: torch.randn(s, generator=g, dtype=torch.float64) for n, s in shapes.items()}
    if c["special"] is not None:
        target, where, value, index = c["special"]
        vals[target] = plant(vals[target], where, value, index)
    vals = {n: v.to(dtype).double() for n, v in vals.items()}  # every run (the reference too) sees the same inputs
    lays = {n: Layout(c["layouts"][n].kind, min(c["layouts"][n].dim, len(s) - 1)) for n, s in shapes.items()}
    ops = {n: (lays[n], lays[n].values(x)) for n, x in vals.items()}

    def run(backend, cdtype):
        bases, views = {}, {}
        for n, (lay, x) in ops.items():
            base = lay.base(x.to(cdtype)).requires_grad_(n != "dout")
            bases[n], views[n] = base, lay.build(base, x.shape)
        kw = dict(
            weight=views["weight"] if c["affine"] else None,
            bias=views["bias"] if c["affine"] else None,
            kind=c["kind"],
            registers=views.get("registers"),
            return_norms=True,
        )
        shift, scale = (views["shift"], views["scale"]) if c["modulate"] else (None, None)
        if backend in ("reference", "eager"):
            res = norm_modulate_ref(views["x"], shift, scale, compute_dtype=torch.float64 if backend == "reference"
                                    else cdtype, **kw)  # fmt: skip
        else:
            res = dsr_kernels.norm_modulate(views["x"], shift, scale, backend=backend, **kw)
        res.out.backward(views["dout"][:, R:] if res.out.shape[1] == N else views["dout"])
        used = ["x"] + (["shift", "scale"] if c["modulate"] else []) + (["weight", "bias"] if c["affine"] else [])
        return res, {n: bases[n].grad for n in used + (["registers"] if R else [])}

    ref, eager = run("reference", torch.float64), run("eager", dtype)
    # The rounding of h - mean, eps |h|, comes out multiplied by rstd = 1 / sqrt(var + eps),
    # up to 1 / sqrt(eps) = 1000 for a row of equal values (an expanded last dim): the
    # float32 floor at that magnitude (terms), where eager may happen to round exactly.
    x = {n: v for n, (_, v) in ops.items()}
    h = x["x"] if not R else torch.cat([x["registers"].expand(B, R, D), x["x"]], 1)
    h = h[torch.isfinite(h).all(-1)]
    var = h.var(-1, unbiased=False) if c["kind"] == "layernorm" else h.square().mean(-1)
    rstd = float((var + 1e-6).rsqrt().max()) if h.numel() else 1.0
    terms = rstd * _finite_max(h) * _finite_max(x["dout"]) * _finite_max(x["weight"] if c["affine"] else None)
    terms *= 1 + (_finite_max(x["scale"]) if c["modulate"] else 0)
    # An inf in the modulation: (y w + b)(1 + s) + shift is inf or NaN by the order of the
    # fused multiply-adds (the cpu kernel folds it into y a + c): non-finite positions only.
    loose = c["special"] is not None and c["special"][0] in ("shift", "scale") and math.isinf(c["special"][2])
    for backend in _backends("norm_modulate", dtype):
        got = run(backend, dtype)
        where = f"{backend} {c}"
        _compare(f"out ({where})", got[0].out, ref[0].out, eager[0].out, dtype, reduction=D, terms=terms, loose=loose)
        _compare(f"residual ({where})", got[0].residual, ref[0].residual, eager[0].residual, dtype, reduction=D)
        _compare(f"norms ({where})", got[0].norms, ref[0].norms, eager[0].norms, torch.float32, reduction=D)
        for n in ref[1]:
            _compare(f"d{n} ({where})", got[1][n], ref[1][n], eager[1][n], dtype, reduction=max(B * (N + R), D),
                     terms=terms, terms_dtype=dtype, loose=loose)  # fmt: skip


# ----------------------------------------------------------------------------- ttr_activation


@st.composite
def ttr_calls(draw):
    F = draw(st.sampled_from([1, 8, 72, 83]))
    return dict(
        dtype=draw(st.sampled_from([torch.float32, torch.float32, torch.bfloat16])),
        B=draw(st.integers(1, 3)), T=draw(st.integers(3, 20)), F=F,  # (T >= prefix + registers)
        neurons=draw(st.lists(st.integers(0, F - 1), max_size=4, unique=True)),
        num_registers=draw(st.integers(1, 2)), num_prefix_tokens=draw(st.integers(0, 1)),
        patch_values=draw(st.sampled_from(PATCH_VALUES)), register_value=draw(st.sampled_from(REGISTER_VALUES)),
        approximate=draw(st.sampled_from(["none", "tanh"])),
        layout=draw(layouts(3)), dout_layout=draw(layouts(3)),
        special=draw(st.one_of(st.none(), st.tuples(
            st.sampled_from(["element", "row", "column"]), st.sampled_from(SPECIALS),
            st.lists(st.integers(0, 99), min_size=3, max_size=3).map(tuple),
        ))),
        seed=draw(st.integers(0, 2**31 - 1)),
    )  # fmt: skip


@given(c=ttr_calls())
def test_ttr_activation_layouts_and_values(c):
    dtype, shape = c["dtype"], (c["B"], c["T"], c["F"])
    g = torch.Generator().manual_seed(c["seed"])
    h = torch.randn(shape, generator=g, dtype=torch.float64) * 2
    if c["special"] is not None:
        where, value, index = c["special"]
        h = plant(h, where, value, index)
    dout = torch.randn(shape, generator=g, dtype=torch.float64)
    h, dout = h.to(dtype).double(), dout.to(dtype).double()  # every run (the reference too) sees the same inputs
    lay, dlay = c["layout"], c["dout_layout"]
    h, dout = lay.values(h), dlay.values(dout)
    neurons = torch.tensor(c["neurons"], dtype=torch.long)
    kw = {n: c[n] for n in ("num_registers", "num_prefix_tokens", "patch_values", "register_value", "approximate")}

    def run(backend, cdtype):
        base = lay.base(h.to(cdtype)).requires_grad_()
        x = lay.build(base, shape)
        if backend in ("reference", "eager"):
            cd = torch.float64 if backend == "reference" else cdtype
            out = ttr_activation_ref(x, neurons, compute_dtype=cd, **kw)
        else:
            out = dsr_kernels.ttr_activation(x, neurons, backend=backend, **kw)
        grad = dlay.build(dlay.base(dout.to(out.dtype)), shape)
        # (eager's GELU backward, on oneDNN, cannot take overlapping rows: its baseline gets a copy)
        out.backward(grad.contiguous() if backend == "eager" else grad)
        return out, base.grad

    ref, eager = run("reference", torch.float64), run("eager", dtype)
    for backend in _backends("ttr_activation", dtype):
        got = run(backend, dtype)
        where = f"{backend} {c}"
        _compare(f"out ({where})", got[0], ref[0], eager[0], dtype, reduction=c["T"])
        # (the gradient where a register value is NaN or tied is the subgradient's choice: forward only then)
        if torch.isfinite(h).all():
            _compare(f"dh ({where})", got[1], ref[1], eager[1], dtype, reduction=c["T"])
