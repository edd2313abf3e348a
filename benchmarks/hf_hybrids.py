"""transformers hybrids on one GPU: the lasp-wrapped model against the HF model's own path
(issue 21), training steps at ~1B parameters and 64K tokens.

    python benchmarks/hf_hybrids.py                          # every family, bf16, 64K tokens
    python benchmarks/hf_hybrids.py --models minimax,qwen3_next --native-max-tokens 65536
    python benchmarks/hf_hybrids.py --shared-gpu-ranks 2 --models minimax   # W = 2 on GPU 0 over gloo
    python benchmarks/hf_hybrids.py --device cpu --tiny --models minimax,lfm2   # CPU smoke run (fp32)

Each family is built at random from `AutoConfig.for_model` at a ~1B shape like its released
models (`CONFIGS`: hidden 2048, 16-24 layers in the family's mix of linear and softmax
layers, its head dims, MoE with 8 experts; one 32K vocabulary for all, so that the
embeddings stay 0.13B and the native path's full logits fit), in bf16, with activation
checkpointing (transformers' own, per decoder layer; `--no-checkpointing` turns it off).
In the same process, on the same weights (the wrapped model is a deepcopy, W = 1):

- native: ``model(input_ids, labels=input_ids).loss`` and backward, transformers' path
  (here mostly its torch fallbacks: no mamba_ssm / causal_conv1d; fla, where installed,
  refuses GDN's backward on triton 3.6 / Hopper). It runs at min(--tokens,
  --native-max-tokens) tokens, under a time limit (--native-timeout-s; checked between
  Python operations, so a backward pass in progress finishes first; over it, again at a
  quarter of the length, `NATIVE_RETRY_SHORTER`) and with out-of-memory and errors
  caught, so one family cannot eat the device budget; the JSON says why it did not run
  when it did not;
- lasp: ``lasp.causal_lm_loss(model, lasp.shard_batch(...))`` and backward, at --tokens
  and, when native ran shorter, again at native's length (same batches as native).

Per run: median step time (CUDA events after --warmup steps) as tokens/s, peak memory
(`torch.cuda.max_memory_allocated`, reset per run; it includes both models' weights and
any gradients they hold: `resident_gb`), and the loss of each step (one batch per step,
the same for both paths). Compared at native's length: the largest relative loss
difference over the steps, and ‖∇lasp − ∇native‖/‖∇native‖ over all parameters after the
last step (the stronger check: a random model's loss sits near log(vocab)); `loss_ok`
against a bf16-noise bound (`LOSS_TOL`). In bf16 two correct paths can differ in some
gradients by far more than bf16's rounding (routers pick other experts, Mamba-2's A_log
sums over every token), so the gradients are also held to an fp32 run of the native model
on the last batch (`fp32_reference`): `grad_ok` when lasp's distance to it is within
`GRAD_FLOOR_FACTOR` × native's own (or `GRAD_TOL`).

--shared-gpu-ranks W: W ranks on GPU 0 over gloo (NCCL refuses two ranks on one device),
the first of --models wrapped at W ranks in both layouts against the same model wrapped at
W = 1 on each rank: loss and every parameter gradient (summed over the ranks), the
gradients also against W = 1 in fp32, as above (W = 1 in bf16 gives the floor). With
--device cpu the ranks share the CPU (the smoke test).

--tiny: the small configs of examples/hf/make_configs.py, for CPU smoke runs (Triton's
interpreter, fp32).

Writes hf_hybrids.json (hf_hybrids_shared.json for --shared-gpu-ranks) with the device,
versions, shapes and results to --out (default $OUT, else benchmarks/results/), rewritten
after each family so that a run cut short keeps what it measured; prints a table last.
--time-budget-s skips the families not yet started once it is spent.
"""

from __future__ import annotations

import argparse
import copy
import gc
import importlib.util
import json
import os
import platform
import signal
import socket
import statistics
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if not torch.cuda.is_available():          # Triton kernels on CPU run under the interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

import lasp  # noqa: E402
from lasp.layers import SPContext  # noqa: E402
from lasp.parallel import SequenceLayout  # noqa: E402

