"""The train step against one process on the same data, the schedule, and `lasp-train` end to end.

The step test is the launcher's correctness oracle: a dp × sp job (FSDP2 over all ranks,
LASP-2/LASP-2H inside each SP group) must give the loss, the gradients, the gradient
norm and the updated parameters of a single process that computes the plain full-logits
cross-entropy of ALL data-parallel ranks' sequences: float64, three steps (Adam's first
steps are nearly lr·sign(g), which would amplify float32 rounding into the parameters).
"""

import dataclasses
import json
from dataclasses import replace
from functools import partial

import pytest
import torch
import torch.nn.functional as F

import lasp
from lasp.batch import next_token_labels
from lasp.launch.config import Config
from lasp.launch.data import ByteTokenizer, build_data
from lasp.launch.mesh import FSDPEngine, init_distributed
from lasp.launch.model import build_model
from lasp.launch.train import adamw, continue_schedule, lr_schedule, train_step
from lasp.models.config import LAYER_KINDS
from lasp.parallel.layout import SequenceLayout
from tests.distributed import run_distributed
from tests.launch.conftest import losses
from tests.utils import rel_err


class RecordingEngine(FSDPEngine):
    """FSDP2, keeping the full gradients that the step is about to apply."""

    def step(self):
        self.grads = {n: p.grad.full_tensor().clone() for n, p in self.model.named_parameters()}
        return super().step()


def _step_body(rank, world_size, sp_size, kind, pattern, checkpointing, corpus):
    config = Config()
    config = replace(config, model=replace(config.model, layer_pattern=pattern,
                                           activation_checkpointing=checkpointing),
                     data=replace(config.data, dataset=corpus, seq_len=96),
                     train=replace(config.train, lr=1e-2, grad_clip=0.5, warmup_steps=0, steps=3))
    d = init_distributed(sp_size, "cpu", 60)
    vocab = ByteTokenizer.vocab_size
    model = build_model(config.model, vocab, d.device, seed=0).double()
    reference = build_model(config.model, vocab, d.device, seed=0).double()
    lasp.parallelize(model, d.sp_mesh, kind=kind)
    engine = RecordingEngine(model, partial(adamw, config.train), d, torch.float64, config.train.grad_clip)
    schedule = lr_schedule(engine.optimizer, config.train)
    ref_optimizer = adamw(config.train, reference.parameters())
    ref_schedule = lr_schedule(ref_optimizer, config.train)
    datas = [build_data(config.data, ByteTokenizer(), 0, r, d.dp_size) for r in range(d.dp_size)]
    layout = SequenceLayout(96, sp_size, d.sp_rank, kind)
    for _ in range(3):
        sequences = [next(data) for data in datas]  # every data-parallel rank's sequence
        tokens, cu = sequences[d.dp_rank]
        assert cu.numel() > 2  # several documents per sequence
        loss, norm = train_step(engine, lasp.shard_batch(tokens, layout=layout, cu_seqlens=cu), d.mesh)
        schedule.step()

        labels = [next_token_labels(t, c) for t, c in sequences]
        total = sum((lab != -100).sum() for lab in labels)
        outputs = [reference(t, cu_seqlens=c) for t, c in sequences]
        ref_loss = sum(F.cross_entropy(out.logits[0], lab[0], reduction="sum")
                       for out, lab in zip(outputs, labels)) / total
        if "M" in pattern:  # + the mean over the sequences of their MoM load-balancing loss
            ref_loss = ref_loss + reference.config.router_aux_loss_coef * sum(
                out.aux_loss for out in outputs) / len(outputs)
        ref_loss.backward()
        ref_grads = {n: p.grad.clone() for n, p in reference.named_parameters()}
        ref_norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), config.train.grad_clip)
        ref_optimizer.step()
        ref_optimizer.zero_grad()
        ref_schedule.step()

        assert rel_err(loss, ref_loss) < 1e-12, (loss, ref_loss)
        assert rel_err(norm, ref_norm) < 1e-11, (norm, ref_norm)
        assert ref_norm > config.train.grad_clip  # clipping is active
        assert engine.grads.keys() == ref_grads.keys()
        for name, grad in ref_grads.items():
            assert rel_err(engine.grads[name], grad) < 1e-10, name
        for name, p in reference.named_parameters():
            assert rel_err(dict(model.named_parameters())[name].full_tensor(), p.detach()) < 1e-10, name


HYBRID = "LMN" if "M" in LAYER_KINDS else "LLN"  # with a Mixture-of-Memories layer where lasp has them


