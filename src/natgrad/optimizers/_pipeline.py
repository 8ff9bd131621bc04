r"""The second-order step every natgrad optimiser takes, from composable parts.

Given the gradient g of the mean loss on the batch (the user's: it may carry weight decay or
clipping), one step is

1. curvature   C on the batch, a matrix-free operator built from one linearization
               (`natgrad.curvature.Curvature.operator`; skipped when the direction needs none),
               optionally on the first `curvature_batch` examples only (Martens' curvature
               mini-batches: C is a mean over examples, so λ and δ mean the same on fewer);
   preconditioner  M ≈ C + λI from its own statistics (`natgrad.preconditioners`), if any;
2. direction   d ≈ (C + λI)⁻¹ g (`_directions`: CG, CG with backtracking, or M⁻¹ g), with the
               curvature Q of its quadratic model q(p) = gᵀp + ½ pᵀQp;
   momentum    s = d + μ s_prev (μ = 0: s = d);
3. step rule   α (`natgrad.step_rules`): p = −α s;
4. damping     ρ = (f(θ + p) − f(θ)) / (q(p) − q(0)) from one extra forward pass (skipped
               when neither the damping rule nor the guard reads it, or the step rule already
               evaluated f(θ + p)), then λ ← rule.update(λ, ρ) (`natgrad.damping`);
5. guard       the step is rejected — zero update; direction, momentum and preconditioner state
               kept — when anything is non-finite, the step rule refuses, or the trial loss
               rose, f(θ + p) > f(θ) (`reject_rises`, default on: one forward pass per
               step). A batch whose gradient or loss is non-finite
               leaves λ as it was; any other rejection raises it (`DampingRule.reject`, or the
               rule's own update at ρ = −∞), never past its bounds.

`update(grads, state, params, *, batch, key=None, eval_batch=None, value=None)`: `value`, the
mean loss at `params` on `batch` that the caller's `jax.value_and_grad` already computed (optax's
convention), spares a forward pass where no curvature pass computes it.

`State` is the one state layout of all three optimisers; it holds what a user logs.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from natgrad import _tree
from natgrad import curvature as curvature_lib
from natgrad.losses import Loss
from natgrad.optimizers import _guard
from natgrad.optimizers._directions import DirectionInputs
from natgrad.optimizers._state import Parts, State, check_call, check_params, scalar_dtype
from natgrad.step_rules import StepQuantities


def transform(
    apply_fn: Callable, loss: Loss, parts: Parts
) -> optax.GradientTransformationExtraArgs:
    """The optax transformation that runs `parts` as the step above."""
    pre = parts.preconditioner
    needs_key = parts.curvature.needs_key or (pre is not None and pre.needs_key)

    def init_fn(params):
        check_params(parts.name, params)
        dtype = scalar_dtype(params)
        zero = jnp.zeros((), jnp.int32)
        return State(
            count=zero,
            damping=jnp.asarray(parts.damping.initial, dtype),
            step_size=jnp.zeros((), dtype),
            rho=jnp.asarray(jnp.nan, dtype),
            step_kl=jnp.zeros((), dtype),
            rejected_steps=zero,
            cg_iterations=zero,
            cg_status=zero,
            backtrack_iteration=zero,
            direction=_tree.zeros_like(params),
            momentum=_tree.zeros_like(params),
            preconditioner_state=None if pre is None else pre.init(params),
        )

    def update_fn(
        grads, state, params=None, *, batch=None, key=None, eval_batch=None, value=None, **extra
    ):
        del extra
        check_call(parts.name, params, batch, key, needs_key)
        lam = state.damping
        dtype = lam.dtype
        uses_op = parts.direction.uses_operator
        if uses_op and key is not None:
            k_curv, k_pre = jax.random.split(key)
        else:
            k_curv, k_pre = None, key

        # 1. Curvature and preconditioner (both on the curvature batch).
        sub = parts.curvature_batch
        cbatch = batch if sub is None else jax.tree.map(lambda a: a[:sub], tuple(batch))
        op = None
        if uses_op:
            op = parts.curvature.operator(apply_fn, loss, params, cbatch, key=k_curv)
        approx, pstate = None, state.preconditioner_state
        if pre is not None:
            approx, pstate = pre.update(
                state.preconditioner_state,
                params,
                cbatch,
                apply_fn=apply_fn,
                loss=loss,
                damping=lam,
                key=k_pre,
            )
        trial_inputs, trial_targets = batch if eval_batch is None else eval_batch

        def trial(v, alpha):
            moved = jax.tree.map(lambda p, a: p - (alpha * a).astype(p.dtype), params, v)
            return loss.mean(apply_fn(moved, trial_inputs), trial_targets).astype(dtype)

        # The operator's loss is the batch's only when it saw the whole batch.
        known = (op if op is not None else approx) if parts.curvature_batch is None else None
        if eval_batch is None and value is not None:  # the caller's value_and_grad computed it
            f0 = jnp.asarray(value, dtype)
        elif eval_batch is None and getattr(known, "loss_value", None) is not None:
            f0 = known.loss_value.astype(dtype)
        else:
            f0 = loss.mean(apply_fn(params, trial_inputs), trial_targets).astype(dtype)

        # 2. Direction and momentum.
        res = parts.direction.compute(
            DirectionInputs(
                grads=grads,
                op=op,
                damping=lam,
                approx=approx,
                x0=_tree.scale(parts.warm_start, state.direction),
                trial=trial,
                problem=(parts.curvature, apply_fn, loss, params, cbatch, k_curv),
            )
        )
        if parts.momentum:
            s = _tree.axpy(parts.momentum, state.momentum, res.d)
            qs = res.model.mv(s)
        else:
            s = res.d
            qs = res.model.mv(s) if res.qd is None else res.qd
        gs = _tree.vdot(grads, s).astype(dtype)
        sqs = _tree.vdot(s, qs).astype(dtype)
        sas = sqs if res.damped_model else sqs + lam * _tree.vdot(s, s).astype(dtype)
        if res.model.psd:
            sfs = sqs
        else:  # the KL's second-order term is the Fisher (= GGN), not an indefinite Hessian
            sfs = _tree.vdot(s, curvature_lib.ggn(apply_fn, loss, params, cbatch).mv(s))
            sfs = sfs.astype(dtype)

        # 3. Step size.
        lr = parts.learning_rate
        lr = jnp.asarray(lr(state.count) if callable(lr) else lr, dtype)
        f_unit = res.f_unit if not parts.momentum else None
        alpha, allowed, f1 = parts.step_rule.step_size(
            StepQuantities(
                lr=lr,
                gs=gs,
                sqs=sqs,
                sas=sas,
                sfs=sfs,
                f0=f0,
                trial=lambda a: trial(s, a),
                f_unit=f_unit,
            )
        )
        alpha = jnp.asarray(alpha, dtype)
        updates = jax.tree.map(lambda p, v: (-alpha * v).astype(p.dtype), params, s)
        predicted = -alpha * gs + 0.5 * alpha**2 * sqs

        # 4. Reduction ratio (one forward pass, only when something reads it).
        if f1 is None and (parts.damping.needs_rho or parts.reject_rises):
            f1 = trial(s, alpha)
        if f1 is None:
            rho = jnp.asarray(jnp.nan, dtype)
            rose, f1_finite = jnp.asarray(False), jnp.asarray(True)
        else:
            rho = _guard.reduction_ratio(f1 - f0, predicted).astype(dtype)
            rose = (f1 > f0) if parts.reject_rises else jnp.asarray(False)
            f1_finite = jnp.isfinite(f1)

        # 5. Guard.
        accepted, new_lam = _guard.verdict(
            parts.damping,
            lam,
            rho,
            bad_batch=~_tree.all_finite(grads) | ~jnp.isfinite(f0),
            finite=(
                res.finite
                & jnp.isfinite(alpha)
                & jnp.isfinite(sqs)
                & jnp.isfinite(sfs)
                & _tree.all_finite(pstate)
                & f1_finite
            ),
            refused=~allowed | rose,
        )

        keep = lambda new, old: _tree.where(accepted, new, old)  # noqa: E731
        new_state = State(
            count=state.count + 1,
            damping=new_lam,
            step_size=jnp.where(accepted, alpha, 0.0).astype(dtype),
            rho=rho,
            step_kl=jnp.where(accepted, 0.5 * alpha**2 * sfs, 0.0).astype(dtype),
            rejected_steps=state.rejected_steps + (~accepted).astype(jnp.int32),
            cg_iterations=jnp.asarray(res.iterations, jnp.int32),
            cg_status=jnp.asarray(res.status, jnp.int32),
            backtrack_iteration=jnp.asarray(res.kept_iteration, jnp.int32),
            direction=keep(_tree.cast_like(res.keep, params), state.direction),
            momentum=keep(_tree.cast_like(s, params), state.momentum),
            preconditioner_state=keep(pstate, state.preconditioner_state),
        )
        # jnp.where, not multiplication: 0 · NaN is NaN.
        updates = jax.tree.map(lambda u: jnp.where(accepted, u, jnp.zeros_like(u)), updates)
        return updates, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
