"""LightningDiT and DiT^DH as used by RAE and the DSR release, with DSR's diffusion registers.

LightningDiT (stage 2 of RAE / DSR): patch-1 embedding of 16 x 16 RAE latents (768
channels), RMSNorm with weight, SwiGLU with hidden int(2/3 * 4 D), qkv bias, EVA-style
2D RoPE on interleaved pairs (inside the attention kernel), Gaussian-Fourier timestep
embedding, adaLN-Zero with 6 chunks. Parameter and buffer names follow
a-little-hoof/DSR src/stage2/models/lightningDiT.py and DDT.py, so its checkpoints load
with ``strict=True`` (the RoPE tables are persistent buffers there: ``feat_rope`` and,
with registers, ``feat_rope_incontext`` whose first R rows leave the registers unrotated).

DiT^DH (``DiTDH``): a LightningDiT encoder followed by a wide "DDT head": the encoder
output s (registers kept) is projected to the head width and conditions the head's
blocks and final layer per token; the head embeds x again without position embedding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dsr_kernels.models.common import RopeTables, check_input, check_registers, make_register_params
from dsr_kernels.models.flops import block_macs, mlp_macs
from dsr_kernels.models.layers import (
    Block,
    FinalLayer,
    GaussianFourierEmbedder,
    LabelEmbedder,
    PatchEmbed,
    get_2d_sincos_pos_embed,
    init_adaln_zero,
    swiglu_hidden,
    unpatchify,
)


def _pos_embed(num_patches: int, dim: int) -> nn.Parameter:
    pos = get_2d_sincos_pos_embed(dim, int(num_patches**0.5))
    return nn.Parameter(torch.from_numpy(pos).float().unsqueeze(0), requires_grad=False)


class LightningDiT(nn.Module):
    """forward(x [B, C, H, W], t [B] in [0, 1], y [B]) -> [B, C, H, W] (data prediction in DSR)."""

    def __init__(
        self,
        input_size: int = 16,
        patch_size: int = 1,
        in_channels: int = 768,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        learn_sigma: bool = False,
        use_qknorm: bool = False,
        *,
        num_registers: int = 0,
        register_start: int = 0,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if mlp_ratio != 4.0:
            raise ValueError(f"LightningDiT: mlp_ratio must be 4.0, got {mlp_ratio}")
        check_registers(num_registers, register_start, depth)
        self.input_size, self.patch_size, self.in_channels = input_size, patch_size, in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.learn_sigma, self.num_heads, self.hidden_size, self.depth = learn_sigma, num_heads, hidden_size, depth
        self.num_registers, self.register_start, self.backend = num_registers, register_start, backend

        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size, bias=True)
        self.t_embedder = GaussianFourierEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        num_patches = self.x_embedder.num_patches
        self.pos_embed = _pos_embed(num_patches, hidden_size)
        make_register_params(self, num_registers, hidden_size)
        grid, head_dim = input_size // patch_size, hidden_size // num_heads
        self.feat_rope = RopeTables(head_dim, grid)
        if num_registers:
            self.feat_rope_incontext = RopeTables(head_dim, grid, num_registers)
        self.blocks = nn.ModuleList(
            [
                Block(hidden_size, num_heads, mlp="swiglu", norm="rmsnorm", qk_norm=use_qknorm, backend=backend)
                for _ in range(depth)
            ]
        )
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels, norm="rmsnorm", backend=backend)
        init_adaln_zero(self)

    def macs_by_part(self) -> dict[str, int]:
        """Multiply-adds per sample of each part (see :mod:`dsr_kernels.models.flops`)."""
        D, N, p, C = self.hidden_size, self.x_embedder.num_patches, self.patch_size, self.in_channels
        parts = {"embed": N * C * p * p * D + 2 * self.t_embedder.W.numel() * D + D * D}
        mlp = mlp_macs(D, swiglu_hidden(D), gated=True)
        for i in range(self.depth):
            T = N + (self.num_registers if self.num_registers and i >= self.register_start else 0)
            parts[f"blocks.{i}"] = block_macs(T, D, mlp, adaln=6 * D * D)
        parts["final"] = N * D * p * p * self.out_channels + 2 * D * D
        return parts

    def forward(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        check_input(self, x, t, y, self.in_channels, self.input_size)
        R = self.num_registers
        x = self.x_embedder(x) + self.pos_embed  # [B, N, D]
        c = self.t_embedder(t) + self.y_embedder(y, self.training)  # [B, D]
        for i, block in enumerate(self.blocks):
            prefix = (self.register_tokens + self.register_pos_embed)[0] if R and i == self.register_start else None
            rope = self.feat_rope_incontext if R and i >= self.register_start else self.feat_rope
            x = block(x, c, rope=rope.tables(), prefix=prefix, num_prefix_tokens=R if rope is not self.feat_rope else 0)
        x = self.final_layer(x[:, R:], c)  # registers dropped before the final layer
        x = unpatchify(x, self.patch_size, self.out_channels)
        return x.chunk(2, dim=1)[0] if self.learn_sigma else x


class DiTDH(nn.Module):
    """DiT^DH: LightningDiT encoder (width D) + a wide DDT head (width D_head) conditioned per token."""

    def __init__(
        self,
        input_size: int = 16,
        patch_size: int = 1,
        in_channels: int = 768,
        hidden_size: tuple[int, int] = (1152, 2048),
        depth: tuple[int, int] = (28, 2),
        num_heads: tuple[int, int] = (16, 16),
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        learn_sigma: bool = False,
        use_qknorm: bool = False,
        *,
        num_registers: int = 0,
        register_start: int = 0,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if mlp_ratio != 4.0:
            raise ValueError(f"DiTDH: mlp_ratio must be 4.0, got {mlp_ratio}")
        (enc_dim, dec_dim), (enc_depth, dec_depth), (enc_heads, dec_heads) = hidden_size, depth, num_heads
        check_registers(num_registers, register_start, enc_depth)
        self.input_size, self.patch_size, self.in_channels = input_size, patch_size, in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.learn_sigma, self.hidden_size, self.depth, self.num_heads = learn_sigma, hidden_size, depth, num_heads
        self.num_registers, self.register_start, self.backend = num_registers, register_start, backend

        self.s_embedder = PatchEmbed(input_size, patch_size, in_channels, enc_dim, bias=True)
        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, dec_dim, bias=True)
        self.s_projector = nn.Linear(enc_dim, dec_dim)
        self.t_embedder = GaussianFourierEmbedder(enc_dim)
        self.y_embedder = LabelEmbedder(num_classes, enc_dim, class_dropout_prob)
        self.pos_embed = _pos_embed(self.s_embedder.num_patches, enc_dim)
        make_register_params(self, num_registers, enc_dim, prefix="enc_")
        make_register_params(self, num_registers, dec_dim, prefix="dec_")
        grid = input_size // patch_size
        self.enc_feat_rope = RopeTables(enc_dim // enc_heads, grid)
        self.dec_feat_rope = RopeTables(dec_dim // dec_heads, grid)
        if num_registers:
            self.enc_feat_rope_incontext = RopeTables(enc_dim // enc_heads, grid, num_registers)
            self.dec_feat_rope_incontext = RopeTables(dec_dim // dec_heads, grid, num_registers)
        self.blocks = nn.ModuleList(
            [
                Block(enc_dim, enc_heads, mlp="swiglu", norm="rmsnorm", qk_norm=use_qknorm, backend=backend)
                for _ in range(enc_depth)
            ]
            + [
                Block(dec_dim, dec_heads, mlp="swiglu", norm="rmsnorm", qk_norm=use_qknorm, backend=backend)
                for _ in range(dec_depth)
            ]
        )
        self.final_layer = FinalLayer(dec_dim, patch_size, self.out_channels, norm="rmsnorm", backend=backend)
        init_adaln_zero(self)

    def macs_by_part(self) -> dict[str, int]:
        """Multiply-adds per sample of each part (see :mod:`dsr_kernels.models.flops`)."""
        (De, Dd), (Le, Ld) = self.hidden_size, self.depth
        N, C, p, R = self.s_embedder.num_patches, self.in_channels, self.patch_size, self.num_registers
        t_in = 2 * self.t_embedder.W.numel()
        parts = {"embed": N * C * p * p * De + N * C * p * p * Dd + t_in * De + De * De}
        for i in range(Le):
            T = N + (R if R and i >= self.register_start else 0)
            parts[f"blocks.{i}"] = block_macs(T, De, mlp_macs(De, swiglu_hidden(De), gated=True), adaln=6 * De * De)
        T = N + R
        parts["s_projector"] = T * De * Dd
        for j in range(Ld):  # the head's adaLN is per token
            mlp = mlp_macs(Dd, swiglu_hidden(Dd), gated=True)
            parts[f"blocks.{Le + j}"] = block_macs(T, Dd, mlp, adaln=T * 6 * Dd * Dd)
        parts["final"] = N * Dd * p * p * self.out_channels + N * Dd * 2 * Dd
        return parts

    def forward(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        check_input(self, x, t, y, self.in_channels, self.input_size)
        R, enc_depth = self.num_registers, self.depth[0]
        t_emb = self.t_embedder(t)
        c = F.silu(t_emb + self.y_embedder(y, self.training))  # [B, D_enc]
        s = self.s_embedder(x) + self.pos_embed
        for i, block in enumerate(self.blocks[:enc_depth]):
            prefix = None
            if R and i == self.register_start:
                prefix = (self.enc_register_tokens + self.enc_register_pos_embed)[0]
            in_context = R and i >= self.register_start
            rope = self.enc_feat_rope_incontext if in_context else self.enc_feat_rope
            s = block(s, c, rope=rope.tables(), prefix=prefix, num_prefix_tokens=R if in_context else 0)
        s = self.s_projector(F.silu(t_emb[:, None] + s))  # [B, R + N, D_head]: per-token condition
        xh = self.x_embedder(x)
        if R:
            regs = (self.dec_register_tokens + self.dec_register_pos_embed).expand(xh.shape[0], -1, -1)
            xh = torch.cat([regs.to(xh.dtype), xh], dim=1)
        rope = self.dec_feat_rope_incontext if R else self.dec_feat_rope
        for block in self.blocks[enc_depth:]:
            xh = block(xh, s, rope=rope.tables(), num_prefix_tokens=R)
        out = self.final_layer(xh[:, R:], s[:, R:])
        out = unpatchify(out, self.patch_size, self.out_channels)
        return out.chunk(2, dim=1)[0] if self.learn_sigma else out
