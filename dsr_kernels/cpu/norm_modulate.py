"""Backends ``"cpu"`` and ``"cuda"`` of norm_modulate: the compiled op of csrc/norm_modulate.cpp.

``dsr_kernels::norm_modulate_fwd`` / ``_bwd`` is one op with a CPU, a CUDA (when built) and
a Meta kernel; the dispatcher picks csrc/cpu/norm_modulate.cpp or csrc/cuda/norm_modulate.cu
by the tensors' device. From Python both backends are the same call, so both declare
themselves and launch here (a ``dsr_kernels/cuda/`` package would repeat this file).

The op allocates its outputs itself, in float32 statistics (float64 for float64 inputs),
with empty ``[0]`` tensors for the outputs not asked for; ``dsr_kernels.ops.norm_modulate``
registers its autograd formula.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dsr_kernels._extension import extension_unavailable_reason
from dsr_kernels.types import FLOATS, Backend

BACKEND = Backend("cpu", ("cpu",), FLOATS, extension_unavailable_reason)
CUDA_BACKEND = Backend("cuda", ("cuda",), FLOATS, extension_unavailable_reason)


def norm_modulate_fwd_compiled(*args: object) -> tuple[Tensor, ...]:
    """``torch.ops.dsr_kernels.norm_modulate_fwd`` on its schema's arguments (x, shift, scale,
    weight, bias, registers, kind, eps, return_norms, return_moments): (out, residual, norms,
    moments, mean, rstd), empty ``[0]`` for the outputs not asked for."""
    return torch.ops.dsr_kernels.norm_modulate_fwd(*args)


def norm_modulate_bwd_compiled(*args: object) -> tuple[Tensor, ...]:
    """``torch.ops.dsr_kernels.norm_modulate_bwd`` on its schema's arguments (dout, dresidual, x,
    shift, scale, weight, bias, registers, mean, rstd, kind): (dx, dshift, dscale, dweight,
    dbias, dregisters), empty ``[0]`` for the inputs that are None."""
    return torch.ops.dsr_kernels.norm_modulate_bwd(*args)
