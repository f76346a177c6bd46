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

import torch
from torch import Tensor, nn

from dsr_kernels.models.common import RopeTables, check_input, check_registers, make_register_params
from dsr_kernels.models.flops import block_macs, mlp_macs
from dsr_kernels.models.layers import (
    Block,
    BottleneckPatchEmbed,
    FinalLayer,
    LabelEmbedder,
    TimestepEmbedder,
    get_2d_sincos_pos_embed,
    init_adaln_zero,
    swiglu_hidden,
    unpatchify,
)


class JiT(nn.Module):
    """forward(x [B, 3, H, W] noisy image, t [B] in [0, 1] (1 = clean), y [B]) -> the clean image."""

    def __init__(
        self,
        input_size: int = 256,
        patch_size: int = 16,
        in_channels: int = 3,
        hidden_size: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        bottleneck_dim: int = 128,
        in_context_len: int = 32,
        in_context_start: int = 4,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        *,
        num_registers: int = 0,
        register_start: int = 0,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if mlp_ratio != 4.0:
            raise ValueError(f"JiT: mlp_ratio must be 4.0, got {mlp_ratio}")
        if in_context_len and not 0 <= in_context_start < depth:
            raise ValueError(f"JiT: in_context_start must be in [0, depth={depth}), got {in_context_start}")
        check_registers(num_registers, register_start, depth)
        self.input_size, self.patch_size, self.in_channels = input_size, patch_size, in_channels
        self.out_channels, self.hidden_size, self.depth, self.num_heads = in_channels, hidden_size, depth, num_heads
        self.in_context_len, self.in_context_start = in_context_len, in_context_start
        self.num_registers, self.register_start, self.backend = num_registers, register_start, backend

        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        self.x_embedder = BottleneckPatchEmbed(input_size, patch_size, in_channels, bottleneck_dim, hidden_size)
        num_patches = self.x_embedder.num_patches
        pos = get_2d_sincos_pos_embed(hidden_size, int(num_patches**0.5))
        self.pos_embed = nn.Parameter(torch.from_numpy(pos).float().unsqueeze(0), requires_grad=False)
        if in_context_len:
            self.in_context_posemb = nn.Parameter(torch.zeros(1, in_context_len, hidden_size))
            nn.init.normal_(self.in_context_posemb, std=0.02)
        make_register_params(self, num_registers, hidden_size)
        self.blocks = nn.ModuleList(
            [
                Block(hidden_size, num_heads, mlp="swiglu", norm="rmsnorm", qk_norm=True, backend=backend)
                for _ in range(depth)
            ]
        )
        self.final_layer = FinalLayer(hidden_size, patch_size, in_channels, norm="rmsnorm", backend=backend)
        # RoPE tables for every number of prefix tokens a block can see (identity rows first).
        grid, head_dim = input_size // patch_size, hidden_size // num_heads
        self._rope = nn.ModuleDict(
            {str(p): RopeTables(head_dim, grid, p, persistent=False) for p in sorted(set(self._prefix_counts()))}
        )
        init_adaln_zero(self)
        for conv in (self.x_embedder.proj1, self.x_embedder.proj2):
            nn.init.xavier_uniform_(conv.weight.data.view(conv.weight.shape[0], -1))

    def _prefix_counts(self) -> list[int]:
        """Prefix tokens in front of the patches at each block."""
        counts = []
        for i in range(self.depth):
            n = self.in_context_len if self.in_context_len and i >= self.in_context_start else 0
            n += self.num_registers if self.num_registers and i >= self.register_start else 0
            counts.append(n)
        return counts

    def macs_by_part(self) -> dict[str, int]:
        """Multiply-adds per sample of each part (see :mod:`dsr_kernels.models.flops`)."""
        D, N, p, C = self.hidden_size, self.x_embedder.num_patches, self.patch_size, self.in_channels
        bn = self.x_embedder.proj1.out_channels
        parts = {"embed": N * C * p * p * bn + N * bn * D + 256 * D + D * D}
        mlp = mlp_macs(D, swiglu_hidden(D), gated=True)
        for i, extra in enumerate(self._prefix_counts()):
            parts[f"blocks.{i}"] = block_macs(N + extra, D, mlp, adaln=6 * D * D)
        parts["final"] = N * D * p * p * self.out_channels + 2 * D * D
        return parts

    def forward(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        check_input(self, x, t, y, self.in_channels, self.input_size)
        B = x.shape[0]
        t_emb = self.t_embedder(t)
        y_emb = self.y_embedder(y, self.training)
        c = t_emb + y_emb
        x = self.x_embedder(x) + self.pos_embed  # [B, N, D]
        counts = self._prefix_counts()
        for i, block in enumerate(self.blocks):
            parts = []
            if self.num_registers and i == self.register_start:
                parts.append((self.register_tokens + self.register_pos_embed).expand(B, -1, -1))
            if self.in_context_len and i == self.in_context_start:  # class tokens, in front of everything
                parts.insert(0, y_emb[:, None].expand(-1, self.in_context_len, -1) + self.in_context_posemb)
            prefix = torch.cat(parts, dim=1).to(x.dtype) if parts else None
            x = block(x, c, rope=self._rope[str(counts[i])].tables(), prefix=prefix, num_prefix_tokens=counts[i])
        x = self.final_layer(x[:, counts[-1] :], c)
        return unpatchify(x, self.patch_size, self.out_channels)
