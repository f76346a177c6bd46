"""The library-output guard (tests/library_output.py) itself: a BLAS error message that a C
library prints during a test fails that test; ordinary output does not."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.mark.prints_library_errors  # (the inner session's report, echoed here, quotes the message)
def test_a_blas_error_printed_by_c_code_fails_the_test(pytester, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).parent))
    pytester.makeconftest('pytest_plugins = ["library_output"]')
    pytester.makepyfile(
        """
        import ctypes

        def test_blas_complains():
            # what oneMKL's xerbla prints, through C's buffered stdout (not Python's)
            ctypes.CDLL(None).printf(b"Intel oneMKL ERROR: Parameter 8 was incorrect on entry to SGEMM .\\n")

        def test_prints_its_own_words():
            print("lse = -inf for a row that attends nothing")
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=2, errors=1)
    result.stdout.fnmatch_lines(["*a library printed an error during*test_blas_complains*Parameter 8*"])
