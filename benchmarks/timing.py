"""What the benchmarks share: medians of compiled calls, the benchmark MLP and batch, the JSON."""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp

from natgrad.experiments import models
from natgrad.experiments.report import machine_info as machine

__all__ = ["median_seconds", "mlp", "batch", "machine", "write_json"]


def median_seconds(fn: Callable, *args, repeats: int = 20, warmup: int = 2) -> float:
    """Median wall time of `fn(*args)` (already jitted) after compilation, outputs blocked."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def mlp(sizes, key):
    """(params, apply) of `natgrad.experiments.models.mlp` (He init; layers declared to K-FAC)."""
    model = models.mlp(sizes)
    return model.init(key), model.apply


def batch(key, size, in_dim=784, num_classes=10, dtype=jnp.float32):
    kx, ky = jax.random.split(key)
    return jax.random.uniform(kx, (size, in_dim), dtype), jax.random.randint(
        ky, (size,), 0, num_classes
    )


def write_json(out_dir: str, name: str, payload: dict) -> str:
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, name)
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)
    return path
