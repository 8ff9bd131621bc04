r"""Dense layers, y = x W + b, on inputs of shape (batch, …, d_in).

Parameters: ``{"w": W (m, n), "b": b (n,)}`` ("b" optional). The axes of x between the first
(the batch) and the last (the features) are positions sharing W: tokens of a sequence, pixels,
heads. A vector input (B, m) has one position per example; a single example (m,) — as under an
equinox model's `jax.vmap` — is one example at one position. Under such a vmap a sequence
layer sees one example (S, m) and should add the unit batch axis itself,
``dense(params, x[None])[0]``, so that *reduce* pools over its positions (*expand* treats every
row alike and does not care).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from natgrad.blocks import weights

__all__ = ["NAME", "looks_like", "check", "apply", "positions"]

NAME = "dense"


def looks_like(node: Any) -> bool:
    """{"w": (m, n)} or {"w": (m, n), "b": (n,)}, nothing else."""
    return weights.is_weight_dict(node, 2)


def check(layer: Mapping, x) -> None:
    """ValueError naming `params` or `x` when they do not make a dense layer."""
    if not looks_like(layer):
        raise ValueError(
            "params: expected {'w': (d_in, d_out)} with an optional 'b': (d_out,), got "
            f"{ {k: jnp.shape(v) for k, v in layer.items()} }"
        )
    m = jnp.shape(layer["w"])[0]
    if jnp.ndim(x) < 1 or jnp.shape(x)[-1] != m:
        raise ValueError(f"x: expected shape (batch, ..., {m}), got {jnp.shape(x)}")


def apply(layer: Mapping, x: jax.Array, options: tuple = ()) -> jax.Array:
    del options
    y = x @ layer["w"]
    return y if layer.get("b") is None else y + layer["b"]


def _rows(v: jax.Array) -> jax.Array:
    """(B, S, d): batch first, every middle axis a position."""
    if v.ndim == 1:
        return v[None, None]
    return v.reshape(v.shape[0], -1, v.shape[-1])


def positions(layer: Mapping, x: jax.Array, ct: jax.Array, options: tuple = ()):
    """a = x and g = ∂L/∂y at every (example, position): (B, S, m), (B, S, n)."""
    del layer, options
    return _rows(x), _rows(ct)
