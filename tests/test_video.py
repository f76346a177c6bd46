"""Video DiTs (Latte, VideoDiT) with registers: fused vs reference, gradients, the attention
arrangements against masked full attention, 3-D RoPE tables, FLOPs against FlopCounterMode,
bad input, and the per-frame outlier statistics."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import dsr_kernels
from dsr_kernels.backends import triton_interpreting
from dsr_kernels.models import Latte, VIDEO_16x32x32, VideoDiT, create_model, list_models
from dsr_kernels.models.layers import get_2d_sincos_pos_embed
from dsr_kernels.models.video import frame_attention, sincos_2d
from dsr_kernels.outliers import VideoLayout, collect, set_video_layout
from dsr_kernels.rope import rope_1d_tables, rope_2d_tables, rope_3d_tables
from dsr_kernels.types import AttentionStats
from utils import assert_close, assert_within_eager_error

# Tiny and awkward: 3 frames of 3 x 5 tokens (patch 1), head dim 8, registers from block 1 of
# 4 so that blocks before and after the insertion run (Latte: a spatial and a temporal one each).
TINY = dict(num_frames=3, input_size=(3, 5), patch_size=1, in_channels=3, hidden_size=32, depth=4, num_heads=4)
REGISTERS = [(0, "global"), (1, "global"), (4, "global"), (1, "per_frame"), (4, "per_frame")]


def tiny(cls, R=0, placement="global", **overrides):
    cfg = dict(TINY, num_classes=5, num_registers=R, register_placement=placement, register_block=1)
    return cls(**{**cfg, **overrides})


def perturb(model):
    """Random weights everywhere (adaLN-Zero would make every block the identity)."""
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    return model


def inputs(model, B=2, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    T, (H, W) = model.num_frames, model.input_size
    x = torch.randn(B, model.in_channels, T, H, W, generator=g, dtype=dtype)
    t = torch.rand(B, generator=g, dtype=dtype)
    y = torch.randint(0, 5, (B,), generator=g) if model.y_embedder is not None else None
    args = [x, t, y]
    if model.context_dim is not None:
        args.append(torch.randn(B, 4, model.context_dim, generator=g, dtype=dtype))
    return args


def twin(model, **overrides):
    """The same weights in a model built with other arguments (backend)."""
    other = type(model)(**{**model.config.__dict__, **overrides})
    other.load_state_dict(model.state_dict())
    return other


def run(model, args, dtype):
    model = model.to(dtype).eval()
    args = [a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
    out = model(*args)
    out.square().sum().backward()
    return out, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


# ----------------------------------------------------------------------------- models vs reference


@pytest.mark.parametrize("R, placement", REGISTERS)
@pytest.mark.parametrize("cls", [Latte, VideoDiT])
def test_model_matches_reference_float64(cls, R, placement):
    """The fused path (auto: "torch" attention in float64) equals the float64 definitions, out and grads."""
    torch.manual_seed(0)
    extra = dict(context_dim=6, num_classes=0) if cls is VideoDiT and R == 4 else {}  # text on one case each
    model = perturb(tiny(cls, R, placement, **extra))
    args = inputs(model)
    out, grads = run(model, args, torch.float64)
    ref_out, ref_grads = run(twin(model, backend="reference"), args, torch.float64)
    assert out.shape == (2, 3, 3, 3, 5)
    assert_close("out", out, ref_out, atol=1e-12, rtol=1e-10)
    assert grads.keys() == ref_grads.keys()
    for name, g in grads.items():
        assert g is not None, name
        assert_close(f"d{name}", g, ref_grads[name], atol=1e-12, rtol=1e-9)
    if R:
        assert grads["register_tokens"].abs().sum() > 0  # the registers are used and learn


@pytest.mark.parametrize(
    "cls, R, placement", [(Latte, 4, "global"), (Latte, 1, "per_frame"), (VideoDiT, 4, "per_frame")]
)
def test_fused_float32_within_eager_error(cls, R, placement):
    """float32 on the default backends (CPU kernels) vs float64 reference, within 2x the error of
    the eager PyTorch model in float32, out and every gradient."""
    torch.manual_seed(1)
    fused = perturb(tiny(cls, R, placement))
    args = inputs(fused)
    got, got_g = run(fused, args, torch.float32)
    ref, ref_g = run(twin(fused, backend="reference"), args, torch.float64)
    eager, eager_g = run(twin(fused, backend="eager"), args, torch.float32)
    assert_within_eager_error("out", got, ref, eager, torch.float32)
    for name, g in got_g.items():
        assert_within_eager_error(f"d{name}", g, ref_g[name], eager_g[name], torch.float32)


@pytest.mark.skipif(not triton_interpreting(), reason="Triton on CPU tensors needs TRITON_INTERPRET=1")
@pytest.mark.parametrize("cls, R, placement, B", [(Latte, 1, "global", 1), (VideoDiT, 1, "per_frame", 2)])
def test_triton_model_within_eager_error(cls, R, placement, B):
    """The Triton kernels (in the interpreter on a CPU): broadcast kv registers, in-kernel 3-D RoPE."""
    torch.manual_seed(7)
    small = dict(depth=2, hidden_size=16, num_heads=2)
    fused = perturb(tiny(cls, R, placement, backend="triton", **small))
    args = inputs(fused, B=B)
    got, got_g = run(fused, args, torch.float32)
    ref, ref_g = run(twin(fused, backend="reference"), args, torch.float64)
    eager, eager_g = run(twin(fused, backend="eager"), args, torch.float32)
    assert_within_eager_error("out", got, ref, eager, torch.float32)
    for name, g in got_g.items():
        assert_within_eager_error(f"d{name}", g, ref_g[name], eager_g[name], torch.float32)


def test_global_registers_single_sample_reads_them_in_place():
    """B = 1: the registers' keys and values are a broadcast view over the frames (stride 0)."""
    torch.manual_seed(2)
    model = perturb(tiny(Latte, 4, "global"))
    x, t, y = inputs(model, B=1)
    ref = twin(model, backend="reference").double().eval()
    assert_close("out", model.eval()(x, t, y), ref(x.double(), t.double(), y), atol=2e-5)


