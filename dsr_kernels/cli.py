"""dsr-kernels: the command line.

dsr-kernels bench                     # every section on this device: what registers cost here
dsr-kernels bench --quick             # the same in at most 90 s on a 2-core CPU
dsr-kernels bench --section encoder   # what (recursive) test-time registers cost a ViT encoder
dsr-kernels bench --section scaling   # what R registers cost from DiT-S to 4B parameters
dsr-kernels bench --section video     # video attention at 16k-32k tokens, video DiTs with registers
dsr-kernels bench --help              # sections, shapes, providers, registers, output folder
dsr-kernels info                      # versions, the extension, and which backend runs where, and why not
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import textwrap
from pathlib import Path

import torch

SECTION_ALIASES = {"kernels": ("attention", "norm_modulate"), "all": None}


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose epilog may be a function, called only when help is printed
    (listing the bench's sections imports them all: seconds)."""

    def format_help(self) -> str:
        if callable(self.epilog):
            self.epilog = self.epilog()
        return super().format_help()


class UsageError(Exception):
    """Bad input to ``bench``: one line naming the bad value and the valid ones, exit code 2."""


def _split(text: str | None) -> list[str] | None:
    if text is None:
        return None
    return [v.strip() for v in text.split(",") if v.strip()]


def _bench_config(args: argparse.Namespace):
    """Checks every option against what the selected sections know, before anything runs or is written."""
    from dsr_kernels.benchmark.run import load_previous, sections
    from dsr_kernels.benchmark.section import BenchConfig

    known = sections()
    selected: list[str] = []
    for name in _split(args.section) or [n for n, s in known.items() if s.main_job]:
        if name in SECTION_ALIASES:
            selected += SECTION_ALIASES[name] or list(known)
        elif name in known:
            selected.append(name)
        else:
            raise UsageError(f"unknown section {name!r}; valid: {', '.join(list(known) + list(SECTION_ALIASES))}")
    selected = list(dict.fromkeys(selected))

    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    elif args.device == "cpu":
        device = torch.device("cpu")
    elif args.device in ("cuda", "gpu") or args.device.startswith("cuda:"):
        if not torch.cuda.is_available():
            why = "this torch is built without CUDA" if torch.version.cuda is None else "no CUDA device is visible"
            raise UsageError(f"--device {args.device}: not available here ({why}); valid: auto, cpu")
        device = torch.device("cuda" if args.device == "gpu" else args.device)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {args.device}: only {torch.cuda.device_count()} CUDA device(s)")
    else:
        raise UsageError(f"unknown device {args.device!r}; valid: auto, cpu, cuda, cuda:N")

    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if args.dtype == "auto":
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    else:
        dtype = dtypes[args.dtype]

    chosen = [known[n] for n in selected]
    providers = _split(args.providers)
    if providers is not None:
        everywhere = sorted({p for s in chosen for p in s.all_providers()})
        here = {p for s in chosen for p in s.providers(device)}
        for p in providers:
            if p not in everywhere:
                raise UsageError(
                    f"unknown provider {p!r} for sections {', '.join(selected)}; valid: {', '.join(everywhere)}"
                )
            if p not in here:
                raise UsageError(f"provider {p!r} does not run on {device.type}; valid here: {', '.join(sorted(here))}")
    shapes = _split(args.shapes)
    if shapes is not None:
        names = list(dict.fromkeys(n for s in chosen for n in s.shape_names()))  # sections share some names
        for n in shapes:
            if n not in names:
                raise UsageError(
                    f"unknown shape or model {n!r} for sections {', '.join(selected)}; valid: {', '.join(names)}"
                )
    registers = None
    if args.registers is not None:
        registers = []
        for v in _split(args.registers) or []:
            try:
                r = int(v)
            except ValueError:
                raise UsageError(f"--registers: {v!r} is not an integer; expected e.g. 0,4,16,36,64") from None
            if r < 0:
                raise UsageError(f"--registers: R must be >= 0, got {r}")
            registers.append(r)
        if not registers:
            raise UsageError("--registers: no register count given; expected e.g. 0,4,16,36,64")
    modes = _split(args.modes)
    if modes is not None:
        valid = sorted({m for s in chosen for m in s.mode_names})
        for m in modes:
            if m not in valid:
                raise UsageError(f"unknown mode {m!r} for sections {', '.join(selected)}; valid: {', '.join(valid)}")

    out = Path(args.out)
    _check_out(out, args.out)

    if registers is not None and not any(s.uses_registers() for s in chosen):
        users = [n for n, s in known.items() if s.uses_registers()]
        raise UsageError(f"--registers applies to sections {', '.join(users)}, none of which is selected")

    previous = None
    if args.compare:
        try:
            previous = load_previous(Path(args.compare))
        except (OSError, ValueError) as exc:
            raise UsageError(f"--compare {args.compare}: cannot read it ({exc})") from None

    preset = "quick" if args.quick else "full" if args.full else "default"
    cfg = BenchConfig(
        device=device,
        dtype=dtype,
        preset=preset,
        providers=tuple(providers) if providers else None,
        registers=tuple(registers) if registers else None,
        shapes=tuple(shapes) if shapes else None,
        modes=tuple(modes) if modes else None,
        memory=not args.no_memory,
    )
    if not any(known[name].cases(cfg) for name in selected):
        raise UsageError(
            f"the options select nothing to measure in sections {', '.join(selected)} "
            "(each section keeps only the providers, shapes and modes it knows)"
        )
    return cfg, selected, out, previous


