"""Test configuration.

Triton runs on the CPU through its interpreter when no GPU is present. TRITON_INTERPRET must be set before triton
is imported anywhere, which is why it happens here, at conftest import time, before any test module loads.
Tests marked ``gpu`` need CUDA and are skipped (with that reason) where torch.cuda.is_available() is False.
"""

import os
import sys

assert "triton" not in sys.modules, "triton was imported before tests/conftest.py could set TRITON_INTERPRET"

import torch  # noqa: E402  (torch does not import triton)

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
