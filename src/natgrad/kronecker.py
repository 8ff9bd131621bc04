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

1. `statistics` (`natgrad.kronecker_statistics`): one VJP of the model instrumented by
   `natgrad.layers` returns Σ ā āᵀ and Σ g gᵀ for every registered layer
   (`natgrad.blocks.tap`), g from the cotangents the `curvature` chooses (sampled targets,
   the output curvature's square-root columns, or the true targets), and a diagonal block
   B ḡ² for every other parameter.
2. `update`: exponential moving averages F̄ ← β F̄ + (1 − β) F̂ with β_t = min(β, t/(t + 1)), so
   the first statistics are taken as they are; then, when asked, the inverses. K-FAC amortises
   both (`natgrad.preconditioners.kfac`): statistics every T steps, inverses every N steps.
3. Factored Tikhonov damping (§6.3): A ⊗ G + λI ≈ (A + π√λ I) ⊗ (G + √λ/π I) with
   π = sqrt((tr A / dim A) / (tr G / dim G)), the choice that minimises the cross terms' norm.
4. `apply_inverse`: (A ⊗ G)⁻¹ vec(V) = vec(A⁻¹ V G⁻¹) for V = [dW.reshape(m, n); db], from
   explicit inverses
   of the damped factors; a diagonal block divides by d + λ. `operator` wraps the damped
   approximation as a `natgrad.operators.Operator` whose `inverse()` is this map.

Two kinds fill their own statistics (`natgrad.blocks`): an embedding's A is diagonal (token
counts / lookups), kept as a vector and inverted elementwise; a scale-and-shift layer has no
factors, its block being the diagonal block filled with the exact per-example Fisher diagonal
instead of B ḡ². With EKFAC (`init(..., eigenvalue_correction=True)`, `natgrad.ekfac`) the
dense and conv blocks are Q diag(s) Qᵀ in K-FAC's eigenbasis: `statistics` also returns the
per-example scalings s in the state's basis (`Factors.s`, averaged like the factors), a
refresh recomputes the basis (`KroneckerState.eigenbasis`) instead of those layers' inverses,
and `apply_inverse` divides by s + λ there.

Every statistic is a sum over the batch, so with the batch sharded over devices XLA reduces
the factors with one all-reduce each.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax, tree_util

from natgrad import _tree, blocks, ekfac, layers, low_rank
from natgrad.curvature import CurvatureOperator
from natgrad.kronecker_statistics import Factors, factor_dtype, node_dtype, statistics

__all__ = [
    "check_options",
    "factor_dtype",
    "Factors",
    "Inverses",
    "KroneckerState",
    "init",
    "statistics",
    "update",
    "refresh_inverses",
    "stale",
    "sketches",
    "pi_damping",
    "apply_inverse",
    "damped_product",
    "operator",
]

PyTree = Any


class Inverses(NamedTuple):
    """(A + π√λ I)⁻¹ and (G + √λ/π I)⁻¹ per layer, λ the damping at the last refresh; a factor
    kept at rank k (`input_factor_rank`, `output_factor_rank`) holds a
    `natgrad.low_rank.LowRankInverse`."""

    a: tuple[jax.Array | low_rank.LowRankInverse, ...]
    g: tuple[jax.Array | low_rank.LowRankInverse, ...]


class KroneckerState(NamedTuple):
    steps: jax.Array  # optimiser steps seen (statistics and inverses are refreshed periodically)
    updates: jax.Array  # statistics folded into the averages so far
    factors: Factors
    inverses: Inverses
    registered_layers: jax.Array  # layers with Kronecker blocks in the last update
    inverse_damping: jax.Array  # λ the inverses were computed with
    registered_by_kind: dict  # the same count per kind: {"dense": n, "conv2d": n, ...}
    eigenbasis: ekfac.Eigenbasis | None = None  # EKFAC's Q_A, Q_G (eigenvalue_correction)
    finite: jax.Array | bool = True  # False when the last update dropped non-finite statistics
    # or inverses (the previous ones were kept)


def check_options(
    ema_decay, inverse_every, statistics_every=1, input_factor_rank=None, output_factor_rank=None
) -> tuple[float, int, int]:
    """K-FAC's options, validated (ValueError naming the argument); the factor ranks may be
    None or ``"auto"``."""
    bad_decay = isinstance(ema_decay, bool) or not isinstance(ema_decay, int | float)
    if bad_decay or not 0 <= ema_decay < 1:
        raise ValueError(f"ema_decay: expected a number in [0, 1), got {ema_decay!r}")
    integers = [("inverse_every", inverse_every), ("statistics_every", statistics_every)]
    ranks = (("input_factor_rank", input_factor_rank), ("output_factor_rank", output_factor_rank))
    for name, rank in ranks:
        if isinstance(rank, str):
            low_rank.resolve(rank, name)  # "auto", or a ValueError naming the argument
        elif rank is not None:
            integers.append((name, rank))
    for name, value in integers:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: expected an integer >= 1, got {value!r}")
    return float(ema_decay), inverse_every, statistics_every


