"""The launcher's configuration: dataclasses, a YAML/TOML file, and command-line overrides.

Precedence: the defaults below (the embedded default run) < the config file < options.
The file has one table per section (`model`, `data`, `parallel`, `train`, `checkpoint`,
`metrics`, `launch`); every field is also a command-line option, `--field-name` (field
names are unique across sections), so

    lasp-train --config run.yaml --sp-size 4 --seq-len 65536

reads `run.yaml` and then sets `parallel.sp_size` and `data.seq_len`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import typing
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path


def option(default, help: str, flag: str | None = None, bare=None):
    """A config field with its --help text (and its option name when not `--field-name`).
    `bare`: the value of the option given without one (then --no-OPTION, or false in a file,
    gives the default, and true `bare`)."""
    kwargs = {"default_factory": default} if callable(default) else {"default": default}
    return field(metadata={"help": help, "flag": flag, "bare": bare}, **kwargs)


@dataclass
class ModelConfig:
    name: str = option("tiny", "lasp model preset: tiny | linear-llama3-1b; or hf:PATH, a local directory with a "
                               "transformers config.json (and its safetensors weights, else random init) of a "
                               "model type lasp.parallelize supports", flag="--model")
    layer_pattern: str = option("LLN", "layer kinds repeated over the depth: L linear attention, G gated "
                                       "linear attention (GLA), D Gated DeltaNet, K Kimi Delta Attention (KDA), "
                                       "N softmax attention, M Mixture-of-Memories (LLN: hybrid, one softmax "
                                       "layer in three; the LASP-2 paper uses LLLN)")
    activation_checkpointing: str = option("none", "recompute each block in the backward: none | full | selective "
                                                   "(keeps attention outputs and every other matmul's, recomputes "
                                                   "the rest); without a value: full", bare="full")
    activation_checkpointing_blocks: typing.Optional[int] = option(
        None, "with --activation-checkpointing: checkpoint only the first N blocks; the later ones keep their "
              "activations: less recompute for more memory (default: every block; lasp presets)")
    compile: bool = option(False, "torch.compile each block (one graph with its attention op at --sp-size 1; "
                                  "under sequence parallelism the attention ops run eagerly between its graphs); "
                                  "with --activation-checkpointing selective: --sp-size 1, lasp presets")
    offload_activations: bool = option(False, "with --activation-checkpointing: keep each block's checkpointed input "
                                              "(and the final norm's and the loss's) in pinned host memory until "
                                              "the backward (long sequences on few GPUs; lasp presets)")
    tile_tokens: int = option(0, "run each block's norms and MLP over the sequence in tiles of N tokens, each "
                                 "recomputed in the backward: their [T, intermediate] activations never exist "
                                 "whole (0: no tiling; lasp presets)")
    model_overrides: dict = option(dict, "more LinearLlamaConfig fields (the transformers config's with "
                                         "hf:PATH), as a mapping (JSON on the command line), e.g. "
                                         "'{\"num_hidden_layers\": 8}'")


@dataclass
class DataConfig:
    dataset: str = option("stdlib", "'stdlib' (this Python's standard-library source files: real text, "
                                    "offline), 'synthetic' (random tokens, for benchmarks), local files "
                                    "(.txt/.py/.md, .jsonl/.json, .parquet; globs, comma-separated) or a "
                                    "Hugging Face hub dataset name")
    dataset_config: typing.Optional[str] = option(None, "hub dataset configuration (subset) name")
    split: str = option("train", "dataset split")
    text_field: str = option("text", "the column holding each document's text (JSONL / parquet / hub)")
    streaming: bool = option(False, "stream the dataset instead of preparing it (large corpora)")
    shuffle: bool = option(True, "shuffle documents (by --seed; a buffer of 10,000 when streaming)")
    tokenizer: str = option("byte", "'byte' (UTF-8 bytes + an end-of-document token, no download) or a "
                                    "Hugging Face tokenizer name or path")
    seq_len: int = option(2048, "tokens per packed sequence (split across the SP group)")


@dataclass
class ParallelConfig:
    sp_size: int = option(2, "sequence-parallel degree; the data-parallel degree is world size / sp-size")
    layout: str = option("zigzag", "how a sequence is split over the SP group: zigzag | contiguous")
    engine: str = option("fsdp", "fsdp (FSDP2, parameters and optimizer state sharded over all ranks) | "
                                 "deepspeed (ZeRO; pip install 'lasp[deepspeed]')")
    zero_stage: int = option(2, "DeepSpeed ZeRO stage 0-3 (with --engine deepspeed)")
    device: str = option("auto", "auto (CUDA if available) | cuda | cpu")
    dist_backend: str = option("auto", "process-group backend: auto (nccl on CUDA, gloo on CPU) | nccl | gloo; "
                                       "gloo on CUDA lets several processes share a GPU (local rank r uses GPU "
                                       "r mod the GPUs of the node): slow, for tests on one GPU")
    dtype: str = option("auto", "compute dtype: auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32; parameters, "
                                "optimizer state and gradient reduction stay fp32")
    timeout: float = option(600.0, "collective timeout in seconds (NCCL watchdog)")


@dataclass
class TrainConfig:
    steps: int = option(100, "optimizer steps (one packed sequence per data-parallel rank each)")
    lr: float = option(3e-3, "peak learning rate (AdamW), > 0")
    warmup_steps: int = option(5, "linear warm-up steps, then cosine decay")
    min_lr_ratio: float = option(0.1, "final learning rate as a fraction of --lr, in [0, 1]")
    weight_decay: float = option(0.1, "AdamW weight decay, >= 0")
    grad_clip: float = option(1.0, "clip the global gradient norm to this (0: no clipping)")
    seed: int = option(0, "seed of the model initialisation and the data order, >= 0")


@dataclass
class CheckpointConfig:
    output_dir: str = option("lasp-run", "where metrics and checkpoints go (shared by all nodes); one job at a "
                                         "time: the job holds <output-dir>/.lock while it runs")
    checkpoint_every: int = option(0, "save a checkpoint every N steps and at the end (0: never; a stop by "
                                      "SIGTERM / SIGINT always saves one)")
    keep_last: int = option(2, "keep the last N checkpoints")
    resume: str = option("auto", "auto (the newest checkpoint in --output-dir that loads; a damaged one is "
                                 "renamed step_N.damaged) | none | a checkpoint directory. A resumed run "
                                 "takes --steps, --lr, --warmup-steps, --min-lr-ratio, --weight-decay and "
                                 "--grad-clip from this command, not from the checkpoint, and says which "
                                 "changed")


@dataclass
class MetricsConfig:
    log_every: int = option(10, "steps between progress updates (each one waits for the GPU)")
    profile_step: int = option(0, "record this step with torch.profiler: its per-op table (device time, "
                                  "then host time) goes to <output-dir>/profile_step_N.txt (0: none; the "
                                  "step waits for the device)")
    tensorboard: bool = option(True, "also write TensorBoard events, if tensorboard is installed")
    peak_tflops: typing.Optional[float] = option(None, "peak dense TFLOP/s of one device for MFU (default: "
                                                       "from the device name)")


@dataclass
class LaunchConfig:
    nproc_per_node: typing.Optional[int] = option(None, "processes per node (default: the GPUs of the node, "
                                                        "or --sp-size on CPU); ignored under torchrun")
    nnodes: str = option("1", "nodes, or MIN:MAX for an elastic job (torchrun --nnodes)")
    rdzv_endpoint: str = option("", "HOST:PORT of the rendezvous (multi-node; torchrun --rdzv-endpoint)")
    rdzv_id: str = option("lasp", "job id shared by all nodes (torchrun --rdzv-id)")
    max_restarts: int = option(0, "restart all workers this many times after a failure; each restart "
                                  "resumes from the last checkpoint (torchrun --max-restarts)")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)


SECTIONS = {f.name: f.default_factory for f in fields(Config)}


def _options():
    """(section, field, type, flag) of every option, in --help order."""
    out = []
    for section, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        for f in fields(cls):
            flag = f.metadata["flag"] or "--" + f.name.replace("_", "-")
            out.append((section, f, hints[f.name], flag))
    return out


def _coerce(flag: str, value, kind):
    """`value` (from the command line or a file) as a `kind`, or a ValueError naming the option."""
    optional = typing.get_origin(kind) is typing.Union
    if optional:
        kind = next(a for a in typing.get_args(kind) if a is not type(None))
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
    try:
        if kind is dict:
            value = json.loads(value) if isinstance(value, str) else value
            if not isinstance(value, dict):
                raise TypeError
            return value
        if kind is bool:
            if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
                return value.lower() in ("true", "1", "yes")
            if not isinstance(value, bool):
                raise TypeError
            return value
        if kind is int and (isinstance(value, bool) or isinstance(value, float) and not value.is_integer()):
            raise TypeError
        if kind is str and not isinstance(value, (str, int)):
            raise TypeError
        return kind(value)
    except (TypeError, ValueError, json.JSONDecodeError):
        raise ValueError(f"{flag}: expected {'a mapping' if kind is dict else kind.__name__}"
                         f"{' or none' if optional else ''}, got {value!r}") from None


def read_config_file(path: str) -> dict:
    """The sections of a YAML (.yaml/.yml) or TOML (.toml) config file (ValueError, in one line,
    for a file that does not parse)."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"--config: no such file: {path}")
    if p.suffix not in (".toml", ".yaml", ".yml"):
        raise ValueError(f"--config {path}: use a .yaml, .yml or .toml file")
    try:
        text = p.read_text()
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"--config {path}: cannot read it: {error}") from None
    if p.suffix == ".toml":
        if sys.version_info >= (3, 11):
            import tomllib
        else:
            import tomli as tomllib
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as error:
            raise ValueError(f"--config {path}: not valid TOML: {error}") from None
    else:
        import yaml
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(error, "problem", None) or " ".join(str(error).split())
            raise ValueError(f"--config {path}: not valid YAML: {problem}{where}") from None
    if not isinstance(data, dict):
        raise ValueError(f"--config {path}: expected a mapping of sections {sorted(SECTIONS)}")
    return data


