r"""Step 1 of K-FAC (`natgrad.kronecker`): one instrumented VJP, every layer's statistics.

`statistics` calls the model with its layer dicts replaced by `natgrad.layers` probes and
differentiates with respect to their zero tags; the taps (`natgrad.blocks.tap`) return, as the
tags' cotangents, each registered layer's sums: Σ ā āᵀ and Σ g gᵀ (dense, conv2d, and with an
EKFAC eigenbasis the per-example scalings Σ_b (Q_Aᵀ ∇W̄_b Q_G)²), token counts and Σ g gᵀ
(embedding), per-example squared gradients (scale-and-shift). g comes from the cotangents the
`curvature` chooses (`natgrad.curvature.Curvature.output_factor`):

* ``"fisher_mc"`` (the true Fisher, sampled): targets ỹ ~ p(y | z) drawn from the model,
  cotangent ∇_z ℓ(z, ỹ), whose outer product has the output Fisher as expectation;
* ``"fisher"`` / ``"ggn"``: the K columns of the output curvature's square root,
  H_z = Σ_k q_k q_kᵀ (`Loss.curvature_sqrt`), one backward pass each: G without sampling noise;
* ``"empirical_fisher"``: the true targets (the empirical Fisher; cheap, biased).

Normalised, they are the `Factors`: A = Σ ā āᵀ / rows (its homogeneous corner Σ 1·1, or the
token count) — or, for a wide input factor inverted at low rank, its sketch [A Ω | diag A]
(`natgrad.low_rank`) — G = Σ g gᵀ / B, s = Σ / B. Parameters outside registered layers get a
diagonal block from the same VJP: with ḡ the batch-mean gradient of the sampled loss, B ḡ² is
unbiased for diag(F), the sampled scores of different examples being independent with mean
zero. (With K columns they carry random signs for the same reason; with the empirical Fisher
it is only a rough scale.)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import tree_util

from natgrad import _random, blocks, ekfac, layers, low_rank
from natgrad.curvature import Curvature, check_batch, resolve
from natgrad.losses import Loss

__all__ = ["Factors", "factor_dtype", "node_dtype", "statistics"]

PyTree = Any


class Factors(NamedTuple):
    """One A and G per layer-looking dict of the params, in `natgrad.layers.find_layers` order
    (zeros where unregistered; A a vector when it is diagonal, as for embeddings; empty for
    scale-and-shift layers), the diagonal block `diag` shaped like params (zeros inside
    registered Kronecker layers; the exact per-example diagonal of scale-and-shift layers),
    and with EKFAC the scalings s per layer (in the basis of the last refresh; empty where
    the layer has no eigenbasis)."""

    a: tuple[jax.Array, ...]
    g: tuple[jax.Array, ...]
    diag: PyTree
    s: tuple[jax.Array, ...] = ()


def factor_dtype(w) -> jnp.dtype:
    """Factors are kept in at least float32: LAPACK has no float16/bfloat16 inverse, and their
    sums of squares would lose most digits there."""
    return jnp.promote_types(jnp.result_type(w), jnp.float32)


def node_dtype(node) -> jnp.dtype:
    """`factor_dtype` of a layer dict's first array."""
    return factor_dtype(jax.tree.leaves(node)[0])


