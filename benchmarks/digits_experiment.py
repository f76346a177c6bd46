"""Do registers change what int8 / fp8 would do to a small trained DiT? scikit-learn's digits, on the CPU.

Trains the package's SiT-S/2 (DiT-S/2's network, the flow-matching objective of RAE / DSR)
at depth 4 (of 12) on scikit-learn's bundled 8 x 8 digits (1,797 images, no download), once
without and once with diffusion registers, for the same wall-clock budget each, then runs
:func:`dsr_kernels.quant.report` on both at the same noisy batch and writes, under
``benchmarks/results/digits/``:

- ``quant.json`` / ``quant.csv``: every row of both reports (registers left in, and left out:
  ``exclude_registers``); ``quant_table.md``: the side-by-side table; ``quant.png``: the plot;
- ``training.json``: the configuration, the loss curve, and every ``--every`` steps the
  residual stream's statistics per block (absmax / p99.9, kurtosis, int8 SQNR, the median
  token's int8 SQNR, max / median token norm): the outlier watch over training;
- ``monitor_R<R>/``: :class:`dsr_kernels.outliers.Monitor`'s records (JSON lines, CSV) and
  heatmaps of each figure by block and step, during training;
- ``outliers.txt``: :func:`dsr_kernels.outliers.collect`'s table of the final models;
- ``samples.png``: Euler samples of both models (is the model trained at all?).

    python3 -m pip install scikit-learn   # not a test dependency
    python3 benchmarks/digits_experiment.py --minutes 3
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from dsr_kernels import outliers, quant
from dsr_kernels.diffusion import FlowMatching, sample_euler
from dsr_kernels.models import create_model

OUT = Path(__file__).resolve().parent / "results" / "digits"


def load_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """Images [1797, 1, 8, 8] scaled from 0..16 to [-1, 1], labels [1797]."""
    from sklearn.datasets import load_digits as sk_load  # not a test dependency: imported here only

    d = sk_load()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 8.0 - 1.0
    return x, torch.tensor(d.target, dtype=torch.long)


def build(num_registers: int, depth: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_model(
        "SiT-S/2",
        input_size=8,
        in_channels=1,
        depth=depth,
        num_classes=10,
        learn_sigma=False,
        num_registers=num_registers,
        register_start=min(2, depth - 1) if num_registers else 0,
        backend="eager",  # plain PyTorch: the same model (tests/test_models.py), fastest for these sizes on CPU
    )


def noisy_batch(x: torch.Tensor, y: torch.Tensor, t: float, seed: int) -> tuple:
    g = torch.Generator().manual_seed(seed)
    eps = torch.randn(x.shape, generator=g)
    return ((1 - t) * x + t * eps, torch.full((x.shape[0],), t), y)


def residual_watch(model: torch.nn.Module, batch: tuple) -> list[dict]:
    """Per block: the residual stream's statistics (the registers left out) and max / median token norm."""
    was = model.training
    model.eval()
    rep = quant.report(model, batch, exclude_registers=True)
    norms: dict[str, float] = {}
    handles = [
        blk.register_forward_pre_hook(
            lambda m, a, i=i: norms.__setitem__(f"blocks.{i}", _norm_ratio(a[0], model.num_registers))
        )
        for i, blk in enumerate(model.blocks)
    ]
    with torch.no_grad():
        model(*batch)
    for h in handles:
        h.remove()
    model.train(was)
    keys = ("absmax_over_p999", "kurtosis", "int8_tensor_db", "int8_tensor_median_db")
    return [
        {"layer": r.layer, **{k: getattr(r, k) for k in keys}, "norm_max_over_median": norms.get(r.layer)}
        for r in rep.rows
        if r.tensor == "residual"
    ]


def _norm_ratio(x: torch.Tensor, num_registers: int) -> float:
    n = x.detach().float().norm(dim=-1)
    if num_registers and x.shape[1] > 16:  # the patch grid is 4 x 4: drop the leading registers
        n = n[:, num_registers:]
    return float(n.max() / n.median())


