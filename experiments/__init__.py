"""Experiments on top of the trainer: entry scripts that import train_gpt and replace or extend parts of it
(blocks, losses, quantization roles) without copying it (docs/experiments.md). Each runs under torchrun exactly like
train_gpt.py, writes the same log, artifact and run_summary.json, and tools/build_record.py packs it into one
self-contained record file."""
