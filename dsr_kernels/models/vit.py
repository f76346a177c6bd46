"""ViT encoders on the fused ops: DINOv2 (CLS + trained registers) and SigLIP (no prefix tokens).

The frozen encoder of the RAE / DSR pipeline. Parameter names, the token order and the
forward pass follow timm's ``VisionTransformer`` (``timm/models/vision_transformer.py``),
so a timm state dict of the same configuration loads with ``strict=True`` and gives the
same outputs:

- DINOv2 with registers (``vit_base_patch14_reg4_dinov2``, ...): ``[CLS ; 4 registers ;
  patches]``, the position embedding on the patches only (``no_embed_class``), LayerScale
  (``ls1.gamma``, ``ls2.gamma``); pooled output: the CLS token.
- SigLIP / SigLIP2 (``vit_base_patch16_siglip_256``, ``vit_so400m_patch14_siglip_224``,
  ...): patches only, no LayerScale, a MAP head (``attn_pool``: one learned query
  attending all tokens, then an MLP). SigLIP2's released weights are tags of the same
  architectures in timm (``.v2_webli``).

Each block runs ``norm_modulate`` (LayerNorm with affine; the same pass measures the token
norms when the outlier key mask is on), ``attention`` on q/k/v read in place, and an MLP
whose activation is ``ttr_activation`` once test-time registers are applied
(:mod:`dsr_kernels.registers`), plain GELU otherwise. ``backend="eager"`` builds the same
model on plain PyTorch (``F.layer_norm``, ``F.scaled_dot_product_attention``, ``F.gelu``).

:class:`RAEEncoder` wraps an encoder as RAE's stage 1: drop the prefix tokens, LayerNorm
without affine, per-channel latent normalisation, and its inverse for the decoder.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dsr_kernels.backends import resolve
from dsr_kernels.models.flops import block_macs, mlp_macs
from dsr_kernels.models.layers import PatchEmbed, make_norm
from dsr_kernels.modules.attention import RegisterAttention
from dsr_kernels.ops.attention import attention
from dsr_kernels.ops.norm_modulate import norm_modulate
from dsr_kernels.ops.ttr_activation import check_neurons, ttr_activation_op
from dsr_kernels.reference.ttr_activation import ttr_activation_ref

GLOBAL_POOLS = ("token", "avg", "map", "")
ACTIVATIONS = {"gelu": "none", "gelu_tanh": "tanh"}


@dataclass(frozen=True)
class TestTimeRegisterSettings:
    """How the test-time registers of a :class:`VisionTransformer` behave (see ``ttr_activation``)."""

    num_registers: int = 1
    patch_values: str = "zero"
    register_value: str = "signed_max"
    released_indexing: bool = False  # leave row 0 alone even without a CLS token, as the released code

    def first_edited_row(self, num_prefix_tokens: int) -> int:
        """The first token whose redirected neurons are edited: after the prefix tokens (released
        indexing: never before token 1, CLS or not)."""
        return max(num_prefix_tokens, 1) if self.released_indexing else num_prefix_tokens


class LayerScale(nn.Module):
    """x * gamma (timm's name), DINOv2's per-channel residual scale."""

    def __init__(self, dim: int, init_values: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(init_values * torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma.to(x.dtype)


class RegisterNeuronGELU(nn.Module):
    """GELU, or, with register neurons set, GELU fused with their redirection into the test-time registers.

    timm's ``mlp.act``: where the released test-time register code hooks. ``neurons`` [K]
    (a non-persistent buffer, None when this layer has none) and ``settings`` are set by
    :func:`dsr_kernels.registers.apply_test_time_registers`.

    A host copy of ``neurons`` is taken when they are assigned (and again after an in-place
    change, outside torch.compile): the fused op checks that copy (range, duplicates) and
    sends it to the device asynchronously, so a forward on a GPU never waits for the device
    to read the neurons back, compiled or not. Under torch.compile, assign new neurons
    rather than editing them in place.
    """

    def __init__(self, approximate: str = "none", *, backend: str = "auto") -> None:
        super().__init__()
        self.approximate, self.backend = approximate, backend
        self.register_buffer("_neurons", None, persistent=False)
        self._neurons_host: tuple[int, Tensor] | None = None  # (the buffer's version, its [K] int64 CPU copy)
        self.settings: TestTimeRegisterSettings | None = None
        self.num_prefix_tokens = 0  # rows left alone: the encoder's prefix tokens (or 1, released indexing)

    @property
    def neurons(self) -> Tensor | None:
        """[K] int64 register neurons on the module's device, or None."""
        return self._neurons

    @neurons.setter
    def neurons(self, value: Tensor | None) -> None:
        self._neurons = value
        self._neurons_host = None if value is None else (value._version, value.detach().to("cpu", torch.long))

    def _host_neurons(self) -> Tensor:
        """The host copy of ``neurons``, taken again (one read-back) when they changed in place."""
        version, host = self._neurons_host
        if not torch.compiler.is_compiling() and version != self._neurons._version:
            self.neurons = self._neurons
            host = self._neurons_host[1]
        return host

    def forward(self, h: Tensor) -> Tensor:
        """h [B, T, F] (fc1 output) -> [B, T, F]."""
        if self.neurons is None:
            return F.gelu(h, approximate=self.approximate)
        s = self.settings
        kw = dict(
            num_registers=s.num_registers,
            num_prefix_tokens=self.num_prefix_tokens,
            patch_values=s.patch_values,
            register_value=s.register_value,
            approximate=self.approximate,
        )
        if self.backend == "eager":
            return ttr_activation_ref(h, self.neurons, compute_dtype=h.dtype, **kw)
        neurons = self._host_neurons()  # (the op checks it and copies it to h's device without a sync)
        if not torch.compiler.is_compiling():
            neurons = check_neurons("RegisterNeuronGELU", neurons, h.shape[2])  # the Python error types
        return ttr_activation_op(h, neurons, backend=resolve("ttr_activation", self.backend, h), **kw)

    def extra_repr(self) -> str:
        k = 0 if self.neurons is None else self.neurons.numel()
        return f"approximate={self.approximate!r}, register_neurons={k}"


class Mlp(nn.Module):
    """timm's Mlp: fc1, act, fc2."""

    def __init__(self, dim: int, hidden: int, *, approximate: str, backend: str) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = RegisterNeuronGELU(approximate, backend=backend)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm ViT block: x + ls1(attn(norm1(x))), then x + ls2(mlp(norm2(x)))."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        mlp_hidden: int,
        qkv_bias: bool,
        init_values: float | None,
        approximate: str,
        norm_eps: float,
        backend: str,
    ) -> None:
        super().__init__()
        norm = dict(kind="layernorm", affine=True, bias=True, eps=norm_eps, backend=backend)
        self.norm1 = make_norm(dim, **norm)
        self.attn = RegisterAttention(dim, num_heads, qkv_bias=qkv_bias, backend=backend)
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.norm2 = make_norm(dim, **norm, record=False)
        self.mlp = Mlp(dim, mlp_hidden, approximate=approximate, backend=backend)
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()

    def forward(
        self, x: Tensor, *, num_prefix_tokens: int = 0, num_trailing: int = 0, mask_threshold: float | None = None
    ) -> Tensor:
        """x [B, T, D] -> [B, T, D]. ``mask_threshold``: keys whose input norm exceeds it are not
        attended (the outlier-masking baseline), except the leading ``num_prefix_tokens`` and
        the ``num_trailing`` test-time registers."""
        res = self.norm1(x, return_norms=mask_threshold is not None)
        key_mask = None
        if mask_threshold is not None:
            key_mask = res.norms <= mask_threshold  # [B, T], norms from the same pass as the norm
            key_mask[:, :num_prefix_tokens] = True
            if num_trailing:
                key_mask[:, -num_trailing:] = True
        x = x + self.ls1(self.attn(res.out, key_mask=key_mask, num_prefix_tokens=num_prefix_tokens))
        return x + self.ls2(self.mlp(self.norm2(x).out))


