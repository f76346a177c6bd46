"""DiT (Peebles & Xie, 2023) and SiT (Ma et al., 2024) on the fused ops, with diffusion registers.

Parameter names and initialisation follow facebookresearch/DiT's models.py, so its
released checkpoints load with ``strict=True``; SiT is the same network (willisma/SiT)
whose forward returns only the first ``in_channels`` channels when ``learn_sigma``.

With ``num_registers = R > 0`` (DSR's generator stage), R learned tokens plus a frozen
sin-cos embedding on a sqrt(R) x sqrt(R) grid are prepended at block ``register_start``
(by that block's fused norm pass) and dropped before the final layer. R = 0 is exactly
the baseline model (no extra parameters).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dsr_kernels.models.common import check_input, check_registers, make_register_params
from dsr_kernels.models.flops import block_macs, mlp_macs
from dsr_kernels.models.layers import (
    Block,
    FinalLayer,
    LabelEmbedder,
    PatchEmbed,
    TimestepEmbedder,
    get_2d_sincos_pos_embed,
    init_adaln_zero,
    unpatchify,
)


class DiT(nn.Module):
    """Class-conditional DiT with adaLN-Zero blocks. forward(x [B, C, H, W], t [B], y [B]) -> [B, C_out, H, W]."""

    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        learn_sigma: bool = True,
        *,
        num_registers: int = 0,
        register_start: int = 0,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if mlp_ratio != 4.0:
            raise ValueError(f"DiT: mlp_ratio must be 4.0 (the released models), got {mlp_ratio}")
        if input_size % patch_size:
            raise ValueError(f"DiT: input_size={input_size} must be a multiple of patch_size={patch_size}")
        check_registers(num_registers, register_start, depth)
        self.input_size, self.patch_size, self.in_channels = input_size, patch_size, in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.learn_sigma, self.num_heads, self.hidden_size, self.depth = learn_sigma, num_heads, hidden_size, depth
        self.num_registers, self.register_start, self.backend = num_registers, register_start, backend

        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size, bias=True)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        num_patches = self.x_embedder.num_patches
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList(
            [Block(hidden_size, num_heads, mlp="gelu", norm="layernorm", backend=backend) for _ in range(depth)]
        )
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels, norm="layernorm", backend=backend)
        self.initialize_weights()
        make_register_params(self, num_registers, hidden_size)

    def initialize_weights(self) -> None:
        init_adaln_zero(self)
        pos = get_2d_sincos_pos_embed(self.pos_embed.shape[-1], int(self.x_embedder.num_patches**0.5))
        self.pos_embed.data.copy_(torch.from_numpy(pos).float().unsqueeze(0))
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)

    def macs_by_part(self) -> dict[str, int]:
        """Multiply-adds per sample of each part (see :mod:`dsr_kernels.models.flops`)."""
        D, N, p, C = self.hidden_size, self.x_embedder.num_patches, self.patch_size, self.in_channels
        parts = {"embed": N * C * p * p * D + 256 * D + D * D}  # patches, timestep MLP (256 frequencies)
        for i in range(self.depth):
            T = N + (self.num_registers if self.num_registers and i >= self.register_start else 0)
            parts[f"blocks.{i}"] = block_macs(T, D, mlp_macs(D, 4 * D), adaln=6 * D * D)
        parts["final"] = N * D * p * p * self.out_channels + 2 * D * D
        return parts

    def registers(self) -> Tensor | None:
        """The R register tokens as inserted, [R, D] (learned tokens + their position embedding)."""
        return (self.register_tokens + self.register_pos_embed)[0] if self.num_registers else None

    def forward(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        check_input(self, x, t, y, self.in_channels, self.input_size)
        x = self.x_embedder(x) + self.pos_embed  # [B, N, D]
        c = self.t_embedder(t) + self.y_embedder(y, self.training)  # [B, D]
        for i, block in enumerate(self.blocks):
            prefix = self.registers() if self.num_registers and i == self.register_start else None
            x = block(x, c, prefix=prefix)  # [B, N, D], or [B, R + N, D] from register_start on
        x = x[:, self.num_registers :]  # registers are dropped before the final layer
        x = self.final_layer(x, c)  # [B, N, p * p * C_out]
        return unpatchify(x, self.patch_size, self.out_channels)

    def forward_with_cfg(self, x: Tensor, t: Tensor, y: Tensor, cfg_scale: float) -> Tensor:
        """DiT's guided forward: x holds [cond ; uncond] halves; guidance on the first 3 channels (as released)."""
        half = x[: len(x) // 2]
        out = self.forward(torch.cat([half, half], dim=0), t, y)
        eps, rest = out[:, :3], out[:, 3:]
        cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
        half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
        return torch.cat([torch.cat([half_eps, half_eps], dim=0), rest], dim=1)


class SiT(DiT):
    """SiT: DiT's network trained with an interpolant objective; returns the first in_channels channels."""

    def initialize_weights(self) -> None:
        super().initialize_weights()
        nn.init.zeros_(self.x_embedder.proj.bias)

    def forward(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        out = super().forward(x, t, y)
        return out.chunk(2, dim=1)[0] if self.learn_sigma else out
