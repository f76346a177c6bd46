"""The compiled extension ``dsr_kernels._C`` (csrc/), loaded once, with the reason when it is missing.

Importing it registers the ops ``torch.ops.dsr_kernels.norm_modulate_{fwd,bwd}`` with
their CPU, CUDA (when built) and Meta implementations. The package imports fine without
it; the compiled backends then report ``extension_unavailable_reason``.
"""

from __future__ import annotations

import torch

try:
    from dsr_kernels import _C  # noqa: F401

    _IMPORT_ERROR: str | None = None
except ImportError as exc:  # built with DSR_SKIP_BUILD=1, or not built for this torch
    _C = None
    _IMPORT_ERROR = (
        f"the compiled extension dsr_kernels._C is not importable ({exc}); reinstall with "
        "`pip install --no-build-isolation -e .` against the installed torch (DSR_SKIP_BUILD=1 skips it)"
    )


def extension_loaded() -> bool:
    return _C is not None


def extension_unavailable_reason(device: torch.device) -> str | None:
    """None if the compiled kernels run on ``device``, else why not."""
    if _C is None:
        return _IMPORT_ERROR
    if device.type == "cpu":
        return None
    if device.type == "cuda":
        if not _C.cuda_built():
            return "dsr_kernels._C was built without CUDA kernels (torch without CUDA or no nvcc at build time)"
        return None
    return f"the compiled kernels do not run on device type {device.type!r}"
