r"""Kronecker-factored curvature blocks for declared layers (K-FAC; Martens & Grosse, 2015).

A dense layer y = ā W̄ has input ā = [a, 1] (a homogeneous coordinate carries the bias) and
weights W̄ = [W; b] of shape (m+1, n); a convolution is the same at every output pixel, with a
the image patch and W reshaped to (kh·kw·c_in, c_out) (`natgrad.blocks`). With per-example
pre-activation gradients g_i = ∂ℓ_i/∂y_i, its block of the Fisher of the mean loss, over W̄
in row-major order (entry (j, k) at j·n + k), is

    F = (1/B) Σ_i (ā_i ā_iᵀ) ⊗ (g_i g_iᵀ)   ≈   A ⊗ G,
    A = (1/B) Σ_i ā_i ā_iᵀ,   G = (1/B) Σ_i g_i g_iᵀ,

exact when the ā's and the g's are independent (Martens & Grosse, §3). Layers whose weights
act at several positions per example (sequence and spatial axes, convolutions) use K-FAC
*expand* or *reduce* (`weight_sharing`, `natgrad.blocks.sharing` has the maths); A is always
normalised by its count of rows (its homogeneous corner Σ 1·1) and G by the batch size B.

The steps, one function each:

1. `statistics`: one VJP of the model instrumented by `natgrad.layers` returns Σ ā āᵀ and
   Σ g gᵀ for every registered layer (`natgrad.blocks.tap`), g from the cotangents the
   `curvature` chooses (`natgrad.curvature.Curvature.output_factor`):
   * ``"fisher_mc"`` (the true Fisher, sampled): targets ỹ ~ p(y | z) drawn from the model,
     cotangent ∇_z ℓ(z, ỹ), whose outer product has the output Fisher as expectation;
   * ``"fisher"`` / ``"ggn"``: the K columns of the output curvature's square root,
     H_z = Σ_k q_k q_kᵀ (`Loss.curvature_sqrt`), one backward pass each: G without sampling noise;
   * ``"empirical_fisher"``: the true targets (the empirical Fisher; cheap, biased).
   Parameters outside registered layers get a diagonal block from the same VJP: with ḡ the
   batch-mean gradient of the sampled loss, B ḡ² is unbiased for diag(F), the sampled scores
   of different examples being independent with mean zero. (With K columns they carry random
   signs for the same reason; with the empirical Fisher it is only a rough scale.)
2. `update`: exponential moving averages F̄ ← β F̄ + (1 − β) F̂ with β_t = min(β, t/(t + 1)), so
   the first statistics are taken as they are; then, when asked, the inverses. K-FAC amortises
   both (`natgrad.preconditioners.kfac`): statistics every T steps, inverses every N steps.
3. Factored Tikhonov damping (§6.3): A ⊗ G + λI ≈ (A + π√λ I) ⊗ (G + √λ/π I) with
   π = sqrt((tr A / dim A) / (tr G / dim G)), the choice that minimises the cross terms' norm.
4. `apply_inverse`: (A ⊗ G)⁻¹ vec(V) = vec(A⁻¹ V G⁻¹) for V = [dW.reshape(m, n); db], from
   explicit inverses
   of the damped factors; a diagonal block divides by d + λ. `operator` wraps the damped
   approximation as a `natgrad.operators.Operator` whose `inverse()` is this map.

Every statistic is a sum over the batch, so with the batch sharded over devices XLA reduces
the factors with one all-reduce each.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax, tree_util

from natgrad import _tree, blocks, layers
from natgrad.curvature import Curvature, CurvatureOperator, check_batch, resolve
from natgrad.losses import Loss

__all__ = [
    "check_options",
    "Factors",
    "Inverses",
    "KroneckerState",
    "init",
    "statistics",
    "update",
    "refresh_inverses",
    "stale",
    "pi_damping",
    "apply_inverse",
    "damped_product",
    "operator",
]

PyTree = Any


class Factors(NamedTuple):
    """One A and G per layer-looking dict of the params, in `natgrad.layers.find_layers` order
    (zeros where unregistered), and the diagonal block `diag` shaped like params (zeros inside
    registered layers)."""

    a: tuple[jax.Array, ...]
    g: tuple[jax.Array, ...]
    diag: PyTree


class Inverses(NamedTuple):
    """(A + π√λ I)⁻¹ and (G + √λ/π I)⁻¹ per layer, λ the damping at the last refresh."""

    a: tuple[jax.Array, ...]
    g: tuple[jax.Array, ...]


class KroneckerState(NamedTuple):
    steps: jax.Array  # optimiser steps seen (statistics and inverses are refreshed periodically)
    updates: jax.Array  # statistics folded into the averages so far
    factors: Factors
    inverses: Inverses
    registered_layers: jax.Array  # layers with Kronecker blocks in the last update
    inverse_damping: jax.Array  # λ the inverses were computed with
    registered_by_kind: dict  # the same count per kind: {"dense": n, "conv2d": n, ...}


def factor_dtype(w) -> jnp.dtype:
    """Factors are kept in at least float32: LAPACK has no float16/bfloat16 inverse, and their
    sums of squares would lose most digits there."""
    return jnp.promote_types(jnp.result_type(w), jnp.float32)


def check_options(ema_decay, inverse_every, statistics_every=1) -> tuple[float, int, int]:
    """K-FAC's options, validated (ValueError naming the argument)."""
    bad_decay = isinstance(ema_decay, bool) or not isinstance(ema_decay, int | float)
    if bad_decay or not 0 <= ema_decay < 1:
        raise ValueError(f"ema_decay: expected a number in [0, 1), got {ema_decay!r}")
    for name, every in (("inverse_every", inverse_every), ("statistics_every", statistics_every)):
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"{name}: expected an integer >= 1, got {every!r}")
    return float(ema_decay), inverse_every, statistics_every