VOCAB = 32768
MOE = dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=512, shared_expert_intermediate_size=512)
GDN = dict(linear_num_key_heads=16, linear_num_value_heads=32, linear_key_head_dim=128, linear_value_head_dim=128,
           linear_conv_kernel_dim=4)


def every(n_layers: int, period: int, softmax: str, linear: str, first: int | None = None) -> list[str]:
    """`n_layers` layer types: `softmax` at every `period`-th layer (from `first`, default the
    period's last), `linear` elsewhere."""
    first = period - 1 if first is None else first
    return [softmax if i % period == first % period else linear for i in range(n_layers)]


# The ~1B shapes: hidden 2048 and the released models' layer mix and head dims (the source
# model in each comment); what is not set keeps transformers' default.
CONFIGS = {
    # MiniMax-Text-01: lightning attention with one softmax layer in 8, 128-dim heads, top-2 MoE
    "minimax": dict(hidden_size=2048, num_hidden_layers=16, layer_types=every(16, 8, "full_attention",
                    "linear_attention"), num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                    intermediate_size=1024, num_local_experts=8, num_experts_per_tok=2, block_size=256),
    # LFM2-1.2B (its real shape): 10 gated short convolutions, 6 softmax layers, 64-dim heads
    "lfm2": dict(hidden_size=2048, num_hidden_layers=16, full_attn_idxs=[2, 5, 8, 10, 12, 14],
                 num_attention_heads=32, num_key_value_heads=8, intermediate_size=12288, conv_L_cache=3),
    # Bamba-9B: 1 softmax layer in ~10, Mamba-2 with 64-dim heads, 1 group, state 128
    "bamba": dict(hidden_size=2048, num_hidden_layers=20, attn_layer_indices=[9, 19], num_attention_heads=16,
                  num_key_value_heads=8, intermediate_size=4096, mamba_n_heads=64, mamba_d_head=64,
                  mamba_n_groups=1, mamba_d_state=128, mamba_expand=2),
    # Nemotron-H / Nemotron-3-Nano pattern: Mamba-2 (8 groups, state 128) alternating with MoE, 2 softmax
    "nemotron_h": dict(hidden_size=2048, hybrid_override_pattern="ME" * 3 + "M*" + "EM" * 4 + "E*" + "ME" * 3,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=128, mamba_num_heads=64,
                       mamba_head_dim=64, n_groups=8, ssm_state_size=128, n_routed_experts=8, num_experts_per_tok=2,
                       moe_intermediate_size=1024, moe_shared_expert_intermediate_size=1024),
    # Granite-4.0-H: 1 softmax layer in 10, Mamba-2 (1 group, state 128), MoE with a shared expert
    "granitemoehybrid": dict(hidden_size=2048, num_hidden_layers=20, layer_types=every(20, 10, "attention", "mamba"),
                             num_attention_heads=16, num_key_value_heads=4, mamba_n_heads=64, mamba_d_head=64,
                             mamba_n_groups=1, mamba_d_state=128, mamba_expand=2, num_local_experts=8,
                             num_experts_per_tok=2, intermediate_size=512, shared_intermediate_size=1024),
    # Zamba2-1.2B: Mamba-2 layers and a shared softmax block every 6th layer
    "zamba2": dict(hidden_size=2048, num_hidden_layers=24, layers_block_type=every(24, 6, "hybrid", "mamba"),
                   n_mamba_heads=64, mamba_ngroups=1, mamba_d_state=64, mamba_expand=2, num_attention_heads=32,
                   num_key_value_heads=32, intermediate_size=8192, adapter_rank=128, use_mem_rope=True),
    # Falcon-H1-1.5B: softmax and Mamba-2 side by side in every layer (state 128 here, 256 released)
    "falcon_h1": dict(hidden_size=2048, num_hidden_layers=24, num_attention_heads=8, num_key_value_heads=2,
                      head_dim=128, intermediate_size=4096, mamba_d_ssm=3072, mamba_n_heads=48, mamba_d_head=64,
                      mamba_n_groups=1, mamba_d_state=128),
    # Qwen3-Next: 3 Gated DeltaNet : 1 gated softmax (256-dim heads), 16 key / 32 value heads, MoE
    "qwen3_next": dict(hidden_size=2048, num_hidden_layers=16, layer_types=every(16, 4, "full_attention",
                       "linear_attention"), num_attention_heads=16, num_key_value_heads=2, head_dim=256, **GDN,
                       **MOE),
    "qwen3_5_text": dict(hidden_size=2048, num_hidden_layers=16, layer_types=every(16, 4, "full_attention",
                         "linear_attention"), num_attention_heads=16, num_key_value_heads=4, head_dim=256,
                         intermediate_size=6144, **GDN),
    "qwen3_5_moe_text": dict(hidden_size=2048, num_hidden_layers=16, layer_types=every(16, 4, "full_attention",
                             "linear_attention"), num_attention_heads=16, num_key_value_heads=2, head_dim=256,
                             **GDN, **MOE),
    # OLMo-Hybrid: 3 GDN (β in (0, 2), key 96 / value 192 dims) : 1 softmax
    "olmo_hybrid": dict(hidden_size=2048, num_hidden_layers=16, layer_types=every(16, 4, "full_attention",
                        "linear_attention"), num_attention_heads=16, num_key_value_heads=16,
                        intermediate_size=6144, linear_num_key_heads=16, linear_num_value_heads=16,
                        linear_key_head_dim=96, linear_value_head_dim=192, pad_token_id=0, eos_token_id=1),
    # Kimi Linear: 3 KDA (128-dim heads) : 1 MLA, dense first MLP then MoE with a shared expert
    "kimi_linear": dict(hidden_size=2048, num_hidden_layers=16, layer_types=every(16, 4, "full_attention",
                        "linear_attention"), mlp_layer_types=["dense"] + ["sparse"] * 15, intermediate_size=8192,
                        num_attention_heads=16, num_key_value_heads=16, kv_lora_rank=512, qk_nope_head_dim=128,
                        qk_rope_head_dim=64, v_head_dim=128,
                        linear_attn_config=dict(head_dim=128, num_heads=16, short_conv_kernel_size=4),
                        num_experts=8, num_experts_per_token=2, moe_intermediate_size=768, num_shared_experts=1,
                        pad_token_id=None, bos_token_id=None, eos_token_id=None),
}
FAMILIES = tuple(CONFIGS)
LOSS_TOL = {torch.bfloat16: 1e-2, torch.float32: 1e-4}   # native vs lasp, relative
GRAD_TOL = {torch.bfloat16: 5e-2, torch.float32: 1e-3}
GRAD_FLOOR_FACTOR = 1.5     # bf16 lasp's gradient distance to fp32 over the bf16 reference's
SHARED_TIMEOUT_S = 480      # --shared-gpu-ranks: a rank still running after this is killed
# A native run over its time limit is tried again NATIVE_RETRY_SHORTER times shorter, down to
# NATIVE_MIN_TOKENS (transformers' torch fallback of Gated DeltaNet took over 45 s at 8K on an H100).
NATIVE_RETRY_SHORTER, NATIVE_MIN_TOKENS = 4, 512


