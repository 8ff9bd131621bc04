r"""Diagnostics: the spectrum of a curvature operator and the KL an update really causes.

Spectrum, matrix-free, for any operator with ``.mv`` on parameter pytrees (every
`natgrad.curvature` operator, or a plain callable). Everything runs on the raveled vector
(``jax.flatten_util.ravel_pytree`` order), takes an explicit PRNG `key` and a static
`num_iterations`, and can be traced under `jax.jit` by the caller.

1. Lanczos (`lanczos`): from a random unit vector q₀, m steps build an orthonormal basis
   Q = [q₀ … q_{m−1}] of the Krylov space span{q₀, Aq₀, …, A^{m−1}q₀} and the tridiagonal
   T = QᵀAQ (diagonal α_j = q_jᵀAq_j, off-diagonal β_j = ‖w_j‖ with w_j the part of Aq_j
   orthogonal to Q). Every w_j is orthogonalised against the whole basis, twice ("twice is
   enough"), so no spurious copies of converged eigenvalues appear. A breakdown (β_j ≈ 0: the
   Krylov space is invariant) restarts from a random vector orthogonalised against Q and sets
   β_j = 0, so T splits into blocks whose eigenvalues are all eigenvalues of A.
2. Ritz values θ_i, the eigenvalues of T = SΘSᵀ, lie inside [λ_min, λ_max] and the extreme ones
   converge first; with m = n they are the spectrum. ``residuals`` r_i = |β_{m−1} S_{m−1,i}| are
   ‖Ay_i − θ_i y_i‖ for the Ritz vector y_i = Qs_i, so some eigenvalue lies within r_i of θ_i.
3. Stochastic Lanczos quadrature (`spectral_density`): for a start vector u uniform on the unit
   sphere, uᵀf(A)u = Σ_i w_i f(θ_i) + (Gauss-quadrature error, zero for polynomials of degree
   < 2m) with weights w_i = S_{0,i}², and E_u[uᵀf(A)u] = tr f(A)/n. Averaging over P probes and
   broadening every node with a Gaussian kernel of width σ estimates the spectral density
   φ(λ) = (1/n) Σ_k δ(λ − λ_k) (Lin, Saad & Yang 2016; Ghorbani, Krishnan & Xiao 2019).
4. `condition_number` and `suggest_damping` read the extreme Ritz values (below); their
   ``from_lanczos`` constructors reuse one Lanczos run for both.

KL (`output_kl`, `predicted_kl`): for outputs z = f(θ, x) that parameterise p(y|z), an update
θ → θ + d changes the output distributions by KL(p(·|z) ‖ p(·|z + Δz)) = ½ΔzᵀF_zΔz + O(‖Δz‖³),
and Δz = Jd + O(‖d‖²), so the batch mean is ½dᵀFd + O(‖d‖³) with F = (1/B)Σ J_iᵀF_{z,i}J_i the
Fisher (`natgrad.curvature.fisher`). `predicted_kl` is that quadratic; `output_kl` is the exact
KL, to check the prediction (the optimizers' ``step_kl``) against what the step did.
"""

from __future__ import annotations

import operator as _operator
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from natgrad import _random, _tree
from natgrad.losses import Loss

__all__ = [
    "LanczosResult",
    "SpectralDensity",
    "ConditionEstimate",
    "DampingSuggestion",
    "lanczos",
    "top_eigenvalues",
    "spectral_density",
    "broadened_density",
    "condition_number",
    "suggest_damping",
    "output_kl",
    "predicted_kl",
]

PyTree = Any


class LanczosResult(NamedTuple):
    alphas: jax.Array  # (m,) diagonal of T
    betas: jax.Array  # (m,) betas[j] = T[j, j+1] for j < m−1; betas[m−1] = ‖w_{m−1}‖
    ritz_values: jax.Array  # (m,) eigenvalues of T, ascending
    ritz_weights: jax.Array  # (m,) squared first components of T's eigenvectors; sum to 1
    residuals: jax.Array  # (m,) ‖A y_i − θ_i y_i‖: an eigenvalue lies within it of θ_i