def init(params: PyTree) -> KroneckerState:
    """Zero factors and inverses for every layer-looking dict of `params`."""
    nodes, _ = layers.flatten(params)
    a, g = [], []
    for s in layers.find_layers(params):
        dtype = factor_dtype(nodes[s.position]["w"])
        a.append(jnp.zeros((s.m + s.has_bias, s.m + s.has_bias), dtype))
        g.append(jnp.zeros((s.n, s.n), dtype))
    factors = Factors(tuple(a), tuple(g), _tree.zeros_like(params))
    zero = jnp.zeros((), jnp.int32)
    return KroneckerState(
        zero,
        zero,
        factors,
        Inverses(tuple(a), tuple(g)),
        zero,
        jnp.zeros((), jnp.float32),
        {kind: zero for kind in blocks.KINDS},
    )


def count_by_kind(slots, registered) -> dict:
    """{kind: number of registered layers of that kind} over every kind `natgrad.blocks` knows."""
    return {
        kind: jnp.asarray(
            sum(used for s, used in zip(slots, registered, strict=True) if s.kind == kind),
            jnp.int32,
        )
        for kind in blocks.KINDS
    }


def statistics(
    apply_fn: Callable,
    loss: Loss,
    params: PyTree,
    batch,
    *,
    key: jax.Array | None,
    curvature: str | Curvature = "fisher_mc",
    weight_sharing: str = "expand",
) -> tuple[Factors, tuple[bool, ...], jax.Array]:
    """This batch's factors, which layer-looking dicts the model registered, and its outputs.

    `registered` is static (known at trace time): slot l is True when the model passed that
    dict to `natgrad.layers.dense` / `natgrad.layers.conv2d`. `weight_sharing` is "expand" or
    "reduce" (`natgrad.blocks.sharing`).
    """
    curvature = resolve(curvature)
    if key is None and curvature.name != "empirical_fisher":
        raise ValueError(f"key: K-FAC with curvature {curvature.name!r} needs a PRNG key")
    inputs, targets = check_batch(batch)
    slots = layers.find_layers(params)
    nodes, _ = layers.flatten(params)
    tags = tuple(
        (
            jnp.zeros((s.m + 1, s.m + 1), factor_dtype(nodes[s.position]["w"])),
            jnp.zeros((s.n, s.n), factor_dtype(nodes[s.position]["w"])),
        )
        for s in slots
    )
    record = layers.Record()

    def model(tags, p):
        return apply_fn(layers.instrument(p, tags, record, weight_sharing), inputs)

    outputs, vjp_fn = jax.vjp(model, tags, params)  # traces the model: `record` is now filled
    registered = tuple(slot in record.used for slot in range(len(slots)))
    loss.validate(outputs, targets)
    batch_size = outputs.shape[0]

    k_factor, k_signs = (None, None) if key is None else jax.random.split(key)
    cts = curvature.output_factor(loss, outputs, targets, k_factor)
    many = cts.shape[0] > 1
    if many:
        # The diagonal block squares the summed cotangent: random signs per column make the
        # cross terms vanish in expectation, so B ḡ² stays unbiased for diag(F).
        signs = jax.random.rademacher(k_signs, cts.shape[:2], cts.dtype)
        cts = cts * signs.reshape(*signs.shape, *(1,) * (cts.ndim - 2))
        tag_cts, param_cts = jax.vmap(vjp_fn)(cts)
        a_sums = [t[0][0] for t in tag_cts]  # Σ ā āᵀ does not depend on the cotangent
        g_sums = [jnp.sum(t[1], axis=0) for t in tag_cts]
        square = lambda c: jnp.sum(jnp.square(c), axis=0)  # noqa: E731
    else:
        tag_cts, param_cts = vjp_fn(cts[0])
        a_sums = [t[0] for t in tag_cts]
        g_sums = [t[1] for t in tag_cts]
        square = jnp.square

    a, g = [], []
    for s, a_sum, g_sum, used in zip(slots, a_sums, g_sums, registered, strict=True):
        rows = a_sum[-1, -1]  # Σ 1·1: the number of rows the layer saw
        a_l = a_sum if s.has_bias else a_sum[: s.m, : s.m]
        a_l = a_l / jnp.maximum(rows, 1)
        a.append(a_l if used else jnp.zeros_like(a_l))
        g.append(g_sum / batch_size if used else jnp.zeros_like(g_sum))

    covered = {s.position for s, used in zip(slots, registered, strict=True) if used}
    # Vmapped cotangents carry a leading K axis.
    first = (lambda c: c[0]) if many else (lambda c: c)  # noqa: E731
    ct_nodes, treedef = layers.flatten(param_cts)
    diag_nodes = [
        jax.tree.map(lambda c: jnp.zeros_like(first(c)), node)
        if i in covered
        else jax.tree.map(lambda c: square(c) / batch_size, node)
        for i, node in enumerate(ct_nodes)
    ]
    diag = tree_util.tree_unflatten(treedef, diag_nodes)
    return Factors(tuple(a), tuple(g), diag), registered, outputs


