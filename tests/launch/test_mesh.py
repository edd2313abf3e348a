"""The mesh and the engines. `ParallelDims` checks itself and builds the (dp, sp) mesh with its
flattened dp_sp; the engine asks the model for its blocks. FSDP2 is checked against one
process in test_train.py; here DeepSpeed ZeRO (when installed: the `deepspeed` extra) must
give the FSDP2 run's losses, through a killed rank and a resume from its own checkpoint."""

import pytest
import torch
import torch.distributed as dist

from lasp.launch.config import Config
from lasp.launch.model import build_model, model_blocks
from lasp.launch.train import FAULT_ENV
from lasp.parallel.mesh import ParallelDims
from tests.distributed import run_distributed
from tests.launch.conftest import BASELINE_ARGS, losses, run_train


@pytest.mark.parametrize("dp,sp,message", [(0, 2, "dp must be a positive int"), (2, 1.0, "sp must be"),
                                           (True, 2, "dp must be")])
def test_parallel_dims_are_checked(dp, sp, message):
    with pytest.raises(ValueError, match=message):
        ParallelDims(dp, sp)


def test_parallel_dims_for_world():
    assert ParallelDims.for_world(6, 3) == ParallelDims(2, 3) and ParallelDims(2, 3).world_size == 6
    with pytest.raises(ValueError, match="sp 4 does not divide the world size 6"):
        ParallelDims.for_world(6, 4)


def _mesh_body(rank, world_size):
    mesh = ParallelDims(2, 2).build_mesh("cpu")
    ranks = {name: dist.get_process_group_ranks(mesh.group(name)) for name in ("dp", "sp", "dp_sp")}
    assert ranks == {"dp": [rank % 2, rank % 2 + 2], "sp": [rank // 2 * 2, rank // 2 * 2 + 1], "dp_sp": [0, 1, 2, 3]}
    assert (mesh.local_rank("dp"), mesh.local_rank("sp"), mesh.local_rank("dp_sp")) == (rank // 2, rank % 2, rank)
    with pytest.raises(ValueError, match=r"needs 2 ranks; the process group has 4"):
        ParallelDims(1, 2).build_mesh("cpu")


def test_mesh_is_row_major_with_flattened_dp_sp():
    """4 ranks as dp 2 × sp 2: SP groups are consecutive ranks, and dp_sp is all of them in order."""
    run_distributed(_mesh_body, 4)


def test_engine_asks_the_model_for_its_blocks():
    """Linear-Llama answers `blocks()`; a Hugging Face model without it falls back on the classes
    of its `_no_split_modules`; a model with neither is refused by name."""
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        model = build_model(Config().model, 256, torch.device("meta"), seed=0)
        hf = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                                          num_attention_heads=2, num_key_value_heads=1))
    blocks = model_blocks(model)
    assert len(blocks) == model.config.num_hidden_layers and all(a is b for a, b in zip(blocks, model.model.layers))
    assert [id(b) for b in model_blocks(hf)] == [id(b) for b in hf.model.layers]
    with pytest.raises(TypeError, match=r"Sequential has no blocks\(\)"):
        model_blocks(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_deepspeed_engine_matches_fsdp(baseline, tmp_path):
    pytest.importorskip("deepspeed", reason="the optional engine: pip install 'lasp[deepspeed]'")
    result = run_train(tmp_path, *BASELINE_ARGS, "--engine", "deepspeed", "--max-restarts", 1,
                       env={FAULT_ENV: "1:5"})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "| deepspeed |" in result.stdout and "resumed from" in result.stdout
    assert losses(tmp_path) == pytest.approx(losses(baseline[0]), rel=1e-5)
