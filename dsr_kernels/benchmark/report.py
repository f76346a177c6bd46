"""How a bench run reads: table cells, sentences, and what the console prints.

Cells give a median with its p20-p80 range, never a "±": the range is seldom symmetric
("+61.0% [+1.0%, +148%]", "12.3 [11.9, 13.0]").

Sentences never state noise as a finding. A comparison (a speed-up or an overhead, both
paired by round) is stated with its direction only when neither of the two rows it pairs
is noisy and its p20-p80 of per-round ratios leaves out 1x (0%); it reads "within noise"
when that range holds 1x, and "not measurable here (why)" when a row it pairs is noisy.
The closing summary opens with a warning, before any finding, when other processes held
the CPUs or most timed rows are noisy.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from dsr_kernels.benchmark.common import NOISY_FOREIGN_CPU_PCT, NOISY_SPREAD_PCT, ratio_of
from dsr_kernels.benchmark.section import Table

# cells


def num(v: float | None, digits: int = 3) -> str:
    if v is None:
        return ""
    return f"{v:.{digits}g}" if abs(v) < 10**digits else f"{v:.0f}"


def pct(v: float) -> str:
    """'+11.8%', '-0.4%', '+148%'."""
    return f"{v:+.1f}%" if abs(v) < 100 else f"{v:+.0f}%"


def ms_cell(row: dict) -> str:
    """'12.3 [11.9, 13.0]': the median and the p20-p80 range in ms, or the error."""
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
    """'+11.8% [+9.8%, +13.9%]', or '+0.4% (noise)'."""
    value, lo, hi = ratio_of(row, prefix)
    if value is None:
        return ""
    if row.get(f"{prefix}_within_noise"):
        return f"{pct(value)} (noise)"
    return f"{pct(value)} [{pct(lo)}, {pct(hi)}]"


def flop_overhead_cell(row: dict) -> str:
    """'+14.1%': the FLOPs R registers add over R=0 (counted, not timed); empty at R=0."""
    pct_ = row.get("flop_overhead_pct")
    return f"+{pct_:.1f}%" if row.get("R") and pct_ is not None else ""


def _own_noise(row: dict) -> list[str]:
    """What made a row noisy besides other processes: its spread, its warm-up."""
    parts = []
    if row.get("spread_pct", 0) > NOISY_SPREAD_PCT:
        parts.append(f"spread {row['spread_pct']:.0f}%")
    if row.get("warmup_stable") is False:
        parts.append("warm-up unstable")
    return parts


def noise_cell(row: dict) -> str:
    """'noisy: spread 23%, others 40% CPU', the error, or nothing (the JSON row has the full reasons)."""
    if row.get("error"):
        return row["error"][:80]
    if not row.get("noisy"):
        return ""
    parts = _own_noise(row)
    if (row.get("foreign_cpu_pct") or 0) > NOISY_FOREIGN_CPU_PCT:
        parts.append(f"others {row['foreign_cpu_pct']:.0f}% CPU")
    return "noisy: " + ", ".join(parts)


def rss_cell(row: dict) -> str:
    """'388 (+13.2)': the process's resident peak and what the call added, in MiB."""
    if row.get("peak_rss_mb") is None:
        return ""
    return f"{row['peak_rss_mb']:.0f} (+{row['peak_rss_call_mb']:.1f})"


def table(title: str, display: list[dict]) -> list[Table]:
    """One table of display rows (column name -> cell), none when there are no rows."""
    return [Table(title, list(display[0]), display)] if display else []


# sentences


def where(env: dict) -> str:
    """'this CPU (AMD EPYC, 2 threads)' or 'this GPU (NVIDIA H200)'."""
    if env.get("device") == "cuda":
        return f"this GPU ({env.get('device_name')})"
    return f"this CPU ({env.get('processor')}, {env.get('cpu_threads')} threads)"


def noise_reasons(rows: Sequence[dict]) -> str | None:
    """Why the rows a comparison pairs are noisy ('other processes took 69% of the CPUs;
    eager: spread 106%'), None when none is."""
    noisy = [r for r in rows if r.get("noisy")]
    if not noisy:
        return None
    parts = []
    foreign = max(r.get("foreign_cpu_pct") or 0.0 for r in noisy)
    if foreign > NOISY_FOREIGN_CPU_PCT:
        parts.append(f"other processes took {foreign:.0f}% of the CPUs")
    by_r = len({r.get("R") for r in rows}) > 1
    for r in noisy:
        if own := _own_noise(r):
            label = f"{r.get('provider')} at R={r.get('R')}" if by_r else str(r.get("provider"))
            parts.append(f"{label}: {', '.join(own)}")
    return "; ".join(parts) or "noisy"


