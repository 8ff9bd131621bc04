"""Vector arithmetic on pytrees: the parameter space every operator and solver works in."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

PyTree = Any


def add(x: PyTree, y: PyTree) -> PyTree:
    return jax.tree.map(jnp.add, x, y)


def sub(x: PyTree, y: PyTree) -> PyTree:
    return jax.tree.map(jnp.subtract, x, y)


def scale(alpha, x: PyTree) -> PyTree:
    """alpha * x, each leaf keeping its dtype (a float32 scalar leaves a bfloat16 leaf bf16)."""
    return jax.tree.map(lambda a: (alpha * a).astype(jnp.result_type(a)), x)


def axpy(alpha, x: PyTree, y: PyTree) -> PyTree:
    """alpha * x + y, each leaf in y's dtype."""
    return jax.tree.map(lambda a, b: (alpha * a + b).astype(jnp.result_type(b)), x, y)


def _flat(leaves):
    """The leaves raveled into one vector when they share a dtype (else None), for one
    reduction over all of them: XLA writes the concatenation (one kernel, a copy) and reduces
    it, where a reduction per leaf costs 2–3 kernels each on XLA's CPU backend (it rewrites a
    long reduction into a tree of reduce-windows). Measured on the 784-128-10 MLP: the compiled
    steps' kernels natural gradient 177 → 127, K-FAC 212 → 164, Hessian-free 301 → 235, their
    compile time 10–20 % less, their run time the same."""
    if len(leaves) < 2 or len({jnp.result_type(a) for a in leaves}) > 1:
        return None
    return jnp.concatenate([jnp.ravel(a) for a in leaves])


def vdot(x: PyTree, y: PyTree) -> jax.Array:
    """Euclidean inner product of two pytrees, summed over every leaf."""
    xs, ys = jax.tree.leaves(x), jax.tree.leaves(y)
    if jax.tree.structure(x) == jax.tree.structure(y) and all(
        jnp.shape(a) == jnp.shape(b) for a, b in zip(xs, ys, strict=True)
    ):
        fx, fy = _flat(xs), _flat(ys)
        if fx is not None and fy is not None:
            return jnp.vdot(fx, fy)
    leaves = jax.tree.leaves(jax.tree.map(lambda a, b: jnp.vdot(a, b), x, y))
    return sum(leaves, jnp.zeros((), leaves[0].dtype if leaves else jnp.float32))


def norm(x: PyTree) -> jax.Array:
    return jnp.sqrt(vdot(x, x))


def zeros_like(x: PyTree) -> PyTree:
    return jax.tree.map(jnp.zeros_like, x)


def where(cond, x: PyTree, y: PyTree) -> PyTree:
    """Leafwise `jnp.where(cond, x, y)` for a scalar condition; a leaf that is the same array in
    x and y is returned as it is (no select for XLA to run)."""
    return jax.tree.map(lambda a, b: a if a is b else jnp.where(cond, a, b), x, y)


def all_finite(x: PyTree) -> jax.Array | bool:
    """Whether every entry of every leaf is finite.

    As Σ (a · 0) = 0: a · 0 is 0 for a finite a and NaN for ±inf or NaN, so the sum is exactly
    0 or NaN. One fused multiply-and-sum (over the raveled leaves, `_flat`), where
    ``all(isfinite(a))`` compiled to three kernels per leaf on XLA's CPU backend (a boolean
    reduction goes through a reduce-window); the optimisers check their state with it every
    step, so this shortened their compile.
    """
    leaves = [jnp.asarray(a) for a in jax.tree.leaves(x)]
    if not leaves:
        return True
    flat = _flat(leaves)
    if flat is not None:
        return jnp.isfinite(jnp.sum(flat * 0))
    return jnp.isfinite(sum(jnp.sum(a * 0) for a in leaves))


def cast_like(x: PyTree, like: PyTree) -> PyTree:
    return jax.tree.map(lambda a, b: jnp.asarray(a, b.dtype), x, like)


def moving_average(old: PyTree, new: PyTree, decay: float, count) -> PyTree:
    """β·old + (1 − β)·new with β = min(decay, t/(t + 1)), t = `count` estimates folded in so
    far: the first estimate is taken as it is, later ones decay at `decay`."""

    def fold(a, b):
        beta = jnp.minimum(decay, count / (count + 1)).astype(a.dtype)
        return beta * a + (1 - beta) * b

    return jax.tree.map(fold, old, new)
