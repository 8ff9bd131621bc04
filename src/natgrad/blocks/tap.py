r"""One custom VJP per declared layer call: the layer, plus K-FAC's factor sums in its backward.

    forward:   y = layer(W̄, x)                      (the kind's plain JAX);
    backward:  (∂W̄, ∂x) = the layer's own VJP of the output cotangent ct, and for the tags
               (A-tag, G-tag, …) the cotangents (Σ ā āᵀ, Σ g gᵀ, 0, …) of
               `natgrad.blocks.sharing.factor_sums` over the kind's positions of (x, ct);
               an A- or G-tag that is not square asks for that factor's sketch instead
               (`natgrad.low_rank`).

The tags are zero arrays the caller differentiates with respect to: one VJP of the whole
instrumented model returns every declared layer's factor sums next to the ordinary parameter
gradient. Both the input x and the cotangent are at hand in one place, so a block that needs
them jointly is computed here too: with an eigenbasis (Q_A, Q_G) passed in (EKFAC), a third
tag gets Σ_b (Q_Aᵀ ∇W̄_b Q_G)² from the same positions (`natgrad.ekfac.scaling_sums`); a kind
with its own statistics (``tag_sums``: embeddings, scale-and-shift) fills its tags itself.

Under `jax.vmap` (an equinox model's per-example call, or K-FAC's columns of the output
curvature) JAX vmaps this backward pass: the sums of each mapped call are added up by the
transpose of the broadcast of the unmapped tags, which is the sum over the batch we want.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import jax
import jax.numpy as jnp

from natgrad import ekfac, low_rank
from natgrad.blocks import KINDS, Spec, sharing

__all__ = ["tapped"]


@functools.cache
def tapped(spec: Spec):
    """`call(layer, x, tags, basis) -> y` for this kind and weight sharing (cached per static
    spec); `basis` is () or EKFAC's (Q_A, Q_G)."""
    kind = KINDS[spec.kind]

    def plain(layer, x):
        return kind.apply(layer, x, spec.options)

    @jax.custom_vjp
    def call(layer: Mapping, x: jax.Array, tags: tuple, basis: tuple = ()) -> jax.Array:
        return plain(layer, x)

    def fwd(layer, x, tags, basis=()):
        return plain(layer, x), (layer, x, tags, basis)

    def bwd(res, ct):
        layer, x, tags, basis = res
        _, vjp_fn = jax.vjp(plain, layer, x)
        d_layer, dx = vjp_fn(ct)
        dtype = tags[0].dtype
        if hasattr(kind, "tag_sums"):
            sums = kind.tag_sums(layer, x, ct, dtype)
        else:
            a, g = kind.positions(layer, x, ct, spec.options)
            # An A-tag of (m+1) × (ℓ+1) asks for A's sketch, a G-tag of n × (ℓ+1) for G's
            # (`natgrad.low_rank`).
            omega = omega_g = None
            if low_rank.is_sketch(tags[0]):
                rows, cols = tags[0].shape
                omega = low_rank.padded_sketch(rows, cols - 1, "b" in layer)
            if low_rank.is_sketch(tags[1]):
                omega_g = low_rank.sketch_matrix(tags[1].shape[0], tags[1].shape[1] - 1)
            sums = sharing.factor_sums(a, g, spec.weight_sharing, dtype, omega, omega_g)
            if basis:
                sums = (*sums, ekfac.scaling_sums(a, g, *basis, has_bias="b" in layer))
        sums = (*sums, *(jnp.zeros_like(t) for t in tags[len(sums) :]))
        sums = tuple(s.astype(t.dtype) for s, t in zip(sums, tags, strict=True))
        return d_layer, dx, sums, jax.tree.map(jnp.zeros_like, basis)

    call.defvjp(fwd, bwd)
    return call
