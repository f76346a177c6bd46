"""``create_model(name, **overrides)``: the reference models by their published names."""

from __future__ import annotations

from torch import nn

from dsr_kernels.models.dit import DiT, SiT
from dsr_kernels.models.jit import JiT
from dsr_kernels.models.lightningdit import DiTDH, LightningDiT

# (depth, hidden_size, num_heads)
_DIT_SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
# JiT: (depth, hidden, heads, bottleneck, in_context_start)
_JIT_SIZES = {"B": (12, 768, 12, 128, 4), "L": (24, 1024, 16, 128, 8), "H": (32, 1280, 16, 256, 10)}
# DiT^DH: encoder and head (hidden, depth, heads)
_DITDH_SIZES = {"S": ((384, 2048), (12, 2), (6, 16)), "XL": ((1152, 2048), (28, 2), (16, 16))}


def _registry() -> dict[str, tuple[type, dict]]:
    reg: dict[str, tuple[type, dict]] = {}
    for size, (depth, hidden, heads) in _DIT_SIZES.items():
        for patch in (2, 4, 8):
            cfg = dict(depth=depth, hidden_size=hidden, num_heads=heads, patch_size=patch)
            reg[f"DiT-{size}/{patch}"] = (DiT, cfg)
            reg[f"SiT-{size}/{patch}"] = (SiT, cfg)
        reg[f"LightningDiT-{size}/1"] = (LightningDiT, dict(depth=depth, hidden_size=hidden, num_heads=heads))
    for size, (hidden, depth, heads) in _DITDH_SIZES.items():
        reg[f"DiTDH-{size}/1"] = (DiTDH, dict(hidden_size=hidden, depth=depth, num_heads=heads))
    for size, (depth, hidden, heads, bottleneck, start) in _JIT_SIZES.items():
        base = dict(depth=depth, hidden_size=hidden, num_heads=heads, bottleneck_dim=bottleneck, in_context_start=start)
        reg[f"JiT-{size}/16"] = (JiT, dict(base, patch_size=16, input_size=256))
        reg[f"JiT-{size}/32"] = (JiT, dict(base, patch_size=32, input_size=512))
    return reg


MODELS = _registry()


def list_models() -> list[str]:
    return sorted(MODELS)


def create_model(name: str, **overrides) -> nn.Module:
    """Builds a model by name ("DiT-XL/2", "SiT-B/2", "LightningDiT-XL/1", "DiTDH-XL/1", "JiT-H/16", ...).

    ``overrides`` replace any constructor argument (input_size, in_channels, hidden_size,
    depth, num_heads, num_classes, learn_sigma, num_registers, register_start, backend, ...).
    With registers and no register_start, DSR's choice is used: block 8 for models of 24
    blocks or more (L, XL), block 4 otherwise (S, B).
    """
    if name not in MODELS:
        raise ValueError(f"create_model(): unknown model name {name!r}; known: {', '.join(list_models())}")
    cls, cfg = MODELS[name]
    cfg = {**cfg, **overrides}
    if cfg.get("num_registers") and "register_start" not in overrides:
        depth = cfg["depth"][0] if isinstance(cfg["depth"], (tuple, list)) else cfg["depth"]
        cfg["register_start"] = 8 if depth >= 24 else 4
    try:
        return cls(**cfg)
    except TypeError as exc:  # an override the model does not take
        raise ValueError(f"create_model({name!r}): {exc}") from None
