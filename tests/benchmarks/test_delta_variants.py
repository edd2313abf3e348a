"""benchmarks/delta_variants.py: a variant file loads as its own module with its launch
overrides; an unknown launch row is refused; --keys collinear crowds each chunk's keys;
--gates strong takes KDA's chunks out of the factored form."""

import pytest
import torch
import torch.nn.functional as F

from lasp.kernels.common.launch import Launch
from lasp.kernels.common.tiles import FACTORED_LOG_DECAY
from lasp.kernels.delta import triton as delta_triton


def test_variant_loads_as_its_own_module_with_its_launch_rows(monkeypatch):
    monkeypatch.syspath_prepend("benchmarks")
    from benchmarks.delta_variants import load_variant
    name, module, overrides = load_variant(f"copy={delta_triton.__file__}@delta.wy=8,1,64;delta.state=4,2,32")
    assert name == "copy" and module is not delta_triton
    assert module.triton_linear_attention is not delta_triton.triton_linear_attention
    assert overrides == {"delta.wy": Launch(8, 1, 64), "delta.state": Launch(4, 2, 32)}
    with pytest.raises(ValueError, match="no LAUNCH row 'delta.chunk'"):
        load_variant(f"copy={delta_triton.__file__}@delta.chunk=8,1,16")


def test_collinear_keys_crowd_each_chunk_around_one_direction(monkeypatch):
    monkeypatch.syspath_prepend("benchmarks")
    from benchmarks.delta_variants import collinear_keys
    k = F.normalize(torch.randn(2, 256, 3, 64), dim=-1).bfloat16()
    keys, beta = collinear_keys(k)
    assert keys.dtype == k.dtype and keys.shape == k.shape and keys.requires_grad and beta.requires_grad
    unit = keys.detach().float()
    torch.testing.assert_close(unit.norm(dim=-1), torch.ones(2, 256, 3), atol=1e-2, rtol=0)
    chunks = unit.view(2, 4, 64, 3, 64)
    within = torch.einsum("bcthk,bcshk->bchts", chunks, chunks)
    across = torch.einsum("bthk,bshk->bhts", chunks[:, 0], chunks[:, 1])
    assert within.min() > 0.9 and across.abs().mean() < 0.3
    assert beta.detach().median() > 0.95


def test_strong_gates_leave_the_factored_form(monkeypatch):
    monkeypatch.syspath_prepend("benchmarks")
    from benchmarks.delta_variants import strong_gates
    g, gk = strong_gates(torch.zeros(1, 256, 2), torch.zeros(1, 256, 2, 8))
    assert g.shape == (1, 256, 2) and gk.shape == (1, 256, 2, 8) and g.requires_grad and gk.requires_grad
    assert (g < 0).all() and (gk < 0).all()
    chunk_log_decay = gk.detach().view(1, 4, 64, 2, 8).sum(2)      # every key's Γ at a chunk's end
    assert (chunk_log_decay < -FACTORED_LOG_DECAY).all()