def sketches(state: KroneckerState) -> tuple[tuple[int, int], ...]:
    """Per layer, (ℓ_A, ℓ_G): the columns of its input and output factors' sketches, 0 for a
    factor kept whole."""
    width = lambda f: f.shape[1] - 1 if low_rank.is_sketch(f) else 0  # noqa: E731
    return tuple(
        (width(a), width(g)) for a, g in zip(state.factors.a, state.factors.g, strict=True)
    )


def _factor_shapes(slot) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """A's and G's shapes: (m[+1])² and n², A a vector if diagonal, both empty for diagonal
    kinds."""
    if blocks.is_diagonal(slot.kind):
        return (0, 0), (0, 0)
    k = slot.m + slot.has_bias
    a = (k,) if hasattr(blocks.module(slot.kind), "tag_sums") else (k, k)
    return a, (slot.n, slot.n)


def _has_eigenbasis(slot) -> bool:
    """EKFAC applies to Kronecker blocks built from positions (dense, conv2d)."""
    return hasattr(blocks.module(slot.kind), "positions")


def init(
    params: PyTree,
    eigenvalue_correction: bool = False,
    input_factor_rank: int | str | None = None,
    output_factor_rank: int | str | None = None,
) -> KroneckerState:
    """Zero factors and inverses for every layer-looking dict of `params` (and with
    `eigenvalue_correction` an identity eigenbasis and zero scalings, `natgrad.ekfac`; with
    `input_factor_rank` k, a rank-k-plus-identity inverse for each full input factor wider than
    2k, with ``"auto"`` rank 32 for those at least 256 wide: `natgrad.low_rank.resolve`;
    `output_factor_rank` the same for the output factors; an embedding's factors stay whole)."""
    nodes, _ = layers.flatten(params)
    slots = layers.find_layers(params)
    rules = (
        low_rank.resolve(input_factor_rank, "input_factor_rank"),
        low_rank.resolve(output_factor_rank, "output_factor_rank"),
    )
    a, g, a_inv, g_inv = [], [], [], []
    for s in slots:
        dtype = node_dtype(nodes[s.position])
        # Kinds with their own statistics (embeddings: `tag_sums`) keep whole factors.
        tapped = not hasattr(blocks.module(s.kind), "tag_sums")
        for shape, rule, factors, inverses in zip(
            _factor_shapes(s), rules, (a, g), (a_inv, g_inv), strict=True
        ):
            wide = tapped and rule is not None and len(shape) == 2 and shape[0] >= rule[1]
            if wide:  # kept as its sketch [F Ω | diag F] (`natgrad.low_rank`)
                shape = (shape[0], low_rank.width(rule[0], shape[0]) + 1)
            factors.append(jnp.zeros(shape, dtype))
            inverses.append(
                low_rank.init(shape[0], rule[0], dtype) if wide else jnp.zeros_like(factors[-1])
            )
    basis, scalings = None, ()
    if eigenvalue_correction:
        sizes = [(s.m + s.has_bias, s.n) if _has_eigenbasis(s) else (0, 0) for s in slots]
        dtypes = [node_dtype(nodes[s.position]) for s in slots]
        basis = ekfac.init(sizes, dtypes)
        scalings = tuple(jnp.zeros(k, dt) for k, dt in zip(sizes, dtypes, strict=True))
    factors = Factors(tuple(a), tuple(g), _tree.zeros_like(params), scalings)
    # Every leaf its own buffer (no array shared between fields): a training step may donate
    # the state, and XLA refuses to take one buffer twice.
    zero = lambda: jnp.zeros((), jnp.int32)  # noqa: E731
    return KroneckerState(
        zero(),
        zero(),
        factors,
        Inverses(tuple(a_inv), tuple(g_inv)),
        zero(),
        jnp.zeros((), jnp.float32),
        {kind: zero() for kind in blocks.KINDS},
        basis,
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
    boolean `refresh` (may be traced) is true; ``refresh=False`` (the Python constant) leaves
    them out of the computation. Whatever comes out non-finite is dropped — the previous
    averages, inverses and basis stay — and ``finite`` says whether anything was."""
    t = state.updates
    folded = _tree.moving_average(state.factors, stats, ema_decay, t)
    ok = _tree.all_finite(folded)
    factors = _tree.where(ok, folded, state.factors)
    if refresh is False:
        inverses, basis, fresh = state.inverses, state.eigenbasis, jnp.asarray(True)
    else:
        factors, inverses, basis, fresh = _refresh(state, factors, damping, registered, refresh)
        refresh = refresh & fresh
    return state._replace(
        updates=t + ok.astype(t.dtype),
        factors=factors,
        inverses=inverses,
        eigenbasis=basis,
        finite=ok & fresh,
        registered_layers=jnp.asarray(sum(registered), jnp.int32),
        registered_by_kind=count_by_kind(layers.find_layers(state.factors.diag), registered),
        inverse_damping=_refreshed_damping(state, damping, refresh),
    )


def refresh_inverses(state: KroneckerState, damping, registered, refresh) -> KroneckerState:
    """The inverses (and EKFAC's eigenbasis) recomputed from the current averages when
    `refresh`, else unchanged; non-finite ones are dropped (``finite`` False, the previous
    kept)."""
    factors, inverses, basis, fresh = _refresh(state, state.factors, damping, registered, refresh)
    return state._replace(
        factors=factors,
        inverses=inverses,
        eigenbasis=basis,
        finite=fresh,
        inverse_damping=_refreshed_damping(state, damping, refresh & fresh),
    )


def _refresh(state: KroneckerState, factors: Factors, damping, registered, refresh):
    """(factors, inverses, eigenbasis, finite) after a refresh when `refresh`: K-FAC's damped
    inverses for the layers without an eigenbasis; for those with one, a new basis from eigh of
    A and G and the scalings carried into it (`natgrad.ekfac.refresh`). A refresh whose result
    is not finite keeps the previous inverses and basis (inside the conditional, so a step
    without a refresh copies nothing)."""
    basis = state.eigenbasis
    eigen = (
        tuple(False for _ in registered) if basis is None else tuple(q.size > 0 for q in basis.q_a)
    )
    kfac_used = tuple(u and not e for u, e in zip(registered, eigen, strict=True))
    before = (factors, state.inverses, basis)

    def refreshed():
        new = (factors, _invert(factors, damping, kfac_used, state.inverses), basis)
        if basis is not None:
            use = tuple(u and e for u, e in zip(registered, eigen, strict=True))
            new_basis, s = ekfac.refresh(basis, factors.a, factors.g, factors.s, use)
            new = (factors._replace(s=s), new[1], new_basis)
        ok = _tree.all_finite(new)
        return (*_tree.where(ok, new, before), ok)

    return lax.cond(refresh, refreshed, lambda: (*before, jnp.asarray(True)))


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
    ta, tg = _mean_eigenvalue(a), _mean_eigenvalue(g)
    ok = (ta > 0) & (tg > 0)
    pi = jnp.sqrt(jnp.where(ok, ta, 1.0) / jnp.where(ok, tg, 1.0))
    pi = jnp.where(jnp.isfinite(pi) & (pi > 0), pi, 1.0)
    root = jnp.sqrt(jnp.asarray(damping, a.dtype))
    return pi * root, root / pi


def _mean_eigenvalue(a: jax.Array) -> jax.Array:
    """tr A / dim A, A given by its diagonal when it is a vector, or by its sketch
    [A Ω | diag A]."""
    if low_rank.is_sketch(a):
        return jnp.mean(a[:, -1])
    return jnp.mean(a) if a.ndim == 1 else jnp.trace(a) / a.shape[0]


def _add_identity(a: jax.Array, d) -> jax.Array:
    return a + d if a.ndim == 1 else a + d * jnp.eye(a.shape[0], dtype=a.dtype)


def _left(a, v: jax.Array) -> jax.Array:
    """A V, A given by its diagonal when it is a vector, or as a `low_rank.LowRankInverse`."""
    if isinstance(a, low_rank.LowRankInverse):
        return low_rank.apply(a, v)
    return a[:, None] * v if a.ndim == 1 else a @ v


def _right(v: jax.Array, g) -> jax.Array:
    """V G for a symmetric G, given as a matrix or as a `low_rank.LowRankInverse`: (G Vᵀ)ᵀ."""
    if isinstance(g, low_rank.LowRankInverse):
        return low_rank.apply(g, v.T).T
    return v @ g


EIGH_MAX_WIDTH = 512  # exact factors up to this width are inverted by a batched eigh


def _lu_inverse(m: jax.Array) -> jax.Array:
    """M⁻¹ for a damped (so well-posed) SPD factor wider than `EIGH_MAX_WIDTH`, symmetrised.

    LU (`jnp.linalg.inv`) rather than Cholesky + two triangular solves: on XLA's CPU backend the
    latter measured 29-571 ms for a 785 × 785 float32 factor (erratic under load), LU a steady
    27-37 ms, eigh 78 ms.
    """
    inv = jnp.linalg.inv(m)
    return 0.5 * (inv + inv.T)


def _eigh_inverses(ms: list[jax.Array], floors: list) -> list[jax.Array]:
    """(M_i)⁻¹ for damped SPD factors M_i = F_i + d_i I no wider than `EIGH_MAX_WIDTH`, from one
    batched eigendecomposition per group of similar widths.

    Each M_i is padded with an identity block to its group's width n (the inverse of
    diag(M_i, I) is diag(M_i⁻¹, I)) and the group inverted as Q diag(1 / max(w, d_i)) Qᵀ: F_i is
    PSD, so M_i's eigenvalues are ≥ d_i, and clamping there keeps rounding (a rank-deficient
    F_i, tiny damping) from producing a huge or negative inverse. One eigh for all the small
    factors compiles in a fraction of one LU inverse per factor (0.11 s against 0.91 s for a
    784-128-10 MLP's three, on XLA's CPU backend); at these widths it runs in a few
    milliseconds per refresh. A group gathers widths (largest first) while its padded cost, n³
    per member, stays within twice its members' own Σ n_i³.
    """
    order = sorted(range(len(ms)), key=lambda i: (str(ms[i].dtype), -ms[i].shape[0]))
    groups: list[list[int]] = []
    for i in order:
        g = groups[-1] if groups else None
        if g and ms[g[0]].dtype == ms[i].dtype:
            n = ms[g[0]].shape[0]
            own = sum(ms[j].shape[0] ** 3 for j in g) + ms[i].shape[0] ** 3
            if (len(g) + 1) * n**3 <= 2 * own:
                g.append(i)
                continue
        groups.append([i])
    out: list = [None] * len(ms)
    for g in groups:
        n, dtype = ms[g[0]].shape[0], ms[g[0]].dtype
        stack = jnp.stack([_pad_identity(ms[i], n) for i in g])
        floor = jnp.stack([jnp.asarray(floors[i], dtype) for i in g])
        w, q = jnp.linalg.eigh(stack)
        inv = (q / jnp.maximum(w, floor[:, None])[:, None, :]) @ jnp.swapaxes(q, -1, -2)
        inv = 0.5 * (inv + jnp.swapaxes(inv, -1, -2))
        for j, i in enumerate(g):
            k = ms[i].shape[0]
            out[i] = inv[j, :k, :k]
    return out


def _pad_identity(m: jax.Array, n: int) -> jax.Array:
    """diag(M, I) of width n."""
    k = m.shape[0]
    if k == n:
        return m
    eye = jnp.eye(n, dtype=m.dtype)
    return eye.at[:k, :k].set(m)


def _invert(factors: Factors, damping, registered, previous: Inverses) -> Inverses:
    """The damped factors' inverses: diagonal factors elementwise, a `LowRankInverse` from the
    factor's sketch by `low_rank.from_sketch`, exact ones no wider than `EIGH_MAX_WIDTH` together by
    `_eigh_inverses`, wider ones by LU."""
    a_inv, g_inv = [], []
    small, floors, where = [], [], []  # the batched eigh's inputs and where their results go
    for a, g, used, old_a, old_g in zip(
        factors.a, factors.g, registered, previous.a, previous.g, strict=True
    ):
        if not used or a.size == 0:
            # (a rank-k inverse keeps its basis: the next refresh starts from it)
            a_inv.append(_kept(old_a, a))
            g_inv.append(_kept(old_g, g))
            continue
        da, dg = pi_damping(a, g, damping)
        for m, d, out, low in ((a, da, a_inv, old_a), (g, dg, g_inv, old_g)):
            if isinstance(low, low_rank.LowRankInverse):
                out.append(low_rank.from_sketch(m, d, low.q.shape[1]))
                continue
            damped = _add_identity(m, d)
            if m.ndim == 1:
                out.append(1 / damped)
            elif m.shape[0] > EIGH_MAX_WIDTH:
                out.append(_lu_inverse(damped))
            else:
                small.append(damped)
                floors.append(d)
                where.append((out, len(out)))
                out.append(None)
    for (out, i), inv in zip(where, _eigh_inverses(small, floors), strict=True):
        out[i] = inv
    return Inverses(tuple(a_inv), tuple(g_inv))


def _kept(old, factor: jax.Array):
    """An unused layer's inverse: a rank-k one keeps its basis, an exact one is zeros."""
    return old if isinstance(old, low_rank.LowRankInverse) else jnp.zeros_like(factor)


