"""The scaling and video sections of ``dsr-kernels bench`` end to end on tiny models (no timing asserted)."""

from __future__ import annotations

import json

import pytest
import torch

from dsr_kernels.benchmark import run as run_module
from dsr_kernels.benchmark import scaling, video
from dsr_kernels.benchmark.attention import AttentionShape
from dsr_kernels.benchmark.section import BenchConfig
from dsr_kernels.models import create_model, flops

TINY = (("hidden_size", 32), ("depth", 2), ("num_heads", 2), ("register_start", 1))


@pytest.fixture
def no_budget(monkeypatch):
    """Each case times its minimum rounds only."""
    monkeypatch.setattr(BenchConfig, "budget_s", property(lambda self: 0.0))


def _run(tmp_path, section: str, **options) -> tuple[list[dict], dict]:
    cfg = BenchConfig(device=torch.device("cpu"), dtype=torch.float32, preset="quick", **options)
    assert run_module.run(cfg, [section], out=tmp_path) == 0
    data = json.loads((tmp_path / "latest" / "results.json").read_text())
    return data["rows"], data


def test_scaling_section_end_to_end_flops_are_the_analytic_count(tmp_path, monkeypatch, no_budget, capsys):
    sizes = {
        "DiT-T/2": scaling.ScalingModel("DiT-T/2", "DiT-S/2", "DiT", "T", (("input_size", 8), *TINY)),
        "LightningDiT-T/1": scaling.ScalingModel(
            "LightningDiT-T/1", "LightningDiT-S/1", "LightningDiT", "T", (("input_size", 4), ("in_channels", 8), *TINY)
        ),
    }
    monkeypatch.setattr(scaling, "SIZES", sizes)
    monkeypatch.setattr(scaling, "PRESETS", {("quick", "cpu"): {"DiT-T/2": (0, 4, 16)}})
    rows, _ = _run(tmp_path, "scaling", memory=False)

    counted = {(r["shape"], r["R"]): r for r in rows if r["provider"] == "flops"}
    assert set(counted) == {(name, R) for name in sizes for R in scaling.REGISTERS}
    for (name, R), row in counted.items():
        model = sizes[name]
        with torch.device("meta"):
            at, base = flops(model.create(R)).flops, flops(model.create(0)).flops
        assert row["flop_overhead_pct"] == pytest.approx(100 * (at / base - 1), rel=1e-12)
    # DiT by hand: from register_start on, R more tokens through qkv, proj and the MLP (12 D^2 each)
    # and (N + R)^2 instead of N^2 in Q K^T and P V.
    D, N, R, blocks = 32, 16, 16, 1
    extra = blocks * (R * 12 * D * D + 2 * ((N + R) ** 2 - N**2) * D)
    assert counted[("DiT-T/2", R)]["gflops"] - counted[("DiT-T/2", 0)]["gflops"] == pytest.approx(2 * extra / 1e9)

    timed = [r for r in rows if r["provider"] == "fused"]
    assert sorted(r["R"] for r in timed) == [0, 4, 16] and all("median_ms" in r for r in timed)
    for r in timed:
        assert r["flop_overhead_pct"] == pytest.approx(counted[("DiT-T/2", r["R"])]["flop_overhead_pct"])
        assert (r["R"] == 0) == ("latency_overhead_pct" not in r)
    assert (tmp_path / "latest" / "scaling-overhead.png").exists()
    out = " ".join(capsys.readouterr().out.split())
    assert "scaling, DiT: 64 registers add FLOPs" in out and "scaling DiT-T/2, batch 1 fwd: 16 registers add" in out


def test_scaling_models_share_the_weights_of_r0():
    model = scaling.ScalingModel("DiT-T/2", "DiT-S/2", "DiT", "T", (("input_size", 8), *TINY))
    base = model.create(0)
    with_registers = scaling._shared(model, 4, "auto", torch.device("cpu"), dict(base.state_dict()))
    assert with_registers.blocks[1].attn.qkv.weight.data_ptr() == base.blocks[1].attn.qkv.weight.data_ptr()
    assert with_registers.register_tokens.shape == (1, 4, 32) and not with_registers.register_tokens.is_meta


def test_video_section_end_to_end(tmp_path, monkeypatch, no_budget):
    monkeypatch.setattr(video, "attention_shapes", lambda device: [AttentionShape("video-n96-d16", 1, 2, 96, 16)])
    monkeypatch.setattr(video, "ATTENTION_PRESETS", {("quick", "cpu"): ["video-n96-d16"]})
    monkeypatch.setattr(video, "GRIDS", {64: (4, 8)})
    tiny = (("hidden_size", 32), ("depth", 2), ("num_heads", 2), ("register_block", 1))
    shapes = [video.VideoModelShape(f"{m}-T-64", f"{m}-S/2", 64, tiny) for m in ("Latte", "VideoDiT")]
    monkeypatch.setattr(video, "model_shapes", lambda device: shapes)
    plan = {s.name: ((4,), video.PLACEMENTS) for s in shapes}
    monkeypatch.setattr(video, "MODEL_PRESETS", {("quick", "cpu"): plan})
    rows, _ = _run(tmp_path, "video", registers=(4,))

    attn = {r["provider"]: r for r in rows if r.get("part") == "attention"}
    assert set(attn) == {"dsr", "dsr_stats", "torch_sdpa_cat"} and all("median_ms" in r for r in attn.values())
    assert attn["dsr"]["speedup"] > 0 and "stats_overhead_pct" in attn["dsr_stats"]
    assert all(r.get("peak_mem_mb") is not None for r in attn.values())

    models = [r for r in rows if r.get("part") == "model"]
    assert {(r["shape"], r["R"], r["placement"]) for r in models} == {
        (s.name, R, p) for s in shapes for R, p in ((0, "none"), (4, "global"), (4, "per_frame"))
    }
    for r in models:
        shape = next(s for s in shapes if s.name == r["shape"])
        with torch.device("meta"):
            at = flops(shape.create(r["R"], "global" if r["placement"] == "none" else r["placement"])).flops
            base = flops(shape.create(0, "global")).flops
        assert r["flop_overhead_pct"] == pytest.approx(100 * (at / base - 1))
        assert "median_ms" in r and (r["R"] == 0) == ("latency_overhead_pct" not in r)
    assert (tmp_path / "latest" / "video-attention.png").exists()
    assert (tmp_path / "latest" / "video-models.png").exists()


def test_scaling_and_video_run_only_when_named(tmp_path, capsys):
    from dsr_kernels.cli import main

    out = str(tmp_path / "never")
    assert main(["bench", "--out", out, "--shapes", "DiT-4B/2"]) == 2  # not a shape of the default sections
    assert "unknown shape or model 'DiT-4B/2'" in capsys.readouterr().err
    assert main(["bench", "--out", out, "--section", "all", "--shapes", "nope"]) == 2
    assert "DiT-4B/2" in capsys.readouterr().err and not (tmp_path / "never").exists()
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    words = " ".join(capsys.readouterr().out.split())
    assert "scaling: register overhead" in words and "video-n32768-d128" in words
    assert create_model("DiT-S/2", num_registers=121).num_registers == 121  # the sweep's stand-in for 128
