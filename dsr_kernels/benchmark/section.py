"""The one interface every section of ``dsr-kernels bench`` implements.

A section (self-check, attention, norm_modulate, models, encoder, dropin, scaling, video) says which providers,
shapes and modes it knows, turns the run's options into :class:`Case` s (one unit of
progress each: typically one shape and mode, its providers' repeats interleaved), and
reads its own rows back into tables, plain-sentence conclusions and plots. A case
measures through :func:`dsr_kernels.benchmark.measure.measure`; tables and sentences
are formatted by :mod:`dsr_kernels.benchmark.report`. The runner
(:mod:`dsr_kernels.benchmark.run`) runs the cases with a progress bar and writes the
files; ``dsr-kernels bench`` checks the options against what the sections know first.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch

PRESETS = ("quick", "default", "full")
REGISTERS = (0, 4, 16, 36, 64)
KERNEL_MODES = ("fwd", "bwd", "full")  # a kernel's forward, its backward alone (retained graph), both


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

    A subclass overrides the methods; its instance names the section
    (``SECTION = NormModulateSection(name="norm_modulate", ...)``).
    """

    name: str = ""
    title: str = ""
    baseline: str = ""  # the provider every ratio of this section is against
    mode_names: tuple[str, ...] = ()
    notes: list[str] = field(default_factory=list)  # what the preset left out, said after the tables
    main_job: bool = True  # run by ``dsr-kernels bench`` without --section (False: only when named, or with "all")

    def providers(self, device: torch.device) -> list[str]:
        """Every provider name this section can run on ``device``."""
        raise NotImplementedError

    def all_providers(self) -> list[str]:
        """Every provider name on any device (to tell "unknown" from "not on this device")."""
        return self.providers(torch.device("cpu"))

    def shapes(self, device: torch.device) -> Sequence:
        """Every shape this section can run on ``device`` (objects with a ``name``)."""
        raise NotImplementedError

    def shape_names(self) -> list[str]:
        """Every shape (or model) name this section knows, on any device and preset."""
        return list(dict.fromkeys(s.name for d in ("cpu", "cuda") for s in self.shapes(torch.device(d))))

    def cases(self, cfg: BenchConfig) -> list[Case]:
        raise NotImplementedError

    def tables(self, rows: list[dict], env: dict) -> list[Table]:
        """One table titled :meth:`table_title`: a line of :meth:`cells` per row, its noise note last."""
        from dsr_kernels.benchmark.report import noise_cell, table

        if not rows:
            return []
        return table(self.table_title(rows, env), [{**self.cells(r), "note": noise_cell(r)} for r in rows])

    def cells(self, row: dict) -> dict[str, str]:
        """One row's cells in :meth:`tables`, by column."""
        raise NotImplementedError

    def table_title(self, rows: list[dict], env: dict) -> str:
        """What :meth:`tables` shows: the dtype, the shapes, what each ratio is against."""
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


def error_row(error: BaseException, **fields) -> dict:
    """A row for a provider that could not run: the error, not a hidden gap."""
    return {**fields, "error": f"{type(error).__name__}: {error}".splitlines()[0][:300]}


def compute_seconds(cfg: BenchConfig, flops: float = 0.0, nbytes: float = 0.0) -> float:
    """A rough guess of one call's seconds from its FLOPs and bytes (for the ETA only)."""
    gpu = cfg.device.type == "cuda"
    return flops / (2e14 if gpu else 1e11) + nbytes / (2e12 if gpu else 1e10) + (2e-5 if gpu else 1e-4)


def estimate_s(cfg: BenchConfig, round_s: float, *, budget_s: float | None = None, memory: bool = False) -> float:
    """A case's seconds, given one round's (every provider once): probe, warm-up, rounds, peak memory."""
    budget = cfg.budget_s if budget_s is None else budget_s
    return (4 + (1 if memory else 0)) * round_s + max(5 * round_s, budget)
