r"""Preconditioners for CG: cheap approximations M ≈ C + λI whose inverse is applied to residuals.

A preconditioner for natgrad's optimisers is a `Preconditioner(init, update)` pair, like an optax
transformation:

    state = precond.init(params)
    m, state = precond.update(state, params, batch, apply_fn=..., loss=..., damping=λ, key=key)
    natgrad.solvers.cg(matvec, b, preconditioner=m.inverse())

`update` runs once per optimiser step (it may keep running statistics in `state`, as K-FAC does);
it returns M, the damped approximation of C + λI, as a `natgrad.operators.Operator` that knows
its inverse: ``m.inverse()(r)`` = M⁻¹ r is what CG applies once per iteration, and M itself is
K-FAC's curvature model.

A preconditioner that keeps running statistics may also give ``operator(state, params, batch,
...)``: M from its state as it is. The optimiser then takes M from `operator` for the step's
direction and runs ``update(..., accepted=...)`` after the step's verdict, which must change
nothing when the step was rejected (K-FAC: the statistics of step t serve from step t + 1 on).
A rejected step thus leaves the state as it was with nothing to restore: restoring a K-FAC
state of 5.6 MB (784-128-10) after every step cost ~23 % of the step on a CPU.

``martens_diagonal`` is the preconditioner of Martens (2010, §4.7):

    M = diag( (1/B) Σ_i g_i ⊙ g_i + λ )^α,   α = 0.75,

with g_i the per-example gradients (the diagonal of the empirical Fisher). The exponent α < 1
tempers the diagonal, which Martens found more robust than α = 1. For a model whose parameters
all sit in declared layers the sum comes from one backward pass (`natgrad.per_example`), else
from a loop over the examples.

Two more diagonals of the GGN G = (1/B) Σ_i J_iᵀ H_i J_i (= the Fisher for natgrad's losses), used
as M = (max(d, 0) + λ)^α, α = 1 by default (Jacobi):

* ``exact_diagonal``: d = diag(G) exactly. With H_i = Σ_k q_ik q_ikᵀ (the output curvature's
  square root, K columns per example), d = (1/B) Σ_i Σ_k (J_iᵀ q_ik)²: K backward passes per
  example, cheap when the output dimension K is small.
* ``hutchinson_diagonal``: d = (1/S) Σ_s v_s ⊙ (G v_s) with Rademacher probes v_s (entries ±1,
  drawn from the explicit `key`): unbiased, since E[v vᵀ] = I; S curvature products per step,
  averaged over steps.

``kfac`` is K-FAC's block-diagonal inverse (`natgrad.kronecker`): Kronecker blocks for the
layers declared with `natgrad.layers.dense` / `natgrad.layers.conv2d`, a diagonal block for the
rest.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from natgrad import _random, _tree, kronecker, operators, per_example
from natgrad import curvature as curvature_lib
from natgrad.blocks import sharing

__all__ = [
    "Preconditioner",
    "martens_diagonal",
    "empirical_fisher_diagonal",
    "looped_empirical_fisher_diagonal",
    "exact_diagonal",
    "ggn_diagonal",
    "hutchinson_diagonal",
    "hutchinson_estimate",
    "kfac",
]

PyTree = Any

MARTENS_ALPHA = 0.75  # exponent of the diagonal preconditioner (Martens 2010, §4.7)


class Preconditioner(NamedTuple):
    """`init(params) -> state`; `update(state, params, batch, *, apply_fn, loss, damping, key)
    -> (m, state)` with `m` the Operator M ≈ C + λI on pytrees; `m.inverse()` applies M⁻¹."""

    init: Callable[[PyTree], Any]
    update: Callable[..., tuple[operators.Operator, Any]]
    needs_key: bool = False  # whether `update` draws random numbers (then it needs ``key=``)
    # Whether a state `update` returned is finite (else the optimiser rejects the step and keeps
    # the old state). The default scans the whole state. Not read for a preconditioner with
    # `operator`, whose `update` runs after the verdict and drops what is not finite itself.
    finite: Callable[[Any], jax.Array] = _tree.all_finite
    # `operator(state, params, batch, *, apply_fn, loss, damping, key) -> M` from the state as it
    # is; when given, ``update(..., accepted=)`` runs after the verdict (see above).
    operator: Callable[..., operators.Operator] | None = None


def _sum_over_examples(per_example: Callable, params: PyTree, batch) -> PyTree:
    """(1/B) Σ_i per_example(x_i, y_i) for a params-shaped per_example, by `lax.scan`.

    The examples are split into `jax.device_count()` contiguous chunks (1 chunk if that does not
    divide B), scanned side by side under `vmap`: with the batch sharded over a mesh, each device
    scans its own examples and nothing gathers the batch.
    """
    inputs, targets = batch
    batch_size = jnp.shape(targets)[0]
    chunks = math.gcd(batch_size, jax.device_count())

    def add_example(acc, example):
        return jax.tree.map(jnp.add, acc, per_example(*example)), None

    def scan_chunk(examples):
        total, _ = jax.lax.scan(add_example, _tree.zeros_like(params), examples)
        return total

    split = jax.tree.map(
        lambda a: a.reshape(chunks, a.shape[0] // chunks, *a.shape[1:]), (inputs, targets)
    )
    totals = jax.vmap(scan_chunk)(split)
    return jax.tree.map(lambda s: jnp.sum(s, axis=0) / batch_size, totals)


def _one(x):
    return jax.tree.map(lambda a: a[None], x)


def empirical_fisher_diagonal(apply_fn: Callable, loss, params: PyTree, batch) -> PyTree:
    """(1/B) Σ_i g_i ⊙ g_i from per-example gradients g_i, shaped like params.

    When every parameter sits in a dense, conv2d or scale-and-shift layer the model declares
    (`natgrad.layers`), one backward pass gives the sum (`natgrad.per_example`): on CPU about
    1 gradient for an MLP 784-128-10 at batch 128. Otherwise `looped_empirical_fisher_diagonal`.
    """
    sums = per_example.squared_gradient_sum(apply_fn, loss, params, batch)
    if sums is not None:
        batch_size = jnp.shape(batch[1])[0]
        return jax.tree.map(lambda s: s / batch_size, sums)
    return looped_empirical_fisher_diagonal(apply_fn, loss, params, batch)


def looped_empirical_fisher_diagonal(apply_fn: Callable, loss, params: PyTree, batch) -> PyTree:
    """`empirical_fisher_diagonal` by a `lax.scan` over the examples, for any model.

    No B × n array of per-example gradients is ever held. On CPU this costs about 3–4 gradients
    for an MLP 784-128-10 at batch 128, where `vmap(grad)` costs about 90 (XLA runs its batched
    outer products slowly).
    """

    def squared_gradient(x, y):
        g = jax.grad(lambda p: loss.nll(apply_fn(p, _one(x)), y[None])[0])(params)
        return jax.tree.map(jnp.square, g)

    return _sum_over_examples(squared_gradient, params, batch)


def ggn_diagonal(apply_fn: Callable, loss, params: PyTree, batch) -> PyTree:
    """diag(G) = (1/B) Σ_i Σ_k (J_iᵀ q_ik)², exactly, shaped like params.

    q_ik are the columns of the output curvature's square root (`Loss.curvature_sqrt`): one
    backward pass per output per example.
    """

    def squared_columns(x, y):
        del y  # H_z of natgrad's losses does not depend on the targets
        outputs, vjp_fn = jax.vjp(lambda p: apply_fn(p, _one(x)), params)
        columns = jax.vmap(vjp_fn)(loss.curvature_sqrt(outputs))[0]
        return jax.tree.map(lambda c: jnp.sum(jnp.square(c), axis=0), columns)

    return _sum_over_examples(squared_columns, params, batch)


def hutchinson_estimate(op: operators.Operator, key: jax.Array, num_probes: int) -> PyTree:
    """(1/S) Σ_s v_s ⊙ (op v_s) for S Rademacher probes v_s: an unbiased estimate of diag(op)."""
    leaves, treedef = jax.tree.flatten(op.params)

    def probe(k):
        keys = _random.split(k, len(leaves))
        signs = [
            _random.rademacher(kk, a.shape, a.dtype) for kk, a in zip(keys, leaves, strict=True)
        ]
        v = jax.tree.unflatten(treedef, signs)
        return jax.tree.map(jnp.multiply, v, op.mv(v))

    products = jax.vmap(probe)(_random.split(key, num_probes))
    return jax.tree.map(lambda p: jnp.mean(p, axis=0), products)


def _check_alpha(alpha) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not alpha >= 0:
        raise ValueError(f"alpha: expected an exponent >= 0, got {alpha!r}")
    return float(alpha)


def _damped_diagonal(diag: PyTree, damping, alpha: float) -> operators.Operator:
    """M = diag((max(d, 0) + λ)^α), whose inverse divides by it."""
    scale = jax.tree.map(lambda d: _power(jnp.maximum(d, 0) + damping, alpha), diag)
    return operators.diagonal(scale)


def _power(x: jax.Array, alpha: float) -> jax.Array:
    """x^α for x ≥ 0, by square roots for α = 1/4, 1/2, 3/4 (Martens'): on CPU `jnp.power`
    costs 8× as much (673 µs against 82 µs for x^¾ of 101,770 floats, one core; the same
    values to 2.4e-7)."""
    if alpha == 1:
        return x
    if alpha == 0.5:
        return jnp.sqrt(x)
    if alpha == 0.25:
        return jnp.sqrt(jnp.sqrt(x))
    if alpha == 0.75:
        root = jnp.sqrt(x)
        return root * jnp.sqrt(root)
    return jnp.power(x, alpha)


def martens_diagonal(alpha: float = MARTENS_ALPHA) -> Preconditioner:
    """M = (diag(empirical Fisher) + λ)^α, recomputed on every step's batch (stateless)."""
    return _batch_diagonal(empirical_fisher_diagonal, _check_alpha(alpha))


def _stateless(params):
    del params
    return ()


def exact_diagonal(alpha: float = 1.0) -> Preconditioner:
    """M = (diag(GGN) + λ)^α, the exact GGN diagonal of every step's batch (stateless)."""
    return _batch_diagonal(ggn_diagonal, _check_alpha(alpha))


def _batch_diagonal(diagonal: Callable, alpha: float) -> Preconditioner:
    """M = (diagonal(apply_fn, loss, params, batch) + λ)^α, recomputed on every step's batch."""

    def update(state, params, batch, *, apply_fn, loss, damping, key=None):
        del key
        return _damped_diagonal(diagonal(apply_fn, loss, params, batch), damping, alpha), state

    return Preconditioner(_stateless, update)


def hutchinson_diagonal(
    num_probes: int = 10, alpha: float = 1.0, ema_decay: float = 0.95
) -> Preconditioner:
    """M = (max(d̄, 0) + λ)^α, d̄ a moving average of Hutchinson estimates of diag(GGN).

    Each update draws `num_probes` Rademacher probes; the average over steps (decay
    `ema_decay`, the first estimate taken as it is; 0 keeps only the current one) adds up the
    probes of many steps, since a few probes give a noisy diagonal and a noisy diagonal a poor
    preconditioner. `update` needs ``key=`` (the optimisers pass a split of theirs).
    """
    if isinstance(num_probes, bool) or not isinstance(num_probes, int) or num_probes < 1:
        raise ValueError(f"num_probes: expected an integer >= 1, got {num_probes!r}")
    alpha = _check_alpha(alpha)
    if isinstance(ema_decay, bool) or not isinstance(ema_decay, int | float):
        raise ValueError(f"ema_decay: expected a number in [0, 1), got {ema_decay!r}")
    if not 0 <= ema_decay < 1:
        raise ValueError(f"ema_decay: expected a number in [0, 1), got {ema_decay!r}")

    def init(params):
        return jnp.zeros((), jnp.int32), _tree.zeros_like(params)

    def update(state, params, batch, *, apply_fn, loss, damping, key=None):
        if key is None:
            raise ValueError("key: hutchinson_diagonal draws random probes and needs a PRNG key")
        count, average = state
        estimate = hutchinson_estimate(
            curvature_lib.ggn(apply_fn, loss, params, batch), key, num_probes
        )
        average = _tree.moving_average(average, estimate, ema_decay, count)
        return _damped_diagonal(average, damping, alpha), (count + 1, average)

    return Preconditioner(init, update, needs_key=True)


_FISHER_TYPES = {"sampled": "fisher_mc", "exact": "fisher", "empirical": "empirical_fisher"}


def kfac_curvature(curvature, fisher_type) -> curvature_lib.Curvature:
    """K-FAC's curvature from `curvature`, or from the deprecated `fisher_type` name."""
    if fisher_type is not None:
        if fisher_type not in _FISHER_TYPES:
            raise ValueError(
                f"fisher_type: expected one of {tuple(_FISHER_TYPES)} (deprecated: use "
                f"curvature=), got {fisher_type!r}"
            )
        warnings.warn(
            f"fisher_type={fisher_type!r} is deprecated; use "
            f"curvature={_FISHER_TYPES[fisher_type]!r}",
            DeprecationWarning,
            stacklevel=3,
        )
        curvature = _FISHER_TYPES[fisher_type]
    kind = curvature_lib.resolve(curvature)
    if not kind.psd:
        raise ValueError(
            f"curvature: K-FAC needs a Gauss-Newton-type curvature (fisher_mc, fisher, ggn, "
            f"empirical_fisher), got {kind.name!r}"
        )
    return kind


def _warn_unregistered() -> None:
    # At trace time, so once per compilation (and Python shows a warning once per place).
    warnings.warn(
        "natgrad K-FAC: the model declared no layer with natgrad.layers.dense or conv2d, so "
        "every parameter gets a diagonal block (a diagonal preconditioner, not K-FAC); compute "
        "dense layers with natgrad.layers.dense(params, x) and convolutions with "
        "natgrad.layers.conv2d(params, x) to get Kronecker blocks "
        "(state.preconditioner_state.registered_layers counts them)",
        UserWarning,
        stacklevel=2,
    )


def kfac(
    *,
    curvature: str | curvature_lib.Curvature = "fisher_mc",
    ema_decay: float = 0.95,
    inverse_every: int = 50,
    statistics_every: int = 5,
    fisher_type: str | None = None,
    weight_sharing: str = "expand",
    eigenvalue_correction: bool = False,
    input_factor_rank: int | str | None = None,
    output_factor_rank: int | str | None = None,
) -> Preconditioner:
    """K-FAC's block-diagonal approximation of C + λI, inverted (see `natgrad.kronecker`).

    The state (a `natgrad.kronecker.KroneckerState`) holds the factors' moving averages
    (decay `ema_decay`) and the inverses of the factored-Tikhonov-damped factors. Both are
    amortised over steps (kfac-jax's curvature and inverse update periods): the statistics —
    one instrumented forward and backward pass — are taken every `statistics_every` updates,
    the inverses recomputed every `inverse_every` updates with that update's λ, and as soon as
    λ has moved by more than a factor 2 since (a damping rule's change). `curvature`
    chooses the cotangents of the statistics' backward pass (default ``"fisher_mc"``: targets
    sampled from the model, the true Fisher); `update` needs ``key=`` unless
    ``curvature="empirical_fisher"``. (`fisher_type` is the deprecated name of the same choice.)
    It gives `operator` (see the module docstring): an optimiser takes its step with M from the
    statistics so far and folds the step's own statistics in afterwards, if the step was
    accepted; so the first step has none, and M is the identity there (`kronecker.operator`).
    Non-finite statistics or inverses are dropped, the previous ones kept.

    `weight_sharing` is how layers whose weights act at several positions per example (dense
    layers over sequence/spatial axes, convolutions) get their factors (Eschenhagen et al.,
    NeurIPS 2023; `natgrad.blocks.sharing`): ``"expand"`` (default) treats every position as an
    example — exact when the loss is a sum over positions (per-token language modelling,
    per-pixel losses), and for convolutions the KFC factors of Grosse & Martens (2016) that
    kfac-jax also uses; ``"reduce"`` pools the positions first — exact when they are pooled
    before the loss (a classifier's global average pool), and cheaper (B rows instead of B·S).
    Layers on plain vectors get the same factors either way. The default is expand because it
    is the established K-FAC for convolutions and sequence models, and it stays exact for any
    per-position loss, while reduce is the opt-in saving for pooled architectures.

    ``eigenvalue_correction=True`` is EKFAC (George et al. 2018; `natgrad.ekfac`): for dense and
    convolution layers, the eigenbasis Q_A ⊗ Q_G of the factors (eigh at every refresh) with the
    per-coordinate second moments of the per-example gradients re-estimated in it at every
    statistics step (a moving average like the factors'), damped as s + λ (plain Tikhonov, no
    π); weight-shared layers sum a example's positions before squaring, whatever
    `weight_sharing` made of the basis. Embeddings keep their K-FAC blocks (a diagonal A has
    the identity as eigenbasis already) and scale-and-shift layers their exact diagonal.

    ``input_factor_rank=k`` inverts every input factor A wider than 2k as rank k plus a scaled
    identity (`natgrad.low_rank`: its top k eigenpairs, the rest replaced by their mean), so
    applying it costs ~2k/n of the exact inverse's n² per column: for a 785-pixel input and
    k = 32, 12× less. Such a factor is never formed: the state keeps its sketch [A Ω | diag A]
    (Ω a fixed n × 2k Gaussian matrix), whose statistics cost 2·2k/n of Σ ā āᵀ's, and a
    refresh takes the eigenpairs from it by the Nyström approximation. Not with
    `eigenvalue_correction`.
    ``input_factor_rank="auto"`` (`natgrad.kfac`'s default) is rank 32 for input factors at
    least 256 wide only (`natgrad.low_rank.resolve`), and exact with `eigenvalue_correction`.
    `output_factor_rank` is the same for the output factors G (kept as [G Ω | diag G]): a
    512-unit hidden layer's G at rank 32 costs 1/8 of the exact G⁻¹'s n² per row of V. An
    embedding's factors stay whole (it fills its own statistics).
    """
    kind = kfac_curvature(curvature, fisher_type)
    weight_sharing = sharing.check(weight_sharing)
    if not isinstance(eigenvalue_correction, bool):
        raise ValueError(
            f"eigenvalue_correction: expected True or False, got {eigenvalue_correction!r}"
        )
    ema_decay, inverse_every, statistics_every = kronecker.check_options(
        ema_decay, inverse_every, statistics_every, input_factor_rank, output_factor_rank
    )
    if eigenvalue_correction:
        ranks = {"input_factor_rank": input_factor_rank, "output_factor_rank": output_factor_rank}
        for name, rank in ranks.items():
            if rank is not None and rank != "auto":
                raise ValueError(
                    f"{name}: not with eigenvalue_correction=True (EKFAC keeps the full "
                    "eigenbasis of every factor)"
                )
        input_factor_rank = output_factor_rank = None

    def statistics(state, params, batch, apply_fn, loss, key):
        return kronecker.statistics(
            apply_fn,
            loss,
            params,
            batch,
            key=key,
            curvature=kind,
            weight_sharing=weight_sharing,
            eigenbasis=state.eigenbasis,
            sketches=kronecker.sketches(state),
        )

    def operator(state, params, batch, *, apply_fn, loss, damping, key=None):
        # Which layers are registered is known from a trace of the statistics pass alone.
        seen = {}

        def trace():
            stats, seen["registered"], _ = statistics(state, params, batch, apply_fn, loss, key)
            return stats

        jax.eval_shape(trace)
        return kronecker.operator(state, damping, seen["registered"], params)

    def update(state, params, batch, *, apply_fn, loss, damping, key=None, accepted=True):
        # Every `inverse_every` updates, and whenever λ moved by more than × 2 since the last
        # inversion (a damping rule such as Levenberg-Marquardt): the inverses contain λ.
        # After a rejected step (`accepted` False) nothing changes: the conditionals below skip,
        # and their skipping branches pass the arrays through, which XLA does without a copy.
        refresh = ((state.steps % inverse_every == 0) | kronecker.stale(state, damping)) & accepted
        seen = {}

        def with_statistics(refresh):
            stats, registered, _ = statistics(state, params, batch, apply_fn, loss, key)
            seen["registered"] = registered
            if not any(registered):
                _warn_unregistered()
            return kronecker.update(
                state, stats, damping, registered, ema_decay=ema_decay, refresh=refresh
            )

        if statistics_every == 1:
            new = jax.lax.cond(accepted, lambda: with_statistics(refresh), lambda: state)
        else:
            # Statistics on every `statistics_every`-th step, then the inverses when due: two
            # conditionals in a row, so the inversion is compiled once, not once per branch.
            folded = jax.lax.cond(
                (state.steps % statistics_every == 0) & accepted,
                lambda: with_statistics(False),
                lambda: state._replace(finite=jnp.asarray(True)),
            )
            new = kronecker.refresh_inverses(folded, damping, seen["registered"], refresh)
            new = new._replace(finite=folded.finite & new.finite)
        new = new._replace(steps=state.steps + jnp.asarray(accepted, state.steps.dtype))
        m = kronecker.operator(new, damping, seen["registered"], params)
        return m, new

    def init(params):
        return kronecker.init(
            params,
            eigenvalue_correction=eigenvalue_correction,
            input_factor_rank=input_factor_rank,
            output_factor_rank=output_factor_rank,
        )

    return Preconditioner(
        init, update, needs_key=kind.name != "empirical_fisher", operator=operator
    )
