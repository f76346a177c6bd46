"""The compiled extension ``dsr_kernels._C`` (csrc/), loaded once, with the reason when it is missing.

Importing it registers the compiled ops ``torch.ops.dsr_kernels.*`` (each op's C++ file
registers its own: csrc/norm_modulate.cpp, csrc/ttr_activation.cpp, csrc/cpu/attention.cpp)
with their CPU, CUDA (when built) and Meta implementations. The package imports fine
without it; the compiled backends (``dsr_kernels/cpu/<op>.py``) then report
:func:`extension_unavailable_reason`.
"""

from __future__ import annotations

import importlib.util
import os
from importlib.machinery import EXTENSION_SUFFIXES, ModuleSpec

import torch

_BUILD = "`pip install --no-build-isolation -e .` from the source checkout (it builds against the installed torch)"


def _unavailable_reason(spec: ModuleSpec | None, exc: BaseException) -> str:
    """Why ``from dsr_kernels import _C`` raised ``exc``, given ``importlib.util.find_spec("dsr_kernels._C")``.

    No compiled file (``spec`` is None or not an extension module): the extension is not
    built, and Python's own message (a "circular import" guess) would mislead. A file that
    exists but fails to load: its path and the loader's real error (an undefined symbol
    usually means it was built against another torch).
    """
    origin = getattr(spec, "origin", None) or ""
    if not origin.endswith(tuple(EXTENSION_SUFFIXES)):
        here = os.path.dirname(os.path.abspath(__file__))
        return (
            f"dsr_kernels._C is not importable: the compiled extension is not built (no dsr_kernels/_C*.so in "
            f"{here}: the package was installed with DSR_SKIP_BUILD=1, or its build failed); build it with {_BUILD}"
        )
    hint = ""
    if "undefined symbol" in str(exc):
        hint = f" (an undefined symbol: it was built against another torch than the installed {torch.__version__})"
    return (
        f"dsr_kernels._C is not importable: loading {origin} failed with {type(exc).__name__}: {exc}{hint}; "
        f"rebuild it with {_BUILD}"
    )


try:
    from dsr_kernels import _C  # noqa: F401

    _IMPORT_ERROR: str | None = None
except ImportError as exc:  # built with DSR_SKIP_BUILD=1, failed to build, or built for another torch
    _C = None
    try:
        _spec = importlib.util.find_spec("dsr_kernels._C")
    except (ImportError, ValueError):  # a broken finder, or a stub module in sys.modules
        _spec = None
    _IMPORT_ERROR = _unavailable_reason(_spec, exc)


def extension_loaded() -> bool:
    return _C is not None


def cpu_capability() -> str | None:
    """The instruction set the compiled CPU kernels picked at load ("avx512", "avx2", "default"),
    or None without the extension."""
    return _C.cpu_capability() if _C is not None else None


def extension_unavailable_reason(device: torch.device, dtype: torch.dtype | None = None) -> str | None:
    """None if the compiled kernels run on ``device``, else why not (a Backend's reason function:
    the dtypes a backend takes are in its declaration)."""
    if _C is None:
        return _IMPORT_ERROR
    if device.type == "cpu":
        return None
    if device.type == "cuda":
        if not _C.cuda_built():
            why = getattr(_C, "cuda_skip_reason", lambda: "")()  # setup.py's reason, compiled in
            why = why or "torch without CUDA or no nvcc at build time"
            return f"dsr_kernels._C was built without CUDA kernels ({why})"
        return None
    return f"the compiled kernels do not run on device type {device.type!r}"