def test_zero_registers_is_the_baseline_model():
    for cls in (Latte, VideoDiT):
        torch.manual_seed(0)
        a = tiny(cls)
        torch.manual_seed(0)
        b = tiny(cls, 0, "per_frame", register_block=3)
        assert a.state_dict().keys() == b.state_dict().keys()
        args = inputs(perturb(a))
        b.load_state_dict(a.state_dict())
        assert torch.equal(a.eval()(*args), b.eval()(*args))


@pytest.mark.parametrize("temporal", [False, True])
@pytest.mark.parametrize("P, Rf", [(0, 0), (2, 0), (0, 1), (2, 1)])
def test_frame_attention_is_masked_full_attention(temporal, P, Rf):
    """Latte's spatial / temporal attention with global registers is full attention over the
    stream under the mask: a token sees the global registers and its frame (spatial) or its
    slot (temporal); a global register sees everything."""
    torch.manual_seed(3)
    T, S, C, B = 3, Rf + 4, 16, 2
    block = perturb(tiny(Latte, hidden_size=C, num_heads=2).double()).blocks[int(temporal)]
    x = torch.randn(B, P + T * S, C, dtype=torch.float64)
    got = frame_attention(block.attn, x, frames=T, num_global=P, frame_registers=Rf, temporal=temporal)

    attn, N = block.attn, P + T * S
    q, k, v = attn.qkv(x).view(B, N, 3, 2, C // 2).permute(2, 0, 3, 1, 4)  # [B, H, N, hd]
    frame = torch.cat([torch.full((P,), -1), torch.arange(T).repeat_interleave(S)])
    slot = torch.cat([torch.full((P,), -1), torch.arange(S).repeat(T)])
    group = slot if temporal else frame
    mask = (group[:, None] == group[None, :]) | (group[None, :] == -1) | (group[:, None] == -1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    want = attn.proj(out.transpose(1, 2).reshape(B, N, C))
    assert_close("frame_attention", got, want, atol=1e-12)


# ----------------------------------------------------------------------------- RoPE, registry, layout


def test_rope_3d_tables():
    # one frame, the head dim split between rows and columns: the 2-D (EVA) tables
    for got, want in zip(rope_3d_tables(1, 3, 5, 16, split=(0, 8, 8)), rope_2d_tables(3, 5, 16), strict=True):
        assert_close("2d", got, want, atol=1e-6)
    # one axis: the 1-D tables, both pairings
    for style in ("interleaved", "half"):
        for got, want in zip(
            rope_3d_tables(1, 1, 7, 12, split=(0, 0, 12), style=style), rope_1d_tables(7, 12, style=style), strict=True
        ):
            assert_close(style, got, want, atol=1e-6)
    cos, sin = rope_3d_tables(3, 2, 5, 72, num_identity_rows=4)  # Wan's split: 24 / 24 / 24
    assert cos.shape == sin.shape == (4 + 30, 72)
    assert torch.equal(cos[:4], torch.ones(4, 72)) and torch.equal(sin[:4], torch.zeros(4, 72))
    # token (t, row, col) = (2, 1, 3): t rotates the first 24 channels, the row the next 24, the column the rest
    angle = torch.atan2(sin[4 + (2 * 2 + 1) * 5 + 3], cos[4 + (2 * 2 + 1) * 5 + 3])
    assert_close("t", angle[0:2], torch.tensor([2.0, 2.0]), atol=1e-6)
    assert_close("row", angle[24:26], torch.tensor([1.0, 1.0]), atol=1e-6)
    assert_close("col", angle[48:50], torch.tensor([3.0, 3.0]), atol=1e-6)
    with pytest.raises(ValueError, match="split"):
        rope_3d_tables(2, 2, 2, 16, split=(6, 6, 6))


def test_sincos_2d_is_dits_on_a_square():
    assert_close("pos", sincos_2d(64, 6, 6), torch.from_numpy(get_2d_sincos_pos_embed(64, 6)).float(), atol=0)


def test_names_sizes_and_realistic_config():
    names = [n for n in list_models() if n.startswith(("Latte-", "VideoDiT-"))]
    assert len(names) == 16
    with torch.device("meta"):
        for size, (hidden, depth, heads) in {"S": (384, 12, 6), "XL": (1152, 28, 16)}.items():
            model = create_model(f"Latte-{size}/2", num_registers=16, register_placement="per_frame")
            assert (model.hidden_size, model.depth, model.num_heads) == (hidden, depth, heads)
            assert model.register_block == (8 if depth >= 24 else 4)  # DSR's choice, as the image models
        big = create_model("VideoDiT-XL/2", num_registers=16, **VIDEO_16x32x32)
        base = create_model("VideoDiT-XL/2", **VIDEO_16x32x32)
    assert big.grid == (16, 32, 32) and big.num_tokens == 16_384 and big.num_register_tokens == 16
    overhead = dsr_kernels.flops(big).flops / dsr_kernels.flops(base).flops - 1
    assert 0 < overhead < 0.01  # 16 registers beside 16,384 tokens
    with pytest.raises(ValueError, match="register_placement"):
        create_model("Latte-S/2", num_registers=4, register_placement="per_head")
    with pytest.raises(ValueError, match="depth must be even"):
        create_model("Latte-S/2", depth=3)
    with pytest.raises(ValueError, match="register_block"):
        create_model("VideoDiT-S/2", depth=2, num_registers=4, register_block=2)


# ----------------------------------------------------------------------------- FLOPs


SIZES = {"S": (384, 6), "B": (768, 12), "L": (1024, 16), "XL": (1152, 16)}


@pytest.mark.parametrize("size", list(SIZES))
def test_flops_equal_flop_counter(size):
    """dsr_kernels.flops equals FlopCounterMode on the model run on the float64 definitions
    (backend="reference", whose matrix products the counter sees), every size and placement;
    depth 2 with registers from block 1 and a 3 x 3 x 5 grid (the count is analytic in the config).
    On the meta device (shapes only), once on the CPU."""
    hidden, heads = SIZES[size]
    for cls, text in ((Latte, False), (VideoDiT, False), (VideoDiT, True)):
        for R, placement in ((0, "global"), (4, "global"), (4, "per_frame")):
            cfg = dict(TINY, hidden_size=hidden, num_heads=heads, depth=2, num_registers=R, register_block=1)
            cfg.update(register_placement=placement, num_classes=5, backend="reference")
            if text:
                cfg.update(context_dim=24, context_len=4)
            device = "cpu" if (size, cls, R, placement, text) == ("S", Latte, 4, "global", False) else "meta"
            with torch.device(device):
                model = cls(**cfg).eval()
            args = inputs(model)
            with FlopCounterMode(display=False) as counter, torch.no_grad():
                model(*[a.to(device) if isinstance(a, torch.Tensor) else a for a in args])
            want = dsr_kernels.flops(model, batch_size=2).flops
            got = counter.get_total_flops()
            assert abs(got - want) <= 0.01 * got, (cls.__name__, text, R, placement, got, want)


def test_register_flops_grow_with_the_placement():
    with torch.device("meta"):
        base, one, per_frame = (
            dsr_kernels.flops(create_model("Latte-S/2", num_registers=R, register_placement=p, **VIDEO_16x32x32)).flops
            for R, p in ((0, "global"), (16, "global"), (16, "per_frame"))
        )
    assert base < one < per_frame


# ----------------------------------------------------------------------------- bad input


def _no_kernel(model):
    def fail(*_):
        raise AssertionError("a kernel ran before the input was checked")

    model.x_embedder.register_forward_pre_hook(fail)
    return model


BAD = [
    ("x", lambda m, a: [a[0][:, :, :2], *a[1:]], "T=3", "[2, 3, 2, 3, 5]"),  # wrong frame count
    ("x", lambda m, a: [a[0][..., :4], *a[1:]], "W=5", "[2, 3, 3, 3, 4]"),  # wrong width
    ("x", lambda m, a: [a[0][:, :2], *a[1:]], "C=3", "[2, 2, 3, 3, 5]"),  # wrong channels
    ("x", lambda m, a: [a[0][:, :, 0], *a[1:]], "[B, C=3, T=3, H=3, W=5]", "[2, 3, 3, 5]"),  # an image
    ("t", lambda m, a: [a[0], a[1][:1], *a[2:]], "[B=2]", "[1]"),
]


@pytest.mark.parametrize("case", range(len(BAD)))
@pytest.mark.parametrize("cls", [Latte, VideoDiT])
def test_bad_latent_raises_before_any_kernel(cls, case):
    name, make, expected, seen = BAD[case]
    model = _no_kernel(tiny(cls, 4))
    with pytest.raises(ValueError, match=f"argument '{name}'") as err:
        model(*make(model, inputs(model)))
    assert expected in str(err.value) and seen in str(err.value), str(err.value)


@pytest.mark.parametrize(
    "placement, shape, expected", [("global", (5, 32), "[4, 32]"), ("per_frame", (4, 32), "[3, 4, 32]")]
)
@pytest.mark.parametrize("cls", [Latte, VideoDiT])
def test_bad_registers_raise(cls, placement, shape, expected):
    model = _no_kernel(tiny(cls, 4, placement))
    with pytest.raises(ValueError, match="argument 'registers'") as err:
        model(*inputs(model), registers=torch.zeros(shape))
    assert expected in str(err.value) and str(list(shape)) in str(err.value), str(err.value)
    with pytest.raises(ValueError, match="argument 'registers'.*num_registers=0"):
        _no_kernel(tiny(cls))(*inputs(model), registers=torch.zeros(shape))


def test_registers_given_at_forward_replace_the_models():
    torch.manual_seed(4)
    for cls in (Latte, VideoDiT):
        for placement in ("global", "per_frame"):
            model = perturb(tiny(cls, 4, placement)).eval()
            args = inputs(model)
            own = model.registers().detach()
            assert torch.equal(model(*args), model(*args, registers=own))
            batched = own.expand(2, *own.shape).clone()
            batched[1] += torch.randn_like(batched[1])  # sample 1 gets other registers: only its output changes
            out, base = model(*args, registers=batched), model(*args)
            assert torch.allclose(out[0], base[0], atol=1e-6) and (out[1] - base[1]).abs().max() > 1e-5


def test_bad_rope_and_context_raise():
    model = _no_kernel(tiny(VideoDiT, 4, context_dim=6, num_classes=0))
    x, t, y, ctx = inputs(model)
    cos, sin = rope_3d_tables(3, 3, 5, 8)
    with pytest.raises(
        ValueError, match=r"argument 'rope' \(cos\).*\[T \* h \* w = 3 \* 3 \* 5 = 45, head_dim=8\].*\[44, 8\]"
    ):
        model(x, t, None, ctx, rope=(cos[:44], sin[:44]))
    with pytest.raises(ValueError, match=r"argument 'rope' \(sin\).*\[45, 4\]"):
        model(x, t, None, ctx, rope=(cos, sin[:, :4]))
    with pytest.raises(ValueError, match=r"argument 'context' must be text tokens \[B=2, L, 6\], got \[2, 4, 5\]"):
        model(x, t, None, ctx[..., :5])
    with pytest.raises(ValueError, match=r"argument 'y' must be None"):
        model(x, t, torch.tensor([1, 2]), ctx)


def test_rope_given_at_forward():
    torch.manual_seed(5)
    model = perturb(tiny(VideoDiT, 4)).eval()
    args = inputs(model)
    cos, sin = rope_3d_tables(3, 3, 5, 8)
    assert torch.equal(model(*args), model(*args, rope=(cos, sin)))  # the model's own tables
    hunyuan = rope_3d_tables(3, 3, 5, 8, theta=256.0, split=(2, 2, 4))
    assert not torch.allclose(model(*args), model(*args, rope=hunyuan))


# ----------------------------------------------------------------------------- per-frame statistics


@pytest.mark.parametrize(
    "cls, R, placement", [(Latte, 4, "global"), (Latte, 1, "per_frame"), (VideoDiT, 4, "per_frame")]
)
def test_planted_outlier_is_found_in_its_frame_and_position(cls, R, placement, tmp_path):
    """A latent pixel made huge in frame 1 at (row 2, col 3) of sample 0: its token is the norm
    outlier of the first layer, and the report places it there."""
    torch.manual_seed(6)
    model = perturb(tiny(cls, R, placement)).eval()
    x, t, *rest = inputs(model)
    x[0, :, 1, 2, 3] = 1000.0
    with collect(model) as report, torch.no_grad():
        for tag in ("t=0.2", "t=0.8"):
            report.set_tag(tag)
            model(x, t, *rest)
    frames = report.frame_records()
    assert [(r.tag, r.layer) for r in frames] == [(tag, f"blocks.{i}") for tag in ("t=0.2", "t=0.8") for i in range(4)]
    first = frames[0]
    assert first.outlier_locations() == [(1, 2, 3, 1)]
    assert first.outliers_per_frame.tolist() == [0, 1, 0]
    assert first.norm_max.argmax() == 1
    for r in frames:
        assert (r.frames, r.height, r.width) == (3, 3, 5)
        assert r.key_mass.shape == (3, 3, 5) and r.key_mass_per_position.shape == (3, 5)
        total = float(r.key_mass.sum()) + r.register_key_mass
        assert abs(total - 1.0) < 1e-5, total  # every key's mass, the registers' included
        assert r.register_share.shape == (3,) and bool(((r.register_share >= 0) & (r.register_share <= 1)).all())
    after = [r for r in frames if r.layer != "blocks.0"]
    assert all(r.register_key_mass > 0 for r in after)  # registers from block 1 on
    records = {(r.tag, r.layer): r for r in report.records()}
    assert records[("t=0.2", "blocks.0")].outlier_count == 1
    assert records[("t=0.2", "blocks.0")].outlier_attention is not None  # mapped onto each call's keys
    table = report.frame_table()
    assert "1:1" in table and "(1,2,3)x1" in table
    report.plot_frames(str(tmp_path / "frames.png"))
    assert (tmp_path / "frames.png").stat().st_size > 0


def test_key_mass_is_placed_by_frame_and_position():
    """Synthetic statistics of a temporal call: the key mass lands on the stream tokens the
    layout says, the global registers' (kv) mass with the registers."""
    model = nn.Module()
    model.blk = nn.Module()
    model.blk.norm1 = nn.Identity()
    # stream: [g ; frame 0: r, p0, p1 ; frame 1: r, p0, p1], 1 x 2 patches, 1 register per frame
    layout = VideoLayout(2, 1, 2, frame_registers=1, prefix_frames=(-1,))
    key_mass = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])[:, None]  # [B * S, H, 1 + T]
    share = torch.tensor([[0.1, 0.2], [0.3, 0.4], [0.5, 0.6]])[:, None]  # [B * S, H, T]
    stats = AttentionStats(torch.zeros(3, 1, 2), torch.zeros(3, 1, 2), share, key_mass)
    with collect(model) as report:
        set_video_layout(model.blk.norm1, layout, "temporal")
        report.record_attention("blk", stats, 1)
    (r,) = report.frame_records()
    total = float(key_mass.sum())
    assert_close("key_mass", r.key_mass, torch.tensor([[[5.0, 8.0]], [[6.0, 9.0]]]) / total, atol=1e-7)
    assert abs(r.register_key_mass - (1 + 4 + 7 + 2 + 3) / total) < 1e-7
    assert_close("register_share", r.register_share, torch.tensor([0.4, 0.5]), atol=1e-7)  # frame f: slots 1, 2
    assert r.outlier_count is None  # no norms recorded
    with pytest.raises(ValueError, match="arrangement"):
        with collect(model):
            set_video_layout(model.blk.norm1, layout, "diagonal")
