"""Data-parallel natural gradient with JAX's own SPMD: the same training step, a sharded batch.

    python examples/data_parallel.py --devices 4          # emulates 4 CPU devices if needed

The training step is ordinary user code under `jax.jit`; only where the arrays live changes:
parameters and optimiser state are replicated, the batch is split over a "batch" mesh axis, and
XLA inserts the all-reduces for the batch means inside the gradient and every curvature product.

Multi-host: run this same script on every host after `jax.distributed.initialize()` (it reads
the coordinator address, process count and id from the cluster environment or arguments);
`jax.devices()` then spans all hosts, and each host builds its slice of the global batch with
`jax.make_array_from_process_local_data(natgrad.sharding.batch_sharding(mesh), local_batch)`.
"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv=None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=4)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=128)
    args = parser.parse_args(argv)
    if "jax" not in sys.modules and "xla_force_host_platform_device_count" not in os.environ.get(
        "XLA_FLAGS", ""
    ):  # CPU only: pretend to have several devices (must happen before jax is imported)
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "")
            + f" --xla_force_host_platform_device_count={args.devices}"
        )

    import jax
    import jax.numpy as jnp

    import natgrad
    from natgrad.experiments import training

    loss = natgrad.losses.softmax_cross_entropy()
    sizes = (784, 128, 10)
    key = jax.random.PRNGKey(0)
    params = [
        {
            "w": jax.random.normal(jax.random.fold_in(key, i), (m, n)) * (2 / m) ** 0.5,
            "b": jnp.zeros(n),
        }
        for i, (m, n) in enumerate(zip(sizes[:-1], sizes[1:], strict=True))
    ]

    def apply_fn(params, x):
        for layer in params[:-1]:
            x = jax.nn.relu(x @ layer["w"] + layer["b"])
        return x @ params[-1]["w"] + params[-1]["b"]

    # A learnable synthetic problem: labels from a fixed random linear teacher.
    teacher = jax.random.normal(jax.random.PRNGKey(1), (784, 10))

    def make_batch(i):
        x = jax.random.uniform(jax.random.PRNGKey(100 + i), (args.batch_size, 784))
        return x, jnp.argmax(x @ teacher, axis=-1)

    opt = natgrad.natural_gradient(apply_fn, loss)

    step = jax.jit(training.make_step(opt, apply_fn, loss))  # grad, update, apply_updates

    mesh = natgrad.sharding.batch_mesh(args.devices)
    params = natgrad.sharding.replicate(params, mesh)
    state = natgrad.sharding.replicate(opt.init(params), mesh)
    for i in range(args.steps):
        batch = natgrad.sharding.shard_batch(make_batch(i), mesh)
        params, state, value = step(params, state, batch, None)
        if i % 10 == 0 or i == args.steps - 1:
            print(f"step {i:3d}  loss {float(value):.4f}  devices {len(batch[0].devices())}")
    return float(value)


if __name__ == "__main__":
    main()
