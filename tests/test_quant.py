"""dsr_kernels.quant: the round trips against hand computations, the planted encoder, bad input, the outputs."""

from __future__ import annotations

import json
import math

import pytest
import torch
from test_registers import POP1, POP2, planted_images, planted_vit
from torch import nn

from dsr_kernels import quant
from dsr_kernels.models import create_model
from dsr_kernels.outliers import int8_sqnr_db
from dsr_kernels.registers import apply_test_time_registers


def _db(signal: float, noise: float) -> float:
    return 10 * math.log10(signal / noise)


# ----------------------------------------------------------------------------- formulas


def test_int8_round_trips_by_hand():
    x = torch.tensor([[1.0, 0.3], [-0.02, 0.7]])
    signal = 1.0 + 0.09 + 0.0004 + 0.49
    # per tensor: s = 1 / 127; 0.3 -> 38 s, -0.02 -> -3 s (-2.54), 0.7 -> 89 s (88.9)
    s = 1 / 127
    noise = (0.3 - 38 * s) ** 2 + (-0.02 + 3 * s) ** 2 + (0.7 - 89 * s) ** 2
    assert quant.sqnr_db(x, quant.int8_per_tensor(x)) == pytest.approx(_db(signal, noise), rel=1e-5)
    assert quant.sqnr_db(x, quant.int8_per_tensor(x)) == pytest.approx(int8_sqnr_db(x), rel=1e-5)
    # per token: row 0 as above; row 1 s = 0.7 / 127: -0.02 -> -4 s (-3.63), 0.7 exact
    s1 = 0.7 / 127
    noise_tok = (0.3 - 38 * s) ** 2 + (-0.02 + 4 * s1) ** 2
    assert quant.sqnr_db(x, quant.int8_per_token(x)) == pytest.approx(_db(signal, noise_tok), rel=1e-5)
    # the median row's SQNR under the per-tensor scale: rows of 0 and 1 element in error
    row0 = _db(1.09, (0.3 - 38 * s) ** 2)
    row1 = _db(0.4904, (-0.02 + 3 * s) ** 2 + (0.7 - 89 * s) ** 2)
    assert quant.median_row_sqnr_db(x, quant.int8_per_tensor(x)) == pytest.approx(min(row0, row1), rel=1e-5)
    z = torch.zeros(3, 4)  # int8 represents zero exactly
    assert quant.sqnr_db(z, quant.int8_per_tensor(z)) == math.inf
    assert quant.sqnr_db(z, quant.int8_per_token(z)) == math.inf


def test_fp8_round_trips_by_hand():
    x = torch.tensor([448.0, 17.5])
    signal = 448.0**2 + 17.5**2
    # e4m3 (max 448, s = 1): 3 mantissa bits, steps of 2 in [16, 32): 17.5 -> 18
    assert quant.sqnr_db(x, quant.fp8_per_tensor(x, "e4m3")) == pytest.approx(_db(signal, 0.5**2), rel=1e-6)
    # e5m2 (max 57344, s = 1 / 128): 17.5 / s = 2240, steps of 512 in [2048, 4096): -> 2048 = 16 s
    assert quant.sqnr_db(x, quant.fp8_per_tensor(x, "e5m2")) == pytest.approx(_db(signal, 1.5**2), rel=1e-6)
    exact = torch.tensor([448.0, 1.0, -2.0])
    assert quant.sqnr_db(exact, quant.fp8_per_tensor(exact, "e4m3")) == math.inf
    with pytest.raises(ValueError, match="'fmt'"):
        quant.fp8_per_tensor(x, "e3m4")


def test_attention_sqnr_exact_inputs_and_smoothing():
    g = torch.Generator().manual_seed(0)
    # integer rows whose max |.| is 127: int8 per token is exact, so is the output
    q = torch.randint(-127, 128, (1, 2, 5, 8), generator=g).float()
    q[..., 0] = 127
    v = torch.randn(1, 2, 5, 8, generator=g)
    _, noise = quant.attention_int8_sqnr(q, q, v, scale=1e-3)
    assert noise == 0
    # a large offset shared by every key: smoothing removes it before quantising (and the
    # softmax is shift-invariant per query), so the output is far more accurate
    q, k = torch.randn(1, 2, 16, 8, generator=g), torch.randn(1, 2, 16, 8, generator=g) + 20.0
    plain = _db(*quant.attention_int8_sqnr(q, k, v.repeat(1, 1, 4, 1)[:, :, :16], scale=0.35))
    smooth = _db(*quant.attention_int8_sqnr(q, k, v.repeat(1, 1, 4, 1)[:, :, :16], scale=0.35, smooth_k=True))
    assert smooth > plain + 10


# ----------------------------------------------------------------------------- the planted encoder


