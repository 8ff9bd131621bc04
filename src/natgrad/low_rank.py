r"""A rank-k-plus-identity inverse of a large damped Kronecker factor (`input_factor_rank`).

`input_factor_rank=k` applies it to every input factor wider than 2k; ``"auto"`` (the default
of `natgrad.kfac`) to those wider than `AUTO_MIN_WIDTH` = 512 with k = `AUTO_RANK` = 32, where
the exact application costs at least 8× the low-rank one and a narrower factor stays exact.
The preconditioner `natgrad.preconditioners.kfac` inverts exactly unless asked.

K-FAC's step applies M⁻¹ = (A + dI)⁻¹ to the gradient of every layer. For a wide input (785
pixels and a bias for an MNIST MLP) that product, n² per output column, costs more than the
layer's own forward and backward pass. With M = Q diag(μ) Qᵀ (eigenvalues μ₁ ≥ … ≥ μ_n), keep the
top k eigenpairs and replace the others by their mean:

    M⁻¹ ≈ Q_k diag(1/μ_k) Q_kᵀ + (I − Q_k Q_kᵀ) / μ̄,   μ̄ = (tr M − Σ_{i≤k} μ_i) / (n − k),

which applied to V (n × m) costs 2nkm + nm instead of n²m, is exact when the n − k smallest
eigenvalues are equal (e.g. M = low rank + dI), and is symmetric positive definite whenever M is
(μ̄ ≥ d > 0). Input covariances of images are dominated by few directions; the tail they leave is
mostly the damping d.

The top eigenpairs come from subspace iteration, warm-started from the previous refresh's basis
(the factors move slowly between refreshes): Q ← qr(M Q) `iterations` times, then Rayleigh-Ritz,
B = QᵀMQ = U diag(μ) Uᵀ, Q ← QU. Each iteration costs n²k, a few per refresh against an n³
inversion.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from natgrad import _random

__all__ = [
    "LowRankInverse",
    "init",
    "factorise",
    "apply",
    "resolve",
    "ITERATIONS",
    "AUTO_RANK",
    "AUTO_MIN_WIDTH",
]

ITERATIONS = 4  # subspace iterations per refresh
AUTO_RANK = 32
AUTO_MIN_WIDTH = 512  # n ≥ 16k: the exact n² per column ≥ 8× the low-rank 2nk


def resolve(input_factor_rank) -> tuple[int, int] | None:
    """(k, the width an input factor must exceed) for `input_factor_rank` — an int k: (k, 2k);
    ``"auto"``: (`AUTO_RANK`, `AUTO_MIN_WIDTH`); None: no low-rank inverse. Any other string
    raises ValueError (ints are checked by `natgrad.kronecker.check_options`)."""
    if input_factor_rank is None:
        return None
    if isinstance(input_factor_rank, str):
        if input_factor_rank != "auto":
            expected = "an integer >= 1, None or 'auto'"
            raise ValueError(f"input_factor_rank: expected {expected}, got {input_factor_rank!r}")
        return AUTO_RANK, AUTO_MIN_WIDTH
    return input_factor_rank, 2 * input_factor_rank


class LowRankInverse(NamedTuple):
    """Q_k diag(inverse) Q_kᵀ + (I − Q_k Q_kᵀ) · tail_inverse."""

    q: jax.Array  # (n, k), orthonormal columns
    inverse: jax.Array  # (k,), 1 / μ_i
    tail_inverse: jax.Array  # (), 1 / μ̄


def init(n: int, k: int, dtype) -> LowRankInverse:
    """A fixed orthonormal start (from PRNGKey(0): a constant, the same every run) and zeros."""
    start = _random.draw(jax.random.normal, jax.random.PRNGKey(0), (n, k), jnp.float32)
    start = start.astype(dtype)
    q, _ = jnp.linalg.qr(start)
    return LowRankInverse(q, jnp.zeros((k,), dtype), jnp.zeros((), dtype))


def factorise(m: jax.Array, previous: LowRankInverse, iterations: int = ITERATIONS):
    """The rank-k-plus-identity inverse of the SPD matrix `m`, from `previous`'s basis."""
    # A loop, not unrolled: one QR to compile instead of `iterations`.
    q = jax.lax.fori_loop(0, iterations, lambda _, q: jnp.linalg.qr(m @ q)[0], previous.q)
    mu, u = jnp.linalg.eigh(q.T @ m @ q)
    q = q @ u
    n, k = q.shape
    tail = (jnp.trace(m) - jnp.sum(mu)) / (n - k)
    # μ̄ ≥ the damping in exact arithmetic; rounding must not make it vanish or go negative.
    tail = jnp.maximum(tail, jnp.finfo(m.dtype).tiny)
    return LowRankInverse(q, 1 / mu, 1 / tail)


def apply(inv: LowRankInverse, v: jax.Array) -> jax.Array:
    """M⁻¹ V ≈ Q_k ((Q_kᵀ V) ⊙ (1/μ − 1/μ̄)) + V / μ̄."""
    v = v.astype(inv.q.dtype)
    return inv.q @ ((inv.q.T @ v) * (inv.inverse - inv.tail_inverse)[:, None]) + (
        inv.tail_inverse * v
    )