class SpectralDensity(NamedTuple):
    grid: jax.Array  # (G,) eigenvalues λ at which the density is given
    density: jax.Array  # (G,) per unit λ, or per unit log10 λ if log_floor was given
    nodes: jax.Array  # (P, m) Ritz values of each probe
    weights: jax.Array  # (P, m) their quadrature weights (each row sums to 1)


def _kappa(largest, smallest, damping):
    low = smallest + damping
    return jnp.where(low > 0, (largest + damping) / jnp.where(low > 0, low, 1.0), jnp.inf)


class ConditionEstimate(NamedTuple):
    condition_number: jax.Array  # (θ_max + λ) / (θ_min + λ), inf if θ_min + λ <= 0
    largest: jax.Array  # θ_max <= λ_max
    smallest: jax.Array  # θ_min >= λ_min
    damping: jax.Array  # λ

    @classmethod
    def from_lanczos(cls, result: LanczosResult, damping=0.0) -> ConditionEstimate:
        """The estimate of `condition_number` from a Lanczos run already made."""
        _nonnegative("damping", damping)
        largest, smallest = result.ritz_values[-1], result.ritz_values[0]
        damping = jnp.asarray(damping, largest.dtype)
        return cls(_kappa(largest, smallest, damping), largest, smallest, damping)


class DampingSuggestion(NamedTuple):
    damping: jax.Array  # suggested λ
    largest: jax.Array  # θ_max
    smallest: jax.Array  # θ_min
    condition_number: jax.Array  # estimated κ(C + λI) at the suggested λ

    @classmethod
    def from_lanczos(cls, result: LanczosResult, max_condition=1e3) -> DampingSuggestion:
        """The rule of `suggest_damping` applied to a Lanczos run already made."""
        if not isinstance(max_condition, int | float) or not max_condition > 1:
            raise ValueError(f"max_condition: expected a number > 1, got {max_condition!r}")
        largest, smallest = result.ritz_values[-1], result.ritz_values[0]
        positive = jnp.maximum(smallest, 0.0)
        lam = jnp.maximum(0.0, (largest - max_condition * positive) / (max_condition - 1))
        return cls(lam, largest, smallest, _kappa(largest, smallest, lam))


# --- argument checks ------------------------------------------------------------------------


def _matvec(operator) -> Callable[[PyTree], PyTree]:
    if hasattr(operator, "mv") and callable(operator.mv):
        return operator.mv
    if callable(operator):
        return operator
    raise ValueError(
        f"operator: expected an object with .mv (e.g. natgrad.curvature.ggn(...)) or a callable, "
        f"got {type(operator).__name__}"
    )


def _flat(params_like: PyTree):
    flat, unravel = ravel_pytree(params_like)
    if flat.size == 0 or not jnp.issubdtype(flat.dtype, jnp.floating):
        raise ValueError(
            f"params_like: expected a pytree of floating-point arrays, got {flat.size} entries of "
            f"dtype {flat.dtype}"
        )
    return flat, unravel


def _count(name: str, value, low: int, high: int | None = None) -> int:
    try:
        value = _operator.index(value)
    except TypeError:
        raise ValueError(f"{name}: expected an integer, got {value!r}") from None
    if value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name}: expected an integer {bound}, got {value}")
    return value


def _check_key(key) -> jax.Array:
    if key is None:
        raise ValueError("key: expected a PRNG key (jax.random.PRNGKey or jax.random.key)")
    return key


def _nonnegative(name: str, value) -> None:
    if isinstance(value, int | float) and not value >= 0:
        raise ValueError(f"{name}: expected a number >= 0, got {value!r}")


def _positive(name: str, value) -> None:
    """Checks Python numbers; traced values (inside jit) pass."""
    if isinstance(value, int | float) and not value > 0:
        raise ValueError(f"{name}: expected a number > 0, got {value!r}")


# --- Lanczos --------------------------------------------------------------------------------


