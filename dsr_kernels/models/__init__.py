"""Reference diffusion transformers on the fused ops, with DSR's diffusion registers.

model = dsr_kernels.models.create_model("LightningDiT-XL/1", num_registers=36)
dsr_kernels.flops(model)   # FlopCount(flops, macs, by_block)
"""

from dsr_kernels.models.dit import DiT, SiT
from dsr_kernels.models.flops import FlopCount, flops
from dsr_kernels.models.jit import JiT
from dsr_kernels.models.lightningdit import DiTDH, LightningDiT
from dsr_kernels.models.registry import create_model, list_models

__all__ = ["DiT", "DiTDH", "FlopCount", "JiT", "LightningDiT", "SiT", "create_model", "flops", "list_models"]