def _blockwise(vec, diag, damping, registered, kron: Callable, scale: Callable) -> PyTree:
    """Apply `kron(slot, V)` to each registered layer's V = [dW; db] and `scale(r, d)` leafwise
    elsewhere, d the diagonal block."""
    nodes, treedef = layers.flatten(vec)
    diag_nodes, _ = layers.flatten(diag)
    found = {
        s.position: (slot, s)
        for slot, s in enumerate(layers.find_layers(vec))
        if registered[slot] and not blocks.is_diagonal(s.kind)
    }
    lam = jnp.asarray(damping)
    out = []
    for i, (node, d) in enumerate(zip(nodes, diag_nodes, strict=True)):
        if i in found:
            slot, s = found[i]
            key = blocks.weight_key(s.kind)
            w = node[key]
            v = w.reshape(s.m, s.n)
            v = jnp.concatenate([v, node["b"][None]], axis=0) if s.has_bias else v
            u = kron(slot, v)
            new = (
                {key: u[: s.m].reshape(w.shape), "b": u[s.m]}
                if s.has_bias
                else {key: u.reshape(w.shape)}
            )
            leaves = [new[k].astype(w.dtype) for k in sorted(node)]
            out.append(tree_util.tree_unflatten(tree_util.tree_structure(node), leaves))
        else:
            out.append(jax.tree.map(lambda r, dd: scale(r, dd + lam.astype(dd.dtype)), node, d))
    return tree_util.tree_unflatten(treedef, out)


