r"""Layers the model declares, so K-FAC can see them without tracing the graph.

``dense(params, x)`` is a dense layer, y = x W + b, with ``params = {"w": W (m, n), "b": b (n,)}``
("b" optional). Called on ordinary params it is plain JAX: the same two operations a hand-written
``x @ params["w"] + params["b"]`` performs, so swapping it in changes no result.

How K-FAC instruments it (`natgrad.kronecker`): it calls the model with params in which every
dict that looks like a dense layer (a Mapping with a 2-D "w" and optionally a matching 1-D "b",
nothing else) is replaced by a `DenseProbe`. A probe is a Mapping with the same entries, so code
that indexes it directly still works; it also carries two zero *tags*, A-tag of shape
(m+1, m+1) and G-tag of shape (n, n). When ``dense`` receives a probe it wraps its input and
output in identity functions with a custom VJP ("taps"):

    forward:   y = tap_out(tap_in(x) W + b),   both taps the identity;
    backward:  cotangent of the A-tag = Σ_rows ā āᵀ,   ā = [a, 1] (homogeneous coordinate);
               cotangent of the G-tag = Σ_rows g gᵀ,   g = ∂L/∂y (the pre-activation gradient).

So one VJP of the model, with respect to the tags, returns both Kronecker factors' sums of every
registered layer, whatever the leading dimensions of x (rows = all but the last axis). The tags
have fixed shapes known from W alone, so nothing needs discovering first.

Which probes were consumed is noted on the probe's `Record` while the model is traced (a Python
set owned by the one K-FAC call that made the probes; no global state). A dense-looking dict the
model used without ``dense`` is therefore known, at trace time, to be unregistered, and K-FAC
falls back to a diagonal block for it.

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
from typing import Any

import jax
import jax.numpy as jnp
from jax import tree_util

__all__ = [
    "dense",
    "DenseProbe",
    "Record",
    "is_dense_params",
    "find_dense",
    "flatten",
    "instrument",
]

PyTree = Any
_KEYS = frozenset({"w", "b"})


def dense(params: Mapping, x: jax.Array) -> jax.Array:
    """y = x @ params["w"] + params["b"] (the bias is optional); K-FAC's registered dense layer."""
    w = params["w"]
    b = params.get("b")
    if isinstance(params, DenseProbe):
        params.record.used.add(params.slot)
        y = _tap_inputs(x, params.a_tag) @ w
        y = y if b is None else y + b
        return _tap_outputs(y, params.g_tag)
    y = x @ w
    return y if b is None else y + b


def is_dense_params(node: Any) -> bool:
    """Whether `node` looks like a dense layer's params: {"w": (m, n)} or {"w", "b": (n,)}."""
    if not isinstance(node, Mapping) or "w" not in node or not set(node) <= _KEYS:
        return False
    w, b = node["w"], node.get("b")
    if jnp.ndim(w) != 2:
        return False
    return b is None or jnp.shape(b) == (jnp.shape(w)[1],)


def find_dense(params: PyTree) -> tuple[tuple[int, int, int, bool], ...]:
    """(position, m, n, has_bias) of each dense-looking dict, in `flatten` order (static)."""
    nodes, _ = flatten(params)
    return tuple(
        (i, *jnp.shape(node["w"]), "b" in node)
        for i, node in enumerate(nodes)
        if is_dense_params(node)
    )


def flatten(tree: PyTree):
    """`jax.tree_util.tree_flatten` that stops at dense-looking dicts (they become one node)."""
    return tree_util.tree_flatten(tree, is_leaf=is_dense_params)


class Record:
    """The probe slots `dense` consumed while one model call was traced (written at trace time)."""

    def __init__(self):
        self.used: set[int] = set()


@tree_util.register_pytree_node_class
class DenseProbe(Mapping):
    """A dense layer's params plus K-FAC's tags; `dense` taps the layer when it receives one."""

    def __init__(self, layer: Mapping, a_tag, g_tag, record: Record, slot: int):
        self.layer = dict(layer)
        self.a_tag, self.g_tag = a_tag, g_tag
        self.record, self.slot = record, slot

    def __getitem__(self, key):
        return self.layer[key]

    def __iter__(self):
        return iter(self.layer)

    def __len__(self):
        return len(self.layer)

    def tree_flatten(self):
        keys = tuple(sorted(self.layer))
        children = (tuple(self.layer[k] for k in keys), self.a_tag, self.g_tag)
        return children, (keys, self.record, self.slot)

    @classmethod
    def tree_unflatten(cls, aux, children):
        keys, record, slot = aux
        values, a_tag, g_tag = children
        return cls(dict(zip(keys, values, strict=True)), a_tag, g_tag, record, slot)


def instrument(params: PyTree, tags, record: Record) -> PyTree:
    """`params` with the dense-looking dicts replaced by probes carrying `tags` (one (A-tag,
    G-tag) pair per dict, in `find_dense` order) that note their use in `record`."""
    nodes, treedef = flatten(params)
    slot = 0
    for i, node in enumerate(nodes):
        if is_dense_params(node):
            nodes[i] = DenseProbe(node, *tags[slot], record, slot)
            slot += 1
    return tree_util.tree_unflatten(treedef, nodes)


# Taps: identities whose VJP also returns the Kronecker factors' sums as the tags' cotangents.


@jax.custom_vjp
def _tap_inputs(x, tag):
    return x


def _tap_inputs_fwd(x, tag):
    return x, (x, jnp.zeros((), tag.dtype))


def _tap_inputs_bwd(res, ct):
    x, tag = res
    a = x.reshape(-1, x.shape[-1]).astype(tag.dtype)
    a = jnp.concatenate([a, jnp.ones((a.shape[0], 1), a.dtype)], axis=1)
    return ct, (a.T @ a).astype(tag.dtype)


_tap_inputs.defvjp(_tap_inputs_fwd, _tap_inputs_bwd)


@jax.custom_vjp
def _tap_outputs(y, tag):
    return y


def _tap_outputs_fwd(y, tag):
    return y, jnp.zeros((), tag.dtype)


def _tap_outputs_bwd(tag, ct):
    g = ct.reshape(-1, ct.shape[-1]).astype(tag.dtype)
    return ct, (g.T @ g).astype(tag.dtype)


_tap_outputs.defvjp(_tap_outputs_fwd, _tap_outputs_bwd)
