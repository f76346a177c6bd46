"""Backend ``"cpu"`` of register attention: the C++ kernel of csrc/cpu/attention.cpp.

The kernel computes in float32 and writes into the outputs that
``dsr_kernels.ops.attention`` allocates: out, lse and, with statistics, the entropy,
register share and key mass, all from one pass over each query block's logits. This
launcher converts fp16 / bf16 operands to float32 (float32 accumulation; float32 inputs
are passed as they are, views included) and passes the rotary tables, which the kernel
applies to q and the token keys as it loads their rows (and whose transpose it applies to
the gradients of q and k). float64 stays on the ``"torch"`` and ``"reference"`` backends.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dsr_kernels._extension import extension_unavailable_reason
from dsr_kernels.rope import ROPE_STYLES
from dsr_kernels.types import HALF_AND_FLOAT, Backend


def _unavailable_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    reason = extension_unavailable_reason(device)
    if reason is None and not hasattr(torch.ops.dsr_kernels, "attention_fwd_cpu"):
        reason = "dsr_kernels._C was built from sources without csrc/cpu/attention.cpp: rebuild the extension"
    return reason


# C++ kernels for CPU tensors, float32 accumulation; float64 stays on "torch" / "reference".
BACKEND = Backend("cpu", ("cpu",), HALF_AND_FLOAT, _unavailable_reason)


def _f32(t: Tensor | None) -> Tensor | None:
    """t as float32 rows the kernel can hand to BLAS: a view when it already is one.

    The GEMMs take each operand's row stride as their leading dimension, which BLAS
    requires to be at least the row length. Rows that overlap (the stride 0 of ``expand``,
    the stride 1 of ``unfold``) or that are not contiguous are copied; any other strides
    (transposed heads, a packed qkv projection, broadcast batch or head dims) are read in place.
    """
    if t is None:
        return None
    t = t.float()
    if t.stride(-1) != 1 or (t.shape[-2] > 1 and t.stride(-2) < t.shape[-1]):
        t = t.contiguous()
    return t


def _sinks32(sinks: Tensor | None) -> Tensor | None:
    return None if sinks is None else sinks.float().contiguous()


def _small_grads32(drk: Tensor | None, drv: Tensor | None, dsinks: Tensor | None) -> list[Tensor | None]:
    """Float32 contiguous buffers for drk, drv and dsinks (each itself when it already is one)."""
    return [
        None if g is None else g if g.dtype == torch.float32 and g.is_contiguous() else torch.empty(g.shape)
        for g in (drk, drv, dsinks)
    ]


def _copy_back(dsts, srcs) -> None:
    """Each gradient gets its float32 buffer's values, where the kernel wrote into a buffer of its own."""
    for dst, src in zip(dsts, srcs, strict=True):
        if src is not None and src is not dst:
            dst.copy_(src)


def _rope_args(rope_cos: Tensor | None, rope_sin: Tensor | None, rope_style: str) -> tuple:
    """(cos, sin, style) as the C++ op takes them: float32 contiguous [N, D] tables, 1 / 2 pairing."""
    if rope_cos is None:
        return None, None, 0
    return rope_cos.float().contiguous(), rope_sin.float().contiguous(), ROPE_STYLES.index(rope_style) + 1


def _bnhd_f32(t: Tensor) -> Tensor:
    """A float32 buffer of t's shape [B, H, N, D] in [B, N, H, D] memory order."""
    B, H, N, D = t.shape
    return torch.empty(B, N, H, D, dtype=torch.float32, device=t.device).transpose(1, 2)


def attention_fwd_cpu(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    rk: Tensor | None,
    rv: Tensor | None,
    sinks: Tensor | None,
    key_mask: Tensor | None,
    attn_mask: Tensor | None,
    num_prefix_tokens: int,
    scale: float,
    causal_offset: int | None,
    return_stats: bool,
    out: Tensor,
    lse: Tensor,
    entropy: Tensor,
    register_share: Tensor,
    key_mass: Tensor,
    *,
    rope_cos: Tensor | None = None,
    rope_sin: Tensor | None = None,
    rope_style: str = "interleaved",
) -> None:
    """Fills out [B, H, Nq, Dv], lse [B, H, Nq] and, with return_stats, the statistics."""
    o32 = out if out.dtype == torch.float32 else _bnhd_f32(out)
    torch.ops.dsr_kernels.attention_fwd_cpu(
        _f32(q),
        _f32(k),
        _f32(v),
        _f32(rk),
        _f32(rv),
        _sinks32(sinks),
        key_mask,
        attn_mask,
        num_prefix_tokens,
        scale,
        causal_offset,
        return_stats,
        o32,
        lse,
        entropy,
        register_share,
        key_mass,
        *_rope_args(rope_cos, rope_sin, rope_style),
    )
    if o32 is not out:
        out.copy_(o32)


