"""Test setup: without a GPU, Triton kernels run under the interpreter on CPU tensors.

TRITON_INTERPRET must be set before triton compiles anything, so it is set here, before
any test module imports lasp. The test hooks of the kernels live here, not in the
package (`install_kernel_test_hooks`); processes that tests spawn call it themselves.
"""

import importlib.util
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _fix_interpreter_loop_bounds() -> None:
    """Let `range(tensor)` work in the Triton interpreter under NumPy >= 2.4.

    The interpreter holds scalars as 1-element arrays and converts loop bounds with
    `int(array)`, which NumPy 2.4 turned into a TypeError. The span walks loop over a
    device-computed number of chunks, so the CPU tests need this conversion.
    """
    from triton.runtime import interpreter

    patch = getattr(interpreter, "_patch_lang_tensor", None)
    if patch is None or getattr(patch, "_lasp_index_fix", False):
        return

    def patched(tensor, scope):
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._lasp_index_fix = True
    interpreter._patch_lang_tensor = patched


def _nan_tensor(shape, dtype, device):
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def install_kernel_test_hooks() -> None:
    """Every Triton kernel output starts as NaN (an element a kernel forgets to write
    fails the comparison: `lasp.kernels.common.launch.new_tensor` replaced), and under
    TRITON_INTERPRET=1 the interpreter takes device-computed loop bounds. Idempotent."""
    if importlib.util.find_spec("triton") is None:  # no Triton: nothing runs kernels
        return
    from lasp.kernels.common import launch

    launch.new_tensor = _nan_tensor
    if os.environ.get("TRITON_INTERPRET") == "1":
        _fix_interpreter_loop_bounds()


install_kernel_test_hooks()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (GPU tier runs on the device machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
