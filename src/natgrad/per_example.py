r"""Sums of squared per-example gradients of the declared layers, in one backward pass.

A declared layer acts at positions s of example b, y_bs = W̄ᵀ ā_bs (ā = [a, 1] carries the
bias; `natgrad.blocks`), so example b's gradient of its own loss ℓ_b is

    ∇W̄_b = Σ_s ā_bs g_bsᵀ,      g_bs = ∂ℓ_b/∂y_bs.

One backward pass of the *summed* loss Σ_b ℓ_b gives every g_bs at once (example b's loss
depends on example b's outputs alone), and the layer's own input a is at hand in the same
place, its tap's backward pass, so the layer's sum of squares is

    Σ_b ∇W̄_b ⊙ ∇W̄_b = (ā ⊙ ā)ᵀ (g ⊙ g)             one position per example: one matmul,
                     = Σ_b (Σ_s ā_bs g_bsᵀ)²         shared positions (tokens, pixels),

at about the cost of the layer's own backward pass, where a loop over the B examples costs B
backward passes of batch 1 (Martens' 2010 diagonal preconditioner needs this sum:
`natgrad.preconditioners.empirical_fisher_diagonal`). Scale-and-shift layers give their
per-example squares as they do to K-FAC (`natgrad.blocks.scale_shift`).

It applies only when every parameter sits in a layer the model declares (`natgrad.layers`)
whose kind has positions (dense, conv2d) or per-example squares of its own (scale-and-shift),
which is known when the model is traced; `squared_gradient_sum` returns None otherwise
(embeddings, undeclared parameters), and the caller loops over examples. Like K-FAC's taps
it assumes the batch axis comes first and the examples do not interact (no batch statistics).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from jax import tree_util

from natgrad import blocks, ekfac, layers
from natgrad.curvature import check_batch

__all__ = ["squared_gradient_sum"]

PyTree = Any

_OWN_SUMS = ("scale_shift",)  # kinds whose `tag_sums` are per-example squares (not embedding's)


def squared_gradient_sum(apply_fn: Callable, loss, params: PyTree, batch) -> PyTree | None:
    """Σ_b ∇ℓ_b ⊙ ∇ℓ_b shaped like `params` (ℓ_b = ``loss.nll`` of example b), or None when
    a parameter is outside the dense, conv2d and scale-and-shift layers the model declares."""
    inputs, targets = check_batch(batch)
    nodes, treedef = layers.flatten(params)
    slots = layers.find_layers(params)
    if len(slots) != len(nodes):  # a parameter outside any layer-looking dict
        return None
    # Sums of squares in at least float32 (as K-FAC's factors), cast back to each parameter's.
    tags = tuple(
        jax.tree.map(lambda w: jnp.zeros(w.shape, jnp.promote_types(w.dtype, jnp.float32)), node)
        for node in (nodes[s.position] for s in slots)
    )
    record = layers.Record()

    def summed_loss(tags):
        probed = list(nodes)
        for slot, s in enumerate(slots):
            probed[s.position] = _Probe(nodes[s.position], (tags[slot],), record, slot)
        outputs = apply_fn(tree_util.tree_unflatten(treedef, probed), inputs)
        return jnp.sum(loss.nll(outputs, targets))

    value, vjp_fn = jax.vjp(summed_loss, tags)  # traces the model: `record` is now filled
    if len(record.used) != len(slots):
        return None
    (sums,) = vjp_fn(jnp.ones_like(value))
    leaves = [
        jax.tree.map(lambda s, p: s.astype(p.dtype), sums[slot], nodes[s.position])
        for slot, s in enumerate(slots)
    ]
    return tree_util.tree_unflatten(treedef, leaves)


@tree_util.register_pytree_node_class
class _Probe(layers.LayerProbe):
    """A layer's params with one tag shaped like them, whose cotangent is the layer's sum of
    squared per-example gradients; a kind without one (embedding) runs plain and stays unused."""

    def call(self, kind: str, x: jax.Array, options: tuple) -> jax.Array:
        module = blocks.module(kind)
        module.check(self.layer, x)
        if not (hasattr(module, "positions") or kind in _OWN_SUMS):
            return module.apply(self.layer, x, options)
        self.record.used.add(self.slot)
        return _tapped(blocks.Spec(kind, "expand", options))(self.layer, x, self.tags[0])


@functools.cache
def _tapped(spec: blocks.Spec):
    """`call(layer, x, tag) -> y`, whose backward pass gives `tag` the squares (cached per spec)."""
    kind = blocks.module(spec.kind)

    def plain(layer, x):
        return kind.apply(layer, x, spec.options)

    @jax.custom_vjp
    def call(layer: Mapping, x: jax.Array, tag: Mapping) -> jax.Array:
        return plain(layer, x)

    def fwd(layer, x, tag):
        return plain(layer, x), (layer, x, tag)

    def bwd(res, ct):
        layer, x, tag = res
        _, vjp_fn = jax.vjp(plain, layer, x)
        d_layer, dx = vjp_fn(ct)
        dtype = jax.tree.leaves(tag)[0].dtype
        if hasattr(kind, "positions"):
            a, g = kind.positions(layer, x, ct, spec.options)
            sums = _squares(a.astype(dtype), g.astype(dtype), layer)
        else:
            sums = dict(zip(sorted(layer), kind.tag_sums(layer, x, ct, dtype), strict=True))
        return d_layer, dx, {k: sums[k].reshape(tag[k].shape).astype(tag[k].dtype) for k in tag}

    call.defvjp(fwd, bwd)
    return call


def _squares(a: jax.Array, g: jax.Array, layer: Mapping) -> dict:
    """{"w": Σ_b (Σ_s a_bs g_bsᵀ)², "b": Σ_b (Σ_s g_bs)²} for positions a (B, S, m), g (B, S, n):
    `ekfac.squared_sums` of ā = [a, 1] (its last row the bias's)."""
    m = a.shape[-1]
    if "b" in layer:
        a = jnp.concatenate([a, jnp.ones((*a.shape[:-1], 1), a.dtype)], axis=-1)
    sums = ekfac.squared_sums(a, g)
    return {"w": sums[:m], "b": sums[m]} if "b" in layer else {"w": sums}
