"""dsr-kernels: fused register attention and outlier statistics for diffusion transformers."""

from dsr_kernels import distributed, models, outliers, quant, registers
from dsr_kernels.backends import BackendUnavailable, explain
from dsr_kernels.models.flops import FlopCount, flops
from dsr_kernels.modules.attention import RegisterAttention
from dsr_kernels.modules.norm_modulate import NormModulate
from dsr_kernels.ops.attention import attention
from dsr_kernels.ops.attention_dropin import (
    SDPAError,
    flash_attn_func,
    flash_attn_kvpacked_func,
    flash_attn_qkvpacked_func,
    flash_attn_varlen_func,
    flash_attn_varlen_kvpacked_func,
    flash_attn_varlen_qkvpacked_func,
    scaled_dot_product_attention,
)
from dsr_kernels.ops.attention_varlen import attention_varlen
from dsr_kernels.ops.norm_modulate import norm_modulate
from dsr_kernels.ops.ttr_activation import ttr_activation
from dsr_kernels.patching import patch
from dsr_kernels.types import AttentionStats, NormModulateResult

__version__ = "0.1.0"

__all__ = [
    "AttentionStats",
    "BackendUnavailable",
    "FlopCount",
    "NormModulate",
    "NormModulateResult",
    "RegisterAttention",
    "SDPAError",
    "attention",
    "attention_varlen",
    "distributed",
    "explain",
    "flash_attn_func",
    "flash_attn_kvpacked_func",
    "flash_attn_qkvpacked_func",
    "flash_attn_varlen_func",
    "flash_attn_varlen_kvpacked_func",
    "flash_attn_varlen_qkvpacked_func",
    "flops",
    "models",
    "norm_modulate",
    "outliers",
    "patch",
    "quant",
    "registers",
    "scaled_dot_product_attention",
    "ttr_activation",
]
