"""What every reference model shares: the denoisers' configuration and base class, diffusion
registers, RoPE tables, input checks."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn

from dsr_kernels.models.flops import block_macs
from dsr_kernels.models.layers import get_2d_sincos_pos_embed
from dsr_kernels.rope import rope_2d_tables


def check_registers(num_registers: int, register_start: int, depth: int) -> None:
    """DSR's diffusion registers: R tokens on a sqrt(R) x sqrt(R) sin-cos grid, from block register_start."""
    if isinstance(num_registers, bool) or not isinstance(num_registers, int) or num_registers < 0:
        raise ValueError(f"num_registers must be an int >= 0, got {num_registers!r}")
    if num_registers and math.isqrt(num_registers) ** 2 != num_registers:
        raise ValueError(
            f"num_registers must be a perfect square (their 2D sin-cos position embedding lies on a "
            f"sqrt(R) x sqrt(R) grid), got {num_registers}"
        )
    if num_registers and not 0 <= register_start < depth:
        raise ValueError(f"register_start must be in [0, depth={depth}), got {register_start}")


def frozen_pos_embed(num_patches: int, dim: int) -> nn.Parameter:
    """The fixed 2D sin-cos position embedding [1, num_patches, dim] of a square grid (not trained)."""
    pos = get_2d_sincos_pos_embed(dim, int(num_patches**0.5))
    return nn.Parameter(torch.from_numpy(pos).float().unsqueeze(0), requires_grad=False)


class RopeTables(nn.Module):
    """EVA-style 2D rotary tables as buffers ``freqs_cos`` / ``freqs_sin`` [P + N, head_dim].

    P identity rows (cos 1, sin 0) first: the prefix tokens (registers, in-context tokens)
    are not rotated. LightningDiT / DSR checkpoints store these buffers (persistent);
    JiT's do not (persistent=False).
    """

    def __init__(self, head_dim: int, grid: int, num_prefix: int = 0, *, persistent: bool = True) -> None:
        super().__init__()
        cos, sin = rope_2d_tables(grid, grid, head_dim, num_identity_rows=num_prefix)
        self.register_buffer("freqs_cos", cos, persistent=persistent)
        self.register_buffer("freqs_sin", sin, persistent=persistent)

    def tables(self) -> tuple[Tensor, Tensor]:
        return self.freqs_cos, self.freqs_sin


@dataclass(frozen=True)
class DenoiserConfig:
    """The arguments every denoiser takes, by the official code's names (keywords).

    Each model holds its release's values in ``defaults``; ``hidden_size``, ``depth`` and
    ``num_heads`` are (encoder, head) pairs for DiT^DH. A model's own arguments
    (``learn_sigma``, ``use_qknorm``, JiT's in-context tokens) are in its signature.
    """

    input_size: int  # latent (or image) side
    patch_size: int
    in_channels: int
    hidden_size: int | tuple[int, int]
    depth: int | tuple[int, int]
    num_heads: int | tuple[int, int]
    mlp_ratio: float = 4.0  # fixed: the released MLP widths
    class_dropout_prob: float = 0.1  # labels dropped to the null class in training (classifier-free guidance)
    num_classes: int = 1000
    num_registers: int = 0  # DSR's diffusion registers (a perfect square; 0: the baseline model)
    register_start: int = 0  # the block whose norm pass inserts them
    backend: str = "auto"  # the fused ops' backend, or "eager": the same model on plain PyTorch


