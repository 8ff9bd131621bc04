r"""Eigenvalue-corrected K-FAC (EKFAC; George, Laurent, Bouthillier, Ballas & Vincent, 2018).

K-FAC approximates a layer's Fisher block F by A ⊗ G. With the eigendecompositions
A = Q_A Λ_A Q_Aᵀ and G = Q_G Λ_G Q_Gᵀ, that is

    A ⊗ G = (Q_A ⊗ Q_G) diag(λ_A ⊗ λ_G) (Q_A ⊗ Q_G)ᵀ:

a diagonal matrix in the Kronecker eigenbasis, whose diagonal λ_A ⊗ λ_G is only right when the
Kronecker factorisation is. EKFAC keeps the basis and re-estimates the diagonal. In a fixed
orthonormal basis Q, the diagonal s minimising ‖F − Q diag(s) Qᵀ‖_F is diag(Qᵀ F Q); with
F = (1/B) Σ_b vec(∇W̄_b) vec(∇W̄_b)ᵀ, the per-example gradients ∇W̄_b (m+1, n), that is

    s_jk = (1/B) Σ_b ((Q_Aᵀ ∇W̄_b Q_G)_jk)²,

the per-example gradients projected into the eigenbasis and squared — per example, not the
square of the batch mean. Since A ⊗ G is itself diagonal in that basis, EKFAC is at least as
close to F as K-FAC in Frobenius norm (the paper's Theorem; tested against a dense oracle).

The steps, one function each:

1. `basis`: Q_A, Q_G from `eigh` of the averaged factors, at every inverse refresh.
2. `scaling_sums`: Σ_b (Q_Aᵀ ∇W̄_b Q_G)² on a statistics step, from the layer's positions
   (a (B, S, m), g (B, S, n); ∇W̄_b = Σ_s ā_bs g_bsᵀ). With S = 1 the projected gradient is an
   outer product, and its square the outer product of squares: Σ_b (Q_Aᵀ ā_b)² (Q_Gᵀ g_b)²ᵀ,
   one matmul, no B × (m+1) × n array. With S > 1 (a weight-shared layer, a convolution) the
   example's gradient sums its positions *before* squaring: the true per-example gradient,
   whatever K-FAC's expand / reduce choice made of the basis. The sums are kept as a moving
   average s̄ (statistics steps), in the basis of the last refresh.
3. `rotate`: at a refresh the basis changes; s̄ moves to the new basis as the diagonal of the
   old approximation there, diag(Rᵀ diag(s̄) R) with R = Q_oldᵀ Q_new per factor:
   s̄ ← (R_A ∘ R_A)ᵀ s̄ (R_G ∘ R_G). At the first refresh (no basis before) s̄ starts as K-FAC's
   own eigenvalues λ_A ⊗ λ_G: EKFAC starts from K-FAC and corrects it.
4. `apply_inverse`: (EKFAC + λI)⁻¹ vec(V) = Q_A [(Q_Aᵀ V Q_G) / (s̄ + λ)] Q_Gᵀ.

Damping: EKFAC adds λ to every eigenvalue, s̄ + λ, i.e. exactly Tikhonov damping EKFAC + λI;
K-FAC's factored damping (A + π√λ I) ⊗ (G + √λ/π I) has no counterpart here (nothing to factor),
so the same λ damps EKFAC a little less than K-FAC (whose product adds the cross terms
π√λ λ_G + √λ/π λ_A as well). λ enters only when the inverse is applied: a change of λ needs no
new basis.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

__all__ = [
    "Eigenbasis",
    "init",
    "refresh",
    "basis",
    "scaling_sums",
    "squared_sums",
    "rotate",
    "apply_inverse",
    "damped_product",
]


class Eigenbasis(NamedTuple):
    """Q_A and Q_G per layer of K-FAC's slots (empty (0, 0) where a layer has none), and
    whether a refresh has computed them yet."""

    q_a: tuple[jax.Array, ...]
    q_g: tuple[jax.Array, ...]
    ready: jax.Array


def init(sizes, dtypes) -> Eigenbasis:
    """Identity bases of sizes (m[+1], n) per layer ((0, 0) for none), not ready."""
    q_a = tuple(jnp.eye(k, dtype=dt) for (k, _), dt in zip(sizes, dtypes, strict=True))
    q_g = tuple(jnp.eye(n, dtype=dt) for (_, n), dt in zip(sizes, dtypes, strict=True))
    return Eigenbasis(q_a, q_g, jnp.zeros((), bool))


def refresh(old: Eigenbasis, a, g, s, use) -> tuple[Eigenbasis, tuple[jax.Array, ...]]:
    """The eigenbasis of the averaged factors A, G of each layer in `use`, and its scalings
    carried into it (`rotate`; K-FAC's eigenvalues λ_A λ_Gᵀ at the first refresh)."""
    q_a, q_g, scalings = [], [], []
    for qa_old, qg_old, a_l, g_l, s_l, used in zip(old.q_a, old.q_g, a, g, s, use, strict=True):
        if not used:
            q_a.append(qa_old)
            q_g.append(qg_old)
            scalings.append(s_l)
            continue
        (la, qa), (lg, qg) = basis(a_l), basis(g_l)
        carried = rotate(s_l, qa_old, qa, qg_old, qg)
        scalings.append(jnp.where(old.ready, carried, jnp.outer(la, lg)).astype(s_l.dtype))
        q_a.append(qa)
        q_g.append(qg)
    return Eigenbasis(tuple(q_a), tuple(q_g), jnp.ones((), bool)), tuple(scalings)


def basis(factor: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(eigenvalues, Q) of a symmetric PSD factor, eigenvalues clipped at 0 (round-off)."""
    values, q = jnp.linalg.eigh(0.5 * (factor + factor.T))
    return jnp.maximum(values, 0), q


def scaling_sums(
    a: jax.Array, g: jax.Array, q_a: jax.Array, q_g: jax.Array, has_bias: bool
) -> jax.Array:
    """Σ_b (Q_Aᵀ ∇W̄_b Q_G)², ∇W̄_b = Σ_s ā_bs g_bsᵀ, for positions a (B, S, m), g (B, S, n).

    ā = [a, 1] when the layer has a bias (then Q_A is (m+1) × (m+1)), else a.
    """
    dtype = q_a.dtype
    a, g = a.astype(dtype), g.astype(dtype)
    if has_bias:
        a = jnp.concatenate([a, jnp.ones((*a.shape[:-1], 1), dtype)], axis=-1)
    return squared_sums(a @ q_a, g @ q_g)  # projected positions, (B, S, m+1) and (B, S, n)


def squared_sums(a: jax.Array, g: jax.Array) -> jax.Array:
    """Σ_b (Σ_s a_bs g_bsᵀ)² for positions a (B, S, m) and g (B, S, n): each example's gradient
    Σ_s a_bs g_bsᵀ squared, summed over the examples; with one position (a²)ᵀ(g²), one matmul.
    `scaling_sums` takes it in the eigenbasis, Martens' diagonal (`natgrad.per_example`) in the
    parameters' own."""
    if a.shape[1] == 1:
        return jnp.square(a[:, 0]).T @ jnp.square(g[:, 0])
    return jnp.sum(jnp.square(jnp.einsum("bsj,bsk->bjk", a, g)), axis=0)


def rotate(
    s: jax.Array, q_a_old: jax.Array, q_a_new: jax.Array, q_g_old: jax.Array, q_g_new: jax.Array
) -> jax.Array:
    """The diagonal of Q_old diag(s) Q_oldᵀ in the new basis: (R_A ∘ R_A)ᵀ s (R_G ∘ R_G) with
    R = Q_oldᵀ Q_new per factor."""
    r_a, r_g = q_a_old.T @ q_a_new, q_g_old.T @ q_g_new
    return jnp.square(r_a).T @ s @ jnp.square(r_g)


def apply_inverse(v: jax.Array, q_a: jax.Array, q_g: jax.Array, s: jax.Array, damping):
    """Q_A [(Q_Aᵀ V Q_G) / (s + λ)] Q_Gᵀ for V of shape (m+1, n) (or (m, n) without bias)."""
    lam = jnp.asarray(damping, s.dtype)
    return q_a @ ((q_a.T @ v.astype(s.dtype) @ q_g) / (s + lam)) @ q_g.T


def damped_product(v: jax.Array, q_a: jax.Array, q_g: jax.Array, s: jax.Array, damping):
    """Q_A [(Q_Aᵀ V Q_G) ⊙ (s + λ)] Q_Gᵀ: (EKFAC + λI) vec(V)."""
    lam = jnp.asarray(damping, s.dtype)
    return q_a @ ((q_a.T @ v.astype(s.dtype) @ q_g) * (s + lam)) @ q_g.T