def tiny_configs() -> dict:
    """The small configs of `examples/hf/make_configs.py` (hidden 256, 4 layers), for --tiny."""
    spec = importlib.util.spec_from_file_location("make_configs", ROOT / "examples/hf/make_configs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.CONFIGS


def build_model(family: str, args):
    """A random causal LM of `family` on `args.device` in `args.dtype` (seeded)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = dict(tiny_configs()[family] if args.tiny else CONFIGS[family], vocab_size=args.vocab)
    config = AutoConfig.for_model(family, **fields)
    kwargs = dict(dtype=args.dtype)
    if args.device == "cpu" and any(getattr(config, n, 0) for n in ("num_experts", "num_local_experts",
                                                                     "n_routed_experts")):
        kwargs["experts_implementation"] = "eager"     # grouped-mm experts need a GPU
    torch.manual_seed(args.seed)
    with torch.device(args.device):
        model = AutoModelForCausalLM.from_config(config, **kwargs)
    if args.checkpointing:      # transformers' per-layer checkpointing (renamed in 5.x)
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model, fields


def batches(T: int, n: int, args) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(args.seed + T)
    return [torch.randint(0, args.vocab, (1, T), generator=generator).to(args.device) for _ in range(n)]


def native_step(model, ids):
    """transformers' own training step: its loss (labels shifted inside), backward."""
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach()


def lasp_step(model, ids):
    """lasp's training step at W = 1: `causal_lm_loss` on the whole sequence, backward."""
    model.zero_grad(set_to_none=True)
    loss = lasp.causal_lm_loss(model, lasp.shard_batch(ids, layout=SequenceLayout(ids.shape[1], 1, 0)))
    loss.backward()
    return loss.detach()


class StepTimeout(Exception):
    pass


@contextmanager
def time_limit(seconds: float | None):
    """Raise StepTimeout in this (main) thread after `seconds`: transformers' torch fallbacks
    are Python loops, so the signal lands between their operations (a backward pass in
    progress, run by autograd's own threads on CUDA, finishes first)."""
    if not seconds:
        yield
        return

    def expire(signum, frame):
        raise StepTimeout(f"over the {seconds:g} s limit")
    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure(step, model, steps_ids, args, limit_s: float | None = None) -> dict:
    """Warm-up steps, then one timed step per batch: median ms, tokens/s, peak memory and the
    losses; or {"skipped": why} on out-of-memory, the time limit, or an error."""
    T = steps_ids[0].shape[1]
    cuda = args.device == "cuda"
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    resident = torch.cuda.memory_allocated() / 2**30 if cuda else None
    started = time.perf_counter()
    timed_out = False
    try:
        with time_limit(limit_s):
            for _ in range(args.warmup):
                step(model, steps_ids[0])
            sync(args.device)
            times, losses = [], []
            for ids in steps_ids:
                if cuda:
                    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    begin.record()
                    losses.append(step(model, ids))
                    end.record()
                    end.synchronize()
                    times.append(begin.elapsed_time(end) / 1e3)
                else:
                    t0 = time.perf_counter()
                    losses.append(step(model, ids))
                    times.append(time.perf_counter() - t0)
    except torch.OutOfMemoryError:
        why = f"out of memory at {T} tokens"
    except StepTimeout as error:
        why, timed_out = f"{error} at {T} tokens ({args.warmup} warm-up + {len(steps_ids)} steps)", True
    except Exception as error:  # a path that refuses this stack (e.g. fla's GDN backward) is a result
        why = f"{type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"
    else:
        seconds = statistics.median(times)
        return dict(tokens=T, step_ms=[t * 1e3 for t in times], median_ms=seconds * 1e3, tokens_per_s=T / seconds,
                    peak_gb=torch.cuda.max_memory_allocated() / 2**30 if cuda else None, resident_gb=resident,
                    losses=torch.stack(losses).float().tolist(), wall_s=time.perf_counter() - started)
    model.zero_grad(set_to_none=True)
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return dict(tokens=T, skipped=why, timed_out=timed_out, wall_s=time.perf_counter() - started)


def gradient_error(model, reference) -> dict:
    """‖∇model − ∇reference‖ / ‖∇reference‖ over all parameters, and the worst parameter's."""
    diff = norm = 0.0
    worst, worst_err = None, -1.0
    for (name, p), ref in zip(model.named_parameters(), reference.parameters()):
        if ref.grad is None or p.grad is None:
            continue
        d, n = (p.grad.double() - ref.grad.double()).square().sum(), ref.grad.double().square().sum()
        diff, norm = diff + d, norm + n
        err = (d / n.clamp_min(1e-300)).sqrt().item()
        if err > worst_err:
            worst, worst_err = name, err
    return dict(all=(diff / norm).sqrt().item(), worst_param=worst, worst=worst_err)


def fp32_verdict(floor: dict, error: dict, args) -> dict:
    """The gradients against an fp32 run: `floor` the bf16 reference's distance to it,
    `error` lasp's; `grad_ok` when lasp's is within GRAD_FLOOR_FACTOR × the floor (or GRAD_TOL)."""
    return dict(grad_rel_diff_to_fp32=dict(reference_bf16=floor, lasp=error),
                grad_ok=error["all"] <= max(GRAD_TOL[args.dtype], GRAD_FLOOR_FACTOR * floor["all"]))


def native_fp32(native, wrapped, ids, args) -> dict:
    """The native model upcast to fp32, one native step on `ids` (the batch whose gradients
    both bf16 models hold), and `fp32_verdict`; why not, when it cannot run."""
    reference = copy.deepcopy(native).float()
    run = measure(native_step, reference, [ids], argparse.Namespace(**{**vars(args), "warmup": 0}),
                  limit_s=args.native_timeout_s)
    verdict = dict(fp32_reference=run) if "skipped" in run else dict(
        fp32_loss=run["losses"][0], **fp32_verdict(gradient_error(native, reference), gradient_error(wrapped, reference),
                                                   args))
    del reference
    gc.collect()
    return verdict


def run_family(family: str, args) -> dict:
    """Build, wrap, measure lasp and native (see the module docstring); a dict for the JSON."""
    native, fields = build_model(family, args)
    wrapped = lasp.parallelize(copy.deepcopy(native))
    config = native.config
    layer_types = getattr(config, "layer_types", None) or getattr(config, "layers_block_type", None) or []
    record = dict(family=family, shapes=fields, layer_mix=dict(Counter(layer_types)),
                  params=sum(p.numel() for p in native.parameters()), dtype=str(args.dtype).removeprefix("torch."),
                  checkpointing=args.checkpointing)
    T, T_native = args.tokens, min(args.tokens, args.native_max_tokens)
    record["lasp"] = measure(lasp_step, wrapped, batches(T, args.steps, args), args)
    wrapped.zero_grad(set_to_none=True)
    while True:
        native_ids = batches(T_native, args.steps, args)
        record["native"] = measure(native_step, native, native_ids, args, limit_s=args.native_timeout_s)
        if not record["native"].get("timed_out") or T_native // NATIVE_RETRY_SHORTER < NATIVE_MIN_TOKENS:
            break
        record.setdefault("native_over_time", []).append(record["native"])
        T_native //= NATIVE_RETRY_SHORTER
    if T_native != T:
        why = "its time limit" if "native_over_time" in record else "--native-max-tokens"
        record["native_note"] = f"native at {T_native} tokens ({why}), lasp at both {T} and {T_native}"
        record["lasp_at_native_tokens"] = measure(lasp_step, wrapped, native_ids, args)
    same_length = record.get("lasp_at_native_tokens", record["lasp"])
    if "losses" in record["native"] and "losses" in same_length:
        rel = [abs(a - b) / abs(b) for a, b in zip(same_length["losses"], record["native"]["losses"])]
        grads = gradient_error(wrapped, native)    # both hold the gradients of the last native batch
        record["compare"] = dict(tokens=T_native, loss_rel_diff=max(rel), grad_rel_diff=grads,
                                 loss_ok=max(rel) < LOSS_TOL[args.dtype], grad_ok=grads["all"] < GRAD_TOL[args.dtype])
        if args.dtype != torch.float32:
            record["compare"].update(native_fp32(native, wrapped, native_ids[-1], args))
    del native, wrapped
    gc.collect()
    if args.device == "cuda":
        torch.cuda.empty_cache()
    return record


def environment(args) -> dict:
    import transformers
    info = dict(device=torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu",
                torch=torch.__version__, transformers=transformers.__version__, python=platform.python_version())
    if importlib.util.find_spec("triton") is not None:
        import triton
        info["triton"] = triton.__version__
    for optional in ("fla", "mamba_ssm", "causal_conv1d"):   # what transformers' native paths would use
        info[f"has_{optional}"] = importlib.util.find_spec(optional) is not None
    return info


def write(name: str, record: dict, args) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / name, "w") as f:
        json.dump(record, f, indent=1)


