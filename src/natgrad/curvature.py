r"""Curvature operators over parameter pytrees, matrix-free.

For a batch of B examples with outputs z_i = f(θ, x_i), Jacobians J_i = ∂z_i/∂θ and the mean loss
L(θ) = (1/B) Σ_i ℓ(z_i, y_i), every operator below is an n×n symmetric matrix that is never formed:

=====================  ==================================================  =====================
factory                matrix                                              output-space factor
=====================  ==================================================  =====================
``ggn``                (1/B) Σ_i J_iᵀ H_i J_i,  H_i = ∂²ℓ/∂z²(z_i, y_i)    loss.hessian_vp
``fisher``             (1/B) Σ_i J_iᵀ E_{y~p(·|z_i)}[s sᵀ] J_i              loss.fisher_vp
``fisher_mc``          (1/B) Σ_i J_iᵀ (1/S) Σ_s s̃_is s̃_isᵀ J_i,  ỹ ~ model    sampled scores
``empirical_fisher``   (1/B) Σ_i g_i g_iᵀ = (1/B) Σ_i J_iᵀ r_i r_iᵀ J_i      r_i = s(z_i, y_i)
``hessian``            ∇²L(θ)                                              (forward over reverse)
=====================  ==================================================  =====================

The model is linearized once per operator, when the factory runs: ``jax.linearize`` gives the
outputs z and v ↦ Jv, and ``jax.linear_transpose`` of that map gives u ↦ Jᵀu, so a product
``.mv(v)`` is one Jacobian-vector product, a cheap output-space product and one vector-Jacobian
product; no forward pass is repeated.

The empirical Fisher is built from per-example gradients g_i = J_iᵀ r_i: its product
(1/B) Σ_i g_i (g_iᵀ v) = (1/B) Jᵀ[r ⊙ (rᵀ Jv)] needs no per-example gradient in memory. It is not
ḡḡᵀ of the mean gradient ḡ = (1/B) Σ_i g_i, a rank-1 matrix (see ``tests/test_curvature.py``).

Damping composes: ``damped(op, λ)`` (or ``op + λ * identity(params)``) is the operator C + λI.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from natgrad import _random
from natgrad.losses import Loss
from natgrad.operators import Operator, damped, identity

__all__ = [
    "Operator",
    "CurvatureOperator",
    "identity",
    "damped",
    "ggn",
    "fisher",
    "fisher_mc",
    "empirical_fisher",
    "hessian",
    "CURVATURES",
    "Curvature",
    "resolve",
    "make",
    "check_batch",
]

PyTree = Any
Batch = tuple[Any, Any]

CURVATURES = ("fisher", "fisher_mc", "empirical_fisher", "ggn", "hessian")


class CurvatureOperator(Operator):
    """A curvature matrix of the mean loss at `params` on one batch.

    Besides `.mv` it keeps what the linearization already computed: `outputs` (the model's
    outputs on the batch), `loss_value` (the mean loss) and `gradient()` (Jᵀ∇_z L, one vjp).
    """

    def __init__(
        self, mv, params, *, outputs=None, loss_value=None, gradient=None, psd=True, inverse=None
    ):
        super().__init__(mv, params, psd=psd, inverse=inverse)
        self.outputs = outputs
        self.loss_value = loss_value
        self._gradient = gradient

    def gradient(self) -> PyTree:
        """∇L(θ) from the stored linearization (no second forward pass)."""
        if self._gradient is None:
            raise ValueError("gradient: this operator was not built from a linearization")
        return self._gradient()


class _Linearization:
    """z = f(θ, x) with v ↦ Jv and u ↦ Jᵀu, from a single `jax.linearize`."""

    def __init__(self, apply_fn, params, inputs):
        def model(p):
            return apply_fn(p, inputs)

        self.outputs, self.jvp = jax.linearize(model, params)
        transpose = jax.linear_transpose(self.jvp, params)
        self.vjp = lambda u: transpose(u)[0]


def check_batch(batch: Batch) -> tuple[Any, Any]:
    if not isinstance(batch, tuple | list) or len(batch) != 2:
        raise ValueError(f"batch: expected a pair (inputs, targets), got {type(batch).__name__}")
    inputs, targets = batch
    lead_in = {jnp.shape(x)[0] for x in jax.tree.leaves(inputs) if jnp.ndim(x) > 0}
    lead_t = jnp.shape(targets)[0] if jnp.ndim(targets) > 0 else None
    if len(lead_in) > 1 or (lead_t is not None and lead_in and lead_t not in lead_in):
        raise ValueError(
            f"batch: inputs and targets must share the batch (first) dimension, got inputs "
            f"{sorted(lead_in)} and targets {lead_t}"
        )
    return inputs, targets


def _linearize(apply_fn, loss: Loss, params, batch):
    inputs, targets = check_batch(batch)
    lin = _Linearization(apply_fn, params, inputs)
    loss.validate(lin.outputs, targets)
    return lin, targets


def _output_space_operator(lin, loss, params, targets, output_mv) -> CurvatureOperator:
    """Jᵀ M J / B for an output-space product u ↦ M u given per example."""
    batch_size = lin.outputs.shape[0]

    def mv(v):
        jv = lin.jvp(v)
        return lin.vjp(output_mv(jv) / batch_size)

    def gradient():
        return lin.vjp(loss.score(lin.outputs, targets) / batch_size)

    return CurvatureOperator(
        mv,
        params,
        outputs=lin.outputs,
        loss_value=loss.mean(lin.outputs, targets),
        gradient=gradient,
    )


def _outer_mv(scores: jax.Array):
    """u ↦ mean_s s_s (s_sᵀ u) per example, for scores of shape (S, B, ...)."""

    def output_mv(u):
        axes = tuple(range(2, scores.ndim))
        coeff = jnp.sum(scores * u[None], axis=axes, keepdims=True)
        return jnp.mean(scores * coeff, axis=0)

    return output_mv


def ggn(apply_fn: Callable, loss: Loss, params: PyTree, batch: Batch) -> CurvatureOperator:
    """Generalised Gauss-Newton (1/B) Σ_i J_iᵀ H_i J_i, H_i the loss Hessian in the outputs."""
    lin, targets = _linearize(apply_fn, loss, params, batch)
    return _output_space_operator(
        lin, loss, params, targets, lambda u: loss.hessian_vp(lin.outputs, targets, u)
    )


def fisher(apply_fn: Callable, loss: Loss, params: PyTree, batch: Batch) -> CurvatureOperator:
    """Exact Fisher (1/B) Σ_i J_iᵀ E_{y~p(·|z_i)}[s sᵀ] J_i of the model's output distribution.

    The expectation over y is exact (``loss.fisher_vp``); the targets in `batch` are used only
    for `loss_value` and `gradient()`.
    """
    lin, targets = _linearize(apply_fn, loss, params, batch)
    return _output_space_operator(
        lin, loss, params, targets, lambda u: loss.fisher_vp(lin.outputs, u)
    )


def fisher_mc(
    apply_fn: Callable,
    loss: Loss,
    params: PyTree,
    batch: Batch,
    *,
    key: jax.Array,
    num_samples: int = 1,
) -> CurvatureOperator:
    """Monte-Carlo Fisher: targets ỹ ~ p(·|z) sampled from the model with `key`.

    (1/B) Σ_i J_iᵀ [(1/S) Σ_s s̃_is s̃_isᵀ] J_i with s̃_is = ∇_z ℓ(z_i, ỹ_is). An unbiased estimate
    of `fisher`; the samples are drawn once, so every `.mv` uses the same ones.
    """
    if key is None:
        raise ValueError("key: fisher_mc samples targets from the model and needs a PRNG key")
    if int(num_samples) < 1:
        raise ValueError(f"num_samples: expected an integer >= 1, got {num_samples}")
    lin, targets = _linearize(apply_fn, loss, params, batch)
    scores = _sampled_scores(loss, lin.outputs, key, int(num_samples))
    return _output_space_operator(lin, loss, params, targets, _outer_mv(scores))


def _sampled_scores(loss: Loss, outputs, key: jax.Array, num_samples: int) -> jax.Array:
    """Scores s̃_s = ∇_z ℓ(z, ỹ_s) of `num_samples` targets ỹ_s ~ p(·|z), stacked: (S, B, ...).

    One sample (the default) is drawn from `key` itself, without a split (each derivation of a
    key is one more threefry hash for XLA to compile) and without `jax.vmap` (a vmapped draw
    compiled to loops over the key on XLA's CPU backend).
    """
    if num_samples == 1:
        return loss.score(outputs, loss.sample(key, outputs))[None]
    keys = _random.split(key, num_samples)
    sampled = jax.vmap(lambda k: loss.sample(k, outputs))(keys)
    return jax.vmap(lambda t: loss.score(outputs, t))(sampled)


def empirical_fisher(
    apply_fn: Callable, loss: Loss, params: PyTree, batch: Batch
) -> CurvatureOperator:
    """Empirical Fisher (1/B) Σ_i g_i g_iᵀ from per-example gradients g_i = J_iᵀ ∇_z ℓ(z_i, y_i)."""
    lin, targets = _linearize(apply_fn, loss, params, batch)
    scores = loss.score(lin.outputs, targets)[None]
    return _output_space_operator(lin, loss, params, targets, _outer_mv(scores))


def hessian(apply_fn: Callable, loss: Loss, params: PyTree, batch: Batch) -> CurvatureOperator:
    """The Hessian ∇²L(θ) of the mean loss: forward-over-reverse, linearized once."""
    inputs, targets = check_batch(batch)
    loss.validate(jax.eval_shape(apply_fn, params, inputs), targets)

    def grad_with_aux(p):
        def mean_loss(q):
            outputs = apply_fn(q, inputs)
            return loss.mean(outputs, targets), outputs

        (value, outputs), grad = jax.value_and_grad(mean_loss, has_aux=True)(p)
        return grad, (value, outputs)

    grad, mv, (value, outputs) = jax.linearize(grad_with_aux, params, has_aux=True)

    return CurvatureOperator(
        mv, params, outputs=outputs, loss_value=value, gradient=lambda: grad, psd=False
    )


def make(
    name: str,
    apply_fn: Callable,
    loss: Loss,
    params: PyTree,
    batch: Batch,
    *,
    key: jax.Array | None = None,
    num_samples: int = 1,
) -> CurvatureOperator:
    """The curvature operator called `name` (one of `CURVATURES`)."""
    return resolve(name, num_samples=num_samples).operator(apply_fn, loss, params, batch, key=key)


@dataclasses.dataclass(frozen=True)
class Curvature:
    """A kind of curvature as an object: which matrix an optimiser uses, built anew each step.

    `name` is one of `CURVATURES`; `num_samples` the sampled targets per example of
    ``"fisher_mc"``. The object knows how to build its matrix-free operator on a batch
    (`operator`) and, for the Gauss-Newton-type curvatures, the output-space factor that
    Kronecker and diagonal estimates sample (`output_factor`):

        C = (1/B) Σ_i J_iᵀ M_i J_i,   M_i = E[Σ_k c_ik c_ikᵀ]

    with columns c_ik: the square root of H_z (K columns, exact) for ``"fisher"`` and ``"ggn"``
    (equal for natgrad's losses), the scores ∇_z ℓ(z_i, ỹ_is)/√S of S targets sampled from the
    model for ``"fisher_mc"``, the score at the true target for ``"empirical_fisher"``.
    """

    name: str
    num_samples: int = 1

    def __post_init__(self):
        if self.name not in CURVATURES:
            raise ValueError(f"curvature: expected one of {CURVATURES}, got {self.name!r}")
        n = self.num_samples
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"num_samples: expected an integer >= 1, got {n!r}")

    @property
    def needs_key(self) -> bool:
        """Whether building it draws random targets (then the optimiser needs ``key=``)."""
        return self.name == "fisher_mc"

    @property
    def psd(self) -> bool:
        return self.name != "hessian"

    def operator(
        self, apply_fn: Callable, loss: Loss, params: PyTree, batch: Batch, *, key=None
    ) -> CurvatureOperator:
        """The matrix-free operator of this curvature of the mean loss on `batch`."""
        if self.name == "fisher_mc":
            return fisher_mc(apply_fn, loss, params, batch, key=key, num_samples=self.num_samples)
        factories = {"fisher": fisher, "empirical_fisher": empirical_fisher, "ggn": ggn}
        return factories.get(self.name, hessian)(apply_fn, loss, params, batch)

    def output_factor(self, loss: Loss, outputs, targets, key) -> jax.Array:
        """Columns c of shape (K, B, ...) with Σ_k c_k c_kᵀ (per example) of expectation M_i."""
        if self.name in ("fisher", "ggn"):
            return loss.curvature_sqrt(outputs)
        if self.name == "empirical_fisher":
            return loss.score(outputs, targets)[None]
        if self.name == "fisher_mc":
            if key is None:
                raise ValueError("key: curvature 'fisher_mc' samples targets and needs a PRNG key")
            scores = _sampled_scores(loss, outputs, key, self.num_samples)
            return scores / jnp.sqrt(jnp.asarray(self.num_samples, scores.dtype))
        raise ValueError(
            "curvature: 'hessian' is not a Gauss-Newton-type matrix and has no output-space "
            "factor; use 'ggn', 'fisher', 'fisher_mc' or 'empirical_fisher'"
        )


def resolve(curvature: str | Curvature, *, num_samples: int = 1) -> Curvature:
    """A `Curvature` from its name (a convenience) or the object itself."""
    if isinstance(curvature, Curvature):
        return curvature
    if not isinstance(curvature, str):
        raise ValueError(
            f"curvature: expected one of {CURVATURES} or a natgrad.curvature.Curvature, "
            f"got {type(curvature).__name__}"
        )
    return Curvature(curvature, num_samples)
