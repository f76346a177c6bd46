"""``create_model(name, **overrides)``: the reference models by their published names."""

from __future__ import annotations

from torch import nn

from dsr_kernels.models.dit import DiT, SiT
from dsr_kernels.models.jit import JiT
from dsr_kernels.models.lightningdit import DiTDH, LightningDiT
from dsr_kernels.models.video import Latte, VideoDenoiser, VideoDiT
from dsr_kernels.models.vit import VisionTransformer

# (depth, hidden_size, num_heads)
_DIT_SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
# JiT: (depth, hidden, heads, bottleneck, in_context_start)
_JIT_SIZES = {"B": (12, 768, 12, 128, 4), "L": (24, 1024, 16, 128, 8), "H": (32, 1280, 16, 256, 10)}
# DiT^DH: encoder and head (hidden, depth, heads)
_DITDH_SIZES = {"S": ((384, 2048), (12, 2), (6, 16)), "XL": ((1152, 2048), (28, 2), (16, 16))}
# ViT encoders, timm's names and configurations: (embed_dim, depth, num_heads, mlp_ratio)
_VIT_SIZES = {
    "small": (384, 12, 6, 4.0),
    "base": (768, 12, 12, 4.0),
    "large": (1024, 24, 16, 4.0),
    "so400m": (1152, 27, 16, 3.7362),
}
_DINOV2 = dict(img_size=518, patch_size=14, init_values=1e-5)
_SIGLIP = dict(class_token=False, global_pool="map")
# (size, patch, image size) of timm's SigLIP (and SigLIP2: the same architectures) encoders
_SIGLIP_MODELS = [
    ("base", 16, 224),
    ("base", 16, 256),
    ("base", 16, 384),
    ("base", 16, 512),
    ("large", 16, 256),
    ("large", 16, 384),
    ("so400m", 14, 224),
    ("so400m", 14, 378),
    ("so400m", 14, 384),
    ("so400m", 16, 256),
    ("so400m", 16, 384),
]


def _registry() -> dict[str, tuple[type, dict]]:
    reg: dict[str, tuple[type, dict]] = {}
    for size, (depth, hidden, heads) in _DIT_SIZES.items():
        for patch in (2, 4, 8):
            cfg = dict(depth=depth, hidden_size=hidden, num_heads=heads, patch_size=patch)
            reg[f"DiT-{size}/{patch}"] = (DiT, cfg)
            reg[f"SiT-{size}/{patch}"] = (SiT, cfg)
        reg[f"LightningDiT-{size}/1"] = (LightningDiT, dict(depth=depth, hidden_size=hidden, num_heads=heads))
        for patch in (1, 2):  # video: T latent frames of h x w patches
            cfg = dict(depth=depth, hidden_size=hidden, num_heads=heads, patch_size=patch)
            reg[f"Latte-{size}/{patch}"] = (Latte, cfg)
            reg[f"VideoDiT-{size}/{patch}"] = (VideoDiT, cfg)
    for size, (hidden, depth, heads) in _DITDH_SIZES.items():
        reg[f"DiTDH-{size}/1"] = (DiTDH, dict(hidden_size=hidden, depth=depth, num_heads=heads))
    for size, (depth, hidden, heads, bottleneck, start) in _JIT_SIZES.items():
        base = dict(depth=depth, hidden_size=hidden, num_heads=heads, bottleneck_dim=bottleneck, in_context_start=start)
        reg[f"JiT-{size}/16"] = (JiT, dict(base, patch_size=16, input_size=256))
        reg[f"JiT-{size}/32"] = (JiT, dict(base, patch_size=32, input_size=512))
    for size in ("small", "base", "large"):
        dim, depth, heads, ratio = _VIT_SIZES[size]
        shape = dict(embed_dim=dim, depth=depth, num_heads=heads, mlp_ratio=ratio)
        reg[f"vit_{size}_patch14_dinov2"] = (VisionTransformer, dict(_DINOV2, **shape))
        reg[f"vit_{size}_patch14_reg4_dinov2"] = (
            VisionTransformer,
            dict(_DINOV2, **shape, reg_tokens=4, no_embed_class=True),
        )
    for size, patch, img in _SIGLIP_MODELS:
        dim, depth, heads, ratio = _VIT_SIZES[size]
        cfg = dict(
            _SIGLIP, img_size=img, patch_size=patch, embed_dim=dim, depth=depth, num_heads=heads, mlp_ratio=ratio
        )
        reg[f"vit_{size}_patch{patch}_siglip_{img}"] = (VisionTransformer, cfg)
        if img == 224:  # global average pooling instead of the MAP head
            gap = dict(cfg, global_pool="avg", fc_norm=False)
            reg[f"vit_{size}_patch{patch}_siglip_gap_{img}"] = (VisionTransformer, gap)
    return reg


MODELS = _registry()


def list_models() -> list[str]:
    return sorted(MODELS)


def create_model(name: str, **overrides) -> nn.Module:
    """Builds a model by name: a denoiser ("DiT-XL/2", "SiT-B/2", "LightningDiT-XL/1",
    "DiTDH-XL/1", "JiT-H/16", ...), a video denoiser ("Latte-XL/2", "VideoDiT-XL/2";
    num_frames, register_placement, context_dim, ...) or a ViT encoder by timm's name
    ("vit_base_patch14_reg4_dinov2", "vit_base_patch16_siglip_256",
    "vit_so400m_patch14_siglip_224", ...).

    ``overrides`` replace any constructor argument (denoisers: input_size, in_channels,
    hidden_size, depth, num_heads, num_classes, learn_sigma, num_registers,
    register_start, backend, ...; encoders: img_size, patch_size, embed_dim, depth,
    num_heads, mlp_ratio, reg_tokens, class_token, global_pool, num_classes, act_layer,
    backend, ...).
    With registers and no register_start (video models: register_block), DSR's choice is
    used: block 8 for models of 24 blocks or more (L, XL), block 4 otherwise (S, B).
    """
    if name not in MODELS:
        raise ValueError(f"create_model(): unknown model name {name!r}; known: {', '.join(list_models())}")
    cls, cfg = MODELS[name]
    cfg = {**cfg, **overrides}
    start = "register_block" if issubclass(cls, VideoDenoiser) else "register_start"
    if cfg.get("num_registers") and start not in overrides:
        depth = cfg["depth"][0] if isinstance(cfg["depth"], (tuple, list)) else cfg["depth"]
        cfg[start] = 8 if depth >= 24 else 4
    try:
        return cls(**cfg)
    except TypeError as exc:  # an override the model does not take
        raise ValueError(f"create_model({name!r}): {exc}") from None
