"""Which implementation runs an op, and why the others do not.

Every op accepts ``backend="auto" | <name>``. ``auto`` picks the best available one for
the inputs; an explicit name that cannot run them raises :class:`BackendUnavailable`
with the reason and never falls back silently. ``explain(op, device)`` lists each
backend with the reason it is or is not available.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend cannot run these inputs; the message says why."""


def triton_interpreting() -> bool:
    """True when Triton kernels run on the CPU through ``TRITON_INTERPRET=1``."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def _triton_import_error() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "the triton package is not installed (pip install triton)"
    try:
        import triton  # noqa: F401
    except Exception as exc:  # pragma: no cover - broken installs only
        return f"importing triton failed: {exc!r}"
    return None


def triton_unavailable_reason(device: torch.device) -> str | None:
    """None if Triton kernels can run on tensors of ``device``, else the reason."""
    err = _triton_import_error()
    if err is not None:
        return err
    if device.type == "cuda":
        if triton_interpreting():
            return "TRITON_INTERPRET=1 is set, so Triton runs on the CPU; it cannot take CUDA tensors"
        return None
    if device.type == "cpu":
        if triton_interpreting():
            return None
        return (
            "Triton needs CUDA tensors; on the CPU it runs only in its interpreter, "
            "with TRITON_INTERPRET=1 set before triton is imported"
        )
    return f"Triton kernels do not run on device type {device.type!r}"


ATTENTION_BACKENDS = ("triton", "torch", "reference")


def attention_unavailable_reason(backend: str, device: torch.device) -> str | None:
    if backend == "triton":
        return triton_unavailable_reason(device)
    if backend in ("torch", "reference"):
        return None
    return f"unknown backend {backend!r}; expected one of {('auto',) + ATTENTION_BACKENDS}"


def explain(op: str = "attention", device: str | torch.device = "cpu") -> dict[str, str]:
    """Each backend of ``op`` on ``device`` mapped to "available" or the reason it is not."""
    device = torch.device(device)
    if op == "attention":
        return {name: attention_unavailable_reason(name, device) or "available" for name in ATTENTION_BACKENDS}
    if op == "norm_modulate":
        from dsr_kernels.ops.norm_modulate import explain_norm_modulate

        return explain_norm_modulate(device)
    if op == "ttr_activation":
        from dsr_kernels.ops.ttr_activation import explain_ttr_activation

        return explain_ttr_activation(device)
    raise ValueError(f"explain(): unknown op {op!r}; expected 'attention', 'norm_modulate' or 'ttr_activation'")
