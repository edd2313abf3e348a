"""`--compile` and `--activation-checkpointing full | selective | none`: a compiled model (each block one
graph, attention included, at SP = 1) and a selectively checkpointed one, compiled or not, give the
eager model's loss and gradients; the sequence-parallel ops stay out of the compiled graphs; the
options parse (the boolean flag of earlier versions included)."""

import pytest
import torch

from lasp.kernels.compiled import eager_under_compile
from lasp.launch.compile import compile_blocks
from lasp.launch.config import load_config, validate
from lasp.layers.ops import linear_attention_op
from lasp.loss import chunk_loss
from lasp.models import LinearLlamaForCausalLM, linear_llama_config
from lasp.models import checkpointing
from tests.distributed import run_distributed

# aot_eager: Dynamo and AOTAutograd's forward/backward split as under inductor, without the C++
# compile of each graph (inductor works here too; it takes minutes on a shared CPU).
BACKEND = "aot_eager"


def _loss_and_grads(model, ids):
    model.zero_grad()
    loss = model(ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _tiny(activation_checkpointing):
    torch.manual_seed(0)
    config = linear_llama_config("tiny", layer_pattern="LN", activation_checkpointing=activation_checkpointing)
    return LinearLlamaForCausalLM(config), torch.randint(0, config.vocab_size, (1, 96))


def _assert_same(expected, got, tol):
    (loss0, grads0), (loss1, grads1) = expected, got
    assert torch.allclose(loss0, loss1, rtol=0, atol=tol)
    for name, grad in grads0.items():
        assert torch.allclose(grad, grads1[name], rtol=0, atol=tol), name


@pytest.mark.parametrize("activation_checkpointing", [False, True, "selective"])
def test_compiled_blocks_match_eager(activation_checkpointing, monkeypatch):
    decisions = []
    rule = checkpointing.keeps_output
    monkeypatch.setattr(checkpointing, "keeps_output", lambda op, n: decisions.append(op) or rule(op, n))
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model, ids = _tiny(activation_checkpointing)
    eager = _loss_and_grads(model, ids)
    assert compile_blocks(model, backend=BACKEND) == len(model.blocks()) == 3
    assert model.chunk_loss is not chunk_loss  # the loss's per-chunk scoring compiled too
    decisions.clear()
    for _ in range(2):  # the tracing step, then the compiled graphs as they are
        _assert_same(eager, _loss_and_grads(model, ids), 1e-5)
    assert not torch._dynamo.utils.counters["graph_break"]  # each block one graph, attention included
    # Selective: the checkpoint is inside the compiled graph, so its policy saw the traced matmuls.
    assert (torch.ops.aten.mm.default in decisions) == (activation_checkpointing == "selective")
    assert set(model.state_dict()) == set(_tiny(False)[0].state_dict())  # names unchanged


def test_sequence_parallel_ops_run_eagerly_under_compile():
    """The single-device op compiles into its caller's graph; a sequence-parallel op
    (`eager_under_compile`) breaks it and runs as it is: its body never sees a tracer."""
    torch._dynamo.reset()
    q, k, v = (torch.randn(1, 32, 2, 16) for _ in range(3))
    explained = torch._dynamo.explain(lambda q, k, v: linear_attention_op(q.sin(), k, v).cos())(q, k, v)
    assert explained.graph_count == 1 and explained.graph_break_count == 0
    seen = []
    sp_op = eager_under_compile(lambda x: seen.append(torch.compiler.is_compiling()) or x * 2)
    explained = torch._dynamo.explain(lambda q: sp_op(q.sin()).cos())(q)
    assert explained.graph_count == 2 and explained.graph_break_count == 1
    assert seen and not any(seen)
    assert torch.allclose(torch.compile(lambda q: sp_op(q.sin()).cos(), backend=BACKEND)(q), (q.sin() * 2).cos())


def _compiled_sequence_parallel_body(rank, W):
    import lasp
    from lasp.parallel import SequenceLayout
    from tests.parallel.test_lasp2 import documents

    def run(compiled):
        torch.manual_seed(0)
        model = LinearLlamaForCausalLM(linear_llama_config("tiny", vocab_size=64, layer_pattern="LMDN",
                                                           router_aux_loss_coef=0.5)).double()
        lasp.parallelize(model, kind="zigzag")
        if compiled:
            torch._dynamo.reset()
            torch._dynamo.utils.counters.clear()
            compile_blocks(model, backend=BACKEND)
        T = 2 * W * 5
        ids = torch.randint(0, 64, (1, T), generator=torch.Generator().manual_seed(1))
        batch = lasp.shard_batch(ids, layout=SequenceLayout(T, W, rank, "zigzag"), cu_seqlens=documents(T, 5, W))
        loss = lasp.causal_lm_loss(model, batch, chunk_size=4)
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters()}

    _assert_same(run(False), run(True), 1e-12)
    breaks = torch._dynamo.utils.counters["graph_break"]
    # Only where a sequence-parallel op runs eagerly (torch.compiler.disable): no collective,
    # wait or host read of LASP-2's or MoM's was traced.
    assert breaks and all("disable" in reason for reason in breaks), [reason.splitlines()[0] for reason in breaks]


