"""Drop-in replacements for flash-attn's and PyTorch's attention entry points.

Both keep the original names, defaults and layouts, so that swapping the import is
enough, and add ``kv_registers`` / ``sinks`` as keyword-only extras. What the fused op
does not implement (dropout, sliding windows, softcapping, ALiBi) raises
NotImplementedError naming the argument instead of being ignored.
"""

from torch import Tensor

from dsr_kernels.ops.attention import _attention, _check_tensor


def _repeat_kv_heads(fn: str, name: str, t: Tensor, num_heads: int, dim: int) -> Tensor:
    """[B, Hk, N, D] -> [B, H, N, D] for grouped-query attention (a copy of K/V)."""
    hk = t.shape[dim]
    if hk == num_heads:
        return t
    if hk == 0 or num_heads % hk != 0:
        raise ValueError(f"{fn}(): argument '{name}' has {hk} heads, which must divide the {num_heads} heads of q")
    return t.repeat_interleave(num_heads // hk, dim=dim)


def flash_attn_func(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
    *,
    kv_registers: tuple[Tensor, Tensor] | None = None,
    sinks: Tensor | None = None,
):
    """flash-attn's ``flash_attn_func`` on the fused register attention.

    Args:
        q: [B, Nq, H, D]; k, v: [B, Nk, Hk, D] with Hk dividing H (MQA/GQA: K/V heads
            are repeated, a copy). Layout and semantics as in flash-attn 2.
        causal: bottom-right aligned, as flash-attn >= 2.1 (query i sees key j iff
            j <= i + Nk - Nq); registers are always visible.
        deterministic: accepted for compatibility; the backward is always deterministic.
        return_attn_probs: return ``(out, lse, None)`` with lse [B, H, Nq] float32, as
            flash-attn's contract allows (the probabilities themselves are never built).
        kv_registers: (rk, rv), each [H, R, D] or [B, H, R, D] (head-major, like
            :func:`dsr_kernels.attention`).
        sinks: [H] attention-sink logits.

    Returns:
        out [B, Nq, H, D] (contiguous), or ``(out, lse, None)``.
    """
    fn = "flash_attn_func"
    if dropout_p != 0.0:
        raise NotImplementedError(f"{fn}(): dropout_p={dropout_p} is not supported (only 0.0)")
    if tuple(window_size) != (-1, -1):
        raise NotImplementedError(f"{fn}(): window_size={tuple(window_size)} is not supported (only (-1, -1))")
    if softcap != 0.0:
        raise NotImplementedError(f"{fn}(): softcap={softcap} is not supported (only 0.0)")
    if alibi_slopes is not None:
        raise NotImplementedError(f"{fn}(): alibi_slopes is not supported (only None)")
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_tensor(fn, name, t)
        if t.dim() != 4:
            raise ValueError(f"{fn}(): argument '{name}' must be 4-D [B, N, H, D], got shape {list(t.shape)}")
    k = _repeat_kv_heads(fn, "k", k, q.shape[2], 2)
    v = _repeat_kv_heads(fn, "v", v, q.shape[2], 2)
    out, stats = _attention(
        fn,
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        kv_registers=kv_registers,
        sinks=sinks,
        key_mask=None,
        attn_mask=None,
        causal="bottom_right" if causal else None,
        num_prefix_tokens=0,
        scale=softmax_scale,
        return_stats=False,
        backend="auto",
    )
    out = out.transpose(1, 2)  # the op writes [B, Nq, H, D] memory: contiguous again
    if return_attn_probs:
        return out, stats.lse, None
    return out


def scaled_dot_product_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    kv_registers: tuple[Tensor, Tensor] | None = None,
    sinks: Tensor | None = None,
) -> Tensor:
    """``torch.nn.functional.scaled_dot_product_attention`` on the fused register attention.

    Args:
        query: [B, H, L, E] or [B, L, E]; key, value: [B, Hk, S, E] or [B, S, E].
        attn_mask: bool (True = may attend) or additive float, broadcastable to
            [B, H, L, S], read in place with broadcast strides. Not differentiable.
        is_causal: top-left aligned lower triangle (query i sees key j iff j <= i), as
            PyTorch; cannot be combined with attn_mask.
        enable_gqa: K/V with Hk heads dividing H are repeated to H heads (a copy).
        kv_registers, sinks: as in :func:`dsr_kernels.attention` (never masked).

    Returns:
        [B, H, L, E] (or [B, L, E]) in query's dtype.
    """
    fn = "scaled_dot_product_attention"
    if dropout_p != 0.0:
        raise NotImplementedError(f"{fn}(): dropout_p={dropout_p} is not supported (only 0.0)")
    for name, t in (("query", query), ("key", key), ("value", value)):
        _check_tensor(fn, name, t)
        if t.dim() not in (3, 4):
            raise ValueError(f"{fn}(): argument '{name}' must be 3-D or 4-D, got shape {list(t.shape)}")
    if is_causal and attn_mask is not None:
        raise ValueError(f"{fn}(): pass either attn_mask or is_causal=True, not both")
    squeeze = query.dim() == 3
    if squeeze:
        query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        if attn_mask is not None and attn_mask.dim() == 3:
            attn_mask = attn_mask.unsqueeze(1)
    if enable_gqa:
        key = _repeat_kv_heads(fn, "key", key, query.shape[1], 1)
        value = _repeat_kv_heads(fn, "value", value, query.shape[1], 1)
    out, _ = _attention(
        fn,
        query,
        key,
        value,
        kv_registers=kv_registers,
        sinks=sinks,
        key_mask=None,
        attn_mask=attn_mask,
        causal="top_left" if is_causal else None,
        num_prefix_tokens=0,
        scale=scale,
        return_stats=False,
        backend="auto",
    )
    return out.squeeze(1) if squeeze else out
