"""Video diffusion transformers on the fused ops, with DSR's diffusion registers.

Two ways to attend over T latent frames of h x w patches, each model a config dataclass
(:class:`VideoDiTConfig`), size factories (``Latte-S/2`` ... ``VideoDiT-XL/2`` in
:func:`~dsr_kernels.models.create_model`), and ``forward(x [B, C, T, H, W], t [B], y [B])``:

- :class:`Latte` (Ma et al., 2024, "Latte: Latent Diffusion Transformer for Video
  Generation", its variant 1): DiT blocks that alternate between *spatial* attention
  (the h x w tokens of each frame; the frames are the batch, [B * T, H, h * w, D]) and
  *temporal* attention (the T tokens at each position, [B * h * w, H, T, D]), 2-D and 1-D
  sin-cos position embeddings.
- :class:`VideoDiT`: full 3-D attention as Wan, CogVideoX and HunyuanVideo run it: one
  sequence of T * h * w tokens, a 3-D rotary embedding (the head dim split between t, h
  and w, :func:`dsr_kernels.rope.rope_3d_tables`) applied inside the attention kernel,
  and optional text cross-attention (``context_dim``: context [B, L, context_dim]).

Diffusion registers (DSR): R learned tokens plus a frozen sin-cos embedding on a
sqrt(R) x sqrt(R) grid, inserted at block ``register_block`` and dropped before the final
layer, never rotated (identity rope rows). ``register_placement``:

- ``"global"``: one set of R tokens for the whole video, in front of the stream. In
  VideoDiT they are in-sequence prefix tokens, as in DSR. In Latte's spatial and temporal
  blocks every sequence (a frame, a position) sees the same R registers through
  ``kv_registers`` (their keys and values, [B, H, R, D], broadcast over the sequences:
  a view for one sample, R rows per sequence otherwise), and the registers attend
  [registers ; every token of every frame] in one more call. That is what a single
  in-sequence register is when the sequences are frames: DSR's registers are tokens of
  the residual stream, read by every token and updated by attending to them. Copies
  prepended to each frame would give T different updates of one register, which would
  have to be merged by some rule of our own.
- ``"per_frame"``: R registers for each frame (the same learned tokens plus the frame's
  1-D sin-cos embedding). Latte: the first R slots of each frame (attended within the
  frame, and across the frames at their slot); VideoDiT: T * R prefix tokens.

``backend``: any backend of the ops ("auto", "cpu", "triton", "torch", "reference": their
float64 definitions) or "eager" (PyTorch: LayerNorm, ``torch.cat``, SDPA).
``dsr_kernels.flops(model)`` counts every matrix product exactly (``macs_by_part``).
Inside :func:`dsr_kernels.outliers.collect` each block declares its
:class:`~dsr_kernels.outliers.VideoLayout`, so the report also holds the statistics per
frame and position (``report.frame_table()``, ``report.plot_frames(path)``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dsr_kernels import outliers
from dsr_kernels.models.common import check_registers, frozen_pos_embed
from dsr_kernels.models.flops import attention_macs, block_macs, mlp_macs
from dsr_kernels.models.layers import (
    Block,
    FinalLayer,
    LabelEmbedder,
    PatchEmbed,
    TimestepEmbedder,
    init_adaln_zero,
    make_norm,
    sincos_1d,  # MAE's 1-D sin-cos, as Latte's get_1d_sincos_temp_embed
)
from dsr_kernels.modules.attention import RegisterAttention, RMSNorm, eager_attention
from dsr_kernels.ops.attention import attention
from dsr_kernels.outliers import VideoLayout
from dsr_kernels.rope import rope_3d_tables

PLACEMENTS = ("global", "per_frame")


@dataclass(frozen=True)
class VideoDiTConfig:
    """The video models' arguments (keywords of :class:`Latte` and :class:`VideoDiT`)."""

    num_frames: int = 16  # latent frames T (not patched in time)
    input_size: int | tuple[int, int] = 32  # latent height and width (an int: square)
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 1152
    depth: int = 28  # blocks (Latte: spatial, temporal, spatial, ...: an even number)
    num_heads: int = 16
    mlp_ratio: float = 4.0  # fixed: DiT's MLP width
    num_classes: int = 1000  # class labels y (0: no labels)
    class_dropout_prob: float = 0.1
    context_dim: int | None = None  # VideoDiT: text cross-attention on context [B, L, context_dim]
    context_len: int = 512  # text tokens the FLOP count assumes (Wan pads its text to 512)
    num_registers: int = 0  # R, a perfect square (0: the baseline model)
    register_placement: str = "global"  # "global": R for the video; "per_frame": R for each frame
    register_block: int = 0  # the block that inserts them
    learn_sigma: bool = False  # also output the variance (2 C channels)
    use_qknorm: bool = False  # RMSNorm on q and k (Wan)
    rope_theta: float = 10000.0  # VideoDiT's 3-D RoPE (HunyuanVideo: 256)
    backend: str = "auto"  # the fused ops' backend, or "eager"


