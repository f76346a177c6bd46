"""Drop-in replacements for flash-attn's and PyTorch's attention entry points.

Each keeps the original's names, defaults, layouts and return conventions, so that
swapping the import is enough, and adds this package's extras as keyword-only options
(``kv_registers``, ``sinks``, and for the flash-attn family ``return_stats``).

- flash-attn family: :func:`flash_attn_func`, :func:`flash_attn_qkvpacked_func`,
  :func:`flash_attn_kvpacked_func` and the packed variable-length forms
  :func:`flash_attn_varlen_func`, :func:`flash_attn_varlen_qkvpacked_func`,
  :func:`flash_attn_varlen_kvpacked_func`. Grouped K/V heads (MQA / GQA) are read in place. What
  the fused op does not implement (dropout, sliding windows, softcapping, ALiBi) raises
  NotImplementedError naming the argument instead of being ignored.
- :func:`scaled_dot_product_attention`: PyTorch's whole contract (any leading batch dims,
  broadcasting, empty inputs, a value head dim of its own, non-contiguous inputs,
  ``enable_gqa`` without copies, torch's error types and argument names). Where the fused
  kernels cannot serve a call (``dropout_p > 0``, a float ``attn_mask`` that needs a
  gradient) it runs PyTorch's own SDPA and warns once per process and reason.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

from dsr_kernels.attention_call import Causal
from dsr_kernels.ops.attention import MAX_HEAD_DIM, validated_attention
from dsr_kernels.ops.attention_varlen import attention_varlen
from dsr_kernels.validation import check_tensor

__all__ = [
    "SDPAError",
    "flash_attn_func",
    "flash_attn_kvpacked_func",
    "flash_attn_qkvpacked_func",
    "flash_attn_varlen_func",
    "flash_attn_varlen_kvpacked_func",
    "flash_attn_varlen_qkvpacked_func",
    "scaled_dot_product_attention",
]


# ----------------------------------------------------------------------------- flash-attn family


def _check_flash_options(fn: str, dropout_p, window_size, softcap, alibi_slopes, return_attn_probs, return_stats):
    if dropout_p != 0.0:
        raise NotImplementedError(f"{fn}(): dropout_p={dropout_p} is not supported (only 0.0)")
    if tuple(window_size) != (-1, -1):
        raise NotImplementedError(f"{fn}(): window_size={tuple(window_size)} is not supported (only (-1, -1))")
    if softcap != 0.0:
        raise NotImplementedError(f"{fn}(): softcap={softcap} is not supported (only 0.0)")
    if alibi_slopes is not None:
        raise NotImplementedError(f"{fn}(): alibi_slopes is not supported (only None)")
    if return_attn_probs and return_stats:
        raise ValueError(f"{fn}(): pass return_attn_probs=True or return_stats=True, not both")


def _flash(
    fn: str,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    softmax_scale: float | None,
    causal: bool,
    return_attn_probs: bool,
    kv_registers,
    sinks,
    return_stats: bool,
):
    """[B, N, H, D] views in, flash-attn's results out."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{fn}(): argument '{name}' must be 4-D [B, N, H, D], got shape {list(t.shape)}")
    for name, t in (("k", k), ("v", v)):
        if t.shape[2] == 0 or q.shape[2] % t.shape[2] != 0:
            raise ValueError(
                f"{fn}(): argument '{name}' has {t.shape[2]} heads, which must divide the {q.shape[2]} heads of q"
            )
    out, stats = validated_attention(
        fn,
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        kv_registers=kv_registers,
        sinks=sinks,
        key_mask=None,
        attn_mask=None,
        causal=Causal.BOTTOM_RIGHT if causal else Causal.NONE,
        num_prefix_tokens=0,
        scale=softmax_scale,
        return_stats=return_stats,
        backend="auto",
    )
    out = out.transpose(1, 2)  # the op writes [B, Nq, H, Dv] memory: contiguous again
    if return_stats:
        return out, stats
    if return_attn_probs:
        # flash-attn's softmax_lse is +inf for a query that sees no key (ours: -inf).
        return out, stats.lse.masked_fill(torch.isneginf(stats.lse), float("inf")), None
    return out


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
    return_stats: bool = False,
):
    """flash-attn's ``flash_attn_func`` on the fused register attention.

    Args:
        q: [B, Nq, H, D]; k: [B, Nk, Hk, D], v: [B, Nk, Hk, Dv] with Hk dividing H (MQA /
            GQA: query head h reads K/V head h // (H / Hk) in place, no copy). Any
            strides (a last dim that is not contiguous is copied).
        softmax_scale: default 1 / sqrt(D).
        causal: bottom-right aligned, as flash-attn >= 2.1 (query i sees key j iff
            j <= i + Nk - Nq); registers are always visible.
        deterministic: accepted for compatibility; the backward is always deterministic.
        return_attn_probs: return ``(out, softmax_lse, None)``: softmax_lse [B, H, Nq]
            float32, +inf for a query that sees no key, as flash-attn (the probabilities
            themselves are never built, which flash-attn's contract allows).
        kv_registers: (rk, rv), rk [H, R, D] or [B, H, R, D], rv the same with Dv
            (head-major, like :func:`dsr_kernels.attention`).
        sinks: [H] attention-sink logits.
        return_stats: return ``(out, stats)`` with :class:`~dsr_kernels.AttentionStats`
            (lse, entropy, register_share [B, H, Nq], key_mass [B, H, R + Nk]; this
            package's conventions: lse -inf where nothing is seen).

    Returns:
        out [B, Nq, H, Dv] (contiguous), or ``(out, softmax_lse, None)``, or ``(out, stats)``.
    """
    fn = "flash_attn_func"
    _check_flash_options(fn, dropout_p, window_size, softcap, alibi_slopes, return_attn_probs, return_stats)
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(fn, name, t)
    return _flash(fn, q, k, v, softmax_scale, causal, return_attn_probs, kv_registers, sinks, return_stats)


