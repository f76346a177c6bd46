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
from dsr_kernels.attention_call import AttentionCall, AttentionGrads, AttentionOutputs
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


def _kernel_call(call: AttentionCall) -> AttentionCall:
    """The call as the C++ op takes it: float32 operands (views where they already are),
    packed sequences as [1, H, T, D] views, contiguous float32 sinks and rotary tables."""
    packed = _packed_as_bhnd if call.varlen else (lambda t: t)
    return call.replace(
        q=_f32(packed(call.q)),
        k=_f32(packed(call.k)),
        v=_f32(packed(call.v)),
        rk=_f32(call.rk),
        rv=_f32(call.rv),
        sinks=None if call.sinks is None else call.sinks.float().contiguous(),
        rope_cos=None if call.rope_cos is None else call.rope_cos.float().contiguous(),
        rope_sin=None if call.rope_sin is None else call.rope_sin.float().contiguous(),
    )


def _buffer32(t: Tensor) -> Tensor:
    """t itself when float32, else a float32 buffer of its shape and memory order
    ([B, H, N, D] in [B, N, H, D] order; packed [T, H, D] as it is)."""
    if t.dtype == torch.float32:
        return t
    if t.dim() == 4:
        B, H, N, D = t.shape
        return torch.empty(B, N, H, D, dtype=torch.float32, device=t.device).transpose(1, 2)
    return torch.empty(t.shape, dtype=torch.float32, device=t.device)


def _small32(g: Tensor | None) -> Tensor | None:
    """A float32 contiguous buffer for drk, drv or dsinks (itself when it already is one)."""
    return g if g is None or (g.dtype == torch.float32 and g.is_contiguous()) else torch.empty(g.shape)


def _packed_as_bhnd(t: Tensor) -> Tensor:
    """[T, H, D] packed sequences as the [1, H, T, D] view the C++ kernel reads."""
    return t.permute(1, 0, 2).unsqueeze(0)


def attention_fwd_cpu(call: AttentionCall, outputs: AttentionOutputs) -> None:
    """Fills out, lse and, with return_stats, the statistics (shapes: :class:`AttentionOutputs`)."""
    o32 = _buffer32(outputs.out)
    view = _packed_as_bhnd if call.varlen else (lambda t: t)
    torch.ops.dsr_kernels.attention_fwd_cpu(*_kernel_call(call).as_args(), view(o32), *outputs[1:])
    if o32 is not outputs.out:
        outputs.out.copy_(o32)


def attention_bwd_cpu(
    call: AttentionCall,
    dout: Tensor,
    out: Tensor,
    lse: Tensor,
    grads: AttentionGrads,
    *,
    key_mass: Tensor | None = None,
) -> None:
    """Fills dq, dk, dv and, when given, drk, drv (rk's, rv's shapes), dsinks ([H]) and
    key_mass (float32 [B | S, H, R + Nk]: the column sums of the recomputed probabilities)."""
    view = _packed_as_bhnd if call.varlen else (lambda t: t)
    big = [_buffer32(g) for g in grads[:3]]
    small = [_small32(g) for g in grads[3:]]
    torch.ops.dsr_kernels.attention_bwd_cpu(
        _f32(view(dout)),
        _f32(view(out)),
        lse.float(),
        *_kernel_call(call).as_args(),
        *(view(g) for g in big),
        *small,
        key_mass,
    )
    for dst, src in zip(grads, (*big, *small), strict=True):
        if src is not None and src is not dst:
            dst.copy_(src)