# The realistic video size: with patch 2, a 16 x 32 x 32 token grid (16,384 tokens; 16 latent
# frames of 64 x 64, e.g. 512 px through an 8x VAE). The defaults (Latte's release: 16 frames
# of 32 x 32 latents, 256 px) give 4,096 tokens.
VIDEO_16x32x32 = dict(num_frames=16, input_size=64)


def sincos_2d(dim: int, height: int, width: int) -> Tensor:
    """MAE's 2-D sin-cos embedding [height * width, dim] (``get_2d_sincos_pos_embed`` for any
    height x width): the first half of the channels encodes the column, the second the row."""
    cols, rows = np.meshgrid(np.arange(width, dtype=np.float32), np.arange(height, dtype=np.float32))
    return torch.from_numpy(np.concatenate([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], axis=1)).float()


def frozen(value: Tensor) -> nn.Parameter:
    """A fixed embedding [1, ...] stored as DiT stores pos_embed (a parameter that is not trained),
    on the default device (``with torch.device("meta")`` builds a model without memory)."""
    return nn.Parameter(torch.empty(1, *value.shape).copy_(value), requires_grad=False)


class VideoDenoiser(nn.Module):
    """What both video models share: the configuration and its checks, the registers, the
    patch embedding of each frame, the conditioning, input checks and unpatchify."""

    defaults: VideoDiTConfig

    def __init__(self, **config: Any) -> None:
        super().__init__()
        self.config = cfg = replace(self.defaults, **config)
        name = type(self).__name__
        H, W = (cfg.input_size, cfg.input_size) if isinstance(cfg.input_size, int) else tuple(cfg.input_size)
        p, D = cfg.patch_size, cfg.hidden_size
        if cfg.mlp_ratio != 4.0:
            raise ValueError(f"{name}: mlp_ratio must be 4.0 (DiT's blocks), got {cfg.mlp_ratio}")
        if p < 1 or H % p or W % p:
            raise ValueError(f"{name}: input_size={(H, W)} must be a multiple of patch_size={p}")
        if cfg.num_frames < 1 or D % cfg.num_heads:
            raise ValueError(
                f"{name}: num_frames={cfg.num_frames} must be >= 1 and hidden_size={D} a multiple of "
                f"num_heads={cfg.num_heads}"
            )
        if cfg.register_placement not in PLACEMENTS:
            raise ValueError(f"{name}: register_placement must be one of {PLACEMENTS}, got {cfg.register_placement!r}")
        if cfg.num_registers and not 0 <= cfg.register_block < cfg.depth:
            raise ValueError(f"{name}: register_block must be in [0, depth={cfg.depth}), got {cfg.register_block}")
        check_registers(cfg.num_registers, cfg.register_block, cfg.depth)
        self.num_frames, self.input_size, self.patch_size, self.in_channels = cfg.num_frames, (H, W), p, cfg.in_channels
        self.hidden_size, self.depth, self.num_heads, self.backend = D, cfg.depth, cfg.num_heads, cfg.backend
        self.num_registers, self.register_placement = cfg.num_registers, cfg.register_placement
        self.register_block, self.learn_sigma, self.context_dim = cfg.register_block, cfg.learn_sigma, cfg.context_dim
        self.out_channels = 2 * cfg.in_channels if cfg.learn_sigma else cfg.in_channels
        self.grid = (cfg.num_frames, H // p, W // p)  # (T, h, w) tokens
        self.x_embedder = PatchEmbed(H, p, cfg.in_channels, D, bias=True)  # each frame: a stride-p convolution
        self.x_embedder.num_patches = self.grid[1] * self.grid[2]  # per frame (PatchEmbed assumes a square)
        self.t_embedder = TimestepEmbedder(D)
        self.y_embedder = LabelEmbedder(cfg.num_classes, D, cfg.class_dropout_prob) if cfg.num_classes else None
        if cfg.num_registers:
            self.register_tokens = nn.Parameter(torch.randn(1, cfg.num_registers, D))
            self.register_pos_embed = frozen(frozen_pos_embed(cfg.num_registers, D)[0])

    @property
    def num_tokens(self) -> int:
        """T * h * w: the patch tokens (registers not included)."""
        T, h, w = self.grid
        return T * h * w

    @property
    def num_register_tokens(self) -> int:
        """The registers in the stream: R (global) or T * R (per frame)."""
        per_frame = self.register_placement == "per_frame"
        return self.num_registers * (self.num_frames if per_frame else 1)

    def frame_embed(self) -> Tensor:
        """[T, D]: each frame's 1-D sin-cos embedding (Latte's temp_embed)."""
        return torch.from_numpy(sincos_1d(self.hidden_size, np.arange(self.num_frames, dtype=np.float32))).float()

    def registers(self) -> Tensor | None:
        """The register tokens as inserted: [R, D] (global) or [T, R, D] (per frame: the learned
        tokens plus the frame's embedding); None without registers."""
        if not self.num_registers:
            return None
        regs = (self.register_tokens + self.register_pos_embed)[0]
        return regs[None] + self.temp_embed[0][:, None] if self.register_placement == "per_frame" else regs

    def embed(self, x: Tensor, t: Tensor, y: Tensor | None) -> tuple[Tensor, Tensor]:
        """x [B, C, T, H, W] -> tokens [B, T * h * w, D] (frame-major); t, y -> c [B, D]."""
        B, D = x.shape[0], self.hidden_size
        tokens = self.x_embedder(x.transpose(1, 2).flatten(0, 1))  # [B * T, h * w, D]: each frame's patches
        c = self.t_embedder(t)  # [B, D]
        if self.y_embedder is not None:
            c = c + self.y_embedder(y, self.training)
        return tokens.reshape(B, -1, D), c

    def unpatchify(self, x: Tensor) -> Tensor:
        """[B, T * h * w, p * p * C] -> [B, C, T, H, W] (DiT's patch order within a token: row, col, channel)."""
        (T, h, w), p, C = self.grid, self.patch_size, self.out_channels
        x = x.reshape(x.shape[0], T, h, w, p, p, C).permute(0, 6, 1, 2, 4, 3, 5)  # [B, C, T, h, p, w, p]
        return x.reshape(x.shape[0], C, T, h * p, w * p)

    def embed_macs(self) -> int:
        """The patch convolution and the timestep MLP (256 frequencies), per sample."""
        C, p, D = self.in_channels, self.patch_size, self.hidden_size
        return self.num_tokens * C * p * p * D + 256 * D + D * D

    def final_macs(self) -> int:
        D, p = self.hidden_size, self.patch_size
        return self.num_tokens * D * p * p * self.out_channels + 2 * D * D

    def check_input(
        self,
        x: Tensor,
        t: Tensor,
        y: Tensor | None,
        *,
        context: Tensor | None = None,
        registers: Tensor | None = None,
    ) -> Tensor | None:
        """forward()'s arguments, before anything runs; returns the registers to insert.

        x [B, in_channels, T, H, W]; t [B]; y [B] integer labels (None without num_classes);
        context [B, L, context_dim] (VideoDiT with context_dim, else None); registers, to
        insert instead of the model's own: [R, D] or [B, R, D] (global), [T, R, D] or
        [B, T, R, D] (per frame).
        """
        name, C, (T, H, W) = f"{type(self).__name__}.forward()", self.in_channels, (self.num_frames, *self.input_size)
        if not isinstance(x, Tensor) or x.dim() != 5 or tuple(x.shape[1:]) != (C, T, H, W):
            shape = list(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"{name}: argument 'x' must be latent frames [B, C={C}, T={T}, H={H}, W={W}], got {shape}")
        B = x.shape[0]
        if not isinstance(t, Tensor) or tuple(t.shape) != (B,):
            raise ValueError(f"{name}: argument 't' must be [B={B}], got {_shape(t)}")
        if self.y_embedder is None and y is not None:
            raise ValueError(f"{name}: argument 'y' must be None (num_classes=0), got {_shape(y)}")
        if self.y_embedder is not None and (
            not isinstance(y, Tensor) or tuple(y.shape) != (B,) or y.dtype not in (torch.int64, torch.int32)
        ):
            raise ValueError(
                f"{name}: argument 'y' must be integer class labels [B={B}], got {_shape(y)} {getattr(y, 'dtype', '')}"
            )
        dim = self.context_dim
        if dim is None and context is not None:
            raise ValueError(f"{name}: argument 'context' must be None (no context_dim), got {_shape(context)}")
        if dim is not None and (
            not isinstance(context, Tensor) or context.dim() != 3 or context.shape[0] != B or context.shape[2] != dim
        ):
            raise ValueError(f"{name}: argument 'context' must be text tokens [B={B}, L, {dim}], got {_shape(context)}")
        if registers is None:
            return self.registers()
        R, D = self.num_registers, self.hidden_size
        if not R:
            raise ValueError(f"{name}: argument 'registers' given to a model without registers (num_registers=0)")
        expected = (R, D) if self.register_placement == "global" else (T, R, D)
        if not isinstance(registers, Tensor) or tuple(registers.shape) not in (expected, (B, *expected)):
            want = ", ".join(str(n) for n in expected)
            raise ValueError(
                f"{name}: argument 'registers' must be [{want}] or [B={B}, {want}] "
                f"({self.register_placement} registers), got {_shape(registers)}"
            )
        return registers


def _shape(value: Any) -> Any:
    return list(value.shape) if isinstance(value, Tensor) else value if value is None else type(value).__name__


# ----------------------------------------------------------------------------- Latte


def _heads(attn: RegisterAttention, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """q, k, v [B, H, N, hd]: views of attn's qkv projection of x [B, N, C] (q/k norms applied)."""
    B, N, _ = x.shape
    q, k, v = attn.qkv(x).view(B, N, 3, attn.num_heads, attn.head_dim).unbind(2)
    return attn.q_norm(q).transpose(1, 2), attn.k_norm(k).transpose(1, 2), v.transpose(1, 2)


def _attend(
    attn: RegisterAttention,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    kv_registers: tuple[Tensor, Tensor] | None,
    record: bool,
    num_prefix_tokens: int = 0,
) -> Tensor:
    """attention(q, k, v, kv_registers) on attn's backend ("eager": SDPA), reporting its statistics
    to :func:`dsr_kernels.outliers.collect` when ``record``. Returns [B, H, Nq, Dv]."""
    recording = outliers.active_layer(attn) if record else None
    if attn.backend == "eager" and recording is None:
        return eager_attention(
            q, k, v, kv_registers=kv_registers, sinks=None, key_mask=None, attn_mask=None, scale=attn.scale
        )
    backend = "reference" if attn.backend == "eager" else attn.backend
    result = attention(
        q,
        k,
        v,
        kv_registers=kv_registers,
        num_prefix_tokens=num_prefix_tokens,
        scale=attn.scale,
        return_stats=recording is not None,
        backend=backend,
    )
    if recording is None:
        return result
    out, stats = result
    report, layer = recording
    report.record_attention(layer, stats, 0 if kv_registers is None else kv_registers[0].shape[-2])
    return out


def frame_attention(
    attn: RegisterAttention, x: Tensor, *, frames: int, num_global: int, frame_registers: int, temporal: bool
) -> Tensor:
    """Latte's attention: x [B, P + T * S, C] (P global registers, then T frames of S tokens, the
    first ``frame_registers`` of each frame its registers).

    Spatial: the S tokens of each frame attend each other, [B * T, H, S, hd]; temporal: the
    T tokens at each of the S slots attend each other, [B * S, H, T, hd]. Every sequence also
    attends the P global registers (kv_registers), and the registers attend [registers ;
    all T * S tokens]. Returns attn's output projection, [B, P + T * S, C].
    """
    B, N, C = x.shape
    P, T = num_global, frames
    S = (N - P) // T
    tokens = x[:, P:].unflatten(1, (T, S))  # [B, T, S, C]
    if temporal:
        tokens = tokens.transpose(1, 2)  # [B, S, T, C]: the T frames at each slot
    G, L = tokens.shape[1], tokens.shape[2]
    q, k, v = _heads(attn, tokens.reshape(B * G, L, C))  # [B * G, H, L, hd]
    kv_registers = None
    if P:
        rq, rk, rv = _heads(attn, x[:, :P])  # [B, H, P, hd]
        kv_registers = tuple(r[:, None].expand(B, G, *r.shape[1:]).flatten(0, 1) for r in (rk, rv))  # [B * G, H, P, hd]
    prefix = 0 if temporal else frame_registers  # for register_share: a frame's registers lead its sequence
    out = _attend(attn, q, k, v, kv_registers=kv_registers, record=True, num_prefix_tokens=prefix)  # [B*G, H, L, hd]
    out = out.transpose(1, 2).reshape(B, G, L, C)
    out = (out.transpose(1, 2) if temporal else out).reshape(B, T * S, C)  # frame-major again
    if P:
        every = [u.transpose(1, 2).reshape(B, G * L, attn.num_heads, -1).transpose(1, 2) for u in (k, v)]  # views
        regs = _attend(attn, rq, *every, kv_registers=(rk, rv), record=False)  # [B, H, P, hd]
        out = torch.cat([regs.transpose(1, 2).reshape(B, P, C), out], dim=1)
    return attn.proj(out)


class LatteBlock(Block):
    """DiT's adaLN-Zero block whose attention is spatial (within each frame) or temporal (across
    the frames at each position): :func:`frame_attention` with the block's RegisterAttention."""

    def __init__(self, dim: int, num_heads: int, *, temporal: bool, qk_norm: bool, backend: str) -> None:
        super().__init__(dim, num_heads, mlp="gelu", norm="layernorm", qk_norm=qk_norm, backend=backend)
        self.temporal = temporal

    @property
    def arrangement(self) -> str:
        return "temporal" if self.temporal else "spatial"

    def forward(
        self,
        x: Tensor,
        c: Tensor,
        *,
        frames: int,
        num_global: int = 0,
        frame_registers: int = 0,
        prefix: Tensor | None = None,
    ) -> Tensor:
        """x [B, P + T * S, D]: P = num_global registers, then T frames of S slots (the first
        frame_registers of them registers); c [B, D]; prefix [P, D] or [B, P, D]: global
        registers that this block's first norm pass inserts (num_global = P from this block on)."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            self.adaLN_modulation(c).to(x.dtype).chunk(6, -1)
        )
        res = self.norm1(x, shift_msa, scale_msa, registers=prefix)  # [B, P + T * S, D]
        h = res.residual if res.residual is not None else x
        attn = frame_attention(
            self.attn,
            res.out,
            frames=frames,
            num_global=num_global,
            frame_registers=frame_registers,
            temporal=self.temporal,
        )
        h = h + gate_msa[:, None] * attn
        return h + gate_mlp[:, None] * self.mlp(self.norm2(h, shift_mlp, scale_mlp).out)


class Latte(VideoDenoiser):
    """Latte (variant 1: spatial and temporal blocks alternate), class-conditional.

    forward(x [B, C, T, H, W], t [B], y [B], *, registers=None) -> [B, C_out, T, H, W].
    Keyword arguments: :class:`VideoDiTConfig`'s (defaults: Latte-XL/2 on 16 frames of
    32 x 32 x 4 latents). The stream is [B, P + T * S, D]: P global registers, then T frames
    of S = R_f + h * w slots (R_f per-frame registers). The temporal sin-cos embedding is
    added with the spatial one after the patch embedding (Latte adds it after the first
    spatial block; a per-frame constant either way).
    """

    defaults = VideoDiTConfig()

    def __init__(self, **config: Any) -> None:
        super().__init__(**config)
        cfg, D, (_, h, w) = self.config, self.hidden_size, self.grid
        if cfg.depth % 2:
            raise ValueError(f"Latte: depth must be even (spatial and temporal blocks alternate), got {cfg.depth}")
        if cfg.context_dim is not None:
            raise ValueError(f"Latte: no text cross-attention (context_dim must be None), got {cfg.context_dim}")
        self.pos_embed = frozen(sincos_2d(D, h, w))  # [1, h * w, D]
        self.temp_embed = frozen(self.frame_embed())  # [1, T, D]
        self.blocks = nn.ModuleList(
            [
                LatteBlock(D, cfg.num_heads, temporal=bool(i % 2), qk_norm=cfg.use_qknorm, backend=cfg.backend)
                for i in range(cfg.depth)
            ]
        )
        self.final_layer = FinalLayer(D, cfg.patch_size, self.out_channels, norm="layernorm", backend=cfg.backend)
        init_adaln_zero(self)
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)

    def registers_at(self, block: int) -> tuple[int, int]:
        """(P global registers, R_f registers per frame) that block ``block`` sees (0 before register_block)."""
        R = self.num_registers if block >= self.register_block else 0
        return (R, 0) if self.register_placement == "global" else (0, R)

    def sequence_registers(self) -> dict[str, tuple[int, int, int]]:
        """{layer: (first key, R, 1)} of the in-sequence registers, for
        :func:`~dsr_kernels.outliers.register_utilisation`: per-frame registers lead each
        frame's sequence in the spatial blocks. Global registers are kv registers (counted
        as such), and in the temporal blocks the tokens' sequences hold no registers."""
        return {
            f"blocks.{i}": (0, Rf, 1)
            for i in range(self.depth)
            if (Rf := self.registers_at(i)[1]) and not self.blocks[i].temporal
        }

    def macs_by_part(self) -> dict[str, int]:
        """Multiply-adds per sample of each part (see :mod:`dsr_kernels.models.flops`)."""
        (T, h, w), D = self.grid, self.hidden_size
        parts = {"embed": self.embed_macs()}
        for i, block in enumerate(self.blocks):
            P, Rf = self.registers_at(i)
            S = Rf + h * w
            G, L = (S, T) if block.temporal else (T, S)
            attn = G * attention_macs(L, P + L, D) + attention_macs(P, P + T * S, D)  # sequences, registers' queries
            parts[f"blocks.{i}"] = block_macs(P + T * S, D, mlp_macs(D, 4 * D), adaln=6 * D * D, attention=attn)
        parts["final"] = self.final_macs()
        return parts

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None, *, registers: Tensor | None = None) -> Tensor:
        regs = self.check_input(x, t, y, registers=registers)
        B, (T, h, w) = x.shape[0], self.grid
        x, c = self.embed(x, t, y)  # [B, T * h * w, D], [B, D]
        x = (x.unflatten(1, (T, h * w)) + self.pos_embed[:, None] + self.temp_embed[:, :, None]).flatten(1, 2)
        for i, block in enumerate(self.blocks):
            prefix = None
            if regs is not None and i == self.register_block:
                if self.register_placement == "global":
                    prefix = regs.to(x.dtype)  # this block's norm pass puts them in front: [B, R + T * h * w, D]
                else:  # the first R slots of each frame: [B, T * (R + h * w), D]
                    frame_regs = regs.to(x.dtype).expand(B, *regs.shape[-3:])
                    x = torch.cat([frame_regs, x.unflatten(1, (T, h * w))], dim=2).flatten(1, 2)
            P, Rf = self.registers_at(i)
            layout = VideoLayout(T, h, w, frame_registers=Rf, prefix_frames=(-1,) * P)
            outliers.set_video_layout(block.norm1, layout, block.arrangement)
            x = block(x, c, frames=T, num_global=P, frame_registers=Rf, prefix=prefix)  # [B, P + T * S, D]
        P, Rf = self.registers_at(self.depth - 1)
        x = x[:, P:].unflatten(1, (T, Rf + h * w))[:, :, Rf:].flatten(1, 2)  # registers dropped: [B, T * h * w, D]
        return self.unpatchify(self.final_layer(x, c))  # [B, C_out, T, H, W]