def apply_inverse(state: KroneckerState, damping, registered, vec: PyTree) -> PyTree:
    """(K-FAC + damping)⁻¹ vec: A⁻¹ V G⁻¹ per registered layer (EKFAC's
    Q_A [(Q_Aᵀ V Q_G) / (s + λ)] Q_Gᵀ where it has an eigenbasis), r / (d + λ) elsewhere."""
    inv, basis = state.inverses, state.eigenbasis

    def kron(slot, v):
        if basis is not None and basis.q_a[slot].size:
            return ekfac.apply_inverse(
                v, basis.q_a[slot], basis.q_g[slot], state.factors.s[slot], damping
            )
        return _right(_left(inv.a[slot], v.astype(state.factors.g[slot].dtype)), inv.g[slot])

    return _blockwise(
        vec, state.factors.diag, damping, registered, kron, lambda r, d: r / d.astype(r.dtype)
    )


def damped_product(state: KroneckerState, damping, registered, vec: PyTree) -> PyTree:
    """(K-FAC + damping) vec: (A + π√λ I) V (G + √λ/π I) per registered layer, (d + λ) r
    elsewhere; the current averages, not the (possibly older) inverses — except for a factor
    kept as a sketch, whose damped low-rank form is the last refresh's."""
    f, basis = state.factors, state.eigenbasis

    def kron(slot, v):
        if basis is not None and basis.q_a[slot].size:
            return ekfac.damped_product(v, basis.q_a[slot], basis.q_g[slot], f.s[slot], damping)
        a, g = f.a[slot], f.g[slot]
        da, dg = pi_damping(a, g, damping)
        v = v.astype(a.dtype)
        if low_rank.is_sketch(a):  # the damped low-rank A of the last refresh
            av = low_rank.forward(state.inverses.a[slot], v)
        else:
            av = _left(a, v) + da * v
        if low_rank.is_sketch(g):  # and G's
            return low_rank.forward(state.inverses.g[slot], av.T).T
        return av @ g + dg * av

    return _blockwise(vec, f.diag, damping, registered, kron, lambda r, d: r * d.astype(r.dtype))


def operator(state: KroneckerState, damping, registered, params: PyTree) -> CurvatureOperator:
    """The damped K-FAC approximation F̂ + λ as an operator; `.inverse()` applies (F̂ + λ)⁻¹.

    Before any statistics (``state.updates == 0``) it is the identity, both ways: a
    preconditioner that knows nothing yet leaves CG plain, and K-FAC's first step is a gradient
    step whose length its KL rule bounds by √(2δ).
    """

    def known(fn):
        return lambda v: lax.cond(state.updates == 0, lambda: v, lambda: fn(v))

    return CurvatureOperator(
        known(lambda v: damped_product(state, damping, registered, v)),
        params,
        inverse=known(lambda v: apply_inverse(state, damping, registered, v)),
    )
