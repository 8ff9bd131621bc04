"""What a layer's params look like to K-FAC: a weight "w" and an optional bias "b", no more."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

__all__ = ["is_weight_dict"]

_KEYS = frozenset({"w", "b"})


def is_weight_dict(node: Any, ndim: int) -> bool:
    """Whether `node` is {"w": an `ndim`-D array} or that plus "b" of shape (w.shape[-1],)."""
    if not isinstance(node, Mapping) or "w" not in node or not set(node) <= _KEYS:
        return False
    w, b = node["w"], node.get("b")
    if jnp.ndim(w) != ndim:
        return False
    return b is None or jnp.shape(b) == (jnp.shape(w)[-1],)
