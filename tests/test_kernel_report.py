"""benchmarks/kernel_report.py's parsing and arithmetic, and the launchers' alignment promise.

CI runs the report itself (it compiles for sm_90, minutes); these check its pieces in
milliseconds: the PTX counts, the occupancy rule and the host check behind ``ALIGNED``.
"""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

_PATH = Path(__file__).resolve().parent.parent / "benchmarks" / "kernel_report.py"
_spec = importlib.util.spec_from_file_location("kernel_report", _PATH)
kernel_report = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("kernel_report", kernel_report)  # (its dataclasses look their module up)
_spec.loader.exec_module(kernel_report)

PTX = """
    @%p1 ld.global.v4.b32 { %r1, %r2, %r3, %r4 }, [ %rd1 + 0 ];
    @%p2 ld.global.b16 { %rs1 }, [ %rd2 + 0 ];
    ld.global.L1::evict_last.b16 { %rs2 }, [ %rd3 + 0 ];
    ld.global.b32 { %r9 }, [ %rd4 + 0 ];
    ld.global.v2.b32 { %r5, %r6 }, [ %rd5 + 0 ];
    cp.async.cg.shared.global [ %r10 + 0 ], [ %rd6 + 0 ], 0x10, %r11;
    cp.async.commit_group;
    wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {...};
    mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {...};
"""


def test_ptx_counts():
    counts = kernel_report.ptx_counts(PTX)
    assert counts == {
        "wgmma": 1,
        "mma": 1,
        "cp_async": 1,
        "tma": 0,
        "ld_vector": 2,
        "ld_scalar_2b": 2,
        "ld_scalar_other": 1,
    }


@pytest.mark.parametrize(
    "regs, smem, warps, blocks",
    [
        (32, 0, 8, 8),  # 32 x 32 x 8 = 8192 registers a block: 8 blocks = 64 warps
        (255, 0, 8, 1),  # 256 x 32 x 8 = 65,536: one block
        (177, 60 * 1024, 8, 1),  # 184 (rounded to 8) x 256 = 47,104: one block
        (64, 100 * 1024, 4, 2),  # shared memory: 228 KiB / (100 + 1) KiB
        (20, 0, 1, 32),  # the 32-block limit
    ],
)
def test_occupancy(regs, smem, warps, blocks):
    got, occ = kernel_report.occupancy(regs, smem, warps)
    assert got == blocks
    assert occ == blocks * warps / 64


def test_rows_aligned_is_checked_on_the_host():
    """The promise the kernels get (every tile row on a 16-byte boundary) is only made when true."""
    from dsr_kernels.triton.attention import _rows_aligned

    x = torch.randn(2, 3, 40, 72, dtype=torch.bfloat16)  # rows of 144 bytes
    assert _rows_aligned(x, None, x.transpose(1, 2))
    assert not _rows_aligned(x[..., 1:])  # 2-byte offset
    assert not _rows_aligned(torch.randn(2, 3, 40, 73, dtype=torch.bfloat16)[..., :72])  # 146-byte rows
    assert _rows_aligned(torch.randn(1, 40, 4)[..., :2].expand(3, 40, 2))  # float32 rows of 16 bytes, cut
    assert _rows_aligned(torch.randn(1, 1, 40, 72).expand(2, 3, 40, 72))  # stride 0 broadcast rows


def _row(case: str, kernel: str = "_attn_fwd_kernel", **resources) -> "kernel_report.Row":
    res = dict(spill_stores=0, spill_loads=0, smem=1024, occupancy=0.125, ld_scalar_2b=0, ld_vector=8, cp_async=8)
    return kernel_report.Row(case, "attention", kernel, "bfloat16", "", False, "1", "", resources={**res, **resources})