@pytest.mark.parametrize("world_size,sp_size,kind,pattern,checkpointing", [
    (2, 2, "zigzag", "LLN", False), (2, 1, "contiguous", "LLN", False), (4, 2, "zigzag", HYBRID, True)])
def test_step_matches_one_process(corpus, world_size, sp_size, kind, pattern, checkpointing):
    """dp × sp = 1 × 2, 2 × 1 and 2 × 2 (with activation checkpointing inside FSDP2, and a MoM
    layer whose load-balancing loss is averaged over the data-parallel sequences)."""
    run_distributed(_step_body, world_size, sp_size, kind, pattern, checkpointing, corpus)


def test_lr_schedule():
    train = replace(Config().train, lr=1.0, warmup_steps=2, steps=6, min_lr_ratio=0.1)
    schedule = lr_schedule(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0), train)
    lrs = []
    for _ in range(6):
        lrs.append(schedule.get_last_lr()[0])
        schedule.optimizer.step()
        schedule.step()
    assert lrs[:3] == pytest.approx([1 / 3, 2 / 3, 1.0])  # warm-up, then the peak
    assert all(a > b for a, b in zip(lrs[2:], lrs[3:])) and lrs[-1] > 0.1  # cosine towards 0.1
    assert schedule.get_last_lr()[0] == pytest.approx(0.1)


def test_resume_applies_this_commands_schedule():
    """A resumed run takes --lr, --weight-decay and the schedule of its own command (the checkpoint
    holds the old ones), says which changed, and changes nothing when none did."""
    old = replace(Config().train, lr=1.0, weight_decay=0.1, warmup_steps=0, steps=10)
    optimizer = adamw(old, [torch.zeros(1, requires_grad=True)])
    schedule = lr_schedule(optimizer, old)
    for _ in range(4):
        optimizer.step()
        schedule.step()
    saved = {"optimizer": optimizer.state_dict(), "scheduler": schedule.state_dict()}

    def resume(train):
        optimizer = adamw(train, [torch.zeros(1, requires_grad=True)])
        schedule = lr_schedule(optimizer, train)
        optimizer.load_state_dict(saved["optimizer"])
        schedule.load_state_dict(saved["scheduler"])
        return schedule, continue_schedule(schedule, train, dataclasses.asdict(old))

    schedule, changed = resume(old)
    assert changed == [] and schedule.get_last_lr() == lr_schedule_at(old, 4)
    new = replace(old, lr=0.5, steps=20, weight_decay=0.0)
    schedule, changed = resume(new)
    assert changed == ["--steps 20 (was 10)", "--lr 0.5 (was 1.0)", "--weight-decay 0.0 (was 0.1)"]
    assert schedule.get_last_lr() == lr_schedule_at(new, 4)
    assert schedule.optimizer.param_groups[0]["lr"] == lr_schedule_at(new, 4)[0]
    assert schedule.optimizer.param_groups[0]["weight_decay"] == 0.0
    schedule.optimizer.step()
    schedule.step()
    assert schedule.get_last_lr() == lr_schedule_at(new, 5)


def lr_schedule_at(train, done: int) -> list[float]:
    """The learning rate of a fresh run of `train` after `done` steps."""
    schedule = lr_schedule(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=train.lr), train)
    for _ in range(done):
        schedule.optimizer.step()
        schedule.step()
    return schedule.get_last_lr()


def test_default_run_end_to_end(baseline):
    """The embedded default (2 processes, SP = 2, tiny hybrid, stdlib, byte tokenizer) for 6 steps."""
    output_dir, result = baseline
    assert "2 ranks = dp 1 × sp 2 (zigzag)" in result.stdout and "data stdlib" in result.stdout
    run = losses(output_dir)
    assert sorted(run) == [1, 2, 3, 4, 5, 6]
    assert run[1] == pytest.approx(torch.log(torch.tensor(257.0)).item(), rel=0.05)  # a fresh model
    assert run[6] < run[1] - 0.5  # it learns
    assert sorted(p.name for p in (output_dir / "checkpoints").iterdir()) == ["step_3", "step_6"]
    summary = json.loads((output_dir / "summary.json").read_text())
    assert summary["first_loss"] == run[1] and summary["last_loss"] == run[6]
    assert summary["tokens_per_s_per_gpu"] > 0 and summary["mfu"] is None  # no MFU on CPU
    assert "loss" in result.stdout.splitlines()[-1]
    progress = [line for line in result.stdout.splitlines() if line.startswith("step ")]
    assert len(progress) == 6 and all("tok/s/proc" in line and "| rss " in line for line in progress)  # on CPU

