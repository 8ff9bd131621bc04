r"""Embedding lookups, y = E[ids]: a dense layer on one-hot inputs, stored as a table.

Parameters: ``{"embedding": E (vocab, d)}``, flax's name (``nn.Embed``) and layout. A lookup
is x W with x = onehot(id) and W = E, no bias; the key "embedding" (not dense's "w") keeps a
(vocab, d) table from being taken for a bias-free dense layer, whose (vocab × vocab) input
factor would be dense and huge.

Block: K-FAC's A ⊗ G with the one-hot inputs' factor worked out: for one-hot rows,
Σ_rows a aᵀ = diag(counts), so

    A = diag(counts / rows),    G = (1/B) Σ_rows g gᵀ,   g = ∂ℓ/∂y at each looked-up row,

counts[v] the number of times token v was looked up in the batch, rows the number of lookups
(B × sequence length): K-FAC *expand* over the positions. A is diagonal, so (A + π√λ I)⁻¹ is an
elementwise divide and A costs vocab numbers, not vocab². (*Reduce* would average the one-hot
rows of a sequence, and its A would not be diagonal; embeddings always expand.)

Exact (equal to the GGN block) when the loss is a sum over positions and the output at a
position depends on the table only through that position's row, linearly, with an output
curvature the same at every row (e.g. a linear read-out with squared error): the cross terms
between positions vanish and G is the same for every token. Rows of never-seen tokens have
A = 0: only the damping acts there (their gradient is zero anyway).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

__all__ = [
    "NAME",
    "WEIGHT",
    "looks_like",
    "check",
    "apply",
    "matrix_shape",
    "tag_shapes",
    "tag_sums",
]

NAME = "embedding"
WEIGHT = "embedding"


def looks_like(node: Any) -> bool:
    """{"embedding": (vocab, d)}, nothing else."""
    return (
        isinstance(node, Mapping)
        and set(node) == {"embedding"}
        and jnp.ndim(node["embedding"]) == 2
    )


def check(layer: Mapping, ids) -> None:
    """ValueError naming `params` or `ids` when they do not make an embedding lookup."""
    if not looks_like(layer):
        raise ValueError(
            "params: expected {'embedding': (vocab, d)}, got "
            f"{ {k: jnp.shape(v) for k, v in dict(layer).items()} }"
        )
    if not jnp.issubdtype(jnp.result_type(ids), jnp.integer):
        raise ValueError(f"ids: expected integer token ids, got dtype {jnp.result_type(ids)}")


def apply(layer: Mapping, ids: jax.Array, options: tuple = ()) -> jax.Array:
    del options
    return layer["embedding"][ids]


def matrix_shape(node: Mapping) -> tuple[int, int, bool]:
    vocab, d = jnp.shape(node["embedding"])
    return int(vocab), int(d), False


def tag_shapes(node: Mapping) -> tuple:
    """A's diagonal (vocab,) and G (d, d)."""
    vocab, d = jnp.shape(node["embedding"])
    return (vocab,), (d, d)


def tag_sums(layer: Mapping, ids: jax.Array, g: jax.Array, dtype) -> tuple:
    """(counts (vocab,), Σ_rows g gᵀ (d, d)): the diagonal of Σ_rows a aᵀ and G's sum."""
    vocab = jnp.shape(layer["embedding"])[0]
    counts = jnp.zeros((vocab,), dtype).at[ids.reshape(-1)].add(1)
    g = g.reshape(-1, g.shape[-1]).astype(dtype)
    return counts, g.T @ g
