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

from dsr_kernels._extension import extension_unavailable_reason


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


# norm_modulate and ttr_activation: compiled CPU / CUDA kernels, Triton kernels, a reference.
COMPILED_OP_BACKENDS = ("cuda", "cpu", "triton", "reference")
_HALF_AND_FLOAT = (torch.float16, torch.bfloat16, torch.float32)


def compiled_op_unavailable_reason(backend: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """None if ``backend`` (one of COMPILED_OP_BACKENDS) can run tensors of this device and dtype, else why not."""
    if backend == "reference":
        return None
    if backend == "triton":
        reason = triton_unavailable_reason(device)
        if reason is None and dtype not in _HALF_AND_FLOAT:
            reason = f"the Triton kernels take float16, bfloat16 or float32, not {dtype}"
        return reason
    if backend in ("cpu", "cuda"):
        if device.type != backend:
            return f"backend {backend!r} runs {backend} tensors, not {device.type} ones"
        return extension_unavailable_reason(device)
    return f"unknown backend {backend!r}; expected one of {('auto',) + COMPILED_OP_BACKENDS}"


def resolve_compiled_op_backend(op: str, backend: str, x: torch.Tensor) -> str:
    """``auto``: the compiled kernels for x's device when built, else Triton on CUDA, else "reference";
    an explicit backend that cannot run x raises :class:`BackendUnavailable` with the reason."""
    if backend == "auto":
        for candidate in {"cuda": ("cuda", "triton"), "cpu": ("cpu",)}.get(x.device.type, ()):
            if compiled_op_unavailable_reason(candidate, x.device, x.dtype) is None:
                return candidate
        return "reference"
    reason = compiled_op_unavailable_reason(backend, x.device, x.dtype)
    if reason is not None:
        raise BackendUnavailable(f"{op}(backend={backend!r}) cannot run tensors on {x.device}: {reason}")
    return backend


def explain_compiled_op(device: torch.device, dtype: torch.dtype = torch.float32) -> dict[str, str]:
    """Each of COMPILED_OP_BACKENDS mapped to "available" or the reason it cannot run on ``device``."""
    return {b: compiled_op_unavailable_reason(b, device, dtype) or "available" for b in COMPILED_OP_BACKENDS}


def explain_attention(device: torch.device) -> dict[str, str]:
    """Each of ATTENTION_BACKENDS mapped to "available" or the reason it cannot run on ``device``."""
    return {name: attention_unavailable_reason(name, device) or "available" for name in ATTENTION_BACKENDS}


# Every op that chooses a backend, with the function that explains its backends on a device.
_EXPLAIN = {"attention": explain_attention, "norm_modulate": explain_compiled_op, "ttr_activation": explain_compiled_op}
OPS = tuple(_EXPLAIN)


def explain(op: str = "attention", device: str | torch.device = "cpu") -> dict[str, str]:
    """Each backend of ``op`` (one of OPS) on ``device`` mapped to "available" or the reason it is not."""
    if op not in _EXPLAIN:
        raise ValueError(f"explain(): unknown op {op!r}; expected one of {', '.join(map(repr, OPS))}")
    return _EXPLAIN[op](torch.device(device))
