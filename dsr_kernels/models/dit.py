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

from typing import Any

import torch
from torch import Tensor, nn

from dsr_kernels.models.common import Denoiser, DenoiserConfig
from dsr_kernels.models.flops import mlp_macs
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


class DiT(Denoiser):
    """Class-conditional DiT with adaLN-Zero blocks. forward(x [B, C, H, W], t [B], y [B]) -> [B, C_out, H, W].

    Keyword arguments: :class:`~dsr_kernels.models.common.DenoiserConfig`'s over ``defaults``
    (DiT-XL/2 on 32 x 32 x 4 SD-VAE latents), and ``learn_sigma`` (output the variance too).
    """

    defaults = DenoiserConfig(input_size=32, patch_size=2, in_channels=4, hidden_size=1152, depth=28, num_heads=16)

    def __init__(self, *, learn_sigma: bool = True, **config: Any) -> None:
        super().__init__(learn_sigma=learn_sigma, **config)
        cfg, D = self.config, self.hidden_size
        self.x_embedder = PatchEmbed(cfg.input_size, cfg.patch_size, cfg.in_channels, D, bias=True)
        self.t_embedder = TimestepEmbedder(D)
        self.y_embedder = LabelEmbedder(cfg.num_classes, D, cfg.class_dropout_prob)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.x_embedder.num_patches, D), requires_grad=False)
        self.blocks = nn.ModuleList(
            [Block(D, cfg.num_heads, mlp="gelu", norm="layernorm", backend=cfg.backend) for _ in range(cfg.depth)]
        )
        self.final_layer = FinalLayer(D, cfg.patch_size, self.out_channels, norm="layernorm", backend=cfg.backend)
        self.initialize_weights()
        self.make_register_params(D)

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
        embed = N * C * p * p * D + 256 * D + D * D  # patches, timestep MLP (256 frequencies)
        return {"embed": embed, **self.blocks_and_final_macs(mlp_macs(D, 4 * D))}

    def forward(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        self.check_input(x, t, y)
        x = self.x_embedder(x) + self.pos_embed  # [B, N, D]
        c = self.t_embedder(t) + self.y_embedder(y, self.training)  # [B, D]
        for i, block in enumerate(self.blocks):
            prefix = self.registers() if self.num_registers and i == self.register_start else None
            # (the registers in the sequence count in the statistics' register share)
            in_sequence = self.num_registers if self.num_registers and i >= self.register_start else 0
            x = block(x, c, prefix=prefix, num_prefix_tokens=in_sequence)  # [B, N, D], or [B, R + N, D]
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
