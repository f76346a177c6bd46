"""dsr_kernels.outliers.Monitor: per-layer outlier statistics every N training steps."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch
from torch import nn

import dsr_kernels
from dsr_kernels.diffusion import FlowMatching, train
from dsr_kernels.monitor import FIGURES, gini
from dsr_kernels.outliers import Monitor, MonitorWriteError, find_outliers, int8_sqnr_db

BACKEND = "reference"  # float64 definitions: exact figures, and no dependence on the compiled extension


class Block(nn.Module):
    def __init__(self, dim=32, heads=2, kv_registers=2, backend=BACKEND):
        super().__init__()
        self.norm = dsr_kernels.NormModulate(dim, backend=BACKEND)
        self.attn = dsr_kernels.RegisterAttention(dim, heads, num_kv_registers=kv_registers, backend=backend)

    def forward(self, x):
        return x + self.attn(self.norm(x).out)


class Tiny(nn.Module):
    def __init__(self, backend=BACKEND):
        super().__init__()
        self.blocks = nn.ModuleList([Block(backend=backend) for _ in range(2)])

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


class FakeWriter:
    def __init__(self):
        self.scalars = []
        self.flushed = False

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))

    def flush(self):
        self.flushed = True


class FailingWriter(FakeWriter):
    def add_scalar(self, tag, value, step):
        raise RuntimeError("disk full")


def _run(monitor, model, steps, x):
    for step in range(steps):
        with monitor.step(step):
            model(x).square().mean().backward()


def test_records_every_n_steps_and_writes_files(tmp_path, saved_figures):
    torch.manual_seed(0)
    model, writer = Tiny(), FakeWriter()
    monitor = Monitor(model, every=3, out=tmp_path / "m", tensorboard=writer)
    _run(monitor, model, 7, torch.randn(2, 12, 32))
    assert sorted({r["step"] for r in monitor.records}) == [0, 3, 6]
    assert [r["layer"] for r in monitor.records[:2]] == ["blocks.0", "blocks.1"]
    assert all(r["key_mass_from"] == "forward" for r in monitor.records)

    lines = [json.loads(s) for s in (tmp_path / "m" / "monitor.jsonl").read_text().splitlines()]
    assert [(r["step"], r["layer"]) for r in lines] == [(r["step"], r["layer"]) for r in monitor.records]
    rows = list(csv.DictReader(open(tmp_path / "m" / "monitor.csv")))
    assert len(rows) == 6 and float(rows[0]["key_gini"]) == pytest.approx(monitor.records[0]["key_gini"])

    # TensorBoard: <figure>/<layer> at each recorded step
    tags = {(tag, step) for tag, _, step in writer.scalars}
    assert ("key_gini/blocks.1", 6) in tags and ("norm_p99/blocks.0", 0) in tags
    monitor.close()
    assert writer.flushed
    plots = {p.stem for p in (tmp_path / "m" / "plots").glob("*.png")}
    assert plots == {"norm_p50", "norm_p90", "norm_p99", *FIGURES}
    ax = saved_figures[0].axes[0]
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("training step", "layer")
    assert [t.get_text() for t in ax.get_yticklabels()] == ["blocks.0", "blocks.1"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0", "3", "6"]


def test_figures_on_a_planted_outlier(tmp_path):
    torch.manual_seed(0)
    model = Tiny()
    clean = torch.randn(2, 12, 32)
    x = clean.clone()
    x[:, 4, 7] = 300.0  # one massive activation: an outlier token per image
    monitor = Monitor(model, every=1, out=tmp_path, tensorboard=False, top=3)
    with monitor.step():
        model(x)
    rec = monitor.records[0]
    assert rec["layer"] == "blocks.0" and rec["step"] == 0
    norms = x.norm(dim=-1)
    assert rec["norm_max"] == pytest.approx(float(norms.max()), rel=1e-5)
    assert rec["norm_top"] == pytest.approx(norms.flatten().topk(3).values.tolist(), rel=1e-5)
    assert rec["norm_p50"] == pytest.approx(float(norms.flatten().quantile(0.5)), rel=1e-5)
    assert rec["outlier_count"] == int(find_outliers(norms, ratio=4.0).mask.sum()) == 2
    assert rec["int8_sqnr_db"] == pytest.approx(int8_sqnr_db(x), abs=1e-4)  # the block input
    _, stats = model.blocks[0].attn(model.blocks[0].norm(x).out, return_stats=True)
    assert rec["register_share"] == pytest.approx(float(stats.register_share.mean()), rel=1e-5)
    top = stats.key_mass.max(-1).values / stats.key_mass.sum(-1)  # 1% of 14 keys: 1
    assert rec["top1pct_key_share"] == pytest.approx(float(top.mean()), rel=1e-5)
    assert rec["key_gini"] == pytest.approx(float(gini(stats.key_mass).mean()), rel=1e-5)
    assert rec["int8_sqnr_db"] < int8_sqnr_db(clean) - 10  # the outlier stretches the int8 scale


# float64 where the backend takes it; the cpu kernel's fp32 sums: a few fp32 ulps of a sum
# over 12 queries, far below the 1e-5 asked of the figures
@pytest.mark.parametrize(("backend", "dtype", "rel"), [("torch", torch.float64, 1e-9), ("cpu", torch.float32, 1e-5)])
def test_key_mass_from_the_backward(tmp_path, backend, dtype, rel):
    """key_mass="backward": the figures of the key mass the dK/dV pass sums equal the forward's
    (attention on a backend with that backward; the norm on the reference)."""
    if backend == "cpu" and (why := dsr_kernels.explain("attention", "cpu")["cpu"]) != "available":
        pytest.skip(f"the cpu kernel: {why}")
    torch.manual_seed(0)
    model = Tiny(backend).to(dtype)
    x = torch.randn(2, 12, 32, dtype=dtype)
    x[:, 4, 7] = 30.0  # an uneven key mass, so that the figures are not those of a flat one
    records = {}
    for mode in ("forward", "backward"):
        monitor = Monitor(model, every=1, out=tmp_path / mode, tensorboard=False, key_mass=mode)
        _run(monitor, model, 1, x)
        records[mode] = monitor.records
        assert [r["key_mass_from"] for r in monitor.records] == [mode, mode]
    for fwd, bwd in zip(records["forward"], records["backward"], strict=True):
        assert fwd["layer"] == bwd["layer"]
        for figure in ("top1pct_key_share", "key_gini", "register_share", "norm_max"):
            assert bwd[figure] == pytest.approx(fwd[figure], rel=rel, abs=1e-12), figure
    monitor = Monitor(model, every=1, out=tmp_path / "early", tensorboard=False, key_mass="backward")
    with pytest.raises(RuntimeError, match=r"loss.backward\(\) inside the with block"):
        with monitor.step(0):
            model(x)  # no backward inside the step: the key mass was never summed
    assert monitor.records == []
    with pytest.raises(ValueError, match="'key_mass'"):
        Monitor(model, every=1, out=tmp_path / "bad", key_mass="both")


def test_gini():
    assert float(gini(torch.ones(8))) == pytest.approx(0.0)
    assert float(gini(torch.tensor([0.0, 0.0, 0.0, 5.0]))) == pytest.approx(3 / 4)
    assert math.isnan(float(gini(torch.zeros(3))))


def test_bad_input_raises_before_anything_is_written(tmp_path):
    model = Tiny()
    with pytest.raises(ValueError, match="'model'"):
        Monitor(nn.Sequential(nn.Linear(4, 4)), every=1, out=tmp_path / "a")
    for every in (0, -2, 1.5):
        with pytest.raises(ValueError, match="'every'"):
            Monitor(model, every=every, out=tmp_path / "b")
    (tmp_path / "file").write_text("x")
    for out in (tmp_path / "file", tmp_path / "file" / "sub"):
        with pytest.raises(ValueError, match="'out'"):
            Monitor(model, every=1, out=out)
    with pytest.raises(TypeError, match="'tensorboard'"):
        Monitor(model, every=1, out=tmp_path / "c", tensorboard="yes")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_failing_writer_keeps_the_records(tmp_path):
    torch.manual_seed(0)
    model, x = Tiny(), torch.randn(1, 8, 32)
    monitor = Monitor(model, every=1, out=tmp_path, tensorboard=FailingWriter())
    with pytest.raises(MonitorWriteError, match="tensorboard: RuntimeError: disk full"):
        with monitor.step(0):
            model(x)
    assert len(monitor.records) == 2
    assert len((tmp_path / "monitor.jsonl").read_text().splitlines()) == 2  # the other writers ran

    # A file that cannot be written: its records go out with the next step's.
    monitor.writer = None
    (tmp_path / "monitor.jsonl").unlink()
    (tmp_path / "monitor.jsonl").mkdir()
    with pytest.raises(MonitorWriteError, match="jsonl"):
        with monitor.step(1):
            model(x)
    assert [r["step"] for r in monitor.records] == [0, 0, 1, 1]
    (tmp_path / "monitor.jsonl").rmdir()
    with monitor.step(2):
        model(x)
    lines = [json.loads(s) for s in (tmp_path / "monitor.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 1, 2, 2]


def test_callback_and_no_tensorboard_installed(tmp_path):
    seen = []
    model = Tiny()
    monitor = Monitor(model, every=2, out=tmp_path, callback=seen.append)  # tensorboard is not required
    _run(monitor, model, 3, torch.randn(1, 8, 32))
    assert [[r["step"] for r in recs] for recs in seen] == [[0, 0], [2, 2]]


def test_train_with_monitor(tmp_path):
    torch.manual_seed(0)
    model = dsr_kernels.models.create_model(
        "DiT-S/2", input_size=4, in_channels=2, hidden_size=32, num_heads=2, depth=2, num_classes=3,
        learn_sigma=False, num_registers=1, register_start=1, backend=BACKEND,
    )  # fmt: skip
    batches = [(torch.randn(2, 2, 4, 4), torch.randint(0, 3, (2,))) for _ in range(3)]
    monitor = Monitor(model, every=2, out=tmp_path, tensorboard=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    losses = train(model, FlowMatching(), batches, optimizer=optimizer, monitor=monitor)
    # train() runs the backward inside the step too: the key mass can come from it
    backward = Monitor(model, every=2, out=tmp_path / "bwd", tensorboard=False, key_mass="backward")
    train(model, FlowMatching(), batches[:1], optimizer=optimizer, monitor=backward)
    assert {r["key_mass_from"] for r in backward.records if r["register_share"] is not None} == {"backward"}
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    recorded = {(r["step"], r["layer"]) for r in monitor.records if r["register_share"] is not None}
    assert recorded == {(s, f"blocks.{i}") for s in (0, 2) for i in range(2)}
    assert all(r["register_share"] > 0 for r in monitor.records if r["layer"] == "blocks.1")
    with pytest.raises(ValueError, match="'monitor'"):
        train(Tiny(), FlowMatching(), batches, optimizer=optimizer, monitor=monitor)
