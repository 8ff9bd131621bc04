"""What every natgrad optimiser does the same way: argument checks, the damped CG solve, the
learning-rate schedule and the rule that nothing non-finite reaches the parameters."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from natgrad import _tree, curvature, solvers
from natgrad.damping import REJECT_FACTOR, DampingRule
from natgrad.losses import Loss
from natgrad.preconditioners import Preconditioner

PyTree = Any


def check_loss(loss) -> Loss:
    if not isinstance(loss, Loss):
        raise ValueError(
            f"loss: expected a natgrad.losses loss such as softmax_cross_entropy(), "
            f"got {type(loss).__name__}"
        )
    return loss


def check_maxiter(maxiter) -> int:
    if not isinstance(maxiter, int) or maxiter < 1:
        raise ValueError(f"maxiter: expected an integer >= 1, got {maxiter!r}")
    return maxiter


def check_positive(name: str, value, *, allow_zero: bool = False) -> float:
    ok = value >= 0 if allow_zero else value > 0
    if isinstance(value, bool) or not isinstance(value, int | float) or not ok:
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name}: expected a number {bound}, got {value!r}")
    return float(value)


def check_learning_rate(learning_rate):
    if callable(learning_rate):
        return learning_rate
    return check_positive("learning_rate", learning_rate)


def check_preconditioner(preconditioner) -> Preconditioner | None:
    if preconditioner is None or isinstance(preconditioner, Preconditioner):
        return preconditioner
    raise ValueError(
        f"preconditioner: expected None or a natgrad.preconditioners.Preconditioner, "
        f"got {type(preconditioner).__name__}"
    )


def check_call(name: str, params, batch, key, needs_key: bool) -> None:
    """Fail loudly, naming the argument, when `update` misses what it needs."""
    if params is None:
        raise ValueError(f"params: {name}.update needs the current parameters")
    if batch is None:
        raise ValueError(f"batch: {name}.update needs the keyword argument batch=(inputs, targets)")
    if needs_key and key is None:
        raise ValueError(f"key: {name} samples from the model and needs the keyword argument key=")


def learning_rate_at(learning_rate, count) -> jax.Array:
    return learning_rate(count) if callable(learning_rate) else jnp.asarray(learning_rate)


def split_key(key, num: int):
    return (None,) * num if key is None else tuple(jax.random.split(key, num))


def damped_solve(
    op: curvature.Operator,
    damping,
    grads: PyTree,
    *,
    x0: PyTree,
    maxiter: int,
    tol: float,
    martens_stop: bool,
    apply_inverse: Callable | None,
    save_iterates: bool = False,
) -> solvers.CGResult:
    """d = (C + λI)⁻¹ g by CG, warm-started from x0."""
    return solvers.cg(
        curvature.damped(op, damping).mv,
        grads,
        x0=x0,
        maxiter=maxiter,
        tol=tol,
        martens_stop=martens_stop,
        preconditioner=apply_inverse,
        save_iterates=save_iterates,
    )


def preconditioner_update(preconditioner, state, params, batch, *, apply_fn, loss, damping, key):
    if preconditioner is None:
        return None, state
    return preconditioner.update(
        state, params, batch, apply_fn=apply_fn, loss=loss, damping=damping, key=key
    )


def next_damping(rule: DampingRule, damping, rho, accepted) -> jax.Array:
    """λ from the rule after an accepted step; λ · REJECT_FACTOR after a rejected one."""
    return jnp.where(accepted, rule.update(damping, rho), damping * REJECT_FACTOR).astype(
        damping.dtype
    )


def guard(accepted, new: PyTree, old: PyTree) -> PyTree:
    """`new` where the step is accepted, `old` otherwise (leafwise, jit-friendly)."""
    return _tree.where(accepted, new, old)


def zero_if_rejected(accepted, updates: PyTree) -> PyTree:
    # jnp.where, not multiplication: 0 · NaN is NaN.
    return jax.tree.map(lambda u: jnp.where(accepted, u, jnp.zeros_like(u)), updates)


def reduction_ratio(actual, predicted) -> jax.Array:
    """ρ = actual / predicted reduction; −∞ when the loss is non-finite or rose with no predicted
    rise (Martens 2010, §4.1)."""
    rho = actual / predicted
    bad = ~jnp.isfinite(actual) | ~jnp.isfinite(rho) | (predicted >= 0)
    return jnp.where(bad, -jnp.inf, rho)


def trial_rho(
    rule: DampingRule, *, apply_fn, loss, params, updates, batch, eval_batch, f0, predicted, dtype
):
    """(ρ, f1 finite) for the damping rule: the loss after the step on `eval_batch` (default:
    the batch) against the model's `predicted` change. `f0` is the loss before the step on the
    batch, reused when there is no separate evaluation batch. ρ is NaN when the rule does not
    use it (no extra forward pass then)."""
    if not rule.needs_rho:
        return jnp.asarray(jnp.nan, dtype), jnp.asarray(True)
    inputs, targets = batch if eval_batch is None else eval_batch
    if eval_batch is not None:
        f0 = loss.mean(apply_fn(params, inputs), targets)
    f1 = loss.mean(apply_fn(optax.apply_updates(params, updates), inputs), targets)
    return reduction_ratio(f1 - f0, predicted).astype(dtype), jnp.isfinite(f1)
