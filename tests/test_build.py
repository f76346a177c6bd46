"""setup.py's decision whether to build the CUDA kernels, with fake toolkits and environments (no builds).

The case it exists for: a CUDA build of torch, and an nvcc wrapper on PATH (/usr/local/bin/nvcc
running the real one) from which CUDA_HOME is guessed as /usr/local, whose include/ has no CUDA
headers. The build must then make the CPU kernels and say why, not fail halfway in nvcc.
"""

from __future__ import annotations

import ast
import os
import runpy
import stat
from pathlib import Path

import pytest

SETUP = runpy.run_path(str(Path(__file__).resolve().parents[1] / "setup.py"))  # functions only: no setup() call
find_cuda_home = SETUP["find_cuda_home"]
cuda_toolkit_problem = SETUP["cuda_toolkit_problem"]
decide_cuda = SETUP["decide_cuda"]


def _executable(path: Path, body: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def _toolkit(root: Path, *, nvcc: str | None = "echo 'Cuda compilation tools'", header: bool = True) -> Path:
    """A fake CUDA toolkit: bin/nvcc running `nvcc` (none if None), include/cuda_runtime_api.h if `header`."""
    if nvcc is not None:
        _executable(root / "bin" / "nvcc", nvcc)
    if header:
        (root / "include").mkdir(parents=True, exist_ok=True)
        (root / "include" / "cuda_runtime_api.h").write_text("// fake\n")
    return root


def test_cuda_home_resolves_as_torch_does(tmp_path):
    assert find_cuda_home({"CUDA_HOME": "/opt/cuda"}, lambda _: None) == ("/opt/cuda", "from $CUDA_HOME")
    assert find_cuda_home({"CUDA_PATH": "/opt/cuda"}, lambda _: None) == ("/opt/cuda", "from $CUDA_PATH")
    assert find_cuda_home({"CUDA_HOME": "/a", "CUDA_PATH": "/b"}, lambda _: None)[0] == "/a"
    wrapper = str(tmp_path / "bin" / "nvcc")
    home, origin = find_cuda_home({}, lambda _: wrapper)
    assert home == str(tmp_path) and wrapper in origin and "guessed" in origin


def test_usable_toolkit(tmp_path):
    home = _toolkit(tmp_path / "cuda")
    assert cuda_toolkit_problem("12.8", str(home), "from $CUDA_HOME") is None
    assert decide_cuda({}, lambda: cuda_toolkit_problem("12.8", str(home), "from $CUDA_HOME")) == (True, "")


def test_nvcc_wrapper_without_headers_builds_the_cpu_kernels(tmp_path):
    """The reported failure: CUDA_HOME guessed from a wrapper's folder that has no CUDA headers."""
    real = _toolkit(tmp_path / "cuda-13.0")
    wrapper = _executable(tmp_path / "local" / "bin" / "nvcc", f'exec {real / "bin" / "nvcc"} "$@"')
    home, origin = find_cuda_home({}, lambda _: str(wrapper))
    assert home == str(tmp_path / "local")
    build, why = decide_cuda({}, lambda: cuda_toolkit_problem("13.0", home, origin))
    assert not build
    assert f"CUDA_HOME={home}" in why and str(wrapper) in why and "include/cuda_runtime_api.h" in why, why
    with pytest.raises(SystemExit, match="DSR_BUILD_CUDA=1.*include/cuda_runtime_api.h"):
        decide_cuda({"DSR_BUILD_CUDA": "1"}, lambda: cuda_toolkit_problem("13.0", home, origin))


@pytest.mark.parametrize(
    "nvcc, words",
    [
        (None, ["does not run", "FileNotFoundError"]),
        ("echo 'nvcc fatal: broken install' >&2; exit 3", ["does not run", "exit status 3", "broken install"]),
    ],
    ids=["missing", "failing"],
)
def test_nvcc_that_does_not_run(tmp_path, nvcc, words):
    home = _toolkit(tmp_path / "cuda", nvcc=nvcc)
    why = cuda_toolkit_problem("12.8", str(home), "from $CUDA_HOME")
    assert why and f"CUDA_HOME={home} (from $CUDA_HOME)" in why, why
    for word in words:
        assert word in why, why


def test_torch_without_cuda_or_no_toolkit(tmp_path):
    home = _toolkit(tmp_path / "cuda")
    why = cuda_toolkit_problem(None, str(home), "from $CUDA_HOME")
    assert "torch has no CUDA" in why and f"CUDA_HOME={home}" in why, why
    why = cuda_toolkit_problem("12.8", None, "CUDA_HOME unset, no nvcc on PATH, no /usr/local/cuda")
    assert why.startswith("no CUDA toolkit") and "CUDA_HOME unset" in why, why


def test_dsr_build_cuda_forces_either_way():
    def never():
        raise AssertionError("DSR_BUILD_CUDA=0 must not look at the toolkit")

    assert decide_cuda({"DSR_BUILD_CUDA": "0"}, never) == (False, "left out with DSR_BUILD_CUDA=0")
    assert decide_cuda({"DSR_BUILD_CUDA": "1"}, lambda: None) == (True, "")
    assert decide_cuda({}, lambda: "no toolkit") == (False, "no toolkit")
    with pytest.raises(SystemExit, match="DSR_BUILD_CUDA=1, but the CUDA kernels cannot be built: no toolkit"):
        decide_cuda({"DSR_BUILD_CUDA": "1"}, lambda: "no toolkit")
    with pytest.raises(SystemExit, match="must be 0 or 1"):
        decide_cuda({"DSR_BUILD_CUDA": "yes"}, lambda: None)


def test_skip_reason_is_a_c_string_literal():
    text = 'CUDA_HOME="/opt/cuda \\ é"\n(from $CUDA_HOME)'
    literal = SETUP["_c_string"](text)
    assert literal.isascii() and "\n" not in literal
    # C's and Python's bytes literals read 3-digit octal escapes alike.
    assert ast.literal_eval("b" + literal).decode() == text


def test_nvcc_flags_are_the_builds(monkeypatch):
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS

    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    flags = SETUP["nvcc_flags"]()
    assert "TORCH_CUDA_ARCH_LIST" not in os.environ
    assert flags[: len(COMMON_NVCC_FLAGS)] == COMMON_NVCC_FLAGS
    for flag in [*SETUP["NVCC_FLAGS"], "-DDSR_WITH_CUDA", "-DTORCH_EXTENSION_NAME=_C", "-std=c++20"]:
        assert flag in flags
    assert "-gencode=arch=compute_80,code=sm_80" in flags and "-gencode=arch=compute_90,code=sm_90" in flags
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0a")
    assert [f for f in SETUP["nvcc_flags"]() if "gencode" in f] == ["-gencode=arch=compute_90a,code=sm_90a"]


def test_the_built_extension_says_why_it_has_no_cuda_kernels():
    from dsr_kernels import _extension
    from dsr_kernels.info import collect

    C = _extension._C
    if C is None:
        pytest.skip("dsr_kernels._C is not built")
    reason = C.cuda_skip_reason()
    assert (reason == "") == C.cuda_built(), reason
    line = dict(collect())["extension CUDA kernels"]
    assert line == "yes" if C.cuda_built() else reason in line, line
