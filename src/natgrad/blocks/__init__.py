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

A kind module provides ``NAME``, ``looks_like(node)``, ``check(layer, x)`` (ValueError naming
the bad argument), ``apply(layer, x, options)`` (plain JAX) and
``positions(layer, x, ct, options) -> (a (B, S, m), g (B, S, n))``, the features of a in the
row order of ``w.reshape(m, n)``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from natgrad.blocks import conv2d, dense

__all__ = ["KINDS", "Spec", "kind_of", "module"]

KINDS = {dense.NAME: dense, conv2d.NAME: conv2d}
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