# ----------------------------------------------------------------------------- full 3-D attention


class CrossAttention(nn.Module):
    """Text cross-attention (Wan, PixArt): queries from the video tokens, keys and values from the
    text context (no RoPE), on :func:`dsr_kernels.attention`."""

    def __init__(self, dim: int, num_heads: int, *, qk_norm: bool, backend: str) -> None:
        super().__init__()
        self.num_heads, self.head_dim, self.backend = num_heads, dim // num_heads, backend
        self.q, self.kv, self.proj = nn.Linear(dim, dim), nn.Linear(dim, 2 * dim), nn.Linear(dim, dim)
        self.q_norm = RMSNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(self.head_dim) if qk_norm else nn.Identity()

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        """x [B, N, D], context [B, L, D] -> [B, N, D]."""
        (B, N, D), L = x.shape, context.shape[1]
        q = self.q_norm(self.q(x).view(B, N, self.num_heads, self.head_dim)).transpose(1, 2)  # [B, H, N, hd]
        k, v = self.kv(context).view(B, L, 2, self.num_heads, self.head_dim).unbind(2)
        k, v = self.k_norm(k).transpose(1, 2), v.transpose(1, 2)  # [B, H, L, hd]
        if self.backend == "eager":
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            out = attention(q, k, v, backend=self.backend)
        return self.proj(out.transpose(1, 2).reshape(B, N, D))