METAVARS = {int: "N", float: "X", str: "TEXT", dict: "JSON"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lasp-train", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train a linear-attention or hybrid LM with sequence parallelism (LASP-2 / LASP-2H).\n"
                    "Without arguments: a tiny hybrid Linear-Llama on this Python's standard library,\n"
                    "2 processes, SP = 2, a few minutes on a CPU. Runs under torchrun, or launches its\n"
                    "own processes (--nproc-per-node, --nnodes, --rdzv-endpoint, --max-restarts).",
        epilog="Every option can also be set in the --config file, under its section, by its field name\n"
               "(e.g. parallel: {sp_size: 4}). Command-line options override the file.\n\n"
               "SIGTERM or Ctrl-C: every rank finishes its step (or the next), writes a checkpoint, and the\n"
               "job exits with 128 + the signal number; the same command resumes. A second one stops at once.")
    parser.add_argument("--config", metavar="FILE", help="YAML or TOML file with the sections below")
    for section in SECTIONS:
        group = parser.add_argument_group(section)
        for sec, f, kind, flag in _options():
            if sec != section:
                continue
            default = f.default_factory() if f.default is MISSING else f.default
            help_text = f"{f.metadata['help']} (default: {default!r})".replace("%", "%%")
            if kind is bool:
                group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction,
                                   default=argparse.SUPPRESS, help=help_text)
            elif f.metadata["bare"] is not None:
                group.add_argument(flag, dest=f.name, nargs="?", const=f.metadata["bare"], default=argparse.SUPPRESS,
                                   metavar=METAVARS[kind], help=help_text)
                group.add_argument("--no-" + flag[2:], dest=f.name, action="store_const", const=default,
                                   default=argparse.SUPPRESS, help=argparse.SUPPRESS)
            else:
                base = next((a for a in typing.get_args(kind) if a is not type(None)), kind)  # Optional[X]: X
                metavar = "NAME" if f.metadata["flag"] else METAVARS[base]
                group.add_argument(flag, dest=f.name, default=argparse.SUPPRESS, metavar=metavar, help=help_text)
    return parser


