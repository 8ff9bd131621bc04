r"""A rank-k-plus-identity inverse of a large damped Kronecker factor, from a sketch.

`input_factor_rank=k` applies it to every input factor A wider than 2k, `output_factor_rank=k`
to every output factor G wider than 2k; ``"auto"`` (the default of `natgrad.kfac` for both) to
those at least `AUTO_MIN_WIDTH` = 256 wide with k = `AUTO_RANK` = 32, where the exact
application costs at least 4× the low-rank one and a narrower factor stays exact. The
preconditioner `natgrad.preconditioners.kfac` inverts exactly unless asked. Everything below
is written for A; G is the same with g for ā (its sketch [G Ω | diag G], from Σ g (gᵀΩ)).

K-FAC's step applies M⁻¹ = (A + dI)⁻¹ to the gradient of every layer. For a wide input (785
pixels and a bias for an MNIST MLP) that product, n² per output column, costs more than the
layer's own forward and backward pass. With A's eigenvalues λ₁ ≥ … ≥ λ_n, keep the top k
eigenpairs and replace the others by their mean:

    M⁻¹ ≈ Q_k diag(1/μ_k) Q_kᵀ + (I − Q_k Q_kᵀ) / μ̄,   μ_i = λ_i + d,
    μ̄ = (tr A − Σ_{i≤k} λ_i) / (n − k) + d,

which applied to V (n × m) costs 2nkm + nm instead of n²m, is exact when A has rank ≤ k, and is
symmetric positive definite (μ̄ ≥ d > 0). Input covariances of images are dominated by few
directions; the tail they leave is mostly the damping d.

A itself is never formed. K-FAC keeps, instead of the n × n average of ā āᵀ, its sketch
Y = A Ω with a fixed Gaussian test matrix Ω (n × ℓ, ℓ = 2k, `sketch_matrix`) and its diagonal
(for tr A, π and the row count): [Y | diag A], n × (ℓ + 1), averaged like any factor since
Y is linear in A. A batch adds Σ ā (āᵀΩ): 2nℓ flops a row where ā āᵀ costs n² (785 pixels:
6× fewer), and the average is 785 × 65 instead of 785 × 785. A refresh recovers the top k
eigenpairs by the Nyström approximation A ≈ Y (ΩᵀY)⁺ Yᵀ (Halko, Martinsson & Tropp 2011,
§5.4; Tropp et al. 2017): exact when rank A ≤ ℓ, otherwise its eigenvalues are underestimates
(Â ⪯ A), off by about the eigenvalues beyond the ℓ-th, and the tail mean μ̄ comes out high.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "LowRankInverse",
    "init",
    "width",
    "sketch_matrix",
    "padded_sketch",
    "from_sketch",
    "is_sketch",
    "apply",
    "forward",
    "resolve",
    "AUTO_RANK",
    "AUTO_MIN_WIDTH",
    "OVERSAMPLING",
]

AUTO_RANK = 32
AUTO_MIN_WIDTH = 256  # n ≥ 8k: the exact n² per column ≥ 4× the low-rank 2nk
OVERSAMPLING = 2  # the sketch has ℓ = 2k columns (`width`)


def resolve(rank, name: str = "input_factor_rank") -> tuple[int, int] | None:
    """(k, the least width of a factor kept at rank k) for a factor rank option `name` — an int
    k: (k, 2k + 1); ``"auto"``: (`AUTO_RANK`, `AUTO_MIN_WIDTH`); None: no low-rank inverse. Any
    other string raises ValueError naming `name` (ints are checked by
    `natgrad.kronecker.check_options`)."""
    if rank is None:
        return None
    if isinstance(rank, str):
        if rank != "auto":
            raise ValueError(f"{name}: expected an integer >= 1, None or 'auto', got {rank!r}")
        return AUTO_RANK, AUTO_MIN_WIDTH
    return rank, 2 * rank + 1


class LowRankInverse(NamedTuple):
    """Q_k diag(inverse) Q_kᵀ + (I − Q_k Q_kᵀ) · tail_inverse."""

    q: jax.Array  # (n, k), orthonormal columns
    inverse: jax.Array  # (k,), 1 / μ_i
    tail_inverse: jax.Array  # (), 1 / μ̄


def width(k: int, n: int) -> int:
    """ℓ, the number of columns of the sketch of an n-wide factor at rank k < n/2: 2k, or
    n − 2 if less, so that the sketch [Y | diag A] is never square (a square factor is exact)."""
    return min(OVERSAMPLING * k, n - 2)


def init(n: int, k: int, dtype) -> LowRankInverse:
    """Zeros: K-FAC applies no inverse before its first statistics."""
    return LowRankInverse(jnp.zeros((n, k), dtype), jnp.zeros((k,), dtype), jnp.zeros((), dtype))


def sketch_matrix(n: int, columns: int) -> np.ndarray:
    """Ω (n × ℓ), float64: a fixed Gaussian test matrix, the same for every call with these
    sizes (a constant of the compiled step), scaled so that E[ΩΩᵀ] = I."""
    rng = np.random.default_rng((n, columns))
    return rng.standard_normal((n, columns)) / np.sqrt(columns)


def padded_sketch(rows: int, columns: int, has_bias: bool) -> np.ndarray:
    """Ω for a layer's (m+1)-wide inputs ā = [a, 1]: that of its m + has_bias factor rows, with
    a zero row for the homogeneous coordinate when the layer has no bias (its A is m × m)."""
    omega = sketch_matrix(rows - (not has_bias), columns)
    return omega if has_bias else np.concatenate([omega, np.zeros((1, columns))])


def from_sketch(sketch: jax.Array, damping, k: int) -> LowRankInverse:
    """The rank-k-plus-identity inverse of A + dI from A's sketch [Y | diag A] (Nyström).

    With ΩᵀY = V diag(β) Vᵀ and F = Y V β^{-1/2} (β below a relative floor dropped),
    A ≈ F Fᵀ, whose eigenpairs come from the small FᵀF = W diag(σ²) Wᵀ: U = F W / σ, λ = σ².
    """
    n, columns = sketch.shape[0], sketch.shape[1] - 1
    y, trace = sketch[:, :columns], jnp.sum(sketch[:, columns])
    omega = jnp.asarray(sketch_matrix(n, columns), y.dtype)
    b = omega.T @ y
    beta, v = jnp.linalg.eigh(0.5 * (b + b.T))
    floor = jnp.max(beta) * jnp.finfo(y.dtype).eps * columns * 10
    keep = beta > floor
    f = y @ (v * jnp.where(keep, jax.lax.rsqrt(jnp.where(keep, beta, 1.0)), 0.0))
    s2, w = jnp.linalg.eigh(f.T @ f)  # ascending
    s2, w = jnp.maximum(s2[::-1][:k], 0.0), w[:, ::-1][:, :k]
    u = (f @ w) * jnp.where(s2 > 0, jax.lax.rsqrt(jnp.where(s2 > 0, s2, 1.0)), 0.0)
    d = jnp.asarray(damping, y.dtype)
    tail = jnp.maximum((trace - jnp.sum(s2)) / (n - k), 0.0) + d
    tail = jnp.maximum(tail, jnp.finfo(y.dtype).tiny)  # rounding must not make it vanish
    return LowRankInverse(u, 1 / (s2 + d), 1 / tail)


def is_sketch(a: jax.Array) -> bool:
    """Whether a K-FAC input factor is kept as a sketch [Y | diag A] (not square)."""
    return a.ndim == 2 and a.shape[0] != a.shape[1]


def forward(inv: LowRankInverse, v: jax.Array) -> jax.Array:
    """M V for the damped factor M that `inv` inverts: Q_k ((Q_kᵀ V) ⊙ (μ − μ̄)) + μ̄ V."""
    v = v.astype(inv.q.dtype)
    mu, tail = 1 / inv.inverse, 1 / inv.tail_inverse
    return inv.q @ ((inv.q.T @ v) * (mu - tail)[:, None]) + tail * v


def apply(inv: LowRankInverse, v: jax.Array) -> jax.Array:
    """M⁻¹ V ≈ Q_k ((Q_kᵀ V) ⊙ (1/μ − 1/μ̄)) + V / μ̄."""
    v = v.astype(inv.q.dtype)
    return inv.q @ ((inv.q.T @ v) * (inv.inverse - inv.tail_inverse)[:, None]) + (
        inv.tail_inverse * v
    )
