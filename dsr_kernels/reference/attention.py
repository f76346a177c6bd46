"""Reference register attention: the definition of ``dsr_kernels.attention``.

It materialises the [B, H, Nq, R + Nk] logits, so it is only for small inputs: it is the
test oracle, the readable specification and the CPU baseline in the benchmarks. It is
differentiable with plain autograd (``torch.autograd.gradcheck`` runs on it in float64).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from dsr_kernels.attention_call import AttentionCall, Causal
from dsr_kernels.rope import RopeStyle, apply_rope
from dsr_kernels.types import FLOATS, AttentionStats, Backend

BACKEND = Backend("reference", None, FLOATS)  # any device, any float dtype: the definition


def attention_ref(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    kv_registers: tuple[Tensor, Tensor] | None = None,
    sinks: Tensor | None = None,
    key_mask: Tensor | None = None,
    attn_mask: Tensor | None = None,
    causal_offset: int | None = None,
    num_prefix_tokens: int = 0,
    scale: float | None = None,
    rope: tuple[Tensor, Tensor] | None = None,
    rope_style: str = "interleaved",
    compute_dtype: torch.dtype = torch.float64,
) -> tuple[Tensor, AttentionStats]:
    """Attention over [registers ; tokens] with an optional sink, and its statistics.

    Shapes: q [B, H, Nq, D]; k [B, Hk, Nk, D], v [B, Hk, Nk, Dv] with Hk dividing H (query
    head h reads K/V head h // (H / Hk): grouped-query attention); kv_registers (rk, rv),
    rk [H, R, D] or [B, H, R, D], rv the same with Dv; sinks [H]; key_mask [B, Nk] bool
    (True = may be attended); attn_mask bool or additive float, broadcastable to
    [B, H, Nq, Nk], applied to token keys only;
    causal_offset: when not None, token key j is visible to query i iff j <= i + offset.
    rope: (cos, sin) tables [N, D] (N = Nq = Nk) rotating q and the token keys
    (``dsr_kernels.rope.apply_rope``); the register keys are not rotated.

    Registers are never masked. The sink adds exp(sinks[h]) to the softmax denominator
    and is one outcome of the distribution, with no value vector.

    Non-finite inputs (the contract every backend follows; docs/attention.md "NaN and inf"): masked
    keys (key_mask, a bool attn_mask, causal) get the logit -inf whatever their k row
    holds, and p = 0 exactly. A NaN or +inf among a row's logits (q row, attended keys,
    registers, the float mask, the sink) makes that row's p NaN on every key it attends:
    its out, lse, entropy and register_share are NaN (out even when only the sink is
    attended), and so is the key_mass of those keys. Values enter only through
    out = P V: a NaN in a value row reaches every row whose probability multiplies it
    (0 * NaN is NaN, masked keys included, as in PyTorch's math SDPA). Gradients follow
    by autograd of these formulas.

    Returns ``out`` [B, H, Nq, Dv] in q's dtype and :class:`AttentionStats` in float32
    (detached). Everything is computed in ``compute_dtype`` (float64 for the oracle; the
    input dtype gives "eager PyTorch at that dtype", the error baseline of the tests).
    """
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    scale = D**-0.5 if scale is None else scale
    cd = compute_dtype
    q_, k_, v_ = q.to(cd), k.to(cd), v.to(cd)
    if k.shape[1] != H:  # grouped K/V heads: the definition may copy them
        k_, v_ = (t.repeat_interleave(H // k.shape[1], dim=1) for t in (k_, v_))
    if rope is not None:
        cos, sin = (t.to(cd) for t in rope)
        q_, k_ = apply_rope(q_, cos, sin, rope_style), apply_rope(k_, cos, sin, rope_style)

    token_logits = (q_ @ k_.transpose(-1, -2)) * scale  # [B, H, Nq, Nk]
    allowed = torch.ones(B, H, Nq, Nk, dtype=torch.bool, device=q.device)
    if key_mask is not None:
        allowed = allowed & key_mask[:, None, None, :]
    if causal_offset is not None:
        i = torch.arange(Nq, device=q.device)[:, None]
        j = torch.arange(Nk, device=q.device)[None, :]
        allowed = allowed & (j <= i + causal_offset)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            allowed = allowed & attn_mask
        else:
            token_logits = token_logits + attn_mask.to(cd)
    token_logits = token_logits.masked_fill(~allowed, float("-inf"))

    logits, values = [token_logits], [v_]
    R = 0
    if kv_registers is not None:
        rk, rv = (t.to(cd).expand(B, H, -1, -1) for t in kv_registers)
        R = rk.shape[2]
        logits.insert(0, (q_ @ rk.transpose(-1, -2)) * scale)  # [B, H, Nq, R]
        values.insert(0, rv)
    if sinks is not None:
        logits.append(sinks.to(cd)[None, :, None, None].expand(B, H, Nq, 1))
    logits = torch.cat(logits, dim=-1)  # [B, H, Nq, R + Nk (+ 1)]

    # A query that can attend nothing gets lse = -inf, out = 0; the detour through
    # `alive` keeps its gradients finite (logsumexp of an all -inf row has NaN grads).
    # A NaN logit is not a masked one: its row is alive, and NaN.
    alive = (logits != float("-inf")).any(-1)
    lse_safe = torch.logsumexp(torch.where(alive[..., None], logits, 0.0), dim=-1)
    # A +inf logit (a key, a float mask entry or the sink) leaves the softmax undefined
    # (inf / inf): its row is NaN as for a NaN logit, lse included (the NaN contract).
    lse_safe = torch.where(alive, lse_safe, 0.0)
    lse_safe = torch.where(lse_safe == float("inf"), float("nan"), lse_safe)
    lse = lse_safe.masked_fill(~alive, float("-inf"))
    # p = 0 where the logit is -inf (masked keys), NaN rows included, and no gradient
    # passes there (exp(-inf) = 0 in the backward too, not 0 * exp(NaN)), as in the kernels.
    hidden = logits == float("-inf")
    p = torch.exp(torch.where(hidden, float("-inf"), logits - lse_safe[..., None]))
    p_keys = p[..., : R + Nk]
    # (+ 0 * lse: a row whose softmax is undefined is NaN even where it attends no key, only the sink)
    out = p_keys @ torch.cat(values, dim=2) + 0.0 * lse_safe[..., None]

    share = p_keys[..., : R + num_prefix_tokens].sum(-1)
    stats = AttentionStats(
        lse=lse,
        entropy=-torch.special.xlogy(p, p).sum(-1),
        register_share=share.masked_fill(torch.isnan(lse), torch.nan),  # (NaN rows: NaN even with no register)
        key_mass=p_keys.sum(-2),
    )
    stats = AttentionStats(*(t.detach().float() for t in stats))
    return out.to(q.dtype), stats


def attention_call_ref(call: AttentionCall) -> tuple[Tensor, AttentionStats]:
    """:func:`attention_ref` on a validated :class:`~dsr_kernels.attention_call.AttentionCall`
    (packed sequences: one sequence at a time, :func:`per_sequence`)."""
    if call.varlen:
        return per_sequence(call, attention_call_ref)
    rope = (call.rope_cos, call.rope_sin) if call.rope_cos is not None else None
    return attention_ref(
        call.q,
        call.k,
        call.v,
        kv_registers=(call.rk, call.rv) if call.rk is not None else None,
        sinks=call.sinks,
        key_mask=call.key_mask,
        attn_mask=call.attn_mask,
        causal_offset=call.causal_offset,
        num_prefix_tokens=call.num_prefix_tokens,
        scale=call.scale,
        rope=rope,
        rope_style=RopeStyle(call.rope_style).label if rope is not None else "interleaved",
    )


def per_sequence(
    call: AttentionCall, batched: Callable[[AttentionCall], tuple[Tensor, AttentionStats]]
) -> tuple[Tensor, AttentionStats]:
    """Packed sequences (``call.varlen``) as one batched call per sequence: the definition of
    ``attention_varlen``, and the "torch" backend's way to run it.

    ``batched(sub)`` runs a batched call of one sequence (q [1, H, nq, D]) with statistics.
    The results are packed as the kernels pack them: out [Tq, H, Dv], lse, entropy,
    register_share [H, Tq] and key_mass [S, H, R + max_seqlen_k] (zeros past each
    sequence's keys). Differentiable wherever ``batched`` is: out is assembled by cat.
    """
    q, k, v, sinks = call.q, call.k, call.v, call.sinks
    Tq, H, _ = q.shape
    Dv, S, R = v.shape[2], call.num_sequences, call.num_registers
    offsets_q, offsets_k = call.cu_seqlens_q.tolist(), call.cu_seqlens_k.tolist()
    out = q.new_zeros(Tq, H, Dv)
    f32 = dict(dtype=torch.float32, device=q.device)
    lse, entropy, share = torch.full((H, Tq), -math.inf, **f32), torch.zeros(H, Tq, **f32), torch.zeros(H, Tq, **f32)
    key_mass = torch.zeros(S, H, R + call.max_seqlen_k, **f32)
    pieces = []
    for s in range(S):
        (q0, q1), (k0, k1) = offsets_q[s : s + 2], offsets_k[s : s + 2]
        if q1 == q0:
            continue
        regs = None if call.rk is None else tuple(t if t.dim() == 3 else t[s : s + 1] for t in (call.rk, call.rv))
        qs = q[q0:q1].transpose(0, 1)[None]  # [1, H, nq, D]
        ks, vs = k[k0:k1].transpose(0, 1)[None], v[k0:k1].transpose(0, 1)[None]
        prefix = min(call.num_prefix_tokens, k1 - k0)
        if k1 == k0:
            if regs is None:  # nothing but the sink to attend: out = 0 (no value), p_sink = 1
                if sinks is not None:  # (a NaN or +inf sink: a NaN row, out too: the NaN contract)
                    sink = sinks.float().masked_fill(sinks == float("inf"), float("nan"))
                    undefined = torch.where(sink.isnan(), float("nan"), 0.0)
                    lse[:, q0:q1] = sink[:, None]
                    entropy[:, q0:q1] = share[:, q0:q1] = undefined[:, None]
                    if undefined.isnan().any():
                        pieces.append((q0, q1, undefined[None, :, None].expand(q1 - q0, H, Dv).to(q.dtype)))
                continue
            ks, vs = (t.expand(1, *t.shape[-3:]) for t in regs)  # the registers are the only keys
            regs, prefix = None, R  # (and count in the register share)
        sub = call.replace(
            q=qs,
            k=ks,
            v=vs,
            rk=None if regs is None else regs[0],
            rv=None if regs is None else regs[1],
            cu_seqlens_q=None,
            cu_seqlens_k=None,
            max_seqlen_q=0,
            max_seqlen_k=0,
            causal=call.causal if k1 > k0 else Causal.NONE,
            num_prefix_tokens=prefix,
            return_stats=True,
        )
        o, st = batched(sub)
        pieces.append((q0, q1, o[0].transpose(0, 1)))
        lse[:, q0:q1], entropy[:, q0:q1], share[:, q0:q1] = st.lse[0], st.entropy[0], st.register_share[0]
        key_mass[s, :, : st.key_mass.shape[-1]] = st.key_mass[0]
    if pieces:  # (assembled by cat, so that gradients flow to every sequence's q, k, v)
        parts, end = [], 0
        for q0, q1, o in pieces:
            parts += [out[end:q0], o]
            end = q1
        out = torch.cat(parts + [out[end:]])
    return out, AttentionStats(lse, entropy, share, key_mass)