def ratio_noise(row: dict, prefix: str) -> str | None:
    """Why the comparison ``prefix`` of a row is not measurable (its rows are noisy), or None.
    Rows written before the bench recorded it per comparison fall back on the row's own flag."""
    if f"{prefix}_noise" in row:
        return row[f"{prefix}_noise"]
    return noise_reasons([row])


def _no_finding(row: dict, prefix: str, span: str) -> str | None:
    """'not measurable here (why)' when a row the comparison pairs is noisy, 'within noise
    (p20-p80 <span>)' when its range holds 1x, else None: the comparison is a finding."""
    if noise := ratio_noise(row, prefix):
        return f"not measurable here ({noise})"
    if row.get(f"{prefix}_within_noise"):
        return f"within noise (p20-p80 {span})"
    return None


def faster_sentence(name: str, row: dict, baseline: str, prefix: str = "speedup") -> str:
    """'dsr is 1.32x faster than torch_sdpa_cat (p20-p80 1.28x-1.35x)', or 'dsr against
    torch_sdpa_cat: within noise (...)' / 'not measurable here (why)'."""
    value, lo, hi = ratio_of(row, prefix)
    if verdict := _no_finding(row, prefix, f"{lo:.2f}x-{hi:.2f}x"):
        return f"{name} against {baseline}: {verdict}"
    if value >= 1:
        return f"{name} is {value:.2f}x faster than {baseline} (p20-p80 {lo:.2f}x-{hi:.2f}x)"
    return f"{name} is {1 / value:.2f}x slower than {baseline} (p20-p80 {1 / hi:.2f}x-{1 / lo:.2f}x)"


def overhead_clause(row: dict, prefix: str) -> str:
    """'+11.8% [+9.8%, +13.9%]', 'within noise (p20-p80 -3.0% to +4.0%)', or 'not measurable here (why)'."""
    value, lo, hi = ratio_of(row, prefix)
    return _no_finding(row, prefix, f"{pct(lo)} to {pct(hi)}") or f"{pct(value)} [{pct(lo)}, {pct(hi)}]"


def latency_cost_line(what: str, row: dict, env: dict) -> str:
    """A summary line: '<what>; the latency they add on <this device>: <row's latency overhead clause>.'
    (what: the extra work, 'DiT-S/2 fwd, fused: 36 registers add 5.2% FLOPs')."""
    return f"{what}; the latency they add on {where(env)}: {overhead_clause(row, 'latency_overhead')}."


def reliability(rows: Sequence[dict], env: dict) -> list[str]:
    """The summary's opening when its timings are not to be trusted: other processes held the
    CPUs (over the run, or during a measurement), or most timed rows are noisy."""
    timed = [r for r in rows if "median_ms" in r]
    if not timed:
        return []
    noisy = sum(1 for r in timed if r.get("noisy"))
    during = max(r.get("foreign_cpu_pct") or 0.0 for r in timed)
    overall = env.get("foreign_cpu_pct")
    loaded = max(during, overall or 0.0) > NOISY_FOREIGN_CPU_PCT
    if not loaded and 2 * noisy <= len(timed):
        return []
    why = []
    if loaded:
        shares = [f"{overall:.0f}% of them over the run"] if overall is not None else []
        if during:
            shares.append(f"up to {during:.0f}% during one measurement")
        load, cpus = env.get("load_average"), env.get("cpu_count")
        if load and cpus and load > cpus:
            shares.append(f"load average {load:.0f} on {cpus} CPUs")
        why.append(f"other processes held the CPUs ({', '.join(shares)})")
    why.append(f"{noisy} of {len(timed)} timed rows are noisy")
    return [
        f"Timings not reliable here: {' and '.join(why)}. A comparison on a noisy row reads "
        '"not measurable here" and gives no direction; rerun on an idle machine for findings.'
    ]


def closing_summary(sections: Sequence, rows: list[dict], env: dict) -> list[str]:
    """The run's conclusions: the reliability warning first (if any), each section's
    sentences, then what was noisy, could not run, or failed."""
    lines = reliability(rows, env)
    for section in sections:
        lines += section.summary([r for r in rows if r.get("section") == section.name and not r.get("case_error")], env)
    timed = [r for r in rows if "median_ms" in r]
    noisy = sum(1 for r in timed if r.get("noisy"))
    errors = sum(1 for r in rows if r.get("error") and r.get("section") != "selfcheck" and not r.get("case_error"))
    crashed = sum(1 for r in rows if r.get("case_error"))
    if noisy:
        lines.append(
            f"{noisy} of {len(timed)} timed rows were noisy (see their note); their comparisons read "
            '"not measurable here", and those whose p20-p80 includes 1x "within noise"'
        )
    if errors:
        lines.append(f"{errors} provider(s) could not run a shape; their rows carry the error")
    if crashed:
        lines.append(f"{crashed} measurement(s) failed as a whole (above, and in results.json)")
    return lines