def test_sequence_parallel_model_compiles_around_its_collectives():
    """A parallelized model with linear, MoM (its load-balancing loss too), Gated DeltaNet
    and softmax layers, blocks compiled, on 2 gloo ranks: its loss and gradients are the
    eager model's, and its graphs break only at the sequence-parallel ops."""
    run_distributed(_compiled_sequence_parallel_body, 2)


def test_selective_checkpointing_matches_full_and_keeps_every_other_matmul(monkeypatch):
    decisions = []  # (matmuls before, kept) of each matmul, per pass (forward, recompute)
    rule = checkpointing.keeps_output
    monkeypatch.setattr(checkpointing, "keeps_output", lambda op, n: (
        decisions.append((n, rule(op, n))) if op in checkpointing.MATMULS else None) or rule(op, n))
    model, ids = _tiny(True)
    full = _loss_and_grads(model, ids)
    model.config.activation_checkpointing = "selective"
    _assert_same(full, _loss_and_grads(model, ids), 1e-6)
    assert decisions and all(kept == (n % 2 == 0) for n, kept in decisions)
    assert {kept for _, kept in decisions} == {True, False}  # some matmuls kept, some recomputed
    with pytest.raises(ValueError, match="activation_checkpointing"):
        checkpointing.checkpoint_context_fn("sometimes")


def test_options(tmp_path):
    assert load_config([]).model.activation_checkpointing == "none" and not load_config([]).model.compile
    assert load_config(["--activation-checkpointing"]).model.activation_checkpointing == "full"
    assert load_config(["--activation-checkpointing", "--steps", "3"]).model.activation_checkpointing == "full"
    assert load_config(["--activation-checkpointing", "selective"]).model.activation_checkpointing == "selective"
    assert load_config(["--no-activation-checkpointing"]).model.activation_checkpointing == "none"
    path = tmp_path / "run.yaml"
    for text, mode in (("true", "full"), ("false", "none"), ("selective", "selective")):
        path.write_text(f"model:\n  activation_checkpointing: {text}\n  compile: true\n")
        config = load_config(["--config", str(path)])
        assert (config.model.activation_checkpointing, config.model.compile) == (mode, True)
    validate(load_config(["--compile", "--activation-checkpointing", "full"]), world_size=2)
    with pytest.raises(ValueError, match="--activation-checkpointing must be one of none, full, selective"):
        validate(load_config(["--activation-checkpointing", "yes"]), world_size=2)
    validate(load_config(["--compile", "--activation-checkpointing", "selective", "--sp-size", "1"]), world_size=2)
    with pytest.raises(ValueError, match="selective needs --sp-size 1 and a lasp preset"):
        validate(load_config(["--compile", "--activation-checkpointing", "selective", "--sp-size", "2"]),
                 world_size=2)
