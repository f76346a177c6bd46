"""A pytest plugin: a test during which a library prints an error to stdout / stderr fails.

BLAS libraries report a bad argument by printing (oneMKL: "Intel oneMKL ERROR: Parameter
8 was incorrect on entry to SGEMM") and returning without computing, so the caller reads
whatever its buffers held: a silent wrong answer unless someone reads the log. C's stdio
buffers such output when stdout is not a terminal, so after each test the C buffers are
flushed into the test's captured output, which is then searched.
"""

from __future__ import annotations

import ctypes
import re

import pytest

# oneMKL / MKL, OpenBLAS, reference BLAS (xerbla), and ATen's "BLAS error" wording.
LIBRARY_ERRORS = re.compile(
    r"(oneMKL|MKL) ERROR|Parameter \d+ was incorrect on entry to|on entry to [SDCZ][A-Z]+ parameter"
    r"|OpenBLAS[^\n]*(error|warning)|BLAS error",
    re.IGNORECASE,
)

try:
    _libc = ctypes.CDLL(None)
    _fflush = _libc.fflush
    _fflush.argtypes = [ctypes.c_void_p]
except (OSError, AttributeError):  # no C library to flush (then Python's own streams only)
    _fflush = None


def flush_c_stdio() -> None:
    """Writes out what C code has buffered on stdout / stderr (fflush(NULL))."""
    if _fflush is not None:
        _fflush(None)


def pytest_configure(config):
    config.addinivalue_line("markers", "prints_library_errors: the test prints library errors on purpose (not guarded)")


@pytest.fixture(autouse=True)
def _flush_library_output():
    yield
    flush_c_stdio()  # in the teardown phase, whose output pytest captures with the test's


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.when == "teardown" and report.passed and item.get_closest_marker("prints_library_errors") is None:
        captured = "\n".join(text for title, text in report.sections if title.startswith("Captured std"))
        match = LIBRARY_ERRORS.search(captured)
        if match is not None:
            line = captured[match.start() :].splitlines()[0].strip()
            report.outcome = "failed"
            report.longrepr = f"a library printed an error during {item.nodeid}: {line!r}"
    return report
