"""``RegisterAttention``: timm's ViT ``Attention`` with learned kv registers and sinks."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dsr_kernels import outliers
from dsr_kernels.ops.attention import attention
from dsr_kernels.types import AttentionStats


class RegisterAttention(nn.Module):
    """Multi-head self-attention with timm's parameter names (``qkv``, ``proj``).

    A state dict of ``timm.models.vision_transformer.Attention`` (qkv_bias=True) loads
    with ``strict=True`` when ``num_kv_registers=0`` and ``sinks=False``. With
    ``num_kv_registers=R`` the module learns R key/value pairs per head
    (``register_k``, ``register_v``: [H, R, head_dim]) that every query may attend, so
    outlier attention has somewhere to go without adding tokens to the residual stream.
    With ``sinks=True`` it learns one sink logit per head (``sinks``: [H]).

    q, k and v are read in place from the qkv projection output and the attention
    output is written in the [B, N, H, head_dim] order the output projection consumes.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        num_kv_registers: int = 0,
        qkv_bias: bool = True,
        sinks: bool = False,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"RegisterAttention: dim={dim} must be divisible by num_heads={num_heads}")
        if num_kv_registers < 0:
            raise ValueError(f"RegisterAttention: num_kv_registers must be >= 0, got {num_kv_registers}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.backend = backend
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        if num_kv_registers:
            shape = (num_heads, num_kv_registers, self.head_dim)
            self.register_k = nn.Parameter(torch.empty(shape))
            self.register_v = nn.Parameter(torch.empty(shape))
        else:
            self.register_parameter("register_k", None)
            self.register_parameter("register_v", None)
        self.sinks = nn.Parameter(torch.zeros(num_heads)) if sinks else None
        self.reset_register_parameters()

    def reset_register_parameters(self) -> None:
        if self.register_k is not None:
            nn.init.trunc_normal_(self.register_k, std=0.02)
            nn.init.trunc_normal_(self.register_v, std=0.02)
        if self.sinks is not None:
            nn.init.zeros_(self.sinks)

    @property
    def num_kv_registers(self) -> int:
        return 0 if self.register_k is None else self.register_k.shape[1]

    def forward(
        self,
        x: Tensor,
        attn_mask: Tensor | None = None,
        *,
        key_mask: Tensor | None = None,
        num_prefix_tokens: int = 0,
        return_stats: bool = False,
    ) -> Tensor | tuple[Tensor, AttentionStats]:
        """x [B, N, C] -> [B, N, C] (and the attention statistics with return_stats).

        attn_mask: bool or additive float broadcastable to [B, H, N, N] (timm's argument);
        key_mask: [B, N] bool, True where a token may be attended.
        """
        B, N, C = x.shape
        qkv = self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim)
        q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))  # [B, H, N, hd] views
        kv_registers = None
        if self.register_k is not None:
            kv_registers = (self.register_k.to(q.dtype), self.register_v.to(q.dtype))
        recording = outliers.active_layer(self)
        want_stats = return_stats or recording is not None
        result = attention(
            q,
            k,
            v,
            kv_registers=kv_registers,
            sinks=self.sinks,
            key_mask=key_mask,
            attn_mask=attn_mask,
            num_prefix_tokens=num_prefix_tokens,
            scale=self.scale,
            return_stats=want_stats,
            backend=self.backend,
        )
        out, stats = result if want_stats else (result, None)
        if recording is not None:
            report, layer = recording
            report.record_attention(layer, stats, self.num_kv_registers)
        x = self.proj(out.transpose(1, 2).reshape(B, N, C))  # free when out is [B, N, H, hd] memory
        return (x, stats) if return_stats else x

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, num_kv_registers={self.num_kv_registers}, sinks={self.sinks is not None}"
