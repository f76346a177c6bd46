"""``dsr-kernels bench``: run the selected sections, show progress, write one folder per run.

Every run writes ``<out>/<date>-<time>-<device>/`` (never an existing folder) with
``results.json`` (the environment and one row per measurement), ``results.csv`` (the
same rows, tagged with the environment) and the sections' PNG plots, and points
``<out>/latest`` at it. The progress bar moves within a case too (warm-up, rounds done,
seconds left). Ctrl-C stops after writing the rows gathered so far.
"""

from __future__ import annotations

import csv
import datetime as _dt
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from dsr_kernels.benchmark import report
from dsr_kernels.benchmark.common import CaseProgress, CpuLoad, environment, progress_to
from dsr_kernels.benchmark.section import BenchConfig, Case, Section, error_row

# Without a terminal, a case's line gets its progress appended at most this often.
PLAIN_PROGRESS_EVERY_S = 10.0


def sections() -> dict[str, Section]:
    """Every section, in the order the main job runs them (then ``scaling``, ``video`` and
    ``distributed``, which run only when named, or with ``--section all``)."""
    from dsr_kernels.benchmark import (
        attention,
        distributed,
        dropin,
        encoder,
        models,
        norm_modulate,
        scaling,
        selfcheck,
        video,
    )

    return {
        s.name: s
        for s in (
            selfcheck.SECTION,
            attention.SECTION,
            norm_modulate.SECTION,
            models.SECTION,
            encoder.SECTION,
            dropin.SECTION,
            scaling.SECTION,
            video.SECTION,
            distributed.SECTION,
        )
    }


def section_cases(name: str, preset: str | None = None) -> list[Case]:
    """The cases ``dsr-kernels bench --section <name>`` runs on this machine with default options
    (``preset``: quick, default or full; None: $DSR_BENCH_PRESET, else default). The
    pytest-benchmark suites in benchmarks/ run these."""
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = BenchConfig(device=device, dtype=dtype, preset=preset or os.environ.get("DSR_BENCH_PRESET", "default"))
    return sections()[name].cases(cfg)


def run_folder(out: Path, device: str, now: _dt.datetime | None = None) -> Path:
    """A new folder ``<out>/<YYYY-MM-DD>-<HHMMSS>-<device>`` (suffixed -2, -3, ... if taken)."""
    now = now or _dt.datetime.now()
    stem = f"{now:%Y-%m-%d-%H%M%S}-{device}"
    out.mkdir(parents=True, exist_ok=True)
    for i in range(1, 1000):
        folder = out / (stem if i == 1 else f"{stem}-{i}")
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            continue
    raise FileExistsError(f"no free run folder under {out} for {stem}")


def _link_latest(out: Path, folder: Path) -> None:
    latest = out / "latest"
    tmp = out / f".latest-{os.getpid()}"
    try:
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()
        tmp.symlink_to(folder.name, target_is_directory=True)
        os.replace(tmp, latest)
    except OSError:  # a file system without symlinks: a text file naming the folder
        (out / "latest.txt").write_text(folder.name + "\n")


def write_files(folder: Path, env: dict, rows: list[dict], *, complete: bool) -> tuple[Path, Path]:
    """``results.json`` (environment + rows) and ``results.csv`` (rows tagged with the environment)."""
    json_path, csv_path = folder / "results.json", folder / "results.csv"
    data = {"environment": env, "complete": complete, "rows": rows}
    json_path.write_text(json.dumps(data, indent=1, default=str) + "\n")
    tags = {
        k: env.get(k)
        for k in ("date", "device_name", "processor", "cpu_threads", "torch", "triton", "dsr_kernels", "git_commit")
    }
    fields: list[str] = []
    for row in rows:
        fields += [k for k in row if k not in fields]
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields + [k for k in tags if k not in fields])
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, **tags})
    return json_path, csv_path