def _lanczos_flat(matvec, dim: int, dtype, key, num_iterations: int) -> LanczosResult:
    """Steps 1–2 of the module docstring on vectors of size `dim`."""
    m = num_iterations
    k_start, k_restart = _random.split(key)
    eps = jnp.finfo(dtype).eps

    def project_out(basis, w):
        for _ in range(2):  # twice is enough
            w = w - basis.T @ (basis @ w)
        return w

    def unit(w):
        norm = jnp.linalg.norm(w)
        return w / jnp.where(norm > 0, norm, 1.0), norm

    q0, _ = unit(_random.normal(k_start, (dim,), dtype))
    spare = _random.normal(k_restart, (dim,), dtype)
    basis = jnp.zeros((m + 1, dim), dtype).at[0].set(q0)

    def step(j, carry):
        basis, alphas, betas, scale = carry
        q = basis[j]
        w = matvec(q)
        alpha = jnp.vdot(q, w)
        w, beta = unit(project_out(basis, w))  # removes α_j q_j and β_{j−1} q_{j−1} too
        scale = jnp.maximum(scale, jnp.abs(alpha) + beta)
        breakdown = beta <= 10 * eps * scale * jnp.sqrt(dim)

        def restart(_):
            # a cyclic shift of one random vector: no PRNG inside the loop
            return unit(project_out(basis, jnp.roll(spare, j)))[0]

        nxt = jax.lax.cond(breakdown, restart, lambda _: w, None)
        beta = jnp.where(breakdown, 0.0, beta)
        return basis.at[j + 1].set(nxt), alphas.at[j].set(alpha), betas.at[j].set(beta), scale

    zeros = jnp.zeros(m, dtype)
    carry = (basis, zeros, zeros, jnp.zeros((), dtype))
    _, alphas, betas, _ = jax.lax.fori_loop(0, m, step, carry)
    tri = jnp.diag(alphas) + jnp.diag(betas[:-1], 1) + jnp.diag(betas[:-1], -1)
    theta, vectors = jnp.linalg.eigh(tri)
    return LanczosResult(
        alphas=alphas,
        betas=betas,
        ritz_values=theta,
        ritz_weights=jnp.square(vectors[0]),
        residuals=jnp.abs(betas[-1] * vectors[-1]),
    )


def _setup(operator, params_like, key, num_iterations):
    mv = _matvec(operator)
    flat, unravel = _flat(params_like)
    key = _check_key(key)
    m = _count("num_iterations", num_iterations, 1, flat.size)

    def matvec(v):
        return ravel_pytree(mv(unravel(v)))[0].astype(flat.dtype)

    return matvec, flat, key, m


def lanczos(operator, params_like: PyTree, *, key: jax.Array, num_iterations: int) -> LanczosResult:
    """`num_iterations` (≤ n, static) Lanczos steps with full reorthogonalisation from a random
    start drawn with `key`; the tridiagonal, Ritz values, quadrature weights and residuals."""
    matvec, flat, key, m = _setup(operator, params_like, key, num_iterations)
    return _lanczos_flat(matvec, flat.size, flat.dtype, key, m)


def top_eigenvalues(
    operator, params_like: PyTree, k: int, *, key: jax.Array, num_iterations: int
) -> jax.Array:
    """The k largest Ritz values, descending: estimates of the operator's top k eigenvalues.

    Each is ≤ the true eigenvalue of the same rank (Cauchy interlacing); with
    ``num_iterations = n`` they are exact to rounding. Isolated top eigenvalues converge in far
    fewer steps than n; a good rule is ``num_iterations ≥ 2k + 10``.
    """
    k = _count("k", k, 1)
    if isinstance(num_iterations, int) and num_iterations < k:
        raise ValueError(f"num_iterations: expected at least k = {k}, got {num_iterations}")
    result = lanczos(operator, params_like, key=key, num_iterations=num_iterations)
    return result.ritz_values[::-1][:k]


# --- spectral density -----------------------------------------------------------------------