class VideoBlock(Block):
    """DiT's adaLN-Zero block over the whole T * h * w sequence (RoPE in the kernel), with Wan's
    text cross-attention between self-attention and MLP when ``context_dim`` is set."""

    def __init__(self, dim: int, num_heads: int, *, context: bool, qk_norm: bool, backend: str) -> None:
        super().__init__(dim, num_heads, mlp="gelu", norm="layernorm", qk_norm=qk_norm, backend=backend)
        if context:
            self.norm3 = make_norm(dim, kind="layernorm", affine=True, bias=True, backend=backend, record=False)
            self.cross_attn = CrossAttention(dim, num_heads, qk_norm=qk_norm, backend=backend)

    def forward(
        self,
        x: Tensor,
        c: Tensor,
        *,
        context: Tensor | None = None,
        rope: tuple[Tensor, Tensor] | None = None,
        prefix: Tensor | None = None,
        num_prefix_tokens: int = 0,
    ) -> Tensor:
        """x [B, N, D], c [B, D], context [B, L, D] (text, embedded); the rest as :class:`Block`."""
        if context is None:
            return super().forward(x, c, rope=rope, prefix=prefix, num_prefix_tokens=num_prefix_tokens)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            self.adaLN_modulation(c).to(x.dtype).chunk(6, -1)
        )
        res = self.norm1(x, shift_msa, scale_msa, registers=prefix)
        h = res.residual if res.residual is not None else x
        h = h + gate_msa[:, None] * self.attn(res.out, rope=rope, num_prefix_tokens=num_prefix_tokens)
        h = h + self.cross_attn(self.norm3(h).out, context)  # the registers read the text too
        return h + gate_mlp[:, None] * self.mlp(self.norm2(h, shift_mlp, scale_mlp).out)