def test_planted_register_neurons_test_time_registers_raise_int8_sqnr():
    model = planted_vit(backend="eager")
    x, _ = planted_images(8)
    plain = quant.report(model, x, exclude_registers=True)
    with apply_test_time_registers(model, POP1 | POP2):
        ttr = quant.report(model, x, exclude_registers=True)
        ttr_all = quant.report(model, x)  # the register token quantised with the rest
    plain_all = quant.report(model, x)
    # After population 1 (block 1's neurons): its fc2 input loses the outlier, per tensor.
    fc2 = "blocks.1.mlp.fc2"
    gain = ttr.row(fc2).int8_tensor_db - plain.row(fc2).int8_tensor_db
    assert gain > 10, gain  # measured 17.4 dB (20.5 -> 37.9)
    # The residual stream of the later blocks: the typical token had nothing left (0 dB)
    # under the outlier's scale; with the outliers in the register it keeps ~18 dB.
    for block in ("blocks.2", "blocks.3"):
        before, after = (r.row(block, "residual").int8_tensor_median_db for r in (plain, ttr))
        assert before < 3 and after > before + 10, (block, before, after)
    # Quantised with the rest, the register token carries the neuron's maximum into fc2's input.
    assert ttr_all.row(fc2).absmax == pytest.approx(plain_all.row(fc2).absmax, rel=0.05)
    assert ttr_all.row(fc2).int8_tensor_db < ttr.row(fc2).int8_tensor_db - 10


# ----------------------------------------------------------------------------- outputs


def _tiny_dit(num_registers: int) -> nn.Module:
    torch.manual_seed(0)
    return create_model(
        "DiT-S/2",
        input_size=8,
        in_channels=4,
        depth=2,
        num_classes=10,
        num_registers=num_registers,
        register_start=1 if num_registers else 0,
        backend="eager",
    ).eval()


def _dit_batch(b: int = 2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.randn(b, 4, 8, 8), torch.full((b,), 0.5), torch.tensor([3, 7][:b])


def test_compare_table_json_and_plot(tmp_path):
    batch = _dit_batch()
    cmp = quant.compare(_tiny_dit(0), _tiny_dit(4), batch, labels=("plain", "registers"), exclude_registers=True)
    keys = cmp.keys()
    assert ("blocks.1.attn", "q") in keys and ("blocks.0.mlp.fc2", "input") in keys and ("blocks.1", "residual") in keys
    q = cmp.b.row("blocks.1.attn", "q")
    assert q.rows == 2 * 6 * 16  # images x heads x patches: the 4 registers left out
    assert math.isfinite(q.attn_int8_db) and q.attn_int8_db == cmp.b.row("blocks.1.attn", "k").attn_int8_db
    assert cmp.a.row("blocks.0.mlp.fc1").attn_int8_db is None
    text = cmp.table()
    assert "plain -> registers" in text and "blocks.1.attn" in text
    rows = json.loads(open(cmp.write_json(tmp_path / "quant.json")).read())
    assert {r["label"] for r in rows} == {"plain", "registers"}
    assert cmp.plot(tmp_path / "quant.png") and (tmp_path / "quant.png").stat().st_size > 1000
    assert cmp.a.write_csv(tmp_path / "a.csv") and "int8_tensor_db" in (tmp_path / "a.csv").read_text()
    assert cmp.a.plot(tmp_path / "a.png") and (tmp_path / "a.png").exists()


def test_rope_model_reports_q_and_k():
    # RoPE inside the attention kernel: the report applies the tables it was called with
    model = create_model("LightningDiT-S/1", input_size=4, in_channels=4, depth=2, num_classes=10, backend="eager")
    rep = quant.report(model.eval(), (torch.randn(2, 4, 4, 4), torch.full((2,), 0.5), torch.tensor([1, 2])))
    k = rep.row("blocks.0.attn", "k")
    assert k.rows == 2 * 6 * 16 and math.isfinite(k.attn_int8_db) and math.isfinite(k.attn_int8_smooth_k_db)


# ----------------------------------------------------------------------------- bad input


def test_bad_input_raises_before_running(tmp_path):
    dit = _tiny_dit(0)
    calls = []
    dit.register_forward_pre_hook(lambda m, a: calls.append(1))
    with pytest.raises(ValueError, match="'model'.*no nn.Linear"):
        quant.report(nn.Sequential(nn.ReLU()), torch.randn(2, 3))
    with pytest.raises(TypeError, match="'model'"):
        quant.report(lambda x: x, torch.randn(2, 3))
    with pytest.raises(ValueError, match="'batch' does not fit DiT.*'x'"):
        quant.report(dit, (torch.randn(2, 4, 16, 16), torch.full((2,), 0.5), torch.tensor([1, 2])))
    with pytest.raises(ValueError, match="'batch' does not fit VisionTransformer"):
        quant.report(planted_vit(backend="eager"), torch.randn(2, 3, 16, 16))
    with pytest.raises(TypeError, match="'batch'"):
        quant.report(dit, "images")
    with pytest.raises(ValueError, match="'batch' has an empty"):
        quant.report(dit, (torch.randn(0, 4, 8, 8), torch.zeros(0), torch.zeros(0, dtype=torch.long)))
    with pytest.raises(ValueError, match="'batch' is needed"):
        quant.compare(dit, dit)
    with pytest.raises(ValueError, match="'labels'"):
        quant.compare(dit, dit, _dit_batch(), labels=("one",))
    assert calls == []  # nothing ran
    rep = quant.QuantReport([], "empty")
    with pytest.raises(ValueError, match="'path'"):
        rep.plot(tmp_path / "missing" / "q.png")
    assert not (tmp_path / "missing").exists()
