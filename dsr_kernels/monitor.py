"""A training monitor: outlier statistics per layer, every N steps, from the fused passes.

    monitor = Monitor(model, every=100, out="runs/monitor", key_mass="backward")
    for step, (x, y) in enumerate(batches):
        with monitor.step(step):  # records on the steps where step % every == 0
            loss = objective.loss(model, x, y)
            loss.backward()  # inside the step: the key mass comes from the backward
        optimizer.step(); optimizer.zero_grad()
    monitor.close()  # the plots

On a recorded step the model's package-built modules report to the monitor as they do to
:func:`dsr_kernels.outliers.collect` (its machinery: token norms and moments from the
norm kernel's pass, AttentionStats from the attention kernel), and the monitor turns one
step's reports into one record per layer (:data:`FIGURES`). Other steps cost nothing.
The key mass is the forward's (AttentionStats key_mass) by default; with
``key_mass="backward"`` it is summed by the backward's dK/dV pass as in
:func:`dsr_kernels.outliers.record_training_statistics` (no launch of its own), and the
step's ``with`` block must then hold the ``loss.backward()``.

Each step's records are appended to ``out/monitor.jsonl`` and ``out/monitor.csv`` as
they come, given to ``callback`` (any tracker) and to TensorBoard when
``torch.utils.tensorboard`` can be imported (or to the ``tensorboard`` writer given).
``plot()`` (and ``close()``) draw each figure against the step, layers as the rows of a
heatmap, into ``out/plots/<figure>.png``.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from dsr_kernels.outliers import OutlierReport, TrainingStatistics, recording_into
from dsr_kernels.types import AttentionStats

QUANTILES = (0.5, 0.9, 0.99)
# The figures of a record, plotted and logged, besides the quantiles' norm_p<q> columns.
FIGURES = (
    "norm_max",
    "outlier_count",
    "outlier_fraction",
    "register_share",
    "top1pct_key_share",
    "key_gini",
    "int8_sqnr_db",
)


def _quantile_name(q: float) -> str:
    return f"norm_p{100 * q:g}"


def gini(mass: Tensor) -> Tensor:
    """Gini coefficient over the last dimension of non-negative ``mass`` [..., n]: 0 when every
    key receives the same mass, (n - 1) / n when one key takes all of it; NaN for a zero row.

    G = sum_i (2 i - n - 1) m_(i) / (n sum_i m_i), m_(i) sorted ascending, i = 1..n.
    """
    m = mass.double().sort(dim=-1).values
    n = m.shape[-1]
    i = torch.arange(1, n + 1, dtype=m.dtype, device=m.device)
    return ((2 * i - n - 1) * m).sum(-1) / (n * m.sum(-1))


def _is_attention(module: nn.Module) -> bool:
    from dsr_kernels.modules.attention import RegisterAttention

    # DSRAttnProcessor by name: importing the diffusers integration would import diffusers
    return isinstance(module, RegisterAttention) or type(module).__name__ == "DSRAttnProcessor"


class _StepReport(OutlierReport):
    """One recorded step: what :func:`collect` gathers, plus the Gini coefficient of the key mass."""

    def __init__(self, *, ratio: float | None, threshold: float | None, sqnr: bool) -> None:
        super().__init__(threshold=threshold, ratio=ratio, top_k=None, sqnr=sqnr)
        self.gini: dict[str, list[float]] = {}

    def record_attention(self, layer: str, stats: AttentionStats, num_kv_registers: int) -> None:
        super().record_attention(layer, stats, num_kv_registers)
        g = gini(stats.key_mass.detach())  # [B, H]: one distribution of the mass over the keys per head
        self.gini.setdefault(layer, []).append(float(g.nanmean()))


class _BackwardStepReport(TrainingStatistics, _StepReport):
    """A recorded step whose key mass the backward sums: TrainingStatistics keeps each call
    until ``records()``, which then hands it to _StepReport (the Gini) after the backward."""


class MonitorWriteError(RuntimeError):
    """Writing a step's records failed; they are kept in ``Monitor.records`` (and the files'
    unwritten ones are written with the next step's)."""


