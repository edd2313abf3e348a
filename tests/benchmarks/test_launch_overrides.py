"""benchmarks/kernel_speed.py --launch and --chunk: LAUNCH rows and FAMILY_CHUNK overridden by
name, bad specs refused."""

import pytest

from benchmarks.kernel_speed import override_chunks, override_launches
from lasp.kernels.common.launch import FAMILY_CHUNK, LAUNCH, Launch, chunk_for_head_dims


def test_override_sets_the_row_and_refuses_unknown_or_malformed(monkeypatch):
    monkeypatch.setitem(LAUNCH, "delta.key_grad", LAUNCH["delta.key_grad"])
    monkeypatch.setitem(LAUNCH, "delta.state", LAUNCH["delta.state"])
    override_launches("delta.key_grad=16,1,32;delta.state=8,3,64")
    assert LAUNCH["delta.key_grad"] == Launch(16, 1, 32) and LAUNCH["delta.state"] == Launch(8, 3, 64)
    with pytest.raises(ValueError, match="no LAUNCH row 'delta.chunk'"):
        override_launches("delta.chunk=8,1,16")
    with pytest.raises(ValueError, match="is not ROW=warps,stages,block"):
        override_launches("delta.state=8,1")


def test_chunk_override_sets_the_family_and_refuses_unknown_or_malformed(monkeypatch):
    monkeypatch.setattr("lasp.kernels.common.launch.FAMILY_CHUNK", dict(FAMILY_CHUNK))
    override_chunks("diagonal=64,delta=32")
    assert chunk_for_head_dims("diagonal", 128, 128) == 64 and chunk_for_head_dims("delta", 64, 64) == 32
    with pytest.raises(ValueError, match="no family 'gla'"):
        override_chunks("gla=32")
    for bad in ("scalar=48", "scalar=8", "scalar"):
        with pytest.raises(ValueError, match="power of two"):
            override_chunks(bad)
