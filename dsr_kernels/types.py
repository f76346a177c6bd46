"""Result types shared by the ops and their implementations."""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor


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
      front (None without registers).
    - ``norms`` [B, T] float32: the L2 norm of each input token before normalisation
      (None unless ``return_norms=True``); registers included.
    """

    out: Tensor
    residual: Tensor | None
    norms: Tensor | None
