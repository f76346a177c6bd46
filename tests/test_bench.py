"""``dsr-kernels bench``: the main job end to end, its input checks, its files, and the timing helper."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dsr_kernels.benchmark import common, report
from dsr_kernels.benchmark.run import load_previous, run_folder, write_files
from dsr_kernels.benchmark.section import BenchConfig, Case, Section, Table
from dsr_kernels.cli import main

CPU = BenchConfig(device=torch.device("cpu"), dtype=torch.float32, preset="quick", memory=False)


def _bench(*args: str, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # as a user runs it
    return subprocess.run(
        [sys.executable, "-m", "dsr_kernels", "bench", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_bench_quick_end_to_end_writes_a_new_folder_each_run(tmp_path):
    out = tmp_path / "results"
    first = _bench("--quick", "--out", str(out), cwd=tmp_path)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    text = first.stdout
    assert "dsr-kernels bench on cpu" in text and "threads" in text  # header: device, processor, threads
    assert "[1 of " in text and "ETA" in text  # progress: n of total and an ETA
    words = " ".join(text.split())  # rich wraps long headers and titles
    assert "x faster than" in words and "speed-up against torch_sdpa_cat" in words  # baseline named, one direction
    assert "Summary" in text and "Self-check:" in text
    folders = [p for p in out.iterdir() if p.is_dir() and not p.is_symlink()]
    assert len(folders) == 1
    run = folders[0]
    assert run.name.endswith("-cpu")
    assert (out / "latest").resolve() == run.resolve()
    data = json.loads((run / "results.json").read_text())
    assert data["complete"] is True
    env = data["environment"]
    for key in ("device", "processor", "cpu_threads", "torch", "git_commit", "date", "dtype"):
        assert key in env
    rows = data["rows"]
    sections = {r["section"] for r in rows}
    assert sections == {"selfcheck", "attention", "norm_modulate", "models", "encoder", "dropin"}
    assert all(r["status"] in ("pass", "unavailable") for r in rows if r["section"] == "selfcheck")
    timed = [r for r in rows if "median_ms" in r]
    assert timed
    for r in timed:
        assert r["p20_ms"] <= r["median_ms"] <= r["p80_ms"]
        assert isinstance(r["noisy"], bool) and r["reps"] >= 5
    assert any(r.get("speedup") for r in timed) and any(r.get("baseline") for r in timed)
    assert (run / "results.csv").read_text().count("\n") == len(rows) + 1
    pngs = sorted(p.name for p in run.glob("*.png"))
    assert pngs, "no plot written"
    before = (run / "results.json").read_bytes()

    second = _bench("--quick", "--section", "norm_modulate", "--out", str(out), cwd=tmp_path)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    folders = sorted(p for p in out.iterdir() if p.is_dir() and not p.is_symlink())
    assert len(folders) == 2
    assert (run / "results.json").read_bytes() == before  # the first run is untouched
    assert (out / "latest").resolve() != run.resolve()


@pytest.mark.parametrize(
    "args, words",
    [
        (["--providers", "nope"], ["unknown provider 'nope'", "torch_sdpa_cat"]),
        (["--section", "nope"], ["unknown section 'nope'", "attention"]),
        (["--op", "nope"], ["unknown section 'nope'"]),
        (["--shapes", "nope"], ["unknown shape or model 'nope'", "dsr-dit-xl"]),
        (["--section", "models", "--shapes", "DiT-Q/2"], ["unknown shape or model 'DiT-Q/2'", "LightningDiT-S/1"]),
        (["--registers", "-1"], ["R must be >= 0"]),
        (["--registers", "x"], ["'x' is not an integer"]),
        (["--modes", "sideways"], ["unknown mode 'sideways'", "fwd"]),
        (["--compare", "missing.json"], ["--compare missing.json: cannot read it"]),
        (["--device", "tpu"], ["unknown device 'tpu'", "cpu"]),
        (["--section", "models", "--providers", "dsr"], ["unknown provider 'dsr' for sections models", "fused"]),
        (["--section", "norm_modulate", "--registers", "3"], ["--registers applies to sections attention, models"]),
        (["--section", "attention,models", "--modes", "bwd", "--shapes", "DiT-S/2"], ["select nothing to measure"]),
    ],
)
def test_bad_input_is_one_line_exit_2_and_nothing_written(tmp_path, capsys, args, words):
    out = tmp_path / "never"
    code = main(["bench", "--out", str(out), *args])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("dsr-kernels bench: error: ") and err.count("\n") == 1, err
    for w in words:
        assert w in err
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_cuda_is_a_clear_error(tmp_path, capsys):
    assert main(["bench", "--device", "cuda", "--out", str(tmp_path / "x")]) == 2
    assert "--device cuda: not available here" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_unwritable_out_is_a_clear_error(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["bench", "--out", str(blocker / "sub")]) == 2
    assert "is not a writable folder" in capsys.readouterr().err


def test_run_folders_never_collide(tmp_path):
    now = dt.datetime(2026, 11, 28, 12, 0, 0)
    a, b = run_folder(tmp_path, "cpu", now), run_folder(tmp_path, "cpu", now)
    assert a.name == "2026-11-28-120000-cpu" and b.name == "2026-11-28-120000-cpu-2"


class _FakeSection(Section):
    """Two cases; the second one is interrupted by Ctrl-C."""

    def __init__(self, crash_only: bool = False):
        super().__init__(name="fake", title="fake", baseline="base", mode_names=("fwd",))
        self.crash_only = crash_only

    def providers(self, device):
        return ["base"]

    def shape_names(self):
        return ["s"]

    def cases(self, cfg):
        def interrupted():
            raise KeyboardInterrupt

        def crashes():
            raise MemoryError("out of memory")

        row = {"section": "fake", "shape": "s", "provider": "base", "median_ms": 1.0, "p20_ms": 1.0, "p80_ms": 1.0}
        if self.crash_only:
            return [Case("fake", "crashes", crashes), Case("fake", "first", lambda: [row])]
        return [Case("fake", "first", lambda: [row]), Case("fake", "second", interrupted)]

    def tables(self, rows, env):
        return [Table("t", ["provider"], rows)]


def test_ctrl_c_writes_the_rows_gathered_so_far(tmp_path, monkeypatch):
    from dsr_kernels.benchmark import run as run_module

    monkeypatch.setattr(run_module, "sections", lambda: {"fake": _FakeSection()})
    cfg = BenchConfig(device=torch.device("cpu"), dtype=torch.float32)
    code = run_module.run(cfg, ["fake"], out=tmp_path)
    assert code == 130
    data = json.loads((tmp_path / "latest" / "results.json").read_text())
    assert data["complete"] is False and [r["provider"] for r in data["rows"]] == ["base"]


def test_a_case_that_crashes_is_a_row_and_the_others_still_run(tmp_path, monkeypatch, capsys):
    from dsr_kernels.benchmark import run as run_module

    monkeypatch.setattr(run_module, "sections", lambda: {"fake": _FakeSection(crash_only=True)})
    cfg = BenchConfig(device=torch.device("cpu"), dtype=torch.float32)
    assert run_module.run(cfg, ["fake"], out=tmp_path) == 1
    rows = json.loads((tmp_path / "latest" / "results.json").read_text())["rows"]
    assert rows[0]["case_error"] and "MemoryError: out of memory" in rows[0]["error"]
    assert rows[1]["provider"] == "base"
    assert "crashes: FAILED: MemoryError" in capsys.readouterr().out


def test_compare_flags_only_differences_beyond_the_noise(tmp_path, capsys):
    from rich.console import Console

    def row(provider, median, p20, p80):
        return {
            "section": "s",
            "shape": "x",
            "provider": provider,
            "mode": "fwd",
            "R": 0,
            "dtype": "float32",
            "median_ms": median,
            "p20_ms": p20,
            "p80_ms": p80,
        }

    old_rows = [row("a", 10, 9.5, 10.5), row("b", 10, 9.5, 10.5), row("c", 10, 9.5, 10.5)]
    path = tmp_path / "old.json"
    write_files(tmp_path, {"date": "then"}, old_rows, complete=True)
    (tmp_path / "results.json").rename(path)
    new_rows = [row("a", 13, 12.5, 13.5), row("b", 10.2, 9.8, 10.9), row("c", 8, 7.5, 8.5)]
    report.print_compare(Console(width=200, markup=False), load_previous(path), new_rows)
    out = capsys.readouterr().out
    lines = {line.split()[4]: line for line in out.splitlines() if line.strip().startswith("s ")}
    assert "regression" in lines["a"] and "within noise" in lines["b"] and "faster" in lines["c"]
    assert "1 slower beyond the noise" in out


def test_time_interleaved_warms_until_stable_and_interleaves_rounds():
    import time

    calls: list[str] = []
    cold = {"a": [0.05, 0.02, 0.008]}  # a's first calls are slow, each less so: none may be timed

    def make(name):
        def fn():
            calls.append(name)
            time.sleep(cold[name].pop(0) if cold.get(name) else 0.002)

        return fn

    timing = common.time_interleaved(
        {"a": make("a"), "b": make("b")}, torch.device("cpu"), budget_s=1.0, min_reps=6, max_reps=6, tolerance=0.5
    )
    # 50, 20, 8, 2, 2 ms: no two successive calls agree within 50% before the 4th and 5th,
    # so the slow calls were all spent in the warm-up, none timed
    assert timing.warmup_calls["a"] >= 5 and timing.stable["a"]
    assert len(timing.times["a"]) == len(timing.times["b"]) == 6
    rounds = calls[-12:]
    assert all(sorted(rounds[2 * i : 2 * i + 2]) == ["a", "b"] for i in range(6))  # one call of each per round


def test_noisy_flag_and_reasons():
    timing = common.Timing(
        times={"steady": [10.0] * 10, "jumpy": [10.0, 10, 10, 14, 14, 14, 10, 14, 10, 14]},
        warmup_calls={"steady": 2, "jumpy": 12},
        stable={"steady": True, "jumpy": False},
        foreign_cpu_pct=2.0,
        seconds=1.0,
    )
    steady, jumpy = common.timing_fields(timing, "steady"), common.timing_fields(timing, "jumpy")
    assert steady["noisy"] is False and steady["noise"] is None
    assert jumpy["noisy"] is True and "spread" in jumpy["noise"] and "warm-up" in jumpy["noise"]
    busy = common.Timing({"x": [10.0] * 5}, {"x": 2}, {"x": True}, foreign_cpu_pct=35.0, seconds=1.0)
    assert "other processes took 35%" in common.timing_fields(busy, "x")["noise"]


def test_speedup_direction_and_noise():
    faster = common.speedup_fields([5.0, 5.1, 4.9, 5.0, 5.0], [10.0, 10.2, 9.8, 10.0, 10.1], "base")
    assert faster["speedup"] == pytest.approx(2.0, rel=0.03) and not faster["speedup_within_noise"]
    assert report.speedup_cell({**faster, "provider": "x"}) == f"{faster['speedup']:.2f}x"
    same = common.speedup_fields([10.0, 9.0, 11.0, 10.0, 10.5], [10.0, 10.0, 10.0, 10.0, 10.0], "base")
    assert same["speedup_within_noise"] and report.speedup_cell({**same, "provider": "x"}).endswith("(noise)")


def test_cpu_load_measures_other_processes():
    load = common.CpuLoad()
    with contextlib.suppress(Exception):
        sum(range(10**6))
    pct = load.stop()
    if Path("/proc/stat").exists():
        assert pct is not None and 0.0 <= pct <= 100.0
    else:
        assert pct is None


def _measured(monkeypatch, times: dict, foreign_cpu_pct: float = 0.0, **hooks) -> list[dict]:
    """Rows of norm_modulate's kind through the one measure routine, with the timing replaced
    by the given per-round times (no clock involved)."""
    from dsr_kernels.benchmark import measure

    timing = common.Timing(times, {p: 2 for p in times}, {p: True for p in times}, foreign_cpu_pct, 1.0)
    monkeypatch.setattr(measure, "time_interleaved", lambda fns, device, **kw: timing)
    rows = {p: {"section": "norm_modulate", "shape": "s", "mode": "fwd", "provider": p} for p in times}
    return measure.measure(rows, lambda p: lambda: None, CPU, baseline=lambda p: "eager", **hooks)


STEADY = [10.0, 10.1, 9.9, 10.0, 10.05, 9.95, 10.0, 10.1, 9.9, 10.0]
JUMPY = [10.0, 30.0, 10.0, 30.0, 11.0, 29.0, 10.0, 30.0, 12.0, 28.0]
ENV = {"device": "cpu", "processor": "a CPU", "cpu_threads": 2, "cpu_count": 2}


def test_summary_states_findings_only_for_clean_rows(monkeypatch):
    from dsr_kernels.benchmark.norm_modulate import SECTION

    clean = _measured(monkeypatch, {"eager": STEADY, "dsr": [t / 2.5 for t in STEADY]})
    (sentence,) = SECTION.summary(clean, ENV)
    assert "dsr is 2.50x faster than eager" in sentence and "noise" not in sentence
    assert report.closing_summary([SECTION], clean, ENV) == [sentence]  # nothing to warn about

    same = _measured(monkeypatch, {"eager": STEADY, "dsr": STEADY[::-1]})
    (sentence,) = SECTION.summary(same, ENV)
    assert "within noise" in sentence and "faster" not in sentence and "slower" not in sentence

    # the baseline's repeats jump by 3x: the ratio's median says 6x, its rows say noise
    noisy = _measured(monkeypatch, {"eager": JUMPY, "dsr": [t / 2.5 for t in STEADY]})
    assert noisy[1]["speedup"] > 1 and not noisy[1]["noisy"] and noisy[0]["noisy"]
    (sentence,) = SECTION.summary(noisy, ENV)
    assert "not measurable here" in sentence and "eager: spread" in sentence
    assert "faster" not in sentence and "slower" not in sentence


def test_summary_opens_with_the_load_when_other_processes_held_the_cpus(monkeypatch):
    from dsr_kernels.benchmark.norm_modulate import SECTION

    rows = _measured(monkeypatch, {"eager": STEADY, "dsr": [t / 2.5 for t in STEADY]}, foreign_cpu_pct=69.0)
    env = {**ENV, "foreign_cpu_pct": 55.0, "load_average": 138.0}
    lines = report.closing_summary([SECTION], rows, env)
    assert lines[0].startswith("Timings not reliable here: other processes held the CPUs")
    assert "55% of them over the run" in lines[0] and "up to 69%" in lines[0] and "load average 138 on 2" in lines[0]
    assert "2 of 2 timed rows are noisy" in lines[0]
    assert "not measurable here (other processes took 69% of the CPUs)" in lines[1]
    assert not any(w in line for line in lines for w in ("faster", "slower"))


def test_most_rows_noisy_opens_the_summary_even_without_load(monkeypatch):
    from dsr_kernels.benchmark.norm_modulate import SECTION

    rows = _measured(monkeypatch, {"eager": JUMPY, "dsr": JUMPY[::-1]})
    lines = report.closing_summary([SECTION], rows, ENV)
    assert lines[0].startswith("Timings not reliable here: 2 of 2 timed rows are noisy")


def test_overheads_print_their_range_not_a_plus_minus():
    row = {"x_pct": 61.0, "x_p20_pct": 1.0, "x_p80_pct": 148.0, "x_within_noise": False, "x_noise": None}
    assert report.overhead_cell(row, "x") == "+61.0% [+1.0%, +148%]"
    assert report.overhead_clause(row, "x") == "+61.0% [+1.0%, +148%]"
    assert "±" not in report.overhead_clause({**row, "x_within_noise": True}, "x")
    assert report.overhead_clause({**row, "x_noise": "dsr: spread 40%"}, "x") == "not measurable here (dsr: spread 40%)"


def test_register_overhead_of_a_noisy_row_has_no_direction(monkeypatch):
    from dsr_kernels.benchmark import measure
    from dsr_kernels.benchmark.attention import SECTION

    times = {("dsr", 0): STEADY, ("dsr", 36): [t * 0.84 for t in JUMPY], ("torch_sdpa_cat", 0): STEADY}
    times[("torch_sdpa_cat", 36)] = STEADY
    timing = common.Timing(times, {k: 2 for k in times}, {k: True for k in times}, 0.0, 1.0)
    monkeypatch.setattr(measure, "time_interleaved", lambda fns, device, **kw: timing)
    rows = {
        (p, R): {
            "section": "attention",
            "shape": "s",
            "mode": "fwd",
            "provider": p,
            "R": R,
            "flop_overhead_pct": R / 2.56,
        }
        for p, R in times
    }
    rows = measure.measure(
        rows,
        lambda key: lambda: None,
        CPU,
        baseline=lambda key: ("torch_sdpa_cat", key[1]),
        ratios=lambda key: {"register_overhead": (key, (key[0], 0))} if key[1] else {},
    )
    lines = SECTION.summary(rows, ENV)
    overhead = next(line for line in lines if "registers add" in line)
    assert "14.1% FLOPs" in overhead and "not measurable here (dsr at R=36: spread" in overhead
    assert "%  latency" not in overhead and "-" not in overhead.split("FLOPs")[1].split("(")[0]
    speed = next(line for line in lines if "torch_sdpa_cat" in line)
    assert "not measurable here" in speed and "faster" not in speed and "slower" not in speed
    (table,) = SECTION.tables(rows, {**ENV, "dtype": "float32"})
    cells = {(r["provider"], r["R"]): r for r in table.rows}
    assert cells[("dsr", "36")]["latency vs R=0"].endswith("% (noise)") and "±" not in str(table.rows)
    assert cells[("dsr", "36")]["note"].startswith("noisy: spread")


def test_measure_reports_providers_that_cannot_run_and_its_progress():
    from dsr_kernels.benchmark.measure import measure

    def build(p):
        if p == "unbuildable":
            raise RuntimeError("no kernel for this shape")
        if p == "crashes":
            return lambda: 1 / 0
        return lambda: sum(range(100))

    names = ["base", "other", "unbuildable", "crashes"]
    rows = {p: {"section": "t", "shape": "s", "mode": "fwd", "provider": p} for p in names}
    events: list[common.CaseProgress] = []
    with common.progress_to(events.append):
        out = measure(rows, build, CPU, baseline=lambda p: "base", budget_s=0.0, min_reps=3)
    by = {r["provider"]: r for r in out}
    assert by["unbuildable"]["error"] == "RuntimeError: no kernel for this shape"
    assert by["crashes"]["error"].startswith("ZeroDivisionError")
    assert by["base"]["baseline"] == "base" and by["base"]["reps"] >= 3
    assert by["other"]["baseline"] == "base" and "speedup" in by["other"] and "speedup_noise" in by["other"]
    texts = [e.text for e in events]
    assert "first call 1 of 3" in texts and any(t.startswith("warm-up 2 of 2") for t in texts)
    rounds = [e for e in events if e.text.startswith("round ")]
    assert [e.text for e in rounds[:3]] == [f"round {i} of at least 3" for i in (1, 2, 3)]
    assert all(e.left_s is not None and e.left_s >= 0 for e in rounds)


def test_progress_moves_within_a_case(capsys, monkeypatch):
    from rich.console import Console

    from dsr_kernels.benchmark import run as run_module

    now = [0.0]
    case = Case("s", "a long case", lambda: [], est_s=100.0)
    progress = run_module._Progress(Console(file=open(os.devnull, "w")), [case], clock=lambda: now[0])
    progress.begin(case)
    now[0] = 4.0
    progress.within(common.CaseProgress("warm-up 1 of 2, call 2"))  # too soon after the last line
    now[0] = 12.0
    progress.within(common.CaseProgress("round 2 of at least 5", 75.0))
    now[0] = 205.0
    progress.end(case, 205.0)
    out = capsys.readouterr().out
    assert out == "[1 of 1, ETA ?] a long case ... [12 s: round 2 of at least 5, ~1:15 left] 205.0 s\n"


class _TimedSection(_FakeSection):
    def cases(self, cfg):
        def timed():
            timing = common.time_interleaved({"base": lambda: None}, cfg.device, budget_s=0.0, min_reps=2)
            return [{"section": "fake", "shape": "s", "provider": "base", **common.timing_fields(timing, "base")}]

        return [Case("fake", "timed", timed)]


def test_the_runner_shows_the_progress_of_the_measurement(tmp_path, monkeypatch, capsys):
    from dsr_kernels.benchmark import run as run_module

    monkeypatch.setattr(run_module, "sections", lambda: {"fake": _TimedSection()})
    monkeypatch.setattr(run_module, "PLAIN_PROGRESS_EVERY_S", 0.0)
    cfg = BenchConfig(device=torch.device("cpu"), dtype=torch.float32)
    assert run_module.run(cfg, ["fake"], out=tmp_path) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("[1 of 1"))
    assert "warm-up 1 of 1, call 1" in line and "round 2 of at least 2" in line


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
def test_out_under_proc_is_one_line_and_exit_2(capsys):
    assert main(["bench", "--out", "/proc/nope", "--section", "norm_modulate"]) == 2
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and captured.out == ""
    assert captured.err.startswith("dsr-kernels bench: error: --out /proc/nope: /proc is not a writable folder")


def test_out_check_leaves_nothing_behind(tmp_path):
    from dsr_kernels.cli import _check_out

    _check_out(tmp_path / "a" / "b", "a/b")
    assert list(tmp_path.iterdir()) == []


def test_help_is_plain_text_and_lists_sections_and_shapes(capsys):
    with pytest.raises(SystemExit) as top:
        main(["--help"])
    assert top.value.code == 0
    with pytest.raises(SystemExit) as bench:
        main(["bench", "--help"])
    assert bench.value.code == 0
    out = capsys.readouterr().out
    assert "`" not in out
    for name in ("selfcheck", "attention", "norm_modulate", "models", "encoder", "dropin"):
        assert f"  {name}: " in out
    words = " ".join(out.split())
    for shape in ("dsr-dit-xl-b8", "n70000-d4", "dit-xl-layernorm", "LightningDiT-S/1", "SiT-XL/2"):
        assert shape in words
    assert "vit_base_patch16_siglip_256" in words and "diffusers-dit-xl-4l" in words


def test_valid_shape_names_are_listed_once(capsys):
    assert main(["bench", "--out", "/tmp/never-written", "--shapes", "nope"]) == 2
    valid = capsys.readouterr().err.split("valid: ", 1)[1].strip().split(", ")
    assert "dsr-dit-xl" in valid and len(valid) == len(set(valid))


def _drawn(monkeypatch, section, rows):
    """What a section's plots() passes to the plot helpers (nothing is drawn)."""
    from dsr_kernels.benchmark import plots

    calls = []
    monkeypatch.setattr(plots, "lines", lambda path, panels, **kw: calls.append((path.name, panels, kw)) or path)
    monkeypatch.setattr(plots, "row_bars", lambda path, items, **kw: calls.append((path.name, items, kw)) or path)
    section.plots(rows, {"device": "cpu", "dtype": "float32"}, Path("/nonexistent"))
    return {name: (what, kw) for name, what, kw in calls}