class Denoiser(nn.Module):
    """What the class-conditional denoisers share: the configuration (keyword arguments over
    the subclass's ``defaults``, kept as ``config``) and its checks, and the diffusion registers.

    DSR's registers: R learned tokens plus a frozen sin-cos embedding on a sqrt(R) x sqrt(R)
    grid (:meth:`make_register_params`), prepended at block ``register_start`` by that
    block's fused norm pass and dropped before the final layer.
    """

    defaults: DenoiserConfig

    def __init__(self, *, learn_sigma: bool = False, **config: Any) -> None:
        super().__init__()
        self.config = cfg = replace(self.defaults, **config)
        name = type(self).__name__
        if cfg.mlp_ratio != 4.0:
            raise ValueError(f"{name}: mlp_ratio must be 4.0 (the released models), got {cfg.mlp_ratio}")
        if cfg.patch_size < 1 or cfg.input_size % cfg.patch_size:
            raise ValueError(f"{name}: input_size={cfg.input_size} must be a multiple of patch_size={cfg.patch_size}")
        self.input_size, self.patch_size, self.in_channels = cfg.input_size, cfg.patch_size, cfg.in_channels
        self.hidden_size, self.depth, self.num_heads = cfg.hidden_size, cfg.depth, cfg.num_heads
        self.num_registers, self.register_start, self.backend = cfg.num_registers, cfg.register_start, cfg.backend
        self.learn_sigma = learn_sigma
        self.out_channels = 2 * cfg.in_channels if learn_sigma else cfg.in_channels
        check_registers(cfg.num_registers, cfg.register_start, self.register_depth)

    @property
    def register_depth(self) -> int:
        """The blocks the registers may be inserted at."""
        return self.depth

    def make_register_params(self, dim: int, prefix: str = "") -> None:
        """``{prefix}register_tokens`` (learned, N(0, 1)) and ``{prefix}register_pos_embed`` (frozen
        sin-cos), [1, R, dim]; none without registers."""
        if not self.num_registers:
            return
        setattr(self, f"{prefix}register_tokens", nn.Parameter(torch.randn(1, self.num_registers, dim)))
        setattr(self, f"{prefix}register_pos_embed", frozen_pos_embed(self.num_registers, dim))

    def registers(self, prefix: str = "") -> Tensor | None:
        """The R register tokens as inserted, [R, D] (learned tokens + their position embedding);
        None without registers. ``prefix``: DiT^DH's "enc_" or "dec_" set."""
        if not self.num_registers:
            return None
        return (getattr(self, f"{prefix}register_tokens") + getattr(self, f"{prefix}register_pos_embed"))[0]

    def prefix_counts(self) -> list[int]:
        """Prefix tokens in front of the patches at each block: the registers from register_start on."""
        R, start = self.num_registers, self.register_start
        return [R if R and i >= start else 0 for i in range(self.register_depth)]

    def blocks_and_final_macs(self, mlp: int) -> dict[str, int]:
        """Multiply-adds per sample of the blocks (``mlp`` per token, adaLN once per sample) and of
        the final layer, with the prefix tokens of :meth:`prefix_counts`."""
        D, N, p = self.hidden_size, self.x_embedder.num_patches, self.patch_size
        parts = {
            f"blocks.{i}": block_macs(N + extra, D, mlp, adaln=6 * D * D)
            for i, extra in enumerate(self.prefix_counts())
        }
        parts["final"] = N * D * p * p * self.out_channels + 2 * D * D
        return parts

    def check_input(self, x: Tensor, t: Tensor, y: Tensor) -> None:
        """forward()'s arguments: x [B, in_channels, input_size, input_size], t [B], y [B] integer labels."""
        name, C, S = type(self).__name__, self.in_channels, self.input_size
        if not isinstance(x, Tensor) or x.dim() != 4 or x.shape[1] != C or tuple(x.shape[2:]) != (S, S):
            shape = list(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"{name}.forward(): argument 'x' must be [B, C={C}, {S}, {S}], got {shape}")
        B = x.shape[0]
        if not isinstance(t, Tensor) or t.shape != (B,):
            raise ValueError(f"{name}.forward(): argument 't' must be [B={B}], got {getattr(t, 'shape', t)}")
        if not isinstance(y, Tensor) or y.shape != (B,) or y.dtype not in (torch.int64, torch.int32):
            raise ValueError(
                f"{name}.forward(): argument 'y' must be integer class labels [B={B}], got "
                f"{getattr(y, 'shape', y)} {getattr(y, 'dtype', '')}"
            )
