"""The fused attention in diffusers' transformers: a ``"dsr"`` attention backend and a processor.

Two ways in, for what the installed diffusers offers:

- **The attention dispatcher** (models whose processors call ``dispatch_attention_fn``,
  e.g. Flux, Wan, QwenImage): importing this module registers ``"dsr"`` as one of
  diffusers' attention backends, so ``model.set_attention_backend("dsr")`` and
  ``with attention_backend("dsr"):`` run :func:`dsr_kernels.scaled_dot_product_attention`.
  The dispatcher passes no layer identity, so this path has no registers or statistics.
  Processors that call torch's SDPA themselves (DiT, PixArt, SD3: ``AttnProcessor2_0``,
  ``JointAttnProcessor2_0``) never see a backend: ``model.set_attention_backend("dsr")``
  warns, naming them (this module wraps diffusers' ``ModelMixin.set_attention_backend``
  for that); :func:`patch` is the way in for them.
- **The processor** :class:`DSRAttnProcessor`, for every diffusers attention module
  (``Attention`` of DiT, PixArt, SD3, ... and the ``AttentionModuleMixin`` modules of
  Flux): it wraps the module's own processor, so the projections, norms and RoPE stay
  diffusers' code, and only the attention product runs on the fused kernels, with
  optional learned kv registers per layer (``register_k`` / ``register_v`` [H, R, D],
  trainable, saved in the model's state dict), sink logits per head, and the attention
  statistics recorded per layer inside :func:`dsr_kernels.outliers.collect`.
  :func:`patch` installs it on every attention module of a model or pipeline.

How the processor reaches the attention product: processors that use the dispatcher get
``"dsr"`` as their backend for the call; the others call
``torch.nn.functional.scaled_dot_product_attention``, which is redirected to the fused
one for the duration of the processor's call (the redirection is process-wide while it
lasts: do not run a model in another thread meanwhile). Calls the fused kernels cannot
serve (dropout, a float mask that needs a gradient) run PyTorch's SDPA with a warning,
as :func:`dsr_kernels.scaled_dot_product_attention` does.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dsr_kernels import outliers
from dsr_kernels.ops.attention import attention
from dsr_kernels.ops.attention_dropin import scaled_dot_product_attention

__all__ = ["BACKEND_NAME", "DSRAttnProcessor", "patch", "register_backend"]

BACKEND_NAME = "dsr"


@dataclass
class _Call:
    """What the processor of the attention module being run wants from the attention product."""

    processor: DSRAttnProcessor
    backend: str


_CURRENT: contextvars.ContextVar[_Call | None] = contextvars.ContextVar("dsr_diffusers_call", default=None)
_TORCH_SDPA = F.scaled_dot_product_attention


def _fused_sdpa(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    return_lse: bool = False,
    _parallel_config: Any = None,
    *,
    sequence_first: bool = False,
) -> Tensor:
    """SDPA's arguments: the fused attention with the current processor's registers, sinks and statistics.

    It stands in for ``torch.nn.functional.scaled_dot_product_attention`` while a
    :class:`DSRAttnProcessor` runs (q, k, v [B, H, S, D]), and with ``sequence_first=True``
    it is the ``"dsr"`` backend of diffusers' dispatcher: q, k, v [B, S, H, D], out
    [B, S, H, Dv], a 2-D ``attn_mask`` [B, S_k] masks keys (as diffusers' native backend
    reads it). The dispatcher passes only the arguments a backend's signature names.
    """
    if return_lse:
        raise ValueError(f"the {BACKEND_NAME!r} attention backend does not support return_lse=True")
    if _parallel_config is not None:
        raise NotImplementedError(f"the {BACKEND_NAME!r} attention backend does not support context parallelism")
    if sequence_first:
        if attn_mask is not None and attn_mask.dim() == 2 and attn_mask.shape == (query.shape[0], key.shape[1]):
            attn_mask = attn_mask[:, None, None, :]
        q, k, v = (t.permute(0, 2, 1, 3) for t in (query, key, value))
        return _fused_sdpa(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa).permute(0, 2, 1, 3)
    call = _CURRENT.get()
    if call is None:
        return scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    proc = call.processor
    kv_registers = None
    if proc.register_k is not None:
        kv_registers = (proc.register_k.to(query.dtype), proc.register_v.to(query.dtype))
    sinks = proc.sinks
    recording = outliers.active_layer(proc)
    if recording is not None and query.dim() == 4 and dropout_p == 0.0:
        mask = attn_mask
        if mask is not None and mask.dim() < 4:
            mask = mask.view(*(1,) * (4 - mask.dim()), *mask.shape)
        out, stats = attention(
            query,
            key,
            value,
            kv_registers=kv_registers,
            sinks=sinks,
            attn_mask=mask,
            causal=is_causal,
            scale=scale,
            return_stats=True,
            backend=call.backend,
        )
        report, layer = recording
        report.record_attention(layer, stats, proc.num_kv_registers)
        return out
    return scaled_dot_product_attention(
        query,
        key,
        value,
        attn_mask,
        dropout_p,
        is_causal,
        scale,
        enable_gqa,
        kv_registers=kv_registers,
        sinks=sinks,
        backend=call.backend,
    )


_dispatch_backend = functools.partial(_fused_sdpa, sequence_first=True)


def register_backend() -> bool:
    """Registers ``"dsr"`` among diffusers' attention backends (and makes
    ``ModelMixin.set_attention_backend("dsr")`` warn about the processors it cannot reach); True
    when the installed diffusers has the dispatcher (>= 0.35), False otherwise. Idempotent; run
    on import of this module."""
    try:
        from diffusers.models import attention_dispatch as dispatch
    except Exception:
        return False
    names = dispatch.AttentionBackendName
    registry = dispatch._AttentionBackendRegistry
    member = names._value2member_map_.get(BACKEND_NAME)
    if member is None:
        # AttentionBackendName is a str Enum: a member is added the way Enum builds its own.
        member = str.__new__(names, BACKEND_NAME)
        member._name_, member._value_ = BACKEND_NAME.upper(), BACKEND_NAME
        member.__objclass__ = names
        names._member_map_[member._name_] = member
        names._value2member_map_[BACKEND_NAME] = member
        names._member_names_.append(member._name_)
        type.__setattr__(names, member._name_, member)
    if member not in registry._backends:
        registry.register(member, constraints=[])(_dispatch_backend)
    from diffusers.models.modeling_utils import ModelMixin

    if not hasattr(ModelMixin.set_attention_backend, "_dsr_checks"):
        ModelMixin.set_attention_backend = _checking_set_attention_backend(ModelMixin.set_attention_backend)
    return True


def _checking_set_attention_backend(set_attention_backend):
    """diffusers' ``ModelMixin.set_attention_backend``, which warns when ``"dsr"`` cannot reach a processor."""

    @functools.wraps(set_attention_backend)
    def checked(self: nn.Module, backend: str) -> None:
        set_attention_backend(self, backend)
        if isinstance(backend, str) and backend.lower() == BACKEND_NAME:
            _warn_bypassing_processors(self)

    checked._dsr_checks = True
    return checked


