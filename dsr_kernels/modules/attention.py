"""``RegisterAttention``: the one self-attention module of the package's models.

timm's ViT ``Attention`` (parameter names ``qkv``, ``q_norm``, ``k_norm``, ``proj``) on
:func:`dsr_kernels.attention`, with what the DiT / LightningDiT / JiT blocks and the ViT
encoders need: learned kv registers, attention sinks, key masks, RoPE inside the kernel,
in-sequence prefix tokens for ``register_share``, and the attention statistics.
``backend="eager"`` runs the same module on plain PyTorch (``torch.cat`` of the
registers, ``F.scaled_dot_product_attention``), as the official model code does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dsr_kernels import outliers
from dsr_kernels.ops.attention import attention
from dsr_kernels.rope import apply_rope
from dsr_kernels.types import AttentionStats


class RMSNorm(nn.Module):
    """RMSNorm with a weight (LightningDiT, JiT): computed in float32, cast back, then scaled."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        y = x.float() * torch.rsqrt(x.float().square().mean(-1, keepdim=True) + self.eps)
        return y.to(x.dtype) * self.weight.to(x.dtype)


def _eager_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    kv_registers: tuple[Tensor, Tensor] | None,
    sinks: Tensor | None,
    key_mask: Tensor | None,
    attn_mask: Tensor | None,
    scale: float,
) -> Tensor:
    """What users write without the package: registers ``torch.cat``-ed to K/V, masks and the sink
    folded into an additive mask, ``F.scaled_dot_product_attention``. q, k, v [B, H, N, D]."""
    B, H, Nq, D = q.shape
    R = 0
    if kv_registers is not None:
        rk, rv = (t.to(q.dtype).expand(B, -1, -1, -1) if t.dim() == 3 else t.to(q.dtype) for t in kv_registers)
        R = rk.shape[2]
        k, v = torch.cat([rk, k], dim=2), torch.cat([rv, v], dim=2)
    mask = None
    if key_mask is not None or attn_mask is not None:
        tokens = torch.zeros(B, H, Nq, k.shape[2] - R, dtype=q.dtype, device=q.device)
        if key_mask is not None:
            tokens = tokens.masked_fill(~key_mask[:, None, None, :], float("-inf"))
        if attn_mask is not None:
            if attn_mask.dtype == torch.bool:
                tokens = tokens.masked_fill(~attn_mask, float("-inf"))
            else:
                tokens = tokens + attn_mask.to(q.dtype)
        mask = torch.cat([tokens.new_zeros(B, H, Nq, R), tokens], dim=-1)
    if sinks is not None:  # a key with k = 0, v = 0 whose logit is sinks[h]: one more outcome, no value
        k = torch.cat([k, k.new_zeros(B, H, 1, D)], dim=2)
        v = torch.cat([v, v.new_zeros(B, H, 1, v.shape[-1])], dim=2)
        if mask is None:
            mask = q.new_zeros(B, H, Nq, k.shape[2] - 1)
        sink_col = sinks.to(q.dtype).view(1, H, 1, 1).expand(B, H, Nq, 1)
        mask = torch.cat([mask, sink_col], dim=-1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


class RegisterAttention(nn.Module):
    """Multi-head self-attention with timm's parameter names (``qkv``, ``q_norm``, ``k_norm``, ``proj``).

    A state dict of ``timm.models.vision_transformer.Attention`` (qkv_bias=True) loads
    with ``strict=True`` when ``num_kv_registers=0`` and ``sinks=False``; so do the
    attention layers of DiT, LightningDiT and JiT checkpoints (``qk_norm=True``: RMSNorm
    with weight over each head, as LightningDiT and JiT). With ``num_kv_registers=R`` the
    module learns R key/value pairs per head (``register_k``, ``register_v``:
    [H, R, head_dim]) that every query may attend, so outlier attention has somewhere to
    go without adding tokens to the residual stream. With ``sinks=True`` it learns one
    sink logit per head (``sinks``: [H]).

    q, k and v are read in place from the qkv projection output and the attention output
    is written in the [B, N, H, head_dim] order the output projection consumes. Inside
    :func:`dsr_kernels.outliers.collect` it reports its attention statistics, computed by
    the same kernel.

    ``backend``: any backend of :func:`dsr_kernels.attention` ("auto", "triton",
    "torch", "reference"), or "eager": plain PyTorch as above (the statistics, when
    asked for, then come from the float64 "reference" op).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        qkv_bias: bool = True,
        qk_norm: bool = False,
        num_kv_registers: int = 0,
        sinks: bool = False,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"RegisterAttention: dim={dim} must be divisible by num_heads={num_heads}")
        if isinstance(num_kv_registers, bool) or not isinstance(num_kv_registers, int) or num_kv_registers < 0:
            raise ValueError(f"RegisterAttention: num_kv_registers must be an int >= 0, got {num_kv_registers!r}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.backend = backend
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.q_norm = RMSNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)
        if num_kv_registers:
            shape = (num_heads, num_kv_registers, self.head_dim)
            self.register_k = nn.Parameter(torch.empty(shape))
            self.register_v = nn.Parameter(torch.empty(shape))
        else:
            self.register_parameter("register_k", None)
            self.register_parameter("register_v", None)
        self.sinks = nn.Parameter(torch.zeros(num_heads)) if sinks else None
        self.reset_register_parameters()

    def reset_register_parameters(self) -> None:
        if self.register_k is not None:
            nn.init.trunc_normal_(self.register_k, std=0.02)
            nn.init.trunc_normal_(self.register_v, std=0.02)
        if self.sinks is not None:
            nn.init.zeros_(self.sinks)

    @property
    def num_kv_registers(self) -> int:
        return 0 if self.register_k is None else self.register_k.shape[1]

    def forward(
        self,
        x: Tensor,
        attn_mask: Tensor | None = None,
        *,
        key_mask: Tensor | None = None,
        rope: tuple[Tensor, Tensor] | None = None,
        num_prefix_tokens: int = 0,
        return_stats: bool = False,
    ) -> Tensor | tuple[Tensor, AttentionStats]:
        """x [B, N, C] -> [B, N, C] (and the attention statistics with return_stats).

        attn_mask: bool or additive float broadcastable to [B, H, N, N] (timm's argument);
        key_mask: [B, N] bool, True where a token may be attended; rope: (cos, sin)
        [N, head_dim] tables (interleaved pairs) applied to q and k inside the kernel;
        num_prefix_tokens: leading tokens that are in-sequence registers (for
        ``register_share``).
        """
        B, N, C = x.shape
        qkv = self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.unbind(2)  # [B, N, H, hd] views of the projection output
        q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, N, hd]
        kv_registers = None
        if self.register_k is not None:
            kv_registers = (self.register_k.to(q.dtype), self.register_v.to(q.dtype))
        recording = outliers.active_layer(self)
        want_stats = return_stats or recording is not None
        if self.backend == "eager" and not want_stats:
            if rope is not None:
                cos, sin = (t.to(q.dtype) for t in rope)
                q, k = apply_rope(q, cos, sin, "interleaved"), apply_rope(k, cos, sin, "interleaved")
            out, stats = (
                _eager_attention(
                    q,
                    k,
                    v,
                    kv_registers=kv_registers,
                    sinks=self.sinks,
                    key_mask=key_mask,
                    attn_mask=attn_mask,
                    scale=self.scale,
                ),
                None,
            )
        else:
            result = attention(
                q,
                k,
                v,
                kv_registers=kv_registers,
                sinks=self.sinks,
                key_mask=key_mask,
                attn_mask=attn_mask,
                num_prefix_tokens=num_prefix_tokens,
                scale=self.scale,
                return_stats=want_stats,
                rope=rope,
                backend="reference" if self.backend == "eager" else self.backend,
            )
            out, stats = result if want_stats else (result, None)
        if recording is not None:
            report, layer = recording
            report.record_attention(layer, stats, self.num_kv_registers)
        x = self.proj(out.transpose(1, 2).reshape(B, N, C))  # free when out is [B, N, H, hd] memory
        return (x, stats) if return_stats else x

    def extra_repr(self) -> str:
        return (
            f"num_heads={self.num_heads}, qk_norm={isinstance(self.q_norm, RMSNorm)}, "
            f"num_kv_registers={self.num_kv_registers}, sinks={self.sinks is not None}, backend={self.backend!r}"
        )