def fmt(x, spec=".3g"):
    return "-" if x is None else format(x, spec)


def to_fp32(compare: dict) -> str:
    """lasp's / the bf16 reference's gradient distance to the fp32 run, or '-'."""
    d = compare.get("grad_rel_diff_to_fp32")
    return "-" if d is None else f"{d['lasp']['all']:.1e}/{d['reference_bf16']['all']:.1e}"


def print_table(rows: list[dict]) -> None:
    print("\nfamily            params  tokens(lasp/native)  lasp tok/s  lasp@native tok/s  native tok/s"
          "  peak GB lasp/native  loss rel diff  grad rel diff  to fp32 lasp/native  grad ok")
    for r in rows:
        if "skipped" in r:
            print(f"{r['family']:<17} skipped: {r['skipped']}")
            continue
        lasp_run, native = r["lasp"], r["native"]
        short = r.get("lasp_at_native_tokens", lasp_run)
        compare = r.get("compare", {})
        native_speed = native["skipped"][:60] if "skipped" in native else fmt(native.get("tokens_per_s"), ".4g")
        print(f"{r['family']:<17} {r['params'] / 1e9:5.2f}B  {lasp_run['tokens']:>8}/{native['tokens']:<8}    "
              f"{lasp_run.get('skipped') or fmt(lasp_run.get('tokens_per_s'), '.4g'):>10}  "
              f"{short.get('skipped') or fmt(short.get('tokens_per_s'), '.4g'):>17}  {native_speed:>12}  "
              f"{fmt(lasp_run.get('peak_gb'), '.1f'):>8}/{fmt(native.get('peak_gb'), '.1f'):<8}  "
              f"{fmt(compare.get('loss_rel_diff'), '.1e'):>13}  "
              f"{fmt(compare.get('grad_rel_diff', {}).get('all'), '.1e'):>13}  {to_fp32(compare):>19}  "
              f"{compare.get('grad_ok', '-')}")


