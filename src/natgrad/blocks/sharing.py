r"""Kronecker factors' sums from a layer's positions, with K-FAC *expand* or *reduce*.

A weight-shared linear layer acts at S positions per example: y_bs = W̄ᵀ ā_bs. Its gradient for
example b is Σ_s ā_bs g_bsᵀ, g_bs = ∂ℓ_b/∂y_bs, so its GGN/Fisher block couples positions:

    F = (1/B) Σ_b Σ_{s,s'} (ā_bs ā_bs'ᵀ) ⊗ (g_bs g_bs'ᵀ).

Eschenhagen et al. (NeurIPS 2023, "Kronecker-Factored Approximate Curvature for Modern Neural
Network Architectures") give two Kronecker approximations, each exact for a deep linear network
(squared error) in its own setting:

* **expand** — every position is an example of its own (cross terms s ≠ s' dropped):

      A = (1/(B S)) Σ_{b,s} ā_bs ā_bsᵀ,    G = (1/B) Σ_{b,s} g_bs g_bsᵀ.

  Exact when the loss is a sum over positions, each output position depending on its own
  input position only (per-token language modelling, per-pixel losses): then the cross terms
  vanish. For a convolution this is KFC (Grosse & Martens 2016): their Ω = E[Σ_t ā_t ā_tᵀ] and
  Γ = (1/|T|) E[Σ_t g_t g_tᵀ] put the spatial size |T| in the other factor, A ⊗ G = Ω ⊗ Γ, and
  the factored damping (π) is invariant to that move.
* **reduce** — positions are pooled before the factors:

      â_b = (1/S) Σ_s ā_bs,   ĝ_b = Σ_s g_bs,   A = (1/B) Σ_b â_b â_bᵀ,   G = (1/B) Σ_b ĝ_b ĝ_bᵀ.

  Exact when the positions are pooled (averaged or summed) before the loss, so that
  ∂ℓ/∂y_bs is the same for every s: then Σ_s ā_bs g_bsᵀ = S â_b g_bᵀ = â_b ĝ_bᵀ. Cheaper: B
  rows instead of B·S.

With S = 1 (a dense layer on vectors) both are classic K-FAC. The functions here return the
*sums* (Σ ā āᵀ, Σ g gᵀ) of one layer call; K-FAC normalises by the count of rows of A
(the homogeneous corner Σ 1·1) and by the batch size, after summing over calls and devices.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["MODES", "check", "factor_sums"]

MODES = ("expand", "reduce")


def check(weight_sharing) -> str:
    if weight_sharing not in MODES:
        raise ValueError(f"weight_sharing: expected one of {MODES}, got {weight_sharing!r}")
    return weight_sharing


def factor_sums(
    a: jax.Array, g: jax.Array, weight_sharing: str, dtype, omega=None, omega_g=None
) -> tuple:
    """(Σ ā āᵀ, Σ g gᵀ) of positions a (B, S, m) and g (B, S, n), as in the module docstring;
    with a test matrix `omega` ((m+1) × ℓ) A's sum as its sketch instead: [Σ ā (āᵀΩ) | Σ ā²],
    (m+1) × (ℓ+1), 2(m+1)ℓ flops a row where Σ ā āᵀ costs (m+1)² (`natgrad.low_rank`); with
    `omega_g` (n × ℓ) G's likewise, [Σ g (gᵀΩ) | Σ g²]."""
    a, g = a.astype(dtype), g.astype(dtype)
    if weight_sharing == "reduce":
        a, g = jnp.mean(a, axis=1), jnp.sum(g, axis=1)
    else:
        a, g = a.reshape(-1, a.shape[-1]), g.reshape(-1, g.shape[-1])
    a = jnp.concatenate([a, jnp.ones((a.shape[0], 1), dtype)], axis=1)
    return _sum(a, omega, dtype), _sum(g, omega_g, dtype)


def _sum(x: jax.Array, omega, dtype) -> jax.Array:
    """Σ x xᵀ over the rows x of `x`, or its sketch [Σ x (xᵀΩ) | Σ x²] with a test matrix."""
    if omega is None:
        return x.T @ x
    sketch = x.T @ (x @ omega.astype(dtype))
    return jnp.concatenate([sketch, jnp.sum(x * x, axis=0)[:, None]], axis=1)
