"""Finding register neurons: the MLP units that fire where the outlier tokens are."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from dsr_kernels.models.vit import TestTimeRegisterSettings, VisionTransformer
from dsr_kernels.registers.apply import apply_test_time_registers, check_model, check_settings
from dsr_kernels.registers.neurons import RegisterNeurons, empty_neurons, neurons_by_layer


class RecursiveRegisterNeurons(NamedTuple):
    """``neurons``: the merged set (round 1's first); ``rounds``: what each round found."""

    neurons: RegisterNeurons
    rounds: list[RegisterNeurons]


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _batches(fn: str, images, batch_size: int, *, reusable: bool) -> list[Tensor] | Iterable[Tensor]:
    if isinstance(images, Tensor):
        if images.dim() != 4:
            raise ValueError(f"{fn}: argument 'images' must be [N, C, H, W], got shape {list(images.shape)}")
        return list(images.split(batch_size))
    if not isinstance(images, Iterable):
        raise TypeError(f"{fn}: argument 'images' must be a tensor or an iterable of [B, C, H, W] tensors")
    if reusable and iter(images) is images:
        raise TypeError(
            f"{fn}: argument 'images' is a one-shot iterator; each round reads the images again: "
            "pass a tensor or a list of batches"
        )
    return images


def _progress(batches, enabled: bool, desc: str):
    if not enabled:
        return batches
    from tqdm.auto import tqdm

    total = len(batches) if hasattr(batches, "__len__") else None
    return tqdm(batches, total=total, desc=desc, unit="batch", leave=False)


def _check_layer(fn: str, name: str, value, depth: int, *, allow_negative: bool = False) -> int:
    lo = -depth if allow_negative else 0
    if not _is_int(value) or not lo <= value < depth:
        raise ValueError(f"{fn}: argument '{name}' must be an int in [{lo}, {depth}), got {value!r}")
    return value % depth


@torch.no_grad()
def find_register_neurons(
    model: VisionTransformer,
    images,
    *,
    threshold: float,
    detect_layer: int = -1,
    highest_layer: int | None = None,
    lowest_layer: int = 0,
    top_k: int = 10,
    batch_size: int = 16,
    exclude=None,
    progress: bool = True,
) -> RegisterNeurons:
    """The ``top_k`` MLP neurons most active where the outlier tokens are.

    Outliers: patch tokens whose norm in the output of block ``detect_layer`` (negative
    counts from the end) exceeds ``threshold``; prefix tokens (CLS, trained registers)
    and test-time registers already applied are not candidates. Each MLP neuron (after
    its GELU) of blocks ``lowest_layer`` to ``highest_layer`` (default: the detection
    block) is scored per image by its mean |activation| over that image's outlier
    positions; scores are averaged over the images that have outliers. Neurons in
    ``exclude`` (a set as :func:`apply_test_time_registers` takes) are skipped.

    images: [N, C, H, W] (split into ``batch_size``) or an iterable of [B, C, H, W]
    batches; a progress bar runs over the batches (``progress=False`` hides it). Two
    forward passes per batch: up to the detection block, then, where a batch has
    outliers, up to ``highest_layer`` with the scores reduced on the fly.

    Returns :class:`RegisterNeurons` (empty when no image has an outlier).
    """
    fn = "find_register_neurons()"
    model = check_model(fn, model)
    depth = model.depth
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not threshold > 0:
        raise ValueError(f"{fn}: argument 'threshold' must be a number > 0, got {threshold!r}")
    detect = _check_layer(fn, "detect_layer", detect_layer, depth, allow_negative=True)
    highest = detect if highest_layer is None else _check_layer(fn, "highest_layer", highest_layer, depth)
    lowest = _check_layer(fn, "lowest_layer", lowest_layer, depth)
    if lowest > highest:
        raise ValueError(f"{fn}: lowest_layer ({lowest}) is above highest_layer ({highest})")
    if not _is_int(top_k) or top_k < 1:
        raise ValueError(f"{fn}: argument 'top_k' must be an int >= 1, got {top_k!r}")
    if not _is_int(batch_size) or batch_size < 1:
        raise ValueError(f"{fn}: argument 'batch_size' must be an int >= 1, got {batch_size!r}")
    excluded = neurons_by_layer(fn, exclude, depth, model.mlp_hidden) if exclude is not None else {}
    batches = _batches(fn, images, batch_size, reusable=False)

    P, Rt, width = model.num_prefix_tokens, model.num_test_time_registers, model.mlp_hidden
    layers = range(lowest, highest + 1)
    device = model.pos_embed.device
    totals = torch.zeros(len(layers), width, dtype=torch.float64, device=device)
    state: dict[str, Tensor] = {}
    acts = model.mlp_activations()

    def scorer(i: int):
        def hook(module, inputs, out: Tensor) -> None:
            # Mean |activation| over each image's outlier patches, summed over images with outliers.
            a = out[:, P : out.shape[1] - Rt].abs().double()  # [B, N, F]
            per_image = torch.einsum("bn,bnf->bf", state["mask"], a) / state["count"].clamp_min(1)[:, None]
            totals[i] += per_image[state["count"] > 0].sum(0)

        return hook

    images_with_outliers = outlier_tokens = 0
    for batch in _progress(batches, progress, "register neurons"):
        x = model.embed(batch.to(device=device, dtype=model.pos_embed.dtype))
        h = model.run_blocks(x, range(0, detect + 1))
        norms = torch.linalg.vector_norm(h[:, P : h.shape[1] - Rt].float(), dim=-1)  # [B, N]
        mask = norms > threshold
        count = mask.sum(1)
        if not bool(count.any()):
            continue
        images_with_outliers += int((count > 0).sum())
        outlier_tokens += int(count.sum())
        state["mask"], state["count"] = mask.double(), count.double()
        hooks = [acts[layer].register_forward_hook(scorer(i)) for i, layer in enumerate(layers)]
        try:
            model.run_blocks(x, range(0, highest + 1))
        finally:
            for hk in hooks:
                hk.remove()
    if images_with_outliers == 0:
        return empty_neurons()
    scores = (totals / images_with_outliers).float().cpu()
    for layer, ids in excluded.items():
        if lowest <= layer <= highest:
            scores[layer - lowest, ids] = -math.inf
    flat = scores.flatten()
    k = min(top_k, int(torch.isfinite(flat).sum()))
    values, index = flat.topk(k)
    return RegisterNeurons(
        index // width + lowest,
        index % width,
        values,
        images_with_outliers,
        outlier_tokens,
    )


def _per_round(fn: str, name: str, value, rounds: int) -> list:
    if isinstance(value, Sequence) and not isinstance(value, str):
        if len(value) != rounds:
            raise ValueError(f"{fn}: argument '{name}' gives {len(value)} values for depth={rounds} rounds")
        return list(value)
    return [value] * rounds


@torch.no_grad()
def find_register_neurons_recursive(
    model: VisionTransformer,
    images,
    *,
    threshold: float,
    depth: int = 2,
    detect_layer: int = -1,
    highest_layer: int | Sequence[int] | None = None,
    lowest_layer: int = 0,
    top_k: int | Sequence[int] = 10,
    num_registers: int = 1,
    patch_values: str = "zero",
    register_value: str = "signed_max",
    released_indexing: bool = False,
    batch_size: int = 16,
    progress: bool = True,
) -> RecursiveRegisterNeurons:
    """Recursive test-time registers (DSR, SigLIP2-So400M): find, apply, find again, merge.

    Round 1 is :func:`find_register_neurons`. Each later round runs it again with the
    neurons found so far applied as test-time registers (with ``num_registers``,
    ``patch_values``, ``register_value``, ``released_indexing``), so that outliers that
    only appear once the first population is removed are found; the new neurons join the
    set. Stops after ``depth`` rounds or at the first round that finds no outlier above
    ``threshold``. ``top_k`` and ``highest_layer`` may give one value per round.
    ``images`` must be a tensor or a list of batches (each round reads them again). The
    model is left as it was; apply the result with :func:`apply_test_time_registers`.
    """
    fn = "find_register_neurons_recursive()"
    model = check_model(fn, model)
    if not _is_int(depth) or depth < 1:
        raise ValueError(f"{fn}: argument 'depth' must be an int >= 1, got {depth!r}")
    check_settings(fn, TestTimeRegisterSettings(num_registers, patch_values, register_value, released_indexing))
    top_ks = _per_round(fn, "top_k", top_k, depth)
    highest = _per_round(fn, "highest_layer", highest_layer, depth)
    batches = _batches(fn, images, batch_size, reusable=True)
    merged, rounds = empty_neurons(), []
    for r in range(depth):
        handle = apply_test_time_registers(
            model,
            merged,
            num_registers,
            patch_values=patch_values,
            register_value=register_value,
            released_indexing=released_indexing,
        )
        try:
            found = find_register_neurons(
                model,
                batches,
                threshold=threshold,
                detect_layer=detect_layer,
                highest_layer=highest[r],
                lowest_layer=lowest_layer,
                top_k=top_ks[r],
                batch_size=batch_size,
                exclude=merged if merged.num_neurons else None,
                progress=progress,
            )
        finally:
            handle.remove()
        rounds.append(found)
        if found.num_neurons == 0:
            break
        merged = merged.merge(found)
    return RecursiveRegisterNeurons(merged, rounds)
