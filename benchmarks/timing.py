"""What the benchmarks share: medians of compiled calls, the benchmark MLP and batch, the JSON and
the command line of a benchmark module."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable, Iterable

import jax
import jax.numpy as jnp
import optax
from jax import lax

from natgrad.experiments import cli, models
from natgrad.experiments.report import machine_info as machine

__all__ = [
    "median_seconds",
    "applied",
    "setup",
    "machine",
    "write_json",
    "command",
    "compilation_cache",
]


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


def applied(linear: Callable, v, times: int):
    """`linear` applied `times` times from the pytree `v` in a `lax.fori_loop`, each result
    normalised, so nothing folds or overflows: the loop that times a linear map's application."""

    def body(_, u):
        w = linear(u)
        return optax.tree.scale(1.0 / (optax.tree.norm(w) + 1e-30), w)

    return lax.fori_loop(0, times, body, v)


def setup(sizes, batch_size: int):
    """(params, apply_fn, batch, loss): `natgrad.experiments.models.mlp` of `sizes` (He init from
    PRNGKey(0); layers declared to K-FAC), a batch of uniform [0, 1) inputs with random labels
    (PRNGKey(1)), float32, and its softmax cross-entropy."""
    model = models.mlp(sizes)
    kx, ky = jax.random.split(jax.random.PRNGKey(1))
    x = jax.random.uniform(kx, (batch_size, sizes[0]), jnp.float32)
    y = jax.random.randint(ky, (batch_size,), 0, sizes[-1])
    return model.init(jax.random.PRNGKey(0)), model.apply, (x, y), model.loss


def compilation_cache() -> None:
    """JAX's persistent compilation cache of the `natgrad` command, only when $NATGRAD_CACHE_DIR is
    set: by default the benchmarks compile afresh, so that their ``compile_seconds`` measure
    compilation rather than reads of a cache filled by an earlier run."""
    if os.environ.get("NATGRAD_CACHE_DIR"):
        cli.compilation_cache(cli.cache_dir())


def write_json(out_dir: str, name: str, payload: dict) -> str:
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, name)
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)
    return path


def command(argv, doc: str, name: str, run: Callable, show: Callable[[dict], Iterable[str]]):
    """A benchmark module's `main`: ``[--quick] [--out results/bench]``; ``run(quick)``, then
    ``<name>.json`` written to --out and the lines of `show(payload)` printed."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default="results/bench")
    args = parser.parse_args(argv)
    payload = run(args.quick)
    path = write_json(args.out, f"{name}.json", payload)
    print(*show(payload), f"wrote {path}", sep="\n")
    return payload
