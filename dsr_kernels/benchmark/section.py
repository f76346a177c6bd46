"""The one interface every section of ``dsr-kernels bench`` implements.

A section (self-check, attention, norm_modulate, models, encoder) says which providers,
shapes and modes it knows, turns the run's options into :class:`Case` s (one unit of
progress each: typically one shape and mode, its providers' repeats interleaved), and
reads its own rows back into tables, plain-sentence conclusions and plots. The runner
(:mod:`dsr_kernels.benchmark.run`) validates the options against what the selected
sections know, runs the cases with a progress bar, and writes the files.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch

PRESETS = ("quick", "default", "full")
REGISTERS = (0, 4, 16, 36, 64)


@dataclass(frozen=True)
class BenchConfig:
    """The validated options of one run."""

    device: torch.device
    dtype: torch.dtype
    preset: str = "default"  # "quick", "default" or "full"
    providers: tuple[str, ...] | None = None  # None: every provider of the section on this device
    registers: tuple[int, ...] | None = None  # None: the section's sweep for the preset
    shapes: tuple[str, ...] | None = None  # None: the section's shapes for the preset
    modes: tuple[str, ...] | None = None  # None: the section's modes for the preset
    memory: bool = True  # also measure peak memory (one extra call per provider)

    @property
    def budget_s(self) -> float:
        """Seconds of interleaved rounds per case (after warm-up); a GPU's times vary less."""
        if self.device.type == "cuda":
            return {"quick": 0.3, "default": 1.0, "full": 2.0}[self.preset]
        return {"quick": 1.0, "default": 3.0, "full": 5.0}[self.preset]


@dataclass
class Case:
    """One unit of progress: ``run()`` measures it and returns its rows."""

    section: str
    label: str
    run: Callable[[], list[dict]]
    est_s: float = 1.0  # a rough estimate of its seconds, for the ETA (corrected by the measured pace)


class Table(NamedTuple):
    title: str
    columns: Sequence[str]
    rows: list[dict]


@dataclass
class Section:
    """What a section of the bench knows and how it reads its results.

    Subclasses fill in the class attributes and override the methods.
    """

    name: str = ""
    title: str = ""
    baseline: str = ""  # the provider every ratio of this section is against
    mode_names: tuple[str, ...] = ()
    notes: list[str] = field(default_factory=list)  # what the preset left out, said after the tables

    def providers(self, device: torch.device) -> list[str]:
        """Every provider name this section can run on ``device``."""
        raise NotImplementedError

    def all_providers(self) -> list[str]:
        """Every provider name on any device (to tell "unknown" from "not on this device")."""
        return self.providers(torch.device("cpu"))

    def shape_names(self) -> list[str]:
        """Every shape (or model) name this section knows, on any device and preset."""
        raise NotImplementedError

    def cases(self, cfg: BenchConfig) -> list[Case]:
        raise NotImplementedError

    def tables(self, rows: list[dict], env: dict) -> list[Table]:
        raise NotImplementedError

    def summary(self, rows: list[dict], env: dict) -> list[str]:
        return []

    def plots(self, rows: list[dict], env: dict, folder: Path) -> list[Path]:
        return []

    def uses_registers(self) -> bool:
        """Whether ``--registers`` means something to this section."""
        return False

    # The run's --providers / --shapes / --modes apply to every selected section: each
    # section keeps the names it knows. An empty list means that the options select
    # nothing of this section (it then has no cases); None: the section's defaults.

    def my_providers(self, cfg: BenchConfig) -> list[str]:
        """This section's providers on the device that the run selects, the baseline first (when any)."""
        mine = self.providers(cfg.device)
        chosen = mine if cfg.providers is None else [p for p in cfg.providers if p in mine]
        if chosen and self.baseline in mine and self.baseline not in chosen:
            chosen = [self.baseline, *chosen]
        return list(chosen)

    def my_shapes(self, cfg: BenchConfig) -> list[str] | None:
        return None if cfg.shapes is None else [n for n in cfg.shapes if n in self.shape_names()]

    def my_modes(self, cfg: BenchConfig) -> tuple[str, ...] | None:
        return None if cfg.modes is None else tuple(m for m in cfg.modes if m in self.mode_names)

    def selects_nothing(self, cfg: BenchConfig) -> bool:
        """Whether the run's options leave this section nothing to measure."""
        return not self.my_providers(cfg) or self.my_shapes(cfg) == [] or self.my_modes(cfg) == ()


def error_row(section: str, error: BaseException, **fields) -> dict:
    """A row for a provider that could not run: the error, not a hidden gap."""
    message = f"{type(error).__name__}: {error}".splitlines()[0][:300]
    return {"section": section, **fields, "error": message}


def where(env: dict) -> str:
    """'this CPU (AMD EPYC, 2 threads)' or 'this GPU (NVIDIA H200)'."""
    if env.get("device") == "cuda":
        return f"this GPU ({env.get('device_name')})"
    return f"this CPU ({env.get('processor')}, {env.get('cpu_threads')} threads)"


