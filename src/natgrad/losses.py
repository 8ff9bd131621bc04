r"""Losses as output distributions.

natgrad declares the loss instead of discovering it by tracing. A loss is the negative
log-likelihood of a distribution p(y | z) whose natural parameters z are the model's outputs:

* ``softmax_cross_entropy()``: y ~ Categorical(softmax(z)); nll = logsumexp(z) − z_y;
  H_z = diag(p) − ppᵀ.
* ``squared_error()``: y ~ Normal(z, I); nll = ½‖z − y‖²; H_z = I.
* ``sigmoid_cross_entropy()``: y_k ~ Bernoulli(sigmoid(z_k)) independently;
  nll = Σ_k softplus(z_k) − y_k z_k; H_z = diag(p(1 − p)).

All three are exponential families in their natural parameters, so the Hessian of the nll in z
equals the Fisher of p(y | z), E_y[s sᵀ] with the score s = ∇_z nll(z, y). This is why the
Fisher of the model equals its Gauss-Newton matrix Jᵀ H_z J. natgrad computes the two
differently (``hessian_vp`` is the closed-form Hessian, ``fisher_vp`` the explicit expectation
over y), and the tests check that they agree.

``kl(outputs_p, outputs_q)`` is KL(p(·|z_p) ‖ p(·|z_q)). For an exponential family with
log-partition A it is the Bregman divergence of A, KL = A(z_q) − A(z_p) − (z_q − z_p)ᵀ∇A(z_p),
with A = logsumexp (softmax), A = Σ softplus (sigmoid), A = ½‖z‖² (squared error, giving
½‖z_q − z_p‖²). Its Hessian in z_q at z_q = z_p is ∇²A = H_z: the Fisher again.

Arrays are batch-first: ``outputs`` has shape (B, ...) and the per-example quantities sum over
every axis but the first.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from natgrad import _random

__all__ = [
    "Loss",
    "softmax_cross_entropy",
    "squared_error",
    "sigmoid_cross_entropy",
]


def _sum_per_example(a: jax.Array) -> jax.Array:
    return a.reshape(a.shape[0], -1).sum(axis=1) if a.ndim > 1 else a


def _concrete_or_none(x) -> np.ndarray | None:
    """The value of `x` if it is known at trace time, else None (inside jit)."""
    try:
        return np.asarray(x)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


class Loss:
    """A negative log-likelihood −log p(targets | outputs), evaluated per example.

    Subclasses define `nll`, `sample`, `hessian_vp`, `fisher_vp`, `kl` and `_validate` (and may
    override `curvature_sqrt` with a closed form). The mean over
    the batch, `mean`, is the training loss that every curvature operator differentiates.
    """

    name = "loss"

    def nll(self, outputs: jax.Array, targets: jax.Array) -> jax.Array:
        """Per-example negative log-likelihood, shape (B,)."""
        raise NotImplementedError

    def sample(self, key: jax.Array, outputs: jax.Array) -> jax.Array:
        """Targets drawn from the model's predictive distribution p(y | outputs)."""
        raise NotImplementedError

    def hessian_vp(self, outputs: jax.Array, targets: jax.Array, u: jax.Array) -> jax.Array:
        """H_z u per example, with H_z = ∂²nll/∂z² (closed form)."""
        raise NotImplementedError

    def fisher_vp(self, outputs: jax.Array, u: jax.Array) -> jax.Array:
        """E_{y ~ p(y|z)}[s sᵀ] u per example, the output-space Fisher (explicit expectation)."""
        raise NotImplementedError

    def kl(self, outputs_p: jax.Array, outputs_q: jax.Array) -> jax.Array:
        """KL(p(·|z_p) ‖ p(·|z_q)) per example, shape (B,); see the module docstring."""
        raise NotImplementedError

    def curvature_sqrt(self, outputs: jax.Array) -> jax.Array:
        """Q of shape (K, *outputs.shape) with Σ_k Q_k Q_kᵀ = H_z for every example.

        This generic form builds H_z from `fisher_vp` (K = the per-example output size) and
        takes Q = V diag(√w) from its eigendecomposition; the losses below override it with
        their closed forms for (B, C) outputs.
        """
        batch, shape = outputs.shape[0], outputs.shape[1:]
        k = outputs[0].size
        basis = jnp.eye(k, dtype=outputs.dtype).reshape(k, *shape)
        columns = jax.vmap(lambda e: self.fisher_vp(outputs, jnp.broadcast_to(e, outputs.shape)))(
            basis
        )
        h = jnp.moveaxis(columns.reshape(k, batch, k), 0, -1)  # h[i, :, j] = H_i e_j
        w, v = jnp.linalg.eigh(h)
        q = v * jnp.sqrt(jnp.maximum(w, 0))[:, None, :]  # column j of q[i] is √w_j v_j
        return jnp.moveaxis(q, -1, 0).reshape(k, *outputs.shape)

    def mean(self, outputs: jax.Array, targets: jax.Array) -> jax.Array:
        """The training loss: the batch mean of `nll`."""
        return jnp.mean(self.nll(outputs, targets))

    def score(self, outputs: jax.Array, targets: jax.Array) -> jax.Array:
        """s = ∇_z nll(z, y) per example, shape of `outputs` (the examples are independent)."""
        return jax.grad(lambda z: jnp.sum(self.nll(z, targets)))(outputs)

    def validate(self, outputs: jax.Array, targets: jax.Array) -> None:
        """Raise ValueError naming `targets` when it does not fit `outputs`."""
        if not hasattr(targets, "shape"):
            targets = jnp.asarray(targets)
        if len(outputs.shape) < 1:
            raise ValueError(f"outputs: expected a batch-first array, got a scalar ({self.name})")
        self._validate(outputs, targets)

    def _validate(self, outputs: jax.Array, targets: jax.Array) -> None:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{self.name}()"


