"""Configuration: defaults < file (YAML, TOML) < options; every option in --help; clear errors
for configurations that cannot run, raised before any process starts."""

from dataclasses import fields

import pytest

from lasp.launch.config import SECTIONS, Config, build_parser, load_config, validate
from lasp.launch.train import main


def test_defaults_are_the_embedded_run():
    config = load_config([])
    assert config == Config()
    assert (config.model.name, config.model.layer_pattern, config.parallel.sp_size, config.data.dataset,
            config.data.tokenizer) == ("tiny", "LLN", 2, "stdlib", "byte")
    validate(config, world_size=2)


@pytest.mark.parametrize("suffix,text", [
    (".yaml", "data:\n  seq_len: 512\n  streaming: true\ntrain:\n  lr: 1e-3\n  steps: 7\n"
              "model:\n  model_overrides: {hidden_size: 32}\n"),
    (".toml", "[data]\nseq_len = 512\nstreaming = true\n[train]\nlr = 1e-3\nsteps = 7\n"
              "[model]\nmodel_overrides = {hidden_size = 32}\n"),
])
def test_file_then_options(tmp_path, suffix, text):
    path = tmp_path / f"run{suffix}"
    path.write_text(text)
    config = load_config(["--config", str(path), "--steps", "9", "--no-shuffle", "--sp-size", "4",
                          "--peak-tflops", "none"])
    assert config.data.seq_len == 512 and config.data.streaming is True  # from the file
    assert config.train.lr == 1e-3  # YAML reads "1e-3" as a string: coerced to a float
    assert config.model.model_overrides == {"hidden_size": 32}
    assert config.train.steps == 9 and config.data.shuffle is False and config.parallel.sp_size == 4  # options win
    assert config.metrics.peak_tflops is None and config.train.warmup_steps == Config().train.warmup_steps


