"""Merge a gpu_check.sh run into one JSON and print the short table the lease ends with.

python benchmarks/gpu_summary.py RUNS_DIR OUT_DIR
"""

import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

from dsr_kernels.benchmark import report


def _line(r: dict, peak: float | None, bw: float | None) -> str:
    where = (
        f"{r.get('section', ''):<13} {str(r.get('shape', '')):<32} {str(r.get('mode', '')):<5} R={r.get('R', '-')!s:<3}"
    )
    where += f" {r.get('provider', ''):<20}"
    if r.get("section") == "selfcheck":
        return f"  {where} {r.get('status')} {r.get('reason') or r.get('error') or ''}"[:200]
    if "median_ms" not in r:
        return f"  {where} ERROR {str(r.get('error', ''))[:80]}"
    text = f"  {where} {r['median_ms']:9.3f} ms [{r['p20_ms']:.3f}, {r['p80_ms']:.3f}]"
    if r.get("tflops") is not None:
        text += f" {r['tflops']:7.1f} TFLOP/s" + (f" ({r['tflops'] / peak:.1%} of matmul)" if peak else "")
    if r.get("gb_per_s") is not None:
        text += f" {r['gb_per_s']:7.0f} GB/s" + (f" ({r['gb_per_s'] / 1e3 / bw:.1%} of copy)" if bw else "")
    if r.get("speedup") is not None:  # a direction only where the rows are not noisy (report.py)
        text += f"  {report.faster_sentence(r['provider'], r, r['baseline'])}"
    for key in ("register_overhead", "latency_overhead"):
        if r.get(f"{key}_pct") is not None:
            text += f"  {key.split('_')[0]} overhead {report.overhead_clause(r, key)}"
    if r.get("flop_overhead_pct"):
        text += f" (FLOPs +{r['flop_overhead_pct']:.1f}%)"
    if r.get("noisy"):
        text += "  NOISY"
    return text


def main(runs_dir: str, out_dir: str) -> None:
    runs, out = Path(runs_dir), Path(out_dir)
    ceilings = json.loads((out / "ceilings.json").read_text()) if (out / "ceilings.json").exists() else {}
    tests = {}
    junit = out / "gpu-tests.xml"
    if junit.exists():
        suite = ET.parse(junit).getroot()
        suite = suite.find("testsuite") if suite.tag == "testsuites" else suite
        tests = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    benches = {}
    for path in sorted(runs.rglob("results.json")):
        if path.parent.is_symlink():
            continue
        benches[str(path.parent.relative_to(runs))] = json.loads(path.read_text())
    summary = {"ceilings": ceilings, "gpu_tests": tests, "benchmarks": benches}
    (out / "gpu_check.json").write_text(json.dumps(summary, indent=1) + "\n")

    print(f"gpu tests: {tests}")
    print(f"ceilings: {ceilings}")
    peak, bw = ceilings.get("bf16_matmul_tflops"), ceilings.get("copy_tb_per_s")
    for name, data in benches.items():
        env = data["environment"]
        print(f"\n{name} ({env['device_name']}, {env.get('command')})")
        for r in data["rows"]:
            print(_line(r, peak, bw))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
