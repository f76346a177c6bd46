"""The package without its compiled extension (DSR_SKIP_BUILD=1): imports, explains, never falls back silently.

The reason the compiled backends give must say what is wrong: "not built" when there is
no ``dsr_kernels/_C*.so`` (Python's own message guesses a circular import), and the
loader's real error when the file is there but does not load.
"""

import shutil
import subprocess
import sys
import textwrap
from importlib.machinery import EXTENSION_SUFFIXES, ModuleSpec
from pathlib import Path

import dsr_kernels
from dsr_kernels._extension import _unavailable_reason

PACKAGE = Path(dsr_kernels.__file__).resolve().parent


def _run(code: str, root: Path | None = None) -> subprocess.CompletedProcess:
    """``python -c code``; with ``root``, run there so that root/dsr_kernels is imported, not the installed one."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=root, capture_output=True, text=True, timeout=120
    )


def _package_copy(root: Path) -> Path:
    """The Python files of the package under root/dsr_kernels, as DSR_SKIP_BUILD=1 installs them (no _C*.so)."""
    shutil.copytree(PACKAGE, root / "dsr_kernels", ignore=shutil.ignore_patterns("_C.*", "__pycache__"))
    return root / "dsr_kernels"


# An editable install's finder would resolve dsr_kernels._C from the source tree when the
# copy has none: drop it, so that only the copy's files count (as in a real install).
_PRINT_REASON = """
    import sys
    sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")]
    import torch, dsr_kernels
    from dsr_kernels._extension import extension_loaded, extension_unavailable_reason
    assert dsr_kernels.__file__.startswith({root!r}), dsr_kernels.__file__
    assert not extension_loaded()
    print(extension_unavailable_reason(torch.device("cpu")))
"""


def test_package_works_without_the_compiled_extension():
    code = """
        import sys
        sys.modules["dsr_kernels._C"] = None  # as if installed with DSR_SKIP_BUILD=1
        import torch, dsr_kernels
        from dsr_kernels import BackendUnavailable
        table = dsr_kernels.explain("norm_modulate", "cpu")
        assert "not built" in table["cpu"] and "DSR_SKIP_BUILD" in table["cpu"], table
        assert table["reference"] == "available"
        x = torch.randn(2, 5, 8)
        res = dsr_kernels.norm_modulate(x, registers=torch.randn(2, 8), return_norms=True)  # auto: reference
        assert res.out.shape == (2, 7, 8) and res.norms.shape == (2, 7)
        try:
            dsr_kernels.norm_modulate(x, backend="cpu")
        except BackendUnavailable as exc:
            assert "not built" in str(exc)
        else:
            raise AssertionError("explicit backend='cpu' ran without the extension")
        q = torch.randn(1, 2, 9, 16)
        assert dsr_kernels.attention(q, q, q).shape == q.shape
        print("ok")
        """
    result = _run(code)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")


def test_not_built_reason_says_so(tmp_path):
    """A copy of the package with no _C*.so, as DSR_SKIP_BUILD=1 installs it."""
    _package_copy(tmp_path)
    result = _run(_PRINT_REASON.format(root=str(tmp_path)), root=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    reason = result.stdout.strip()
    assert "not built" in reason and "DSR_SKIP_BUILD=1" in reason, reason
    assert "_C*.so" in reason and str(tmp_path / "dsr_kernels") in reason, reason
    assert "pip install --no-build-isolation -e ." in reason, reason
    assert "circular import" not in reason and "partially initialized" not in reason, reason


def test_broken_extension_reason_gives_the_real_import_error(tmp_path):
    """A _C*.so that exists but does not load: the reason names the file and the loader's own error."""
    package = _package_copy(tmp_path)
    broken = package / f"_C{EXTENSION_SUFFIXES[0]}"
    broken.write_bytes(b"not a shared library")
    result = _run(_PRINT_REASON.format(root=str(tmp_path)), root=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    reason = result.stdout.strip()
    assert "not built" not in reason and "circular import" not in reason, reason
    assert f"loading {broken} failed with ImportError: " in reason, reason
    assert "rebuild" in reason, reason


def test_unavailable_reason_tells_the_cases_apart():
    exc = ImportError("cannot import name '_C' from partially initialized module 'dsr_kernels'")
    for spec in (None, ModuleSpec("dsr_kernels._C", None, origin="/somewhere/dsr_kernels/_C.py")):
        reason = _unavailable_reason(spec, exc)
        assert "not built" in reason and "DSR_SKIP_BUILD=1" in reason and "partially" not in reason, reason
    so = f"/site-packages/dsr_kernels/_C{EXTENSION_SUFFIXES[0]}"
    exc = ImportError(f"{so}: undefined symbol: _ZN3c1017RegisterOperatorsD1Ev")
    reason = _unavailable_reason(ModuleSpec("dsr_kernels._C", None, origin=so), exc)
    assert "not built" not in reason, reason
    assert f"loading {so} failed with ImportError: {exc}" in reason, reason
    assert "another torch" in reason, reason
