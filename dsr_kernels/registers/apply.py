"""Applying test-time registers to a ViT encoder: fused, with hooks (the released way), or masking."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from dsr_kernels.models.vit import TestTimeRegisterSettings, VisionTransformer
from dsr_kernels.reference.ttr_activation import (
    PATCH_VALUES,
    REGISTER_VALUES,
    bottom_mean_count,
    patch_std,
    signed_max,
)
from dsr_kernels.registers.neurons import neurons_by_layer


class Handle:
    """Undoes an ``apply_*`` call: ``handle.remove()``, or use it as a context manager."""

    def __init__(self, restore: Callable[[], None] | None) -> None:
        self._restore = restore

    @property
    def active(self) -> bool:
        return self._restore is not None

    def remove(self) -> None:
        if self._restore is not None:
            restore, self._restore = self._restore, None
            restore()

    def __enter__(self) -> Handle:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def check_model(fn: str, model) -> VisionTransformer:
    """``model`` if it is a :class:`~dsr_kernels.models.VisionTransformer` (what test-time registers
    apply to), else TypeError naming ``fn``, the calling function."""
    if not isinstance(model, VisionTransformer):
        raise TypeError(
            f"{fn}: argument 'model' must be a dsr_kernels VisionTransformer (create_model('vit_...')), "
            f"got {type(model).__name__}"
        )
    return model


def check_settings(fn: str, settings: TestTimeRegisterSettings) -> TestTimeRegisterSettings:
    """``settings`` if every field is valid (``num_registers`` an int >= 1, ``patch_values`` and
    ``register_value`` among :func:`dsr_kernels.ttr_activation`'s variants,
    ``released_indexing`` a bool), else ValueError / TypeError naming ``fn`` and the argument."""
    n, patch_values, register_value = settings.num_registers, settings.patch_values, settings.register_value
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"{fn}: argument 'num_registers' must be an int >= 1, got {n!r}")
    if patch_values not in PATCH_VALUES:
        raise ValueError(f"{fn}: argument 'patch_values' must be one of {PATCH_VALUES}, got {patch_values!r}")
    if register_value not in REGISTER_VALUES:
        raise ValueError(f"{fn}: argument 'register_value' must be one of {REGISTER_VALUES}, got {register_value!r}")
    if not isinstance(settings.released_indexing, bool):
        raise TypeError(f"{fn}: argument 'released_indexing' must be a bool, got {settings.released_indexing!r}")
    return settings


def _prepare(fn: str, model, neurons, settings: TestTimeRegisterSettings) -> tuple[VisionTransformer, dict]:
    """The checked model and {layer: neurons} of an apply_* call (the settings checked too)."""
    model = check_model(fn, model)
    check_settings(fn, settings)
    return model, neurons_by_layer(fn, neurons, model.depth, model.mlp_hidden)


def _snapshot(model: VisionTransformer) -> Callable[[], None]:
    """A function that puts the model's test-time register state back as it is now."""
    count = model.num_test_time_registers
    acts = [(act, act.neurons, act.settings, act.num_prefix_tokens) for act in model.mlp_activations()]

    def restore() -> None:
        model.num_test_time_registers = count
        for act, neurons, settings, skip in acts:
            act.neurons, act.settings, act.num_prefix_tokens = neurons, settings, skip

    return restore


def apply_test_time_registers(
    model: VisionTransformer,
    neurons,
    num_registers: int = 1,
    *,
    patch_values: str = "zero",
    register_value: str = "signed_max",
    released_indexing: bool = False,
) -> Handle:
    """Adds ``num_registers`` test-time registers to ``model`` and redirects ``neurons`` into them.

    Every forward then appends ``num_registers`` zero tokens (no position embedding) after
    the patches, and each selected layer's MLP activation runs
    :func:`dsr_kernels.ttr_activation` (GELU, then per image the signed max of each
    selected neuron over all tokens into the registers, the neuron zeroed at every patch
    token; prefix tokens keep their values), one fused pass; the registers are dropped
    from every output. ``neurons``: :class:`RegisterNeurons`, ``{layer: [neurons]}`` or
    ``[(layer, neuron), ...]``. An empty set changes nothing.

    ``patch_values`` ("zero", "mean", "only_outliers", "same") and ``register_value``
    ("signed_max", "max", "layer_signed_max") choose the variants of
    :func:`dsr_kernels.ttr_activation`; ``released_indexing=True`` leaves the first token
    alone even without a CLS token (the released code edits tokens 1 onwards: on SigLIP
    patch 0 keeps its value), for exact reproduction. Applying again replaces the set;
    ``handle.remove()`` restores what was there before.
    """
    settings = TestTimeRegisterSettings(num_registers, patch_values, register_value, released_indexing)
    model, by_layer = _prepare("apply_test_time_registers()", model, neurons, settings)
    if not by_layer:
        return Handle(None)
    restore = _snapshot(model)
    model.set_test_time_registers(settings, by_layer)
    return Handle(restore)


