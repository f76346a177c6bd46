"""The distributed section of ``dsr-kernels bench``: its model of ring / Ulysses on G devices, and the section
end to end on 2 gloo processes at a tiny shape (no timing asserted)."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from dsr_kernels.benchmark import distributed as section
from dsr_kernels.benchmark import run as run_module
from dsr_kernels.benchmark.distributed import LayerShape, crossover_tokens, layer_model, ring_step, ulysses_layer
from dsr_kernels.benchmark.section import BenchConfig

WAN = LayerShape("wan", 1, 12, 12, 32760, 128)
GQA = LayerShape("gqa", 2, 32, 8, 8192, 64, R=4)


@pytest.mark.parametrize("shape", [WAN, GQA], ids=lambda s: s.name)
@pytest.mark.parametrize("scheme", ["ring", "ulysses"])
@pytest.mark.parametrize("direction", ["fwd", "bwd"])
def test_crossover_is_where_communication_equals_compute(shape, scheme, direction):
    """At the crossover length the modelled transfer takes as long as the compute; below it longer, above shorter."""
    W, F = 900e9, 790e12
    part = ring_step if scheme == "ring" else ulysses_layer
    S = crossover_tokens(shape, 8, scheme=scheme, direction=direction)
    at = part(LayerShape(**{**shape.__dict__, "S": S}), 8, direction=direction)
    assert at["bytes"] / W == pytest.approx(at["flops"] / F, rel=1e-9)
    for factor, longer in ((0.5, True), (2.0, False)):
        other = part(LayerShape(**{**shape.__dict__, "S": S * factor}), 8, direction=direction)
        assert (other["bytes"] / W > other["flops"] / F) == longer


def test_crossover_closed_forms():
    """H = Hk, bfloat16: ring hides its K/V step from S = G F / W; Ulysses' all-to-alls cost less than its
    compute from S = 2 (G - 1) / G F / W (backward: 1.2x and 0.4x those)."""
    F_over_W = 790e12 / 900e9
    for G in (2, 4, 8, 64):
        assert crossover_tokens(WAN, G, scheme="ring") == pytest.approx(G * F_over_W)
        assert crossover_tokens(WAN, G, scheme="ring", direction="bwd") == pytest.approx(1.2 * G * F_over_W)
        assert crossover_tokens(WAN, G, scheme="ulysses") == pytest.approx(2 * (G - 1) / G * F_over_W)
        assert crossover_tokens(WAN, G, scheme="ulysses", direction="bwd") == pytest.approx(
            0.8 * (G - 1) / G * F_over_W
        )
    # GQA: fewer K/V heads, less to move: a ring step hides its transfer at H / Hk times shorter shards
    assert crossover_tokens(GQA, 8, scheme="ring") == pytest.approx(crossover_tokens(WAN, 8, scheme="ring") / 4)


@pytest.mark.parametrize("scheme", ["ring", "ulysses"])
def test_crossover_monotone_in_bandwidth_throughput_and_devices(scheme):
    lengths = [crossover_tokens(WAN, 8, scheme=scheme, link_gbs=w) for w in (25, 50, 450, 900, 1800)]
    assert all(a > b for a, b in zip(lengths, lengths[1:], strict=False)), "faster links: shorter sequences hide"
    lengths = [crossover_tokens(WAN, 8, scheme=scheme, tflops=f) for f in (100, 400, 790, 2000)]
    assert all(a < b for a, b in zip(lengths, lengths[1:], strict=False)), "faster devices: longer sequences needed"
    lengths = [crossover_tokens(WAN, G, scheme=scheme) for G in (2, 4, 8, 16, 32)]
    assert all(a < b for a, b in zip(lengths, lengths[1:], strict=False))
    if scheme == "ring":  # linear in G; Ulysses tends to a constant
        assert lengths[-1] == pytest.approx(16 * lengths[0])
    else:
        assert lengths[-1] < 2 * lengths[0]


@pytest.mark.parametrize("mode", ["fwd", "full"])
def test_layer_model_bytes_times_and_efficiency(mode):
    G, b = 4, 2
    n = WAN.S / G
    kv = 2 * WAN.B * WAN.Hk * n * WAN.D * b
    ring = layer_model(WAN, G, scheme="ring", mode=mode)
    expected = (G - 1) * kv + ((G - 1) * kv + G * kv / b * 4 if mode == "full" else 0)
    assert ring["bytes"] == pytest.approx(expected)
    uly = layer_model(WAN, G, scheme="ulysses", mode=mode)
    assert uly["bytes"] == pytest.approx((2 if mode == "full" else 1) * (G - 1) / G * 4 * WAN.B * n * WAN.H * WAN.D * b)
    assert uly["layer_s"] == pytest.approx(uly["compute_s"] + uly["comm_s"])  # the all-to-alls do not overlap
    for m in (ring, uly):
        assert m["compute_s"] <= m["layer_s"] <= m["compute_s"] + m["comm_s"] + 1e-15
        assert 0 < m["efficiency"] <= 1
    # efficiency grows with the sequence; the ring hides every forward step's transfer past the crossover
    effs = [layer_model(LayerShape(**{**WAN.__dict__, "S": S}), G, scheme="ring")["efficiency"] for S in (1024, 4096)]
    assert effs[0] < effs[1]
    past = LayerShape(**{**WAN.__dict__, "S": int(2 * crossover_tokens(WAN, G, scheme="ring"))})
    assert layer_model(past, G, scheme="ring")["efficiency"] == pytest.approx(1.0)


def test_model_rows_skip_ulysses_where_g_does_not_divide_the_heads():
    rows = section.model_rows(shapes=(WAN,), groups=(2, 8))
    assert {(r["scheme"], r["G"]) for r in rows} == {("ring", 2), ("ring", 8), ("ulysses", 2)}
    assert all(r["crossover_tokens"] > 0 and 0 < r["efficiency"] <= 1 for r in rows)


def test_distributed_section_end_to_end_on_two_processes(tmp_path, monkeypatch, capsys):
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available in this torch build")
    monkeypatch.setattr(BenchConfig, "budget_s", property(lambda self: 0.0))
    monkeypatch.setattr(section, "all_shapes", lambda device: [LayerShape("cp-tiny", 1, 4, 4, 48, 16, R=3)])
    monkeypatch.setitem(section.PRESETS, ("quick", "cpu"), (("cp-tiny",), (2,), ("fwd", "full")))
    cfg = BenchConfig(device=torch.device("cpu"), dtype=torch.float32, preset="quick", memory=False)
    assert run_module.run(cfg, ["distributed"], out=tmp_path) == 0
    rows = json.loads((tmp_path / "latest" / "results.json").read_text())["rows"]

    measured = {(r["provider"], r["mode"]): r for r in rows if r["provider"] != section.MODEL}
    assert set(measured) == {(p, m) for p in section.PROVIDERS for m in ("fwd", "full")}
    has_distributed = importlib.util.find_spec("dsr_kernels.distributed") is not None
    for (provider, mode), r in measured.items():
        if provider in section.SCHEMES and not has_distributed:
            assert "dsr_kernels.distributed is not available" in r["error"]
            continue
        assert r["median_ms"] > 0 and r["world"] == 2 and r["backend"] == "gloo", r
        if provider in section.SCHEMES:
            shape = LayerShape(r["shape"], r["B"], r["H"], r["Hk"], r["S"], r["D"], r["R"])
            assert r["bytes_per_rank"] == section.bytes_sent(shape, 2, provider, mode, 4)
            assert r["comm_ms"] > 0 and r["compute_ms"] > 0 and r["model_ms"] > 0
            assert r["baseline"] == "single" and r["speedup"] > 0
    assert {r["shape"] for r in rows if r["provider"] == section.MODEL} == {s.name for s in section.MODEL_SHAPES}
    assert (tmp_path / "latest" / "distributed-model.png").exists()
    out = " ".join(capsys.readouterr().out.split())
    assert "the N processes share this CPU's" in out
    assert "distributed model, wan14b-480p-81f on G=8" in out
