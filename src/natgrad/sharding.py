r"""Data parallelism with JAX's own SPMD: a `Mesh`, `NamedSharding` and `jax.jit`.

natgrad needs no parallel code of its own. Every curvature product is a batch mean,
(1/B) Σ_i J_iᵀ M_i J_i v, and every gradient too; when the batch is sharded over a mesh axis
and the parameters are replicated, `jax.jit` partitions the per-example work and XLA inserts
the all-reduces for the sums over the batch. CG's inner products are on replicated vectors, so
every device runs the same CG and agrees on every step.

    mesh = natgrad.sharding.batch_mesh()              # all devices on one "batch" axis
    params = natgrad.sharding.replicate(params, mesh)
    batch = natgrad.sharding.shard_batch((x, y), mesh)
    params, state = jax.jit(train_step)(params, state, batch)   # unchanged user code

Across hosts, call `jax.distributed.initialize()` first on every host (same program on each);
`jax.devices()` then lists every host's devices, the mesh spans them, and each host feeds its
own slice of the global batch with `jax.make_array_from_process_local_data`.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

__all__ = ["BATCH_AXIS", "batch_mesh", "shard_batch", "replicate", "batch_sharding"]

BATCH_AXIS = "batch"
PyTree = Any


def batch_mesh(num_devices: int | None = None, *, devices=None) -> Mesh:
    """A 1-D mesh with axis "batch" over the first `num_devices` devices (default: all)."""
    devices = list(jax.devices() if devices is None else devices)
    if num_devices is not None:
        if not isinstance(num_devices, int) or not 1 <= num_devices <= len(devices):
            raise ValueError(
                f"num_devices: expected an integer in [1, {len(devices)}] (the devices "
                f"available), got {num_devices!r}"
            )
        devices = devices[:num_devices]
    return Mesh(np.asarray(devices), (BATCH_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Split the leading (batch) axis over the mesh's "batch" axis."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXIS))


def shard_batch(batch: PyTree, mesh: Mesh) -> PyTree:
    """Place every array of `batch` with its leading axis split over the devices.

    The batch size must be a multiple of the number of devices.
    """
    size = mesh.shape[BATCH_AXIS]
    for leaf in jax.tree.leaves(batch):
        if np.ndim(leaf) == 0 or np.shape(leaf)[0] % size:
            raise ValueError(
                f"batch: the leading dimension of every array must be a multiple of the "
                f"{size} devices, got shape {np.shape(leaf)}"
            )
    return jax.device_put(batch, batch_sharding(mesh))


def replicate(tree: PyTree, mesh: Mesh) -> PyTree:
    """A full copy of `tree` (parameters, optimiser state) on every device of the mesh."""
    return jax.device_put(tree, NamedSharding(mesh, PartitionSpec()))
