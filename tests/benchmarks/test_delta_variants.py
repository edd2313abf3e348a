"""benchmarks/delta_variants.py: a variant file loads as its own module with its launch
overrides; an unknown launch row is refused."""

import pytest

from lasp.kernels.common.launch import Launch
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
