"""Building blocks of the reference diffusion transformers, on the package's fused ops.

Parameter names follow the official implementations (DiT's models.py, LightningDiT as in
RAE / DSR, JiT), so their checkpoints load with ``strict=True``. Every module takes a
``backend``: the ops' backends ("auto", "triton", "torch", "reference", ...) run the fused
ops (``"reference"``: their float64 definitions); ``"eager"`` runs the same model on plain
PyTorch (``F.layer_norm`` / RMSNorm, modulate, ``torch.cat``,
``F.scaled_dot_product_attention``), as the official code does.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dsr_kernels import outliers
from dsr_kernels.modules.attention import RegisterAttention
from dsr_kernels.modules.norm_modulate import NormModulate
from dsr_kernels.types import NormModulateResult

# ----------------------------------------------------------------------------- embeddings


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int) -> np.ndarray:
    """MAE's fixed 2D sin-cos position embedding [grid_size**2, embed_dim] (float64 numpy).

    As in DiT / MAE: the first half of the channels encodes the column, the second the
    row; each half is [sin(pos w), cos(pos w)] with w_k = 10000^(-k / (embed_dim / 4)).
    """
    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0).reshape([2, 1, grid_size, grid_size])
    emb_h = sincos_1d(embed_dim // 2, grid[0])
    emb_w = sincos_1d(embed_dim // 2, grid[1])
    return np.concatenate([emb_h, emb_w], axis=1)


def sincos_1d(embed_dim: int, pos: np.ndarray) -> np.ndarray:
    omega = np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega
    out = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


class PatchEmbed(nn.Module):
    """[B, C, H, W] -> [B, (H / p) * (W / p), D] by a stride-p convolution (timm's names: proj)."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int, bias: bool = True) -> None:
        super().__init__()
        self.img_size, self.patch_size, self.in_chans = img_size, patch_size, in_chans
        self.num_patches = (img_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class BottleneckPatchEmbed(nn.Module):
    """JiT's patch embedding: a stride-p convolution to a narrow bottleneck, then 1x1 to D."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, bottleneck: int, embed_dim: int) -> None:
        super().__init__()
        self.img_size, self.patch_size, self.in_chans = img_size, patch_size, in_chans
        self.num_patches = (img_size // patch_size) ** 2
        self.proj1 = nn.Conv2d(in_chans, bottleneck, kernel_size=patch_size, stride=patch_size, bias=False)
        self.proj2 = nn.Conv2d(bottleneck, embed_dim, kernel_size=1, stride=1, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj2(self.proj1(x)).flatten(2).transpose(1, 2)


class TimestepEmbedder(nn.Module):
    """DiT's timestep embedding: 256 sinusoidal frequencies (cos first), then an MLP."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256) -> None:
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )

    @staticmethod
    def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
        return emb

    def forward(self, t: Tensor) -> Tensor:
        emb = self.timestep_embedding(t, self.frequency_embedding_size)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


class GaussianFourierEmbedder(nn.Module):
    """LightningDiT's timestep embedding: fixed random Fourier features [sin, cos](2 pi t W), then an MLP."""

    def __init__(self, hidden_size: int, embedding_size: int = 256, scale: float = 1.0) -> None:
        super().__init__()
        self.W = nn.Parameter(torch.normal(0.0, scale, (embedding_size,)), requires_grad=False)
        self.mlp = nn.Sequential(
            nn.Linear(2 * embedding_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )

    def forward(self, t: Tensor) -> Tensor:
        proj = t[:, None].float() * self.W[None].float() * 2 * math.pi
        emb = torch.cat([torch.sin(proj), torch.cos(proj)], dim=-1)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class embedding with a null class (index num_classes) for classifier-free guidance."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float) -> None:
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden_size)
        self.num_classes, self.dropout_prob = num_classes, dropout_prob

    def token_drop(self, labels: Tensor, force_drop_ids: Tensor | None = None) -> Tensor:
        if force_drop_ids is None:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            drop = force_drop_ids == 1
        return torch.where(drop, self.num_classes, labels)

    def forward(self, labels: Tensor, train: bool, force_drop_ids: Tensor | None = None) -> Tensor:
        if (train and self.dropout_prob > 0) or force_drop_ids is not None:
            labels = self.token_drop(labels, force_drop_ids)
        return self.embedding_table(labels)


# ----------------------------------------------------------------------------- layers


class Mlp(nn.Module):
    """DiT's MLP (timm names fc1, fc2) with tanh-approximated GELU."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class SwiGLUFFN(nn.Module):
    """SwiGLU MLP (names w12, w3): w3(silu(x1) * x2) with x1, x2 = w12(x).chunk(2), hidden int(2/3 * 4 D)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w12, self.w3 = nn.Linear(dim, 2 * hidden), nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        x1, x2 = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(x1) * x2)


def swiglu_hidden(dim: int, mlp_ratio: float = 4.0) -> int:
    return int(2 / 3 * int(dim * mlp_ratio))


