r"""Layers the model declares, so K-FAC can see them without tracing the graph.

* ``dense(params, x)``: y = x W + b, ``params = {"w": W (d_in, d_out), "b": b (d_out,)}``, on
  x of shape (batch, …, d_in) — the middle axes (tokens, pixels, heads) share W.
* ``conv2d(params, x, *, strides=(1, 1), padding="SAME")``: a 2-D convolution on NHWC images,
  ``params = {"w": (kh, kw, c_in, c_out), "b": (c_out,)}`` (flax's HWIO kernel layout).

* ``scale_shift(params, x)``: y = x ⊙ scale + bias, ``params = {"scale": (d,), "bias": (d,)}``
  (either optional; flax's names), and ``layer_norm(params, x, eps=1e-6)`` built on it: a
  normalisation layer's affine parameters, whose block is the exact Fisher diagonal.
* ``embedding(params, ids)``: y = E[ids], ``params = {"embedding": E (vocab, d)}`` (flax's
  name), whose block has a diagonal A of token counts.

"b" is optional in dense and conv2d. Called on ordinary params every layer is plain JAX
(``x @ w + b``; flax ``nn.Conv``'s `lax.conv_general_dilated`; ``x * scale + bias``;
``E[ids]``), so swapping them in changes no result.

How K-FAC instruments them (`natgrad.kronecker`): it calls the model with params in which every
dict that looks like a layer of a known kind (`natgrad.blocks`: a Mapping with a 2-D "w" for
dense, a 4-D "w" for conv2d, optionally a matching 1-D "b", nothing else) is replaced by a
`LayerProbe`. A probe is a Mapping with the same entries, so code that indexes it directly still
works; it also carries zero *tags*, an A-tag of shape (m+1, m+1) (m = the rows of W reshaped to
2-D: d_in, or kh·kw·c_in) and a G-tag of shape (n, n), and the weight-sharing approximation.
When ``dense`` or ``conv2d`` receives a probe it computes the layer through one custom VJP
(`natgrad.blocks.tap`) whose backward pass also returns, as the tags' cotangents,

    Σ ā āᵀ  over the layer's positions, ā = [a, 1] (a homogeneous coordinate for the bias),
    Σ g gᵀ  over its output gradients g = ∂L/∂y,

expanded or reduced over shared positions (`natgrad.blocks.sharing`); embeddings and
scale-and-shift layers fill their own tags (token counts; per-example squared gradients). So
one VJP of the model, with respect to the tags, returns both Kronecker factors' sums of every
registered layer. The tags have fixed shapes known from the params alone, so nothing needs
discovering first.

Which probes were consumed is noted on the probe's `Record` while the model is traced (a Python
set owned by the one K-FAC call that made the probes; no global state). A layer-looking dict
the model used without ``dense``/``conv2d`` is therefore known, at trace time, to be
unregistered, and K-FAC falls back to a diagonal block for it.

flax: a module passes its own parameter collection, which is where the probe arrives::

    class Dense(nn.Module):
        features: int

        @nn.compact
        def __call__(self, x):
            self.param("w", nn.initializers.lecun_normal(), (x.shape[-1], self.features))
            self.param("b", nn.initializers.zeros, (self.features,))
            return natgrad.layers.dense(self.variables["params"], x)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import tree_util

from natgrad import blocks
from natgrad.blocks import conv2d as conv2d_kind
from natgrad.blocks import dense as dense_kind
from natgrad.blocks import embedding as embedding_kind
from natgrad.blocks import scale_shift as scale_shift_kind
from natgrad.blocks import sharing, tap

__all__ = [
    "dense",
    "conv2d",
    "scale_shift",
    "layer_norm",
    "embedding",
    "LayerProbe",
    "DenseProbe",
    "Record",
    "Slot",
    "is_layer_params",
    "is_dense_params",
    "find_layers",
    "find_dense",
    "flatten",
    "instrument",
]

PyTree = Any


def dense(params: Mapping, x: jax.Array) -> jax.Array:
    """y = x @ params["w"] + params["b"] (the bias is optional) on x of shape (batch, …, d_in);
    K-FAC's registered dense layer."""
    if isinstance(params, LayerProbe):
        return params.call(dense_kind.NAME, x, ())
    dense_kind.check(params, x)
    return dense_kind.apply(params, x)


def conv2d(params: Mapping, x: jax.Array, *, strides=(1, 1), padding="SAME") -> jax.Array:
    """2-D convolution of NHWC `x` with HWIO ``params["w"]`` plus ``params["b"]`` (optional),
    feature groups 1; `padding` is "SAME", "VALID" or ((top, bottom), (left, right)). The same
    as flax ``nn.Conv(strides=..., padding=...)``; K-FAC's registered convolution (KFC)."""
    options = conv2d_kind.options(strides, padding)
    if isinstance(params, LayerProbe):
        return params.call(conv2d_kind.NAME, x, options)
    conv2d_kind.check(params, x)
    return conv2d_kind.apply(params, x, options)


def scale_shift(params: Mapping, x: jax.Array) -> jax.Array:
    """y = x * params["scale"] + params["bias"] (either optional; one shape, x's trailing axes):
    the affine part of a normalisation layer. K-FAC gives it the exact diagonal of the Fisher
    from per-example gradients (`natgrad.blocks.scale_shift`)."""
    if isinstance(params, LayerProbe):
        return params.call(scale_shift_kind.NAME, x, ())
    scale_shift_kind.check(params, x)
    return scale_shift_kind.apply(params, x)


