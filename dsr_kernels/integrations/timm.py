"""Swap the attention of a built timm model (or of this package's own models) for the fused one.

:func:`patch` replaces every ``timm.layers.Attention`` of a model, in place, by a
:class:`~dsr_kernels.RegisterAttention` that shares its weights (the same Parameters,
not copies), so the outputs before and after the swap are the same function; optional
learned kv registers and attention sinks are added (new parameters, trainable). The
package's own ViTs and DiTs already use ``RegisterAttention``: :func:`patch` gives their
attention modules the registers, sinks and backend asked for.

timm is not imported here: modules are recognised by their class (``Attention`` defined
in a ``timm`` module), so this works with whatever timm built the model.
"""

from __future__ import annotations

import warnings

from torch import nn

from dsr_kernels.modules.attention import RegisterAttention

__all__ = ["is_timm_attention", "patch"]


def is_timm_attention(module: nn.Module) -> bool:
    """True for ``timm.layers.Attention`` (timm's ViT attention) and subclasses that keep its forward."""
    for cls in type(module).__mro__:
        if cls.__name__ == "Attention" and cls.__module__.startswith("timm."):
            return type(module).forward is cls.forward
    return False


def _set_child(model: nn.Module, name: str, child: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, child)


def patch(model: nn.Module, *, num_kv_registers: int = 0, sinks: bool = False, backend: str = "auto") -> list[str]:
    """Swaps, in place, every timm ``Attention`` of ``model`` for a weight-sharing RegisterAttention.

    Args:
        model: a built timm model (``timm.create_model(...)``), any module containing timm
            ``Attention`` modules, or one of this package's models.
        num_kv_registers: learned key/value registers per head to add to each attention
            (0: none; the swapped model then computes exactly what it did).
        sinks: add a learned attention-sink logit per head (initialised to 0).
        backend: the backend of :func:`dsr_kernels.attention` the modules run.

    Returns:
        The names of the attention modules swapped or given registers. Attention-like
        modules of other classes (e.g. timm's EVA or Swin attention) are left as they are,
        with a warning naming them; a model with no attention to patch raises ValueError.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"patch(): argument 'model' must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(num_kv_registers, bool) or not isinstance(num_kv_registers, int) or num_kv_registers < 0:
        raise ValueError(f"patch(): argument 'num_kv_registers' must be an int >= 0, got {num_kv_registers!r}")
    from dsr_kernels.backends import check_name

    check_name("attention", backend)
    patched, left = [], []
    for name, module in list(model.named_modules()):
        if isinstance(module, RegisterAttention):
            module.add_registers(num_kv_registers, sinks=sinks)
            module.backend = backend
            patched.append(name)
        elif is_timm_attention(module):
            new = RegisterAttention.from_timm(module, num_kv_registers=num_kv_registers, sinks=sinks, backend=backend)
            if name:
                _set_child(model, name, new)
            else:
                raise ValueError(
                    "patch(): the model is itself a timm Attention: use RegisterAttention.from_timm(model)"
                )
            patched.append(name)
        elif "attention" in type(module).__name__.lower() and not any(name.startswith(p + ".") for p in patched if p):
            left.append(f"{name} ({type(module).__name__})")
    if not patched:
        raise ValueError(
            f"patch(): found no timm Attention and no RegisterAttention in {type(model).__name__}"
            + (f"; attention modules of other classes: {', '.join(left)}" if left else "")
        )
    if left:
        warnings.warn(
            f"dsr_kernels patch(): left {len(left)} attention module(s) of other classes as they are: "
            + ", ".join(left[:8])
            + (" ..." if len(left) > 8 else ""),
            stacklevel=2,
        )
    return patched
