"""``dsr-kernels``: the command line.

dsr-kernels bench               # attention and norm_modulate on the current device, defaults
dsr-kernels bench --op encoder  # what (recursive) test-time registers cost a ViT encoder
dsr-kernels bench --help   # shapes, providers, modes, output folder
dsr-kernels info           # versions and which backend runs where, and why not
"""

from __future__ import annotations

import argparse
import datetime as _dt
import sys

import torch


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _bench(args: argparse.Namespace) -> int:
    from dsr_kernels.benchmark import attention, encoder, models, norm_modulate
    from dsr_kernels.benchmark.common import write_results

    suites = {"attention": attention, "norm_modulate": norm_modulate, "models": models, "encoder": encoder}
    ops = {"kernels": ["attention", "norm_modulate"], "all": list(suites)}.get(args.op, [args.op])
    device = _device(args.device)
    dtype = {
        "auto": torch.bfloat16 if device.type == "cuda" else torch.float32,
        "float32": torch.float32,
        "bfloat16": torch.bfloat16,
        "float16": torch.float16,
    }[args.dtype]
    names = [n.strip() for n in args.shapes.split(",") if n.strip()] if args.shapes else None
    if args.shape and len(ops) != 1:
        raise SystemExit("dsr-kernels bench: --shape needs one --op (attention: B,H,N,D,R; norm_modulate: B,N,D,R)")
    if args.shape and ops[0] in ("models", "encoder"):
        raise SystemExit(f"dsr-kernels bench: --op {ops[0]} takes model names with --shapes, not --shape")
    known = {s.name for op in ops for s in suites[op].default_shapes(device)}
    if names and set(names) - known:
        raise SystemExit(f"dsr-kernels bench: unknown shape(s) {sorted(set(names) - known)}; known: {sorted(known)}")
    modes = args.modes.split(",") if args.modes else None
    for op in ops:
        suite = suites[op]
        if modes is None:
            op_modes = list(suite.MODES)
        else:
            op_modes = [m for m in modes if m in suite.MODES] if len(ops) > 1 else modes
        bad = [m for m in op_modes if m not in suite.MODES]
        if bad:
            raise SystemExit(f"dsr-kernels bench: unknown mode(s) {bad}; expected some of {suite.MODES}")
        shapes = [s for s in suite.default_shapes(device) if names is None or s.name in names]
        shapes += [_custom_shape(suite, spec) for spec in args.shape]
        if args.shape and names is None:
            shapes = shapes[len(suite.default_shapes(device)) :]
        if not shapes:
            continue
        providers = args.providers.split(",") if args.providers else None
        extra = {"registers": [int(r) for r in args.registers.split(",")]} if op == "models" and args.registers else {}
        print(f"dsr-kernels bench: {op} on {device} ({dtype}), {len(shapes)} shapes, modes {op_modes}", flush=True)
        env, rows = suite.run(
            device=device,
            dtype=dtype,
            shapes=shapes,
            providers=providers,
            modes=op_modes,
            memory=not args.no_memory,
            budget_s=args.budget,
            log=lambda line: print(line, flush=True),
            **extra,
        )
        suite.print_report(env, rows)
        json_path, csv_path = write_results(args.out, f"{op}-{_dt.date.today().isoformat()}-{device.type}", env, rows)
        print(f"\nwrote {json_path} and {csv_path}\n", flush=True)
    return 0


def _custom_shape(suite, spec: str):
    parts = spec.split(",")
    fields = [f for f in suite.default_shapes(torch.device("cpu"))[0].__dataclass_fields__ if f not in ("name", "kind")]
    if len(parts) != len(fields) or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise SystemExit(f"dsr-kernels bench: --shape expects {','.join(fields)} (positive integers), got {spec!r}")
    values = dict(zip(fields, (int(p) for p in parts), strict=True))
    name = "".join(f"{k}{v}" for k, v in values.items())
    return type(suite.default_shapes(torch.device("cpu"))[0])(name=name, **values)


def _info(_: argparse.Namespace) -> int:
    import dsr_kernels
    from dsr_kernels.benchmark.common import environment

    device = _device("auto")
    for key, value in environment(device).items():
        print(f"{key:>16}: {value}")
    from dsr_kernels._extension import _C

    print(f"{'cpu kernels isa':>16}: {_C.cpu_capability() if _C is not None else 'extension not built'}")
    for dev in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
        for op in ("attention", "norm_modulate", "ttr_activation"):
            for backend, reason in dsr_kernels.explain(op, dev).items():
                print(f"{op}[{dev}] {backend:>9}: {reason}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="dsr-kernels", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)

    b = sub.add_parser("bench", help="what registers and statistics cost, against PyTorch, on this device")
    b.add_argument(
        "--op",
        default="kernels",
        choices=["kernels", "all", "attention", "norm_modulate", "models", "encoder"],
        help="kernels (default): attention and norm_modulate; models: whole denoisers with registers; "
        "encoder: ViT encoders with trained, test-time and recursive test-time registers; all",
    )
    b.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda")
    b.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="auto: bfloat16 on CUDA, float32 on CPU",
    )
    b.add_argument("--shapes", default=None, help="comma-separated default shape names (all when omitted)")
    b.add_argument(
        "--shape",
        action="append",
        default=[],
        metavar="SPEC",
        help="a custom shape (repeatable, one --op): attention B,H,N,D,R; norm_modulate B,N,D,R",
    )
    b.add_argument("--providers", default=None, help="comma-separated providers (default: all available)")
    b.add_argument(
        "--modes",
        default=None,
        help="comma-separated from fwd,bwd,full (attention, norm_modulate) and fwd,train (models); "
        "default: all of the op's modes",
    )
    b.add_argument("--registers", default=None, help="models: comma-separated register counts (default 0,4,16,36,64)")
    b.add_argument("--budget", type=float, default=1.0, help="seconds of repetitions per measurement")
    b.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    b.add_argument("--out", default="dsr-bench-results", help="folder for the JSON and CSV results")
    b.set_defaults(func=_bench)

    i = sub.add_parser("info", help="versions, devices and backend availability")
    i.set_defaults(func=_info)

    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
