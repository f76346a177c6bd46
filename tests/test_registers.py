"""Test-time registers on a ViT with planted register neurons: discovery, recursion, removal, baselines.

The planted encoder (SigLIP layout: no prefix tokens; 4 blocks of width 64, MLPs of 256)
has random small weights, except:
- the patch embedding writes a direction d (zero-mean, unit) into a token in
  proportion to the mean of its red channel: the "bright" patch of each image carries
  a strong d;
- population 1, neurons 17 and 200 of block 1: fire on d (after the LayerNorm), write
  a huge direction u into the token (the outlier) and cancel its d;
- population 2, neuron 99 of block 2: fires on d too, writes a huge v. While population
  1 is active the token has no d left, so population 2 only appears once population 1
  is removed: DSR's second outlier population in SigLIP2-So400M.
"""

from __future__ import annotations

import pytest
import torch

from dsr_kernels.backends import triton_interpreting
from dsr_kernels.models import VisionTransformer, create_model
from dsr_kernels.registers import (
    RegisterNeurons,
    apply_outlier_key_mask,
    apply_test_time_registers,
    apply_test_time_registers_with_hooks,
    find_register_neurons,
    find_register_neurons_recursive,
)

POP1 = {(1, 17), (1, 200)}
POP2 = {(2, 99)}
THRESHOLD = 150.0


def _orthonormal_zero_mean(dim: int, count: int, g: torch.Generator) -> list[torch.Tensor]:
    m = torch.randn(dim, count, generator=g, dtype=torch.float64)
    q, _ = torch.linalg.qr(m - m.mean(0, keepdim=True))
    return [q[:, i].float() for i in range(count)]