def test_seqlen_plot_joins_only_points_of_one_head_dim(monkeypatch):
    from dsr_kernels.benchmark.attention import SECTION

    def row(shape, N, D, ms):
        return {"shape": shape, "mode": "fwd", "R": 36, "provider": "dsr", "N": N, "D": D, "B": 1,
                "median_ms": ms, "p20_ms": ms, "p80_ms": ms, "speedup": 1.0}  # fmt: skip

    rows = [row("dsr-dit-xl", 256, 72, 1.0), row("n1024", 1024, 64, 4.0), row("n4096", 4096, 64, 40.0)]
    (panel,), _ = _drawn(monkeypatch, SECTION, rows)["attention-seqlen.png"]
    assert panel["series"]["dsr, D 72"][0] == [256]
    assert panel["series"]["dsr, D 64"][0] == [1024, 4096]


def test_dropin_plot_title_names_only_what_is_drawn(monkeypatch):
    from dsr_kernels.benchmark.dropin import SECTION

    row = {"shape": "dsr-dit-xl", "mode": "fwd", "provider": "sdpa_dropin", "speedup": 1.0}
    _, kw = _drawn(monkeypatch, SECTION, [row])["dropin-speedup.png"]
    assert "drop-ins vs the op" in kw["suptitle"] and "diffusers" not in kw["suptitle"]
    model = {**row, "shape": "diffusers-dit-xl-4l", "provider": "diffusers_dsr"}
    _, kw = _drawn(monkeypatch, SECTION, [model])["dropin-speedup.png"]
    assert "diffusers dsr vs native" in kw["suptitle"] and "drop-ins" not in kw["suptitle"]


def test_readme_results_section_is_generated_from_the_committed_runs():
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "readme_results.py"
    spec = importlib.util.spec_from_file_location("readme_results", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    runs = [p for p in module.RUNS.iterdir() if p.is_dir() and not p.is_symlink()]
    assert runs, "no committed run under benchmarks/results/runs/"
    for run in runs:
        assert (run / "results.json").exists() and (run / "results.csv").exists() and list(run.glob("*.png"))
    assert module.main(["--check"]) == 0, "benchmarks/results/RESULTS.md is stale: python benchmarks/readme_results.py"
