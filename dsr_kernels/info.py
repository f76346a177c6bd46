"""``dsr-kernels info``: what this installation is, what it runs on, and which backend runs each op where.

    from dsr_kernels.info import collect, render
    print(render(collect()))  # also: python -m dsr_kernels.info

``collect()`` gives (key, value) lines: versions (and the git commit of a source
checkout), whether the compiled extension is built (else the reason it does not import)
and with CUDA kernels, the CPU (model, the instruction set the C++ kernels picked, torch's
thread count), each CUDA device (name, compute capability) or why there is none, and for
every op of :data:`dsr_kernels.backends.OPS` on every available device each backend with
"available" or the reason it is not. Nothing here needs the extension or a GPU.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

import torch

import dsr_kernels
from dsr_kernels import _extension
from dsr_kernels.backends import OPS, explain, triton_interpreting


class InfoLine(NamedTuple):
    key: str
    value: str


def _git_commit() -> str:
    """The commit of the source checkout the package runs from (editable install), "+ changes" when modified."""
    root = Path(dsr_kernels.__file__).resolve().parent.parent

    def git(*args: str) -> str:
        out = subprocess.run(
            ["git", "--no-optional-locks", "-C", str(root), *args], capture_output=True, text=True, timeout=10
        )
        if out.returncode != 0:
            raise RuntimeError(out.stderr.strip())
        return out.stdout.strip()

    try:
        if Path(git("rev-parse", "--show-toplevel")).resolve() != root:  # a site-packages inside some other repo
            return "unknown (the package is not in a git checkout of its own)"
        commit = git("rev-parse", "--short=12", "HEAD")
        modified = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, RuntimeError, subprocess.SubprocessError):
        return "unknown (not a git checkout, or git is not installed)"
    return f"{commit} + uncommitted changes" if modified else commit


def _versions() -> list[InfoLine]:
    try:
        triton = importlib.metadata.version("triton")  # without importing it
    except importlib.metadata.PackageNotFoundError:
        triton = "not installed"
    if torch.version.cuda is not None:
        build = f"CUDA {torch.version.cuda}"
    elif getattr(torch.version, "hip", None):
        build = f"ROCm {torch.version.hip}"
    else:
        build = "CPU only"
    interpret = "on (TRITON_INTERPRET=1: Triton kernels run on the CPU)" if triton_interpreting() else "off"
    return [
        InfoLine("dsr_kernels", f"{dsr_kernels.__version__} ({Path(dsr_kernels.__file__).resolve().parent})"),
        InfoLine("git commit", _git_commit()),
        InfoLine("torch", f"{torch.__version__} ({build})"),
        InfoLine("triton", triton),
        InfoLine("triton interpreter", interpret),
        InfoLine("python", f"{platform.python_version()} ({platform.python_implementation()}, {platform.machine()})"),
    ]


def _extension_lines() -> list[InfoLine]:
    C = _extension._C
    if C is None:
        reason = _extension.extension_unavailable_reason(torch.device("cpu")) or "not built"
        return [InfoLine("extension", reason), InfoLine("extension CUDA kernels", "no (the extension is not built)")]
    if C.cuda_built():
        cuda = "yes"
    else:  # setup.py's reason, compiled in (older builds lack cuda_skip_reason)
        why = getattr(C, "cuda_skip_reason", lambda: "")() or "built without CUDA"
        cuda = f"no (CUDA kernels not built: {why})"
    return [InfoLine("extension", f"built ({C.__file__})"), InfoLine("extension CUDA kernels", cuda)]


def cpu_model() -> str:
    """The processor's model name (from /proc/cpuinfo on Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _cpu_lines() -> list[InfoLine]:
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if _extension._C is not None:
        isa = _extension._C.cpu_capability()
        cap = os.environ.get("DSR_CPU_CAPABILITY")
        if cap:
            isa += f" (capped by DSR_CPU_CAPABILITY={cap})"
    else:
        isa = "none (the extension is not built)"
    lines = [
        InfoLine("cpu", f"{cpu_model()} ({usable} usable of {os.cpu_count()} logical CPUs)"),
        InfoLine("cpu kernels isa", isa),
    ]
    get_capability = getattr(torch.backends.cpu, "get_cpu_capability", None)
    if get_capability is not None:
        lines.append(InfoLine("torch cpu isa", get_capability()))
    lines.append(InfoLine("torch threads", str(torch.get_num_threads())))
    return lines


def _gpu_lines() -> list[InfoLine]:
    if torch.version.cuda is None and not getattr(torch.version, "hip", None):
        return [InfoLine("gpu", "no CUDA device: torch is a CPU-only build (torch.version.cuda is None)")]
    if not torch.cuda.is_available():
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        why = "no NVIDIA driver or no visible device"
        if visible is not None:
            why += f"; CUDA_VISIBLE_DEVICES={visible!r}"
        return [InfoLine("gpu", f"no CUDA device: torch.cuda.is_available() is False ({why})")]
    lines = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        major, minor = props.major, props.minor
        lines.append(
            InfoLine(
                f"gpu cuda:{i}",
                f"{props.name}, compute capability {major}.{minor} (sm_{major}{minor}), "
                f"{props.total_memory / 2**30:.0f} GiB",
            )
        )
    return lines


def _backend_lines() -> list[InfoLine]:
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    return [
        InfoLine(f"{op} [{device}] {backend}", reason)
        for device in devices
        for op in OPS
        for backend, reason in explain(op, device).items()
    ]


def collect() -> list[InfoLine]:
    """Versions, extension, CPU, GPU and every op's backends on every available device, as (key, value) lines."""
    return _versions() + _extension_lines() + _cpu_lines() + _gpu_lines() + _backend_lines()


def render(lines: Iterable[tuple[str, str]]) -> str:
    """One ``key  value`` line each, the values aligned."""
    lines = list(lines)
    width = max((len(key) for key, _ in lines), default=0)
    return "\n".join(f"{key:<{width}}  {value}" for key, value in lines)


if __name__ == "__main__":
    print(render(collect()))
