"""`lasp.no_host_sync`: it must catch a real synchronisation, and refuse to run blind."""

import pytest
import torch

import lasp


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_needs_cuda():
    with pytest.raises(RuntimeError, match="needs a CUDA device"):
        with lasp.no_host_sync():
            pass


@pytest.mark.gpu
def test_catches_a_sync_and_passes_async_work():
    x = torch.randn(1024, device="cuda")
    with lasp.no_host_sync():
        y = (x * 2).cumsum(0)                      # device work only
    with pytest.raises(RuntimeError):
        with lasp.no_host_sync():
            y.sum().item()
    y.sum().item()                                 # the debug mode was reset on exit
