"""``RegisterAttention``: the one self-attention module of the package's models.

timm's ViT ``Attention`` (parameter names ``qkv``, ``q_norm``, ``k_norm``, ``proj``) on
:func:`dsr_kernels.attention`, with what the DiT / LightningDiT / JiT blocks and the ViT
encoders need: learned kv registers, attention sinks, key masks, RoPE inside the kernel,
in-sequence prefix tokens for ``register_share``, and the attention statistics.
``backend="eager"`` runs the same module on plain PyTorch (``torch.cat`` of the
registers, ``F.scaled_dot_product_attention``), as the official model code does.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

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


def eager_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    kv_registers: tuple[Tensor, Tensor] | None,
    sinks: Tensor | None,
    key_mask: Tensor | None,
    attn_mask: Tensor | None,
    scale: float,
    is_causal: bool = False,
    dropout_p: float = 0.0,
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
    if key_mask is not None or attn_mask is not None or is_causal:
        tokens = torch.zeros(B, H, Nq, k.shape[2] - R, dtype=q.dtype, device=q.device)
        if is_causal:
            tokens = tokens.masked_fill(~torch.ones_like(tokens[0, 0], dtype=torch.bool).tril(), float("-inf"))
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
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, dropout_p=dropout_p)


_WARNED: set[str] = set()


def _warn_once(reason: str) -> None:
    if reason not in _WARNED:
        _WARNED.add(reason)
        warnings.warn(f"RegisterAttention: {reason} (warned once per process)", stacklevel=3)


class RegisterAttention(nn.Module):
    """Multi-head self-attention with timm's ``Attention`` contract, on :func:`dsr_kernels.attention`.

    The constructor takes timm's arguments with timm's defaults (``qkv_bias=False``,
    ``qk_norm``, ``scale_norm``, ``proj_bias``, ``gated``, ``attn_head_dim``,
    ``dim_out``, ``attn_drop``, ``proj_drop``, ``norm_layer``) and the parameter names
    (``qkv``, ``q_norm``, ``k_norm``, ``norm``, ``gate``, ``proj``), so every state dict of
    ``timm.layers.Attention`` built with the same arguments loads with ``strict=True``
    (with ``num_kv_registers=0`` and ``sinks=False``); :meth:`from_timm` converts a built
    one, and :func:`dsr_kernels.integrations.timm.patch` swaps all of a model's. The
    attention layers of DiT, LightningDiT and JiT checkpoints load too (qk_norm with the
    default ``norm_layer``: RMSNorm with weight over each head, as LightningDiT and JiT).

    Extras (keyword-only): ``num_kv_registers=R`` learns R key/value pairs per head
    (``register_k``, ``register_v``: [H, R, head_dim]) that every query may attend, so
    outlier attention has somewhere to go without adding tokens to the residual stream;
    ``sinks=True`` learns one sink logit per head (``sinks``: [H]).

    q, k and v are read in place from the qkv projection output and the attention output
    is written in the [B, N, H, head_dim] order the output projection consumes. Inside
    :func:`dsr_kernels.outliers.collect` it reports its attention statistics, computed by
    the same kernel. With ``attn_drop > 0`` in training mode it runs PyTorch's SDPA with
    dropout (the fused kernels have none), warned once.

    ``backend``: any backend of :func:`dsr_kernels.attention` ("auto", "triton", "cpu",
    "torch", "reference"), or "eager": plain PyTorch (``torch.cat`` of the registers,
    ``F.scaled_dot_product_attention``), as the official model code does (the
    statistics, when asked for, then come from the float64 "reference" op).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        attn_head_dim: int | None = None,
        dim_out: int | None = None,
        qkv_bias: bool = False,
        qk_norm: bool = False,
        scale_norm: bool = False,
        proj_bias: bool = True,
        gated: bool = False,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        norm_layer: Callable[[int], nn.Module] | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        num_kv_registers: int = 0,
        sinks: bool = False,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if attn_head_dim is None and dim % num_heads != 0:
            raise ValueError(f"RegisterAttention: dim={dim} must be divisible by num_heads={num_heads}")
        if isinstance(num_kv_registers, bool) or not isinstance(num_kv_registers, int) or num_kv_registers < 0:
            raise ValueError(f"RegisterAttention: num_kv_registers must be an int >= 0, got {num_kv_registers!r}")
        dd = {"device": device, "dtype": dtype}
        norm_layer = RMSNorm if norm_layer is None else norm_layer
        self.num_heads = num_heads
        self.head_dim = dim // num_heads if attn_head_dim is None else attn_head_dim
        self.attn_dim = num_heads * self.head_dim
        self.scale = self.head_dim**-0.5
        self.backend = backend
        self.qkv = nn.Linear(dim, self.attn_dim * 3, bias=qkv_bias, **dd)
        self.q_norm = norm_layer(self.head_dim).to(**dd) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(self.head_dim).to(**dd) if qk_norm else nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.norm = norm_layer(self.attn_dim).to(**dd) if scale_norm else nn.Identity()
        self.gate = nn.Linear(dim, self.attn_dim, bias=qkv_bias, **dd) if gated else None
        self.proj = nn.Linear(self.attn_dim, dim_out or dim, bias=proj_bias, **dd)
        self.proj_drop = nn.Dropout(proj_drop)
        self.register_parameter("register_k", None)
        self.register_parameter("register_v", None)
        self.sinks = None
        self.add_registers(num_kv_registers, sinks=sinks)

    def add_registers(self, num_kv_registers: int = 0, *, sinks: bool = False) -> RegisterAttention:
        """Gives the module ``num_kv_registers`` new learned kv registers (when it has none) and,
        with ``sinks=True``, sink logits (when it has none), freshly initialised, on the
        module's device and dtype. Returns the module."""
        ref = self.qkv.weight
        if num_kv_registers and self.register_k is None:
            shape = (self.num_heads, num_kv_registers, self.head_dim)
            self.register_k = nn.Parameter(torch.empty(shape, device=ref.device, dtype=ref.dtype))
            self.register_v = nn.Parameter(torch.empty(shape, device=ref.device, dtype=ref.dtype))
            nn.init.trunc_normal_(self.register_k, std=0.02)
            nn.init.trunc_normal_(self.register_v, std=0.02)
        elif num_kv_registers and num_kv_registers != self.num_kv_registers:
            raise ValueError(
                f"RegisterAttention: has {self.num_kv_registers} kv registers already, asked for {num_kv_registers}"
            )
        if sinks and self.sinks is None:
            self.sinks = nn.Parameter(torch.zeros(self.num_heads, device=ref.device, dtype=ref.dtype))
        return self

    def reset_register_parameters(self) -> None:
        if self.register_k is not None:
            nn.init.trunc_normal_(self.register_k, std=0.02)
            nn.init.trunc_normal_(self.register_v, std=0.02)
        if self.sinks is not None:
            nn.init.zeros_(self.sinks)

    @classmethod
    def from_timm(
        cls, attn: nn.Module, *, num_kv_registers: int = 0, sinks: bool = False, backend: str = "auto"
    ) -> RegisterAttention:
        """A RegisterAttention with the configuration and the weights (shared, not copied) of a
        built ``timm.layers.Attention``; its outputs are timm's (the same function)."""
        missing = [n for n in ("qkv", "q_norm", "k_norm", "proj", "num_heads", "head_dim") if not hasattr(attn, n)]
        if missing:
            raise TypeError(
                f"RegisterAttention.from_timm(): expected a timm Attention module, got {type(attn).__name__} "
                f"without {', '.join(missing)}"
            )
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.num_heads, new.head_dim = attn.num_heads, attn.head_dim
        new.attn_dim = new.num_heads * new.head_dim
        new.scale = float(getattr(attn, "scale", new.head_dim**-0.5))
        new.backend = backend
        new.qkv, new.q_norm, new.k_norm, new.proj = attn.qkv, attn.q_norm, attn.k_norm, attn.proj
        new.attn_drop = getattr(attn, "attn_drop", nn.Dropout(0.0))
        new.norm = getattr(attn, "norm", nn.Identity())
        new.gate = getattr(attn, "gate", None)
        new.proj_drop = getattr(attn, "proj_drop", nn.Dropout(0.0))
        new.register_parameter("register_k", None)
        new.register_parameter("register_v", None)
        new.sinks = None
        new.train(attn.training)
        return new.add_registers(num_kv_registers, sinks=sinks)

    @property
    def num_kv_registers(self) -> int:
        return 0 if self.register_k is None else self.register_k.shape[1]

    def forward(
        self,
        x: Tensor,
        attn_mask: Tensor | None = None,
        is_causal: bool = False,
        *,
        key_mask: Tensor | None = None,
        rope: tuple[Tensor, Tensor] | None = None,
        num_prefix_tokens: int = 0,
        return_stats: bool = False,
    ) -> Tensor | tuple[Tensor, AttentionStats]:
        """x [B, N, C] -> [B, N, dim_out] (and the attention statistics with return_stats).

        attn_mask: bool or additive float broadcastable to [B, H, N, N] (timm's argument);
        is_causal: token i attends tokens j <= i (timm's argument; registers stay visible);
        key_mask: [B, N] bool, True where a token may be attended; rope: (cos, sin)
        [N, head_dim] tables (interleaved pairs) applied to q and k inside the kernel;
        num_prefix_tokens: leading tokens that are in-sequence registers (for
        ``register_share``).
        """
        B, N, C = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        qkv = self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.unbind(2)  # [B, N, H, hd] views of the projection output
        q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, N, hd]
        kv_registers = None
        if self.register_k is not None:
            kv_registers = (self.register_k.to(q.dtype), self.register_v.to(q.dtype))
        recording = outliers.active_layer(self)
        want_stats = return_stats or recording is not None
        dropout = self.attn_drop.p if self.training else 0.0
        if dropout > 0.0:
            _warn_once(f"attn_drop={dropout} in training runs PyTorch's SDPA with dropout (no fused kernel)")
        if (self.backend == "eager" or dropout > 0.0) and not want_stats:
            if rope is not None:
                cos, sin = (t.to(q.dtype) for t in rope)
                q, k = apply_rope(q, cos, sin, "interleaved"), apply_rope(k, cos, sin, "interleaved")
            out, stats = (
                eager_attention(
                    q,
                    k,
                    v,
                    kv_registers=kv_registers,
                    sinks=self.sinks,
                    key_mask=key_mask,
                    attn_mask=attn_mask,
                    scale=self.scale,
                    is_causal=is_causal,
                    dropout_p=dropout,
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
                causal=is_causal,
                num_prefix_tokens=num_prefix_tokens,
                scale=self.scale,
                return_stats=want_stats,
                rope=rope,
                # (training statistics: the key mass comes from the backward's dK/dV pass)
                key_mass_in_backward=recording is not None and getattr(recording[0], "key_mass_in_backward", False),
                backend="reference" if self.backend == "eager" else self.backend,
            )
            out, stats = result if want_stats else (result, None)
        if recording is not None:
            report, layer = recording
            report.record_attention(layer, stats, self.num_kv_registers)
        x = out.transpose(1, 2).reshape(B, N, self.attn_dim)  # free when out is [B, N, H, hd] memory
        x = self.norm(x)
        if gate is not None:
            x = x * gate
        x = self.proj_drop(self.proj(x))
        return (x, stats) if return_stats else x

    def extra_repr(self) -> str:
        return (
            f"num_heads={self.num_heads}, head_dim={self.head_dim}, "
            f"qk_norm={not isinstance(self.q_norm, nn.Identity)}, "
            f"num_kv_registers={self.num_kv_registers}, sinks={self.sinks is not None}, backend={self.backend!r}"
        )
