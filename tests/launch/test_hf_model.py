"""`lasp-train --model hf:PATH`: a transformers model directory (config.json, weights optional)
trains with the launcher's mesh, FSDP2, checkpoints and metrics; bad directories are refused."""

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import lasp
from lasp.launch.config import Config, load_config, validate
from lasp.launch.data import ByteTokenizer, build_data
from lasp.launch.model import build_model
from lasp.launch.train import train
from lasp.parallel import SequenceLayout
from tests.distributed import run_distributed
from tests.launch.conftest import losses

SMALL = dict(vocab_size=260, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=8, max_position_embeddings=64)


def write_model_dir(path: Path, model_type: str, weights: bool = False, **config) -> str:
    """A model directory as `config.save_pretrained` (and `save_pretrained` for the weights) write it."""
    from transformers import AutoConfig, AutoModelForCausalLM
    hf_config = AutoConfig.for_model(model_type, **SMALL, **config)
    if weights:
        torch.manual_seed(123)
        model = AutoModelForCausalLM.from_config(hf_config)
        with torch.no_grad():
            model.get_output_embeddings().weight.mul_(50.0)   # far from a fresh init: the loss shows they loaded
        model.save_pretrained(path)
    else:
        hf_config.save_pretrained(path)
    return str(path)


def _config(model_dir, output_dir, corpus, steps, **checkpoint) -> Config:
    config = Config()
    return replace(config, model=replace(config.model, name=f"hf:{model_dir}"),
                   data=replace(config.data, dataset=corpus, seq_len=32),
                   parallel=replace(config.parallel, sp_size=2, device="cpu"),
                   train=replace(config.train, steps=steps, warmup_steps=0),
                   checkpoint=replace(config.checkpoint, output_dir=output_dir, **checkpoint),
                   metrics=replace(config.metrics, log_every=1, tensorboard=False))


def _first_loss(config) -> float:
    """The loss of the run's first sequence on one process: the directory's model (or the same
    random init), lasp-wrapped at W = 1."""
    model = build_model(config.model, ByteTokenizer.vocab_size, torch.device("cpu"), config.train.seed).hf_model
    lasp.parallelize(model, lasp.layers.SPContext(1, 0))
    tokens, cu = next(build_data(config.data, ByteTokenizer(), config.train.seed, 0, 1))
    batch = lasp.shard_batch(tokens, layout=SequenceLayout(config.data.seq_len, 1, 0), cu_seqlens=cu)
    with torch.no_grad():
        return lasp.causal_lm_loss(model, batch).item()


def _hf_train_body(rank, world_size, root, corpus):
    root = Path(root)
    stores = iter(range(100))

    def join():
        if not dist.is_initialized():   # train() ends its process group: the next one is new
            dist.init_process_group("gloo", init_method=f"file://{root}/store{next(stores)}", rank=rank,
                                    world_size=world_size)

    def run(config):
        join()
        return train(config)

    for name, model_dir, steps in (("llama", root / "llama", 3), ("llama_weights", root / "llama_weights", 2),
                                   ("qwen3_moe", root / "qwen3_moe", 2)):
        output_dir = root / f"run_{name}"
        config = _config(model_dir, str(output_dir), corpus, steps, checkpoint_every=2)
        summary = run(config)
        if rank == 0:
            assert summary["steps"] == steps, summary
            first = losses(output_dir)[1]
            assert abs(first - _first_loss(config)) < 1e-5 * first, (name, first)
            if name == "llama_weights":
                assert first > 2 * torch.log(torch.tensor(260.0)).item()   # the saved (sharpened) head, not a fresh one
    # Resume: the llama run without its last checkpoint trains step 3 again, to the same loss.
    output_dir = root / "run_llama"
    before = losses(output_dir)
    if rank == 0:
        shutil.rmtree(output_dir / "checkpoints" / "step_3")
        (output_dir / "summary.json").unlink()
    join()
    dist.barrier()
    summary = run(_config(root / "llama", str(output_dir), corpus, 3, checkpoint_every=2))
    if rank == 0:
        assert summary["resumed_from"] == 2, summary
        assert losses(output_dir) == pytest.approx(before, rel=1e-6)
    join()   # (the harness ends with a barrier)


def test_hf_models_train_checkpoint_and_resume(tmp_path, corpus):
    """SP = 2 over 2 ranks, FSDP2: a random-init Llama (3 steps), a Llama with saved weights and a
    Qwen3-MoE with its load-balancing loss (2 steps each); each first loss equals the same model's
    on one process; a resumed run repeats the lost step exactly."""
    write_model_dir(tmp_path / "llama", "llama")
    write_model_dir(tmp_path / "llama_weights", "llama", weights=True, tie_word_embeddings=False)
    write_model_dir(tmp_path / "qwen3_moe", "qwen3_moe", num_experts=4, moe_intermediate_size=16,
                    num_experts_per_tok=2, output_router_logits=True)
    run_distributed(_hf_train_body, 2, str(tmp_path), corpus, timeout=600)


def test_bad_model_directories_are_refused(tmp_path):
    def check(*args):
        validate(load_config(["--device", "cpu", "--sp-size", "1", *args]), 1)

    with pytest.raises(ValueError, match="hf:.*not a directory"):
        check("--model", f"hf:{tmp_path / 'missing'}")
    with pytest.raises(ValueError, match="has no config.json"):
        check("--model", f"hf:{tmp_path}")
    from transformers import GPT2Config
    GPT2Config(n_layer=1, n_embd=8, n_head=2).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ValueError, match="model type 'gpt2' is not supported.*llama"):
        check("--model", f"hf:{tmp_path / 'gpt2'}")
    llama = write_model_dir(tmp_path / "llama", "llama")
    with pytest.raises(ValueError, match=r"--model-overrides: \['num_layerz'\] are not fields"):
        check("--model", f"hf:{llama}", "--model-overrides", json.dumps({"num_layerz": 3}))
    check("--model", f"hf:{llama}", "--model-overrides", json.dumps({"num_hidden_layers": 3}))
