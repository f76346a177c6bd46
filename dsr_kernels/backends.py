"""Which implementation runs an op, and why the others do not: one registry for every op.

Each implementation declares itself as a :class:`~dsr_kernels.types.Backend` (name,
devices, dtypes, ``unavailable_reason``) next to its code; :data:`BACKENDS` lists them per
op, in the order ``backend="auto"`` prefers them. Every op resolves ``backend`` with
:func:`resolve`: ``auto`` takes the first backend that may be picked on the tensor's
device and can run its dtype; an explicit name that cannot run the tensors raises
:class:`BackendUnavailable` with the reason and never falls back silently; an unknown name
raises ValueError listing the valid ones. :func:`explain` lists each backend with
"available" or the reason it is not.

Adding a backend: its implementation file (declaring ``BACKEND``) and its line in the table.
"""

from __future__ import annotations

import torch

from dsr_kernels import triton as _triton
from dsr_kernels.cpu import attention as _attention_cpu
from dsr_kernels.cpu import norm_modulate as _norm_modulate_cpu
from dsr_kernels.cpu import ttr_activation as _ttr_activation_cpu
from dsr_kernels.reference import attention as _attention_ref
from dsr_kernels.reference import norm_modulate as _norm_modulate_ref
from dsr_kernels.reference import ttr_activation as _ttr_activation_ref
from dsr_kernels.torch import attention as _attention_torch
from dsr_kernels.triton import triton_interpreting
from dsr_kernels.types import Backend

__all__ = [
    "BACKENDS",
    "OPS",
    "Backend",
    "BackendUnavailable",
    "check_name",
    "explain",
    "names",
    "resolve",
    "triton_interpreting",
]


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend cannot run these inputs; the message says why."""


# op -> its backends, in the order "auto" prefers them on every device (each backend's
# devices and auto_devices then leave out those that do not apply to a device).
BACKENDS: dict[str, tuple[Backend, ...]] = {
    "attention": (
        _triton.BACKEND,
        _attention_cpu.BACKEND,
        _attention_torch.BACKEND,
        _attention_ref.BACKEND,
    ),
    "norm_modulate": (
        _norm_modulate_cpu.CUDA_BACKEND,
        _norm_modulate_cpu.BACKEND,
        _triton.BACKEND,
        _norm_modulate_ref.BACKEND,
    ),
    "ttr_activation": (
        _ttr_activation_cpu.CUDA_BACKEND,
        _ttr_activation_cpu.BACKEND,
        _triton.BACKEND,
        _ttr_activation_ref.BACKEND,
    ),
}
OPS = tuple(BACKENDS)


def _backends(op: str, fn: str) -> tuple[Backend, ...]:
    if op not in BACKENDS:
        raise ValueError(f"{fn}(): unknown op {op!r}; expected one of {', '.join(map(repr, OPS))}")
    return BACKENDS[op]


def names(op: str) -> tuple[str, ...]:
    """The backend names of ``op``, in auto's order of preference."""
    return tuple(b.name for b in _backends(op, "names"))


def check_name(op: str, backend: object) -> None:
    """Raises ValueError, listing the valid names, unless ``backend`` is "auto" or a backend of ``op``."""
    valid = ("auto",) + names(op)
    if backend not in valid:
        raise ValueError(f"{op}(): argument 'backend' must be one of {valid}, got {backend!r}")


def resolve(op: str, backend: str, tensor: torch.Tensor, needs: tuple[str, ...] = ()) -> str:
    """The name of the backend of ``op`` that runs ``tensor`` (its device and dtype).

    ``auto``: the first backend of :data:`BACKENDS[op] <BACKENDS>` that auto may pick on
    the device, that can run it and that has the features in ``needs`` (names of
    :data:`dsr_kernels.types.FEATURES`). An explicit name that cannot run it raises
    :class:`BackendUnavailable` with the reason; an unknown name raises ValueError.
    """
    check_name(op, backend)
    device, dtype = tensor.device, tensor.dtype
    if backend == "auto":
        reasons = {}
        for b in BACKENDS[op]:
            if not b.picked_by_auto(device):
                reasons[b.name] = f"auto does not pick it for {device.type} tensors"
                continue
            reasons[b.name] = b.why_not(device, dtype) or b.missing(needs)
            if reasons[b.name] is None:
                return b.name
        why = "; ".join(f"{name}: {reason}" for name, reason in reasons.items())
        raise BackendUnavailable(f"{op}(): no backend runs {dtype} tensors on {device} ({why})")
    chosen = next(b for b in BACKENDS[op] if b.name == backend)
    reason = chosen.why_not(device, dtype)
    if reason is not None:
        raise BackendUnavailable(f"{op}(backend={backend!r}) cannot run {dtype} tensors on {device}: {reason}")
    reason = chosen.missing(needs)
    if reason is not None:
        raise BackendUnavailable(f"{op}(backend={backend!r}) cannot run this call: {reason}")
    return backend


def explain(
    op: str = "attention", device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> dict[str, str]:
    """Each backend of ``op`` (one of :data:`OPS`), in auto's order, mapped to "available" or the
    reason it cannot run ``dtype`` tensors on ``device``."""
    device = torch.device(device)
    return {b.name: b.why_not(device, dtype) or "available" for b in _backends(op, "explain")}