class AttentionPoolLatent(nn.Module):
    """timm's MAP head (SigLIP): ``latent_len`` learned queries attend every token, then an MLP."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        mlp_hidden: int,
        qkv_bias: bool = True,
        latent_len: int = 1,
        approximate: str = "none",
        norm_eps: float = 1e-6,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.num_heads, self.head_dim, self.backend = num_heads, dim // num_heads, backend
        self.latent = nn.Parameter(torch.zeros(1, latent_len, dim))
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, mlp_hidden, approximate=approximate, backend=backend)
        nn.init.trunc_normal_(self.latent, std=dim**-0.5)

    def forward(self, x: Tensor) -> Tensor:
        """x [B, N, D] -> [B, D] (the first latent query's output)."""
        B, N, C = x.shape
        L, H, hd = self.latent.shape[1], self.num_heads, self.head_dim
        q = self.q(self.latent.to(x.dtype).expand(B, -1, -1)).view(B, L, H, hd).transpose(1, 2)  # [B, H, L, hd]
        k, v = self.kv(x).view(B, N, 2, H, hd).unbind(2)
        k, v = k.transpose(1, 2), v.transpose(1, 2)  # [B, H, N, hd] views
        if self.backend == "eager":
            o = F.scaled_dot_product_attention(q, k, v)
        else:
            o = attention(q, k, v, backend=self.backend)
        o = self.proj(o.transpose(1, 2).reshape(B, L, C))
        o = o + self.mlp(self.norm(o))
        return o[:, 0]


class VisionTransformer(nn.Module):
    """A ViT encoder with timm's names and forward; forward(images [B, C, H, W]) -> pooled [B, D] or logits.

    ``num_prefix_tokens`` (CLS + trained registers, as timm) lead the sequence that
    :meth:`forward_features` returns ([B, num_prefix_tokens + N, D]). Test-time registers
    (``num_test_time_registers``, set by :mod:`dsr_kernels.registers`) are appended zero
    tokens without position embedding that run through every block and are dropped from
    every output.
    """

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 0,
        global_pool: str = "token",
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        *,  # timm's order up to here; its next ones (qk_norm, ...) are not these
        init_values: float | None = None,
        class_token: bool = True,
        reg_tokens: int = 0,
        no_embed_class: bool = False,
        fc_norm: bool | None = None,
        act_layer: str = "gelu",
        norm_eps: float = 1e-6,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if global_pool not in GLOBAL_POOLS:
            raise ValueError(f"VisionTransformer: global_pool must be one of {GLOBAL_POOLS}, got {global_pool!r}")
        if act_layer not in ACTIVATIONS:
            raise ValueError(f"VisionTransformer: act_layer must be one of {tuple(ACTIVATIONS)}, got {act_layer!r}")
        if global_pool == "token" and not class_token:
            raise ValueError("VisionTransformer: global_pool='token' needs class_token=True")
        if isinstance(reg_tokens, bool) or not isinstance(reg_tokens, int) or reg_tokens < 0:
            raise ValueError(f"VisionTransformer: reg_tokens must be an int >= 0, got {reg_tokens!r}")
        if not 0 < patch_size <= img_size:
            raise ValueError(f"VisionTransformer: patch_size must be in [1, img_size={img_size}], got {patch_size}")
        if embed_dim % num_heads:
            raise ValueError(f"VisionTransformer: embed_dim={embed_dim} must be divisible by num_heads={num_heads}")
        self.img_size, self.patch_size, self.in_chans = img_size, patch_size, in_chans
        self.embed_dim, self.depth, self.num_heads, self.backend = embed_dim, depth, num_heads, backend
        self.global_pool, self.no_embed_class, self.num_classes = global_pool, no_embed_class, num_classes
        self.num_reg_tokens = reg_tokens
        self.num_prefix_tokens = int(class_token) + reg_tokens
        self.mlp_hidden = int(embed_dim * mlp_ratio)
        self.num_test_time_registers = 0
        self.outlier_mask_threshold: float | None = None  # the key-masking baseline (dsr_kernels.registers)
        approximate = ACTIVATIONS[act_layer]

        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim, bias=True)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if class_token else None
        self.reg_token = nn.Parameter(torch.zeros(1, reg_tokens, embed_dim)) if reg_tokens else None
        num_patches = self.patch_embed.num_patches
        embed_len = num_patches if no_embed_class else num_patches + self.num_prefix_tokens
        self.pos_embed = nn.Parameter(torch.zeros(1, embed_len, embed_dim))
        # what the blocks and the MAP head (attention + MLP both) are built with
        layer = dict(
            mlp_hidden=self.mlp_hidden, qkv_bias=qkv_bias, approximate=approximate, norm_eps=norm_eps, backend=backend
        )
        self.blocks = nn.ModuleList(
            [Block(embed_dim, num_heads, init_values=init_values, **layer) for _ in range(depth)]
        )
        use_fc_norm = global_pool == "avg" if fc_norm is None else fc_norm
        final = dict(kind="layernorm", affine=True, bias=True, eps=norm_eps, backend=backend, record=False)
        self.norm = nn.Identity() if use_fc_norm else make_norm(embed_dim, **final)
        self.attn_pool = None
        if global_pool == "map":
            self.attn_pool = AttentionPoolLatent(embed_dim, num_heads, **layer)
        self.fc_norm = nn.LayerNorm(embed_dim, eps=norm_eps) if use_fc_norm else nn.Identity()
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6)
        if self.reg_token is not None:
            nn.init.normal_(self.reg_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    # ------------------------------------------------------------------ forward

    def _check_images(self, x: Tensor) -> None:
        size = (self.img_size, self.img_size)
        if not isinstance(x, Tensor) or x.dim() != 4 or x.shape[1] != self.in_chans or tuple(x.shape[2:]) != size:
            seen = list(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(
                f"{type(self).__name__}: images must be [B, {self.in_chans}, {size[0]}, {size[1]}] "
                f"(img_size={self.img_size}; build the model with img_size=... for another size), got {seen}"
            )

    def embed(self, x: Tensor) -> Tensor:
        """images [B, C, H, W] -> tokens [B, P + N (+ test-time registers), D], as timm's _pos_embed."""
        self._check_images(x)
        x = self.patch_embed(x)  # [B, N, D]
        B = x.shape[0]
        prefix = []
        if self.cls_token is not None:
            prefix.append(self.cls_token.to(x.dtype).expand(B, -1, -1))
        if self.reg_token is not None:
            prefix.append(self.reg_token.to(x.dtype).expand(B, -1, -1))
        pos = self.pos_embed.to(x.dtype)
        if self.no_embed_class:  # DINOv2 with registers: position embedding on the patches only
            x = torch.cat([*prefix, x + pos], dim=1)
        else:
            x = torch.cat([*prefix, x], dim=1) + pos
        if self.num_test_time_registers:  # zero tokens, no position embedding, at the end
            x = torch.cat([x, x.new_zeros(B, self.num_test_time_registers, x.shape[-1])], dim=1)
        return x

    def run_blocks(self, x: Tensor, blocks: range | None = None) -> Tensor:
        """The blocks in ``blocks`` (default: all) over embedded tokens [B, T, D]."""
        for i in blocks if blocks is not None else range(self.depth):
            x = self.blocks[i](
                x,
                num_prefix_tokens=self.num_prefix_tokens,
                num_trailing=self.num_test_time_registers,
                mask_threshold=self.outlier_mask_threshold,
            )
        return x

    def forward_tokens(self, x: Tensor) -> Tensor:
        """images -> the residual stream after the last block, before the final norm,
        [B, P + N, D] (test-time registers dropped)."""
        x = self.run_blocks(self.embed(x))
        return x[:, : x.shape[1] - self.num_test_time_registers]

    def forward_features(self, x: Tensor) -> Tensor:
        """images [B, C, H, W] -> all tokens after the final norm, [B, num_prefix_tokens + N, D]."""
        x = self.run_blocks(self.embed(x))
        x = self._final_norm(x)
        return x[:, : x.shape[1] - self.num_test_time_registers]

    def _final_norm(self, x: Tensor) -> Tensor:
        return x if isinstance(self.norm, nn.Identity) else self.norm(x).out

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """[B, P + N, D] -> pooled [B, D] (or logits [B, num_classes])."""
        if self.attn_pool is not None:
            x = self.attn_pool(x)
        elif self.global_pool == "avg":
            x = x[:, self.num_prefix_tokens :].mean(dim=1)
        elif self.global_pool == "token":
            x = x[:, 0]
        x = self.fc_norm(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    # ------------------------------------------------------------------ test-time registers

    def mlp_activations(self) -> list[RegisterNeuronGELU]:
        """Each block's MLP activation module (where register neurons live), by block."""
        return [block.mlp.act for block in self.blocks]

    def set_test_time_registers(
        self, settings: TestTimeRegisterSettings | None, neurons: dict[int, Tensor] | None = None
    ) -> None:
        """Appends ``settings.num_registers`` test-time registers and redirects ``neurons``
        ({layer: [K] int64}) into them; ``None`` removes them. Prefer
        :func:`dsr_kernels.registers.apply_test_time_registers`, which validates and can be undone."""
        acts = self.mlp_activations()
        for act in acts:
            act.neurons, act.settings = None, None
        self.num_test_time_registers = 0 if settings is None else settings.num_registers
        if settings is None:
            return
        skip = settings.first_edited_row(self.num_prefix_tokens)
        for layer, idx in (neurons or {}).items():
            if idx.numel():
                acts[layer].neurons = idx.to(device=self.pos_embed.device, dtype=torch.long)
                acts[layer].settings = settings
                acts[layer].num_prefix_tokens = skip

    # ------------------------------------------------------------------ FLOPs

    def macs_by_part(self) -> dict[str, int]:
        """Multiply-adds per image of each part (see :mod:`dsr_kernels.models.flops`)."""
        D, N, p, C = self.embed_dim, self.patch_embed.num_patches, self.patch_size, self.in_chans
        T = self.num_prefix_tokens + N + self.num_test_time_registers
        parts = {"embed": N * C * p * p * D}
        for i in range(self.depth):
            parts[f"blocks.{i}"] = block_macs(T, D, mlp_macs(D, self.mlp_hidden))
        if self.attn_pool is not None:
            L, Tp = self.attn_pool.latent.shape[1], self.num_prefix_tokens + N
            parts["attn_pool"] = 2 * L * D * D + Tp * 2 * D * D + 2 * L * Tp * D + L * mlp_macs(D, self.mlp_hidden)
        if self.num_classes:
            parts["head"] = D * self.num_classes
        return parts


class RAEEncoder(nn.Module):
    """RAE's stage-1 encoder: a frozen ViT -> patch tokens -> LayerNorm without affine -> normalised latents.

    ``encode(images [B, C, H, W])`` -> [B, D, h, w]: the encoder's residual stream after
    its last block (``forward_tokens``; test-time registers, if applied, dropped), the
    prefix tokens (CLS, trained registers) dropped, LayerNorm without affine (eps
    ``norm_eps``), then (z - latent_mean) / sqrt(latent_var + eps) per channel.
    ``decode_input(latents)`` inverts the last step for the decoder. ``latent_mean`` and
    ``latent_var`` are buffers of shape [D] (or anything broadcastable to [D, h, w]); fill
    them from data with :meth:`fit_latent_statistics`.
    """

    def __init__(
        self,
        encoder: VisionTransformer,
        latent_mean: Tensor | None = None,
        latent_var: Tensor | None = None,
        *,
        eps: float = 1e-5,
        norm_eps: float = 1e-6,
    ) -> None:
        super().__init__()
        if not isinstance(encoder, VisionTransformer):
            raise TypeError(f"RAEEncoder: 'encoder' must be a VisionTransformer, got {type(encoder).__name__}")
        D = encoder.embed_dim
        self.encoder, self.eps, self.norm_eps = encoder, eps, norm_eps
        self.grid = encoder.img_size // encoder.patch_size
        mean = torch.zeros(D) if latent_mean is None else latent_mean.detach().float().clone()
        var = torch.ones(D) if latent_var is None else latent_var.detach().float().clone()
        for name, t in (("latent_mean", mean), ("latent_var", var)):
            if t.dim() == 0 or t.shape[0] != D or t.dim() > 3:
                raise ValueError(f"RAEEncoder: '{name}' must be [D={D}] or [D, h, w], got {list(t.shape)}")
        self.register_buffer("latent_mean", mean)
        self.register_buffer("latent_var", var)

    def _stats(self, like: Tensor) -> tuple[Tensor, Tensor]:
        def shaped(t: Tensor) -> Tensor:
            return t.view(t.shape[0], *([1] * (3 - t.dim()))).to(like.dtype)

        return shaped(self.latent_mean), shaped(self.latent_var)

    def tokens(self, images: Tensor, *, return_norms: bool = False) -> tuple[Tensor, Tensor | None]:
        """Patch tokens after the affine-free LayerNorm [B, N, D], and (return_norms) the
        norm of each before it [B, N] float32 (DSR's encoder-output outlier statistic)."""
        x = self.encoder.forward_tokens(images)[:, self.encoder.num_prefix_tokens :]
        if self.encoder.backend == "eager" and not return_norms:
            return F.layer_norm(x, (x.shape[-1],), eps=self.norm_eps), None
        backend = "auto" if self.encoder.backend == "eager" else self.encoder.backend
        res = norm_modulate(x, eps=self.norm_eps, return_norms=return_norms, backend=backend)
        return res.out, res.norms

    def encode(self, images: Tensor) -> Tensor:
        """images [B, C, H, W] -> latents [B, D, h, w]."""
        z, _ = self.tokens(images)
        B, N, D = z.shape
        z = z.transpose(1, 2).reshape(B, D, self.grid, self.grid)
        mean, var = self._stats(z)
        return (z - mean) / torch.sqrt(var + self.eps)

    def decode_input(self, latents: Tensor) -> Tensor:
        """The inverse of the latent normalisation: [B, D, h, w] -> the decoder's input [B, D, h, w]."""
        mean, var = self._stats(latents)
        return latents * torch.sqrt(var + self.eps) + mean

    forward = encode

    @torch.no_grad()
    def fit_latent_statistics(self, batches) -> None:
        """Per-channel mean and (biased) variance of the un-normalised latents over ``batches``
        (an iterable of image tensors), in float64; stored in ``latent_mean`` / ``latent_var``."""
        total = s1 = s2 = 0
        for images in batches:
            z, _ = self.tokens(images)
            z = z.double().reshape(-1, z.shape[-1])
            total, s1, s2 = total + z.shape[0], s1 + z.sum(0), s2 + z.square().sum(0)
        if not total:
            raise ValueError("RAEEncoder.fit_latent_statistics(): 'batches' yielded no images")
        mean = s1 / total
        self.latent_mean = mean.float().to(self.latent_mean.device)
        self.latent_var = (s2 / total - mean.square()).clamp_min(0).float().to(self.latent_var.device)
