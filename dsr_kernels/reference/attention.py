"""Reference register attention: the definition of ``dsr_kernels.attention``.

It materialises the [B, H, Nq, R + Nk] logits, so it is only for small inputs: it is the
test oracle, the readable specification and the CPU baseline in the benchmarks. It is
differentiable with plain autograd (``torch.autograd.gradcheck`` runs on it in float64).
"""

from __future__ import annotations

import torch
from torch import Tensor

from dsr_kernels.rope import apply_rope
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

    Non-finite inputs (the contract every backend follows; README "NaN and inf"): masked
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