def _check_out(out: Path, given: str) -> None:
    """--out must be a folder this process can create and write a file in: tried here, before
    anything is measured, and undone (the run makes it again)."""
    existing, missing = out, []
    while not existing.exists() and existing != existing.parent:
        missing.append(existing)
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"--out {given}: {existing} is not a writable folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as exc:  # /proc, a read-only mount, a full disk: os.access cannot tell
        raise UsageError(f"--out {given}: {existing} is not a writable folder ({exc.strerror or exc})") from None
    finally:
        for folder in missing:  # deepest first
            try:
                folder.rmdir()
            except OSError:
                pass


def _sections_help() -> str:
    """Each section of the bench: what it measures, its providers, modes and shape names."""
    from dsr_kernels.benchmark.run import sections

    def wrap(label: str, names) -> list[str]:
        return textwrap.wrap(
            f"{label}: {', '.join(names)}",
            96,
            initial_indent="    ",
            subsequent_indent="      ",
            break_on_hyphens=False,  # shape names have hyphens
            break_long_words=False,
        )

    main = ",".join(n for n, s in sections().items() if s.main_job)
    lines = [
        f"sections (--section; default: {main}; kernels: attention,norm_modulate; all: every section):",
    ]
    for name, section in sections().items():
        lines.append(f"  {name}: {section.title}")
        if section.all_providers():
            lines += wrap("providers", section.all_providers())
        if section.mode_names:
            lines += wrap("modes", section.mode_names)
        lines += wrap("shapes" if name != "selfcheck" else "ops (as --shapes)", section.shape_names())
    return "\n".join(lines)


def _bench(args: argparse.Namespace) -> int:
    from dsr_kernels.benchmark.run import run

    try:
        cfg, selected, out, previous = _bench_config(args)
    except UsageError as exc:
        print(f"dsr-kernels bench: error: {exc}", file=sys.stderr)
        return 2
    return run(cfg, selected, out=out, compare=previous)


def _info(_: argparse.Namespace) -> int:
    from dsr_kernels.info import collect, render

    print(render(collect()))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog="dsr-kernels", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    b = sub.add_parser(
        "bench",
        help="what registers cost here, and whether the fused path is worth it",
        description="Runs the sections listed below (by default all but scaling and video: at most 3 minutes\n"
        "on a 2-core CPU; --quick 90 s) and writes <out>/<date>-<time>-<device>/ with results.json, results.csv and\n"
        "PNG plots.",
        epilog=_sections_help,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    b.add_argument(
        "--section",
        "--op",
        dest="section",
        default=None,
        help="comma-separated sections: selfcheck, attention, norm_modulate, models, encoder, dropin (these "
        "six are the default), scaling, video (kernels: attention and norm_modulate; all: every section)",
    )
    b.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda or cuda:N")
    b.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="auto: bfloat16 on CUDA, float32 on CPU",
    )
    preset = b.add_mutually_exclusive_group()
    preset.add_argument("--quick", action="store_true", help="fewer shapes and repeats (at most 90 s on a 2-core CPU)")
    preset.add_argument("--full", action="store_true", help="every shape, register count and mode")
    b.add_argument(
        "--shapes", default=None, help="comma-separated shape or model names of the selected sections (listed below)"
    )
    b.add_argument("--providers", default=None, help="comma-separated providers (default: all available here)")
    b.add_argument("--registers", default=None, help="comma-separated register counts R >= 0 (attention, models)")
    b.add_argument(
        "--modes",
        default=None,
        help="comma-separated modes of the selected sections (listed below)",
    )
    b.add_argument("--no-memory", action="store_true", help="skip the peak-memory calls")
    b.add_argument(
        "--out", default="bench-results", help="each run writes a new folder inside it (default: %(default)s)"
    )
    b.add_argument(
        "--compare",
        default=None,
        metavar="PREVIOUS.json",
        help="print each row's time against the same row of an earlier run's results.json",
    )
    b.set_defaults(func=_bench)

    i = sub.add_parser("info", help="versions, devices and backend availability")
    i.set_defaults(func=_info)

    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
