"""Backend ``"triton"``: Triton kernels of every op, one module per op (``triton/<op>.py``).

The backend declares itself here rather than in those modules: they import triton, which
must happen only when a kernel first runs (``TRITON_INTERPRET=1`` has to be set before
that import, and ``import dsr_kernels`` stays fast). This file imports triton only to check
the install, and only for a device its kernels would then run on.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

from dsr_kernels.types import HALF_AND_FLOAT, Backend


def triton_interpreting() -> bool:
    """True when Triton kernels run on the CPU through ``TRITON_INTERPRET=1``."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


@functools.cache
def _triton_import_error() -> str | None:
    try:
        import triton  # noqa: F401
    except Exception as exc:  # pragma: no cover - broken installs only
        return f"importing triton failed: {exc!r}"
    return None


def triton_unavailable_reason(device: torch.device, dtype: torch.dtype | None = None) -> str | None:
    """None if Triton kernels can run on tensors of ``device``, else the reason.

    triton is imported (to catch a broken install) only where its kernels would run: an
    import while TRITON_INTERPRET is off fixes triton's own jit functions in compiled mode,
    and the interpreter then fails on them (explain("attention", "cpu") must not do that).
    """
    if not _triton_installed():
        return "the triton package is not installed (pip install triton)"
    if device.type == "cuda":
        if triton_interpreting():
            return "TRITON_INTERPRET=1 is set, so Triton runs on the CPU; it cannot take CUDA tensors"
    elif device.type == "cpu":
        if not triton_interpreting():
            return (
                "Triton needs CUDA tensors; on the CPU it runs only in its interpreter, "
                "with TRITON_INTERPRET=1 set before triton is imported"
            )
    else:
        return f"Triton kernels do not run on device type {device.type!r}"
    return _triton_import_error()


# The same for every op: the kernels of attention, norm_modulate and ttr_activation take the
# same devices and dtypes. CPU tensors only through the interpreter, so "auto" never picks it there.
BACKEND = Backend("triton", ("cuda", "cpu"), HALF_AND_FLOAT, triton_unavailable_reason, auto_devices=("cuda",))
