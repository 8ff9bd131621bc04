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

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from natgrad import _tree
from natgrad.losses import Loss

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
    "make",
]

PyTree = Any
Batch = tuple[Any, Any]

CURVATURES = ("fisher", "fisher_mc", "empirical_fisher", "ggn", "hessian")


class Operator:
    """A symmetric linear map on pytrees shaped like `params`: `.mv(v)` and `.to_dense()`.

    Operators add (`a + b`), scale (`2.0 * a`) and so compose; `damped(op, λ)` is op + λI.
    """

    def __init__(self, mv: Callable[[PyTree], PyTree], params: PyTree):
        self._mv = mv
        self.params = params

    def mv(self, v: PyTree) -> PyTree:
        """The product of the operator with `v` (a pytree shaped like params)."""
        return self._mv(v)

    __call__ = mv

    def to_dense(self) -> jax.Array:
        """The n×n matrix, columns in `jax.flatten_util.ravel_pytree(params)` order.

        Costs n products: for small models and tests.
        """
        flat, unravel = ravel_pytree(self.params)

        def column(e):
            return ravel_pytree(self.mv(unravel(e)))[0]

        return jax.vmap(column)(jnp.eye(flat.size, dtype=flat.dtype)).T

    def __add__(self, other: Operator) -> Operator:
        if not isinstance(other, Operator):
            return NotImplemented
        return Operator(lambda v: _tree.add(self.mv(v), other.mv(v)), self.params)

    def __mul__(self, alpha) -> Operator:
        if isinstance(alpha, Operator):
            return NotImplemented
        return Operator(lambda v: _tree.scale(alpha, self.mv(v)), self.params)

    __rmul__ = __mul__


class CurvatureOperator(Operator):
    """A curvature matrix of the mean loss at `params` on one batch.

    Besides `.mv` it keeps what the linearization already computed: `outputs` (the model's
    outputs on the batch), `loss_value` (the mean loss) and `gradient()` (Jᵀ∇_z L, one vjp).
    """

    def __init__(self, mv, params, *, outputs=None, loss_value=None, gradient=None):
        super().__init__(mv, params)
        self.outputs = outputs
        self.loss_value = loss_value
        self._gradient = gradient

    def gradient(self) -> PyTree:
        """∇L(θ) from the stored linearization (no second forward pass)."""
        if self._gradient is None:
            raise ValueError("gradient: this operator was not built from a linearization")
        return self._gradient()


def identity(params: PyTree) -> Operator:
    """The identity on pytrees shaped like `params`."""
    return Operator(lambda v: v, params)


def damped(op: Operator, damping) -> Operator:
    """op + damping · I (Tikhonov damping); `damping` may be a traced scalar."""
    return op + damping * identity(op.params)


class _Linearization:
    """z = f(θ, x) with v ↦ Jv and u ↦ Jᵀu, from a single `jax.linearize`."""

    def __init__(self, apply_fn, params, inputs):
        def model(p):
            return apply_fn(p, inputs)

        self.outputs, self.jvp = jax.linearize(model, params)
        transpose = jax.linear_transpose(self.jvp, params)
        self.vjp = lambda u: transpose(u)[0]


def _check_batch(batch: Batch) -> tuple[Any, Any]:
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
    inputs, targets = _check_batch(batch)
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
    keys = jax.random.split(key, int(num_samples))
    sampled = jax.vmap(lambda k: loss.sample(k, lin.outputs))(keys)
    scores = jax.vmap(lambda t: loss.score(lin.outputs, t))(sampled)
    return _output_space_operator(lin, loss, params, targets, _outer_mv(scores))


def empirical_fisher(
    apply_fn: Callable, loss: Loss, params: PyTree, batch: Batch
) -> CurvatureOperator:
    """Empirical Fisher (1/B) Σ_i g_i g_iᵀ from per-example gradients g_i = J_iᵀ ∇_z ℓ(z_i, y_i)."""
    lin, targets = _linearize(apply_fn, loss, params, batch)
    scores = loss.score(lin.outputs, targets)[None]
    return _output_space_operator(lin, loss, params, targets, _outer_mv(scores))


def hessian(apply_fn: Callable, loss: Loss, params: PyTree, batch: Batch) -> CurvatureOperator:
    """The Hessian ∇²L(θ) of the mean loss: forward-over-reverse, linearized once."""
    inputs, targets = _check_batch(batch)
    loss.validate(jax.eval_shape(apply_fn, params, inputs), targets)

    def grad_with_aux(p):
        def mean_loss(q):
            outputs = apply_fn(q, inputs)
            return loss.mean(outputs, targets), outputs

        (value, outputs), grad = jax.value_and_grad(mean_loss, has_aux=True)(p)
        return grad, (value, outputs)

    grad, mv, (value, outputs) = jax.linearize(grad_with_aux, params, has_aux=True)

    return CurvatureOperator(mv, params, outputs=outputs, loss_value=value, gradient=lambda: grad)


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
    if name == "fisher_mc":
        return fisher_mc(apply_fn, loss, params, batch, key=key, num_samples=num_samples)
    factories = {
        "fisher": fisher,
        "empirical_fisher": empirical_fisher,
        "ggn": ggn,
        "hessian": hessian,
    }
    if name not in factories:
        raise ValueError(f"curvature: expected one of {CURVATURES}, got {name!r}")
    return factories[name](apply_fn, loss, params, batch)
