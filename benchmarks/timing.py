"""Timing and models shared by the benchmarks: medians of repeated, compiled, blocked calls."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp

from natgrad import layers


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


def mlp(sizes, key, dtype=jnp.float32):
    """A ReLU MLP as ([{"w", "b"}, ...], apply)."""
    params = []
    for i, (m, n) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        k = jax.random.fold_in(key, i)
        params.append(
            {
                "w": (jax.random.normal(k, (m, n)) * (2 / m) ** 0.5).astype(dtype),
                "b": jnp.zeros(n, dtype),
            }
        )

    def apply(params, x):  # layers.dense is x @ w + b, declared to K-FAC
        for layer in params[:-1]:
            x = jax.nn.relu(layers.dense(layer, x))
        return layers.dense(params[-1], x)

    return params, apply


def batch(key, size, in_dim=784, num_classes=10, dtype=jnp.float32):
    kx, ky = jax.random.split(key)
    return jax.random.uniform(kx, (size, in_dim), dtype), jax.random.randint(
        ky, (size,), 0, num_classes
    )


def machine() -> dict:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "devices": len(jax.devices()),
    }


def write_json(out_dir: str, name: str, payload: dict) -> str:
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, name)
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)
    return path
