"""ViT encoders: timm's names, state dicts and outputs; fused vs eager; the RAE encoder; FLOPs; bad images."""

from __future__ import annotations

import pytest
import torch

from dsr_kernels.backends import triton_interpreting
from dsr_kernels.models import RAEEncoder, VisionTransformer, create_model, flops, list_models
from timm_import import import_timm
from utils import assert_within_eager_error

VIT_NAMES = [n for n in list_models() if n.startswith("vit_")]
# Small enough to run forward in float64 in a test: (name, overrides)
SMALL = {
    "dinov2_reg4": ("vit_small_patch14_reg4_dinov2", dict(img_size=70, depth=2)),
    "dinov2": ("vit_small_patch14_dinov2", dict(img_size=42, depth=2)),
    "siglip_map": ("vit_base_patch16_siglip_256", dict(img_size=64, depth=2, embed_dim=96, num_heads=4)),
    "siglip_gap": ("vit_base_patch16_siglip_gap_224", dict(img_size=48, depth=2, embed_dim=80, num_heads=5)),
}


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 1.0 if name.endswith(("norm1.weight", "norm2.weight", "norm.weight")) else 0.0
            p.copy_(scale + torch.randn(p.shape, generator=g) * 0.1)
    return model


@pytest.fixture(scope="module")
def timm():
    module, reason = import_timm()
    if module is None:
        pytest.skip(reason)
    return module


