"""Generate benchmarks/results/RESULTS.md from the committed run folders of ``dsr-kernels bench``.

    python benchmarks/readme_results.py           # rewrite the generated part of RESULTS.md
    python benchmarks/readme_results.py --check   # exit 1 if RESULTS.md is not what the files give
    python benchmarks/readme_results.py --replot  # redraw each committed run's PNGs from its results.json

Every folder ``benchmarks/results/runs/<date>-<time>-<device>/`` (a run folder of
``dsr-kernels bench``, copied as written: results.json, results.csv, the PNG plots)
becomes one section, titled by its run folder and what sets it apart from the others
(sections, dtype, shapes, commit): device, processor, threads, versions, date and
command; the run's closing summary; each section's tables; the plots. An index of the
runs comes first. The text sits between the markers ``<!-- bench-results:begin -->``
and ``<!-- bench-results:end -->``; what is outside them is written by hand and kept.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNS = ROOT / "benchmarks" / "results" / "runs"
RESULTS = ROOT / "benchmarks" / "results" / "RESULTS.md"
BEGIN, END = "<!-- bench-results:begin -->", "<!-- bench-results:end -->"
# RESULTS.md as first written when it does not exist; afterwards only the text between the markers changes.
HEADER = """# Benchmark results

Every run of `dsr-kernels bench` committed under `benchmarks/results/runs/`, one section
each. The method, the sections and the targets are in
[docs/benchmarks.md](../../docs/benchmarks.md).

"""


def _cell(v: object) -> str:
    return str(v).replace("|", "\\|")


def _where(env: dict) -> str:
    if env["device"] == "cuda":
        return f"{env['device_name']} (compute capability {env.get('compute_capability')})"
    return f"{env['processor']}, {env['cpu_threads']} threads, C++ kernels for {env.get('cpu_kernels_isa')}"


def _shapes(rows: list[dict], most: int = 3) -> str:
    """The shapes (or models) a run measured, in order; past ``most`` just their number."""
    names = list(dict.fromkeys(str(r["shape"]) for r in rows if r.get("shape") and r.get("section") != "selfcheck"))
    return ", ".join(names) if len(names) <= most else f"{len(names)} shapes"


def _date(env: dict) -> str:
    """``2026-11-29 01:32+00:00`` from the run's ISO timestamp (minutes and the UTC offset)."""
    date = str(env["date"])
    return f"{date[:10]} {date[11:16]}{date[19:]}" if len(date) >= 19 else date


def _title(folder: Path, data: dict) -> str:
    env = data["environment"]
    return (
        f"Run {folder.name}: {', '.join(env.get('sections', []))} ({env.get('dtype')}; {_shapes(data['rows'])}), "
        f"commit {env.get('git_commit')}"
    )


def render_run(folder: Path) -> str:
    from dsr_kernels.benchmark.run import sections

    data = json.loads((folder / "results.json").read_text())
    env, rows = data["environment"], data["rows"]
    rel = folder.relative_to(ROOT).as_posix()
    lines = [
        f"## {_title(folder, data)}",
        "",
        f"On {env['device']}: {_where(env)}, {_date(env)}. "
        f"`{env.get('command')}` (preset {env.get('preset')}, {env.get('dtype')}), torch {env['torch']}, "
        f"triton {env['triton']}, {env.get('seconds')} s; files: `{rel}/`"
        + ("" if data.get("complete", True) else " (interrupted: partial)"),
        "",
    ]
    known = sections()
    chosen = [known[name] for name in env.get("sections", []) if name in known]
    summary = []
    for section in chosen:
        summary += section.summary([r for r in rows if r.get("section") == section.name], env)
    noisy = sum(1 for r in rows if r.get("noisy"))
    lines += [f"- {s}" for s in summary]
    if noisy:
        lines.append(f"- {noisy} of {len(rows)} rows were noisy (marked in the tables).")
    lines.append("")
    for section in chosen:
        srows = [r for r in rows if r.get("section") == section.name]
        if not srows:
            continue
        for table in section.tables(srows, env):
            lines += [f"<details><summary>{_cell(table.title)}</summary>", ""]
            lines.append("| " + " | ".join(table.columns) + " |")
            lines.append("|" + "---|" * len(table.columns))
            for r in table.rows:
                lines.append("| " + " | ".join(_cell(r.get(c, "")) for c in table.columns) + " |")
            lines += ["", "</details>", ""]
    for png in sorted(folder.glob("*.png")):
        lines.append(f"![{png.stem}]({png.relative_to(RESULTS.parent).as_posix()})")
    lines.append("")
    return "\n".join(lines)


def replot(folder: Path) -> list[Path]:
    """Redraws a run folder's plots from its results.json (after a change to the plotting code)."""
    from dsr_kernels.benchmark.run import sections

    data = json.loads((folder / "results.json").read_text())
    env, rows = data["environment"], data["rows"]
    paths = []
    for name, section in sections().items():
        srows = [r for r in rows if r.get("section") == name]
        if srows:
            paths += section.plots(srows, env, folder)
    return paths


def _folders() -> list[Path]:
    return sorted(p for p in RUNS.iterdir() if p.is_dir() and not p.is_symlink()) if RUNS.exists() else []


def render_index(folders: list[Path]) -> str:
    """One row per run: what sets the runs apart at a glance."""
    lines = [
        "| run | device | sections | dtype | shapes | preset | commit | seconds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for folder in folders:
        data = json.loads((folder / "results.json").read_text())
        env = data["environment"]
        cells = [
            f"[{folder.name}]({folder.relative_to(RESULTS.parent).as_posix()}/)",
            _where(env),
            ", ".join(env.get("sections", [])),
            env.get("dtype"),
            _shapes(data["rows"], most=12),
            env.get("preset"),
            env.get("git_commit"),
            env.get("seconds"),
        ]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def render() -> str:
    folders = _folders()
    if folders:
        body = render_index(folders) + "\n" + "\n".join(render_run(f) for f in folders)
    else:
        body = "No committed runs yet.\n"
    note = "<!-- generated by benchmarks/readme_results.py from benchmarks/results/runs/: do not edit -->"
    return f"{BEGIN}\n{note}\n\n{body}{END}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="exit 1 if RESULTS.md is out of date")
    parser.add_argument("--replot", action="store_true", help="redraw the committed runs' PNGs first")
    args = parser.parse_args(argv)
    if args.replot:
        for folder in _folders():
            for path in replot(folder):
                print(f"redrew {path.relative_to(ROOT)}")
    name = RESULTS.relative_to(ROOT).as_posix()
    if RESULTS.exists():
        text = RESULTS.read_text()
    elif args.check:
        print(f"{name} does not exist: run python benchmarks/readme_results.py", file=sys.stderr)
        return 1
    else:
        text = f"{HEADER}{BEGIN}\n{END}\n"
    if BEGIN not in text or END not in text:
        print(f"{name} has no {BEGIN} ... {END} markers", file=sys.stderr)
        return 1
    start, end = text.index(BEGIN), text.index(END) + len(END)
    new = text[:start] + render() + text[end:]
    if args.check:
        if new != text:
            print(f"{name} is out of date: run python benchmarks/readme_results.py")
            return 1
        return 0
    RESULTS.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
