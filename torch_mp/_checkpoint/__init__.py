"""Checkpoints: save/load of sharded models, the format, safetensors files, full state dicts."""
