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

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dsr_kernels.models.common import Denoiser, DenoiserConfig, RopeTables, frozen_pos_embed
from dsr_kernels.models.flops import block_macs, mlp_macs
from dsr_kernels.models.layers import (
    Block,
    FinalLayer,
    GaussianFourierEmbedder,
    LabelEmbedder,
    PatchEmbed,
    init_adaln_zero,
    swiglu_hidden,
    unpatchify,
)


class LightningDiT(Denoiser):
    """forward(x [B, C, H, W], t [B] in [0, 1], y [B]) -> [B, C, H, W] (data prediction in DSR).

    Keyword arguments: :class:`~dsr_kernels.models.common.DenoiserConfig`'s over ``defaults``
    (XL on 16 x 16 x 768 RAE latents), ``learn_sigma``, and ``use_qknorm`` (RMSNorm on q and k).
    """

    defaults = DenoiserConfig(input_size=16, patch_size=1, in_channels=768, hidden_size=1152, depth=28, num_heads=16)

    def __init__(self, *, learn_sigma: bool = False, use_qknorm: bool = False, **config: Any) -> None:
        super().__init__(learn_sigma=learn_sigma, **config)
        cfg, D = self.config, self.hidden_size
        self.x_embedder = PatchEmbed(cfg.input_size, cfg.patch_size, cfg.in_channels, D, bias=True)
        self.t_embedder = GaussianFourierEmbedder(D)
        self.y_embedder = LabelEmbedder(cfg.num_classes, D, cfg.class_dropout_prob)
        self.pos_embed = frozen_pos_embed(self.x_embedder.num_patches, D)
        self.make_register_params(D)
        grid, head_dim = cfg.input_size // cfg.patch_size, D // cfg.num_heads
        self.feat_rope = RopeTables(head_dim, grid)
        if cfg.num_registers:
            self.feat_rope_incontext = RopeTables(head_dim, grid, cfg.num_registers)
        self.blocks = nn.ModuleList(
            [
                Block(D, cfg.num_heads, mlp="swiglu", norm="rmsnorm", qk_norm=use_qknorm, backend=cfg.backend)
                for _ in range(cfg.depth)
            ]
        )
        self.final_layer = FinalLayer(D, cfg.patch_size, self.out_channels, norm="rmsnorm", backend=cfg.backend)
        init_adaln_zero(self)

    def macs_by_part(self) -> dict[str, int]:
        """Multiply-adds per sample of each part (see :mod:`dsr_kernels.models.flops`)."""
        D, N, p, C = self.hidden_size, self.x_embedder.num_patches, self.patch_size, self.in_channels
        embed = N * C * p * p * D + 2 * self.t_embedder.W.numel() * D + D * D
        return {"embed": embed, **self.blocks_and_final_macs(mlp_macs(D, swiglu_hidden(D), gated=True))}

    def forward(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        self.check_input(x, t, y)
        R = self.num_registers
        x = self.x_embedder(x) + self.pos_embed  # [B, N, D]
        c = self.t_embedder(t) + self.y_embedder(y, self.training)  # [B, D]
        for i, block in enumerate(self.blocks):
            prefix = self.registers() if i == self.register_start else None
            rope = self.feat_rope_incontext if R and i >= self.register_start else self.feat_rope
            x = block(x, c, rope=rope.tables(), prefix=prefix, num_prefix_tokens=R if rope is not self.feat_rope else 0)
        x = self.final_layer(x[:, R:], c)  # registers dropped before the final layer
        x = unpatchify(x, self.patch_size, self.out_channels)
        return x.chunk(2, dim=1)[0] if self.learn_sigma else x


class DiTDH(Denoiser):
    """DiT^DH: LightningDiT encoder (width D) + a wide DDT head (width D_head) conditioned per token.

    Keyword arguments: LightningDiT's, with (encoder, head) pairs for hidden_size, depth
    and num_heads; the registers (``enc_`` and ``dec_`` sets) run through both.
    """

    defaults = DenoiserConfig(
        input_size=16, patch_size=1, in_channels=768, hidden_size=(1152, 2048), depth=(28, 2), num_heads=(16, 16)
    )

    def __init__(self, *, learn_sigma: bool = False, use_qknorm: bool = False, **config: Any) -> None:
        super().__init__(learn_sigma=learn_sigma, **config)
        cfg = self.config
        (enc_dim, dec_dim), (enc_depth, dec_depth), (enc_heads, dec_heads) = cfg.hidden_size, cfg.depth, cfg.num_heads
        self.s_embedder = PatchEmbed(cfg.input_size, cfg.patch_size, cfg.in_channels, enc_dim, bias=True)
        self.x_embedder = PatchEmbed(cfg.input_size, cfg.patch_size, cfg.in_channels, dec_dim, bias=True)
        self.s_projector = nn.Linear(enc_dim, dec_dim)
        self.t_embedder = GaussianFourierEmbedder(enc_dim)
        self.y_embedder = LabelEmbedder(cfg.num_classes, enc_dim, cfg.class_dropout_prob)
        self.pos_embed = frozen_pos_embed(self.s_embedder.num_patches, enc_dim)
        self.make_register_params(enc_dim, prefix="enc_")
        self.make_register_params(dec_dim, prefix="dec_")
        grid = cfg.input_size // cfg.patch_size
        self.enc_feat_rope = RopeTables(enc_dim // enc_heads, grid)
        self.dec_feat_rope = RopeTables(dec_dim // dec_heads, grid)
        if cfg.num_registers:
            self.enc_feat_rope_incontext = RopeTables(enc_dim // enc_heads, grid, cfg.num_registers)
            self.dec_feat_rope_incontext = RopeTables(dec_dim // dec_heads, grid, cfg.num_registers)
        self.blocks = nn.ModuleList(
            [
                Block(dim, heads, mlp="swiglu", norm="rmsnorm", qk_norm=use_qknorm, backend=cfg.backend)
                for dim, heads, depth in ((enc_dim, enc_heads, enc_depth), (dec_dim, dec_heads, dec_depth))
                for _ in range(depth)
            ]
        )
        self.final_layer = FinalLayer(dec_dim, cfg.patch_size, self.out_channels, norm="rmsnorm", backend=cfg.backend)
        init_adaln_zero(self)

    @property
    def register_depth(self) -> int:
        return self.depth[0]  # the encoder's blocks

    def macs_by_part(self) -> dict[str, int]:
        """Multiply-adds per sample of each part (see :mod:`dsr_kernels.models.flops`)."""
        (De, Dd), (Le, Ld) = self.hidden_size, self.depth
        N, C, p, R = self.s_embedder.num_patches, self.in_channels, self.patch_size, self.num_registers
        t_in = 2 * self.t_embedder.W.numel()
        parts = {"embed": N * C * p * p * De + N * C * p * p * Dd + t_in * De + De * De}
        for i, extra in enumerate(self.prefix_counts()):
            parts[f"blocks.{i}"] = block_macs(
                N + extra, De, mlp_macs(De, swiglu_hidden(De), gated=True), adaln=6 * De * De
            )
        T = N + R
        parts["s_projector"] = T * De * Dd
        for j in range(Ld):  # the head's adaLN is per token
            mlp = mlp_macs(Dd, swiglu_hidden(Dd), gated=True)
            parts[f"blocks.{Le + j}"] = block_macs(T, Dd, mlp, adaln=T * 6 * Dd * Dd)
        parts["final"] = N * Dd * p * p * self.out_channels + N * Dd * 2 * Dd
        return parts

    def forward(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        self.check_input(x, t, y)
        R, enc_depth = self.num_registers, self.depth[0]
        t_emb = self.t_embedder(t)
        c = F.silu(t_emb + self.y_embedder(y, self.training))  # [B, D_enc]
        s = self.s_embedder(x) + self.pos_embed
        for i, block in enumerate(self.blocks[:enc_depth]):
            prefix = self.registers("enc_") if i == self.register_start else None
            in_context = R and i >= self.register_start
            rope = self.enc_feat_rope_incontext if in_context else self.enc_feat_rope
            s = block(s, c, rope=rope.tables(), prefix=prefix, num_prefix_tokens=R if in_context else 0)
        s = self.s_projector(F.silu(t_emb[:, None] + s))  # [B, R + N, D_head]: per-token condition
        xh = self.x_embedder(x)
        if R:
            regs = self.registers("dec_").expand(xh.shape[0], -1, -1)
            xh = torch.cat([regs.to(xh.dtype), xh], dim=1)
        rope = self.dec_feat_rope_incontext if R else self.dec_feat_rope
        for block in self.blocks[enc_depth:]:
            xh = block(xh, s, rope=rope.tables(), num_prefix_tokens=R)
        out = self.final_layer(xh[:, R:], s[:, R:])
        out = unpatchify(out, self.patch_size, self.out_channels)
        return out.chunk(2, dim=1)[0] if self.learn_sigma else out
