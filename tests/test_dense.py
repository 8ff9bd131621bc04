"""natgrad.dense against dense float64 oracles built by jacfwd / hessian on raveled params."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from conftest import mlp_apply, problem
from natgrad import curvature, dense, losses, solvers

factor = jax.jit(dense.curvature_factor, static_argnums=(0, 1, 2), static_argnames="num_samples")


def oracle_curvature(name, loss, params, batch):
    """Dense GGN / empirical Fisher / Hessian of the mean loss, independent of natgrad.dense."""
    x, y = batch
    flat, unravel = ravel_pytree(params)

    def outputs(f):
        return mlp_apply(unravel(f), x)

    z = outputs(flat)
    jac = jax.jacfwd(outputs)(flat).reshape(z.size, flat.size)
    if name in ("ggn", "fisher"):  # H_z of the mean loss is block diagonal, H_i / B
        h_out = jax.hessian(lambda zz: loss.mean(zz.reshape(z.shape), y))(z.reshape(-1))
        return jac.T @ h_out @ jac
    if name == "empirical_fisher":
        per = jax.vmap(
            lambda xi, yi: jax.grad(
                lambda f: loss.nll(mlp_apply(unravel(f), xi[None]), yi[None])[0]
            )(flat)
        )(x, y)
        return per.T @ per / x.shape[0]
    return jax.hessian(lambda f: loss.mean(outputs(f), y))(flat)


oracle_curvature = jax.jit(oracle_curvature, static_argnums=(0, 1))


@pytest.mark.parametrize("name", ["ggn", "fisher", "empirical_fisher"])
@pytest.mark.parametrize("batch_size,out_dim", [(6, 3)])
def test_factor_gives_the_dense_curvature(loss, name, batch_size, out_dim):
    params, batch = problem(loss, batch_size=batch_size, out_dim=out_dim)
    R = factor(name, mlp_apply, loss, params, batch)
    n = ravel_pytree(params)[0].size
    rows = {"empirical_fisher": batch_size}.get(name, batch_size * out_dim)
    assert R.shape == (rows, n)
    np.testing.assert_allclose(R.T @ R, oracle_curvature(name, loss, params, batch), atol=1e-12)


def test_fisher_mc_factor_matches_the_operator_with_the_same_key():
    loss = losses.softmax_cross_entropy()
    params, batch = problem(loss, batch_size=6, out_dim=3)
    key = jax.random.PRNGKey(3)
    R = factor("fisher_mc", mlp_apply, loss, params, batch, key=key, num_samples=4)
    op = curvature.fisher_mc(mlp_apply, loss, params, batch, key=key, num_samples=4)
    assert R.shape[0] == 4 * 6
    np.testing.assert_allclose(R.T @ R, op.to_dense(), atol=1e-12)


def test_fisher_mc_factor_is_unbiased_for_the_fisher():
    # E[s̃ s̃ᵀ] = H_z: the mean of S single-sample estimates is within a few standard errors.
    loss = losses.softmax_cross_entropy()
    params, batch = problem(loss, batch_size=4, out_dim=3)
    fisher = oracle_curvature("fisher", loss, params, batch)
    samples = 400
    R = factor(
        "fisher_mc", mlp_apply, loss, params, batch, key=jax.random.PRNGKey(0), num_samples=samples
    )
    per_sample = R.reshape(samples, 4, -1) * jnp.sqrt(samples)  # rows of one single-sample R
    single = jnp.einsum("sbn,sbm->snm", per_sample, per_sample)
    mean, std = single.mean(0), single.std(0)
    assert np.all(np.abs(mean - fisher) <= 5 * std / np.sqrt(samples) + 1e-12)
    np.testing.assert_allclose(R.T @ R, mean, atol=1e-12)


def random_factor(rows, n, seed=0):
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    return jax.random.normal(k1, (rows, n)), jax.random.normal(k2, (n,))


@pytest.mark.parametrize("rows,n", [(5, 12), (12, 5), (8, 8)])
@pytest.mark.parametrize("method", ["auto", "primal", "woodbury"])
@pytest.mark.parametrize("damping", [1.0, 1e-3])
def test_damped_solve_equals_the_dense_oracle(rows, n, method, damping):
    R, g = random_factor(rows, n)
    expected = jnp.linalg.solve(R.T @ R + damping * jnp.eye(n), g)
    x = dense.damped_solve(R, g, damping, method=method)
    np.testing.assert_allclose(x, expected, rtol=1e-9, atol=1e-9 * np.abs(expected).max())


@pytest.mark.parametrize("method", ["auto", "primal", "woodbury"])
def test_tiny_damping_gauss_newton_gradient(method):
    # g = Rᵀu lies in the row space, as a Gauss-Newton gradient does; as λ → 0 the solution
    # tends to the minimum-norm x = Rᵀ(RRᵀ + λI)⁻¹u (push-through identity). The rounding of
    # the computed g leaves a null-space part of size ~ε‖g‖ that any solver divides by λ, so
    # the attainable error is ~ε‖g‖/λ; the Woodbury form must not lose more to cancellation
    # in (g − Rᵀy)/λ.
    R, _ = random_factor(20, 60, seed=1)
    u = jax.random.normal(jax.random.PRNGKey(2), (20,))
    g = R.T @ u
    eps = jnp.finfo(g.dtype).eps
    for damping in (1e-4, 1e-8, 1e-10):
        expected = R.T @ jnp.linalg.solve(R @ R.T + damping * jnp.eye(20), u)
        x = dense.damped_solve(R, g, damping, method=method)
        bound = 100 * eps * jnp.linalg.norm(g) / damping + 1e-10 * jnp.linalg.norm(expected)
        assert jnp.linalg.norm(x - expected) <= bound


def test_refinement_does_not_hurt_and_helps_woodbury():
    R, _ = random_factor(20, 60, seed=1)
    g = R.T @ jax.random.normal(jax.random.PRNGKey(2), (20,))
    expected = jnp.linalg.solve(R.T @ R + 1e-3 * jnp.eye(60), g)
    errors = [
        jnp.linalg.norm(dense.damped_solve(R, g, 1e-3, method="woodbury", refine=k) - expected)
        for k in (0, 1)
    ]
    assert errors[1] <= errors[0]
    assert errors[1] <= 1e-10 * jnp.linalg.norm(expected)


def test_auto_picks_the_smaller_system():
    assert dense.pick_method(10, 100) == "woodbury"
    assert dense.pick_method(100, 10) == "primal"
    assert dense.pick_method(10, 100, "primal") == "primal"
    with pytest.raises(ValueError, match="method"):
        dense.pick_method(10, 100, "qr")


def test_bad_shapes_and_names_raise():
    R, g = random_factor(4, 6)
    with pytest.raises(ValueError, match="R, g_flat"):
        dense.damped_solve(R, g[:5], 1.0)
    loss = losses.squared_error()
    params, batch = problem(loss)
    with pytest.raises(ValueError, match="curvature"):
        dense.curvature_factor("hessian", mlp_apply, loss, params, batch)
    with pytest.raises(ValueError, match="key"):
        dense.curvature_factor("fisher_mc", mlp_apply, loss, params, batch)


@pytest.mark.parametrize(
    "name,method",
    [("ggn", "primal"), ("ggn", "woodbury"), ("empirical_fisher", "auto"), ("hessian", "auto")],
)
def test_dense_direction_matches_oracle_and_cg(name, method):
    loss = losses.softmax_cross_entropy()
    params, batch = problem(loss, batch_size=6, out_dim=3)
    grads = jax.grad(lambda p: loss.mean(mlp_apply(p, batch[0]), batch[1]))(params)
    damping = 0.1
    if name == "hessian":  # keep H + λI positive definite so CG applies too
        damping = 1.0 + float(
            jnp.maximum(0, -jnp.linalg.eigvalsh(oracle_curvature(name, loss, params, batch))[0])
        )
    step = jax.jit(
        lambda p, b, g: dense.dense_direction(
            name, mlp_apply, loss, p, b, g, damping, method=method
        )
    )
    d, cd = step(params, batch, grads)
    c = oracle_curvature(name, loss, params, batch)
    g_flat = ravel_pytree(grads)[0]
    expected = jnp.linalg.solve(c + damping * jnp.eye(c.shape[0]), g_flat)
    np.testing.assert_allclose(ravel_pytree(d)[0], expected, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(ravel_pytree(cd)[0], c @ expected, rtol=1e-8, atol=1e-10)
    op = curvature.damped(curvature.make(name, mlp_apply, loss, params, batch), damping)
    res = solvers.cg(op.mv, grads, maxiter=200, tol=1e-12)
    np.testing.assert_allclose(ravel_pytree(d)[0], ravel_pytree(res.x)[0], rtol=1e-6, atol=1e-8)
