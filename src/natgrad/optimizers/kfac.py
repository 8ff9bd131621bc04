r"""K-FAC as an optax transformation (Martens & Grosse, 2015).

The curvature is block diagonal: a Kronecker product A ⊗ G for each dense layer the model
declares with `natgrad.layers.dense`, a diagonal block for every other parameter
(`natgrad.kfac_blocks` has the maths). One step, given the gradient g:

1. Statistics: one forward and backward pass of the instrumented model on the batch, with
   targets sampled from the model (``fisher_type="sampled"``, the true Fisher; hence ``key=``),
   folded into exponential moving averages (decay `ema_decay`).
2. Inverses of the factored-Tikhonov-damped factors, (A + π√λ I)⁻¹ and (G + √λ/π I)⁻¹,
   refreshed every `inverse_every` steps (`lax.cond`: the step stays one jittable function).
3. Direction Δ = F̂⁻¹ g blockwise: A⁻¹ [dW; db] G⁻¹; with momentum, s = Δ + μ s_prev.
4. Step size: a trust region in KL. Moving by −α s changes the model's output distributions by
   KL ≈ ½ α² sᵀF s; with the damped K-FAC matrix in place of F,
       α = min(lr, sqrt(2δ / sᵀ(F̂ + λ)s)),   δ = `kl_radius`,
   where sᵀ(F̂ + λ)s = gᵀΔ costs nothing when μ = 0 (one K-FAC product otherwise). This is
   "K-FAC with KL clipping" (Ba, Grosse & Martens 2017): lr for small steps, the radius for big.
5. Damping: λ fixed (default) or a `natgrad.damping` rule; a rule that needs the reduction ratio
   gets ρ = (f(θ + p) − f(θ)) / (−α gᵀs + ½ α² sᵀ(F̂ + λ)s) from one extra forward pass.
6. Safety: if the gradient, the statistics, the direction or α is non-finite, the update is
   zero and the averages, inverses and momentum stay as they were (`rejected_steps` counts it).

Stats to log are in `KFACState`: λ, α, ρ (NaN when not computed), the predicted step KL and
`registered_layers`, the number of dense layers the model passed through `natgrad.layers.dense`
(the rest of the parameters use diagonal blocks).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from natgrad import _tree, kfac_blocks
from natgrad.damping import DampingRule, as_rule
from natgrad.optimizers import _shared

__all__ = ["kfac", "KFACState"]

PyTree = Any


class KFACState(NamedTuple):
    count: jax.Array  # steps taken (accepted or not)
    damping: jax.Array  # λ for the next step
    curvature: kfac_blocks.KroneckerState  # moving averages and inverses
    momentum: PyTree  # the last search direction s
    step_size: jax.Array  # α of the last step (0 if rejected)
    rho: jax.Array  # reduction ratio of the last step, NaN if not computed
    step_kl: jax.Array  # ½ α² sᵀ(F̂ + λ)s, the predicted KL of the step
    registered_layers: jax.Array  # dense layers with Kronecker blocks in the last step
    rejected_steps: jax.Array


def kfac(
    apply_fn: Callable,
    loss,
    *,
    learning_rate: float | optax.Schedule = 1.0,
    kl_radius: float = 1e-3,
    damping: float | DampingRule = 1e-3,
    momentum: float = 0.0,
    ema_decay: float = 0.95,
    inverse_every: int = 5,
    fisher_type: str = "sampled",
) -> optax.GradientTransformationExtraArgs:
    """K-FAC: updates = −α F̂⁻¹ g, F̂ Kronecker-factored per dense layer, α from a KL trust region.

    Args:
      apply_fn: ``apply_fn(params, inputs) -> outputs``; dense layers computed with
        `natgrad.layers.dense` get Kronecker blocks, every other parameter a diagonal one.
      loss: a `natgrad.losses` loss.
      learning_rate: the cap on α (a float or an optax schedule).
      kl_radius: δ, the largest predicted KL divergence of the outputs per step.
      damping: λ > 0 (fixed) or a `natgrad.damping` rule.
      momentum: μ of heavy-ball momentum on the direction (0 disables).
      ema_decay: β of the factors' moving averages.
      inverse_every: refresh the inverses every this many steps.
      fisher_type: ``"sampled"`` (true Fisher, targets drawn from the model), ``"exact"``
        (output curvature's square root, one backward pass per output) or ``"empirical"``.

    The update needs ``batch=(inputs, targets)`` and, unless ``fisher_type="empirical"``,
    ``key=``; it accepts ``eval_batch=`` for the damping rule's trial loss.

    Example::

        def apply_fn(params, x):
            h = jax.nn.relu(natgrad.layers.dense(params[0], x))
            return natgrad.layers.dense(params[1], h)

        opt = natgrad.kfac(apply_fn, natgrad.losses.softmax_cross_entropy())
        state = opt.init(params)
        grads = jax.grad(mean_loss)(params, x, y)
        updates, state = opt.update(grads, state, params, batch=(x, y), key=key)
        params = optax.apply_updates(params, updates)
    """
    loss = _shared.check_loss(loss)
    learning_rate = _shared.check_learning_rate(learning_rate)
    kl_radius = _shared.check_positive("kl_radius", kl_radius)
    rule = as_rule(damping)  # a ValueError naming `damping` unless a number or a rule
    if not isinstance(damping, DampingRule):
        # λ = 0 would leave singular factors (e.g. constant input pixels) uninvertible.
        _shared.check_positive("damping", damping)
    momentum = _shared.check_positive("momentum", momentum, allow_zero=True)
    if momentum >= 1:
        raise ValueError(f"momentum: expected 0 <= momentum < 1, got {momentum}")
    ema_decay, inverse_every, fisher_type = kfac_blocks.check_options(
        ema_decay, inverse_every, fisher_type
    )
    needs_key = fisher_type != "empirical"

    def init_fn(params):
        dtype = jax.tree.leaves(params)[0].dtype
        scalar = lambda v: jnp.asarray(v, dtype)  # noqa: E731
        return KFACState(
            count=jnp.zeros((), jnp.int32),
            damping=scalar(rule.initial),
            curvature=kfac_blocks.init(params),
            momentum=_tree.zeros_like(params),
            step_size=scalar(0.0),
            rho=scalar(jnp.nan),
            step_kl=scalar(0.0),
            registered_layers=jnp.zeros((), jnp.int32),
            rejected_steps=jnp.zeros((), jnp.int32),
        )

    def update_fn(grads, state, params=None, *, batch=None, key=None, eval_batch=None, **extra):
        del extra
        _shared.check_call("kfac", params, batch, key, needs_key)
        lam = state.damping
        stats, registered, outputs = kfac_blocks.statistics(
            apply_fn, loss, params, batch, key=key, fisher_type=fisher_type
        )
        curv = kfac_blocks.update(
            state.curvature,
            stats,
            lam,
            registered,
            ema_decay=ema_decay,
            inverse_every=inverse_every,
        )
        delta = kfac_blocks.apply_inverse(curv, lam, registered, grads)
        if momentum:
            s = _tree.axpy(momentum, state.momentum, delta)
            quad = _tree.vdot(s, kfac_blocks.damped_product(curv, lam, registered, s))
        else:
            s = delta
            quad = _tree.vdot(grads, delta)  # = Δᵀ(F̂ + λ)Δ
        quad = quad.astype(lam.dtype)
        gs = _tree.vdot(grads, s).astype(lam.dtype)
        lr = _shared.learning_rate_at(learning_rate, state.count).astype(lam.dtype)
        safe = jnp.where(quad > 0, quad, 1.0)
        alpha = jnp.where(quad > 0, jnp.minimum(lr, jnp.sqrt(2 * kl_radius / safe)), lr)
        updates = _tree.cast_like(_tree.scale(-alpha, s), params)
        predicted = -alpha * gs + 0.5 * alpha**2 * quad

        finite = (
            _tree.all_finite(grads)
            & _tree.all_finite(stats)
            & _tree.all_finite(s)
            & jnp.isfinite(quad)
            & jnp.isfinite(alpha)
        )
        rho, f1_finite = _shared.trial_rho(
            rule,
            apply_fn=apply_fn,
            loss=loss,
            params=params,
            updates=updates,
            batch=batch,
            eval_batch=eval_batch,
            f0=loss.mean(outputs, batch[1]),
            predicted=predicted,
            dtype=lam.dtype,
        )
        finite = finite & f1_finite

        accepted = finite
        new_state = KFACState(
            count=state.count + 1,
            damping=_shared.next_damping(rule, lam, rho, accepted),
            curvature=_shared.guard(accepted, curv, state.curvature),
            momentum=_shared.guard(accepted, s, state.momentum),
            step_size=jnp.where(accepted, alpha, 0.0).astype(lam.dtype),
            rho=rho,
            step_kl=jnp.where(accepted, 0.5 * alpha**2 * quad, 0.0).astype(lam.dtype),
            registered_layers=jnp.asarray(sum(registered), jnp.int32),
            rejected_steps=state.rejected_steps + (~accepted).astype(jnp.int32),
        )
        return _shared.zero_if_rejected(accepted, updates), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
