r"""The second-order step every natgrad optimiser takes, from composable parts.

Given the gradient g of the mean loss on the batch (the user's: it may carry weight decay or
clipping), one step is

1. curvature   C on the batch, a matrix-free operator built from one linearization
               (`natgrad.curvature.Curvature.operator`; skipped when the direction needs none),
               optionally on at most `curvature_batch` examples, every ⌈B/n⌉-th (Martens'
               curvature mini-batches: C is a mean over examples, so λ and δ mean the same
               on fewer; `curvature_examples`);
   preconditioner  M ≈ C + λI from its own statistics (`natgrad.preconditioners`), if any;
2. direction   d ≈ (C + λI)⁻¹ g (`_directions`: CG, CG with backtracking, or M⁻¹ g), with the
               curvature Q of its quadratic model q(p) = gᵀp + ½ pᵀQp;
   momentum    s = d + μ s_prev (μ = 0: s = d; "adaptive": μ from the quadratic model over
               span{d, s_prev}, `_quadratic`);
3. step rule   α (`natgrad.step_rules`): p = −α s;
4. damping     ρ = (f(θ + p) − f(θ)) / (q(p) − q(0)) from one extra forward pass (skipped
               when neither the damping rule nor the guard reads it, or the step rule already
               evaluated f(θ + p)), then λ ← rule.update(λ, ρ) (`natgrad.damping`);
5. guard       the step is rejected — zero update; direction, momentum and preconditioner state
               kept (K-FAC's is updated only now, after an accepted step:
               `_preconditioning`) — when anything is non-finite, the step rule refuses,
               or the trial loss rose, f(θ + p) > f(θ) (`reject_rises`, default on: one
               forward pass per step). A batch whose gradient or loss is non-finite
               leaves λ as it was; any other rejection raises it (`DampingRule.reject`, or the
               rule's own update at ρ = −∞), never past its bounds.

`update(grads, state, params, *, batch, key=None, eval_batch=None, value=None)`: `value`, the
mean loss at `params` on `batch` that the caller's `jax.value_and_grad` already computed (optax's
convention), spares a forward pass where no curvature pass computes it.

`State` is the one state layout of all three optimisers; it holds what a user logs.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from natgrad import _random, _tree
from natgrad.losses import Loss
from natgrad.optimizers import _guard, _preconditioning, _quadratic
from natgrad.optimizers._directions import DirectionInputs
from natgrad.optimizers._state import Parts, advance, check_call, initial
from natgrad.step_rules import StepQuantities


def transform(
    apply_fn: Callable, loss: Loss, parts: Parts
) -> optax.GradientTransformationExtraArgs:
    """The optax transformation that runs `parts` as the step above."""
    pre = parts.preconditioner
    needs_key = parts.curvature.needs_key or (pre is not None and pre.needs_key)

    def update_fn(
        grads, state, params=None, *, batch=None, key=None, eval_batch=None, value=None, **extra
    ):
        del extra
        check_call(parts.name, params, batch, key, needs_key)
        lam = state.damping
        dtype = lam.dtype
        cbatch, whole, op, k_curv, k_pre = _curvature(apply_fn, loss, parts, params, batch, key)
        pkw = {"apply_fn": apply_fn, "loss": loss, "damping": lam, "key": k_pre}
        approx, pstate = _preconditioning.before(pre, state, params, cbatch, **pkw)
        trial_inputs, trial_targets = batch if eval_batch is None else eval_batch

        def trial(v, alpha):
            moved = jax.tree.map(lambda p, a: p - (alpha * a).astype(p.dtype), params, v)
            return loss.mean(apply_fn(moved, trial_inputs), trial_targets).astype(dtype)

        # f(θ): the caller's value_and_grad computed it, or the curvature operator's
        # linearization did — when it saw the whole batch.
        known = op if whole else None
        if eval_batch is None and value is not None:
            f0 = jnp.asarray(value, dtype)
        elif eval_batch is None and getattr(known, "loss_value", None) is not None:
            f0 = known.loss_value.astype(dtype)
        else:
            f0 = loss.mean(apply_fn(params, trial_inputs), trial_targets).astype(dtype)

        # 2. Direction and momentum. Without a warm start CG starts from 0, and its first
        # residual (g) costs no product.
        x0 = None if parts.warm_start == 0 else _tree.scale(parts.warm_start, state.direction)
        res = parts.direction.compute(
            DirectionInputs(
                grads=grads,
                op=op,
                damping=lam,
                approx=approx,
                x0=x0,
                trial=trial,
                problem=(parts.curvature, apply_fn, loss, params, cbatch, k_curv),
            )
        )
        s, q, mu = _quadratic.along(
            parts.momentum, state.momentum, res, grads, lam, (apply_fn, loss, params, cbatch)
        )

        # 3. Step size.
        lr = parts.learning_rate
        lr = jnp.asarray(lr(state.count) if callable(lr) else lr, dtype)
        f_unit = res.f_unit if not parts.momentum else None
        quantities = StepQuantities(lr=lr, f0=f0, trial=lambda a: trial(s, a), f_unit=f_unit, **q)
        alpha, allowed, f1 = parts.step_rule.step_size(quantities)
        alpha = jnp.asarray(alpha, dtype)

        # 4–5. Reduction ratio (one forward pass, only when something reads it) and guard.
        if f1 is None and (parts.damping.needs_rho or parts.reject_rises):
            f1 = trial(s, alpha)
        finite = res.finite & jnp.isfinite(alpha) & _tree.all_finite((q["sqs"], q["sfs"]))
        finite = finite & _preconditioning.finite(pre, pstate)
        accepted, new_lam, rho = _guard.judge(
            parts.damping,
            lam,
            f0=f0,
            f1=f1,
            predicted=-alpha * q["gs"] + 0.5 * alpha**2 * q["sqs"],
            reject_rises=parts.reject_rises,
            bad_batch=~_tree.all_finite(grads) | ~jnp.isfinite(f0),
            finite=finite,
            allowed=allowed,
        )

        pstate = _preconditioning.after(
            pre, state, pstate, accepted, params, cbatch, **dict(pkw, damping=new_lam)
        )
        new_state = advance(
            state,
            accepted,
            params,
            parts=parts,
            damping=new_lam,
            alpha=alpha,
            rho=rho,
            sfs=q["sfs"],
            mu=mu,
            result=res,
            s=s,
            preconditioner_state=pstate,
        )
        # jnp.where, not multiplication: 0 · NaN is NaN.
        updates = jax.tree.map(
            lambda p, v: jnp.where(accepted, -alpha * v, 0.0).astype(p.dtype), params, s
        )
        return updates, new_state

    return optax.GradientTransformationExtraArgs(functools.partial(initial, parts), update_fn)


def curvature_examples(batch, n: int | None) -> tuple:
    """(the examples the curvature sees, whether they are the whole batch): every s-th example,
    s = ⌈B / n⌉, so at most n, spread over the batch (n None: all of it).

    Strided rather than the first n: with the batch sharded over devices, every device keeps
    its share (the first n would sit on a few devices, and XLA moves them); the batch is
    shuffled, so any s-th example is as good as any other."""
    size = jax.tree.leaves(batch)[0].shape[0]
    stride = 1 if n is None else -(-size // n)
    if stride == 1:
        return batch, True
    return jax.tree.map(lambda a: a[::stride], tuple(batch)), False


def _curvature(apply_fn, loss, parts: Parts, params, batch, key) -> tuple:
    """Step 1 on the curvature examples: (them, whether they are the whole batch, C or None,
    C's key, the preconditioner's key)."""
    uses_op = parts.direction.uses_operator
    k_curv, k_pre = _random.split(key) if uses_op and key is not None else (None, key)
    cbatch, whole = curvature_examples(batch, parts.curvature_batch)
    op = parts.curvature.operator(apply_fn, loss, params, cbatch, key=k_curv) if uses_op else None
    return cbatch, whole, op, k_curv, k_pre
