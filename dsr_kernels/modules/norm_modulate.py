"""``NormModulate``: the norm + adaLN modulation that starts every DiT / LightningDiT block."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dsr_kernels import outliers
from dsr_kernels.ops.norm_modulate import KINDS, norm_modulate_with_moments
from dsr_kernels.types import NormModulateResult


class NormModulate(nn.Module):
    """LayerNorm / RMSNorm (optional affine) fused with ``* (1 + scale) + shift`` and registers.

    ``NormModulate(1152)`` is DiT's ``LayerNorm(1152, elementwise_affine=False, eps=1e-6)``
    followed by ``modulate``; ``NormModulate(1152, kind="rmsnorm", elementwise_affine=True)``
    is LightningDiT's RMSNorm with weight. The parameter is named ``weight`` (and ``bias``)
    as in ``nn.LayerNorm``, so those state dicts load.

    Inside :func:`dsr_kernels.outliers.collect` it reports the token norms, max |x| and
    sum x^4 of its input, which its kernel computes in the same pass (``record=False``
    keeps a second norm of the same block, e.g. the one before the MLP, out of the
    layer's record).
    """

    def __init__(
        self,
        dim: int,
        *,
        kind: str = "layernorm",
        eps: float = 1e-6,
        elementwise_affine: bool = False,
        bias: bool = False,
        backend: str = "auto",
        record: bool = True,
    ) -> None:
        super().__init__()
        self.record = record
        if kind not in KINDS:
            raise ValueError(f"NormModulate: kind must be one of {KINDS}, got {kind!r}")
        self.dim, self.kind, self.eps, self.backend = dim, kind, eps, backend
        self.weight = nn.Parameter(torch.ones(dim)) if elementwise_affine else None
        self.bias = nn.Parameter(torch.zeros(dim)) if elementwise_affine and bias else None

    def forward(
        self,
        x: Tensor,
        shift: Tensor | None = None,
        scale: Tensor | None = None,
        *,
        registers: Tensor | None = None,
        return_norms: bool = False,
    ) -> NormModulateResult:
        """x [B, N, D]; shift, scale [B, D]; registers [R, D] or [B, R, D] (see norm_modulate)."""
        recording = outliers.active_layer(self) if self.record else None
        weight = None if self.weight is None else self.weight.to(x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        result, moments = norm_modulate_with_moments(
            x,
            shift,
            scale,
            weight=weight,
            bias=bias,
            kind=self.kind,
            eps=self.eps,
            registers=registers,
            return_norms=return_norms or recording is not None,
            return_moments=recording is not None,
            backend=self.backend,
        )
        if recording is not None:
            report, layer = recording
            h = result.residual if result.residual is not None else x
            report.record_norms(layer, result.norms, moments, h)
            if not return_norms:
                result = result._replace(norms=None)
        return result

    def extra_repr(self) -> str:
        return f"{self.dim}, kind={self.kind}, eps={self.eps}, elementwise_affine={self.weight is not None}"
