"""What bench_training_stats.py and bench_monitor.py share: the arguments, the model and batch
they time a training step of (DiT-S/2 with 4 registers from block 1, reduced depth, 16 x 16 x 4
latents: 64 tokens, flow matching, AdamW), and the rows of the interleaved timing."""

from __future__ import annotations

import argparse
from typing import NamedTuple

import torch
from torch import Tensor, nn

from dsr_kernels.benchmark.common import overhead_fields, timing_fields
from dsr_kernels.diffusion import FlowMatching
from dsr_kernels.models import create_model


class TrainingSetup(NamedTuple):
    device: torch.device
    config: dict  # create_model's keywords (for the rows)
    model: nn.Module
    optimizer: torch.optim.Optimizer
    objective: FlowMatching
    x: Tensor  # [batch, 4, 16, 16]
    y: Tensor  # [batch]


def parse_args(doc: str, default_out: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--budget", type=float, default=20.0, help="seconds of timed rounds")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out", default=default_out)
    return parser.parse_args()


def setup(args: argparse.Namespace) -> TrainingSetup:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = dict(
        input_size=16, in_channels=4, depth=args.depth, num_classes=10, learn_sigma=False,
        num_registers=4, register_start=1,
    )  # fmt: skip
    model = create_model("DiT-S/2", **config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(args.batch, 4, 16, 16, device=device)
    y = torch.randint(0, 10, (args.batch,), device=device)
    return TrainingSetup(device, config, model, optimizer, FlowMatching(), x, y)


def timing_rows(timing, names, setup: TrainingSetup, batch: int) -> list[dict]:
    """One row per timed step: the timing and, but for "step" (the baseline), its overhead paired by round."""
    out = []
    for name in names:
        row = {"provider": name, "model": "DiT-S/2", **setup.config, "batch": batch, "tokens": 64}
        row.update(timing_fields(timing, name))
        if name != "step":
            row.update(overhead_fields(timing.times[name], timing.times["step"], "overhead"))
        out.append(row)
    return out


def print_rows(rows: list[dict], width: int) -> None:
    for r in rows:
        extra = f"  overhead {r['overhead_pct']:+.1f}%" if "overhead_pct" in r else ""
        print(
            f"{r['provider']:{width}s} {r['median_ms']:8.2f} ms (p20 {r['p20_ms']:.2f}, p80 {r['p80_ms']:.2f}){extra}"
        )