# the console


def print_header(console, env: dict, cfg, chosen: Sequence, cases: Sequence, folder: Path) -> None:
    where_ = env["device_name"]
    if cfg.device.type == "cpu":
        where_ += f", {env['cpu_threads']} threads, C++ kernels for {env['cpu_kernels_isa'] or 'no extension'}"
    else:
        where_ += f", compute capability {env['compute_capability']}"
    console.print(f"dsr-kernels bench on {cfg.device.type} ({where_})")
    console.print(
        f"torch {env['torch']}, triton {env['triton']}, dsr-kernels {env['dsr_kernels']} "
        f"(commit {env['git_commit'] or 'unknown'}), {cfg.dtype}, preset {cfg.preset}"
    )
    console.print(
        f"{len(cases)} measurements in sections {', '.join(s.name for s in chosen)}; "
        f"each provider warmed up until stable, repeats interleaved across providers; "
        f"rows whose p20-p80 spread exceeds {NOISY_SPREAD_PCT:.0f}% or during which other processes took over "
        f"{NOISY_FOREIGN_CPU_PCT:.0f}% of the CPUs are marked noisy"
    )
    console.print(f"results go to {folder}/\n")


def _print_table(console, t: Table) -> None:
    from rich import box
    from rich.table import Table as RichTable

    out = RichTable(title=t.title, box=box.SIMPLE_HEAD, title_justify="left", show_lines=False)
    for col in t.columns:
        out.add_column(col, overflow="fold")
    for r in t.rows:
        out.add_row(*(str(r.get(c, "")) for c in t.columns))
    console.print(out)


def print_report(console, env: dict, chosen: Sequence, rows: list[dict], folder: Path) -> None:
    """Each section's failures, tables, notes and plots, then the closing summary."""
    for section in chosen:
        mine = [r for r in rows if r.get("section") == section.name]
        for r in mine:
            if r.get("case_error"):
                console.print(f"{r['shape']}: FAILED: {r['error']}")
        measured = [r for r in mine if not r.get("case_error")]
        if not measured:
            continue
        for t in section.tables(measured, env):
            _print_table(console, t)
        for note in section.notes:
            console.print(f"  ({section.name}: {note})")
        try:
            for path in section.plots(measured, env, folder):
                console.print(f"  plot: {path}")
        except Exception as exc:  # a plot that fails does not lose the measurements
            console.print(f"  ({section.name}: plotting failed: {type(exc).__name__}: {exc})")
    console.print("\nSummary")
    for line in closing_summary(chosen, rows, env):
        console.print(f"- {line}")


def _key(r: dict) -> tuple:
    return (r.get("section"), r.get("shape"), r.get("provider"), r.get("mode"), r.get("R"), r.get("dtype"))


def print_compare(console, previous: dict, rows: list[dict]) -> None:
    """Each row's median against the same row of an earlier run; slower or faster only
    when the two p20-p80 intervals do not overlap."""
    old = {_key(r): r for r in previous["rows"] if "median_ms" in r}
    env = previous.get("environment", {})
    columns = ("section", "shape", "R", "mode", "provider", "then ms", "now ms", "now / then", "verdict")
    display = []
    regressions = 0
    for r in rows:
        o = old.get(_key(r))
        if o is None or "median_ms" not in r:
            continue
        if r["p20_ms"] > o["p80_ms"]:
            verdict = "slower (regression)"
            regressions += 1
        elif r["p80_ms"] < o["p20_ms"]:
            verdict = "faster"
        else:
            verdict = "within noise"
        cells = (r["section"], r.get("shape"), r.get("R", ""), r.get("mode", ""), r["provider"])
        cells += (f"{o['median_ms']:.3g}", f"{r['median_ms']:.3g}", f"{r['median_ms'] / o['median_ms']:.2f}x", verdict)
        display.append(dict(zip(columns, map(str, cells), strict=True)))
    title = f"against {env.get('date', 'the previous run')} ({env.get('device_name', '?')}): time now / time then"
    _print_table(console, Table(title, columns, display))
    console.print(f"compared {len(display)} rows; {regressions} slower beyond the noise")