class VideoDiT(VideoDenoiser):
    """Full 3-D attention over T * h * w tokens with 3-D RoPE in the kernel (Wan / CogVideoX /
    HunyuanVideo style), DiT's adaLN-Zero blocks, optional text cross-attention.

    forward(x [B, C, T, H, W], t [B], y [B] or None, context [B, L, context_dim] or None, *,
    registers=None, rope=None) -> [B, C_out, T, H, W]. Keyword arguments:
    :class:`VideoDiTConfig`'s (defaults: XL, 16 frames of 32 x 32 x 16 latents, patch 2;
    ``num_classes=0, context_dim=4096`` for a text-to-video model). ``rope``: (cos, sin)
    tables [T * h * w, head_dim] (interleaved pairs) instead of the model's
    ``rope_3d_tables(T, h, w, head_dim, theta=rope_theta)``; identity rows for the
    registers are added in front. The stream is [B, P + T * h * w, D]: P = R global
    registers, or T * R per-frame registers (frame-major), all unrotated.
    """

    defaults = VideoDiTConfig(in_channels=16)

    def __init__(self, **config: Any) -> None:
        super().__init__(**config)
        cfg, D, (T, h, w) = self.config, self.hidden_size, self.grid
        self.head_dim = D // cfg.num_heads
        cos, sin = rope_3d_tables(T, h, w, self.head_dim, theta=cfg.rope_theta)
        self.register_buffer("freqs_cos", cos, persistent=False)  # [T * h * w, head_dim]
        self.register_buffer("freqs_sin", sin, persistent=False)
        if cfg.num_registers and cfg.register_placement == "per_frame":
            self.temp_embed = frozen(self.frame_embed())  # [1, T, D]: tells the frames' registers apart
        self.context_embedder = None
        if cfg.context_dim is not None:  # Wan's text_embedding
            self.context_embedder = nn.Sequential(
                nn.Linear(cfg.context_dim, D), nn.GELU(approximate="tanh"), nn.Linear(D, D)
            )
        context = cfg.context_dim is not None
        self.blocks = nn.ModuleList(
            [
                VideoBlock(D, cfg.num_heads, context=context, qk_norm=cfg.use_qknorm, backend=cfg.backend)
                for _ in range(cfg.depth)
            ]
        )
        self.final_layer = FinalLayer(D, cfg.patch_size, self.out_channels, norm="layernorm", backend=cfg.backend)
        init_adaln_zero(self)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)

    def layout(self, with_registers: bool) -> VideoLayout:
        T, h, w = self.grid
        if not with_registers:
            return VideoLayout(T, h, w)
        R = self.num_registers
        frames = (-1,) * R if self.register_placement == "global" else tuple(f for f in range(T) for _ in range(R))
        return VideoLayout(T, h, w, prefix_frames=frames)

    def sequence_registers(self) -> dict[str, tuple[int, int, int]]:
        """{layer: (first key, R, groups)} of the in-sequence registers, for
        :func:`~dsr_kernels.outliers.register_utilisation`: the first R keys of the sequence
        (global), or T groups of R, frame-major (per frame), from ``register_block`` on."""
        R, T = self.num_registers, self.grid[0]
        groups = T if self.register_placement == "per_frame" else 1
        return {f"blocks.{i}": (0, R, groups) for i in range(self.register_block, self.depth)} if R else {}

    def macs_by_part(self) -> dict[str, int]:
        """Multiply-adds per sample of each part (see :mod:`dsr_kernels.models.flops`)."""
        D, N, L = self.hidden_size, self.num_tokens, self.config.context_len
        parts = {"embed": self.embed_macs()}
        if self.context_embedder is not None:
            parts["context"] = L * (self.config.context_dim * D + D * D)
        for i in range(self.depth):
            tokens = N + (self.num_register_tokens if i >= self.register_block else 0)
            parts[f"blocks.{i}"] = block_macs(tokens, D, mlp_macs(D, 4 * D), adaln=6 * D * D)
            if self.context_embedder is not None:  # q, o over the tokens, k, v over the text, Q K^T and P V
                parts[f"blocks.{i}"] += 2 * tokens * D * D + 2 * L * D * D + attention_macs(tokens, L, D)
        parts["final"] = self.final_macs()
        return parts

    def check_rope(self, rope: tuple[Tensor, Tensor] | None) -> tuple[Tensor, Tensor]:
        """The tables for the patch tokens, [T * h * w, head_dim] each (the model's own when None)."""
        if rope is None:
            return self.freqs_cos, self.freqs_sin
        (T, h, w), hd = self.grid, self.head_dim
        if not isinstance(rope, (tuple, list)) or len(rope) != 2:
            raise ValueError(f"VideoDiT.forward(): argument 'rope' must be a pair (cos, sin), got {_shape(rope)}")
        for part, table in zip(("cos", "sin"), rope, strict=True):
            if not isinstance(table, Tensor) or tuple(table.shape) != (T * h * w, hd):
                raise ValueError(
                    f"VideoDiT.forward(): argument 'rope' ({part}) must be [T * h * w = {T} * {h} * {w} = "
                    f"{T * h * w}, head_dim={hd}] for the token grid, got {_shape(table)}"
                )
        return rope[0], rope[1]

    def forward(
        self,
        x: Tensor,
        t: Tensor,
        y: Tensor | None = None,
        context: Tensor | None = None,
        *,
        registers: Tensor | None = None,
        rope: tuple[Tensor, Tensor] | None = None,
    ) -> Tensor:
        regs = self.check_input(x, t, y, context=context, registers=registers)
        cos, sin = self.check_rope(rope)
        P = self.num_register_tokens
        x, c = self.embed(x, t, y)  # [B, T * h * w, D], [B, D]
        text = None if self.context_embedder is None else self.context_embedder(context.to(x.dtype))  # [B, L, D]
        tables = (cos, sin)
        if P:  # the registers are not rotated
            tables = (
                torch.cat([cos.new_ones(P, self.head_dim), cos]),
                torch.cat([sin.new_zeros(P, self.head_dim), sin]),
            )
        for i, block in enumerate(self.blocks):
            with_registers = bool(P) and i >= self.register_block
            prefix = None
            if P and i == self.register_block:  # [R, D] / [T * R, D] (or with B first) in front
                prefix = (
                    regs.to(x.dtype).flatten(-3, -2) if self.register_placement == "per_frame" else regs.to(x.dtype)
                )
            outliers.set_video_layout(block.norm1, self.layout(with_registers), "full")
            x = block(
                x,
                c,
                context=text,
                rope=tables if with_registers else (cos, sin),
                prefix=prefix,
                num_prefix_tokens=P if with_registers else 0,
            )  # [B, (P +) T * h * w, D]
        return self.unpatchify(self.final_layer(x[:, P:], c))  # registers dropped: [B, C_out, T, H, W]