def update(
    state: KroneckerState,
    stats: Factors,
    damping,
    registered: tuple[bool, ...],
    *,
    ema_decay: float,
    refresh,
) -> KroneckerState:
    """Fold `stats` into the moving averages; recompute the inverses (with this λ) when the
    boolean `refresh` (may be traced) is true."""
    t = state.updates
    factors = _tree.moving_average(state.factors, stats, ema_decay, t)
    inverses = lax.cond(
        refresh, lambda: _invert(factors, damping, registered), lambda: state.inverses
    )
    return state._replace(
        updates=t + 1,
        factors=factors,
        inverses=inverses,
        registered_layers=jnp.asarray(sum(registered), jnp.int32),
        registered_by_kind=count_by_kind(layers.find_layers(state.factors.diag), registered),
        inverse_damping=_refreshed_damping(state, damping, refresh),
    )


def refresh_inverses(state: KroneckerState, damping, registered, refresh) -> KroneckerState:
    """The inverses recomputed from the current averages when `refresh`, else unchanged."""
    inverses = lax.cond(
        refresh, lambda: _invert(state.factors, damping, registered), lambda: state.inverses
    )
    return state._replace(
        inverses=inverses, inverse_damping=_refreshed_damping(state, damping, refresh)
    )


def _refreshed_damping(state: KroneckerState, damping, refresh) -> jax.Array:
    old = state.inverse_damping
    return jnp.where(refresh, jnp.asarray(damping, old.dtype), old)


def stale(state: KroneckerState, damping, factor: float = 2.0) -> jax.Array:
    """Whether λ moved by more than `factor` (either way) since the inverses were computed, so
    they no longer invert the damped factors (π√λ and √λ/π enter them)."""
    old = state.inverse_damping.astype(jnp.result_type(damping, jnp.float32))
    lam = jnp.asarray(damping, old.dtype)
    return (lam > factor * old) | (old > factor * lam)


def pi_damping(a: jax.Array, g: jax.Array, damping) -> tuple[jax.Array, jax.Array]:
    """(π√λ, √λ/π), the factored Tikhonov damping of A and G (Martens & Grosse, §6.3).

    π = 1 when either trace is zero or π is not finite (a dead layer: nothing to balance),
    so the damping never overflows.
    """
    ta, tg = jnp.trace(a) / a.shape[0], jnp.trace(g) / g.shape[0]
    ok = (ta > 0) & (tg > 0)
    pi = jnp.sqrt(jnp.where(ok, ta, 1.0) / jnp.where(ok, tg, 1.0))
    pi = jnp.where(jnp.isfinite(pi) & (pi > 0), pi, 1.0)
    root = jnp.sqrt(jnp.asarray(damping, a.dtype))
    return pi * root, root / pi


