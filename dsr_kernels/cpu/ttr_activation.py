"""Backends ``"cpu"`` and ``"cuda"`` of ttr_activation: the compiled op of csrc/ttr_activation.cpp.

``dsr_kernels::ttr_activation_fwd`` is one op with a CPU, a CUDA (when built) and a Meta
kernel; the dispatcher picks csrc/cpu/ttr_activation.cpp or csrc/cuda/ttr_activation.cu by
h's device. From Python both backends are the same call, so both declare themselves and
launch here (a ``dsr_kernels/cuda/`` package would repeat this file).

The op checks the neurons on the host before any launch and copies them to the device
asynchronously: pass them on the CPU and no call waits for the device. Its backward is
:func:`dsr_kernels.reference.ttr_activation.ttr_activation_backward` (PyTorch ops on the
selected columns), registered by ``dsr_kernels.ops.ttr_activation``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dsr_kernels._extension import extension_unavailable_reason
from dsr_kernels.types import FLOATS, Backend

BACKEND = Backend("cpu", ("cpu",), FLOATS, extension_unavailable_reason)
CUDA_BACKEND = Backend("cuda", ("cuda",), FLOATS, extension_unavailable_reason)


def ttr_activation_fwd_compiled(*args: object) -> Tensor:
    """``torch.ops.dsr_kernels.ttr_activation_fwd`` on its schema's arguments (h, neurons,
    num_registers, num_prefix_tokens, patch_values, register_value, tanh): [B, T, F] in h's
    dtype, contiguous."""
    return torch.ops.dsr_kernels.ttr_activation_fwd(*args)