def flash_attn_qkvpacked_func(
    qkv: Tensor,
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
    return_stats: bool = False,
):
    """flash-attn's ``flash_attn_qkvpacked_func``: ``qkv`` [B, N, 3, H, D], read in place.

    The output of a fused qkv projection reshaped to [B, N, 3, H, D] is attended without
    a copy; its gradient is one [B, N, 3, H, D] tensor, as flash-attn's. Other arguments
    and the results as :func:`flash_attn_func`.
    """
    fn = "flash_attn_qkvpacked_func"
    _check_flash_options(fn, dropout_p, window_size, softcap, alibi_slopes, return_attn_probs, return_stats)
    check_tensor(fn, "qkv", qkv)
    if qkv.dim() != 5 or qkv.shape[2] != 3:
        raise ValueError(f"{fn}(): argument 'qkv' must be 5-D [B, N, 3, H, D], got shape {list(qkv.shape)}")
    q, k, v = qkv.unbind(2)
    return _flash(fn, q, k, v, softmax_scale, causal, return_attn_probs, kv_registers, sinks, return_stats)


def flash_attn_kvpacked_func(
    q: Tensor,
    kv: Tensor,
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
    return_stats: bool = False,
):
    """flash-attn's ``flash_attn_kvpacked_func``: q [B, Nq, H, D], ``kv`` [B, Nk, 2, Hk, D].

    kv is read in place (Hk dividing H: MQA / GQA); the other arguments and the results
    as :func:`flash_attn_func`.
    """
    fn = "flash_attn_kvpacked_func"
    _check_flash_options(fn, dropout_p, window_size, softcap, alibi_slopes, return_attn_probs, return_stats)
    check_tensor(fn, "q", q)
    check_tensor(fn, "kv", kv)
    if kv.dim() != 5 or kv.shape[2] != 2:
        raise ValueError(f"{fn}(): argument 'kv' must be 5-D [B, N, 2, H, D], got shape {list(kv.shape)}")
    k, v = kv.unbind(2)
    return _flash(fn, q, k, v, softmax_scale, causal, return_attn_probs, kv_registers, sinks, return_stats)


def _varlen(
    fn, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal, return_attn_probs,
    kv_registers, sinks, return_stats,
):  # fmt: skip
    out, stats = attention_varlen(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k,
        kv_registers=kv_registers, sinks=sinks, causal=causal, scale=softmax_scale, return_stats=True,
    )  # fmt: skip
    if return_stats:
        return out, stats
    if return_attn_probs:  # softmax_lse [H, Tq], +inf where a query sees nothing (flash-attn's)
        return out, stats.lse.masked_fill(torch.isneginf(stats.lse), float("inf")), None
    return out