def load_config(argv: list[str] | None = None) -> Config:
    """The Config of a command line: defaults < --config file < options (ValueError if invalid)."""
    args = vars(build_parser().parse_args(argv))
    config = Config()
    file = read_config_file(args.pop("config")) if args.get("config") else {}
    args.pop("config", None)
    unknown = set(file) - set(SECTIONS)
    if unknown:
        raise ValueError(f"--config: unknown sections {sorted(unknown)}; use {sorted(SECTIONS)}")
    for section, values in file.items():
        if not isinstance(values, dict):
            raise ValueError(f"--config: section {section!r} must be a mapping of its fields")
    by_section = {}
    for section, f, kind, flag in _options():
        value = file.get(section, {}).pop(f.name, MISSING)
        value = args.pop(f.name, value)
        if f.metadata["bare"] is not None and isinstance(value, bool):  # a file's true / false
            value = f.metadata["bare"] if value else f.default
        if value is not MISSING:
            by_section.setdefault(section, {})[f.name] = _coerce(flag, value, kind)
    for section, values in file.items():
        if values:
            raise ValueError(f"--config: unknown fields in section {section!r}: {sorted(values)}")
    return replace(config, **{s: replace(getattr(config, s), **v) for s, v in by_section.items()})


def under_torchrun() -> bool:
    """Whether this process is a worker started by torchrun (torch.distributed.run)."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def resolve_device(config: Config) -> str:
    """'cuda' or 'cpu' for --device (auto: CUDA when a GPU is visible)."""
    import torch
    if config.parallel.device not in ("auto", "cuda", "cpu"):
        raise ValueError(f"--device must be auto, cuda or cpu, got {config.parallel.device!r}")
    if config.parallel.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA GPU is visible")
    if config.parallel.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return config.parallel.device


def resolve_backend(config: Config) -> str:
    """'nccl' or 'gloo' for --dist-backend (auto: nccl on CUDA, gloo on CPU)."""
    _check_choice("--dist-backend", config.parallel.dist_backend, ("auto", "nccl", "gloo"))
    device = resolve_device(config)
    if config.parallel.dist_backend == "auto":
        return "nccl" if device == "cuda" else "gloo"
    if config.parallel.dist_backend == "nccl" and device != "cuda":
        raise ValueError("--dist-backend nccl needs CUDA GPUs; use gloo (or auto) with --device cpu")
    return config.parallel.dist_backend


def resolve_nproc_per_node(config: Config) -> int:
    """--nproc-per-node, or the node's GPUs (CUDA), or --sp-size processes (CPU)."""
    if config.launch.nproc_per_node is not None:
        return config.launch.nproc_per_node
    if resolve_device(config) == "cuda":
        import torch
        return torch.cuda.device_count()
    return config.parallel.sp_size


