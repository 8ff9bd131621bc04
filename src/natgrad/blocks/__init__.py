r"""The kinds of layer K-FAC gives a Kronecker block, one small module each.

A *kind* says how a layer's parameters look (so K-FAC can find them in the pytree without
tracing), what the layer computes on ordinary parameters, and how one call of it turns into
*positions*: for every example b and every position s where the same weights act,

    y[b, s] = ā[b, s]ᵀ W̄,      ā = [a, 1] (the homogeneous coordinate carries the bias),
    W̄ = [W.reshape(m, n); b] of shape (m + 1, n).

* `natgrad.blocks.dense`: y = x W + b on x of shape (batch, …, d_in); the positions are the
  axes between the batch axis and the feature axis (tokens, pixels, heads), a = x there.
* `natgrad.blocks.conv2d`: a 2-D convolution, NHWC / HWIO; the positions are the output
  pixels and a is the image patch each one sees (Grosse & Martens 2016, "KFC").

`natgrad.blocks.weights` has the shared look of their params ({"w", optional "b"});
`natgrad.blocks.sharing` turns the positions into the two Kronecker factors' sums, with K-FAC
*expand* or *reduce* over the shared positions (Eschenhagen et al. 2023), and
`natgrad.blocks.tap` is the one custom-VJP per declared layer call that computes them in its
backward pass, where both the layer input and the output cotangent are at hand.

* `natgrad.blocks.embedding`: y = E[ids], a dense layer on one-hot inputs whose A is diagonal
  (token counts), so it is kept as a vector.
* `natgrad.blocks.scale_shift`: y = x ⊙ scale + bias (normalisation layers' affine part), whose
  block is the exact diagonal of the Fisher from per-example gradients, not a Kronecker product.

A kind module provides ``NAME``, ``looks_like(node)``, ``check(layer, x)`` (ValueError naming
the bad argument), ``apply(layer, x, options)`` (plain JAX) and either

* ``positions(layer, x, ct, options) -> (a (B, S, m), g (B, S, n))``, the features of a in the
  row order of ``w.reshape(m, n)``: a Kronecker block from `sharing` (dense, conv2d; EKFAC
  applies to these), or
* ``tag_shapes(node)`` and ``tag_sums(layer, x, ct, dtype)``: its own statistics, one sum per
  tag (embedding, scale_shift). ``matrix_shape(node) -> (m, n, has_bias)`` then says how K-FAC
  sees its weight as a matrix, ``WEIGHT`` names that entry, and ``DIAGONAL = True`` marks a
  kind whose whole block is K-FAC's diagonal block, filled exactly by its tag sums.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from natgrad.blocks import conv2d, dense, embedding, scale_shift

__all__ = ["KINDS", "Spec", "kind_of", "module", "matrix_shape", "weight_key", "is_diagonal"]

KINDS = {
    dense.NAME: dense,
    conv2d.NAME: conv2d,
    embedding.NAME: embedding,
    scale_shift.NAME: scale_shift,
}
"""Kind name -> module, in the order K-FAC reports them."""


class Spec(NamedTuple):
    """What one declared layer call needs at trace time (hashable, static): its kind, the
    weight-sharing approximation, and the kind's options (e.g. strides and padding)."""

    kind: str
    weight_sharing: str
    options: tuple = ()


def kind_of(node: Any) -> str | None:
    """The name of the kind whose parameters `node` looks like, or None."""
    for name, kind in KINDS.items():
        if kind.looks_like(node):
            return name
    return None


def module(name: str):
    return KINDS[name]


def matrix_shape(name: str, node) -> tuple[int, int, bool]:
    """(m, n, has_bias): the weight of a `name` layer as K-FAC's (m, n) matrix (static)."""
    kind = KINDS[name]
    if hasattr(kind, "matrix_shape"):
        return kind.matrix_shape(node)
    shape = node["w"].shape
    m = 1
    for d in shape[:-1]:
        m *= int(d)
    return m, int(shape[-1]), "b" in node


def weight_key(name: str) -> str:
    """The entry of a `name` layer's dict that holds its weight matrix."""
    return getattr(KINDS[name], "WEIGHT", "w")


def is_diagonal(name: str) -> bool:
    """Whether a `name` layer's block is a diagonal one (filled by its own statistics)."""
    return getattr(KINDS[name], "DIAGONAL", False)
