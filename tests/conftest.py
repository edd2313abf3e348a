"""Test setup: without a GPU, Triton kernels run under the interpreter on CPU tensors.

TRITON_INTERPRET must be set before triton compiles anything, so it is set here, before
any test module imports lasp.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (GPU tier runs on the device machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