class Monitor:
    """Records, every ``every`` steps, each attention layer's outlier statistics in training.

    Args:
        model: a model built on the package's modules (DiT, SiT, LightningDiT, JiT, video
            models, ``RegisterAttention``, patched timm or diffusers models); it must have
            at least one package attention layer.
        every: record on the steps where ``step % every == 0`` (an int >= 1).
        out: a directory, created if needed: ``monitor.jsonl``, ``monitor.csv``,
            ``plots/<figure>.png`` (and ``tensorboard/`` for the writer it creates).
        ratio, threshold: the outlier rule (:func:`~dsr_kernels.outliers.find_outliers`);
            default norm > 4 x the image's median norm.
        quantiles: the token-norm quantiles recorded (``norm_p50`` ...).
        top: how many of the largest token norms ``norm_top`` lists.
        sqnr: measure the int8 SQNR of the block input (one read-only pass over it).
        tensorboard: None: a ``torch.utils.tensorboard.SummaryWriter`` into ``out/tensorboard``
            when that can be imported, else none; False: none; or any object with
            ``add_scalar(tag, value, step)`` (logged as ``<figure>/<layer>``).
        callback: called with each recorded step's records (a list of dicts), e.g. to log
            them to another tracker.

    A record (one per layer and recorded step): ``step``, ``layer``, ``tokens`` (token norms
    seen), ``norm_p<q>`` (quantiles of the norms of the block input's tokens, registers
    included), ``norm_max``, ``norm_top`` (the ``top`` largest), ``outlier_count`` and
    ``outlier_fraction``, ``register_share`` (the attention probability on registers, mean
    over samples, heads, queries), ``top1pct_key_share`` (the share of the attention mass
    taken by the top 1% of keys) and ``key_gini`` (Gini coefficient of the key mass, mean
    over samples and heads), ``int8_sqnr_db`` (per-tensor int8 round trip of the block
    input), ``key_mass_from`` (the ``key_mass`` option). None: not measured (a layer
    without the package's norm has no token norms).

    ``key_mass``: ``"forward"`` (default): the forward kernel's ``AttentionStats.key_mass``,
    so the ``with monitor.step()`` block may hold the forward alone; ``"backward"``: the
    key mass is summed by the backward's dK/dV pass (:func:`record_training_statistics`:
    on Triton no key-mass launch of its own), and the block must hold ``loss.backward()``
    too; leaving it before the backward ran raises. A layer run without gradients computes
    its key mass in the forward in either mode.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        every: int,
        out: str | os.PathLike,
        ratio: float | None = None,
        threshold: float | None = None,
        quantiles: Sequence[float] = QUANTILES,
        top: int = 5,
        sqnr: bool = True,
        tensorboard=None,
        callback: Callable[[list[dict]], None] | None = None,
        key_mass: str = "forward",
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"Monitor(): 'model' must be an nn.Module, got {type(model).__name__}")
        if not any(_is_attention(m) for m in model.modules()):
            raise ValueError(
                f"Monitor(): 'model' ({type(model).__name__}) has no attention layer built on the package "
                "(RegisterAttention, the reference models' blocks, a patched timm or diffusers model): "
                "there is nothing to monitor"
            )
        if isinstance(every, bool) or not isinstance(every, int) or every <= 0:
            raise ValueError(f"Monitor(): 'every' must be an int >= 1 (record every N steps), got {every!r}")
        if ratio is not None and threshold is not None:
            raise ValueError("Monitor(): give at most one of 'ratio' and 'threshold'")
        if ratio is not None and not ratio > 0:
            raise ValueError(f"Monitor(): 'ratio' must be > 0, got {ratio!r}")
        if not quantiles or not all(0 <= q <= 1 for q in quantiles):
            raise ValueError(f"Monitor(): 'quantiles' must be values in [0, 1], got {tuple(quantiles)!r}")
        if isinstance(top, bool) or not isinstance(top, int) or top < 0:
            raise ValueError(f"Monitor(): 'top' must be an int >= 0, got {top!r}")
        writer_given = tensorboard is not None and tensorboard is not False
        if writer_given and not callable(getattr(tensorboard, "add_scalar", None)):
            raise TypeError(
                f"Monitor(): 'tensorboard' must be None, False or a writer with add_scalar(tag, value, step), "
                f"got {type(tensorboard).__name__}"
            )
        if callback is not None and not callable(callback):
            raise TypeError(f"Monitor(): 'callback' must be callable, got {type(callback).__name__}")
        if key_mass not in ("forward", "backward"):
            raise ValueError(f"Monitor(): 'key_mass' must be 'forward' or 'backward', got {key_mass!r}")
        self.key_mass = key_mass
        self.out = _writable_dir(out)
        self.model, self.every, self.top, self.sqnr, self.callback = model, every, top, sqnr, callback
        self.rule = dict(ratio=4.0 if ratio is None and threshold is None else ratio, threshold=threshold)
        self.quantiles = tuple(float(q) for q in quantiles)
        self.columns = ["step", "layer", "tokens", *map(_quantile_name, self.quantiles), *FIGURES]
        self.columns += ["norm_top", "key_mass_from"]
        self.records: list[dict] = []
        self._unwritten: dict[str, list[dict]] = {"jsonl": [], "csv": []}
        self._next_step = 0
        self.out.mkdir(parents=True, exist_ok=True)
        self._own_writer = tensorboard is None
        if tensorboard is None:
            self.writer = _summary_writer(self.out / "tensorboard")
        else:
            self.writer = None if tensorboard is False else tensorboard

    @property
    def jsonl_path(self) -> Path:
        return self.out / "monitor.jsonl"

    @property
    def csv_path(self) -> Path:
        return self.out / "monitor.csv"

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, *exc) -> None:
        self.close(plot=exc[0] is None)

    @contextlib.contextmanager
    def step(self, step: int | None = None) -> Iterator[bool]:
        """Around one training step's forward (and its backward, with ``key_mass="backward"``):
        on a recorded step (``step % every == 0``; by default the steps are counted from 0),
        the model reports to the monitor, and on leaving the records are computed and
        written. Yields whether the step is recorded."""
        step = self._next_step if step is None else int(step)
        self._next_step = step + 1
        if step % self.every:
            yield False
            return
        backward = self.key_mass == "backward"
        report = (_BackwardStepReport if backward else _StepReport)(sqnr=self.sqnr, **self.rule)
        with recording_into(self.model, report):
            yield True
        if backward and report.pending():
            raise RuntimeError(
                f"Monitor(key_mass='backward'): step {step} left monitor.step() before its backward "
                f"filled the key mass of layers {report.pending()}: call loss.backward() inside the "
                "with block, or use key_mass='forward'"
            )
        self.add(step, self._records(step, report))

    def _records(self, step: int, report: _StepReport) -> list[dict]:
        out = []
        for rec in report.records():
            row: dict = {"step": step, "layer": rec.layer, "tokens": rec.tokens}
            acc = report._acc[(rec.tag, rec.layer)]
            norms = torch.cat(acc.norms) if acc.norms else None
            for q in self.quantiles:
                row[_quantile_name(q)] = None if norms is None else float(torch.quantile(norms, q))
            row["norm_max"] = rec.norm_max
            row["outlier_count"], row["outlier_fraction"] = rec.outlier_count, rec.outlier_fraction
            row["register_share"], row["top1pct_key_share"] = rec.register_share, rec.top1pct_key_share
            g = report.gini.get(rec.layer)
            row["key_gini"] = sum(g) / len(g) if g else None
            row["int8_sqnr_db"] = rec.int8_sqnr_db
            top = None if norms is None else norms.topk(min(self.top, norms.numel())).values.tolist()
            row["norm_top"] = top
            row["key_mass_from"] = self.key_mass if rec.top1pct_key_share is not None else None
            out.append(row)
        return out

    def add(self, step: int, records: list[dict]) -> None:
        """Keeps one step's records and writes them (files, TensorBoard, callback). A failing
        writer raises :class:`MonitorWriteError` after the others ran; the records are kept,
        and a file's unwritten records go out with the next step's."""
        self.records.extend(records)
        errors = []
        for kind, write in (("jsonl", self._write_jsonl), ("csv", self._write_csv)):
            pending = self._unwritten[kind] + records
            try:
                write(pending)
                self._unwritten[kind] = []
            except OSError as e:
                self._unwritten[kind] = pending
                errors.append(f"{kind}: {e}")
        if self.writer is not None:
            try:
                for r in records:
                    for name in self._figures():
                        value = r.get(name)
                        if value is not None and math.isfinite(value):
                            self.writer.add_scalar(f"{name}/{r['layer']}", value, step)
            except Exception as e:
                errors.append(f"tensorboard: {type(e).__name__}: {e}")
        if self.callback is not None:
            try:
                self.callback(records)
            except Exception as e:
                errors.append(f"callback: {type(e).__name__}: {e}")
        if errors:
            raise MonitorWriteError(
                f"Monitor: writing the records of step {step} failed ({'; '.join(errors)}); the "
                f"{len(self.records)} records gathered so far are kept in Monitor.records"
            )

    def _figures(self) -> list[str]:
        return [*map(_quantile_name, self.quantiles), *FIGURES]

    def _write_jsonl(self, records: list[dict]) -> None:
        if not records:
            return
        lines = "".join(json.dumps({k: _json_value(v) for k, v in r.items()}) + "\n" for r in records)
        with open(self.jsonl_path, "a") as f:
            f.write(lines)

    def _write_csv(self, records: list[dict]) -> None:
        if not records:
            return
        new = not self.csv_path.exists() or self.csv_path.stat().st_size == 0
        with open(self.csv_path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self.columns)
            if new:
                w.writeheader()
            for r in records:
                row = {k: "" if v is None else v for k, v in r.items()}
                row["norm_top"] = " ".join(f"{v:.6g}" for v in r["norm_top"] or [])
                w.writerow(row)

    def table(self, figure: str) -> tuple[list[str], list[int], Tensor]:
        """(layers, steps, values [layers, steps]) of one figure; NaN where not measured."""
        if figure not in self._figures():
            raise ValueError(f"Monitor.table(): 'figure' must be one of {self._figures()}, got {figure!r}")
        layers = list(dict.fromkeys(r["layer"] for r in self.records))
        steps = list(dict.fromkeys(r["step"] for r in self.records))
        grid = torch.full((len(layers), len(steps)), math.nan, dtype=torch.float64)
        li, si = {ly: i for i, ly in enumerate(layers)}, {s: i for i, s in enumerate(steps)}
        for r in self.records:
            if r[figure] is not None:
                grid[li[r["layer"]], si[r["step"]]] = float(r[figure])
        return layers, steps, grid

    def plot(self) -> list[Path]:
        """One heatmap per figure into ``out/plots/<figure>.png``: layers as rows, the
        recorded steps as columns; blank where not measured or not finite. Returns the paths."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        if not self.records:
            raise ValueError("Monitor.plot(): no step was recorded yet")
        (self.out / "plots").mkdir(exist_ok=True)
        paths = []
        for figure in self._figures():
            layers, steps, grid = self.table(figure)
            grid = torch.where(grid.isfinite(), grid, math.nan)
            fig, ax = plt.subplots(figsize=(min(3 + 0.25 * len(steps), 14), 1.5 + 0.3 * len(layers)))
            image = ax.imshow(grid.numpy(), aspect="auto", interpolation="nearest", cmap="viridis")
            fig.colorbar(image, ax=ax, label=figure)
            stride = max(1, len(steps) // 12)
            ax.set_xticks(range(0, len(steps), stride), [str(s) for s in steps[::stride]], fontsize=7)
            ax.set_yticks(range(len(layers)), layers, fontsize=7)
            ax.set_xlabel("training step")
            ax.set_ylabel("layer")
            ax.set_title(f"{figure} by layer and step")
            fig.tight_layout()
            path = self.out / "plots" / f"{figure}.png"
            fig.savefig(path, dpi=100)
            plt.close(fig)
            paths.append(path)
        return paths

    def close(self, *, plot: bool = True) -> None:
        """Draws the plots (when a step was recorded) and flushes / closes the TensorBoard writer."""
        if self.writer is not None:
            if self._own_writer:
                self.writer.close()
            elif callable(getattr(self.writer, "flush", None)):
                self.writer.flush()
        if plot and self.records:
            self.plot()


def _json_value(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None  # JSON has no inf / nan (an exact int8 round trip's SQNR is inf)
    return v


def _writable_dir(out) -> Path:
    """``out`` as a Path, or a ValueError naming it when it cannot be a writable directory."""
    if not isinstance(out, (str, os.PathLike)) or not str(out):
        raise TypeError(f"Monitor(): 'out' must be a directory path, got {out!r}")
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise ValueError(f"Monitor(): 'out' ({path}) exists and is not a directory")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"Monitor(): 'out' ({path}) cannot be created: {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"Monitor(): 'out' ({path}) is not writable ({existing} denies writing)")
    return path


def _summary_writer(log_dir: Path):
    """torch.utils.tensorboard's SummaryWriter, or None when tensorboard is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(log_dir=str(log_dir))