def planned_world_size(config: Config) -> int | None:
    """The world size of this job: torchrun's, or nproc-per-node × nnodes (None if elastic)."""
    if under_torchrun():
        return int(os.environ["WORLD_SIZE"])
    if not config.launch.nnodes.isdigit():
        return None
    return resolve_nproc_per_node(config) * int(config.launch.nnodes)


def _check_choice(flag, value, choices):
    if value not in choices:
        raise ValueError(f"{flag} must be one of {', '.join(choices)}; got {value!r}")


def _check_range(flag, value, low, high=None, *, above=False):
    """`value` >= `low` (> with `above`), <= `high` if given, and finite; NaN fails."""
    in_range = (value > low if above else value >= low) and (high is None or value <= high)
    if not (in_range and math.isfinite(value)):
        bound = f"in [{low}, {high}]" if high is not None else f"{'>' if above else '>='} {low}"
        raise ValueError(f"{flag} must be {'a finite number ' if isinstance(value, float) else ''}{bound}, "
                         f"got {value}")


CHECKPOINT_MODES = ("none", "full", "selective")
NNODES = re.compile(r"(\d+)(?::(\d+))?")  # N or MIN:MAX
ENDPOINT = re.compile(r"([^\s:\[\]]+|\[[0-9a-fA-F:.]+\])(:\d+)?")  # HOST, HOST:PORT, [IPv6]:PORT


def _check_nodes(launch: LaunchConfig) -> None:
    match = NNODES.fullmatch(launch.nnodes)
    low, high = (int(match[1]), int(match[2] or match[1])) if match else (0, 0)
    if not 1 <= low <= high:
        raise ValueError(f"--nnodes must be N or MIN:MAX with 1 <= MIN <= MAX, got {launch.nnodes!r}")
    if launch.nnodes != "1" and not launch.rdzv_endpoint and not under_torchrun():
        raise ValueError(f"--nnodes {launch.nnodes} needs --rdzv-endpoint HOST:PORT (the same on every node)")
    if launch.rdzv_endpoint and not ENDPOINT.fullmatch(launch.rdzv_endpoint):
        raise ValueError(f"--rdzv-endpoint must be HOST or HOST:PORT, got {launch.rdzv_endpoint!r}")


def _check_gpus_per_process(config: Config, backend: str) -> None:
    """NCCL needs a GPU of its own for each process of a node."""
    if resolve_device(config) != "cuda" or backend != "nccl":
        return
    import torch
    local = int(os.environ["LOCAL_WORLD_SIZE"]) if under_torchrun() else resolve_nproc_per_node(config)
    gpus = torch.cuda.device_count()
    if local > gpus:
        raise ValueError(f"--nproc-per-node {local} > the {gpus} GPU(s) of this node: NCCL needs one GPU per "
                         "process (--dist-backend gloo lets processes share a GPU: slow, for tests)")


