"""Test configuration.

Without a GPU, Triton kernels are tested in Triton's CPU interpreter, which must be
switched on before triton is imported; with a GPU the real kernels run and the tests
marked ``gpu`` exercise them. Nothing here touches the GPU at import time beyond asking
whether one exists.

Also here: hypothesis' profiles (CI's fixed, derandomised budget "dsr-ci", the default;
"dsr-thorough" on request: ``pytest --hypothesis-profile=dsr-thorough``), and the
library-output guard (tests/library_output.py): a test during which a BLAS or kernel
library prints an error fails.
"""

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

pytest_plugins = ["library_output", "pytester"]

_SLOW_OK = [HealthCheck.too_slow, HealthCheck.data_too_large]
settings.register_profile("dsr-ci", max_examples=25, deadline=None, derandomize=True, suppress_health_check=_SLOW_OK)
settings.register_profile("dsr-thorough", max_examples=400, deadline=None, suppress_health_check=_SLOW_OK)
settings.load_profile("dsr-ci")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device; skipped, with the reason, without one")


def pytest_runtest_setup(item):
    if item.get_closest_marker("gpu") is not None and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device: torch.cuda.is_available() is False on this machine")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def saved_figures(monkeypatch):
    """Every matplotlib figure saved during the test (still saved), to look at its axes and panels."""
    import matplotlib.figure

    figures = []
    save = matplotlib.figure.Figure.savefig
    monkeypatch.setattr(
        matplotlib.figure.Figure, "savefig", lambda fig, *a, **k: figures.append(fig) or save(fig, *a, **k)
    )
    return figures
