"""Reference models on the fused ops: diffusion transformers with DSR's diffusion registers,
and the ViT encoders (DINOv2, SigLIP / SigLIP2) that test-time registers apply to.

model = dsr_kernels.models.create_model("LightningDiT-XL/1", num_registers=36)
video = dsr_kernels.models.create_model("Latte-XL/2", num_registers=16, register_placement="per_frame")
encoder = dsr_kernels.models.create_model("vit_so400m_patch14_siglip_224")
dsr_kernels.flops(model)   # FlopCount(flops, macs, by_block)
"""

from dsr_kernels.models.dit import DiT, SiT
from dsr_kernels.models.flops import FlopCount, flops
from dsr_kernels.models.jit import JiT
from dsr_kernels.models.lightningdit import DiTDH, LightningDiT
from dsr_kernels.models.registry import create_model, list_models
from dsr_kernels.models.video import Latte, VIDEO_16x32x32, VideoDiT, VideoDiTConfig
from dsr_kernels.models.vit import RAEEncoder, VisionTransformer

__all__ = [
    "DiT",
    "DiTDH",
    "FlopCount",
    "JiT",
    "Latte",
    "LightningDiT",
    "RAEEncoder",
    "SiT",
    "VIDEO_16x32x32",
    "VideoDiT",
    "VideoDiTConfig",
    "VisionTransformer",
    "create_model",
    "flops",
    "list_models",
]
