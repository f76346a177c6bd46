"""dsr_kernels.outliers: outlier rules, int8 SQNR, and per-layer records from collect()."""

import math

import pytest
import torch
from torch import nn

import dsr_kernels
from dsr_kernels.outliers import collect, find_outliers, int8_sqnr_db
from timm_import import import_timm


def test_find_outliers_rules():
    norms = torch.tensor([[10.0, 12.0, 200.0, 11.0, 9.0], [1.0, 1.0, 1.0, 50.0, 1.0]])
    absolute = find_outliers(norms, threshold=150)
    assert absolute.mask.tolist() == [[False, False, True, False, False], [False] * 5]
    assert absolute.indices.tolist() == [[0, 2]]
    relative = find_outliers(norms, ratio=4.0)  # per image: 4 x median (11 and 1)
    assert relative.mask.tolist() == [[False, False, True, False, False], [False, False, False, True, False]]
    top = find_outliers(norms, top_k=2)
    assert top.mask.sum(-1).tolist() == [2, 2] and top.mask[0, 2] and top.mask[0, 1] and top.mask[1, 3]


@pytest.mark.parametrize(
    "kwargs, word",
    [
        (dict(), "exactly one"),
        (dict(threshold=1.0, top_k=1), "exactly one"),
        (dict(ratio=0.0), "'ratio'"),
        (dict(top_k=9), "'top_k'"),
    ],
)
def test_find_outliers_bad_rules(kwargs, word):
    with pytest.raises(ValueError, match=word):
        find_outliers(torch.ones(2, 5), **kwargs)


def test_int8_sqnr_db():
    x = torch.randn(10000)
    s = x.abs().max() / 127
    q = torch.round(x / s) * s
    expected = 10 * math.log10(float(x.square().sum() / (x - q).square().sum()))
    assert abs(int8_sqnr_db(x) - expected) < 1e-6
    x_outlier = x.clone()
    x_outlier[0] = 1000.0  # one outlier stretches the scale: far lower SQNR
    assert int8_sqnr_db(x_outlier) < expected - 20
    assert int8_sqnr_db(torch.zeros(5)) == math.inf


class Block(nn.Module):
    def __init__(self, dim, heads, kv_registers):
        super().__init__()
        self.norm = dsr_kernels.NormModulate(dim)
        self.attn = dsr_kernels.RegisterAttention(dim, heads, num_kv_registers=kv_registers)

    def forward(self, x, registers=None):
        res = self.norm(x, registers=registers)
        h = res.residual if res.residual is not None else x
        return h + self.attn(res.out)


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([Block(64, 4, 2) for _ in range(2)])
        self.registers = nn.Parameter(torch.randn(3, 64))

    def forward(self, x):
        x = self.blocks[0](x, registers=self.registers)  # inserts 3 registers
        return self.blocks[1](x)


def test_collect_records_match_direct_computation():
    torch.manual_seed(0)
    model = Tiny()
    x = torch.randn(2, 40, 64)
    x[:, 5] *= 25.0  # an outlier token
    expected_out = model(x)
    with collect(model) as report:
        out = model(x)
    assert torch.equal(out, expected_out)  # recording changes nothing
    records = {r.layer: r for r in report.records()}
    assert set(records) == {"blocks.0", "blocks.1"}

    # Recompute blocks.0 by hand: its norm input is [registers ; x].
    h = torch.cat([model.registers.detach().expand(2, -1, -1), x], 1)
    norms = h.norm(dim=-1)
    rec = records["blocks.0"]
    assert rec.tokens == 2 * 43
    assert rec.norm_max == pytest.approx(float(norms.max()), rel=1e-5)
    assert rec.norm_median == pytest.approx(float(norms.flatten().median()), rel=1e-5)
    mask = find_outliers(norms, ratio=4.0).mask
    assert rec.outlier_count == int(mask.sum()) == 2  # token 5 of each image
    rms = h.square().mean().sqrt()
    assert rec.absmax_over_rms == pytest.approx(float(h.abs().max() / rms), rel=1e-4)
    assert rec.kurtosis == pytest.approx(float(h.pow(4).mean() / h.square().mean() ** 2), rel=1e-4)
    assert rec.int8_sqnr_db == pytest.approx(int8_sqnr_db(h), abs=1e-4)

    normed = model.blocks[0].norm(x, registers=model.registers).out
    _, stats = model.blocks[0].attn(normed, return_stats=True)
    token_mass = stats.key_mass[..., 2:]  # after the 2 kv registers
    share = (token_mass * mask[:, None, :]).sum(-1) / stats.key_mass.sum(-1)
    assert rec.outlier_attention == pytest.approx(float(share.mean()), rel=1e-5)
    assert rec.register_share == pytest.approx(float(stats.register_share.mean()), rel=1e-5)
    assert rec.entropy == pytest.approx(float(stats.entropy.mean()), rel=1e-5)
    top = stats.key_mass.topk(1, dim=-1).values.sum(-1) / stats.key_mass.sum(-1)  # 1% of 45 keys -> 1
    assert rec.top1pct_key_share == pytest.approx(float(top.mean()), rel=1e-5)


