r"""Preconditioners for CG: cheap approximations M ≈ C + λI whose inverse is applied to residuals.

A preconditioner for natgrad's optimisers is a `Preconditioner(init, update)` pair, like an optax
transformation:

    state = precond.init(params)
    apply_inverse, state = precond.update(state, params, batch, apply_fn=..., loss=...,
                                          damping=λ, key=key)
    natgrad.solvers.cg(matvec, b, preconditioner=apply_inverse)

`update` runs once per optimiser step (it may keep running statistics in `state`, as K-FAC does);
`apply_inverse(r)` then maps a pytree r to M⁻¹ r and is called once per CG iteration.

``martens_diagonal`` is the preconditioner of Martens (2010, §4.7):

    M = diag( (1/B) Σ_i g_i ⊙ g_i + λ )^α,   α = 0.75,

with g_i the per-example gradients (the diagonal of the empirical Fisher). The exponent α < 1
tempers the diagonal, which Martens found more robust than α = 1.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

__all__ = [
    "Preconditioner",
    "martens_diagonal",
    "empirical_fisher_diagonal",
]

PyTree = Any

MARTENS_ALPHA = 0.75  # exponent of the diagonal preconditioner (Martens 2010, §4.7)


class Preconditioner(NamedTuple):
    """`init(params) -> state`; `update(state, params, batch, *, apply_fn, loss, damping, key)
    -> (apply_inverse, state)` with `apply_inverse(r) = M⁻¹ r` on pytrees."""

    init: Callable[[PyTree], Any]
    update: Callable[..., tuple[Callable[[PyTree], PyTree], Any]]


def empirical_fisher_diagonal(apply_fn: Callable, loss, params: PyTree, batch) -> PyTree:
    """(1/B) Σ_i g_i ⊙ g_i from per-example gradients g_i, shaped like params.

    A `lax.scan` over examples accumulates the squares, so no B × n array of per-example
    gradients is ever held. On CPU this costs about 4 gradients for an MLP 784-128-10 at batch
    128, where `vmap(grad)` costs about 90 (XLA runs its batched outer products slowly).

    The examples are split into `jax.device_count()` contiguous chunks (1 chunk if that does not
    divide B), scanned side by side under `vmap`: with the batch sharded over a mesh, each device
    scans its own examples and nothing gathers the batch.
    """
    inputs, targets = batch
    batch_size = jnp.shape(targets)[0]
    chunks = math.gcd(batch_size, jax.device_count())

    def add_example(acc, example):
        x, y = example

        def nll(p):
            return loss.nll(apply_fn(p, jax.tree.map(lambda a: a[None], x)), y[None])[0]

        g = jax.grad(nll)(params)
        return jax.tree.map(lambda s, gi: s + jnp.square(gi), acc, g), None

    def scan_chunk(examples):
        total, _ = jax.lax.scan(add_example, jax.tree.map(jnp.zeros_like, params), examples)
        return total

    split = jax.tree.map(
        lambda a: a.reshape(chunks, a.shape[0] // chunks, *a.shape[1:]), (inputs, targets)
    )
    totals = jax.vmap(scan_chunk)(split)
    return jax.tree.map(lambda s: jnp.sum(s, axis=0) / batch_size, totals)


def martens_diagonal(alpha: float = MARTENS_ALPHA) -> Preconditioner:
    """M = (diag(empirical Fisher) + λ)^α, recomputed on every step's batch (stateless)."""
    if not alpha >= 0:
        raise ValueError(f"alpha: expected an exponent >= 0, got {alpha}")

    def init(params):
        del params
        return ()

    def update(state, params, batch, *, apply_fn, loss, damping, key=None):
        del key
        diag = empirical_fisher_diagonal(apply_fn, loss, params, batch)
        scale = jax.tree.map(lambda d: jnp.power(d + damping, alpha), diag)

        def apply_inverse(r):
            return jax.tree.map(lambda a, s: a / s.astype(a.dtype), r, scale)

        return apply_inverse, state

    return Preconditioner(init, update)
