"""What every reference model shares: diffusion registers, RoPE tables, input checks."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

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


def make_register_params(module: nn.Module, num_registers: int, dim: int, prefix: str = "") -> None:
    """``{prefix}register_tokens`` (learned, N(0, 1)) and ``{prefix}register_pos_embed`` (frozen sin-cos)."""
    if not num_registers:
        return
    tokens = nn.Parameter(torch.randn(1, num_registers, dim))
    pos = get_2d_sincos_pos_embed(dim, math.isqrt(num_registers))
    pos_embed = nn.Parameter(torch.from_numpy(pos).float().unsqueeze(0), requires_grad=False)
    setattr(module, f"{prefix}register_tokens", tokens)
    setattr(module, f"{prefix}register_pos_embed", pos_embed)


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


def check_input(model: nn.Module, x: Tensor, t: Tensor, y: Tensor, channels: int, size: int) -> None:
    name = type(model).__name__
    if not isinstance(x, Tensor) or x.dim() != 4 or x.shape[1] != channels or tuple(x.shape[2:]) != (size, size):
        shape = list(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{name}.forward(): argument 'x' must be [B, C={channels}, {size}, {size}], got {shape}")
    B = x.shape[0]
    if not isinstance(t, Tensor) or t.shape != (B,):
        raise ValueError(f"{name}.forward(): argument 't' must be [B={B}], got {getattr(t, 'shape', t)}")
    if not isinstance(y, Tensor) or y.shape != (B,) or y.dtype not in (torch.int64, torch.int32):
        raise ValueError(
            f"{name}.forward(): argument 'y' must be integer class labels [B={B}], got "
            f"{getattr(y, 'shape', y)} {getattr(y, 'dtype', '')}"
        )
