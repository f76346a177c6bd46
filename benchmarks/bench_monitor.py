"""The training monitor's overhead on a training step (dsr_kernels.outliers.Monitor).

    python benchmarks/bench_monitor.py [--depth 4] [--budget 20] [--out benchmarks/results/monitor]

One training step (FlowMatching loss, backward, AdamW step) of a DiT-S/2 with 4 diffusion
registers (reduced depth, 16 x 16 x 4 latents: 64 tokens, batch 8), timed interleaved:

- ``step``: no monitor (the baseline);
- ``step_monitored``: every step recorded (``every=1``): what one recorded step costs,
  JSON lines and CSV written, no plots, no TensorBoard;
- ``step_not_recorded``: a monitor whose ``every`` skips the step (the cost of the other steps).

Rows carry the median / p20 / p80 ms and the overhead against ``step`` paired by round;
the overhead of ``every=N`` is about the recorded step's overhead / N, given in the JSON
for N = 10, 100. Writes ``monitor-<date>-<device>.json`` with the environment (device,
processor, versions, commit, date). Timings on a shared machine are noisy: read the
``noisy`` flags; nothing asserts on them.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import tempfile
from pathlib import Path

import torch

from dsr_kernels.benchmark.common import environment, overhead_fields, time_interleaved, timing_fields
from dsr_kernels.diffusion import FlowMatching
from dsr_kernels.models import create_model
from dsr_kernels.outliers import Monitor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--budget", type=float, default=20.0, help="seconds of timed rounds")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "monitor"))
    args = parser.parse_args()

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
    objective = FlowMatching()
    x = torch.randn(args.batch, 4, 16, 16, device=device)
    y = torch.randint(0, 10, (args.batch,), device=device)

    with tempfile.TemporaryDirectory() as tmp:
        recorded = Monitor(model, every=1, out=Path(tmp) / "every1", tensorboard=False)
        skipped = Monitor(model, every=10**9, out=Path(tmp) / "skipped", tensorboard=False)

        def step(monitor: Monitor | None):
            def run():
                if monitor is None:
                    loss = objective.loss(model, x, y)
                else:
                    with monitor.step(1 if monitor is skipped else None):
                        loss = objective.loss(model, x, y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()

            return run

        fns = {"step": step(None), "step_monitored": step(recorded), "step_not_recorded": step(skipped)}
        timing = time_interleaved(fns, device, budget_s=args.budget, min_reps=10, max_reps=400)
        layers = len({r["layer"] for r in recorded.records})

    rows = []
    for name in fns:
        row = {"provider": name, "model": "DiT-S/2", **config, "batch": args.batch, "tokens": 64}
        row.update(timing_fields(timing, name))
        if name != "step":
            row.update(overhead_fields(timing.times[name], timing.times["step"], "overhead"))
        rows.append(row)
    per_record = rows[1]["overhead_pct"]
    result = {
        "environment": environment(device),
        "what": "training step of DiT-S/2 with and without the Monitor",
        "recorded_layers": layers,
        "amortised_overhead_pct": {f"every={n}": per_record / n for n in (1, 10, 100)},
        "rows": rows,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"monitor-{_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d}-{device.type}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    for r in rows:
        extra = f"  overhead {r['overhead_pct']:+.1f}%" if "overhead_pct" in r else ""
        print(f"{r['provider']:18s} {r['median_ms']:8.2f} ms (p20 {r['p20_ms']:.2f}, p80 {r['p80_ms']:.2f}){extra}")
    print(f"amortised: {result['amortised_overhead_pct']}  -> {path}")


if __name__ == "__main__":
    main()