def flash_attn_varlen_func(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
    block_table: Tensor | None = None,
    *,
    kv_registers: tuple[Tensor, Tensor] | None = None,
    sinks: Tensor | None = None,
    return_stats: bool = False,
):
    """flash-attn's ``flash_attn_varlen_func``: packed variable-length sequences.

    Args:
        q: [Tq, H, D]; k: [Tk, Hk, D], v: [Tk, Hk, Dv] (Hk dividing H), the sequences
            packed along the first axis; cu_seqlens_q / cu_seqlens_k: [S + 1] int32
            offsets; max_seqlen_q / max_seqlen_k: the longest sequence.
        causal: bottom-right aligned within each sequence, as flash-attn.
        return_attn_probs: ``(out, softmax_lse, None)`` with softmax_lse [H, Tq] float32,
            +inf for a query that sees nothing.
        kv_registers: rk [H, R, D] shared by every sequence or [S, H, R, D] per sequence,
            rv the same with Dv. sinks: [H]. return_stats: ``(out, stats)`` as
            :func:`dsr_kernels.attention_varlen` gives them.

    Computed by :func:`dsr_kernels.attention_varlen` (one kernel launch over all
    sequences on the "cpu" backend). ``block_table`` (paged KV cache) raises
    NotImplementedError, as dropout, windows, softcapping and ALiBi do.

    Returns:
        out [Tq, H, Dv], or ``(out, softmax_lse, None)``, or ``(out, stats)``.
    """
    fn = "flash_attn_varlen_func"
    _check_flash_options(fn, dropout_p, window_size, softcap, alibi_slopes, return_attn_probs, return_stats)
    if block_table is not None:
        raise NotImplementedError(f"{fn}(): block_table (a paged KV cache) is not supported (only None)")
    return _varlen(
        fn, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal,
        return_attn_probs, kv_registers, sinks, return_stats,
    )  # fmt: skip


def flash_attn_varlen_qkvpacked_func(
    qkv: Tensor,
    cu_seqlens: Tensor,
    max_seqlen: int,
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
    return_stats: bool = False,
):
    """flash-attn's ``flash_attn_varlen_qkvpacked_func``: ``qkv`` [T, 3, H, D] read in place, one
    ``cu_seqlens`` for queries and keys; the rest as :func:`flash_attn_varlen_func`."""
    fn = "flash_attn_varlen_qkvpacked_func"
    _check_flash_options(fn, dropout_p, window_size, softcap, alibi_slopes, return_attn_probs, return_stats)
    check_tensor(fn, "qkv", qkv)
    if qkv.dim() != 4 or qkv.shape[1] != 3:
        raise ValueError(f"{fn}(): argument 'qkv' must be 4-D [T, 3, H, D], got shape {list(qkv.shape)}")
    q, k, v = qkv.unbind(1)
    return _varlen(
        fn, q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, softmax_scale, causal, return_attn_probs,
        kv_registers, sinks, return_stats,
    )  # fmt: skip


def flash_attn_varlen_kvpacked_func(
    q: Tensor,
    kv: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
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
    return_stats: bool = False,
):
    """flash-attn's ``flash_attn_varlen_kvpacked_func``: q [Tq, H, D], ``kv`` [Tk, 2, Hk, D] read in
    place; the rest as :func:`flash_attn_varlen_func`."""
    fn = "flash_attn_varlen_kvpacked_func"
    _check_flash_options(fn, dropout_p, window_size, softcap, alibi_slopes, return_attn_probs, return_stats)
    check_tensor(fn, "kv", kv)
    if kv.dim() != 4 or kv.shape[1] != 2:
        raise ValueError(f"{fn}(): argument 'kv' must be 4-D [T, 2, H, D], got shape {list(kv.shape)}")
    k, v = kv.unbind(1)
    return _varlen(
        fn, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal,
        return_attn_probs, kv_registers, sinks, return_stats,
    )  # fmt: skip


# ----------------------------------------------------------------------------- SDPA


class SDPAError(ValueError, RuntimeError):
    """Bad input to :func:`scaled_dot_product_attention`.

    Both a ValueError (this package's rule for bad input) and a RuntimeError (what
    ``torch.nn.functional.scaled_dot_product_attention`` raises), so that code written for
    either catches it.
    """


