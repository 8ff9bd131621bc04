"""Preconditioners: diagonals against dense float64 oracles, and fewer CG iterations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import natgrad
from conftest import mlp_apply, mlp_params, problem, train
from natgrad import curvature, layers, losses, preconditioners, solvers


def dense_mlp(params, x):
    for layer in params[:-1]:
        x = jnp.tanh(layers.dense(layer, x))
    return layers.dense(params[-1], x)


def test_ggn_diagonal_is_the_diagonal_of_the_dense_ggn(loss):
    params, batch = problem(loss)
    dense = curvature.ggn(mlp_apply, loss, params, batch).to_dense()
    diag = jax.jit(lambda p, b: preconditioners.ggn_diagonal(mlp_apply, loss, p, b))(params, batch)
    np.testing.assert_allclose(ravel_pytree(diag)[0], jnp.diag(dense), rtol=1e-10, atol=1e-13)


def test_empirical_fisher_diagonal_is_the_diagonal_of_the_dense_empirical_fisher():
    loss = losses.softmax_cross_entropy()
    params, batch = problem(loss)
    dense = curvature.empirical_fisher(mlp_apply, loss, params, batch).to_dense()
    diag = preconditioners.empirical_fisher_diagonal(mlp_apply, loss, params, batch)
    np.testing.assert_allclose(ravel_pytree(diag)[0], jnp.diag(dense), rtol=1e-10, atol=1e-13)


def test_hutchinson_estimate_is_unbiased():
    loss = losses.softmax_cross_entropy()
    params, batch = problem(loss)
    num = 2000

    @jax.jit
    def oracle_and_samples(params, batch):
        op = curvature.ggn(mlp_apply, loss, params, batch)
        one = lambda k: ravel_pytree(preconditioners.hutchinson_estimate(op, k, 1))[0]  # noqa: E731
        return jnp.diag(op.to_dense()), jax.vmap(one)(jax.random.split(jax.random.PRNGKey(0), num))

    exact, samples = oracle_and_samples(params, batch)
    op = curvature.ggn(mlp_apply, loss, params, batch)
    samples = np.asarray(samples)
    mean, se = samples.mean(axis=0), samples.std(axis=0, ddof=1) / np.sqrt(num)
    assert np.abs(exact).max() > 10 * se.max()  # precise enough to see a wrong estimator
    assert np.all(np.abs(mean - exact) <= 5 * se + 1e-12)
    # Several probes in one call average them: the same keys give the same mean.
    many = preconditioners.hutchinson_estimate(op, jax.random.PRNGKey(1), 8)
    again = preconditioners.hutchinson_estimate(op, jax.random.PRNGKey(1), 8)
    np.testing.assert_array_equal(ravel_pytree(many)[0], ravel_pytree(again)[0])


def test_preconditioned_cg_needs_fewer_iterations_than_plain_cg():
    """MLP 6-8-3, squared error, inputs with standard deviations from 10⁻² to 10², λ = 10⁻⁶: the
    scales differ by orders of magnitude across parameters, which plain CG pays for."""
    params = mlp_params(jax.random.PRNGKey(0), [6, 8, 3])
    x = jax.random.normal(jax.random.PRNGKey(1), (512, 6)) * jnp.logspace(-2, 2, 6)
    y = jax.random.normal(jax.random.PRNGKey(2), (512, 3))
    loss, lam = losses.squared_error(), 1e-6
    candidates = {
        "martens": preconditioners.martens_diagonal(),
        "exact": preconditioners.exact_diagonal(),
        "hutchinson": preconditioners.hutchinson_diagonal(num_probes=200),
        "kfac": preconditioners.kfac(curvature="fisher"),
    }

    @jax.jit
    def iterations(params, x, y):
        op = curvature.ggn(dense_mlp, loss, params, (x, y))
        b, matvec = op.gradient(), curvature.damped(op, lam).mv
        out = {"none": solvers.cg(matvec, b, maxiter=1000, tol=1e-6)}
        for name, pre in candidates.items():
            m, _ = pre.update(
                pre.init(params),
                params,
                (x, y),
                apply_fn=dense_mlp,
                loss=loss,
                damping=lam,
                key=jax.random.PRNGKey(3),
            )
            out[name] = solvers.cg(matvec, b, maxiter=1000, tol=1e-6, preconditioner=m.inverse())
        return {k: (r.iterations, r.status) for k, r in out.items()}

    counts = iterations(params, x, y)
    plain = int(counts.pop("none")[0])
    for name, (its, status) in counts.items():
        assert int(status) == solvers.CONVERGED, name
        assert int(its) < 0.75 * plain, (name, int(its), plain)


@pytest.mark.parametrize(
    "pre",
    [preconditioners.exact_diagonal(), preconditioners.hutchinson_diagonal(num_probes=4)],
    ids=["exact", "hutchinson"],
)
def test_diagonal_preconditioners_plug_into_natural_gradient(pre):
    params = mlp_params(jax.random.PRNGKey(0), [4, 6, 3])
    x = jax.random.normal(jax.random.PRNGKey(1), (32, 4))
    y = jnp.argmax(x[:, :3], axis=1)
    loss = losses.softmax_cross_entropy()
    opt = natgrad.natural_gradient(dense_mlp, loss, preconditioner=pre)

    params, state, values = train(opt, dense_mlp, loss, params, [(x, y)] * 2)
    assert int(state.rejected_steps) == 0 and values[-1] < values[0]


def test_bad_arguments_raise_value_error_naming_them():
    for make, name in [
        (lambda: preconditioners.martens_diagonal(alpha=-1.0), "alpha"),
        (lambda: preconditioners.exact_diagonal(alpha="one"), "alpha"),
        (lambda: preconditioners.hutchinson_diagonal(num_probes=0), "num_probes"),
        (lambda: preconditioners.hutchinson_diagonal(ema_decay=1.0), "ema_decay"),
        (lambda: preconditioners.kfac(inverse_every=0), "inverse_every"),
        (lambda: preconditioners.kfac(fisher_type="ggn"), "fisher_type"),
    ]:
        with pytest.raises(ValueError, match=name):
            make()
    loss = losses.softmax_cross_entropy()
    params, batch = problem(loss)
    for pre in (preconditioners.hutchinson_diagonal(), preconditioners.kfac()):
        with pytest.raises(ValueError, match="key"):
            pre.update(pre.init(params), params, batch, apply_fn=mlp_apply, loss=loss, damping=1.0)
