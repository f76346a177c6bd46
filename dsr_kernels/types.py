"""Types shared by the ops and their implementations: results, and how a backend declares itself."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

HALF_AND_FLOAT = (torch.float16, torch.bfloat16, torch.float32)
FLOATS = HALF_AND_FLOAT + (torch.float64,)


def _always_available(device: torch.device, dtype: torch.dtype) -> str | None:
    return None


# Parts of an op's contract that some implementations lack (Backend.lacks), as the reason words them.
FEATURES = {
    "value_head_dim": "a value head dim different from the key head dim",
    "varlen": "packed variable-length sequences (cu_seqlens; attention_varlen)",
}


@dataclass(frozen=True)
class Backend:
    """One implementation of an op, as it declares itself; :mod:`dsr_kernels.backends` lists them per op.

    - ``name``: what ``backend=`` takes ("triton", "torch", "cpu", ...).
    - ``devices``: the device types whose tensors it takes; None: any device.
    - ``dtypes``: the input dtypes it takes.
    - ``unavailable_reason(device, dtype)``: None when it can run there, else why not (a
      package or build that is missing); asked once device and dtype fit.
    - ``auto_devices``: the device types on which ``backend="auto"`` may pick it; None: all
      of ``devices`` (Triton takes CPU tensors in its interpreter, a test tool, so its
      ``auto`` is CUDA only).
    - ``lacks``: features of the op's contract this implementation does not have (names in
      :data:`FEATURES`); a call that needs one goes to the next backend under ``auto`` and
      raises for an explicit request.
    """

    name: str
    devices: tuple[str, ...] | None
    dtypes: tuple[torch.dtype, ...]
    unavailable_reason: Callable[[torch.device, torch.dtype], str | None] = _always_available
    auto_devices: tuple[str, ...] | None = None
    lacks: tuple[str, ...] = ()

    def why_not(self, device: torch.device, dtype: torch.dtype) -> str | None:
        """None if this backend runs tensors of ``device`` and ``dtype``, else the reason."""
        if self.devices is not None and device.type not in self.devices:
            return f"backend {self.name!r} runs {' or '.join(self.devices)} tensors, not {device.type} ones"
        if device.type == "cuda" and not torch.cuda.is_available():
            built = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "built without CUDA"
            return f"no CUDA device here (torch.cuda.is_available() is False; torch {torch.__version__} is {built})"
        if dtype not in self.dtypes:
            names = ", ".join(str(d).replace("torch.", "") for d in self.dtypes)
            return f"backend {self.name!r} takes {names} tensors, not {dtype}"
        return self.unavailable_reason(device, dtype)

    def missing(self, needs: tuple[str, ...]) -> str | None:
        """None if this backend has every feature in ``needs``, else the reason."""
        gaps = [FEATURES[f] for f in needs if f in self.lacks]
        return f"backend {self.name!r} does not support {' or '.join(gaps)}" if gaps else None

    def picked_by_auto(self, device: torch.device) -> bool:
        """Whether ``backend="auto"`` may choose it for tensors on ``device`` (when it can run them)."""
        return self.auto_devices is None or device.type in self.auto_devices


class AttentionStats(NamedTuple):
    """Per-query and per-key statistics of one attention call, float32, not differentiable.

    With p[b, h, i, j] the attention probability of query i on key j (registers first,
    then tokens; the sink, when present, is one more outcome with no value vector):

    - ``lse`` [B, H, Nq]: log of the softmax denominator, registers and sink included;
      ``-inf`` for a query that can attend nothing.
    - ``entropy`` [B, H, Nq]: ``-sum_j p_ij log p_ij`` in nats, the sink counted.
    - ``register_share`` [B, H, Nq]: probability on register keys: the R kv_registers
      plus the first ``num_prefix_tokens`` token keys.
    - ``key_mass`` [B, H, R + Nk]: ``sum_i p_ij``, the probability each key receives summed
      over queries (registers first). A key with key_mass far above Nq / Nk monopolises
      attention: the outlier statistic.
    """

    lse: Tensor
    entropy: Tensor
    register_share: Tensor
    key_mass: Tensor


class NormModulateResult(NamedTuple):
    """Result of :func:`dsr_kernels.norm_modulate`.

    - ``out`` [B, T, D] in x's dtype: the normalised and modulated tokens, T = R + N with
      registers (registers first), else T = N.
    - ``residual`` [B, R + N, D] in x's dtype: the residual stream with the registers in
      front (None without registers, or with R = 0).
    - ``norms`` [B, T] float32: the L2 norm of each input token before normalisation
      (None unless ``return_norms=True``); registers included.
    """

    out: Tensor
    residual: Tensor | None
    norms: Tensor | None