class EagerNormModulate(NormModulate):
    """NormModulate on eager PyTorch (F.layer_norm / RMSNorm, modulate, torch.cat)."""

    def forward(self, x, shift=None, scale=None, *, registers=None, return_norms=False):
        if (self.record and outliers.active_layer(self) is not None) or return_norms:
            return super().forward(x, shift, scale, registers=registers, return_norms=return_norms)
        residual = None
        if registers is not None and registers.shape[-2]:  # R = 0 is no registers, as in norm_modulate
            regs = registers.expand(x.shape[0], -1, -1) if registers.dim() == 2 else registers
            residual = x = torch.cat([regs.to(x.dtype), x], dim=1)
        if self.kind == "layernorm":
            y = F.layer_norm(x, (self.dim,), self.weight, self.bias, eps=self.eps)
        else:
            y = (x.float() * torch.rsqrt(x.float().square().mean(-1, keepdim=True) + self.eps)).to(x.dtype)
            if self.weight is not None:
                y = y * self.weight.to(x.dtype)
        if scale is not None:
            y = y * (1 + scale.to(y.dtype)[:, None])
        if shift is not None:
            y = y + shift.to(y.dtype)[:, None]
        return NormModulateResult(y, residual, None)


def make_norm(
    dim: int, *, kind: str, affine: bool, backend: str, record: bool = True, bias: bool = False, eps: float = 1e-6
) -> NormModulate:
    """The fused norm (``NormModulate``), or its eager PyTorch twin for ``backend="eager"``."""
    cls = EagerNormModulate if backend == "eager" else NormModulate
    return cls(
        dim,
        kind=kind,
        eps=eps,
        elementwise_affine=affine,
        bias=bias,
        backend="auto" if backend == "eager" else backend,
        record=record,
    )


class Block(nn.Module):
    """adaLN-Zero transformer block (DiT / SiT / LightningDiT / JiT) on the fused ops.

    norm1 + modulate (+ the insertion of prefix tokens, at DSR's register_start block)
    is one ``norm_modulate`` pass; attention reads q/k/v in place and applies RoPE in the
    kernel; the 6 adaLN chunks are (shift, scale, gate) for attention then for the MLP.
    """

    def __init__(
        self, dim: int, num_heads: int, *, mlp: str, norm: str, qk_norm: bool = False, backend: str = "auto"
    ) -> None:
        super().__init__()
        affine = norm == "rmsnorm"  # DiT: LayerNorm without affine; LightningDiT, JiT: RMSNorm with weight
        self.norm1 = make_norm(dim, kind=norm, affine=affine, backend=backend)
        self.attn = RegisterAttention(dim, num_heads, qkv_bias=True, qk_norm=qk_norm, backend=backend)
        # The layer's outlier record takes the token norms of the block's input (norm1).
        self.norm2 = make_norm(dim, kind=norm, affine=affine, backend=backend, record=False)
        self.mlp = SwiGLUFFN(dim, swiglu_hidden(dim)) if mlp == "swiglu" else Mlp(dim, int(dim * 4.0))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(
        self,
        x: Tensor,
        c: Tensor,
        *,
        rope: tuple[Tensor, Tensor] | None = None,
        prefix: Tensor | None = None,
        num_prefix_tokens: int = 0,
    ) -> Tensor:
        """x [B, N, D]; c [B, D] (or [B, N, D] per token for DiT^DH's head); prefix [R, D] or [B, R, D]
        inserted in front of x by this block's first norm pass."""
        mod = self.adaLN_modulation(c).to(x.dtype)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=-1)
        if mod.dim() == 2:
            gate_msa, gate_mlp = gate_msa[:, None], gate_mlp[:, None]
            res = self.norm1(x, shift_msa, scale_msa, registers=prefix)
            h = res.residual if res.residual is not None else x  # prefix None or R = 0: no residual
            h = h + gate_msa * self.attn(res.out, rope=rope, num_prefix_tokens=num_prefix_tokens)
            return h + gate_mlp * self.mlp(self.norm2(h, shift_mlp, scale_mlp).out)
        # Per-token modulation (DiT^DH's head): norm without modulation, then modulate.
        if prefix is not None:
            raise ValueError("Block: prefix insertion needs per-sample modulation")
        h = x + gate_msa * self.attn(
            self.norm1(x).out * (1 + scale_msa) + shift_msa, rope=rope, num_prefix_tokens=num_prefix_tokens
        )
        return h + gate_mlp * self.mlp(self.norm2(h).out * (1 + scale_mlp) + shift_mlp)


class FinalLayer(nn.Module):
    """norm_final + modulate (shift, scale) + linear to p * p * out_channels."""

    def __init__(self, dim: int, patch_size: int, out_channels: int, *, norm: str, backend: str) -> None:
        super().__init__()
        self.norm_final = make_norm(dim, kind=norm, affine=norm == "rmsnorm", backend=backend)
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(c).to(x.dtype).chunk(2, dim=-1)
        if shift.dim() == 2:
            return self.linear(self.norm_final(x, shift, scale).out)
        return self.linear(self.norm_final(x).out * (1 + scale) + shift)


def unpatchify(x: Tensor, patch_size: int, channels: int) -> Tensor:
    """[B, T, p * p * C] -> [B, C, H, W] (DiT's einsum nhwpqc -> nchpwq)."""
    B, T, _ = x.shape
    h = w = int(T**0.5)
    x = x.reshape(B, h, w, patch_size, patch_size, channels)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(B, channels, h * patch_size, w * patch_size)


def init_adaln_zero(model: nn.Module) -> None:
    """DiT's initialisation: xavier linears, zero adaLN outputs and final linear."""

    def _basic(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    model.apply(_basic)
    for m in model.modules():
        if isinstance(m, (Block, FinalLayer)):
            nn.init.zeros_(m.adaLN_modulation[-1].weight)
            nn.init.zeros_(m.adaLN_modulation[-1].bias)
        if isinstance(m, FinalLayer):
            nn.init.zeros_(m.linear.weight)
            nn.init.zeros_(m.linear.bias)