def _warn_bypassing_processors(model: nn.Module) -> None:
    """The backend reaches only the processors that call diffusers' dispatcher (those with an
    ``_attention_backend``); the others (DiT's, PixArt's, SD3's ``AttnProcessor2_0``, ...) call
    torch's SDPA themselves, and set_attention_backend leaves them as they are, silently."""
    bypassing = Counter(
        type(module.processor).__name__
        for _, module in _attention_modules(model)
        if module.processor is not None
        and not hasattr(module.processor, "_attention_backend")
        and not isinstance(module.processor, DSRAttnProcessor)
    )
    if bypassing:
        found = ", ".join(f"{name} x {count}" for name, count in bypassing.items())
        warnings.warn(
            f"set_attention_backend({BACKEND_NAME!r}): {bypassing.total()} attention module(s) of "
            f"{type(model).__name__} keep running torch's attention: their processors ({found}) call it "
            f"themselves, not diffusers' attention dispatcher. Use dsr_kernels.patch(model) instead",
            UserWarning,
            stacklevel=3,
        )


@contextlib.contextmanager
def _redirected_sdpa():
    F.scaled_dot_product_attention = _fused_sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = _TORCH_SDPA


class DSRAttnProcessor(nn.Module):
    """A diffusers attention processor: the module's own processor, with the attention product fused.

    Args:
        inner: the processor it wraps (the attention module's current one).
        heads, head_dim: the attention module's query heads and head dim (for the registers).
        num_kv_registers: learned kv registers per head (``register_k``, ``register_v``
            [heads, R, head_dim]), trainable, every query may attend them.
        sinks: learn a sink logit per head (``sinks`` [heads], initialised to 0).
        backend: the backend of :func:`dsr_kernels.attention`.

    Being an ``nn.Module``, it is a submodule of the attention module: its parameters are
    the model's (optimiser, ``state_dict``, ``.to()``), and
    :func:`dsr_kernels.outliers.collect` records its statistics under the attention
    module's name.
    """

    def __init__(
        self,
        inner: Any,
        *,
        heads: int,
        head_dim: int,
        num_kv_registers: int = 0,
        sinks: bool = False,
        backend: str = "auto",
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if isinstance(inner, DSRAttnProcessor):
            raise TypeError("DSRAttnProcessor: the processor to wrap is a DSRAttnProcessor already")
        self.inner = inner
        self.heads, self.head_dim, self.backend = heads, head_dim, backend
        self.register_parameter("register_k", None)
        self.register_parameter("register_v", None)
        self.register_parameter("sinks", None)
        self.add_registers(num_kv_registers, sinks=sinks, device=device, dtype=dtype)

    def add_registers(
        self, num_kv_registers: int = 0, *, sinks: bool = False, device=None, dtype=None
    ) -> DSRAttnProcessor:
        """Adds kv registers and / or sinks where there are none (as RegisterAttention.add_registers)."""
        if num_kv_registers and self.register_k is None:
            for name in ("register_k", "register_v"):  # N(0, 0.02) truncated, as RegisterAttention's
                empty = torch.empty(self.heads, num_kv_registers, self.head_dim, device=device, dtype=dtype)
                setattr(self, name, nn.Parameter(nn.init.trunc_normal_(empty, std=0.02)))
        elif num_kv_registers and num_kv_registers != self.num_kv_registers:
            raise ValueError(
                f"DSRAttnProcessor: has {self.num_kv_registers} kv registers already, asked for {num_kv_registers}"
            )
        if sinks and self.sinks is None:
            self.sinks = nn.Parameter(torch.zeros(self.heads, device=device, dtype=dtype))
        return self

    @property
    def num_kv_registers(self) -> int:
        return 0 if self.register_k is None else self.register_k.shape[1]

    def forward(self, attn: nn.Module, hidden_states: Tensor, *args: Any, **kwargs: Any) -> Any:
        token = _CURRENT.set(_Call(self, self.backend))
        try:
            if hasattr(self.inner, "_attention_backend") and register_backend():
                from diffusers.models.attention_dispatch import AttentionBackendName

                previous = self.inner._attention_backend
                self.inner._attention_backend = AttentionBackendName(BACKEND_NAME)
                try:
                    return self.inner(attn, hidden_states, *args, **kwargs)
                finally:
                    self.inner._attention_backend = previous
            with _redirected_sdpa():
                return self.inner(attn, hidden_states, *args, **kwargs)
        finally:
            _CURRENT.reset(token)

    def extra_repr(self) -> str:
        return (
            f"inner={type(self.inner).__name__}, heads={self.heads}, head_dim={self.head_dim}, "
            f"num_kv_registers={self.num_kv_registers}, sinks={self.sinks is not None}, backend={self.backend!r}"
        )


def _model_of(obj: Any) -> nn.Module:
    if isinstance(obj, nn.Module):
        return obj
    for name in ("transformer", "unet"):
        model = getattr(obj, name, None)
        if isinstance(model, nn.Module):
            return model
    raise TypeError(f"patch(): {type(obj).__name__} is neither a diffusers model nor a pipeline with a transformer")


def _attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """diffusers' attention modules of ``model`` (those with a processor), with their names."""
    return [(n, m) for n, m in model.named_modules() if hasattr(m, "set_processor") and hasattr(m, "processor")]


def _heads_and_dim(module: nn.Module) -> tuple[int, int]:
    heads = getattr(module, "heads", None)
    inner_dim = getattr(module, "inner_dim", None)
    if heads is None or inner_dim is None:
        q = getattr(module, "to_q", None)
        raise TypeError(
            f"patch(): cannot tell the heads of {type(module).__name__} (no 'heads' / 'inner_dim'"
            + (f"; to_q {tuple(q.weight.shape)}" if q is not None else "")
            + ")"
        )
    return int(heads), int(inner_dim) // int(heads)


def patch(obj: Any, *, num_kv_registers: int = 0, sinks: bool = False, backend: str = "auto") -> list[str]:
    """Installs a :class:`DSRAttnProcessor` on every attention module of a diffusers model or pipeline.

    Returns the names of the attention modules. The outputs stay what they were without
    registers and sinks (the same computation, on the fused kernels); with them, the new
    parameters are created on the model's device and dtype, trainable.
    """
    if isinstance(num_kv_registers, bool) or not isinstance(num_kv_registers, int) or num_kv_registers < 0:
        raise ValueError(f"patch(): argument 'num_kv_registers' must be an int >= 0, got {num_kv_registers!r}")
    from dsr_kernels.backends import check_name

    check_name("attention", backend)
    model = _model_of(obj)
    register_backend()
    names = []
    for name, module in _attention_modules(model):
        processor = module.processor
        ref = next(module.parameters(), None)
        where = dict(device=ref.device if ref is not None else None, dtype=ref.dtype if ref is not None else None)
        if isinstance(processor, DSRAttnProcessor):
            processor.add_registers(num_kv_registers, sinks=sinks, **where)
            processor.backend = backend
        else:
            heads, head_dim = _heads_and_dim(module)
            module.set_processor(
                DSRAttnProcessor(
                    processor,
                    heads=heads,
                    head_dim=head_dim,
                    num_kv_registers=num_kv_registers,
                    sinks=sinks,
                    backend=backend,
                    **where,
                )
            )
        names.append(name)
    if not names:
        raise ValueError(f"patch(): found no diffusers attention module in {type(model).__name__}")
    return names


register_backend()
