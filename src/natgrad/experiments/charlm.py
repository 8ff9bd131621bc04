r"""A character-level language model: a small pre-norm transformer on Python's own source.

Data. The text is the Python standard library's top-level modules (``sysconfig``'s ``stdlib``
path, ``*.py`` in sorted order), read at run time — it exists wherever Python does and is never
stored in the repository. Characters map to a fixed vocabulary of the 95 printable ASCII
characters, newline, and one "other" token (97 symbols). The first 90 % of the characters
train, the last 10 % validate. A batch is B windows of T + 1 characters at offsets drawn from an
explicit seed; inputs are the first T, targets the last T (next-character prediction).

Model. Token and learned position embeddings (width d), then ``depth`` pre-norm blocks

    h ← h + Attn(LN(h)),   h ← h + MLP(LN(h)),   MLP(x) = W₂ gelu(W₁ x),

causal multi-head attention with ``heads`` heads, a final LN and an output layer to the
vocabulary's logits. Every matrix product is `natgrad.layers.dense` applied over the (B, T, ·)
sequence axes, so K-FAC gives each its Kronecker block with the weight-sharing approximation
the optimiser chooses ("expand": the loss is per position here, the setting where expand is
the natural one; Eschenhagen et al., 2023). Layer norms (`layers.layer_norm`, flax's
{"scale", "bias"}) and the token embedding (`layers.embedding`) are declared too: K-FAC gives
them the exact Fisher diagonal and the token-count block; the learned positions, a plain array,
get a diagonal block.

The loss is `natgrad.losses.softmax_cross_entropy` over (B, T, V) logits: the nll summed over
the T positions of a window, averaged over windows; the reports divide by T (nats per
character).
"""

from __future__ import annotations

import glob
import os
import sysconfig
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from natgrad import layers, losses

__all__ = ["VOCAB", "Corpus", "corpus", "windows", "Transformer", "transformer"]

VOCAB = 97  # 95 printable ASCII + newline + "other"


class Corpus(NamedTuple):
    train: np.ndarray  # int32 token ids
    valid: np.ndarray


def encode(text: str) -> np.ndarray:
    """Token ids: printable ASCII c ↦ ord(c) − 32 (0–94), newline ↦ 95, anything else ↦ 96."""
    codes = np.frombuffer(text.encode("utf-32-le"), np.uint32).astype(np.int64)
    ids = np.where((codes >= 32) & (codes < 127), codes - 32, 96)
    return np.where(codes == 10, 95, ids).astype(np.int32)


def corpus(max_chars: int = 2_000_000) -> Corpus:
    """The first `max_chars` characters of the standard library's top-level modules."""
    if isinstance(max_chars, bool) or not isinstance(max_chars, int) or max_chars < 1000:
        raise ValueError(f"max_chars: expected an integer >= 1000, got {max_chars!r}")
    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))
    parts, size = [], 0
    for path in files:
        with open(path, encoding="utf-8", errors="replace") as f:
            parts.append(f.read())
        size += len(parts[-1])
        if size >= max_chars:
            break
    ids = encode("".join(parts)[:max_chars])
    if len(ids) < 1000:
        raise ValueError("corpus: the standard library's source was not found or is too short")
    cut = int(0.9 * len(ids))
    return Corpus(ids[:cut], ids[cut:])


def windows(ids: np.ndarray, batch: int, length: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """`batch` random windows: inputs (batch, length) and next-character targets."""
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, len(ids) - length - 1, size=batch)
    idx = starts[:, None] + np.arange(length + 1)[None]
    chunk = ids[idx]
    return chunk[:, :-1], chunk[:, 1:]


class Transformer(NamedTuple):
    init: Callable
    apply: Callable
    loss: losses.Loss
    length: int


def transformer(width: int = 64, depth: int = 2, heads: int = 4, length: int = 64) -> Transformer:
    """The model above; ``apply(params, ids)`` returns logits of shape (B, T, VOCAB)."""
    if width % heads:
        raise ValueError(f"heads: expected a divisor of width={width}, got {heads}")

    def dense_init(key, m, n, scale=1.0):
        w = jax.random.normal(key, (m, n), jnp.float32) * (scale / m) ** 0.5
        return {"w": w, "b": jnp.zeros(n, jnp.float32)}

    def ln_init():
        return {"scale": jnp.ones(width, jnp.float32), "bias": jnp.zeros(width, jnp.float32)}

    def init(key):
        keys = iter(jax.random.split(key, 3 + 4 * depth))
        blocks = [
            {
                "ln1": ln_init(),
                "qkv": dense_init(next(keys), width, 3 * width),
                "out": dense_init(next(keys), width, width, 1.0 / depth),
                "ln2": ln_init(),
                "up": dense_init(next(keys), width, 4 * width, 2.0),
                "down": dense_init(next(keys), 4 * width, width, 1.0 / depth),
            }
            for _ in range(depth)
        ]
        tok = 0.02 * jax.random.normal(next(keys), (VOCAB, width), jnp.float32)
        pos = 0.02 * jax.random.normal(next(keys), (length, width), jnp.float32)
        return {
            "tokens": {"embedding": tok},
            "positions": pos,
            "blocks": blocks,
            "ln": ln_init(),
            "head": dense_init(next(keys), width, VOCAB),
        }

    def attention(p, x):
        b, t, _ = x.shape
        q, k, v = jnp.split(layers.dense(p["qkv"], x), 3, axis=-1)
        split = lambda a: a.reshape(b, t, heads, width // heads)  # noqa: E731
        scores = jnp.einsum("bqhd,bkhd->bhqk", split(q), split(k)) / (width // heads) ** 0.5
        causal = jnp.tril(jnp.ones((t, t), bool))
        weights = jax.nn.softmax(jnp.where(causal, scores, -1e9), axis=-1)
        mixed = jnp.einsum("bhqk,bkhd->bqhd", weights, split(v)).reshape(b, t, width)
        return layers.dense(p["out"], mixed)

    def apply(params, ids):
        h = layers.embedding(params["tokens"], ids) + params["positions"][: ids.shape[1]]
        for p in params["blocks"]:
            h = h + attention(p, layers.layer_norm(p["ln1"], h))
            h = h + layers.dense(
                p["down"], jax.nn.gelu(layers.dense(p["up"], layers.layer_norm(p["ln2"], h)))
            )
        return layers.dense(params["head"], layers.layer_norm(params["ln"], h))

    return Transformer(init, apply, losses.softmax_cross_entropy(), length)