class _Progress:
    """A rich progress bar on a terminal ("n of N", elapsed, ETA, what the case is doing and
    its seconds left); elsewhere one plain line per case, to which a long case appends its
    progress every :data:`PLAIN_PROGRESS_EVERY_S` seconds."""

    def __init__(self, console, cases: Sequence[Case], clock=time.perf_counter) -> None:
        self.console, self.cases, self.clock = console, cases, clock
        self.total = sum(c.est_s for c in cases)
        self.done_weight, self.done, self.start = 0.0, 0, clock()
        self.case: Case | None = None
        self.case_start = self.last_print = self.start
        self.bar = None
        if console.is_terminal:
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self.bar = Progress(
                TextColumn("{task.fields[n]} of {task.fields[count]}"),
                BarColumn(),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                TextColumn("{task.description}"),
                console=console,
                transient=False,
            )
            self.task = self.bar.add_task("", total=self.total, n=0, count=len(cases))
            self.bar.start()

    def eta(self) -> str:
        if not self.done_weight:
            return "?"
        elapsed = self.clock() - self.start
        left = elapsed * (self.total - self.done_weight) / self.done_weight
        return _minutes(left)

    def begin(self, case: Case) -> None:
        self.case, self.case_start = case, self.clock()
        self.last_print = self.case_start
        if self.bar is not None:
            self.bar.update(self.task, description=case.label, n=self.done + 1, completed=self.done_weight)
        else:
            print(f"[{self.done + 1} of {len(self.cases)}, ETA {self.eta()}] {case.label} ...", end="", flush=True)

    def within(self, event: CaseProgress) -> None:
        """What the current case is doing: on the bar at once, on a plain line now and then."""
        if self.case is None:
            return
        now = self.clock()
        spent = now - self.case_start
        left = f", ~{_minutes(event.left_s)} left" if event.left_s is not None else ""
        if self.bar is not None:
            fraction = spent / (spent + event.left_s) if event.left_s is not None and spent + event.left_s > 0 else None
            update = {"description": f"{self.case.label}: {event.text}{left}"}
            if fraction is not None:
                update["completed"] = self.done_weight + min(fraction, 0.99) * self.case.est_s
            self.bar.update(self.task, **update)
        elif now - self.last_print >= PLAIN_PROGRESS_EVERY_S:
            self.last_print = now
            print(f" [{spent:.0f} s: {event.text}{left}]", end="", flush=True)

    def end(self, case: Case, seconds: float) -> None:
        self.done += 1
        self.done_weight += case.est_s
        self.case = None
        if self.bar is not None:
            self.bar.update(self.task, completed=self.done_weight, n=self.done)
        else:
            print(f" {seconds:.1f} s", flush=True)

    def stop(self) -> None:
        if self.bar is not None:
            self.bar.stop()
        elif self.done < len(self.cases):  # interrupted inside a case: end its line
            print(" interrupted", flush=True)


def _minutes(seconds: float) -> str:
    return f"{int(seconds) // 60}:{int(seconds) % 60:02d}"


def run(
    cfg: BenchConfig,
    selected: Sequence[str],
    *,
    out: Path,
    compare: dict | None = None,
    console=None,
) -> int:
    """Runs the sections' cases; returns the exit code: 0; 1 when a self-check failed or a case
    crashed (its error is a row, the other cases still run); 130 after Ctrl-C."""
    from rich.console import Console

    console = console or Console(width=None if sys.stdout.isatty() else 200, highlight=False, markup=False)
    all_sections = sections()
    chosen = [all_sections[name] for name in selected]
    env = environment(cfg.device)
    env.update(dtype=str(cfg.dtype).replace("torch.", ""), preset=cfg.preset, sections=list(selected))
    cases: list[Case] = []
    for section in chosen:
        cases += section.cases(cfg)
    folder = run_folder(out, cfg.device.type)
    report.print_header(console, env, cfg, chosen, cases, folder)

    rows: list[dict] = []
    progress = _Progress(console, cases)
    interrupted = False
    began = time.perf_counter()
    load = CpuLoad()  # other processes' share of the CPUs over the whole run, for the summary
    try:
        for case in cases:
            progress.begin(case)
            t0 = time.perf_counter()
            try:
                with progress_to(progress.within):
                    case_rows = case.run()
            except Exception as exc:  # one case failing (out of memory, say) does not lose the others
                case_rows = [
                    error_row(exc, section=case.section, shape=case.label, provider="(whole case)", case_error=True)
                ]
            for r in case_rows:
                r.setdefault("case", case.label)
            rows += case_rows
            progress.end(case, time.perf_counter() - t0)
            write_files(folder, env, rows, complete=False)  # a crash keeps what was measured
    except KeyboardInterrupt:
        interrupted = True
    finally:
        progress.stop()
    env["seconds"] = round(time.perf_counter() - began, 1)
    env["foreign_cpu_pct"] = load.stop()
    env["load_average"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    json_path, csv_path = write_files(folder, env, rows, complete=not interrupted)
    _link_latest(out, folder)
    if interrupted:
        console.print(f"\ninterrupted after {len(rows)} rows; wrote {json_path} and {csv_path}")
        return 130

    report.print_report(console, env, chosen, rows, folder)
    if compare is not None:
        report.print_compare(console, compare, rows)
    console.print(f"\nwrote {folder}/ (results.json, results.csv and the plots); {out / 'latest'} points at it")
    console.print(f"{len(rows)} rows in {env['seconds']:.0f} s")
    failed = [r for r in rows if r.get("status") == "FAIL" or r.get("case_error")]
    return 1 if failed else 0


def load_previous(path: Path) -> dict:
    """The JSON of an earlier run, checked enough to compare against."""
    data = json.loads(path.read_text())
    if not isinstance(data, dict) or not isinstance(data.get("rows"), list):
        raise ValueError("it has no 'rows' list (expected a results.json written by dsr-kernels bench)")
    return data