def test_collect_tags_table_and_plot(tmp_path):
    model = Tiny()
    x = torch.randn(1, 20, 64)
    with collect(model, top_k=1, sqnr=False) as report:
        for t in (0.25, 0.75):
            report.set_tag(f"t={t}")
            model(x * (1 + t))
    records = report.records()
    assert [(r.tag, r.layer) for r in records] == [
        ("t=0.25", "blocks.0"),
        ("t=0.25", "blocks.1"),
        ("t=0.75", "blocks.0"),
        ("t=0.75", "blocks.1"),
    ]
    assert all(r.outlier_count == 1 and r.int8_sqnr_db is None for r in records)
    table = report.table()
    assert "blocks.1" in table and "t=0.75" in table and "norm_max" in table
    path = report.plot(str(tmp_path / "norms.png"))
    assert (tmp_path / "norms.png").stat().st_size > 1000 and path.endswith("norms.png")


class AttentionOnly(nn.Module):
    """What a patched timm ViT gives collect(): RegisterAttention modules, norms that are not the package's."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(
            [nn.ModuleDict(dict(norm=nn.LayerNorm(64), attn=dsr_kernels.RegisterAttention(64, 4))) for _ in range(2)]
        )

    def forward(self, x):
        for b in self.blocks:
            x = x + b.attn(b.norm(x))
        return x


def _patched_timm_vit():
    timm, missing = import_timm()
    if timm is None:
        pytest.skip(str(missing))
    model = timm.create_model(
        "vit_base_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4
    ).eval()
    dsr_kernels.patch(model)
    return model, torch.randn(1, 3, 32, 32)


NORM_COLUMNS = ("tokens", "norm_max", "norm_median", "norm_p99", "outlier_count", "outlier_fraction")


@pytest.mark.parametrize("build", ["attention_only", "patched_timm_vit"])
def test_what_was_not_measured_says_so(build, tmp_path, saved_figures):
    """No package norm: the token norms were never measured, so they are None / "not measured"
    (not an outlier count of 0), and the plot has no token-norm panel."""
    torch.manual_seed(0)
    model, x = (AttentionOnly(), torch.randn(1, 20, 64)) if build == "attention_only" else _patched_timm_vit()
    with collect(model) as report, torch.no_grad():
        model(x)
    records = report.records()
    assert {r.layer for r in records} == {"blocks.0", "blocks.1"}
    for r in records:
        assert all(getattr(r, c) is None for c in NORM_COLUMNS), r
        assert r.outlier_attention is None and r.int8_sqnr_db is None and r.kurtosis is None
        assert 0 < r.top1pct_key_share <= 1 and not math.isnan(r.entropy)  # attention was measured
    header, *rows = report.table().splitlines()
    for c in NORM_COLUMNS:
        at = header.index(c)
        assert all(row[at:].startswith("not measured") for row in rows), (c, rows)

    report.plot(str(tmp_path / "attention.png"))
    (ax,) = saved_figures[0].axes  # the attention panel only
    assert "top 1% of keys" in ax.get_title() and ax.get_xlabel() == "layer" and ax.get_ylabel()


def test_plot_panels_have_axis_labels_and_need_something_measured(tmp_path, saved_figures):
    with collect(Tiny()) as report:
        Tiny()(torch.randn(1, 8, 64))  # another model: nothing recorded
    with pytest.raises(ValueError, match="nothing to plot"):
        report.plot(str(tmp_path / "empty.png"))
    model = Tiny()
    with collect(model) as report:
        model(torch.randn(1, 8, 64))
    report.plot(str(tmp_path / "both.png"))
    norm_ax, attn_ax = saved_figures[0].axes
    assert norm_ax.get_title() == "token norm" and "top 1% of keys" in attn_ax.get_title()
    assert all(ax.get_xlabel() == "layer" and ax.get_ylabel() for ax in (norm_ax, attn_ax))


def test_no_recording_outside_collect():
    model = Tiny()
    with collect(model) as report:
        pass
    model(torch.randn(1, 8, 64))
    assert report.records() == []


def test_collect_rejects_two_rules():
    with pytest.raises(ValueError, match="at most one"), collect(Tiny(), threshold=1.0, top_k=2):
        pass