def test_help_documents_every_option(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    text = capsys.readouterr().out
    for section, cls in SECTIONS.items():
        assert f"\n{section}:" in text
        for f in fields(cls):
            flag = f.metadata["flag"] or "--" + f.name.replace("_", "-")
            assert flag in text, flag
    assert "--model NAME" in text and "--sp-size" in text and "--max-restarts" in text
    assert "--shuffle, --no-shuffle" in text and "--activation-checkpointing [TEXT]" in text


def test_bad_values(tmp_path):
    with pytest.raises(ValueError, match="--steps: expected int"):
        load_config(["--steps", "many"])
    with pytest.raises(ValueError, match="--model-overrides: expected a mapping"):
        load_config(["--model-overrides", "[1]"])
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  stepz: 3\n")
    with pytest.raises(ValueError, match=r"unknown fields in section 'train': \['stepz'\]"):
        load_config(["--config", str(path)])
    path.write_text("trainer:\n  steps: 3\n")
    with pytest.raises(ValueError, match="unknown sections"):
        load_config(["--config", str(path)])
    with pytest.raises(ValueError, match="--config: no such file"):
        load_config(["--config", str(tmp_path / "missing.yaml")])
    path.write_text("train:\n  steps: 3\n lr: [1\n")  # malformed: one line that says where
    with pytest.raises(ValueError, match=r"^--config .*bad.yaml: not valid YAML: .* at line 3, column 2$"):
        load_config(["--config", str(path)])
    toml = tmp_path / "bad.toml"
    toml.write_text("[train]\nsteps = \n")
    with pytest.raises(ValueError, match=r"^--config .*bad.toml: not valid TOML: .*line 2"):
        load_config(["--config", str(toml)])


@pytest.mark.parametrize("args,world_size,message", [
    (["--sp-size", "4"], 6, r"--sp-size 4 does not divide the world size 6"),
    (["--sp-size", "2", "--seq-len", "1026"], 2, r"--seq-len 1026 must be a positive multiple of 4 \(the zigzag"),
    (["--sp-size", "4", "--layout", "contiguous", "--seq-len", "1026"], 4, r"--seq-len 1026 must be a positive multiple of 4"),
    (["--dataset", "data/missing.jsonl"], 2, r"--dataset: no such data file: data/missing.jsonl"),
    (["--model", "llama-70b"], 2, r"--model 'llama-70b': unknown model; choose from linear-llama3-1b, tiny"),
    (["--layer-pattern", "LXN"], 2, r"--layer-pattern LXN: .*unknown layer kind 'X'"),
    (["--model-overrides", '{"hidden_sise": 8}'], 2, r"--model-overrides: unknown LinearLlamaConfig fields"),
    (["--layout", "ring"], 2, r"--layout must be one of contiguous, zigzag"),
    (["--nnodes", "2"], 4, r"--nnodes 2 needs --rdzv-endpoint"),
    (["--resume", "/no/such/checkpoint"], 2, r"--resume '/no/such/checkpoint': not a checkpoint directory"),
    (["--lr", "-0.1"], 2, r"^--lr must be a finite number > 0, got -0.1$"),
    (["--lr", "nan"], 2, r"^--lr must be a finite number > 0, got nan$"),
    (["--weight-decay", "-0.01"], 2, r"^--weight-decay must be a finite number >= 0, got -0.01$"),
    (["--min-lr-ratio", "5"], 2, r"^--min-lr-ratio must be a finite number in \[0, 1\], got 5.0$"),
    (["--grad-clip", "-1"], 2, r"^--grad-clip must be a finite number >= 0, got -1.0$"),
    (["--seed", "-1"], 2, r"^--seed must be >= 0, got -1$"),
    (["--zero-stage", "4"], 2, r"^--zero-stage must be in \[0, 3\], got 4$"),
    (["--peak-tflops", "0"], 2, r"^--peak-tflops must be a finite number > 0, got 0.0$"),
    (["--nnodes", "0"], 2, r"^--nnodes must be N or MIN:MAX with 1 <= MIN <= MAX, got '0'$"),
    (["--nnodes", "2:1", "--rdzv-endpoint", "h:1"], 2, r"^--nnodes must be N or MIN:MAX"),
    (["--nnodes", "2", "--rdzv-endpoint", "host:port"], 4, r"^--rdzv-endpoint must be HOST or HOST:PORT"),
    (["--split", " "], 2, r"^--split must not be empty$"),
    (["--dist-backend", "mpi"], 2, r"^--dist-backend must be one of auto, nccl, gloo; got 'mpi'$"),
    (["--dist-backend", "nccl", "--device", "cpu"], 2, r"^--dist-backend nccl needs CUDA GPUs"),
    (["--model-overrides", '{"hidden_size": "big"}'], 2, r"^--model tiny --layer-pattern LLN --model-overrides "
                                                                 r"\{\"hidden_size\": \"big\"\}: TypeError"),
])
def test_bad_configurations(args, world_size, message):
    with pytest.raises(ValueError, match=message):
        validate(load_config(args), world_size)


def test_dist_backend():
    """auto is gloo on CPU (nccl on CUDA); gloo is accepted anywhere (on CUDA, processes share GPUs)."""
    from lasp.launch.config import resolve_backend
    assert resolve_backend(load_config(["--device", "cpu"])) == "gloo"
    config = load_config(["--device", "cpu", "--dist-backend", "gloo"])
    validate(config, world_size=2)
    assert resolve_backend(config) == "gloo"


def test_text_files_are_documents(tmp_path):
    """Each .txt file is one document: fewer files than data-parallel ranks is an error that says so
    (before spawning; and in each worker, where the world size is elastic)."""
    from lasp.launch.config import DataConfig
    from lasp.launch.data import ByteTokenizer, build_data
    (tmp_path / "book.txt").write_text("one long document\n" * 20)
    message = (rf"--dataset {tmp_path}/book.txt: 1 document\(s\) for 2 data-parallel ranks \(each "
               r".txt/.py/.md file is one document, each line of a .jsonl file one\)")
    with pytest.raises(ValueError, match=message):
        validate(load_config(["--dataset", str(tmp_path / "book.txt"), "--sp-size", "1"]), world_size=2)
    validate(load_config(["--dataset", str(tmp_path / "book.txt"), "--sp-size", "2"]), world_size=2)  # dp = 1
    with pytest.raises(ValueError, match=message):
        build_data(DataConfig(dataset=str(tmp_path / "book.txt"), seq_len=16), ByteTokenizer(), 0, 1, 2)


def test_command_fails_fast_before_spawning(capsys):
    """The command reports a bad configuration and exits 2 without starting processes."""
    assert main(["--nproc-per-node", "3", "--sp-size", "2"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "lasp-train: error: --sp-size 2 does not divide the world size 3 (processes per node × nodes)"
    assert main(["--seq-len", "1004", "--sp-size", "4", "--nproc-per-node", "4"]) == 2
    assert "--seq-len 1004 must be a positive multiple of 8" in capsys.readouterr().err
    for args in (["--lr", "-0.1"], ["--weight-decay", "-1"], ["--min-lr-ratio", "5"], ["--grad-clip", "-1"]):
        assert main(args) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"lasp-train: error: {args[0]} must be") and err.count("\n") == 1, err