def train(args, num_registers: int, data: tuple, watch_batch: tuple) -> tuple[torch.nn.Module, dict]:
    x, y = data
    model = build(num_registers, args.depth, args.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    objective = FlowMatching()
    g = torch.Generator().manual_seed(args.seed)
    log = {"num_registers": num_registers, "loss": [], "watch": [], "monitor_error": None}
    monitor = None
    if args.monitor:  # the package's training monitor, every --every steps, from the same forward
        monitor = outliers.Monitor(
            model, every=args.every, out=args.out / f"monitor_R{num_registers}", tensorboard=False
        )
    start, step = time.perf_counter(), 0
    while time.perf_counter() - start < 60 * args.minutes:
        if step % args.every == 0:
            log["watch"].append({"step": step, "blocks": residual_watch(model, watch_batch)})
        idx = torch.randint(0, x.shape[0], (args.batch_size,), generator=g)
        if monitor is not None:
            try:
                with monitor.step(step):
                    loss = objective.loss(model, x[idx], y[idx])
            except Exception as e:  # noted, and training goes on without it
                log["monitor_error"], monitor = f"{type(e).__name__}: {e}", None
                loss = objective.loss(model, x[idx], y[idx])
        else:
            loss = objective.loss(model, x[idx], y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        log["loss"].append(round(loss.item(), 5))
    log["steps"], log["seconds"] = step, round(time.perf_counter() - start, 1)
    log["watch"].append({"step": step, "blocks": residual_watch(model, watch_batch)})
    if monitor is not None:
        monitor.close()
    print(f"R={num_registers}: {step} steps in {log['seconds']} s, last-100 loss {sum(log['loss'][-100:]) / 100:.4f}")
    return model.eval(), log


def plot_samples(models: dict[str, torch.nn.Module], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(models), 10, figsize=(10, 1.2 * len(models)))
    labels = torch.arange(10)
    for row, (name, model) in enumerate(models.items()):
        torch.manual_seed(0)
        with torch.no_grad():
            s = sample_euler(model, torch.randn(10, 1, 8, 8), labels, steps=30, objective=FlowMatching())
        for j in range(10):
            axes[row, j].imshow(s[j, 0].clamp(-1, 1), cmap="gray_r", vmin=-1, vmax=1)
            axes[row, j].axis("off")
        axes[row, 0].set_title(name, fontsize=8, loc="left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=4.0, help="training wall-clock per configuration")
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--registers", type=int, default=4, help="diffusion registers of the second model (a square)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--every", type=int, default=50, help="steps between residual-stream watches")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--no-monitor", dest="monitor", action="store_false", help="without outliers.Monitor")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: small ops on a loaded machine)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    x, y = load_digits()
    report_x, report_y = x[:64], y[:64]  # the same noisy batch for every report
    watch_batch = noisy_batch(report_x, report_y, 0.5, seed=1)

    models, logs = {}, []
    for R in (0, args.registers):
        model, log = train(args, R, (x, y), watch_batch)
        models[f"R={R}"], _ = model, logs.append(log)

    labels = tuple(models)
    rows = []
    tables = []
    for exclude in (False, True):
        for t in (0.1, 0.5, 0.9):
            batch = noisy_batch(report_x, report_y, t, seed=1)
            cmp = quant.compare(*models.values(), batch, labels=labels, exclude_registers=exclude)
            for r in cmp.to_dicts():
                rows.append({"t": t, "exclude_registers": exclude, **r})
            if t == 0.5:
                suffix = "_registers_excluded" if exclude else ""
                cmp.plot(args.out / f"quant{suffix}.png")
                tables.append(f"## t = 0.5, exclude_registers={exclude}\n\n{cmp.table()}\n")
    (args.out / "quant.json").write_text(json.dumps(quant.json_safe(rows), indent=1))
    with open(args.out / "quant.csv", "w") as f:
        cols = list(rows[0])
        f.write(",".join(cols) + "\n")
        for r in rows:
            f.write(",".join("" if r[c] is None else str(r[c]) for c in cols) + "\n")
    (args.out / "quant_table.md").write_text("\n".join(tables))

    try:  # the package's outlier statistics on the final models
        texts = []
        for name, model in models.items():
            with outliers.collect(model) as rep, torch.no_grad():
                for t in (0.1, 0.5, 0.9):
                    rep.set_tag(f"t={t}")
                    model(*noisy_batch(report_x, report_y, t, seed=1))
            texts.append(f"# {name}\n\n{rep.table()}\n")
        (args.out / "outliers.txt").write_text("\n".join(texts))
    except Exception as e:  # reported, not fatal: the quantization report above is the experiment
        print(f"outliers.collect failed: {type(e).__name__}: {e}")

    plot_samples(models, args.out / "samples.png")
    meta = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "out"},
        "model": f"SiT-S/2 at depth {args.depth}, input 8 x 8 x 1, patch 2 (16 tokens), hidden 384, 6 heads, eager",
        "runs": logs,
    }
    (args.out / "training.json").write_text(json.dumps(quant.json_safe(meta)))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