def layer_norm(params: Mapping, x: jax.Array, *, eps: float = 1e-6) -> jax.Array:
    """Layer normalisation over the last axis, (x − mean) / sqrt(var + eps), then
    `scale_shift(params, ·)`: flax ``nn.LayerNorm(epsilon=eps)`` with the same parameters
    {"scale": (d,), "bias": (d,)}."""
    if not scale_shift_kind.looks_like(params):
        scale_shift_kind.check(params, x)  # raises, naming params
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    return scale_shift(params, (x - mean) * jax.lax.rsqrt(var + eps))


def embedding(params: Mapping, ids: jax.Array) -> jax.Array:
    """y = params["embedding"][ids], E of shape (vocab, d) (flax ``nn.Embed``'s name): the rows
    of the table for integer `ids` of any shape. K-FAC's block has a diagonal A of token counts
    (`natgrad.blocks.embedding`)."""
    if isinstance(params, LayerProbe):
        return params.call(embedding_kind.NAME, ids, ())
    embedding_kind.check(params, ids)
    return embedding_kind.apply(params, ids)


def is_layer_params(node: Any) -> bool:
    """Whether `node` looks like the params of a layer kind K-FAC knows (`natgrad.blocks`)."""
    return blocks.kind_of(node) is not None


def is_dense_params(node: Any) -> bool:
    """Whether `node` looks like a dense layer's params: {"w": (m, n)} or {"w", "b": (n,)}."""
    return dense_kind.looks_like(node)


class Slot(NamedTuple):
    """A layer-looking dict: its position in `flatten` order, kind, W as an (m, n) matrix, and
    whether it has a bias (static, from the params' shapes alone)."""

    position: int
    kind: str
    m: int
    n: int
    has_bias: bool


def find_layers(params: PyTree) -> tuple[Slot, ...]:
    """A `Slot` for each layer-looking dict, in `flatten` order (static)."""
    nodes, _ = flatten(params)
    slots = []
    for i, node in enumerate(nodes):
        kind = blocks.kind_of(node)
        if kind is not None:
            slots.append(Slot(i, kind, *blocks.matrix_shape(kind, node)))
    return tuple(slots)


def find_dense(params: PyTree) -> tuple[tuple[int, int, int, bool], ...]:
    """(position, m, n, has_bias) of each dense-looking dict, in `flatten` order (static)."""
    return tuple(
        (s.position, s.m, s.n, s.has_bias) for s in find_layers(params) if s.kind == "dense"
    )


def flatten(tree: PyTree):
    """`jax.tree_util.tree_flatten` that stops at layer-looking dicts (they become one node)."""
    return tree_util.tree_flatten(tree, is_leaf=is_layer_params)


class Record:
    """The probe slots the layers consumed while one model call was traced (written at trace
    time)."""

    def __init__(self):
        self.used: set[int] = set()


@tree_util.register_pytree_node_class
class LayerProbe(Mapping):
    """A layer's params plus K-FAC's tags (A-tag, G-tag, …); `dense` and `conv2d` tap the layer
    when they receive one."""

    def __init__(
        self,
        layer: Mapping,
        tags,
        record: Record,
        slot: int,
        weight_sharing: str = "expand",
        basis: tuple = (),
    ):
        self.layer = dict(layer)
        self.tags = tuple(tags)
        self.record, self.slot = record, slot
        self.weight_sharing = weight_sharing
        self.basis = tuple(basis)  # EKFAC's (Q_A, Q_G), or ()

    @property
    def a_tag(self):
        return self.tags[0]

    @property
    def g_tag(self):
        return self.tags[1]

    def call(self, kind: str, x: jax.Array, options: tuple) -> jax.Array:
        """The layer of `kind` on `x`, through the tap (and noted as used)."""
        blocks.module(kind).check(self.layer, x)
        self.record.used.add(self.slot)
        spec = blocks.Spec(kind, self.weight_sharing, options)
        return tap.tapped(spec)(self.layer, x, self.tags, self.basis)

    def __getitem__(self, key):
        return self.layer[key]

    def __iter__(self):
        return iter(self.layer)

    def __len__(self):
        return len(self.layer)

    def tree_flatten(self):
        keys = tuple(sorted(self.layer))
        children = (tuple(self.layer[k] for k in keys), self.tags, self.basis)
        return children, (keys, self.record, self.slot, self.weight_sharing)

    @classmethod
    def tree_unflatten(cls, aux, children):
        keys, record, slot, weight_sharing = aux
        values, tags, basis = children
        layer = dict(zip(keys, values, strict=True))
        return cls(layer, tags, record, slot, weight_sharing, basis)


DenseProbe = LayerProbe  # the name before convolutions had blocks


def instrument(
    params: PyTree, tags, record: Record, weight_sharing: str = "expand", bases=None
) -> PyTree:
    """`params` with the layer-looking dicts replaced by probes carrying `tags` (one tuple
    (A-tag, G-tag, …) per dict, in `find_layers` order) that note their use in `record`;
    `bases`, one () or EKFAC (Q_A, Q_G) per dict, rides along to the taps."""
    weight_sharing = sharing.check(weight_sharing)
    nodes, treedef = flatten(params)
    slot = 0
    for i, node in enumerate(nodes):
        if is_layer_params(node):
            basis = () if bases is None else bases[slot]
            nodes[i] = LayerProbe(node, tags[slot], record, slot, weight_sharing, basis)
            slot += 1
    return tree_util.tree_unflatten(treedef, nodes)