def _spd_inverse(m: jax.Array) -> jax.Array:
    """M⁻¹ for a damped (so well-posed) SPD factor, symmetrised.

    LU (`jnp.linalg.inv`) rather than Cholesky + two triangular solves: on XLA's CPU backend the
    latter measured 29-571 ms for a 785 × 785 float32 factor (erratic under load), LU a steady
    27-37 ms; the factors are damped, so LU's lack of pivot-free SPD guarantees costs nothing.
    """
    inv = jnp.linalg.inv(m)
    return 0.5 * (inv + inv.T)


def _invert(factors: Factors, damping, registered) -> Inverses:
    a_inv, g_inv = [], []
    for a, g, used in zip(factors.a, factors.g, registered, strict=True):
        if not used:
            a_inv.append(jnp.zeros_like(a))
            g_inv.append(jnp.zeros_like(g))
            continue
        da, dg = pi_damping(a, g, damping)
        a_inv.append(_spd_inverse(a + da * jnp.eye(a.shape[0], dtype=a.dtype)))
        g_inv.append(_spd_inverse(g + dg * jnp.eye(g.shape[0], dtype=g.dtype)))
    return Inverses(tuple(a_inv), tuple(g_inv))


def _blockwise(vec, diag, damping, registered, kron: Callable, scale: Callable) -> PyTree:
    """Apply `kron(slot, V)` to each registered layer's V = [dW; db] and `scale(r, d)` leafwise
    elsewhere, d the diagonal block."""
    nodes, treedef = layers.flatten(vec)
    diag_nodes, _ = layers.flatten(diag)
    found = {s.position: (slot, s) for slot, s in enumerate(layers.find_layers(vec))}
    lam = jnp.asarray(damping)
    out = []
    for i, (node, d) in enumerate(zip(nodes, diag_nodes, strict=True)):
        if i in found and registered[found[i][0]]:
            slot, s = found[i]
            w = node["w"]
            v = w.reshape(s.m, s.n)
            v = jnp.concatenate([v, node["b"][None]], axis=0) if s.has_bias else v
            u = kron(slot, v)
            new = (
                {"w": u[: s.m].reshape(w.shape), "b": u[s.m]}
                if s.has_bias
                else {"w": u.reshape(w.shape)}
            )
            leaves = [new[k].astype(w.dtype) for k in sorted(node)]
            out.append(tree_util.tree_unflatten(tree_util.tree_structure(node), leaves))
        else:
            out.append(jax.tree.map(lambda r, dd: scale(r, dd + lam.astype(dd.dtype)), node, d))
    return tree_util.tree_unflatten(treedef, out)


def apply_inverse(state: KroneckerState, damping, registered, vec: PyTree) -> PyTree:
    """(K-FAC + damping)⁻¹ vec: A⁻¹ V G⁻¹ per registered layer, r / (d + λ) elsewhere."""
    inv = state.inverses
    return _blockwise(
        vec,
        state.factors.diag,
        damping,
        registered,
        lambda slot, v: inv.a[slot] @ v.astype(inv.a[slot].dtype) @ inv.g[slot],
        lambda r, d: r / d.astype(r.dtype),
    )


def damped_product(state: KroneckerState, damping, registered, vec: PyTree) -> PyTree:
    """(K-FAC + damping) vec: (A + π√λ I) V (G + √λ/π I) per registered layer, (d + λ) r
    elsewhere; the current averages, not the (possibly older) inverses."""
    f = state.factors

    def kron(slot, v):
        a, g = f.a[slot], f.g[slot]
        da, dg = pi_damping(a, g, damping)
        v = v.astype(a.dtype)
        return (a @ v + da * v) @ g + dg * (a @ v + da * v)

    return _blockwise(vec, f.diag, damping, registered, kron, lambda r, d: r * d.astype(r.dtype))


def operator(
    state: KroneckerState, damping, registered, params: PyTree, *, loss_value=None
) -> CurvatureOperator:
    """The damped K-FAC approximation F̂ + λ as an operator; `.inverse()` applies (F̂ + λ)⁻¹.

    `loss_value`, the mean loss of the statistics' forward pass when there was one, rides along
    so an optimiser needs no second forward pass for it.
    """
    return CurvatureOperator(
        lambda v: damped_product(state, damping, registered, v),
        params,
        loss_value=loss_value,
        inverse=lambda v: apply_inverse(state, damping, registered, v),
    )
