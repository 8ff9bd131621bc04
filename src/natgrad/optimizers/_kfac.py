r"""K-FAC as an optax transformation (Martens & Grosse, 2015).

The pipeline of `natgrad.optimizers` whose direction is a factored inverse instead of a solve.
The curvature is block diagonal: a Kronecker product A ⊗ G for each layer the model declares
with `natgrad.layers.dense` or `natgrad.layers.conv2d`, a diagonal block for every other
parameter (`natgrad.kronecker` has the maths). One step, given the gradient g:

1. Curvature (the preconditioner `natgrad.preconditioners.kfac`): the factors' exponential
   moving averages (decay `ema_decay`) and the inverses of the factored-Tikhonov-damped
   factors, (A + π√λ I)⁻¹ and (G + √λ/π I)⁻¹, as the earlier steps left them. A factor at
   least 256 wide (a 785-pixel input, a 256-unit layer) is inverted as rank 32 plus a scaled
   identity (`natgrad.low_rank`; ``input_factor_rank=None`` / ``output_factor_rank=None``
   invert exactly): applying a 785-wide exact inverse cost more than the layer's forward and
   backward pass.
2. Direction Δ = F̂⁻¹ g blockwise: A⁻¹ [dW; db] G⁻¹; with momentum, s = Δ + μ s_prev.
3. Step size: a trust region in KL with the damped K-FAC matrix in place of F,
       α = min(lr, sqrt(2δ / sᵀ(F̂ + λ)s)),   δ = `kl_radius`,
   where sᵀ(F̂ + λ)s = gᵀΔ costs nothing when μ = 0 (one K-FAC product otherwise): "K-FAC with
   KL clipping" (Ba, Grosse & Martens 2017).
4. Damping: λ fixed (default) or a `natgrad.damping` rule; a rule that needs the reduction ratio
   gets ρ = (f(θ + p) − f(θ)) / (−α gᵀs + ½ α² sᵀ(F̂ + λ)s) from one extra forward pass.
5. Guard: if the gradient, the direction or α is non-finite, the update is zero and the
   averages, inverses and momentum stay as they were (`rejected_steps` counts it).
6. After an accepted step, every `statistics_every` steps: one forward and backward pass of the
   instrumented model on the batch, with targets sampled from the model
   (``curvature="fisher_mc"``, the true Fisher; hence ``key=``), folded into the averages; the
   inverses refreshed every `inverse_every` steps. The step's own statistics thus serve from
   the next step on (the first step has none: M = I there, a gradient step of length at most
   √(2δ)), and a rejected step has nothing to restore (restoring the state cost ~23 % of a
   step).

`state.preconditioner_state` is the `natgrad.kronecker.KroneckerState`; its `registered_layers`
counts the layers the model passed through `natgrad.layers.dense` / `conv2d` and
`registered_by_kind` the same per kind, ``{"dense": ..., "conv2d": ...}`` (the rest of the
parameters use diagonal blocks).
"""

from __future__ import annotations

from collections.abc import Callable

import optax

from natgrad import curvature as curvature_lib
from natgrad import preconditioners, step_rules
from natgrad.blocks import sharing
from natgrad.damping import DampingRule, as_rule
from natgrad.optimizers import _checks, _directions, _pipeline, defaults

__all__ = ["kfac"]