def pm(p20: float, p80: float) -> str:
    """The p20-p80 half-width as '±x%'."""
    return f"±{abs(p80 - p20) / 2:.1f}%"


def probe(fns: dict, device: torch.device) -> tuple[dict, dict]:
    """Calls each provider once (its setup entered); returns (those that ran, {key: error} of
    those that raised), so that one provider that cannot run a shape is reported, not fatal."""
    import contextlib

    from dsr_kernels.benchmark.common import synchronize

    ok, failed = {}, {}
    for key, entry in fns.items():
        setup, fn = entry if isinstance(entry, tuple) else (contextlib.nullcontext, entry)
        try:
            with setup():
                fn()
            synchronize(device)
            ok[key] = entry
        except Exception as exc:  # reported in the provider's row
            failed[key] = exc
    return ok, failed


def num(v: float | None, digits: int = 3) -> str:
    if v is None:
        return ""
    return f"{v:.{digits}g}" if abs(v) < 10**digits else f"{v:.0f}"


def ms_cell(row: dict) -> str:
    """'12.3 [11.9, 13.0]': the median and the p20-p80 spread in ms, or the error."""
    if "median_ms" not in row:
        return "error"
    return f"{num(row['median_ms'])} [{num(row['p20_ms'])}, {num(row['p80_ms'])}]"


def speedup_cell(row: dict) -> str:
    """'1.32x', or '0.98x (noise)' when 1 lies inside the per-round p20-p80."""
    if row.get("speedup") is None:
        return "baseline" if row.get("provider") == row.get("baseline") else ""
    text = f"{row['speedup']:.2f}x"
    return text + " (noise)" if row.get("speedup_within_noise") else text


def overhead_cell(row: dict, prefix: str) -> str:
    """'+11.8% ±2.0%', or '+0.4% (noise)'."""
    if row.get(f"{prefix}_pct") is None:
        return ""
    text = f"{row[f'{prefix}_pct']:+.1f}%"
    if row.get(f"{prefix}_within_noise"):
        return text + " (noise)"
    return f"{text} {pm(row[f'{prefix}_p20_pct'], row[f'{prefix}_p80_pct'])}"


def noise_cell(row: dict) -> str:
    """'noisy: spread 23%, others 40% CPU', the error, or nothing (the JSON row has the full reasons)."""
    if row.get("error"):
        return row["error"][:80]
    if not row.get("noisy"):
        return ""
    parts = []
    if row.get("spread_pct", 0) > 10:
        parts.append(f"spread {row['spread_pct']:.0f}%")
    if (row.get("foreign_cpu_pct") or 0) > 10:
        parts.append(f"others {row['foreign_cpu_pct']:.0f}% CPU")
    if row.get("warmup_stable") is False:
        parts.append("warm-up unstable")
    return "noisy: " + ", ".join(parts)


def faster_sentence(name: str, row: dict, baseline: str) -> str:
    """'dsr is 1.32x faster than torch_sdpa_cat (p20-p80 1.28x-1.35x)', or 'within noise'."""
    lo, hi = row["speedup_p20"], row["speedup_p80"]
    if row.get("speedup_within_noise"):
        return f"{name} and {baseline} are within noise of each other ({lo:.2f}x-{hi:.2f}x)"
    if row["speedup"] >= 1:
        return f"{name} is {row['speedup']:.2f}x faster than {baseline} (p20-p80 {lo:.2f}x-{hi:.2f}x)"
    return f"{name} is {1 / row['speedup']:.2f}x slower than {baseline} (p20-p80 {1 / hi:.2f}x-{1 / lo:.2f}x)"


def overhead_sentence(row: dict, prefix: str) -> str:
    """'11.8% latency (±2.0%)', or 'no latency beyond the noise (+0.4%, ±3%)'."""
    pct, lo, hi = row[f"{prefix}_pct"], row[f"{prefix}_p20_pct"], row[f"{prefix}_p80_pct"]
    if row.get(f"{prefix}_within_noise"):
        return f"no latency beyond the noise ({pct:+.1f}%, p20-p80 {lo:+.1f}% to {hi:+.1f}%)"
    return f"{pct:+.1f}% latency ({pm(lo, hi)})"


def compute_seconds(cfg: BenchConfig, flops: float = 0.0, nbytes: float = 0.0) -> float:
    """A rough guess of one call's seconds from its FLOPs and bytes (for the ETA only)."""
    gpu = cfg.device.type == "cuda"
    return flops / (2e14 if gpu else 1e11) + nbytes / (2e12 if gpu else 1e10) + (2e-5 if gpu else 1e-4)


def estimate_s(cfg: BenchConfig, round_s: float, *, budget_s: float | None = None, memory: bool = False) -> float:
    """A case's seconds, given one round's (every provider once): probe, warm-up, rounds, peak memory."""
    budget = cfg.budget_s if budget_s is None else budget_s
    return (4 + (1 if memory else 0)) * round_s + max(5 * round_s, budget)
