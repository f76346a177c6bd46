"""JiT (Li & He, "Back to Basics: Let Denoising Generative Models Denoise", 2025) with diffusion registers.

A plain transformer on raw pixel patches: bottleneck patch embedding (stride-p
convolution to a narrow width, then 1 x 1), RMSNorm with weight, QK-norm, SwiGLU, 2D
RoPE (EVA-style, in the attention kernel), and ``in_context_len`` class tokens (the
class embedding plus learned position embeddings) prepended from block
``in_context_start`` on. Names follow LTH14/JiT's model_jit.py (parameters under the
Denoiser's ``net.`` prefix in its checkpoints); its RoPE tables are not in the
checkpoint, so here they are non-persistent buffers.

Diffusion registers (``num_registers``, ``register_start``) are prepended the same way
as in the other models; in-context tokens and registers are both prefix tokens (no
RoPE) and are dropped before the final layer.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from dsr_kernels.models.common import Denoiser, DenoiserConfig, RopeTables, frozen_pos_embed
from dsr_kernels.models.flops import mlp_macs
from dsr_kernels.models.layers import (
    Block,
    BottleneckPatchEmbed,
    FinalLayer,
    LabelEmbedder,
    TimestepEmbedder,
    init_adaln_zero,
    swiglu_hidden,
    unpatchify,
)


class JiT(Denoiser):
    """forward(x [B, 3, H, W] noisy image, t [B] in [0, 1] (1 = clean), y [B]) -> the clean image.

    Keyword arguments: :class:`~dsr_kernels.models.common.DenoiserConfig`'s over ``defaults``
    (JiT-B/16 on 256 x 256 images), ``bottleneck_dim`` (the patch embedding's width), and
    ``in_context_len`` class tokens prepended from block ``in_context_start`` on.
    """

    defaults = DenoiserConfig(input_size=256, patch_size=16, in_channels=3, hidden_size=768, depth=12, num_heads=12)

    def __init__(
        self, *, bottleneck_dim: int = 128, in_context_len: int = 32, in_context_start: int = 4, **config: Any
    ) -> None:
        super().__init__(**config)
        cfg, D = self.config, self.hidden_size
        if in_context_len and not 0 <= in_context_start < cfg.depth:
            raise ValueError(f"JiT: in_context_start must be in [0, depth={cfg.depth}), got {in_context_start}")
        self.in_context_len, self.in_context_start = in_context_len, in_context_start

        self.t_embedder = TimestepEmbedder(D)
        self.y_embedder = LabelEmbedder(cfg.num_classes, D, cfg.class_dropout_prob)
        self.x_embedder = BottleneckPatchEmbed(cfg.input_size, cfg.patch_size, cfg.in_channels, bottleneck_dim, D)
        self.pos_embed = frozen_pos_embed(self.x_embedder.num_patches, D)
        if in_context_len:
            self.in_context_posemb = nn.Parameter(torch.zeros(1, in_context_len, D))
            nn.init.normal_(self.in_context_posemb, std=0.02)
        self.make_register_params(D)
        self.blocks = nn.ModuleList(
            [
                Block(D, cfg.num_heads, mlp="swiglu", norm="rmsnorm", qk_norm=True, backend=cfg.backend)
                for _ in range(cfg.depth)
            ]
        )
        self.final_layer = FinalLayer(D, cfg.patch_size, cfg.in_channels, norm="rmsnorm", backend=cfg.backend)
        # RoPE tables for every number of prefix tokens a block can see (identity rows first).
        grid, head_dim = cfg.input_size // cfg.patch_size, D // cfg.num_heads
        self._rope = nn.ModuleDict(
            {str(p): RopeTables(head_dim, grid, p, persistent=False) for p in sorted(set(self.prefix_counts()))}
        )
        init_adaln_zero(self)
        for conv in (self.x_embedder.proj1, self.x_embedder.proj2):
            nn.init.xavier_uniform_(conv.weight.data.view(conv.weight.shape[0], -1))

    def prefix_counts(self) -> list[int]:
        """Prefix tokens in front of the patches at each block: the class tokens, then the registers."""
        L, start = self.in_context_len, self.in_context_start
        return [(L if L and i >= start else 0) + n for i, n in enumerate(super().prefix_counts())]

    def macs_by_part(self) -> dict[str, int]:
        """Multiply-adds per sample of each part (see :mod:`dsr_kernels.models.flops`)."""
        D, N, p, C = self.hidden_size, self.x_embedder.num_patches, self.patch_size, self.in_channels
        bn = self.x_embedder.proj1.out_channels
        embed = N * C * p * p * bn + N * bn * D + 256 * D + D * D
        return {"embed": embed, **self.blocks_and_final_macs(mlp_macs(D, swiglu_hidden(D), gated=True))}

    def forward(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        self.check_input(x, t, y)
        B = x.shape[0]
        t_emb = self.t_embedder(t)
        y_emb = self.y_embedder(y, self.training)
        c = t_emb + y_emb
        x = self.x_embedder(x) + self.pos_embed  # [B, N, D]
        counts = self.prefix_counts()
        for i, block in enumerate(self.blocks):
            parts = []
            if self.num_registers and i == self.register_start:
                parts.append(self.registers().expand(B, -1, -1))
            if self.in_context_len and i == self.in_context_start:  # class tokens, in front of everything
                parts.insert(0, y_emb[:, None].expand(-1, self.in_context_len, -1) + self.in_context_posemb)
            prefix = torch.cat(parts, dim=1).to(x.dtype) if parts else None
            x = block(x, c, rope=self._rope[str(counts[i])].tables(), prefix=prefix, num_prefix_tokens=counts[i])
        x = self.final_layer(x[:, counts[-1] :], c)
        return unpatchify(x, self.patch_size, self.out_channels)
