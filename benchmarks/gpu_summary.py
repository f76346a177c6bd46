"""Merge a gpu_check.sh run into one JSON and print the short table the lease ends with.

python benchmarks/gpu_summary.py OUT_DIR
"""

import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path


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
    for path in sorted(runs.rglob("*.json")):
        benches[str(path.relative_to(runs).with_suffix(""))] = json.loads(path.read_text())
    summary = {"ceilings": ceilings, "gpu_tests": tests, "benchmarks": benches}
    (out / "gpu_check.json").write_text(json.dumps(summary, indent=1) + "\n")

    print(f"gpu tests: {tests}")
    print(f"ceilings: {ceilings}")
    peak = ceilings.get("bf16_matmul_tflops")
    bw = ceilings.get("copy_tb_per_s")
    for name, data in benches.items():
        print(f"\n{name} ({data['environment']['device_name']})")
        for r in data["rows"]:
            if "median_ms" not in r:
                print(f"  {r['shape']:<12} {r['mode']:<4} {r['provider']:<18} ERROR {r.get('error', '')[:80]}")
                continue
            if r.get("op") == "encoder":
                overhead = r.get("latency_overhead_pct")
                text = (
                    "baseline"
                    if overhead is None
                    else f"{overhead:+.2f}% [{r['overhead_p20_pct']:+.2f}, {r['overhead_p80_pct']:+.2f}]"
                )
                print(
                    f"  {r['shape']:<40} {r['provider']:<20} {r['median_ms']:9.3f} ms  "
                    f"tokens +{r['token_overhead_pct']:.2f}%  latency {text}"
                )
                continue
            if "tflops" in r:
                rate = f"{r['tflops']:7.1f} TFLOP/s" + (f" ({r['tflops'] / peak:.1%} of matmul)" if peak else "")
            elif "gb_per_s" in r:
                rate = f"{r['gb_per_s']:7.0f} GB/s" + (f" ({r['gb_per_s'] / 1e3 / bw:.1%} of copy)" if bw else "")
            else:  # whole models: register overheads
                rate = (
                    f"R={r.get('R')} flops x{r.get('flop_overhead', 1):.3f} latency x{r.get('latency_overhead', 1):.3f}"
                )
            print(
                f"  {r['shape']:<24} {r['mode']:<4} {r['provider']:<18} {r['median_ms']:9.3f} ms {rate}  "
                f"x{r.get('speedup_vs_baseline') or 0:.2f} vs baseline  {r.get('peak_mem_mb', 0):9.1f} MiB"
            )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
