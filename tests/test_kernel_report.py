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
