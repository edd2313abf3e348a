"""benchmarks/kernel_speed.py --launch: LAUNCH rows overridden by name, bad specs refused."""

import pytest

from benchmarks.kernel_speed import override_launches
from lasp.kernels.common.launch import LAUNCH, Launch


def test_override_sets_the_row_and_refuses_unknown_or_malformed(monkeypatch):
    monkeypatch.setitem(LAUNCH, "delta.chunk_grad", LAUNCH["delta.chunk_grad"])
    monkeypatch.setitem(LAUNCH, "delta.state", LAUNCH["delta.state"])
    override_launches("delta.chunk_grad=16,1,32;delta.state=8,3,64")
    assert LAUNCH["delta.chunk_grad"] == Launch(16, 1, 32) and LAUNCH["delta.state"] == Launch(8, 3, 64)
    with pytest.raises(ValueError, match="no LAUNCH row 'delta.chunk'"):
        override_launches("delta.chunk=8,1,16")
    with pytest.raises(ValueError, match="is not ROW=warps,stages,block"):
        override_launches("delta.state=8,1")