_WARNED: set[str] = set()
# PyTorch's own, bound at import: integrations may redirect F.scaled_dot_product_attention to
# this module's function for a while (dsr_kernels.integrations.diffusers), and the fallback
# must still reach PyTorch's.
_TORCH_SDPA = F.scaled_dot_product_attention


def _fallback(reason: str, query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, kv_registers, sinks):
    """PyTorch's own SDPA for a call the fused kernels cannot serve, with a warning once per reason."""
    if sinks is not None:
        raise NotImplementedError(
            f"scaled_dot_product_attention(): {reason} runs PyTorch's SDPA, which has no attention sinks; "
            "pass sinks=None or drop the reason"
        )
    if reason not in _WARNED:
        _WARNED.add(reason)
        warnings.warn(
            f"dsr_kernels.scaled_dot_product_attention: {reason}: running torch.nn.functional."
            "scaled_dot_product_attention instead of the fused kernels (warned once per process)",
            stacklevel=3,
        )
    if kv_registers is not None:  # registers become the first keys, never masked
        rk, rv = kv_registers
        batch = torch.broadcast_shapes(query.shape[:-3], key.shape[:-3])
        R, hq = rk.shape[-2], rk.shape[-3]
        if key.shape[-3] != hq:  # grouped K/V heads: repeat them to the registers' query heads (a copy)
            key = key.repeat_interleave(hq // key.shape[-3], dim=-3)
            value = value.repeat_interleave(hq // value.shape[-3], dim=-3)
            enable_gqa = False
        rk = rk.expand(*batch, *rk.shape[-3:]) if rk.dim() == 3 else rk
        rv = rv.expand(*batch, *rv.shape[-3:]) if rv.dim() == 3 else rv
        key = torch.cat([rk, key.expand(*batch, *key.shape[-3:])], dim=-2)
        value = torch.cat([rv, value.expand(*batch, *value.shape[-3:])], dim=-2)
        L = query.shape[-2]
        if is_causal:  # top-left causal on the tokens only
            attn_mask = torch.ones(L, key.shape[-2] - R, dtype=torch.bool, device=query.device).tril()
            is_causal = False
        if attn_mask is not None:
            fill = True if attn_mask.dtype == torch.bool else 0.0
            pad = torch.full((*attn_mask.shape[:-1], R), fill, dtype=attn_mask.dtype, device=attn_mask.device)
            attn_mask = torch.cat([pad, attn_mask.expand(*attn_mask.shape[:-1], attn_mask.shape[-1])], dim=-1)
    return _TORCH_SDPA(
        query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
        enable_gqa=enable_gqa,
    )  # fmt: skip


def _sdpa_check(query, key, value, attn_mask, enable_gqa) -> None:
    """torch's checks, worded with torch's argument names, before anything runs."""
    fn = "scaled_dot_product_attention"
    for pos, (name, t) in enumerate((("query", query), ("key", key), ("value", value)), start=1):
        if not isinstance(t, Tensor):
            raise TypeError(f"{fn}(): argument '{name}' (position {pos}) must be Tensor, not {type(t).__name__}")
    if min(query.dim(), key.dim(), value.dim()) < 2:
        raise SDPAError(
            f"{fn}(): expected query, key and value to be at least 2-D [..., N, E], got query.dim {query.dim()}, "
            f"key.dim {key.dim()} and value.dim {value.dim()}"
        )
    if not (query.dtype == key.dtype == value.dtype):
        raise SDPAError(
            f"{fn}(): expected query, key and value to have the same dtype, got query.dtype {query.dtype}, "
            f"key.dtype {key.dtype} and value.dtype {value.dtype}"
        )
    if not query.is_floating_point():
        raise TypeError(f"{fn}(): argument 'query' must be a floating tensor, got {query.dtype}")
    if not (query.device == key.device == value.device):
        raise SDPAError(
            f"{fn}(): expected query, key and value on one device, got query.device {query.device}, "
            f"key.device {key.device} and value.device {value.device}"
        )
    if query.shape[-1] != key.shape[-1]:
        raise SDPAError(
            f"{fn}(): query and key must have the same head dim E, got query {list(query.shape)} "
            f"and key {list(key.shape)}"
        )
    if key.shape[-2] != value.shape[-2]:
        raise SDPAError(
            f"{fn}(): key and value must have the same sequence length S, got key {list(key.shape)} "
            f"and value {list(value.shape)}"
        )
    if attn_mask is not None:
        if not isinstance(attn_mask, Tensor):
            raise TypeError(f"{fn}(): argument 'attn_mask' must be a Tensor or None, got {type(attn_mask).__name__}")
        if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
            raise SDPAError(f"{fn}(): argument 'attn_mask' must be bool or floating, got {attn_mask.dtype}")
        if attn_mask.dim() < 2:
            raise SDPAError(
                f"{fn}(): argument 'attn_mask' must be at least 2-D [..., L, S] (as torch), "
                f"got shape {list(attn_mask.shape)}"
            )
        if attn_mask.device != query.device:
            raise SDPAError(f"{fn}(): argument 'attn_mask' is on {attn_mask.device} but query is on {query.device}")
    if enable_gqa and min(query.dim(), key.dim(), value.dim()) >= 3:
        hq, hk, hv = query.shape[-3], key.shape[-3], value.shape[-3]
        if hk != hv or hk == 0 or hq % hk != 0:
            raise SDPAError(
                f"{fn}(): with enable_gqa=True the number of heads in key ({hk}) and value ({hv}) must be equal "
                f"and divide the number of heads in query ({hq})"
            )


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
    backend: str = "auto",
) -> Tensor:
    """``torch.nn.functional.scaled_dot_product_attention`` on the fused register attention.

    Args:
        query: [..., Hq, L, E]; key: [..., H, S, E]; value: [..., H, S, Ev]: any number of
            leading batch dims (2-D inputs have none), broadcast against each other as
            torch does; the head dims broadcast too. Any strides (a last dim that is not
            contiguous is copied).
        attn_mask: bool (True = may attend) or additive float, at least 2-D and
            broadcastable to [..., Hq, L, S]; read in place with broadcast strides.
        dropout_p: > 0 runs PyTorch's SDPA (the fused kernels have no dropout), with a
            warning once per process.
        is_causal: top-left aligned lower triangle (query i sees key j iff j <= i), as
            PyTorch; cannot be combined with attn_mask.
        scale: default 1 / sqrt(E).
        enable_gqa: key / value with H heads dividing Hq: query head h reads K/V head
            h // (Hq / H) in place, no copy.
        kv_registers: (rk, rv), rk [Hq, R, E] or [B, Hq, R, E] (B: the leading dims
            flattened), rv the same with Ev: R register keys / values per query head,
            never masked (extra).
        sinks: [Hq] attention-sink logits (extra).
        backend: the backend of :func:`dsr_kernels.attention` (extra; "auto" as there).

    Empty inputs return what torch returns: an empty output when a batch dim or L is 0,
    zeros when S is 0 (with no registers and no sink); a query whose keys are all masked
    gets zeros, as torch's. A float ``attn_mask`` that requires a gradient (with grad mode
    on) also runs PyTorch's SDPA, warned once.

    Raises :class:`SDPAError` (a ValueError and a RuntimeError) or TypeError naming
    ``query`` / ``key`` / ``value`` / ``attn_mask`` for bad input, before any kernel runs.

    Returns:
        [..., Hq, L, Ev] in query's dtype (the broadcast batch dims).
    """
    fn = "scaled_dot_product_attention"
    _sdpa_check(query, key, value, attn_mask, enable_gqa)
    if is_causal and attn_mask is not None:
        raise SDPAError(f"{fn}(): explicit attn_mask should not be set when is_causal=True")
    if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale)):
        raise SDPAError(f"{fn}(): argument 'scale' must be a finite number or None, got {scale!r}")

    fallback_args = (query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, kv_registers, sinks)
    if dropout_p > 0.0:
        return _fallback(f"dropout_p={dropout_p} > 0", *fallback_args)
    if attn_mask is not None and attn_mask.requires_grad and torch.is_grad_enabled():
        return _fallback("a float attn_mask that requires grad", *fallback_args)

    # Shapes: [*batch, heads, N, E] for each; 2-D inputs get one head and no batch.
    squeeze = 0
    while min(query.dim(), key.dim(), value.dim()) < 3:
        query, key, value, squeeze = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0), squeeze + 1
    try:  # (equal batch dims, the common case, without broadcast_shapes' ~25 us)
        leads = (query.shape[:-3], key.shape[:-3], value.shape[:-3])
        batch = leads[0] if leads[0] == leads[1] == leads[2] else torch.broadcast_shapes(*leads)
    except RuntimeError as exc:
        raise SDPAError(
            f"{fn}(): the batch dims of query {list(query.shape)}, key {list(key.shape)} and value "
            f"{list(value.shape)} do not broadcast"
        ) from exc
    hq, hk, hv = query.shape[-3], key.shape[-3], value.shape[-3]
    if hk != hv and 1 not in (hk, hv):
        raise SDPAError(f"{fn}(): key has {hk} heads and value {hv}: they must be equal or one of them 1")
    h_kv = max(hk, hv)
    if hq == h_kv or h_kv == 1 or (enable_gqa and hq % h_kv == 0):
        heads = hq  # K/V heads read in place: equal, MQA by broadcasting, or grouped
    elif hq == 1:
        heads = h_kv  # one query head broadcast over the K/V heads
    else:
        raise SDPAError(
            f"{fn}(): query has {hq} heads and key / value {h_kv}: they must be equal, one of them 1, "
            "or (with enable_gqa=True) the key / value heads must divide the query heads"
        )
    L, S, E, Ev = query.shape[-2], key.shape[-2], query.shape[-1], value.shape[-1]
    out_shape = (*batch, heads, L, Ev)
    if attn_mask is not None:
        try:
            torch.broadcast_shapes(attn_mask.shape, (*batch, heads, L, S))
        except RuntimeError as exc:
            raise SDPAError(
                f"{fn}(): argument 'attn_mask' of shape {list(attn_mask.shape)} does not broadcast to "
                f"{[*batch, heads, L, S]} ([..., Hq, L, S])"
            ) from exc
    if max(E, Ev) > MAX_HEAD_DIM:
        return _fallback(f"a head dim above {MAX_HEAD_DIM}", *fallback_args)

    B = math.prod(batch)
    kv_heads = h_kv if heads % h_kv == 0 else heads

    def flat(t: Tensor, h: int) -> Tensor:  # [*batch, h, N, E] as [B, h, N, E], a view where it can be one
        if t.shape[:-2] != (*batch, h):
            t = t.expand(*batch, h, *t.shape[-2:])
        if t.stride(-1) != 1 and t.numel() > 0:
            t = t.contiguous()
        return t if t.dim() == 4 else t.reshape(B, h, *t.shape[-2:])

    q, k, v = flat(query, heads), flat(key, kv_heads), flat(value, kv_heads)
    if B == 0 or heads == 0 or L == 0 or (S == 0 and kv_registers is None and sinks is None):
        # torch: an empty output, or zeros when there is no key (and nothing else to attend).
        link = sum(t.reshape(-1)[:0].sum() for t in (q, k, v))  # an exact 0 that keeps the autograd graph
        return (q.new_zeros(out_shape) + link).reshape(out_shape[squeeze:])
    mask = None
    if attn_mask is not None:
        mask = attn_mask.expand(*batch, heads, L, S).reshape(B, heads, L, S)
    if S == 0:  # only registers or a sink to attend: the registers are the keys
        if kv_registers is None:  # a sink alone takes all the mass: out = 0
            link = sum(t.reshape(-1)[:0].sum() for t in (q, k, v, sinks))
            return (q.new_zeros(out_shape) + link).reshape(out_shape[squeeze:])
        rk, rv = kv_registers
        k, v = rk.expand(B, *rk.shape[-3:]), rv.expand(B, *rv.shape[-3:])
        kv_registers, mask, is_causal = None, None, False
    out, _ = validated_attention(
        fn,
        q,
        k,
        v,
        kv_registers=kv_registers,
        sinks=sinks,
        key_mask=None,
        attn_mask=mask,
        causal=Causal.TOP_LEFT if is_causal else Causal.NONE,
        num_prefix_tokens=0,
        scale=scale,
        return_stats=False,
        backend=backend,
    )
    return out if out.dim() == len(out_shape) - squeeze else out.reshape(out_shape[squeeze:])
