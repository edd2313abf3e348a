"""The training launcher behind `lasp-train` (config, data, checkpoints, metrics)."""
