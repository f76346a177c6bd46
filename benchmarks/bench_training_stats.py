"""A training step with every outlier statistic recorded vs without (key mass from the backward).

    python benchmarks/bench_training_stats.py [--depth 4] [--budget 20] [--out benchmarks/results]

One training step (FlowMatching loss, backward, AdamW step) of a DiT-S/2 with 4 diffusion
registers (reduced depth, 16 x 16 x 4 latents: 64 tokens + 4 registers, batch 8), timed
interleaved:

- ``step``: no statistics (the baseline);
- ``step_stats``: :func:`dsr_kernels.outliers.record_training_statistics`, every statistic
  recorded: lse, entropy, register share from the forward, the key mass from the
  backward's dK/dV pass, token norms and int8 SQNR from the norm kernels, and the
  per-layer records read back (``records()``) after the backward;
- ``step_stats_fwd_key_mass``: the same through :func:`dsr_kernels.outliers.collect`, whose
  forward computes the key mass (the way before; on the Triton path a second launch).

Rows carry the median / p20 / p80 ms and the overhead against ``step`` paired by round.
Writes ``training_stats-<date>-<device>.{json,csv}`` with the environment (device,
processor, versions, commit, date). Timings on a shared machine are noisy: read the
``within_noise`` flags; nothing asserts on them.
"""

from __future__ import annotations

import csv
import datetime as _dt
import json
from pathlib import Path

from training_step import parse_args, print_rows, setup, timing_rows

from dsr_kernels.benchmark.common import environment, time_interleaved
from dsr_kernels.outliers import collect, record_training_statistics


def main() -> None:
    args = parse_args(__doc__, str(Path(__file__).parent / "results"))
    device, _, model, optimizer, objective, x, y = case = setup(args)
    layers: dict[str, int] = {}

    def step(recorder):
        def run():
            optimizer.zero_grad(set_to_none=True)
            if recorder is None:
                objective.loss(model, x, y).backward()
            else:
                with recorder(model) as report:
                    objective.loss(model, x, y).backward()
                layers[recorder.__name__] = sum(r.top1pct_key_share is not None for r in report.records())
            optimizer.step()

        return run

    fns = {
        "step": step(None),
        "step_stats": step(record_training_statistics),
        "step_stats_fwd_key_mass": step(collect),
    }
    timing = time_interleaved(fns, device, budget_s=args.budget, min_reps=10, max_reps=400)

    rows = timing_rows(timing, fns, case, args.batch)
    env = environment(device)
    result = {
        "environment": env,
        "what": "training step of DiT-S/2 with every outlier statistic recorded vs without",
        "attention_layers_recorded": layers,
        "rows": rows,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"training_stats-{_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d}-{device.type}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    flat = [
        {
            **r,
            **{
                k: env[k]
                for k in ("device", "device_name", "processor", "torch", "triton", "dsr_kernels", "git_commit", "date")
            },
        }
        for r in rows
    ]
    with stem.with_suffix(".csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in flat for k in r)))
        writer.writeheader()
        writer.writerows(flat)
    print_rows(rows, 24)
    print(f"-> {stem}.json, .csv")


if __name__ == "__main__":
    main()