def benchmark(args) -> list[dict]:
    record = dict(environment(args), args={k: str(v) for k, v in vars(args).items()}, families=[])
    started = time.monotonic()
    for family in args.models:
        if time.monotonic() - started > args.time_budget_s:
            record["families"].append(dict(family=family, skipped=f"--time-budget-s {args.time_budget_s} spent"))
            continue
        print(f"{family} ...", flush=True)
        try:
            record["families"].append(run_family(family, args))
        except Exception as error:  # e.g. a model that does not build here: the next family still runs
            record["families"].append(dict(family=family, skipped=f"{type(error).__name__}: {error}"[:300]))
            gc.collect()
        write("hf_hybrids.json", record, args)
    write("hf_hybrids.json", record, args)
    print_table(record["families"])
    return record["families"]


# ---- --shared-gpu-ranks: W ranks on one device over gloo ----------------------------------

def _loss_and_grads(model, ids, layout) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    loss = lasp.causal_lm_loss(model, lasp.shard_batch(ids, layout=layout))
    loss.backward()
    return loss.detach()


def shared_rank(rank: int, world_size: int, port: int, args, results) -> None:
    """One rank: the model wrapped at W ranks (both layouts) against itself wrapped at W = 1."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if args.device == "cuda":
        torch.cuda.set_device(0)
        from torch import _dynamo
        _dynamo.config.cache_size_limit = 64   # LASP-2H's flex attention compiles once per shape
    else:
        torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        family = args.models[0]
        model, _ = build_model(family, args)
        T = args.tokens
        ids = batches(T, 1, args)[0]
        reference = lasp.parallelize(copy.deepcopy(model), SPContext(1, 0))
        ref_loss = _loss_and_grads(reference, ids, SequenceLayout(T, 1, 0))
        reference32 = None
        if args.dtype != torch.float32:
            reference32 = lasp.parallelize(copy.deepcopy(model).float(), SPContext(1, 0))
            _loss_and_grads(reference32, ids, SequenceLayout(T, 1, 0))
            floor = gradient_error(reference, reference32)
        rows = []
        for kind in ("contiguous", "zigzag"):
            lasp.parallelize(model, kind=kind)
            t0 = time.perf_counter()
            loss = _loss_and_grads(model, ids, SequenceLayout(T, world_size, rank, kind))
            sync(args.device)
            step_s = time.perf_counter() - t0
            lasp.sum_gradients(model)
            dist.all_reduce(loss)
            grads = gradient_error(model, reference)
            loss_rel = (abs(loss.double() - ref_loss.double()) / abs(ref_loss.double())).item()
            rows.append(dict(family=family, kind=kind, world_size=world_size, tokens=T, loss=loss.item(),
                             loss_w1=ref_loss.item(), loss_rel_diff=loss_rel, grad_rel_diff=grads,
                             step_s_incl_compile=step_s, loss_ok=loss_rel < LOSS_TOL[args.dtype],
                             grad_ok=grads["all"] < GRAD_TOL[args.dtype]))
            if reference32 is not None:
                rows[-1].update(fp32_verdict(floor, gradient_error(model, reference32), args))
        if rank == 0:
            results.put(rows)
    finally:
        dist.destroy_process_group()


def shared_gpu(args) -> list[dict]:
    """Spawn `--shared-gpu-ranks` ranks on GPU 0 (or the CPU) over gloo; rows of rank 0."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    W = args.shared_gpu_ranks
    procs = [ctx.Process(target=shared_rank, args=(r, W, port, args, results)) for r in range(W)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(SHARED_TIMEOUT_S)
    for p in procs:
        if p.is_alive():      # a peer failed and left it waiting in a collective
            p.kill()
            p.join()
    if any(p.exitcode != 0 for p in procs):
        raise SystemExit(f"a rank failed (its traceback is above): exit codes {[p.exitcode for p in procs]}")
    rows = results.get(timeout=10)
    record = dict(environment(args), args={k: str(v) for k, v in vars(args).items()}, rows=rows,
                  note=f"{W} ranks on {'GPU 0' if args.device == 'cuda' else 'the CPU'} over gloo")
    write("hf_hybrids_shared.json", record, args)
    print(f"\n{rows[0]['family']}: W = {W} ranks sharing one device over gloo against W = 1 "
          f"({rows[0]['tokens']} tokens, {record['args']['dtype']})")
    print(f"layout      loss rel diff  grad rel diff (all)  {f'to fp32 W={W}/W=1':>15}  grad ok  worst parameter")
    for r in rows:
        g = r["grad_rel_diff"]
        print(f"{r['kind']:<11} {r['loss_rel_diff']:13.1e}  {g['all']:19.1e}  {to_fp32(r):>15}  {str(r['grad_ok']):>7}  "
              f"{g['worst_param']} {g['worst']:.1e}")
    return rows


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", default=",".join(FAMILIES), help="comma-separated model types")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cuda", "cpu"))
    p.add_argument("--tiny", action="store_true", help="examples/hf/make_configs.py's small configs (CPU smoke run)")
    p.add_argument("--tokens", type=int,
                   help="sequence length of lasp's run (default 65536; --shared-gpu-ranks 16384; --tiny 64)")
    p.add_argument("--native-max-tokens", type=int, help="longest native run (default 8192, --tiny 32)")
    p.add_argument("--native-timeout-s", type=float, default=45.0,
                   help="time limit of each native run, warm-up included")
    p.add_argument("--warmup", type=int, help="warm-up steps per run (default 1, --tiny 0)")
    p.add_argument("--steps", type=int, default=2, help="timed steps per run, one batch each")
    p.add_argument("--vocab", type=int, help=f"vocabulary (default {VOCAB}, --tiny 512)")
    p.add_argument("--no-checkpointing", dest="checkpointing", action="store_false")
    p.add_argument("--time-budget-s", type=float, default=300.0,
                   help="start no family after this many seconds (the rest are listed as skipped)")
    p.add_argument("--shared-gpu-ranks", type=int, default=0, help="W ranks on one device over gloo (first model)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "benchmarks/results"))
    args = p.parse_args(argv)
    args.models = [m for m in args.models.split(",") if m]
    unknown = [m for m in args.models if m not in FAMILIES]
    if unknown or not args.models:
        p.error(f"--models: unknown {unknown}; choose from {','.join(FAMILIES)}")
    small = args.tiny
    args.tokens = args.tokens or (64 if small else 16384 if args.shared_gpu_ranks else 65536)
    args.native_max_tokens = args.native_max_tokens or (32 if small else 8192)
    args.warmup = (0 if small else 1) if args.warmup is None else args.warmup
    args.vocab = args.vocab or (512 if small else VOCAB)
    args.dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    if args.shared_gpu_ranks and args.tokens % (2 * args.shared_gpu_ranks):
        p.error(f"--tokens {args.tokens} must split into 2 x {args.shared_gpu_ranks} segments")
    return args


def main(argv=None):
    args = parse_args(argv)
    return shared_gpu(args) if args.shared_gpu_ranks else benchmark(args)


if __name__ == "__main__":
    main()
