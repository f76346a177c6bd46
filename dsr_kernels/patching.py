"""``dsr_kernels.patch``: one entry point that puts the fused attention into a model, whatever built it."""

from __future__ import annotations

from typing import Any

from torch import nn

__all__ = ["patch"]


def _is_diffusers(obj: Any) -> bool:
    for cls in type(obj).__mro__:
        if cls.__module__.startswith("diffusers."):
            return True
    return False


def patch(obj: Any, *, num_kv_registers: int = 0, sinks: bool = False, backend: str = "auto") -> list[str]:
    """Puts :func:`dsr_kernels.attention` into ``obj``'s attention layers, in place (as Liger-Kernel's
    ``apply_liger_kernel_to_*``), and returns the names of the layers it changed.

    - a diffusers model or pipeline (its ``transformer`` / ``unet``):
      :func:`dsr_kernels.integrations.diffusers.patch` (an attention processor on every
      attention module);
    - a timm model, or any module with timm ``Attention`` modules, or this package's own
      models: :func:`dsr_kernels.integrations.timm.patch` (weight-sharing
      :class:`~dsr_kernels.RegisterAttention` modules).

    Args:
        num_kv_registers: learned key/value registers per head added to each attention
            layer (trainable; 0: none, and the outputs stay what they were).
        sinks: add a learned attention-sink logit per head (initialised to 0).
        backend: the backend of :func:`dsr_kernels.attention` the layers run.
    """
    if _is_diffusers(obj):
        from dsr_kernels.integrations import diffusers as integration
    elif isinstance(obj, nn.Module):
        from dsr_kernels.integrations import timm as integration
    else:
        raise TypeError(
            f"patch(): expected a torch.nn.Module (a timm, diffusers or dsr_kernels model) or a diffusers pipeline, "
            f"got {type(obj).__name__}"
        )
    return integration.patch(obj, num_kv_registers=num_kv_registers, sinks=sinks, backend=backend)
