"""dsr_kernels.outliers.register_utilisation on planted models: only k of R registers can be attended."""

import math

import pytest
import torch

import dsr_kernels
from dsr_kernels.models import create_model
from dsr_kernels.outliers import register_utilisation

D, HEADS, R = 64, 2, 4


def _attend_feature_0(qkv: torch.nn.Linear, strength: float) -> None:
    """q is the constant ``strength`` on each head's first dim and k reads feature 0 of the
    token there, so a key's logit is strength * scale * (its feature 0)."""
    hd = D // HEADS
    with torch.no_grad():
        qkv.weight.zero_()
        qkv.bias.zero_()
        for h in range(HEADS):
            qkv.bias[h * hd] = strength
            qkv.weight[D + h * hd, 0] = 1.0


def _planted_dit(k: int) -> torch.nn.Module:
    """A tiny DiT with R registers from block 0 of which only the first k can be attended.

    adaLN-Zero leaves every block the identity, so each block sees the same tokens: after the
    non-affine LayerNorm the first k registers have feature 0 at +sqrt(D / 2), the other
    registers at -sqrt(D / 2), and the patches (feature 0 pushed to -100 before the norm)
    near -sqrt(D); queries are constant, so the k planted registers share the mass evenly."""
    torch.manual_seed(0)
    model = create_model(
        "DiT-S/2", input_size=8, hidden_size=D, depth=2, num_heads=HEADS, num_classes=10, num_registers=R,
        register_start=0,
    )  # fmt: skip
    with torch.no_grad():
        wanted = torch.zeros(R, D)
        wanted[:, 0] = torch.where(torch.arange(R) < k, 10.0, -10.0)
        wanted[:, 1] = -wanted[:, 0]
        model.register_tokens.copy_(wanted[None] - model.register_pos_embed)
        model.x_embedder.proj.weight[0].zero_()
        model.x_embedder.proj.bias[0] = -100.0
        for block in model.blocks:
            _attend_feature_0(block.attn.qkv, 40.0)
    return model.eval()


@pytest.mark.parametrize("k", [1, 3])
def test_only_k_of_r_registers_receive_attention(k):
    model = _planted_dit(k)
    batch = (torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([1, 7]))
    result = register_utilisation(model, batch)
    assert result.layers == ["blocks.0", "blocks.1"]
    assert result.num_registers.tolist() == [R, R] and result.mass.shape == (2, R)
    assert result.effective.tolist() == pytest.approx([k, k], rel=1e-3)
    assert result.mass[:, k:].abs().max() < 1e-6  # the others receive nothing
    assert result.mass[:, :k].flatten().tolist() == pytest.approx([1 / k] * 2 * k, rel=1e-3)
    assert result.share.tolist() == pytest.approx([1.0, 1.0], rel=1e-4)
    table = result.table()
    assert table.splitlines()[0].startswith("layer") and "blocks.1" in table and "r0 " in table


def test_kv_registers_and_layers_without_registers():
    """kv registers count first; a model with registers in no layer is an error, not an empty result."""
    torch.manual_seed(0)
    attn = dsr_kernels.RegisterAttention(D, HEADS, qkv_bias=True, num_kv_registers=R).eval()
    _attend_feature_0(attn.qkv, 4.0)
    with torch.no_grad():
        attn.register_k.zero_()
        attn.register_k[:, :2, 0] = 60.0  # only kv registers 0 and 1 get a logit far above the tokens' 0
    x = torch.randn(1, 10, D)
    with torch.no_grad():
        x[..., 0] = 0.0
    result = register_utilisation(attn, x)
    assert result.layers == ["RegisterAttention"] and result.num_registers.tolist() == [R]
    assert float(result.effective[0]) == pytest.approx(2.0, rel=1e-3)
    assert float(result.mass[0, 2:].abs().max()) < 1e-6

    # The first 3 tokens named as in-sequence registers too: they get a token's share each.
    both = register_utilisation(attn, x, sequence_registers={"RegisterAttention": 3})
    assert both.num_registers.tolist() == [R + 3] and math.isfinite(float(both.effective[0]))

    with pytest.raises(ValueError, match="no layer of DiT attended to registers"):
        register_utilisation(create_model("DiT-S/2", input_size=8, hidden_size=D, depth=1, num_heads=HEADS),
                             (torch.randn(1, 4, 8, 8), torch.rand(1), torch.tensor([0])))  # fmt: skip


@pytest.mark.parametrize("name", ["VideoDiT-S/2", "Latte-S/2"])
@pytest.mark.parametrize("placement", ["global", "per_frame"])
def test_video_models_global_and_per_frame_registers(name, placement):
    """The video models' registers, read where they sit: a layer's register mass sums to the
    register share its attention reports (collect()), per-frame groups counted as R registers."""
    torch.manual_seed(0)
    T, R = 3, 4
    model = create_model(
        name, num_frames=T, input_size=8, hidden_size=D, num_heads=HEADS, depth=4, num_classes=5,
        num_registers=R, register_placement=placement, register_block=1, backend="reference",
    ).eval()  # fmt: skip
    batch = (torch.randn(2, model.in_channels, T, 8, 8), torch.rand(2), torch.tensor([1, 2]))
    result = register_utilisation(model, batch)
    # Latte's per-frame registers lead each frame's sequence in its spatial blocks (even
    # index); in its temporal blocks the tokens' sequences hold none
    layers = ["blocks.2"] if (name, placement) == ("Latte-S/2", "per_frame") else ["blocks.1", "blocks.2", "blocks.3"]
    assert result.layers == layers and result.num_registers.tolist() == [R] * len(layers)
    with dsr_kernels.outliers.collect(model, sqnr=False) as report, torch.no_grad():
        model(*batch)
    share = {r.layer: r.register_share for r in report.records() if r.register_share is not None}
    assert result.share.tolist() == pytest.approx([share[ly] for ly in layers], rel=1e-5)
    assert 0 < float(result.share.min()) and float(result.effective.max()) <= R + 1e-6
