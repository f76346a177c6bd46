"""PNG plots of a bench run (matplotlib, headless). Titles name the op, the device and the date."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from dsr_kernels.benchmark.common import ratio_of

Bar = tuple[float | None, float | None, float | None]  # (value, p20, p80); None: no bar / no whisker


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def title(op: str, what: str, env: dict) -> str:
    device = env.get("device_name") or env.get("device")
    threads = f", {env.get('cpu_threads')} threads" if env.get("device") == "cpu" else ""
    return f"{op}: {what}\n{device}{threads}, {env.get('dtype', '')} {str(env.get('date', ''))[:10]}"


def lines(
    path: Path,
    panels: Sequence[dict],
    *,
    suptitle: str,
) -> Path:
    """One panel per entry: {"title", "xlabel", "ylabel", "series": {label: (xs, ys, lo, hi)},
    "logx", "logy", "reference": (label, xs, ys) or None}; lo/hi draw the p20-p80 band."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.2), squeeze=False)
    for ax, panel in zip(axes[0], panels, strict=True):
        for label, (xs, ys, lo, hi) in panel["series"].items():
            (line,) = ax.plot(xs, ys, marker="o", label=label)
            if lo is not None and hi is not None:
                ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.2, linewidth=0)
        if panel.get("reference"):
            label, xs, ys = panel["reference"]
            ax.plot(xs, ys, linestyle="--", color="black", label=label)
        ax.set_title(panel.get("title", ""), fontsize=9)
        ax.set_xlabel(panel.get("xlabel", ""))
        ax.set_ylabel(panel.get("ylabel", ""))
        if panel.get("logx"):
            ax.set_xscale("log", base=2)
        if panel.get("logy"):
            ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    return _save(plt, fig, path, suptitle)


def bars(
    path: Path,
    groups: Sequence[str],
    series: dict[str, Sequence[tuple[float | None, float | None, float | None]]],
    *,
    ylabel: str,
    suptitle: str,
    reference: float | None = None,
) -> Path:
    """Grouped bars: series[label][i] = (value, p20, p80) for groups[i] (None: no bar);
    the p20-p80 spread as error bars, an optional horizontal reference line (1x, say)."""
    plt = _pyplot()
    width = 0.8 / max(len(series), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(groups) * max(len(series), 1) * 0.5 + 2), 4.4))
    for i, (label, values) in enumerate(series.items()):
        xs, ys, err_lo, err_hi = [], [], [], []
        for g, (v, lo, hi) in enumerate(values):
            if v is None:
                continue
            xs.append(g + (i - (len(series) - 1) / 2) * width)
            ys.append(v)
            err_lo.append(max(v - lo, 0) if lo is not None else 0)
            err_hi.append(max(hi - v, 0) if hi is not None else 0)
        ax.bar(xs, ys, width=width, label=label, yerr=[err_lo, err_hi], capsize=2)
    if reference is not None:
        ax.axhline(reference, color="black", linewidth=0.8, linestyle="--")
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=7)
    return _save(plt, fig, path, suptitle)


def row_bars(
    path: Path,
    items: Sequence,
    *,
    group: Callable[[object], str] = lambda row: f"{row['shape']} {row['mode']}",
    series: Callable[[object], str] = lambda row: row["provider"],
    value: Callable[[object], Bar] = lambda row: ratio_of(row, "speedup"),
    ylabel: str,
    suptitle: str,
    reference: float | None = 1.0,
) -> Path:
    """:func:`bars` of rows (or other items): one group per ``group(item)`` (default: shape
    and mode), one series per ``series(item)`` (default: the provider), each bar
    ``value(item)`` (default: the row's speed-up with its p20-p80); the first item of a
    group and series is drawn."""
    groups = list(dict.fromkeys(group(item) for item in items))
    data: dict[str, list[Bar]] = {}
    for item in items:
        bars_ = data.setdefault(series(item), [(None, None, None)] * len(groups))
        i = groups.index(group(item))
        if bars_[i][0] is None:
            bars_[i] = value(item)
    return bars(path, groups, data, ylabel=ylabel, suptitle=suptitle, reference=reference)


def sweep(rows: Sequence[dict], prefix: str) -> tuple[list, list, list, list] | None:
    """(R, overhead, p20, p80) of one provider's rows over R against its own R = 0 (zero
    there by definition), for :func:`lines`; None without an R = 0 row."""
    rows = sorted(rows, key=lambda r: r["R"])
    if not rows or rows[0]["R"] != 0:
        return None
    values = [(0.0, 0.0, 0.0) if r["R"] == 0 else ratio_of(r, prefix) for r in rows]
    return ([r["R"] for r in rows], *(list(v) for v in zip(*values, strict=True)))


def _save(plt, fig, path: Path, suptitle: str) -> Path:
    fig.suptitle(suptitle, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