def broadened_density(
    nodes: jax.Array,
    weights: jax.Array,
    grid: jax.Array,
    sigma,
    *,
    log_floor=None,
) -> jax.Array:
    """φ(x) = (1/P) Σ_p Σ_i w_pi N(x; x_pi, σ²), normalised so that ∫φ dx = 1 on the grid.

    With `log_floor` None, x = λ. Otherwise x = log10(max(λ, log_floor)): the density is per
    decade, and the mass of every node below the floor (null space, negative curvature) sits at
    the floor. `grid` is always given in λ (positive with `log_floor`). The trapezoid rule
    normalises, so a grid that does not cover the nodes ± 3σ gives the density of the part it
    covers.
    """
    nodes, weights, grid = jnp.asarray(nodes), jnp.asarray(weights), jnp.asarray(grid)
    if grid.ndim != 1 or grid.size < 2:
        raise ValueError(f"grid: expected a 1-D array of at least 2 points, got shape {grid.shape}")
    _positive("sigma", sigma)
    if log_floor is not None:
        _positive("log_floor", log_floor)
        nodes = jnp.log10(jnp.maximum(nodes, log_floor))
        grid = jnp.log10(grid)
    z = (grid[:, None] - nodes.reshape(-1)[None, :]) / sigma
    kernel = jnp.exp(-0.5 * z * z) / (sigma * jnp.sqrt(2 * jnp.pi))
    density = kernel @ weights.reshape(-1)
    total = jnp.trapezoid(density, grid)
    return density / jnp.where(total > 0, total, 1.0)


def spectral_density(
    operator,
    params_like: PyTree,
    *,
    key: jax.Array,
    num_probes: int,
    num_iterations: int,
    grid: int | jax.Array = 256,
    sigma=None,
    log_floor=None,
) -> SpectralDensity:
    """Stochastic Lanczos quadrature (step 3): `num_probes` Lanczos runs from Gaussian starts.

    `grid`: a number of points spanning the nodes ± 3σ (geometric if `log_floor`), or the λ
    values themselves. `sigma`: the kernel width in x (λ, or decades with
    `log_floor`); default 1/50 of the nodes' span in x. The mean Σ_i w_pi θ_pi of each probe is
    an unbiased estimate of tr(A)/n with variance 2/(n+2)·(mean λ² − (mean λ)²).
    """
    matvec, flat, key, m = _setup(operator, params_like, key, num_iterations)
    num_probes = _count("num_probes", num_probes, 1)
    if sigma is not None:
        _positive("sigma", sigma)
    if log_floor is not None:
        _positive("log_floor", log_floor)
    results = jax.lax.map(
        lambda k: _lanczos_flat(matvec, flat.size, flat.dtype, k, m),
        _random.split(key, num_probes),
    )
    nodes, weights = results.ritz_values, results.ritz_weights
    x = nodes if log_floor is None else jnp.log10(jnp.maximum(nodes, log_floor))
    span = jnp.max(x) - jnp.min(x)
    if sigma is None:
        sigma = jnp.where(span > 0, span / 50, 1.0)
    if isinstance(grid, int):
        points = _count("grid", grid, 2)
        lo, hi = jnp.min(x) - 3 * sigma, jnp.max(x) + 3 * sigma
        grid = jnp.linspace(lo, hi, points) if log_floor is None else jnp.logspace(lo, hi, points)
    density = broadened_density(nodes, weights, grid, sigma, log_floor=log_floor)
    return SpectralDensity(jnp.asarray(grid), density, nodes, weights)


# --- conditioning and damping ---------------------------------------------------------------


