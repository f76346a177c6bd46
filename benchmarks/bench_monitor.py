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

import datetime as _dt
import json
import tempfile
from pathlib import Path

from training_step import parse_args, print_rows, setup, timing_rows

from dsr_kernels.benchmark.common import environment, time_interleaved
from dsr_kernels.outliers import Monitor


def main() -> None:
    args = parse_args(__doc__, str(Path(__file__).parent / "results" / "monitor"))
    device, _, model, optimizer, objective, x, y = case = setup(args)

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

    rows = timing_rows(timing, fns, case, args.batch)
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
    print_rows(rows, 18)
    print(f"amortised: {result['amortised_overhead_pct']}  -> {path}")


if __name__ == "__main__":
    main()
