"""Imports timm for the compatibility tests, or says why it cannot.

timm imports torchvision at import time (``timm.layers`` uses torchvision's
FrozenBatchNorm2d, ``timm.data`` its transforms), but its ViT models never call it. On
machines where torchvision cannot be installed beside the CPU build of torch (PyPI's
torchvision wheels need CUDA libraries), a minimal stand-in module is put in
``sys.modules`` before importing timm: just the names timm's imports reach, each raising
if anything tries to use it. A real torchvision, when importable, is always preferred.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types


class _Unavailable:
    def __init__(self, *args, **kwargs):
        raise RuntimeError("torchvision is not installed; this is the test suite's import-time stand-in")


class _StandIn(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return type(name, (_Unavailable,), {})


def _install_torchvision_stand_in() -> None:
    import enum

    names = [
        "torchvision",
        "torchvision.ops",
        "torchvision.ops.misc",
        "torchvision.transforms",
        "torchvision.transforms.functional",
        "torchvision.datasets",
        "torchvision.utils",
        "torchvision.models",
    ]
    modules = {name: _StandIn(name) for name in names}
    for name, module in modules.items():
        module.__path__ = []
        module.__stand_in__ = True
        if "." in name:
            parent, child = name.rsplit(".", 1)
            setattr(modules[parent], child, module)
    modules["torchvision"].__version__ = "0.0.0+stand-in"

    class InterpolationMode(enum.Enum):
        NEAREST = "nearest"
        NEAREST_EXACT = "nearest-exact"
        BILINEAR = "bilinear"
        BICUBIC = "bicubic"
        BOX = "box"
        HAMMING = "hamming"
        LANCZOS = "lanczos"

    modules["torchvision.transforms"].InterpolationMode = InterpolationMode
    modules["torchvision.transforms.functional"].InterpolationMode = InterpolationMode
    sys.modules.update(modules)
    # timm's FX helpers import torchvision.models.feature_extraction inside try/except: leave it missing.


def import_timm():
    """(timm, None) or (None, the reason it cannot be imported here)."""
    if importlib.util.find_spec("timm") is None:
        return None, "timm is not installed (.ci/run installs it: pip install --no-deps timm)"
    stand_in = False
    try:
        import torchvision  # noqa: F401
    except Exception:
        sys.modules.pop("torchvision", None)
        _install_torchvision_stand_in()
        stand_in = True
    try:
        return importlib.import_module("timm"), None
    except Exception as exc:  # pragma: no cover - a timm release with other needs
        return None, f"importing timm failed: {exc!r}"
    finally:
        if stand_in:  # timm holds what it took; others (diffusers) must see no torchvision, not a stand-in
            for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
                if getattr(sys.modules[name], "__stand_in__", False):
                    del sys.modules[name]
