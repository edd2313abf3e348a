"""The training launcher behind `lasp-train` (`python -m lasp.launch.train`).

- `config`: the options (dataclasses), a YAML/TOML file, command-line overrides, checks.
- `data`: documents through Hugging Face `datasets` (or synthetic), the byte tokenizer,
  packing with `cu_seqlens`, data-parallel shards, a resumable reading position.
- `model`: the Linear-Llama preset a run trains, and the blocks the engine shards.
- `mesh`: processes, the data-parallel × sequence-parallel mesh, FSDP2 / DeepSpeed engines.
- `checkpoint`: sharded, atomic checkpoints and exact resume.
- `metrics`: progress, JSONL, TensorBoard, MFU.
- `process`: stopping on SIGTERM / SIGINT, workers that die with the launcher, the output
  directory's lock.
- `train`: the loop and `main()`.
"""
