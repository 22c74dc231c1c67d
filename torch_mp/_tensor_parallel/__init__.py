"""Tensor parallelism: plans, module swaps, sequence parallelism, sharding specs, mixture-of-experts."""
