"""Dense float64 oracles of a tiny model's curvature, by autodiff on the raveled parameters.

Independent of natgrad's matrix-free code: Jacobians from `jax.jacfwd`, output Hessians and the
loss Hessian from `jax.hessian`, per-example gradients from `jax.jacrev`. Each is computed
under `jax.jit` (`_compiled`): one program, where eager autodiff compiled each operation.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree


def _compiled(oracle):
    """`oracle(apply_fn, loss, params, batch, *rest)` run under jit, as a numpy array."""

    @functools.wraps(oracle)
    def run(apply_fn, loss, params, batch, *rest):
        fn = jax.jit(lambda params, batch, *rest: oracle(apply_fn, loss, params, batch, *rest))
        return np.asarray(fn(params, batch, *rest))

    return run


def _flat_model(apply_fn, params, x):
    flat, unravel = ravel_pytree(params)
    return flat, unravel, lambda v: apply_fn(unravel(v), x)


@_compiled
def ggn(apply_fn, loss, params, batch) -> np.ndarray:
    """(1/B) Σ_i J_iᵀ H_i J_i with H_i = ∂²ℓ/∂z² of each example."""
    x, y = batch
    flat, _, model = _flat_model(apply_fn, params, x)
    z = model(flat)
    jac = jax.jacfwd(model)(flat)  # (B, K, n)
    h = jax.vmap(lambda zi, yi: jax.hessian(lambda u: loss.nll(u[None], yi[None])[0])(zi))(z, y)
    return jnp.einsum("bkn,bkl,blm->nm", jac, h, jac) / z.shape[0]


def fisher(apply_fn, loss, params, batch) -> np.ndarray:
    """The Fisher of natgrad's (exponential-family) losses equals their GGN."""
    return ggn(apply_fn, loss, params, batch)


@_compiled
def empirical_fisher(apply_fn, loss, params, batch) -> np.ndarray:
    """(1/B) Σ_i g_i g_iᵀ from per-example gradients."""
    x, y = batch
    flat, _, model = _flat_model(apply_fn, params, x)
    per_example = jax.jacrev(lambda v: loss.nll(model(v), y))(flat)  # (B, n)
    return per_example.T @ per_example / x.shape[0]


@_compiled
def hessian(apply_fn, loss, params, batch) -> np.ndarray:
    x, y = batch
    flat, _, model = _flat_model(apply_fn, params, x)
    return jax.hessian(lambda v: loss.mean(model(v), y))(flat)


@_compiled
def fisher_mc(apply_fn, loss, params, batch, key) -> np.ndarray:
    """(1/B) Σ_i g̃_i g̃_iᵀ with g̃_i the gradient at a target sampled from the model by `key`
    (one sample per example, drawn from the key itself as `natgrad.curvature.fisher_mc` does)."""
    x, _ = batch
    flat, _, model = _flat_model(apply_fn, params, x)
    sampled = loss.sample(key, model(flat))
    per_example = jax.jacrev(lambda v: loss.nll(model(v), sampled))(flat)
    return per_example.T @ per_example / x.shape[0]


CURVATURES = {
    "ggn": ggn,
    "fisher": fisher,
    "empirical_fisher": empirical_fisher,
    "hessian": hessian,
}


@_compiled
def gradient(apply_fn, loss, params, batch) -> np.ndarray:
    x, y = batch
    flat, _, model = _flat_model(apply_fn, params, x)
    return jax.grad(lambda v: loss.mean(model(v), y))(flat)


def damped_solve(matrix: np.ndarray, g: np.ndarray, damping: float) -> np.ndarray:
    return np.linalg.solve(matrix + damping * np.eye(len(g)), g)


def assert_mean_matches(samples, oracle, z: float = 5.0) -> None:
    """The mean of `samples` (axis 0) equals `oracle` within `z` standard errors of the mean,
    entrywise, and the standard error is small enough (a tenth of the oracle's largest entry)
    for the check to tell a wrong scale."""
    s = np.asarray(samples)
    mean, se = s.mean(axis=0), s.std(axis=0, ddof=1) / np.sqrt(s.shape[0])
    assert np.abs(oracle).max() > 10 * se.max()
    assert np.all(np.abs(mean - oracle) <= z * se + 1e-10)


def kron_positions(params, path) -> np.ndarray:
    """Ravel positions of one layer's weights (``path(params)``, a ``{"w", "b"}`` dict) in
    Kronecker order: W as (m, n) row-major, then b."""
    flat, unravel = ravel_pytree(params)
    layer = path(unravel(jnp.arange(flat.size, dtype=flat.dtype)))
    pos = [layer["w"].reshape(-1)] + ([layer["b"]] if "b" in layer else [])
    return np.concatenate(pos).astype(int)


def assert_kron_blocks_match(blocks, oracle: np.ndarray, params, *, num: int, atol: float):
    """``blocks(key, curvature)`` gives A ⊗ G per layer (layer i = ``params[i]``): with
    ``"fisher"`` they equal the diagonal blocks of the dense `oracle` to `atol`, and with
    ``"fisher_mc"`` their mean over `num` keys matches them (`assert_mean_matches`)."""
    exact = blocks(jax.random.PRNGKey(3), "fisher")
    samples = jax.jit(jax.vmap(lambda k: blocks(k, "fisher_mc")))(
        jax.random.split(jax.random.PRNGKey(4), num)
    )
    for layer in range(len(exact)):
        pos = kron_positions(params, lambda p, layer=layer: p[layer])
        block = oracle[np.ix_(pos, pos)]
        np.testing.assert_allclose(exact[layer], block, atol=atol)
        assert_mean_matches(samples[layer], block)
