r"""Martens' Hessian-free optimisation as an optax transformation.

Martens (2010), "Deep learning via Hessian-free optimization" (ICML), and Martens & Sutskever
(2012), "Training deep and recurrent networks with Hessian-free optimization". One step:

1. Curvature: the Gauss-Newton matrix G of the mean loss on the batch (§4.2 of Martens 2010:
   positive semi-definite, unlike the Hessian), damped: B = G + λI.
2. Preconditioner: M = (diag((1/B) Σ_i g_i²) + λ)^0.75 from per-example gradients (§4.7).
3. CG on B d = g from x0 = 0.95 d_prev (§4.5: "ζ = 0.95"), stopped by Martens' relative-progress
   rule (§4.4) or `maxiter`, saving the iterates at i = ⌈5·1.3ʲ⌉ (§4.6).
4. Backtracking over the saved iterates (§4.6): start from the last; move to the previous one
   while its loss is lower; keep the earliest one whose predecessor does not lower it further.
5. Line search (Martens & Sutskever 2012, §8.8): the largest α = lr · 0.8ᵏ with
   f(θ − α d) ≤ f(θ) − c α gᵀd, c = 10⁻², at most `max_linesearch` shrinks. If none decreases the
   loss enough, the step is rejected: zero update.
6. Levenberg-Marquardt (§4.1): ρ = (f(θ + p) − f(θ)) / (q(p) − q(0)), q(p) − q(0) = gᵀp + ½ pᵀGp;
   ρ < ¼ → λ·3/2, ρ > ¾ → λ·2/3; a rejected or non-finite step has ρ = −∞.

Trial losses use `eval_batch` when given, else the training batch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from natgrad import _tree
from natgrad import curvature as curvature_lib
from natgrad.damping import DampingRule, as_rule, levenberg_marquardt
from natgrad.optimizers import _shared
from natgrad.preconditioners import Preconditioner, martens_diagonal
from natgrad.solvers import NONFINITE

__all__ = ["hessian_free", "HessianFreeState"]

PyTree = Any

WARM_START = 0.95  # ζ, CG warm-start decay (Martens 2010, §4.5)
ARMIJO_C = 1e-2  # sufficient-decrease constant (Martens & Sutskever 2012, §8.8)
ARMIJO_SHRINK = 0.8  # step shrink factor of the line search (ibid.)
MAX_LINESEARCH = 20  # 0.8²⁰ ≈ 0.012: smaller steps are not worth a forward pass each
INITIAL_DAMPING = 1.0  # λ₀; LM adapts it within a few steps
# λ's floor. Hessian-free has no KL bound on its step: LM, seeing ρ > ¾ on batches the model
# already fits, shrinks λ until the steps overshoot on the next batches. Measured on MNIST-5k,
# 784-128-10, batch 128 (`natgrad compare`), test accuracy after 2 / 6 epochs: no floor 80.9 / —,
# floor 0.1: 83.4 / 95.2, 0.3: 89.8 / 95.4, 0.5: 91.5 / 95.1, 1.0: 92.0 / 94.1. Martens (2010)
# used large batches, where a lower λ pays off: pass your own rule there.
MIN_DAMPING = 0.5


class HessianFreeState(NamedTuple):
    count: jax.Array
    damping: jax.Array
    direction: PyTree  # last CG solution, for the warm start
    cg_iterations: jax.Array
    cg_status: jax.Array
    backtrack_iteration: jax.Array  # the CG iteration whose iterate was kept
    step_size: jax.Array  # line-search α (0 if rejected)
    rho: jax.Array
    rejected_steps: jax.Array
    preconditioner_state: Any


def hessian_free(
    apply_fn: Callable,
    loss,
    *,
    damping: float | DampingRule | None = None,
    maxiter: int = 50,
    tol: float = 1e-6,
    curvature: str = "ggn",
    preconditioner: Preconditioner | None | str = "martens",
    warm_start: float = WARM_START,
    learning_rate: float = 1.0,
    armijo_c: float = ARMIJO_C,
    armijo_shrink: float = ARMIJO_SHRINK,
    max_linesearch: int = MAX_LINESEARCH,
    martens_stop: bool = True,
) -> optax.GradientTransformationExtraArgs:
    """Hessian-free: damped Gauss-Newton CG with backtracking, line search and LM damping.

    Args:
      apply_fn, loss: the model and its declared loss, as in `natural_gradient`.
      damping: a `natgrad.damping` rule or a fixed λ; default
        ``levenberg_marquardt(1.0, min_damping=0.5)`` (see `MIN_DAMPING`).
      maxiter: CG iterations at most per step (Martens used up to 250 on GPUs).
      curvature: ``"ggn"`` (Martens' choice); any `natgrad.curvature.CURVATURES` name works.
      preconditioner: ``"martens"`` (default), None, or a `Preconditioner`.
      learning_rate: the first α tried by the line search.
      armijo_c, armijo_shrink, max_linesearch: the line search.

    The update needs ``batch=(inputs, targets)`` and accepts ``eval_batch=`` for trial losses.
    """
    loss = _shared.check_loss(loss)
    if curvature not in curvature_lib.CURVATURES:
        raise ValueError(
            f"curvature: expected one of {curvature_lib.CURVATURES}, got {curvature!r}"
        )
    default = levenberg_marquardt(INITIAL_DAMPING, min_damping=MIN_DAMPING)
    rule = as_rule(default if damping is None else damping)
    maxiter = _shared.check_maxiter(maxiter)
    tol = _shared.check_positive("tol", tol, allow_zero=True)
    warm_start = _shared.check_positive("warm_start", warm_start, allow_zero=True)
    learning_rate = _shared.check_positive("learning_rate", learning_rate)
    armijo_c = _shared.check_positive("armijo_c", armijo_c, allow_zero=True)
    if not 0 < armijo_shrink < 1:
        raise ValueError(f"armijo_shrink: expected 0 < armijo_shrink < 1, got {armijo_shrink}")
    if not isinstance(max_linesearch, int) or max_linesearch < 0:
        raise ValueError(f"max_linesearch: expected an integer >= 0, got {max_linesearch!r}")
    if preconditioner == "martens":
        preconditioner = martens_diagonal()
    preconditioner = _shared.check_preconditioner(preconditioner)
    needs_key = curvature == "fisher_mc"

    def init_fn(params):
        dtype = jax.tree.leaves(params)[0].dtype
        return HessianFreeState(
            count=jnp.zeros((), jnp.int32),
            damping=jnp.asarray(rule.initial, dtype),
            direction=_tree.zeros_like(params),
            cg_iterations=jnp.zeros((), jnp.int32),
            cg_status=jnp.zeros((), jnp.int32),
            backtrack_iteration=jnp.zeros((), jnp.int32),
            step_size=jnp.zeros((), dtype),
            rho=jnp.asarray(jnp.nan, dtype),
            rejected_steps=jnp.zeros((), jnp.int32),
            preconditioner_state=None if preconditioner is None else preconditioner.init(params),
        )

    def update_fn(grads, state, params=None, *, batch=None, key=None, eval_batch=None, **extra):
        del extra
        _shared.check_call("hessian_free", params, batch, key, needs_key)
        k_curv, k_pre = _shared.split_key(key, 2)
        lam = state.damping
        dtype = lam.dtype
        op = curvature_lib.make(curvature, apply_fn, loss, params, batch, key=k_curv)
        apply_inverse, pstate = _shared.preconditioner_update(
            preconditioner,
            state.preconditioner_state,
            params,
            batch,
            apply_fn=apply_fn,
            loss=loss,
            damping=lam,
            key=k_pre,
        )
        res = _shared.damped_solve(
            op,
            lam,
            grads,
            x0=_tree.scale(warm_start, state.direction),
            maxiter=maxiter,
            tol=tol,
            martens_stop=martens_stop,
            apply_inverse=apply_inverse,
            save_iterates=True,
        )

        inputs, targets = batch if eval_batch is None else eval_batch

        def loss_at(d, alpha):
            trial = jax.tree.map(lambda p, v: p - (alpha * v).astype(p.dtype), params, d)
            value = loss.mean(apply_fn(trial, inputs), targets)
            return jnp.where(jnp.isfinite(value), value, jnp.inf).astype(dtype)

        f0 = op.loss_value if eval_batch is None else loss.mean(apply_fn(params, inputs), targets)
        f0 = f0.astype(dtype)
        j, f_j = _backtrack(res, lambda d: loss_at(d, 1.0))
        d = jax.tree.map(lambda s: s[j], res.saved)

        gd = _tree.vdot(grads, d).astype(dtype)
        alpha, f_alpha, ok = _line_search(
            lambda a: loss_at(d, a),
            f0,
            f_j,
            gd,
            lr=learning_rate,
            c=armijo_c,
            shrink=armijo_shrink,
            max_steps=max_linesearch,
        )
        dgd = _tree.vdot(d, op.mv(d)).astype(dtype)
        predicted = -alpha * gd + 0.5 * alpha**2 * dgd
        finite = _tree.all_finite(grads) & _tree.all_finite(res.x) & jnp.isfinite(dgd)
        finite = finite & (res.status != NONFINITE)
        accepted = finite & ok
        rho = jnp.where(accepted, _shared.reduction_ratio(f_alpha - f0, predicted), -jnp.inf)
        rho = rho.astype(dtype)
        updates = jax.tree.map(lambda p, v: (-alpha * v).astype(p.dtype), params, d)

        # A finite step that failed the line search is rejected but is not an emergency: LM
        # (ρ = −∞) raises λ. Non-finite numbers raise it by REJECT_FACTOR.
        new_state = HessianFreeState(
            count=state.count + 1,
            damping=jnp.where(
                finite, rule.update(lam, rho), _shared.next_damping(rule, lam, rho, False)
            ).astype(dtype),
            direction=_shared.guard(finite, res.x, state.direction),
            cg_iterations=res.iterations,
            cg_status=res.status,
            backtrack_iteration=res.saved_steps[j],
            step_size=jnp.where(accepted, alpha, 0.0).astype(dtype),
            rho=rho,
            rejected_steps=state.rejected_steps + (~accepted).astype(jnp.int32),
            preconditioner_state=_shared.guard(finite, pstate, state.preconditioner_state),
        )
        return _shared.zero_if_rejected(accepted, updates), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _backtrack(res, loss_of):
    """Index of the saved CG iterate to keep (Martens 2010, §4.6), and its loss.

    Start at the last saved iterate; step back while the previous iterate has a lower loss.
    """
    last = jnp.sum(res.saved_steps >= 0) - 1
    take = lambda j: jax.tree.map(lambda s: s[j], res.saved)  # noqa: E731

    def cond(c):
        j, _, going = c
        return going

    def body(c):
        j, f_j, _ = c
        f_prev = loss_of(take(j - 1))
        better = f_prev < f_j
        j_new = jnp.where(better, j - 1, j)
        return j_new, jnp.where(better, f_prev, f_j), better & (j_new > 0)

    f_last = loss_of(take(last))
    j, f_j, _ = lax.while_loop(cond, body, (last, f_last, last > 0))
    return j, f_j


def _line_search(loss_at, f0, f1, slope, *, lr, c, shrink, max_steps):
    """Largest α = lr·shrinkᵏ (k ≤ max_steps) with f(α) ≤ f0 − c α slope (Armijo).

    `f1` is the already known loss at α = 1. Returns (α, f(α), found).
    """

    def armijo(alpha, f_alpha):
        return (f_alpha <= f0 - c * alpha * slope) & jnp.isfinite(f_alpha) & (slope > 0)

    f_start = f1 if lr == 1.0 else loss_at(jnp.asarray(lr, f0.dtype))
    alpha0 = jnp.asarray(lr, f0.dtype)

    def cond(s):
        k, alpha, f_alpha = s
        return (k < max_steps) & ~armijo(alpha, f_alpha)

    def body(s):
        k, alpha, _ = s
        alpha = alpha * shrink
        return k + 1, alpha, loss_at(alpha)

    _, alpha, f_alpha = lax.while_loop(cond, body, (jnp.int32(0), alpha0, f_start))
    return alpha, f_alpha, armijo(alpha, f_alpha)