class _SoftmaxCrossEntropy(Loss):
    name = "softmax_cross_entropy"

    def nll(self, outputs, targets):
        # A label outside [0, C) gives NaN, under jit too, where indexing would wrap or clip it
        # silently: the optimisers reject a step whose loss is not finite.
        logz = jax.nn.logsumexp(outputs, axis=-1)
        labels = targets.astype(jnp.int32)
        valid = (labels >= 0) & (labels < outputs.shape[-1])
        picked = jnp.take_along_axis(outputs, jnp.where(valid, labels, 0)[..., None], axis=-1)
        return _sum_per_example(jnp.where(valid, logz - picked[..., 0], jnp.nan))

    def sample(self, key, outputs):
        return _random.categorical(key, outputs).astype(jnp.int32)

    def kl(self, outputs_p, outputs_q):
        # A = logsumexp, ∇A = softmax: Σ_c p_c (log p_c − log q_c) in Bregman form.
        p = jax.nn.softmax(outputs_p, axis=-1)
        log_ratio = jax.nn.logsumexp(outputs_q, axis=-1) - jax.nn.logsumexp(outputs_p, axis=-1)
        return _sum_per_example(log_ratio - jnp.sum(p * (outputs_q - outputs_p), axis=-1))

    def hessian_vp(self, outputs, targets, u):
        # (diag(p) − p pᵀ) u = p ⊙ (u − pᵀu)
        p = jax.nn.softmax(outputs, axis=-1)
        return p * (u - jnp.sum(p * u, axis=-1, keepdims=True))

    def curvature_sqrt(self, outputs):
        # q_c = √p_c (e_c − p): Σ_c q_c q_cᵀ = diag(p) − ppᵀ (using Σ_c p_c = 1).
        if outputs.ndim != 2:
            return super().curvature_sqrt(outputs)
        p = jax.nn.softmax(outputs, axis=-1)
        eye = jnp.eye(outputs.shape[1], dtype=outputs.dtype)
        return jnp.sqrt(p).T[:, :, None] * (eye[:, None, :] - p[None])

    def fisher_vp(self, outputs, u):
        # Σ_c p_c s_c (s_cᵀ u) with s_c = p − e_c the score of class c: the expectation written out.
        p = jax.nn.softmax(outputs, axis=-1)
        eye = jnp.eye(p.shape[-1], dtype=p.dtype)
        scores = p[..., None, :] - eye  # [..., c, :] = s_c
        proj = jnp.einsum("...ck,...k->...c", scores, u)
        return jnp.einsum("...c,...c,...ck->...k", p, proj, scores)

    def _validate(self, outputs, targets):
        want = outputs.shape[:-1]
        if targets.shape != want:
            raise ValueError(
                f"targets: expected integer class labels of shape {want} for outputs of shape "
                f"{outputs.shape}, got shape {targets.shape}"
            )
        if not jnp.issubdtype(targets.dtype, jnp.integer):
            raise ValueError(f"targets: expected integer class labels, got dtype {targets.dtype}")
        values = _concrete_or_none(targets)
        num_classes = outputs.shape[-1]
        if values is not None and values.size and (values.min() < 0 or values.max() >= num_classes):
            raise ValueError(
                f"targets: labels must lie in [0, {num_classes - 1}] for {num_classes} outputs, "
                f"got values in [{values.min()}, {values.max()}]"
            )