def condition_number(
    operator, params_like: PyTree, *, key: jax.Array, num_iterations: int, damping=0.0
) -> ConditionEstimate:
    """κ(C + λI) ≈ (θ_max + λ) / (θ_min + λ) from the extreme Ritz values, λ = `damping`.

    What is estimated: the condition number of the damped system CG solves. The Ritz values lie
    inside the spectrum (θ_max ≤ λ_max, θ_min ≥ λ_min), so this is a lower bound on the true κ
    that tightens as `num_iterations` grows. θ_max converges in a few dozen steps; θ_min only
    when the bottom of the spectrum is resolved, which for a GGN/Fisher with a null space (n
    parameters ≫ batch × outputs) means θ_min ≈ 0 and κ ≈ θ_max/λ: then the damping floor, not
    the curvature, sets κ. The value is inf when θ_min + λ ≤ 0 (singular or indefinite).
    """
    _nonnegative("damping", damping)
    res = lanczos(operator, params_like, key=key, num_iterations=num_iterations)
    return ConditionEstimate.from_lanczos(res, damping)


def suggest_damping(
    operator,
    params_like: PyTree,
    *,
    key: jax.Array,
    num_iterations: int,
    max_condition: float = 1e3,
) -> DampingSuggestion:
    """The smallest λ ≥ 0 with estimated κ(C + λI) ≤ `max_condition`.

    Rule: (θ_max + λ)/(θ₊ + λ) ≤ κ with θ₊ = max(θ_min, 0) gives
    λ = max(0, (θ_max − κθ₊)/(κ − 1)); for a PSD curvature with a null space (θ₊ ≈ 0) this is
    λ ≈ θ_max/(κ − 1), a fraction of the top eigenvalue. Why: CG on C + λI needs about
    √κ·log(1/tol) steps, so κ is the CG budget made explicit, and directions of curvature below λ
    are damped instead of amplified by 1/λ_k. Since θ_max ≤ λ_max the true κ can be a little
    larger; since a negative θ_min is clipped, an indefinite operator (the Hessian) may need more.
    """
    if not isinstance(max_condition, int | float) or not max_condition > 1:
        raise ValueError(f"max_condition: expected a number > 1, got {max_condition!r}")
    res = lanczos(operator, params_like, key=key, num_iterations=num_iterations)
    return DampingSuggestion.from_lanczos(res, max_condition)


# --- KL of an update ------------------------------------------------------------------------


def output_kl(
    apply_fn: Callable, loss: Loss, params: PyTree, new_params: PyTree, inputs: Any
) -> jax.Array:
    """(1/B) Σ_i KL(p(·|f(θ, x_i)) ‖ p(·|f(θ', x_i))): the exact output KL of θ → θ' = `new_params`.

    Per family (``loss.kl``): categorical Σ_c p_c log(p_c/q_c) (softmax), Bernoulli per unit
    (sigmoid), ½‖z' − z‖² (unit-variance Gaussian, squared error).
    """
    if not isinstance(loss, Loss):
        raise ValueError(
            f"loss: expected a natgrad.losses loss such as softmax_cross_entropy(), "
            f"got {type(loss).__name__}"
        )
    if jax.tree.structure(params) != jax.tree.structure(new_params):
        raise ValueError(
            "new_params: expected the same pytree structure as params, got "
            f"{jax.tree.structure(new_params)} vs {jax.tree.structure(params)}"
        )
    before, after = apply_fn(params, inputs), apply_fn(new_params, inputs)
    if jnp.shape(before) != jnp.shape(after) or jnp.ndim(before) < 1:
        raise ValueError(
            f"apply_fn: expected batch-first outputs of the same shape before and after, got "
            f"{jnp.shape(before)} and {jnp.shape(after)}"
        )
    return jnp.mean(loss.kl(before, after))


def predicted_kl(operator_fisher, d: PyTree) -> jax.Array:
    """½ dᵀFd: the second-order prediction of `output_kl` for the step d (F the Fisher)."""
    mv = _matvec(operator_fisher)
    params = getattr(operator_fisher, "params", None)
    if params is not None and jax.tree.structure(params) != jax.tree.structure(d):
        raise ValueError(
            f"d: expected a pytree shaped like the operator's params "
            f"({jax.tree.structure(params)}), got {jax.tree.structure(d)}"
        )
    return 0.5 * _tree.vdot(d, mv(d))
