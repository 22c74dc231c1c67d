"""Pipelines: micro-batching, the cut into stages, schedules run in one process or across ranks."""