def released_hook(idx: Tensor, num_registers: int, first_row: int, patch_values: str, register_value: str):
    """The released implementation's intervention as a forward hook on an MLP activation (output
    [B, T, F], the last ``num_registers`` tokens the test-time registers): gathers the neurons
    ``idx``, writes their ``register_value`` into the registers and their ``patch_values`` into
    the rows ``first_row`` to T - num_registers, with index operations in place, batched.
    What :func:`apply_test_time_registers_with_hooks` installs; the benchmark's baseline."""

    def hook(module: nn.Module, inputs, output: Tensor) -> Tensor:
        p0, p1 = first_row, output.shape[1] - num_registers
        sel = output[:, :, idx]  # [B, T, K] (a copy)
        if register_value == "signed_max":
            reg = signed_max(sel, 1)
        elif register_value == "max":
            reg = sel.amax(1)
        else:
            reg = signed_max(sel, (1, 2))[:, None].expand(-1, sel.shape[2])
        output[:, p1:, idx] = reg[:, None].expand(-1, num_registers, -1)
        patch = sel[:, p0:p1]
        if patch_values == "zero":
            output[:, p0:p1, idx] = 0
        elif patch_values == "mean":
            low = patch.sort(dim=1).values[:, : bottom_mean_count(patch.shape[1])]
            output[:, p0:p1, idx] = low.mean(1, keepdim=True).expand_as(patch)
        elif patch_values == "only_outliers":
            mean = patch.mean(1, keepdim=True)
            replaced = patch > mean + patch_std(patch)
            output[:, p0:p1, idx] = torch.where(replaced, mean.expand_as(patch), patch)
        return output

    return hook


def apply_test_time_registers_with_hooks(
    model: VisionTransformer, neurons, num_registers: int = 1, **settings: Any
) -> Handle:
    """The same intervention as :func:`apply_test_time_registers`, done as the released code does it.

    Takes the same arguments (``patch_values``, ``register_value`` and ``released_indexing``
    by keyword, the fields of :class:`~dsr_kernels.models.vit.TestTimeRegisterSettings`).
    A Python forward hook on each selected layer's MLP activation gathers the selected
    columns, reduces them and writes the register and patch rows back with index
    operations: several passes over the activation after the GELU's own. The latency
    baseline of the fused op (``dsr-kernels bench --section encoder``); it gives the same
    outputs.
    """
    fn = "apply_test_time_registers_with_hooks()"
    try:
        settings = TestTimeRegisterSettings(num_registers, **settings)
    except TypeError as exc:  # an argument apply_test_time_registers does not take
        raise TypeError(f"{fn}: {exc}") from None
    model, by_layer = _prepare(fn, model, neurons, settings)
    if not by_layer:
        return Handle(None)
    restore = _snapshot(model)
    model.set_test_time_registers(settings, {})  # the tokens only; the activations stay plain GELU
    p0 = settings.first_edited_row(model.num_prefix_tokens)
    acts, device = model.mlp_activations(), model.pos_embed.device
    hooks = []
    for layer, idx in by_layer.items():
        hook = released_hook(idx.to(device), num_registers, p0, settings.patch_values, settings.register_value)
        hooks.append(acts[layer].register_forward_hook(hook))

    def undo() -> None:
        for h in hooks:
            h.remove()
        restore()

    return Handle(undo)


def apply_outlier_key_mask(model: VisionTransformer, threshold: float) -> Handle:
    """The masking baseline: in every block, keys whose input token norm exceeds ``threshold``
    are not attended (prefix tokens and test-time registers always are).

    The norms come from the block's fused norm pass (``norm_modulate(return_norms=True)``)
    and reach the attention kernel as its ``key_mask``: no extra pass.
    """
    fn = "apply_outlier_key_mask()"
    model = check_model(fn, model)
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not threshold > 0:
        raise ValueError(f"{fn}: argument 'threshold' must be a number > 0, got {threshold!r}")
    before = model.outlier_mask_threshold
    model.outlier_mask_threshold = float(threshold)

    def restore() -> None:
        model.outlier_mask_threshold = before

    return Handle(restore)
