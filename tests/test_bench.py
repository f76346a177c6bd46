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

from dsr_kernels.benchmark import common
from dsr_kernels.benchmark.run import load_previous, run_folder, write_files
from dsr_kernels.benchmark.section import BenchConfig, Case, Section, Table, speedup_cell
from dsr_kernels.cli import main


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

    from dsr_kernels.benchmark.run import _compare

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
    _compare(Console(width=200, markup=False), load_previous(path), new_rows)
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
    assert speedup_cell({**faster, "provider": "x"}) == f"{faster['speedup']:.2f}x"
    same = common.speedup_fields([10.0, 9.0, 11.0, 10.0, 10.5], [10.0, 10.0, 10.0, 10.0, 10.0], "base")
    assert same["speedup_within_noise"] and speedup_cell({**same, "provider": "x"}).endswith("(noise)")


def test_cpu_load_measures_other_processes():
    load = common.CpuLoad()
    with contextlib.suppress(Exception):
        sum(range(10**6))
    pct = load.stop()
    if Path("/proc/stat").exists():
        assert pct is not None and 0.0 <= pct <= 100.0
    else:
        assert pct is None


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
