r"""Directions: how an optimiser turns the gradient g into d ≈ (C + λI)⁻¹ g.

Each direction is a `Direction(name, uses_operator, compute)`; `compute(inputs)` gets the
gradient, the curvature operator C of the batch (or None), λ, the preconditioner's damped
approximation M ≈ C + λI (or None), the warm start x₀ and a trial loss, and returns a
`DirectionResult`: d, the curvature Q of the quadratic model q(p) = gᵀp + ½ pᵀQp that the step
rule and ρ use, and solver statistics.

* `cg_solve`: d solves (C + λI) d = g by preconditioned CG (M⁻¹ applied to residuals),
  warm-started from x₀; Q = C. CG's residual r = g − (C + λI) d gives Cd = g − r − λd for free.
* `cg_backtracking` (Hessian-free, Martens 2010 §4.6): CG as above, saving the iterates at
  i = ⌈5·1.3ʲ⌉; starting from the last, step back to the previous iterate while its loss
  f(θ − d) is lower. d is the iterate kept; the warm start stays CG's last solution. CG's φ
  at d gives dᵀQd = 2(φ(d) + gᵀd) − λdᵀd with no product.
* `dense_solve`: d = (C + λI)⁻¹ g exactly, C = RᵀR formed from the Jacobian (`natgrad.dense`),
  Cholesky in the primal (n×n) or Woodbury (rows×rows) form, whichever is smaller; Q = C. For
  small models (PINNs: Müller & Zeinhofer 2023's energy natural gradient), where CG on an
  ill-conditioned Gramian is inexact.
* `factored`: d = M⁻¹ g with M the preconditioner's approximation itself (K-FAC's Kronecker
  blocks); Q = M, which already includes the damping, and Md = g costs nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from natgrad import _tree, dense, operators, solvers
from natgrad.optimizers import _checks

PyTree = Any
SOLVERS = ("cg", "dense")


class DirectionInputs(NamedTuple):
    grads: PyTree
    op: operators.Operator | None  # C on this batch, or None when the direction needs none
    damping: jax.Array
    approx: operators.Operator | None  # the preconditioner's M ≈ C + λI, or None
    x0: PyTree | None  # warm start (None: from zeros)
    trial: Callable[[PyTree, jax.Array], jax.Array]  # (d, α) ↦ f(θ − α d)
    problem: Any = None  # (curvature, apply_fn, loss, params, batch, key) for dense solves


class DirectionResult(NamedTuple):
    d: PyTree
    model: operators.Operator  # Q of the quadratic model
    finite: jax.Array
    damped_model: bool = False  # Q already includes λ
    qd: PyTree | None = None  # Q d when it came for free
    dqd: jax.Array | None = None  # dᵀQd when it came for free (and Q d did not)
    keep: PyTree | None = None  # what the next step warm-starts from (None: d)
    iterations: jax.Array = 0
    status: jax.Array = 0  # natgrad.solvers.STATUS_NAMES index
    kept_iteration: jax.Array | None = None  # the CG iteration whose iterate d is (None: last)
    f_unit: jax.Array | None = None  # f(θ − d) when it was evaluated


class Direction(NamedTuple):
    name: str
    uses_operator: bool
    compute: Callable[[DirectionInputs], DirectionResult]


def _cg_options(inputs: DirectionInputs, **options) -> dict:
    """`natgrad.solvers.cg`'s keyword arguments for these inputs."""
    approx = inputs.approx
    return dict(
        x0=inputs.x0, preconditioner=None if approx is None else approx.inverse(), **options
    )


def _finite(res: solvers.CGResult) -> jax.Array:
    return _tree.all_finite(res.x) & (res.status != solvers.NONFINITE)


def _stats(res: solvers.CGResult) -> dict:
    return {"iterations": res.iterations, "status": res.status}


def cg_solve(*, maxiter: int, tol: float, martens_stop: bool) -> Direction:
    """d = (C + λI)⁻¹ g by preconditioned CG; Q = C."""

    def compute(inputs: DirectionInputs) -> DirectionResult:
        res = solvers.cg(
            operators.damped(inputs.op, inputs.damping),
            inputs.grads,
            **_cg_options(inputs, maxiter=maxiter, tol=tol, martens_stop=martens_stop),
        )
        d = res.x
        cd = _tree.sub(_tree.sub(inputs.grads, res.residual), _tree.scale(inputs.damping, d))
        return DirectionResult(d, inputs.op, _finite(res), qd=cd, **_stats(res))

    return Direction("cg", True, compute)


def cg_backtracking(*, maxiter: int, tol: float, martens_stop: bool) -> Direction:
    """CG with saved iterates and Martens' backtracking over them; Q = C."""

    def compute(inputs: DirectionInputs) -> DirectionResult:
        lam = inputs.damping
        one = jnp.asarray(1.0, lam.dtype)
        res, d, kept, f_d, phi = solvers.cg_backtrack(
            operators.damped(inputs.op, lam),
            inputs.grads,
            lambda v: inputs.trial(v, one),
            **_cg_options(inputs, maxiter=maxiter, tol=tol, martens_stop=martens_stop),
        )
        # φ(d) = ½dᵀ(C + λI)d − gᵀd, CG's (from its recursive residual, as cg_solve's Q d).
        dad = 2.0 * (phi + _tree.vdot(inputs.grads, d)).astype(lam.dtype)
        return DirectionResult(
            d,
            inputs.op,
            _finite(res),
            dqd=dad - lam * _tree.vdot(d, d).astype(lam.dtype),
            keep=res.x,
            kept_iteration=kept,
            f_unit=f_d,
            **_stats(res),
        )

    return Direction("cg_backtracking", True, compute)


def from_solver(solver: str, *, maxiter, tol, martens_stop, backtracking: bool) -> Direction:
    """The direction a factory's `solver=` names: ``"dense"`` or ``"cg"`` (with Martens'
    backtracking when `backtracking`), its options checked."""
    if solver not in SOLVERS:
        raise ValueError(f"solver: expected one of {SOLVERS}, got {solver!r}")
    if solver == "dense":
        return dense_solve()
    make = cg_backtracking if backtracking else cg_solve
    return make(
        maxiter=_checks.integer("maxiter", maxiter),
        tol=_checks.number("tol", tol, allow_low=True),
        martens_stop=bool(martens_stop),
    )


def dense_solve(*, method: str = "auto") -> Direction:
    """d = (C + λI)⁻¹ g by a dense Cholesky solve (primal or Woodbury by size); Q = C."""

    def compute(inputs: DirectionInputs) -> DirectionResult:
        curvature, apply_fn, loss, params, batch, key = inputs.problem
        d, cd = dense.dense_direction(
            curvature.name,
            apply_fn,
            loss,
            params,
            batch,
            inputs.grads,
            inputs.damping,
            key=key,
            method=method,
            num_samples=curvature.num_samples,
        )
        return DirectionResult(d, inputs.op, _tree.all_finite(d), qd=cd)

    return Direction("dense", True, compute)


def factored() -> Direction:
    """d = M⁻¹ g with M the preconditioner's damped approximation (K-FAC); Q = M."""

    def compute(inputs: DirectionInputs) -> DirectionResult:
        if inputs.approx is None:
            raise ValueError("preconditioner: a factored direction needs a preconditioner")
        d = inputs.approx.inverse()(inputs.grads)
        finite = _tree.all_finite(d)
        return DirectionResult(d, inputs.approx, finite, damped_model=True, qd=inputs.grads)

    return Direction("factored", False, compute)