def test_failures_scalar_tile_loads_at_72_and_80():
    """No scalar 2-byte load at all without RoPE and masks; with them, what a mask pair or a
    once-rotated narrow block makes (SCALAR_2B_ALLOWANCE), not a tile loop that falls back."""
    allowance = kernel_report.SCALAR_2B_ALLOWANCE
    assert kernel_report.failures([_row("d80")], 90) == []
    assert "scalar 2-byte" in kernel_report.failures([_row("d80", ld_scalar_2b=1)], 90)[0]
    assert kernel_report.failures([_row("d80-rope-keymask", ld_scalar_2b=allowance)], 90) == []
    assert kernel_report.failures([_row("dsr-xl-rope", ld_scalar_2b=allowance)], 90) == []
    for case, before in (("d80-rope-keymask", 68), ("small-d72-bool-interleaved", 60)):  # the gathered partner
        assert "scalar 2-byte" in kernel_report.failures([_row(case, ld_scalar_2b=before)], 90)[0]
    assert "no cp.async" in kernel_report.failures([_row("dsr-xl-rope", cp_async=0)], 90)[0]
    assert "spills" in kernel_report.failures([_row("d128", spill_stores=4)], 90)[0]
    assert kernel_report.failures([_row("dsr-xl-unaligned", ld_scalar_2b=120)], 90) == []  # no promise to keep
    assert kernel_report.failures([_row("dit-xl-layernorm", "_norm_modulate_fwd", occupancy=0.5)], 90) == []
    low = _row("dit-xl-layernorm", "_norm_modulate_fwd", occupancy=0.25)
    assert "occupancy" in kernel_report.failures([low], 90)[0]


def test_predict_is_the_roofline_of_the_launch():
    """predict(): FLOPs of the forward (QK^T and PV over every token and register key), the
    bytes of its tensors, and the time of the slower of the two at the H200's ceilings."""
    import types

    case = next(c for c in kernel_report.CASES if c.name == "small-d72-sinks")
    B, H, N, R, D = case.B, case.H, case.N, case.R, case.D
    q, k, v, out = (torch.empty(B, H, N, D, dtype=torch.bfloat16, device="meta") for _ in range(4))
    rk, rv = (torch.empty(H, R, D, dtype=torch.bfloat16, device="meta") for _ in range(2))
    kernel = types.SimpleNamespace(fn=types.SimpleNamespace(__name__="_attn_fwd_kernel"))
    # (a launch as capture() records it; capture itself needs the compiler, not the interpreter)
    launch = kernel_report.Launch(case, kernel, (q, k, v, rk, rv, out, q), {}, (1, B * H))
    row = dict(wgmma=1, mma=0, cp_async=8, occupancy=0.125, blocks_per_sm=1)
    model = kernel_report.predict(launch, row, "bfloat16")
    assert model["gflop"] * 1e9 == pytest.approx(2 * B * H * N * (N + R) * 2 * D)
    flops, nbytes = model["gflop"] * 1e9, model["mbytes"] * 1e6
    assert nbytes == (4 * B * H * N * D + 2 * H * R * D) * 2  # every tensor once (q passed twice: once)
    blocks = 1
    for g in launch.grid:
        blocks *= g
    wave_eff = blocks / (model["waves"] * kernel_report.H200["sms"])
    t_compute = flops / (kernel_report.H200["bf16_tflops"] * 1e12)
    t_memory = nbytes / (kernel_report.H200["hbm_tb_per_s"] * 1e12)
    assert model["predicted_us"] == pytest.approx(max(t_compute, t_memory) / wave_eff * 1e6, rel=1e-3)
    assert model["bound"] == ("compute" if t_compute >= t_memory else "memory")


def test_expect_flags_a_stale_committed_report(tmp_path, capsys):
    """--expect: a committed report that this run does not reproduce fails CI, unless the
    compilers differ (then it says so and does not compare)."""
    import csv
    import json

    def write(folder, regs, triton="3.9.0"):
        folder.mkdir()
        env = {"triton": triton, "ptxas": "13.4"}
        (folder / "report.json").write_text(json.dumps({"environment": env, "rows": []}))
        with open(folder / "report.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["case", "kernel", "regs"])
            w.writeheader()
            w.writerow({"case": "d80", "kernel": "_attn_fwd_kernel", "regs": regs})
        return folder

    committed = write(tmp_path / "committed", 232)
    assert kernel_report.stale(write(tmp_path / "same", 232), committed) == []
    problems = kernel_report.stale(write(tmp_path / "changed", 236), committed)
    assert "d80 _attn_fwd_kernel: differs" in problems[0] and "regs 232 -> 236" in problems[0]
    assert "regenerate it" in problems[-1]
    assert kernel_report.stale(write(tmp_path / "other", 236, triton="3.6.0"), committed) == []
    assert "not compared" in capsys.readouterr().out
    assert kernel_report.stale(write(tmp_path / "subset", 236), committed, cases={"d128"}) == []  # (d80 not asked)
