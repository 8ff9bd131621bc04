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


def ravels(x: PyTree) -> bool:
    """Whether x has several leaves, all of one dtype: then one vector of them raveled serves
    where an operation per leaf would cost a kernel per leaf on XLA's CPU backend (a long
    reduction 2–3, as XLA rewrites it into a tree of reduce-windows). `vdot`, `norm`,
    `all_finite` and `natgrad.solvers.cg` use it. Measured on the 784-128-10 MLP: the compiled
    steps' kernels natural gradient 179 → 110, K-FAC 218 → 170, Hessian-free 315 → 199, their
    compile time 10–30 % less, their run time the same."""
    leaves = jax.tree.leaves(x)
    return len(leaves) > 1 and len({jnp.result_type(a) for a in leaves}) == 1


def ravel(x: PyTree) -> jax.Array:
    """The leaves of x raveled and concatenated, in `jax.tree.leaves` order (XLA writes the
    concatenation: one kernel, a copy)."""
    return jnp.concatenate([jnp.ravel(a) for a in jax.tree.leaves(x)])


def vdot(x: PyTree, y: PyTree) -> jax.Array:
    """Euclidean inner product of two pytrees, summed over every leaf."""
    xs, ys = jax.tree.leaves(x), jax.tree.leaves(y)
    same_shapes = jax.tree.structure(x) == jax.tree.structure(y) and all(
        jnp.shape(a) == jnp.shape(b) for a, b in zip(xs, ys, strict=True)
    )
    if same_shapes and ravels(x) and ravels(y):
        return jnp.vdot(ravel(x), ravel(y))
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
    0 or NaN. One fused multiply-and-sum (over the raveled leaves, `ravels`), where
    ``all(isfinite(a))`` compiled to three kernels per leaf on XLA's CPU backend (a boolean
    reduction goes through a reduce-window); the optimisers check their state with it every
    step, so this shortened their compile.
    """
    leaves = [jnp.asarray(a) for a in jax.tree.leaves(x)]
    if not leaves:
        return True
    if ravels(leaves):
        return jnp.isfinite(jnp.sum(ravel(leaves) * 0))
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
