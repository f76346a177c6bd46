"""Sets of register neurons: (layer, neuron) pairs with scores, validated against a model."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class RegisterNeurons(NamedTuple):
    """Register neurons, highest score first.

    - ``layers``, ``neurons`` [K] int64: block index and MLP hidden unit of each.
    - ``scores`` [K] float32: mean |activation| (after the MLP's GELU) over the outlier
      positions of an image, averaged over the calibration images that have outliers
      (NaN for neurons given by hand or merged without a score).
    - ``images_with_outliers``, ``outlier_tokens``: what the calibration saw (0 when no
      image had an outlier: then K = 0).
    """

    layers: Tensor
    neurons: Tensor
    scores: Tensor
    images_with_outliers: int = 0
    outlier_tokens: int = 0

    @classmethod
    def from_pairs(cls, pairs, scores: Tensor | None = None) -> RegisterNeurons:
        pairs = list(pairs)
        layers = torch.tensor([p[0] for p in pairs], dtype=torch.int64)
        neurons = torch.tensor([p[1] for p in pairs], dtype=torch.int64)
        if scores is None:
            scores = torch.full((len(pairs),), float("nan"))
        return cls(layers, neurons, scores.float())

    @property
    def num_neurons(self) -> int:
        return int(self.layers.numel())

    def pairs(self) -> list[tuple[int, int]]:
        """[(layer, neuron), ...] in score order."""
        return list(zip(self.layers.tolist(), self.neurons.tolist(), strict=True))

    def by_layer(self) -> dict[int, list[int]]:
        """{layer: [neurons]} (layers ascending, neurons in score order)."""
        out: dict[int, list[int]] = {}
        for layer, neuron in sorted(self.pairs(), key=lambda p: p[0]):
            out.setdefault(layer, []).append(neuron)
        return out

    def merge(self, other: RegisterNeurons) -> RegisterNeurons:
        """This set, then the neurons of ``other`` not in it (scores kept); calibration counts summed."""
        seen = set(self.pairs())
        keep = [i for i, p in enumerate(other.pairs()) if p not in seen]
        idx = torch.tensor(keep, dtype=torch.int64)
        return RegisterNeurons(
            torch.cat([self.layers, other.layers[idx]]),
            torch.cat([self.neurons, other.neurons[idx]]),
            torch.cat([self.scores, other.scores[idx]]),
            self.images_with_outliers + other.images_with_outliers,
            self.outlier_tokens + other.outlier_tokens,
        )


def empty_neurons() -> RegisterNeurons:
    z = torch.zeros(0, dtype=torch.int64)
    return RegisterNeurons(z, z.clone(), torch.zeros(0))


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def neurons_by_layer(fn: str, neurons, depth: int, width: int) -> dict[int, Tensor]:
    """``neurons`` (RegisterNeurons, {layer: [neurons]} or [(layer, neuron), ...]) as {layer: [K] int64},
    checked against a model with ``depth`` blocks of ``width`` hidden units."""
    if isinstance(neurons, RegisterNeurons):
        pairs = neurons.pairs()
    elif isinstance(neurons, dict):
        pairs = []
        for layer, ids in neurons.items():
            if isinstance(ids, Tensor):
                ids = ids.tolist()
            try:
                pairs += [(layer, n) for n in ids]
            except TypeError:
                raise TypeError(
                    f"{fn}: argument 'neurons' maps layer {layer!r} to {type(ids).__name__}; expected a list of ints"
                ) from None
    else:
        try:
            pairs = [tuple(p) for p in neurons]
        except TypeError:
            raise TypeError(
                f"{fn}: argument 'neurons' must be RegisterNeurons, a dict {{layer: [neurons]}} or a sequence of "
                f"(layer, neuron) pairs, got {type(neurons).__name__}"
            ) from None
    out: dict[int, list[int]] = {}
    for pair in pairs:
        if len(pair) != 2 or not all(_is_int(v) for v in pair):
            raise TypeError(f"{fn}: argument 'neurons' must hold (layer, neuron) pairs of ints, got {pair!r}")
        layer, neuron = pair
        if not 0 <= layer < depth:
            raise ValueError(f"{fn}: argument 'neurons' names layer {layer}; the model has layers 0 to {depth - 1}")
        if not 0 <= neuron < width:
            raise ValueError(
                f"{fn}: argument 'neurons' names neuron {neuron} of layer {layer}; the MLPs have neurons 0 to "
                f"{width - 1}"
            )
        if neuron in out.setdefault(layer, []):
            raise ValueError(f"{fn}: argument 'neurons' names ({layer}, {neuron}) twice")
        out[layer].append(neuron)
    return {layer: torch.tensor(ids, dtype=torch.int64) for layer, ids in sorted(out.items())}