def statistics(
    apply_fn: Callable,
    loss: Loss,
    params: PyTree,
    batch,
    *,
    key: jax.Array | None,
    curvature: str | Curvature = "fisher_mc",
    weight_sharing: str = "expand",
    eigenbasis: ekfac.Eigenbasis | None = None,
    sketches: tuple = (),
) -> tuple[Factors, tuple[bool, ...], jax.Array]:
    """This batch's factors, which layer-looking dicts the model registered, and its outputs.

    `registered` is static (known at trace time): slot l is True when the model passed that
    dict to its `natgrad.layers` function. `weight_sharing` is "expand" or "reduce"
    (`natgrad.blocks.sharing`). With an `eigenbasis` (EKFAC) the factors also carry this
    batch's scalings s = (1/B) Σ_b (Q_Aᵀ ∇W̄_b Q_G)² in it. `sketches` (per layer, (ℓ_A, ℓ_G)
    as `natgrad.kronecker.sketches` gives them, or ℓ_A alone): the factors kept as their
    sketches [F Ω | diag F] with ℓ columns, 0 for a whole factor (`natgrad.low_rank`).
    """
    curvature = resolve(curvature)
    if key is None and curvature.name != "empirical_fisher":
        raise ValueError(f"key: K-FAC with curvature {curvature.name!r} needs a PRNG key")
    inputs, targets = check_batch(batch)
    slots = layers.find_layers(params)
    nodes, _ = layers.flatten(params)
    bases = None
    if eigenbasis is not None:
        bases = [(qa, qg) if qa.size else () for qa, qg in zip(*eigenbasis[:2], strict=True)]
    sketches = tuple(s if isinstance(s, tuple) else (s, 0) for s in sketches)
    sketches = sketches or ((0, 0),) * len(slots)
    tags = tuple(
        _tags(s, nodes[s.position], bases is not None and bool(bases[i]), sketches[i])
        for i, s in enumerate(slots)
    )
    record = layers.Record()

    def model(tags, p):
        return apply_fn(layers.instrument(p, tags, record, weight_sharing, bases), inputs)

    outputs, vjp_fn = jax.vjp(model, tags, params)  # traces the model: `record` is now filled
    registered = tuple(slot in record.used for slot in range(len(slots)))
    loss.validate(outputs, targets)
    batch_size = outputs.shape[0]

    # Two independent keys only when both are drawn from: several sampled targets, whose summed
    # cotangents get random signs. One sample (the default) draws its targets from `key`; the
    # exact Fisher's columns are not random and their signs take `key`.
    both = curvature.name == "fisher_mc" and curvature.num_samples > 1
    k_factor, k_signs = _random.split(key) if key is not None and both else (key, key)
    cts = curvature.output_factor(loss, outputs, targets, k_factor)
    many = cts.shape[0] > 1
    if many:
        # The diagonal block squares the summed cotangent: random signs per column make the
        # cross terms vanish in expectation, so B ḡ² stays unbiased for diag(F).
        signs = _random.rademacher(k_signs, cts.shape[:2], cts.dtype)
        cts = cts * signs.reshape(*signs.shape, *(1,) * (cts.ndim - 2))
        tag_cts, param_cts = jax.vmap(vjp_fn)(cts)
        # Σ ā āᵀ (and token counts) do not depend on the cotangent; every other sum adds up
        # over the K columns.
        tag_cts = [
            tuple(jnp.sum(u, axis=0) for u in t)
            if blocks.is_diagonal(s.kind)
            else (t[0][0], *(jnp.sum(u, axis=0) for u in t[1:]))
            for s, t in zip(slots, tag_cts, strict=True)
        ]
        square = lambda c: jnp.sum(jnp.square(c), axis=0)  # noqa: E731
    else:
        tag_cts, param_cts = vjp_fn(cts[0])
        square = jnp.square

    a, g, scalings, exact = [], [], [], {}
    for i, (s, t, used) in enumerate(zip(slots, tag_cts, registered, strict=True)):
        if blocks.is_diagonal(s.kind):  # the block is the diagonal: no factors
            a.append(jnp.zeros((0, 0), t[0].dtype))
            g.append(jnp.zeros((0, 0), t[0].dtype))
            if used:
                exact[s.position] = [u / batch_size for u in t]
        else:
            a_l = _input_factor(s, t[0])
            a.append(a_l if used else jnp.zeros_like(a_l))
            g.append(t[1] / batch_size if used else jnp.zeros_like(t[1]))
        if eigenbasis is not None:
            shape = (eigenbasis.q_a[i].shape[0], eigenbasis.q_g[i].shape[0])
            has = bool(bases[i]) and used
            scalings.append(t[2] / batch_size if has else jnp.zeros(shape, t[0].dtype))

    covered = {s.position for s, used in zip(slots, registered, strict=True) if used}
    # Vmapped cotangents carry a leading K axis.
    first = (lambda c: c[0]) if many else (lambda c: c)  # noqa: E731
    # Up to the params' own nodes: vmapped cotangents (a leading K axis) no longer look like
    # layers, and `layers.flatten` would split them into leaves, out of step with the slots.
    _, treedef = layers.flatten(params)
    ct_nodes = treedef.flatten_up_to(param_cts)
    diag_nodes = []
    for i, node in enumerate(ct_nodes):
        if i in exact:  # sorted keys, as the node's leaves
            leaves = [
                u.astype(first(c).dtype)
                for u, c in zip(exact[i], jax.tree.leaves(node), strict=True)
            ]
            diag_nodes.append(tree_util.tree_unflatten(tree_util.tree_structure(node), leaves))
        elif i in covered:
            diag_nodes.append(jax.tree.map(lambda c: jnp.zeros_like(first(c)), node))
        else:
            diag_nodes.append(jax.tree.map(lambda c: square(c) / batch_size, node))
    diag = tree_util.tree_unflatten(treedef, diag_nodes)
    return Factors(tuple(a), tuple(g), diag, tuple(scalings)), registered, outputs


def _tags(slot, node, scalings: bool, sketch=(0, 0)) -> tuple[jax.Array, ...]:
    """Zero tags of one layer: its kind's own (`tag_shapes`), or A's (m+1)² and G's n² (with
    sketches of (ℓ_A, ℓ_G) columns, (m+1) × (ℓ_A+1) and n × (ℓ_G+1)), plus EKFAC's scalings
    tag (Q_A's size, n) when `scalings`."""
    dtype = node_dtype(node)
    kind = blocks.module(slot.kind)
    if hasattr(kind, "tag_shapes"):
        return tuple(jnp.zeros(shape, dtype) for shape in kind.tag_shapes(node))
    a_cols = sketch[0] + 1 if sketch[0] else slot.m + 1
    g_cols = sketch[1] + 1 if sketch[1] else slot.n
    tags = (jnp.zeros((slot.m + 1, a_cols), dtype), jnp.zeros((slot.n, g_cols), dtype))
    return (*tags, jnp.zeros((slot.m + slot.has_bias, slot.n), dtype)) if scalings else tags


def _input_factor(slot, a_sum: jax.Array) -> jax.Array:
    """A from its sum: divided by the rows the layer saw (the homogeneous corner Σ 1·1, or the
    token count of a diagonal A), without the bias row and column when there is no bias."""
    if a_sum.ndim == 1:
        return a_sum / jnp.maximum(jnp.sum(a_sum), 1)
    if low_rank.is_sketch(a_sum):  # [Σ ā āᵀΩ | Σ ā²]: its last entry is Σ 1·1 too
        a = a_sum if slot.has_bias else a_sum[: slot.m]
    else:
        a = a_sum if slot.has_bias else a_sum[: slot.m, : slot.m]
    return a / jnp.maximum(a_sum[-1, -1], 1)
