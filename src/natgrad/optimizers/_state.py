"""The state every natgrad optimiser keeps, the parts it is made of, and the checks of its call."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from natgrad import _tree
from natgrad import curvature as curvature_lib
from natgrad.damping import DampingRule
from natgrad.optimizers._directions import Direction
from natgrad.preconditioners import Preconditioner
from natgrad.step_rules import StepRule

PyTree = Any


class State(NamedTuple):
    """The state of `natural_gradient`, `hessian_free` and `kfac`: one layout, the same logged
    fields everywhere."""

    count: jax.Array  # steps taken (accepted or not)
    damping: jax.Array  # λ for the next step
    step_size: jax.Array  # α of the last step (0 if rejected)
    rho: jax.Array  # reduction ratio of the last step, NaN if not computed
    step_kl: jax.Array  # ½ α² sᵀFs, the quadratic prediction of the step's output KL
    rejected_steps: jax.Array  # steps rejected so far
    cg_iterations: jax.Array  # CG iterations of the last step (0 without CG)
    cg_status: jax.Array  # natgrad.solvers.STATUS_NAMES[cg_status]
    backtrack_iteration: jax.Array  # the CG iteration whose iterate was taken
    direction: PyTree  # the last direction, for the warm start (zeros when warm_start = 0)
    momentum: PyTree  # the last search direction s, for momentum (zeros when momentum = 0)
    momentum_coefficient: jax.Array  # μ of the last step, s = d + μ s_prev (0 if rejected)
    preconditioner_state: Any  # e.g. K-FAC's `natgrad.kronecker.KroneckerState`


class Parts(NamedTuple):
    """What an optimiser is made of."""

    name: str
    curvature: curvature_lib.Curvature
    direction: Direction
    step_rule: StepRule
    damping: DampingRule
    learning_rate: float | Callable
    momentum: float | str  # μ, or "adaptive"
    warm_start: float
    preconditioner: Preconditioner | None
    reject_rises: bool = True  # compute f(θ + p) every step and reject a rise
    curvature_batch: int | None = None  # curvature on at most n examples (every ⌈B/n⌉-th)


def initial(parts: Parts, params: PyTree) -> State:
    """The state before the first step: λ = the rule's initial value, zero direction/momentum."""
    check_params(parts.name, params)
    dtype = scalar_dtype(params)
    # Every leaf its own buffer: a training step may donate the state (XLA refuses to take one
    # buffer twice).
    zero = lambda: jnp.zeros((), jnp.int32)  # noqa: E731
    pre = parts.preconditioner
    return State(
        count=zero(),
        damping=jnp.asarray(parts.damping.initial, dtype),
        step_size=jnp.zeros((), dtype),
        rho=jnp.asarray(jnp.nan, dtype),
        step_kl=jnp.zeros((), dtype),
        rejected_steps=zero(),
        cg_iterations=zero(),
        cg_status=zero(),
        backtrack_iteration=zero(),
        direction=_tree.zeros_like(params),
        momentum=_tree.zeros_like(params),
        momentum_coefficient=jnp.zeros((), dtype),
        preconditioner_state=None if pre is None else pre.init(params),
    )


def advance(
    state: State,
    accepted,
    params,
    *,
    parts: Parts,
    damping,
    alpha,
    rho,
    sfs,
    mu,
    result,
    s,
    preconditioner_state,
) -> State:
    """The state after a step: what a rejected step would change is kept as it was. The last
    direction and search direction are kept only where a later step reads them (a warm start,
    momentum): otherwise each would cost a select and a write of the parameters' size every
    step (K-FAC has neither)."""
    dtype = state.damping.dtype

    def keep(new, old, read: bool):
        return _tree.where(accepted, _tree.cast_like(new, params), old) if read else old

    warm = result.d if result.keep is None else result.keep
    kept = result.iterations if result.kept_iteration is None else result.kept_iteration
    return State(
        count=state.count + 1,
        damping=damping,
        step_size=jnp.where(accepted, alpha, 0.0).astype(dtype),
        rho=rho,
        step_kl=jnp.where(accepted, 0.5 * alpha**2 * sfs, 0.0).astype(dtype),
        rejected_steps=state.rejected_steps + (~accepted).astype(jnp.int32),
        cg_iterations=jnp.asarray(result.iterations, jnp.int32),
        cg_status=jnp.asarray(result.status, jnp.int32),
        backtrack_iteration=jnp.asarray(kept, jnp.int32),
        direction=keep(warm, state.direction, parts.warm_start != 0),
        momentum=keep(s, state.momentum, parts.momentum != 0),
        momentum_coefficient=jnp.where(accepted, mu, 0.0).astype(dtype),
        preconditioner_state=preconditioner_state,  # the pipeline kept or updated it
    )


def scalar_dtype(params: PyTree):
    """Scalars of the state in the parameters' widest float type, at least float32."""
    return jnp.result_type(*jax.tree.leaves(params), jnp.float32)


def check_params(name: str, params: PyTree) -> None:
    leaves = jax.tree.leaves(params)
    if not leaves:
        raise ValueError(f"params: {name} needs at least one parameter array, got none")
    for leaf in leaves:
        if not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
            raise ValueError(
                f"params: {name} needs floating-point parameters, got a leaf of dtype "
                f"{jnp.result_type(leaf)}"
            )


def check_call(name: str, params, batch, key, needs_key: bool) -> None:
    """Fail loudly, naming the argument, when `update` misses what it needs."""
    if params is None:
        raise ValueError(f"params: {name}.update needs the current parameters")
    if batch is None:
        raise ValueError(f"batch: {name}.update needs the keyword argument batch=(inputs, targets)")
    if needs_key and key is None:
        raise ValueError(f"key: {name} samples from the model and needs the keyword argument key=")
