"""``dsr-kernels bench``: run the selected sections, show progress, write one folder per run.

Every run writes ``<out>/<date>-<time>-<device>/`` (never an existing folder) with
``results.json`` (the environment and one row per measurement), ``results.csv`` (the
same rows, tagged with the environment) and the sections' PNG plots, and points
``<out>/latest`` at it. Ctrl-C stops after writing the rows gathered so far.
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

from dsr_kernels.benchmark.common import environment
from dsr_kernels.benchmark.section import BenchConfig, Case, Section, error_row


def sections() -> dict[str, Section]:
    """Every section, in the order the main job runs them."""
    from dsr_kernels.benchmark import attention, dropin, encoder, models, norm_modulate, selfcheck

    return {
        s.name: s
        for s in (
            selfcheck.SECTION,
            attention.SECTION,
            norm_modulate.SECTION,
            models.SECTION,
            encoder.SECTION,
            dropin.SECTION,
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
    """A rich progress bar on a terminal ("n of N", elapsed, ETA); one plain line per case elsewhere."""

    def __init__(self, console, cases: Sequence[Case]) -> None:
        self.console, self.cases = console, cases
        self.total = sum(c.est_s for c in cases)
        self.done_weight, self.done, self.start = 0.0, 0, time.perf_counter()
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
        elapsed = time.perf_counter() - self.start
        left = elapsed * (self.total - self.done_weight) / self.done_weight
        return f"{int(left) // 60}:{int(left) % 60:02d}"

    def begin(self, case: Case) -> None:
        if self.bar is not None:
            self.bar.update(self.task, description=case.label, n=self.done + 1)
        else:
            print(f"[{self.done + 1} of {len(self.cases)}, ETA {self.eta()}] {case.label} ...", end="", flush=True)

    def end(self, case: Case, seconds: float) -> None:
        self.done += 1
        self.done_weight += case.est_s
        if self.bar is not None:
            self.bar.update(self.task, advance=case.est_s, n=self.done)
        else:
            print(f" {seconds:.1f} s", flush=True)

    def stop(self) -> None:
        if self.bar is not None:
            self.bar.stop()
        elif self.done < len(self.cases):  # interrupted inside a case: end its line
            print(" interrupted", flush=True)


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
    _header(console, env, cfg, chosen, cases, folder)

    rows: list[dict] = []
    progress = _Progress(console, cases)
    interrupted = False
    began = time.perf_counter()
    try:
        for case in cases:
            progress.begin(case)
            t0 = time.perf_counter()
            try:
                case_rows = case.run()
            except Exception as exc:  # one case failing (out of memory, say) does not lose the others
                case_rows = [error_row(case.section, exc, shape=case.label, provider="(whole case)", case_error=True)]
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
    json_path, csv_path = write_files(folder, env, rows, complete=not interrupted)
    _link_latest(out, folder)
    if interrupted:
        console.print(f"\ninterrupted after {len(rows)} rows; wrote {json_path} and {csv_path}")
        return 130

    _report(console, env, chosen, rows, folder)
    if compare is not None:
        _compare(console, compare, rows)
    console.print(f"\nwrote {folder}/ (results.json, results.csv and the plots); {out / 'latest'} points at it")
    console.print(f"{len(rows)} rows in {env['seconds']:.0f} s")
    failed = [r for r in rows if r.get("status") == "FAIL" or r.get("case_error")]
    return 1 if failed else 0


def _header(console, env, cfg, chosen, cases, folder) -> None:
    where = env["device_name"]
    if cfg.device.type == "cpu":
        where += f", {env['cpu_threads']} threads, C++ kernels for {env['cpu_kernels_isa'] or 'no extension'}"
    else:
        where += f", compute capability {env['compute_capability']}"
    console.print(f"dsr-kernels bench on {cfg.device.type} ({where})")
    console.print(
        f"torch {env['torch']}, triton {env['triton']}, dsr-kernels {env['dsr_kernels']} "
        f"(commit {env['git_commit'] or 'unknown'}), {cfg.dtype}, preset {cfg.preset}"
    )
    console.print(
        f"{len(cases)} measurements in sections {', '.join(s.name for s in chosen)}; "
        f"each provider warmed up until stable, repeats interleaved across providers; "
        f"rows whose p20-p80 spread exceeds 10% or during which other processes took over 10% of "
        f"the CPUs are marked noisy"
    )
    console.print(f"results go to {folder}/\n")


def _report(console, env, chosen, rows, folder) -> None:
    from rich import box
    from rich.table import Table as RichTable

    conclusions: list[str] = []
    for section in chosen:
        srows = [r for r in rows if r.get("section") == section.name and not r.get("case_error")]
        for r in rows:
            if r.get("section") == section.name and r.get("case_error"):
                console.print(f"{r['shape']}: FAILED: {r['error']}")
        if not srows:
            continue
        for table in section.tables(srows, env):
            t = RichTable(title=table.title, box=box.SIMPLE_HEAD, title_justify="left", show_lines=False)
            for col in table.columns:
                t.add_column(col, overflow="fold")
            for r in table.rows:
                t.add_row(*(str(r.get(c, "")) for c in table.columns))
            console.print(t)
        for note in section.notes:
            console.print(f"  ({section.name}: {note})")
        conclusions += section.summary(srows, env)
        try:
            for path in section.plots(srows, env, folder):
                console.print(f"  plot: {path}")
        except Exception as exc:  # a plot that fails does not lose the measurements
            console.print(f"  ({section.name}: plotting failed: {type(exc).__name__}: {exc})")
    noisy = sum(1 for r in rows if r.get("noisy"))
    errors = sum(1 for r in rows if r.get("error") and r.get("section") != "selfcheck" and not r.get("case_error"))
    crashed = sum(1 for r in rows if r.get("case_error"))
    console.print("\nSummary")
    for line in conclusions:
        console.print(f"- {line}")
    if noisy:
        console.print(
            f"- {noisy} of {len(rows)} rows were noisy (see their note); ratios whose p20-p80 spread "
            "includes 1 are reported as within noise"
        )
    if errors:
        console.print(f"- {errors} provider(s) could not run a shape; their rows carry the error")
    if crashed:
        console.print(f"- {crashed} measurement(s) failed as a whole (above, and in results.json)")


def load_previous(path: Path) -> dict:
    """The JSON of an earlier run, checked enough to compare against."""
    data = json.loads(path.read_text())
    if not isinstance(data, dict) or not isinstance(data.get("rows"), list):
        raise ValueError("it has no 'rows' list (expected a results.json written by dsr-kernels bench)")
    return data


def _key(r: dict) -> tuple:
    return (r.get("section"), r.get("shape"), r.get("provider"), r.get("mode"), r.get("R"), r.get("dtype"))


def _compare(console, previous: dict, rows: list[dict]) -> None:
    """Each row's median against the same row of an earlier run; slower or faster only
    when the two p20-p80 intervals do not overlap."""
    from rich import box
    from rich.table import Table as RichTable

    old = {_key(r): r for r in previous["rows"] if "median_ms" in r}
    t = RichTable(
        title=f"against {previous.get('environment', {}).get('date', 'the previous run')} "
        f"({previous.get('environment', {}).get('device_name', '?')}): time now / time then",
        box=box.SIMPLE_HEAD,
        title_justify="left",
    )
    for col in ("section", "shape", "R", "mode", "provider", "then ms", "now ms", "now / then", "verdict"):
        t.add_column(col)
    regressions = matched = 0
    for r in rows:
        o = old.get(_key(r))
        if o is None or "median_ms" not in r:
            continue
        matched += 1
        ratio = r["median_ms"] / o["median_ms"]
        if r["p20_ms"] > o["p80_ms"]:
            verdict = "slower (regression)"
            regressions += 1
        elif r["p80_ms"] < o["p20_ms"]:
            verdict = "faster"
        else:
            verdict = "within noise"
        t.add_row(
            r["section"],
            str(r.get("shape")),
            str(r.get("R", "")),
            str(r.get("mode", "")),
            r["provider"],
            f"{o['median_ms']:.3g}",
            f"{r['median_ms']:.3g}",
            f"{ratio:.2f}x",
            verdict,
        )
    console.print(t)
    console.print(f"compared {matched} rows; {regressions} slower beyond the noise")