def planted_vit(backend: str = "auto", seed: int = 0) -> VisionTransformer:
    g = torch.Generator().manual_seed(seed)
    D = 64
    model = VisionTransformer(
        img_size=32,
        patch_size=8,
        embed_dim=D,
        depth=4,
        num_heads=4,
        class_token=False,
        global_pool="",
        backend=backend,
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(
                (1.0 if "norm" in name and name.endswith("weight") else 0.0) + torch.randn(p.shape, generator=g) * 0.02
            )
        d, u, v = _orthonormal_zero_mean(D, 3, g)
        model.patch_embed.proj.weight[:, 0] += 5.0 * d[:, None, None] / 64  # token += 5 mean(red) d
        for layer, n in POP1:
            mlp = model.blocks[layer].mlp
            mlp.fc1.weight[n], mlp.fc1.bias[n] = 2.0 * d, -6.0
            mlp.fc2.weight[:, n] = 20.0 * u - 1.0 * d
        mlp = model.blocks[2].mlp
        mlp.fc1.weight[99], mlp.fc1.bias[99] = 2.0 * d, -6.0
        mlp.fc2.weight[:, 99] = 40.0 * v
    return model.eval()


def planted_images(n: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise images with one bright 8 x 8 patch each (red channel 4), at a random position."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 32, 32, generator=g) * 0.5
    where = torch.randint(0, 16, (n,), generator=g)
    for i, p in enumerate(where.tolist()):
        r, c = divmod(p, 4)
        x[i, 0, 8 * r : 8 * r + 8, 8 * c : 8 * c + 8] = 4.0
    return x, where


@torch.no_grad()
def token_norms(model: VisionTransformer, x: torch.Tensor) -> torch.Tensor:
    """Norms of every token (test-time registers included, last) after the last block, [B, T]."""
    return model.run_blocks(model.embed(x)).norm(dim=-1)


@pytest.fixture(scope="module")
def planted():
    return planted_vit(), planted_images(8)


def test_the_plant_makes_one_outlier_per_image(planted):
    model, (x, where) = planted
    norms = token_norms(model, x)
    assert torch.all(norms[torch.arange(8), where] > 2 * THRESHOLD)
    others = norms.clone()
    others[torch.arange(8), where] = 0
    assert others.max() < THRESHOLD


def test_discovery_finds_exactly_the_planted_neurons(planted):
    model, (x, _) = planted
    found = find_register_neurons(model, x, threshold=THRESHOLD, top_k=2, batch_size=3, progress=False)
    assert set(found.pairs()) == POP1
    assert found.images_with_outliers == 8 and found.outlier_tokens == 8
    assert torch.all(found.scores > 5)  # the planted neurons' activation at the bright patch is ~9.5
    # More neurons than planted: the planted ones come first, far above the rest.
    more = find_register_neurons(model, x, threshold=THRESHOLD, top_k=5, progress=False)
    assert set(more.pairs()[:2]) == POP1 and more.scores[2] < 0.1 * more.scores[1]


def test_test_time_registers_remove_the_outlier_and_carry_it(planted):
    model, (x, _) = planted
    before = model.forward_features(x)
    with apply_test_time_registers(model, POP1 | POP2) as handle:
        assert handle.active and model.num_test_time_registers == 1
        norms = token_norms(model, x)
        assert norms[:, :-1].max() < THRESHOLD  # no patch is an outlier any more
        assert torch.all(norms[:, -1] > THRESHOLD)  # the register token carries it
        feats = model.forward_features(x)
        assert feats.shape == before.shape  # the register is dropped at the output
    assert model.num_test_time_registers == 0
    torch.testing.assert_close(model.forward_features(x), before, rtol=0, atol=0)  # removed: as before


def test_recursive_discovery_finds_the_second_population(planted):
    model, (x, _) = planted
    # Round 1 alone is not enough: with population 1 redirected, population 2 makes a new outlier.
    with apply_test_time_registers(model, POP1):
        assert token_norms(model, x)[:, :-1].max() > THRESHOLD
    result = find_register_neurons_recursive(
        model, x, threshold=THRESHOLD, top_k=[2, 1, 1], depth=3, batch_size=4, progress=False
    )
    assert [set(r.pairs()) for r in result.rounds] == [POP1, POP2, set()]  # round 3: no outlier left, stop
    assert set(result.neurons.pairs()) == POP1 | POP2
    assert result.neurons.pairs()[:2] in (sorted(POP1), sorted(POP1)[::-1])  # round 1's first
    assert model.num_test_time_registers == 0  # the search leaves the model as it was
    with apply_test_time_registers(model, result.neurons):
        assert token_norms(model, x)[:, :-1].max() < THRESHOLD


@pytest.mark.parametrize("patch_values", ["zero", "mean", "only_outliers", "same"])
@pytest.mark.parametrize("register_value", ["signed_max", "layer_signed_max"])
def test_fused_equals_the_released_hooks(planted, patch_values, register_value):
    model, (x, _) = planted
    kw = dict(patch_values=patch_values, register_value=register_value)
    with torch.no_grad(), apply_test_time_registers(model, POP1 | POP2, 2, **kw):
        fused = model.forward_features(x)
    with torch.no_grad(), apply_test_time_registers_with_hooks(model, POP1 | POP2, 2, **kw):
        hooked = model.forward_features(x)
    torch.testing.assert_close(fused, hooked, rtol=1e-4, atol=1e-4)


def test_eager_and_triton_encoders_with_test_time_registers(planted):
    model, (x, _) = planted
    eager = planted_vit(backend="eager")
    with torch.no_grad(), apply_test_time_registers(model, POP1 | POP2), apply_test_time_registers(eager, POP1 | POP2):
        torch.testing.assert_close(model.forward_features(x), eager.forward_features(x), rtol=1e-4, atol=1e-4)
        if triton_interpreting():
            triton_model = planted_vit(backend="triton")
            with apply_test_time_registers(triton_model, POP1 | POP2):
                out = triton_model.forward_features(x[:2])
            torch.testing.assert_close(out, model.forward_features(x[:2]), rtol=1e-4, atol=1e-4)


def test_released_indexing_leaves_the_first_patch_alone():
    model = planted_vit()
    x, where = planted_images(4)
    x[:, 0, :8, :8] = 4.0  # patch 0 bright as well
    with torch.no_grad():
        with apply_test_time_registers(model, POP1 | POP2):
            default = token_norms(model, x)
        with apply_test_time_registers(model, POP1 | POP2, released_indexing=True):
            released = token_norms(model, x)
        with apply_test_time_registers_with_hooks(model, POP1 | POP2, released_indexing=True):
            hooked = token_norms(model, x)
    assert default[:, :-1].max() < THRESHOLD
    assert torch.all(released[:, 0] > THRESHOLD)  # no CLS: the released code never edits token 0
    assert released[:, 1:-1].max() < THRESHOLD
    torch.testing.assert_close(released, hooked, rtol=1e-4, atol=1e-3)


def test_empty_set_is_a_no_op(planted):
    model, (x, _) = planted
    before = model.forward_features(x)
    for empty in ([], {}, RegisterNeurons.from_pairs([])):
        handle = apply_test_time_registers(model, empty)
        assert not handle.active and model.num_test_time_registers == 0
        torch.testing.assert_close(model.forward_features(x), before, rtol=0, atol=0)
        handle.remove()


def test_applying_again_replaces_and_remove_restores(planted):
    model, (x, _) = planted
    first = apply_test_time_registers(model, POP1)
    out_pop1 = model.forward_features(x)
    second = apply_test_time_registers(model, POP1 | POP2, 2)
    assert model.num_test_time_registers == 2
    second.remove()
    assert model.num_test_time_registers == 1
    torch.testing.assert_close(model.forward_features(x), out_pop1, rtol=0, atol=0)
    first.remove()
    first.remove()  # idempotent
    assert model.num_test_time_registers == 0
    assert all(act.neurons is None for act in model.mlp_activations())


def test_outlier_key_mask_baseline(planted):
    model, (x, where) = planted
    eager = planted_vit(backend="eager")
    with torch.no_grad():
        plain = model.forward_features(x)
        with apply_outlier_key_mask(model, 1e9):
            torch.testing.assert_close(model.forward_features(x), plain, rtol=1e-6, atol=1e-6)
        with apply_outlier_key_mask(model, THRESHOLD), apply_outlier_key_mask(eager, THRESHOLD):
            masked = model.forward_features(x)
            torch.testing.assert_close(masked, eager.forward_features(x), rtol=1e-4, atol=1e-4)
    keep = torch.ones(8, 16, dtype=torch.bool)
    keep[torch.arange(8), where] = False
    assert not torch.allclose(masked[keep], plain[keep], atol=1e-3)  # the other tokens no longer see the outlier
    assert model.outlier_mask_threshold is None


@pytest.mark.parametrize(
    "call, exc, words",
    [
        (lambda m, x: apply_test_time_registers(m, [(4, 0)]), ValueError, ["layer 4", "0 to 3"]),
        (lambda m, x: apply_test_time_registers(m, [(0, 256)]), ValueError, ["neuron 256", "0 to 255"]),
        (lambda m, x: apply_test_time_registers(m, [(0, 1), (0, 1)]), ValueError, ["twice"]),
        (lambda m, x: apply_test_time_registers(m, [(0, 1.5)]), TypeError, ["pairs of ints"]),
        (lambda m, x: apply_test_time_registers(m, 3), TypeError, ["'neurons'"]),
        (lambda m, x: apply_test_time_registers(m, {0: [1]}, 0), ValueError, ["'num_registers'", ">= 1"]),
        (lambda m, x: apply_test_time_registers(m, {0: [1]}, patch_values="nan"), ValueError, ["'patch_values'"]),
        (lambda m, x: apply_test_time_registers(torch.nn.Linear(2, 2), [(0, 1)]), TypeError, ["VisionTransformer"]),
        (lambda m, x: find_register_neurons(m, x[:, :, :16], threshold=1.0), ValueError, ["[B, 3, 32, 32]"]),
        (lambda m, x: find_register_neurons(m, x, threshold=0), ValueError, ["'threshold'"]),
        (lambda m, x: find_register_neurons(m, x, threshold=1.0, detect_layer=4), ValueError, ["'detect_layer'"]),
        (lambda m, x: find_register_neurons(m, x, threshold=1.0, highest_layer=-1), ValueError, ["'highest_layer'"]),
        (lambda m, x: find_register_neurons(m, x, threshold=1.0, top_k=0), ValueError, ["'top_k'"]),
        (lambda m, x: find_register_neurons(m, x[0], threshold=1.0), ValueError, ["'images'"]),
        (
            lambda m, x: find_register_neurons_recursive(m, iter([x]), threshold=1.0),
            TypeError,
            ["one-shot iterator"],
        ),
        (
            lambda m, x: find_register_neurons_recursive(m, x, threshold=1.0, top_k=[1, 2, 3], depth=2),
            ValueError,
            ["'top_k'", "3 values"],
        ),
        (lambda m, x: apply_outlier_key_mask(m, -1.0), ValueError, ["'threshold'"]),
    ],
)
def test_bad_input_raises(planted, call, exc, words):
    model, (x, _) = planted
    with pytest.raises(exc) as info:
        call(model, x)
    for w in words:
        assert w in str(info.value), (w, str(info.value))
    assert model.num_test_time_registers == 0


def test_on_a_dinov2_layout_prefix_tokens_keep_their_values():
    """With CLS and trained registers, the redirection never touches them (fused and hooks agree)."""
    torch.manual_seed(0)
    model = create_model("vit_small_patch14_reg4_dinov2", img_size=42, depth=2).eval()
    x = torch.randn(2, 3, 42, 42)
    neurons = [(0, 5), (1, 7), (1, 100)]
    with torch.no_grad():
        with apply_test_time_registers(model, neurons):
            fused = model.forward_features(x)
        with apply_test_time_registers_with_hooks(model, neurons):
            hooked = model.forward_features(x)
    torch.testing.assert_close(fused, hooked, rtol=1e-5, atol=1e-5)
    assert fused.shape == (2, 5 + 9, 384)
