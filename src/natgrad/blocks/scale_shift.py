r"""Elementwise scale-and-shift layers, y = x ⊙ scale + bias: the affine part of layer norm,
batch norm, RMS norm, group norm.

Parameters: ``{"scale": γ, "bias": β}`` (either may be absent), γ and β of one shape P, the
trailing axes of x they act on (usually (d,)). The names are flax's (``nn.LayerNorm``,
``nn.BatchNorm``, ``nn.GroupNorm`` and ``nn.RMSNorm`` store "scale" and "bias"), so a layer built
on `natgrad.layers.layer_norm` has the same parameter tree as ``nn.LayerNorm``, and no such dict
can be mistaken for a dense layer's {"w", "b"}.

Block: the exact diagonal of the Fisher (GGN) of these parameters, from per-example gradients.
With example b = the first axis of x, positions = the axes between it and P, and
g = ∂ℓ/∂y (one cotangent column; K-FAC sums its K columns),

    ∇γ_b = Σ_positions x_b ⊙ g_b,    ∇β_b = Σ_positions g_b,
    D_γ = (1/B) Σ_b ∇γ_b²,           D_β = (1/B) Σ_b ∇β_b²,

the convention of kfac-jax's ScaleAndShiftDiagonal. With the output curvature's square-root
columns (``curvature="fisher"`` or ``"ggn"``) D is diag(F) exactly; sampled (``"fisher_mc"``) it is
unbiased, and unlike the generic diagonal fall-back (B ḡ², the square of the batch mean) its
variance falls with B. The parameters are elementwise, so the block is diagonal: its inverse
divides by D + λ.

An input with as many axes as P is one example (an equinox layer under `jax.vmap`, where the
vmap then sums the per-example squares); under such a vmap an example with positions, (S, d),
needs the unit batch axis added, ``layer_norm(params, x[None])[0]``, or each position counts as
an example. A layer called twice with the same parameters adds the two calls' per-example
squares (cross terms dropped).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

__all__ = [
    "NAME",
    "DIAGONAL",
    "looks_like",
    "check",
    "apply",
    "matrix_shape",
    "tag_shapes",
    "tag_sums",
]

NAME = "scale_shift"
DIAGONAL = True  # the block is K-FAC's diagonal block, filled exactly by `tag_sums`
_KEYS = frozenset({"scale", "bias"})


def looks_like(node: Any) -> bool:
    """{"scale": P}, {"bias": P} or both, of one shape P with at least one axis, nothing else."""
    if not isinstance(node, Mapping) or not node or not set(node) <= _KEYS:
        return False
    shapes = {jnp.shape(v) for v in node.values()}
    return len(shapes) == 1 and len(next(iter(shapes))) >= 1


def check(layer: Mapping, x) -> None:
    """ValueError naming `params` or `x` when they do not make a scale-and-shift layer."""
    if not looks_like(layer):
        raise ValueError(
            "params: expected {'scale': shape, 'bias': shape} (either optional, one shape), got "
            f"{ {k: jnp.shape(v) for k, v in dict(layer).items()} }"
        )
    shape = jnp.shape(next(iter(layer.values())))
    if jnp.shape(x)[jnp.ndim(x) - len(shape) :] != shape:
        raise ValueError(f"x: expected trailing axes {shape}, got shape {jnp.shape(x)}")


def apply(layer: Mapping, x: jax.Array, options: tuple = ()) -> jax.Array:
    del options
    y = x if layer.get("scale") is None else x * layer["scale"]
    return y if layer.get("bias") is None else y + layer["bias"]


def matrix_shape(node: Mapping) -> tuple[int, int, bool]:
    del node
    return 0, 0, False  # no Kronecker factors


def tag_shapes(node: Mapping) -> tuple:
    """One tag per parameter, shaped like it, in sorted key order ("bias", "scale")."""
    return tuple(jnp.shape(node[k]) for k in sorted(node))


def tag_sums(layer: Mapping, x: jax.Array, g: jax.Array, dtype) -> tuple:
    """(Σ_b ∇β_b², Σ_b ∇γ_b²) for the keys `layer` has, sorted; g = ∂ℓ/∂y."""
    p = jnp.ndim(next(iter(layer.values())))
    x, g = x.astype(dtype), g.astype(dtype)
    if x.ndim == p:  # one example
        x, g = x[None], g[None]
    positions = tuple(range(1, x.ndim - p))
    grads = {"scale": lambda: jnp.sum(x * g, axis=positions), "bias": lambda: jnp.sum(g, positions)}
    return tuple(jnp.sum(jnp.square(grads[k]()), axis=0) for k in sorted(layer))
