"""Test configuration.

Without a GPU, Triton kernels are tested in Triton's CPU interpreter, which must be
switched on before triton is imported; with a GPU the real kernels run and the tests
marked ``gpu`` exercise them. Nothing here touches the GPU at import time beyond asking
whether one exists.
"""

import os

import pytest
import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device; skipped, with the reason, without one")


def pytest_runtest_setup(item):
    if item.get_closest_marker("gpu") is not None and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device: torch.cuda.is_available() is False on this machine")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
