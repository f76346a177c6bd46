"""Reference fused norm + adaLN modulate + register insertion: the definition.

Differentiable with plain autograd; ``compute_dtype`` float64 is the test oracle, the
input dtype gives "eager PyTorch at that dtype" (the error baseline of the tests).
"""

from __future__ import annotations

import torch
from torch import Tensor

from dsr_kernels.types import FLOATS, Backend, NormModulateResult

BACKEND = Backend("reference", None, FLOATS)  # any device, any float dtype: the definition


def norm_modulate_ref(
    x: Tensor,
    shift: Tensor | None = None,
    scale: Tensor | None = None,
    *,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    kind: str = "layernorm",
    eps: float = 1e-6,
    registers: Tensor | None = None,
    return_norms: bool = False,
    compute_dtype: torch.dtype = torch.float64,
) -> NormModulateResult:
    """y = norm(h) * weight + bias; out = y * (1 + scale) + shift, over h = [registers ; x].

    Shapes: x [B, N, D]; shift, scale [B, D]; weight, bias [D]; registers [R, D] or
    [B, R, D] (R = 0 is the same as None: no residual). ``kind`` "layernorm":
    (h - mean) / sqrt(var + eps), biased variance; "rmsnorm": h / sqrt(mean(h^2) + eps).
    ``norms`` is ||h||_2 per token, before normalisation, float32.
    """
    B, N, D = x.shape
    cd = compute_dtype
    h = x
    residual = None
    if registers is not None and registers.shape[-2]:
        regs = registers.expand(B, -1, D) if registers.dim() == 2 else registers
        residual = torch.cat([regs.to(x.dtype), x], dim=1)  # [B, R + N, D]
        h = residual
    h_ = h.to(cd)
    if kind == "layernorm":
        mean = h_.mean(-1, keepdim=True)
        var = (h_ - mean).square().mean(-1, keepdim=True)
        y = (h_ - mean) * torch.rsqrt(var + eps)
    elif kind == "rmsnorm":
        y = h_ * torch.rsqrt(h_.square().mean(-1, keepdim=True) + eps)
    else:
        raise ValueError(f"norm_modulate_ref(): kind must be 'layernorm' or 'rmsnorm', got {kind!r}")
    if weight is not None:
        y = y * weight.to(cd)
    if bias is not None:
        y = y + bias.to(cd)
    if scale is not None:
        y = y * (1 + scale.to(cd)[:, None, :])
    if shift is not None:
        y = y + shift.to(cd)[:, None, :]
    norms = torch.linalg.vector_norm(h_.detach(), dim=-1).float() if return_norms else None
    return NormModulateResult(y.to(x.dtype), residual, norms)