def attention_bwd_cpu(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    rk: Tensor | None,
    rv: Tensor | None,
    sinks: Tensor | None,
    key_mask: Tensor | None,
    attn_mask: Tensor | None,
    out: Tensor,
    lse: Tensor,
    scale: float,
    causal_offset: int | None,
    dq: Tensor,
    dk: Tensor,
    dv: Tensor,
    drk: Tensor | None,
    drv: Tensor | None,
    dsinks: Tensor | None,
    *,
    rope_cos: Tensor | None = None,
    rope_sin: Tensor | None = None,
    rope_style: str = "interleaved",
) -> None:
    """Fills dq, dk, dv and, when given, drk, drv (rk's, rv's shapes) and dsinks ([H])."""
    direct = q.dtype == torch.float32
    dq32, dk32 = (dq, dk) if direct else (_bnhd_f32(dq), _bnhd_f32(dk))
    dv32 = dv if dv.dtype == torch.float32 else _bnhd_f32(dv)
    small = _small_grads32(drk, drv, dsinks)
    torch.ops.dsr_kernels.attention_bwd_cpu(
        _f32(dout),
        _f32(q),
        _f32(k),
        _f32(v),
        _f32(rk),
        _f32(rv),
        _sinks32(sinks),
        key_mask,
        attn_mask,
        _f32(out),
        lse.float(),
        scale,
        causal_offset,
        dq32,
        dk32,
        dv32,
        *small,
        *_rope_args(rope_cos, rope_sin, rope_style),
    )
    _copy_back((dq, dk, dv, drk, drv, dsinks), (dq32, dk32, dv32, *small))


def _packed_as_bhnd(t: Tensor) -> Tensor:
    """[T, H, D] packed sequences as the [1, H, T, D] view the C++ kernel reads."""
    return t.permute(1, 0, 2).unsqueeze(0)


def attention_varlen_fwd_cpu(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    rk: Tensor | None,
    rv: Tensor | None,
    sinks: Tensor | None,
    num_prefix_tokens: int,
    scale: float,
    causal: bool,
    return_stats: bool,
    out: Tensor,
    lse: Tensor,
    entropy: Tensor,
    register_share: Tensor,
    key_mass: Tensor,
) -> None:
    """Packed sequences: fills out [Tq, H, Dv], lse [H, Tq] and, with return_stats, the statistics
    (the kernel takes the sequence lengths from the offsets; max_seqlen_* are for the signature)."""
    o32 = out if out.dtype == torch.float32 else torch.empty(out.shape, dtype=torch.float32)
    torch.ops.dsr_kernels.attention_varlen_fwd_cpu(
        _f32(_packed_as_bhnd(q)),
        _f32(_packed_as_bhnd(k)),
        _f32(_packed_as_bhnd(v)),
        cu_seqlens_q,
        cu_seqlens_k,
        _f32(rk),
        _f32(rv),
        _sinks32(sinks),
        num_prefix_tokens,
        scale,
        causal,
        return_stats,
        _packed_as_bhnd(o32),
        lse,
        entropy,
        register_share,
        key_mass,
    )
    if o32 is not out:
        out.copy_(o32)


def attention_varlen_bwd_cpu(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    rk: Tensor | None,
    rv: Tensor | None,
    sinks: Tensor | None,
    out: Tensor,
    lse: Tensor,
    scale: float,
    causal: bool,
    dq: Tensor,
    dk: Tensor,
    dv: Tensor,
    drk: Tensor | None,
    drv: Tensor | None,
    dsinks: Tensor | None,
) -> None:
    """Gradients of the packed-sequence forward, into dq, dk, dv (and drk, drv, dsinks when given)."""
    grads32 = [g if g.dtype == torch.float32 else torch.empty(g.shape, dtype=torch.float32) for g in (dq, dk, dv)]
    small = _small_grads32(drk, drv, dsinks)
    torch.ops.dsr_kernels.attention_varlen_bwd_cpu(
        _f32(_packed_as_bhnd(dout)),
        _f32(_packed_as_bhnd(q)),
        _f32(_packed_as_bhnd(k)),
        _f32(_packed_as_bhnd(v)),
        cu_seqlens_q,
        cu_seqlens_k,
        _f32(rk),
        _f32(rv),
        _sinks32(sinks),
        _f32(_packed_as_bhnd(out)),
        lse.float(),
        scale,
        causal,
        *(_packed_as_bhnd(g) for g in grads32),
        *small,
    )
    _copy_back((dq, dk, dv, drk, drv, dsinks), (*grads32, *small))