def kfac(
    apply_fn: Callable,
    loss,
    *,
    learning_rate: float | optax.Schedule = 1.0,
    damping: float | DampingRule = defaults.KFAC_DAMPING,
    momentum: float = 0.0,
    preconditioner: preconditioners.Preconditioner | None = None,
    curvature: str | curvature_lib.Curvature = "fisher_mc",
    step_rule: str | step_rules.StepRule = "kl",
    kl_radius: float = defaults.KL_RADIUS,
    ema_decay: float = 0.95,
    inverse_every: int = defaults.KFAC_INVERSE_EVERY,
    statistics_every: int = defaults.KFAC_STATISTICS_EVERY,
    fisher_type: str | None = None,
    reject_rises: bool = defaults.KFAC_REJECT_RISES,
    weight_sharing: str = "expand",
    eigenvalue_correction: bool = False,
    input_factor_rank: int | str | None = defaults.KFAC_INPUT_FACTOR_RANK,
    output_factor_rank: int | str | None = defaults.KFAC_OUTPUT_FACTOR_RANK,
    curvature_batch: int | None = defaults.KFAC_CURVATURE_BATCH,
) -> optax.GradientTransformationExtraArgs:
    """K-FAC: updates = −α F̂⁻¹ g, F̂ Kronecker-factored per dense layer, α from a KL trust region.

    Args:
      apply_fn: ``apply_fn(params, inputs) -> outputs``; dense layers computed with
        `natgrad.layers.dense` get Kronecker blocks, every other parameter a diagonal one.
      loss: a `natgrad.losses` loss.
      learning_rate: the cap on α (a float or an optax schedule).
      damping: λ > 0 (fixed) or a `natgrad.damping` rule.
      momentum: μ of heavy-ball momentum on the direction (0 disables);
        ``"adaptive"``: μ, with α under ``step_rule="quadratic"``, minimising the damped
        quadratic model over span{d, s_prev} with exact curvature products (kfac-jax's
        adaptive learning rate and momentum; one product more a step, two for K-FAC
        with a GGN linearization).
      preconditioner: the factored approximation M whose inverse gives the direction; default
        ``natgrad.preconditioners.kfac(curvature=curvature, ema_decay=..., inverse_every=...)``.
      curvature: ``"fisher_mc"`` (true Fisher, targets drawn from the model), ``"fisher"``
        (output curvature's square root, one backward pass per output) or
        ``"empirical_fisher"``. (`fisher_type` is its deprecated name.)
      step_rule, kl_radius: as in `natural_gradient`; δ = `kl_radius`.
      ema_decay: β of the factors' moving averages.
      inverse_every: refresh the inverses every this many steps.
      statistics_every: take the factors' statistics (one instrumented forward and backward
        pass) every this many steps.

      reject_rises: compute the loss after the step, f(θ + p), on every step and reject the
        step if it rose. Off by default for K-FAC: its step has no other forward pass to share
        (natural_gradient's and hessian_free's already compute f(θ + p) for ρ), and one costs
        2 % (784-128-10 / batch 128) to 15 % (784-512-512-10 / batch 1024) of its step; turn it
        on with an unusual damping (e.g. λ = 1e-12, where K-FAC's KL bound is no bound).
      weight_sharing: ``"expand"`` (default) or ``"reduce"``, the Kronecker factors of layers
        whose weights act at several positions per example (sequence and spatial axes,
        convolutions; Eschenhagen et al. 2023). Expand is exact for a loss summed over
        positions (per-token language modelling, per-pixel losses) and is KFC for
        convolutions; reduce is exact when positions are pooled before the loss and cheaper.
        See `natgrad.preconditioners.kfac`.
      eigenvalue_correction: EKFAC (George et al. 2018): keep K-FAC's eigenbasis Q_A ⊗ Q_G but
        re-estimate the curvature's diagonal in it from per-example gradients,
        s = E[(Q_Aᵀ ∇W̄_b Q_G)²], damped as s + λ; dense and conv layers (`natgrad.ekfac`).
      input_factor_rank: k: invert each input factor wider than 2k as rank k plus a scaled
        identity (`natgrad.low_rank`), a cheaper application for wide inputs (785 pixels:
        12× fewer flops at k = 32); None inverts exactly; ``"auto"`` (default) is rank 32
        for input factors at least 256 wide only, and exact with `eigenvalue_correction`.
      output_factor_rank: the same for the output factors G (a 512-unit hidden layer's:
        8× fewer flops at k = 32, a 256-unit one's 4×); ``"auto"`` (default) as for
        `input_factor_rank`.
      curvature_batch: the statistics pass on at most this many examples, every ⌈B/n⌉-th of
        the batch's B (None: all of it); the gradient is the caller's, on the whole batch.
        Default `defaults.KFAC_CURVATURE_BATCH`, 512: the factors average ~20 passes, so a
        pass needs no more (784-512-512-10 at batch 1024: the same steps to 85-88 %, a
        cheaper step); batches of 512 or fewer are used whole.

    The update needs ``batch=(inputs, targets)`` and, unless ``curvature="empirical_fisher"``,
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
    kind = preconditioners.kfac_curvature(curvature, fisher_type)
    weight_sharing = sharing.check(weight_sharing)
    if preconditioner is None:
        preconditioner = preconditioners.kfac(
            curvature=kind,
            ema_decay=ema_decay,
            inverse_every=inverse_every,
            statistics_every=statistics_every,
            weight_sharing=weight_sharing,
            eigenvalue_correction=eigenvalue_correction,
            input_factor_rank=input_factor_rank,
            output_factor_rank=output_factor_rank,
        )
    if not isinstance(damping, DampingRule):
        # λ = 0 would leave singular factors (e.g. constant input pixels) uninvertible.
        _checks.number("damping", damping)
    parts = _pipeline.Parts(
        name="kfac",
        curvature=kind,
        direction=_directions.factored(),
        step_rule=step_rules.resolve(step_rule, kl_radius=_checks.number("kl_radius", kl_radius)),
        damping=as_rule(damping),
        learning_rate=_checks.learning_rate(learning_rate),
        momentum=_checks.momentum(momentum),
        warm_start=0.0,
        preconditioner=_checks.preconditioner(preconditioner),
        reject_rises=bool(reject_rises),
        curvature_batch=_checks.optional_integer("curvature_batch", curvature_batch),
    )
    return _pipeline.transform(apply_fn, _checks.loss(loss), parts)