class _SquaredError(Loss):
    name = "squared_error"

    def nll(self, outputs, targets):
        return _sum_per_example(0.5 * jnp.square(outputs - targets))

    def sample(self, key, outputs):
        return outputs + _random.normal(key, outputs.shape, outputs.dtype)

    def kl(self, outputs_p, outputs_q):
        # KL(N(z_p, I) ‖ N(z_q, I)) = ½‖z_q − z_p‖².
        return _sum_per_example(0.5 * jnp.square(outputs_q - outputs_p))

    def hessian_vp(self, outputs, targets, u):
        return u

    def fisher_vp(self, outputs, u):
        # y − z ~ N(0, I), so E[s sᵀ] = Cov(y) = I.
        return u

    def curvature_sqrt(self, outputs):
        # H_z = I: q_c = e_c.
        if outputs.ndim != 2:
            return super().curvature_sqrt(outputs)
        batch, c = outputs.shape
        eye = jnp.eye(c, dtype=outputs.dtype)
        return jnp.broadcast_to(eye[:, None, :], (c, batch, c))

    def _validate(self, outputs, targets):
        if targets.shape != outputs.shape:
            raise ValueError(
                f"targets: expected shape {outputs.shape} (the outputs' shape), got {targets.shape}"
            )


class _SigmoidCrossEntropy(Loss):
    name = "sigmoid_cross_entropy"

    def nll(self, outputs, targets):
        return _sum_per_example(jax.nn.softplus(outputs) - targets * outputs)

    def sample(self, key, outputs):
        return _random.bernoulli(key, jax.nn.sigmoid(outputs)).astype(outputs.dtype)

    def kl(self, outputs_p, outputs_q):
        # A = softplus, ∇A = sigmoid, per unit: p log(p/q) + (1 − p) log((1 − p)/(1 − q)).
        p = jax.nn.sigmoid(outputs_p)
        per_unit = (
            jax.nn.softplus(outputs_q) - jax.nn.softplus(outputs_p) - p * (outputs_q - outputs_p)
        )
        return _sum_per_example(per_unit)

    def hessian_vp(self, outputs, targets, u):
        p = jax.nn.sigmoid(outputs)
        return p * (1 - p) * u

    def fisher_vp(self, outputs, u):
        # Independent Bernoullis: s = p − y, E[s_k s_l] = 0 for k ≠ l and
        # E[s_k²] = p_k (1 − p_k)² + (1 − p_k) p_k² = p_k (1 − p_k).
        p = jax.nn.sigmoid(outputs)
        variance = p * jnp.square(1 - p) + (1 - p) * jnp.square(p)
        return variance * u

    def curvature_sqrt(self, outputs):
        # H_z = diag(p(1 − p)): q_c = √(p_c(1 − p_c)) e_c.
        if outputs.ndim != 2:
            return super().curvature_sqrt(outputs)
        p = jax.nn.sigmoid(outputs)
        eye = jnp.eye(outputs.shape[1], dtype=outputs.dtype)
        return jnp.sqrt(p * (1 - p)).T[:, :, None] * eye[:, None, :]

    def _validate(self, outputs, targets):
        if targets.shape != outputs.shape:
            raise ValueError(
                f"targets: expected shape {outputs.shape} (the outputs' shape), got {targets.shape}"
            )
        values = _concrete_or_none(targets)
        if values is not None and values.size and (values.min() < 0 or values.max() > 1):
            raise ValueError(
                f"targets: expected values in [0, 1] for sigmoid cross-entropy, "
                f"got values in [{values.min()}, {values.max()}]"
            )


def softmax_cross_entropy() -> Loss:
    """Categorical nll of integer labels under softmax(outputs) (logits on the last axis)."""
    return _SoftmaxCrossEntropy()


def squared_error() -> Loss:
    """½‖outputs − targets‖² per example: the nll of a unit-variance Gaussian (up to a constant)."""
    return _SquaredError()


def sigmoid_cross_entropy() -> Loss:
    """Bernoulli nll of targets in [0, 1] under sigmoid(outputs), summed over output units."""
    return _SigmoidCrossEntropy()
