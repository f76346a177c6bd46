"""dsr_kernels.integrations.timm: RegisterAttention takes every timm Attention; patch() swaps them in place."""

import pytest
import torch
from torch import nn

import dsr_kernels
from dsr_kernels import RegisterAttention
from dsr_kernels.integrations.timm import is_timm_attention
from timm_import import import_timm
from utils import assert_close

timm, TIMM_MISSING = import_timm()
requires_timm = pytest.mark.skipif(timm is None, reason=str(TIMM_MISSING))

ATOL = 5e-6

# timm Attention configurations: its defaults, and each option RegisterAttention must take.
TIMM_CONFIGS = [
    dict(),  # qkv_bias=False, timm's default
    dict(qkv_bias=True),
    dict(qk_norm=True, norm_layer=nn.LayerNorm),
    dict(qk_norm=True, scale_norm=True, norm_layer=nn.LayerNorm, qkv_bias=True),
    dict(proj_bias=False),
    dict(gated=True),
    dict(attn_head_dim=24, dim_out=40),
]


@requires_timm
@pytest.mark.parametrize(
    "config",
    TIMM_CONFIGS,
    ids=lambda c: ",".join(f"{k}={getattr(v, '__name__', v)}" for k, v in c.items()) or "defaults",
)
def test_register_attention_loads_every_timm_attention_state_dict(config):
    torch.manual_seed(0)
    theirs = timm.layers.Attention(64, 4, **config).eval()
    with torch.no_grad():
        for p in theirs.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # norms and biases away from their init
    ours = RegisterAttention(64, 4, **config).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    x = torch.randn(2, 37, 64)
    assert_close("out", ours(x), theirs(x), atol=ATOL)
    mask = torch.rand(2, 1, 37, 37) > 0.3
    mask[..., 0] = True
    assert_close("masked", ours(x, attn_mask=mask), theirs(x, attn_mask=mask), atol=ATOL)
    assert_close("causal", ours(x, is_causal=True), theirs(x, is_causal=True), atol=ATOL)
    converted = RegisterAttention.from_timm(theirs)
    assert converted.qkv is theirs.qkv  # shares the weights
    assert_close("from_timm", converted(x), theirs(x), atol=ATOL)


def _small_vit(**kw):
    return timm.create_model(
        "vit_base_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, **kw
    ).eval()


@requires_timm
def test_patch_a_timm_vit_keeps_its_outputs_and_adds_trainable_registers():
    torch.manual_seed(0)
    model = _small_vit(qkv_bias=True)
    x = torch.randn(2, 3, 32, 32)
    before = model(x)
    swapped = dsr_kernels.patch(model)
    assert swapped == ["blocks.0.attn", "blocks.1.attn"]
    assert all(isinstance(b.attn, RegisterAttention) for b in model.blocks)
    assert not any(is_timm_attention(m) for m in model.modules())
    assert_close("patched", model(x), before, atol=ATOL)

    with_registers = _small_vit(qkv_bias=True)
    with_registers.load_state_dict(model.state_dict())
    dsr_kernels.patch(with_registers, num_kv_registers=4, sinks=True)
    attn = with_registers.blocks[0].attn
    assert attn.register_k.shape == (4, 4, 16) and attn.sinks.shape == (4,)
    out = with_registers(x)
    out.square().mean().backward()
    assert attn.register_k.grad is not None and attn.register_k.grad.abs().sum() > 0
    assert attn.sinks.grad is not None
    with dsr_kernels.outliers.collect(with_registers) as report, torch.no_grad():
        with_registers(x)
    # (a layer is named by the block holding the attention, as for the package's models)
    assert {r.layer for r in report.records() if r.entropy is not None} == {"blocks.0", "blocks.1"}


@requires_timm
def test_patch_leaves_other_attention_classes_with_a_warning():
    class Other(nn.Module):  # stands for an attention variant patch() does not know
        def forward(self, x):
            return x

    model = _small_vit()
    model.extra = nn.ModuleDict({"custom": type("WindowAttention", (Other,), {})()})
    with pytest.warns(UserWarning, match=r"left 1 attention module\(s\).*extra.custom \(WindowAttention\)"):
        dsr_kernels.patch(model)


def test_patch_the_package_models_gives_them_registers():
    model = dsr_kernels.models.create_model(
        "vit_base_patch16_siglip_256", depth=2, img_size=32, embed_dim=64, num_heads=4
    )
    x = torch.randn(1, 3, 32, 32)
    before = model.forward_features(x)
    with pytest.warns(UserWarning, match=r"attn_pool \(AttentionPoolLatent\)"):  # the head's pooling: left alone
        names = dsr_kernels.patch(model, backend="torch")
    assert names and all(model.get_submodule(n).backend == "torch" for n in names)
    assert_close("unchanged without registers", model.forward_features(x), before, atol=ATOL)
    with pytest.warns(UserWarning, match="attn_pool"):
        dsr_kernels.patch(model, num_kv_registers=2)
    assert all(model.get_submodule(n).num_kv_registers == 2 for n in names)


def test_patch_bad_input():
    with pytest.raises(TypeError, match="expected a torch.nn.Module .* got str"):
        dsr_kernels.patch("vit")
    with pytest.raises(ValueError, match="found no timm Attention and no RegisterAttention"):
        dsr_kernels.patch(nn.Linear(3, 3))
    model = dsr_kernels.models.create_model(
        "vit_base_patch16_siglip_256", depth=1, img_size=32, embed_dim=32, num_heads=2
    )
    with pytest.raises(ValueError, match="'num_kv_registers' must be an int >= 0"):
        dsr_kernels.patch(model, num_kv_registers=-1)
    with pytest.raises(ValueError, match="'backend' must be one of"):
        dsr_kernels.patch(model, backend="nope")