@pytest.mark.parametrize("name", VIT_NAMES)
def test_timm_state_dict_loads_strict(timm, name):
    """timm's own model of each name (one block) gives a state dict that loads with strict=True."""
    theirs = timm.create_model(name, pretrained=False, depth=1)
    ours = create_model(name, depth=1)
    sd = theirs.state_dict()
    assert {k: tuple(v.shape) for k, v in sd.items()} == {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    ours.load_state_dict(sd, strict=True)


@pytest.mark.parametrize("layout", list(SMALL))
def test_outputs_match_timm(timm, layout):
    name, cfg = SMALL[layout]
    theirs = randomize(timm.create_model(name, pretrained=False, **cfg)).eval()
    ours = create_model(name, **cfg).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(2, 3, cfg["img_size"], cfg["img_size"])
    with torch.no_grad():
        ref_feats, ref_out = theirs.double().forward_features(x.double()), theirs(x.double())
        theirs.float()
        eager_feats, eager_out = theirs.forward_features(x), theirs(x)
        feats, out = ours.forward_features(x), ours(x)
    assert feats.shape == ref_feats.shape
    assert_within_eager_error("forward_features", feats, ref_feats, eager_feats, torch.float32)
    assert_within_eager_error("forward", out, ref_out, eager_out, torch.float32)


def check_against_eager(layout: str, backend: str, batch: int) -> None:
    """The encoder on the fused ops (``backend``) vs the same weights on eager PyTorch, in
    float64 (the reference) and float32 (the error baseline)."""
    name, cfg = SMALL[layout]
    fused = randomize(create_model(name, **cfg, backend=backend)).eval()
    ref64 = create_model(name, **cfg, backend="eager").double().eval()
    ref32 = create_model(name, **cfg, backend="eager").eval()
    ref64.load_state_dict(fused.state_dict())
    ref32.load_state_dict(fused.state_dict())
    x = torch.randn(batch, 3, cfg["img_size"], cfg["img_size"])
    with torch.no_grad():
        assert_within_eager_error("forward", fused(x), ref64(x.double()), ref32(x), torch.float32)


@pytest.mark.parametrize("layout", list(SMALL))
def test_fused_matches_eager(layout):
    check_against_eager(layout, "auto", 2)


@pytest.mark.skipif(not triton_interpreting(), reason="Triton on CPU tensors needs TRITON_INTERPRET=1")
def test_triton_encoder_matches_eager():
    check_against_eager("dinov2_reg4", "triton", 1)


def test_prefix_tokens_and_layout():
    dino = create_model("vit_small_patch14_reg4_dinov2", img_size=56, depth=1)
    assert dino.num_prefix_tokens == 5 and dino.forward_features(torch.randn(1, 3, 56, 56)).shape == (1, 5 + 16, 384)
    assert dino.pos_embed.shape == (1, 16, 384)  # patches only (no_embed_class)
    plain = create_model("vit_small_patch14_dinov2", img_size=56, depth=1)
    assert plain.num_prefix_tokens == 1 and plain.pos_embed.shape == (1, 17, 384)
    siglip = create_model("vit_base_patch16_siglip_256", img_size=64, depth=1)
    assert siglip.num_prefix_tokens == 0 and siglip.forward_features(torch.randn(2, 3, 64, 64)).shape == (2, 16, 768)
    assert siglip(torch.randn(2, 3, 64, 64)).shape == (2, 768)  # MAP head
    assert create_model("vit_base_patch16_siglip_256", img_size=64, depth=1, reg_tokens=4).num_prefix_tokens == 4


def test_published_flops():
    """ViT-B/16 at 224 px (197 tokens): 17.6 GFLOPs as DeiT counts them (multiply-adds)."""
    with torch.device("meta"):
        model = create_model("vit_base_patch14_dinov2", img_size=224, patch_size=16)
    assert abs(flops(model).macs / 1e9 - 17.6) < 0.1
    assert flops(model, batch_size=4).macs == 4 * flops(model).macs


def test_every_vit_name_builds_on_meta():
    with torch.device("meta"):
        for name in VIT_NAMES:
            assert isinstance(create_model(name), VisionTransformer)


def test_rae_encoder():
    enc = randomize(create_model("vit_small_patch14_reg4_dinov2", img_size=56, depth=2)).eval()
    mean, var = torch.randn(384), torch.rand(384) + 0.5
    rae = RAEEncoder(enc, mean, var)
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        z = rae.encode(x)
        tokens = enc.forward_tokens(x)[:, 5:]  # drop CLS and the 4 registers
        expect = torch.nn.functional.layer_norm(tokens.double(), (384,), eps=1e-6)  # no affine
        expect = (expect.transpose(1, 2).reshape(2, 384, 4, 4) - mean.double()[:, None, None]) / torch.sqrt(
            var.double()[:, None, None] + 1e-5
        )
        assert z.shape == (2, 384, 4, 4)
        torch.testing.assert_close(z.double(), expect, rtol=1e-4, atol=1e-4)
        back = rae.decode_input(z)
        torch.testing.assert_close(
            back.double(),
            torch.nn.functional.layer_norm(tokens.double(), (384,), eps=1e-6).transpose(1, 2).reshape(2, 384, 4, 4),
            rtol=1e-4,
            atol=1e-4,
        )
        _, norms = rae.tokens(x, return_norms=True)
        torch.testing.assert_close(norms, tokens.norm(dim=-1), rtol=1e-5, atol=1e-5)
        rae.fit_latent_statistics([torch.randn(4, 3, 56, 56) for _ in range(3)])
        z = rae.encode(torch.randn(8, 3, 56, 56))
        assert z.mean().abs() < 0.2 and 0.5 < z.var() < 1.5
    assert set(rae.state_dict()) >= {"latent_mean", "latent_var"}
    with pytest.raises(ValueError, match="'latent_mean'"):
        RAEEncoder(enc, torch.zeros(3))
    with pytest.raises(TypeError, match="'encoder'"):
        RAEEncoder(torch.nn.Linear(2, 2))


@pytest.mark.parametrize(
    "shape, words",
    [
        ((1, 3, 64, 64), ["[B, 3, 56, 56]", "[1, 3, 64, 64]"]),
        ((1, 1, 56, 56), ["[B, 3, 56, 56]"]),
        ((3, 56, 56), ["[3, 56, 56]"]),
    ],
)
def test_wrong_image_size_raises(shape, words):
    model = create_model("vit_small_patch14_reg4_dinov2", img_size=56, depth=1)
    with pytest.raises(ValueError) as info:
        model(torch.randn(*shape))
    for w in words:
        assert w in str(info.value)


@pytest.mark.parametrize(
    "overrides, words",
    [
        (dict(global_pool="max"), ["global_pool"]),
        (dict(act_layer="relu"), ["act_layer"]),
        (dict(reg_tokens=-1), ["reg_tokens"]),
        (dict(embed_dim=100, num_heads=3), ["divisible"]),
        (dict(class_token=False), ["global_pool='token'"]),
        (dict(nope=1), ["nope"]),
    ],
)
def test_bad_configuration_raises(overrides, words):
    with pytest.raises(ValueError) as info:
        create_model("vit_small_patch14_dinov2", depth=1, **overrides)
    for w in words:
        assert w in str(info.value)