def validate(config: Config, world_size: int | None) -> None:
    """Raise a ValueError naming the option for a configuration that cannot run.

    Runs before any process is spawned (and again in each worker): every option is checked
    here, except what needs the data or the process group (a hub dataset or tokenizer name).
    """
    from lasp.launch.data import check_dataset
    from lasp.launch.model import check_model
    from lasp.parallel.layout import KINDS

    p, d, t, c, m, launch = (config.parallel, config.data, config.train, config.checkpoint, config.metrics,
                             config.launch)
    if config.model.offload_activations and config.model.activation_checkpointing == "none":
        raise ValueError("--offload-activations needs --activation-checkpointing (it offloads the checkpointed inputs)")
    blocks = config.model.activation_checkpointing_blocks
    if ((config.model.offload_activations or config.model.tile_tokens or blocks is not None)
            and config.model.name.startswith("hf:")):
        raise ValueError("--offload-activations, --tile-tokens and --activation-checkpointing-blocks apply to lasp "
                         "presets, not --model hf:PATH")
    _check_range("--tile-tokens", config.model.tile_tokens, 0)
    if blocks is not None:
        _check_range("--activation-checkpointing-blocks", blocks, 0)
        if config.model.offload_activations:
            raise ValueError("--offload-activations needs every block checkpointed (no --activation-checkpointing-"
                             "blocks): the others would send every activation to the host")
    _check_choice("--activation-checkpointing", config.model.activation_checkpointing, CHECKPOINT_MODES)
    if config.model.compile and config.model.activation_checkpointing == "selective":
        # The checkpoint must sit inside the compiled graph (lasp.launch.compile): LASP-2's ops break
        # it, and a Hugging Face model checkpoints its layers from outside.
        if p.sp_size > 1 or config.model.name.startswith("hf:"):
            raise ValueError("--compile with --activation-checkpointing selective needs --sp-size 1 and a lasp "
                             "preset: under sequence parallelism the attention ops break the compiled graph, and "
                             "the policy would see none of its matmuls (use full there)")
    check_model(config.model)
    _check_choice("--layout", p.layout, KINDS)
    _check_choice("--engine", p.engine, ("fsdp", "deepspeed"))
    _check_choice("--dtype", p.dtype, ("auto", "bf16", "fp32"))
    _check_range("--zero-stage", p.zero_stage, 0, 3)
    _check_gpus_per_process(config, resolve_backend(config))
    _check_range("--sp-size", p.sp_size, 1)
    if launch.nproc_per_node is not None:
        _check_range("--nproc-per-node", launch.nproc_per_node, 1)
    _check_nodes(launch)
    if world_size is not None and world_size % p.sp_size:
        raise ValueError(f"--sp-size {p.sp_size} does not divide the world size {world_size} "
                         "(processes per node × nodes)")
    segments = p.sp_size * (2 if p.layout == "zigzag" else 1)
    if d.seq_len < 1 or d.seq_len % segments:
        raise ValueError(f"--seq-len {d.seq_len} must be a positive multiple of {segments} (the {p.layout} "
                         f"layout cuts a sequence into {'2 × ' if p.layout == 'zigzag' else ''}sp-size "
                         "equal segments)")
    check_dataset(d, dp_size=None if world_size is None else world_size // p.sp_size)
    if d.tokenizer != "byte":
        try:
            import transformers  # noqa: F401
        except ImportError:
            raise ValueError(f"--tokenizer {d.tokenizer}: needs Hugging Face transformers (or use byte)") from None
    for flag, value in (("--split", d.split), ("--text-field", d.text_field), ("--output-dir", c.output_dir)):
        if not value.strip():
            raise ValueError(f"{flag} must not be empty")
    for flag, value, low in (("--steps", t.steps, 1), ("--warmup-steps", t.warmup_steps, 0),
                             ("--weight-decay", t.weight_decay, 0), ("--grad-clip", t.grad_clip, 0),
                             ("--seed", t.seed, 0), ("--checkpoint-every", c.checkpoint_every, 0),
                             ("--keep-last", c.keep_last, 1), ("--log-every", m.log_every, 1),
                             ("--profile-step", m.profile_step, 0),
                             ("--max-restarts", launch.max_restarts, 0), ("--timeout", p.timeout, 1)):
        _check_range(flag, value, low)
    _check_range("--lr", t.lr, 0, above=True)
    _check_range("--min-lr-ratio", t.min_lr_ratio, 0, 1)
    if m.peak_tflops is not None:
        _check_range("--peak-tflops", m.peak_tflops, 0, above=True)
    if Path(c.output_dir).exists() and not Path(c.output_dir).is_dir():
        raise ValueError(f"--output-dir {c.output_dir}: a file, not a directory")
    if c.resume not in ("auto", "none") and not Path(c.resume).is_dir():
        raise ValueError(f"--resume {c.resume!r}: not a checkpoint directory (or use auto | none)")
    if p.engine == "deepspeed":
        try:
            import deepspeed  # noqa: F401
        except ImportError:
            raise ValueError("--engine deepspeed needs DeepSpeed: pip install 'lasp[deepspeed]'") from None
