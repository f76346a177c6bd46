"""Analytic FLOP counts of the reference models, from their configuration.

Counted: every matrix product of the forward pass -- patch embeddings (convolutions),
the timestep MLP, q/k/v and output projections, the MLPs, the adaLN projections (once per
sample, or per token in DiT^DH's head), the two attention products (Q K^T and P V, 2 T^2 D
multiply-adds per block), the final layer. Not counted: norms, softmax, RoPE,
activations, residual adds (as the published numbers do). ``macs`` are multiply-adds
(the DiT paper's "Gflops"); ``flops = 2 * macs``.

Reproduces the published numbers: DiT-S/2, B/2, L/2, XL/2 at 256 px: 6.06, 23.0, 80.7,
118.6 GMACs; LightningDiT-S/B/XL on 256 RAE tokens of 768 channels: 12.4 / 46.6 / 238.1
GFLOPs, and with 36 registers (from block 4 for S and B, 8 for XL) 13.7 / 51.2 / 262.9.
"""

from __future__ import annotations

from typing import NamedTuple

from torch import nn

from dsr_kernels.models.dit import DiT
from dsr_kernels.models.jit import JiT
from dsr_kernels.models.layers import swiglu_hidden
from dsr_kernels.models.lightningdit import DiTDH, LightningDiT


class FlopCount(NamedTuple):
    """flops = 2 * macs for a batch; by_block: MACs of each part ("embed", "blocks.i", "final")."""

    flops: int
    macs: int
    by_block: dict[str, int]


def _block_macs(T: int, D: int, mlp: str, *, per_token_adaln: bool = False) -> int:
    mlp_macs = 3 * D * swiglu_hidden(D) if mlp == "swiglu" else 2 * D * 4 * D
    adaln = D * 6 * D * (T if per_token_adaln else 1)
    return T * (4 * D * D + mlp_macs) + 2 * T * T * D + adaln


def flops(model: nn.Module, batch_size: int = 1) -> FlopCount:
    """The forward FLOPs of ``model`` for ``batch_size`` samples (see the module docstring)."""
    parts: dict[str, int] = {}
    if isinstance(model, DiTDH):
        (De, Dd), (Le, Ld) = model.hidden_size, model.depth
        N, C, p, R = model.s_embedder.num_patches, model.in_channels, model.patch_size, model.num_registers
        t_in = 2 * model.t_embedder.W.numel()
        parts["embed"] = N * C * p * p * De + N * C * p * p * Dd + t_in * De + De * De
        for i in range(Le):
            T = N + (R if R and i >= model.register_start else 0)
            parts[f"blocks.{i}"] = _block_macs(T, De, "swiglu")
        T = N + R
        parts["s_projector"] = T * De * Dd
        for j in range(Ld):
            parts[f"blocks.{Le + j}"] = _block_macs(T, Dd, "swiglu", per_token_adaln=True)
        parts["final"] = N * Dd * p * p * model.out_channels + N * Dd * 2 * Dd
    elif isinstance(model, (DiT, LightningDiT, JiT)):
        D, N, p, C = model.hidden_size, model.x_embedder.num_patches, model.patch_size, model.in_channels
        if isinstance(model, JiT):
            bn = model.x_embedder.proj1.out_channels
            parts["embed"] = N * C * p * p * bn + N * bn * D + 256 * D + D * D
            counts = model._prefix_counts()
            mlp = "swiglu"
        else:
            t_in = 256 if isinstance(model, DiT) else 2 * model.t_embedder.W.numel()
            parts["embed"] = N * C * p * p * D + t_in * D + D * D
            R = model.num_registers
            counts = [R if R and i >= model.register_start else 0 for i in range(model.depth)]
            mlp = "gelu" if isinstance(model, DiT) else "swiglu"
        for i, extra in enumerate(counts):
            parts[f"blocks.{i}"] = _block_macs(N + extra, D, mlp)
        parts["final"] = N * D * p * p * model.out_channels + D * 2 * D
    else:
        raise TypeError(f"flops(): no FLOP formula for {type(model).__name__}")
    macs = batch_size * sum(parts.values())
    by_block = {k: batch_size * v for k, v in parts.items()}
    return FlopCount(2 * macs, macs, by_block)
