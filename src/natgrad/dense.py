r"""Exact damped curvature solves for small models: dense primal and Woodbury forms.

For a batch of B examples with outputs z_i = f(θ, x_i) ∈ ℝᴷ, Jacobians J_i = ∂z_i/∂θ (K×n,
columns in ``ravel_pytree`` order) and the mean loss L = (1/B) Σ_i ℓ(z_i, y_i), every
Gauss-Newton-type curvature is a sum of outer products,

    C = (1/B) Σ_i J_iᵀ M_i J_i,   M_i = Σ_k q_ik q_ikᵀ   ⇒   C = RᵀR,

with one row of the factor R per (k, i): R[(k, i)] = q_ikᵀ J_i / √B.

=====================  =====================================================  =========
curvature              q_ik                                                   rows
=====================  =====================================================  =========
``ggn``, ``fisher``    ``loss.curvature_sqrt(z)[k, i]`` (Σ_k q q ᵀ = H_z)      K·B
``fisher_mc``          s̃_ik / √S: scores of S targets sampled from the model   S·B
``empirical_fisher``   s_i = ∇_z ℓ(z_i, y_i) (the per-example gradient row)     B
=====================  =====================================================  =========

(For the losses in ``natgrad.losses`` H_z does not depend on the targets, so the GGN and the
exact Fisher coincide.) With R (m×n, m = rows) the damped system (C + λI) x = g is solved by
Cholesky in whichever space is smaller:

* primal (n×n):   x = (RᵀR + λI)⁻¹ g;
* Woodbury (m×m): (RᵀR + λI)⁻¹ = (I − Rᵀ(RRᵀ + λI)⁻¹R)/λ, so
  x = (g − Rᵀ y)/λ with y = (RRᵀ + λI)⁻¹ R g.

The Woodbury form divides by λ: g − Rᵀy = λx is O(λ‖x‖), computed as the difference of two
O(‖g‖) vectors. ``damped_solve`` applies `refine` steps of iterative refinement,
x ← x + (C + λI)⁻¹(g − (RᵀRx + λx)) with the same factorisation, which brings it to the accuracy
of the primal form and of the float64 oracle ``solve(RᵀR + λI, g)``. For λ → 0 no form does
better than ~ε‖g‖/λ in the null space of R: the rounding of a computed Gauss-Newton gradient
g = Jᵀr/B (exactly in the row space of R) leaves a null-space part of size ~ε‖g‖, which any
solve divides by λ. That part does not change the outputs to first order; the primal form has,
in addition, the condition number (σ²_max + λ)/λ of RᵀR + λI in its Cholesky factor, which is
why "auto" prefers Woodbury when rows < n (``tests/test_dense.py`` checks both at λ = 1e-10).

The Hessian is indefinite and not a product RᵀR: ``hessian_matrix`` builds ∇²L by
``jax.hessian`` of the raveled mean loss and ``dense_direction`` solves (H + λI) x = g by LU
with partial pivoting (``jnp.linalg.solve``). That is the exact Newton step; where H + λI is
not positive definite it need not be a descent direction (the step rule and the guard decide),
and where it is singular the result is non-finite.

Cost: forming R takes B per-example Jacobians (one reverse pass per output row, vmapped over
the batch); primal O(mn² + n³), Woodbury O(m²n + m³). For m, n up to a few thousand in float64
this is seconds on a CPU. The choice is static (from shapes), so everything is jit-able.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl
from jax.flatten_util import ravel_pytree

from natgrad.losses import Loss

__all__ = [
    "FACTOR_CURVATURES",
    "METHODS",
    "curvature_factor",
    "damped_solve",
    "dense_direction",
    "hessian_matrix",
    "jacobian",
    "pick_method",
]

PyTree = Any
FACTOR_CURVATURES = ("ggn", "fisher", "fisher_mc", "empirical_fisher")
METHODS = ("auto", "primal", "woodbury")


def _split_batch(batch) -> tuple[Any, Any]:
    if not isinstance(batch, tuple | list) or len(batch) != 2:
        raise ValueError(f"batch: expected a pair (inputs, targets), got {type(batch).__name__}")
    return batch[0], batch[1]


def jacobian(apply_fn: Callable, params: PyTree, inputs: Any) -> tuple[jax.Array, jax.Array]:
    """Outputs z (B, ...) and per-example Jacobians J of shape (B, *z.shape[1:], n).

    Each example's Jacobian is taken alone (`apply_fn` on a batch of one, vmapped over the batch),
    reverse mode when the example has fewer outputs than there are parameters, else forward.
    This assumes the examples do not interact in `apply_fn` (no batch statistics).
    """
    flat, unravel = ravel_pytree(params)

    def one(p_flat, x):
        single = jax.tree.map(lambda a: a[None], x)
        return apply_fn(unravel(p_flat), single)[0]

    out_shape = jax.eval_shape(one, flat, jax.tree.map(lambda a: a[0], inputs)).shape
    out_size = 1
    for s in out_shape:
        out_size *= s
    jac = jax.jacrev(one) if out_size < flat.size else jax.jacfwd(one)
    outputs = apply_fn(params, inputs)
    return outputs, jax.vmap(jac, in_axes=(None, 0))(flat, inputs)


def curvature_factor(
    curvature: str,
    apply_fn: Callable,
    loss: Loss,
    params: PyTree,
    batch: tuple[Any, Any],
    *,
    key: jax.Array | None = None,
    num_samples: int = 1,
) -> jax.Array:
    """R (rows × n) with C = RᵀR for a Gauss-Newton-type `curvature` (see the module table).

    `n` is the number of parameters in ``ravel_pytree(params)`` order; the 1/B of the mean loss
    is inside R. ``"fisher_mc"`` needs `key` (and uses `num_samples` targets per example).
    """
    if curvature not in FACTOR_CURVATURES:
        raise ValueError(
            f"curvature: expected one of {FACTOR_CURVATURES} for a factor RᵀR, got {curvature!r}"
        )
    inputs, targets = _split_batch(batch)
    outputs, jac = jacobian(apply_fn, params, inputs)
    loss.validate(outputs, targets)
    batch_size, n = outputs.shape[0], jac.shape[-1]
    jac = jac.reshape(batch_size, -1, n)  # (B, K, n)
    if curvature in ("ggn", "fisher"):
        q = loss.curvature_sqrt(outputs).reshape(-1, batch_size, jac.shape[1])  # (S, B, K)
    elif curvature == "empirical_fisher":
        q = loss.score(outputs, targets).reshape(1, batch_size, -1)
    else:
        if key is None:
            raise ValueError("key: fisher_mc samples targets from the model and needs a PRNG key")
        if int(num_samples) < 1:
            raise ValueError(f"num_samples: expected an integer >= 1, got {num_samples}")
        keys = jax.random.split(key, int(num_samples))
        scores = jax.vmap(lambda k: loss.score(outputs, loss.sample(k, outputs)))(keys)
        q = scores.reshape(int(num_samples), batch_size, -1) / jnp.sqrt(int(num_samples))
    rows = jnp.einsum("sbk,bkn->sbn", q, jac) / jnp.sqrt(batch_size)
    return rows.reshape(-1, n)


def pick_method(rows: int, n: int, method: str = "auto") -> str:
    """ "primal" or "woodbury": `method` itself, or for "auto" the one with the smaller system."""
    if method not in METHODS:
        raise ValueError(f"method: expected one of {METHODS}, got {method!r}")
    if method == "auto":
        return "woodbury" if rows < n else "primal"
    return method


def damped_solve(
    R: jax.Array,
    g_flat: jax.Array,
    damping,
    *,
    method: str = "auto",
    refine: int = 1,
) -> jax.Array:
    """x = (RᵀR + λI)⁻¹ g by Cholesky, in the primal (n×n) or Woodbury (rows×rows) form.

    See the module docstring for the two forms; `refine` steps of iterative refinement
    (x ← x + solve(g − (RᵀRx + λx))) reuse the factorisation and keep the Woodbury form
    accurate for tiny λ. `damping` (λ > 0) may be a traced scalar; `method` is static.
    """
    if R.ndim != 2 or g_flat.ndim != 1 or R.shape[1] != g_flat.shape[0]:
        raise ValueError(
            f"R, g_flat: expected R of shape (rows, n) and g_flat of shape (n,), got "
            f"{R.shape} and {g_flat.shape}"
        )
    if int(refine) < 0:
        raise ValueError(f"refine: expected an integer >= 0, got {refine}")
    chosen = pick_method(R.shape[0], R.shape[1], method)
    lam = jnp.asarray(damping, dtype=R.dtype)
    if chosen == "primal":
        gram = R.T @ R
        factor = jsl.cho_factor(gram + lam * jnp.eye(gram.shape[0], dtype=R.dtype))

        def solve(b):
            return jsl.cho_solve(factor, b)

    else:
        gram = R @ R.T
        factor = jsl.cho_factor(gram + lam * jnp.eye(gram.shape[0], dtype=R.dtype))

        def solve(b):
            return (b - R.T @ jsl.cho_solve(factor, R @ b)) / lam

    x = solve(g_flat)
    for _ in range(int(refine)):
        x = x + solve(g_flat - (R.T @ (R @ x) + lam * x))
    return x


def hessian_matrix(apply_fn: Callable, loss: Loss, params: PyTree, batch) -> jax.Array:
    """∇²L(θ) (n×n, ``ravel_pytree`` order) of the mean loss, by ``jax.hessian``."""
    inputs, targets = _split_batch(batch)
    flat, unravel = ravel_pytree(params)
    return jax.hessian(lambda p: loss.mean(apply_fn(unravel(p), inputs), targets))(flat)


def dense_direction(
    curvature: str,
    apply_fn: Callable,
    loss: Loss,
    params: PyTree,
    batch: tuple[Any, Any],
    grads: PyTree,
    damping,
    *,
    key: jax.Array | None = None,
    method: str = "auto",
    num_samples: int = 1,
    refine: int = 1,
) -> tuple[PyTree, PyTree]:
    """d = (C + λI)⁻¹ g and C·d, both shaped like `params`, solved exactly (dense).

    `curvature` is one of ``FACTOR_CURVATURES`` (C = RᵀR, solved by ``damped_solve`` with
    `method`) or ``"hessian"`` (C = ∇²L, solved by LU; `method` is ignored). C·d is what a step
    rule needs for the quadratic model gᵀd − ½dᵀCd and for ρ.
    """
    g_flat, unravel = ravel_pytree(grads)
    p_flat, _ = ravel_pytree(params)
    if g_flat.shape != p_flat.shape:
        raise ValueError(
            f"grads: expected a pytree shaped like params ({p_flat.size} numbers), got "
            f"{g_flat.size}"
        )
    g_flat = g_flat.astype(p_flat.dtype)
    if curvature == "hessian":
        h = hessian_matrix(apply_fn, loss, params, batch)
        lam = jnp.asarray(damping, dtype=h.dtype)
        d = jnp.linalg.solve(h + lam * jnp.eye(h.shape[0], dtype=h.dtype), g_flat)
        return unravel(d), unravel(h @ d)
    if curvature not in FACTOR_CURVATURES:
        raise ValueError(
            f"curvature: expected one of {FACTOR_CURVATURES + ('hessian',)}, got {curvature!r}"
        )
    R = curvature_factor(curvature, apply_fn, loss, params, batch, key=key, num_samples=num_samples)
    d = damped_solve(R, g_flat, damping, method=method, refine=refine)
    return unravel(d), unravel(R.T @ (R @ d))
