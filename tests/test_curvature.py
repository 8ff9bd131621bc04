"""Every curvature operator against its dense float64 matrix, built by autodiff on flat params."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from conftest import LOSSES, mlp_apply, problem
from natgrad import curvature, losses

SHAPES = [  # (batch_size, out_dim)
    (1, 1),
    (1, 3),
    (6, 1),
    (6, 3),
]


def oracles(loss, params, batch):
    """Dense GGN, Fisher, empirical Fisher and Hessian from jacfwd / hessian on flat params."""
    x, y = batch
    flat, unravel = ravel_pytree(params)
    b = x.shape[0]

    def outputs(f):
        return mlp_apply(unravel(f), x)

    z = outputs(flat)
    jac = jax.jacfwd(outputs)(flat)  # (B, K, n)
    h_out = jax.vmap(lambda zi, yi: jax.hessian(lambda zz: loss.nll(zz[None], yi[None])[0])(zi))(
        z, y
    )
    ggn = jnp.einsum("bkn,bkl,blm->nm", jac, h_out, jac) / b
    per_example_grads = jax.vmap(
        lambda xi, yi: jax.grad(lambda f: loss.nll(mlp_apply(unravel(f), xi[None]), yi[None])[0])(
            flat
        )
    )(x, y)
    emp = per_example_grads.T @ per_example_grads / b
    hess = jax.hessian(lambda f: loss.mean(outputs(f), y))(flat)
    # Fisher by explicit enumeration / the known score covariance of each family.
    if loss.name == "softmax_cross_entropy":
        p = jax.nn.softmax(z)
        cov = jax.vmap(jnp.diag)(p) - jnp.einsum("bk,bl->bkl", p, p)
    elif loss.name == "sigmoid_cross_entropy":
        p = jax.nn.sigmoid(z)
        cov = jax.vmap(jnp.diag)(p * (1 - p))
    else:
        cov = jnp.broadcast_to(jnp.eye(z.shape[1]), (b, z.shape[1], z.shape[1]))
    fisher = jnp.einsum("bkn,bkl,blm->nm", jac, cov, jac) / b
    return {"ggn": ggn, "fisher": fisher, "empirical_fisher": emp, "hessian": hess}


@functools.lru_cache
def _oracles_of_problem(loss_name, batch_size, out_dim):
    """`oracles` of `problem`, computed once for the four operators that share them (under jit:
    one compiled program instead of hundreds of eagerly compiled operations)."""
    loss = LOSSES[loss_name]()
    params, batch = problem(loss, batch_size=batch_size, out_dim=out_dim)
    return jax.jit(lambda p, b: oracles(loss, p, b))(params, batch)


@pytest.mark.parametrize("batch_size,out_dim", SHAPES)
@pytest.mark.parametrize("name", ["ggn", "fisher", "empirical_fisher", "hessian"])
def test_operator_matches_dense_oracle(loss, name, batch_size, out_dim):
    params, batch = problem(loss, batch_size=batch_size, out_dim=out_dim)
    expected = _oracles_of_problem(loss.name, batch_size, out_dim)[name]
    op = curvature.make(name, mlp_apply, loss, params, batch)
    np.testing.assert_allclose(op.to_dense(), expected, atol=1e-10, rtol=1e-8)
    # .mv on a random pytree agrees with the dense product, and is deterministic.
    flat, unravel = ravel_pytree(params)
    v = jax.random.normal(jax.random.PRNGKey(7), flat.shape)
    mv = ravel_pytree(op.mv(unravel(v)))[0]
    np.testing.assert_allclose(mv, expected @ v, atol=1e-10, rtol=1e-8)
    np.testing.assert_array_equal(mv, ravel_pytree(op.mv(unravel(v)))[0])


def test_fisher_equals_ggn_and_hessian_differs(loss):
    params, batch = problem(loss, batch_size=6, out_dim=3)
    ggn = curvature.ggn(mlp_apply, loss, params, batch).to_dense()
    fisher = curvature.fisher(mlp_apply, loss, params, batch).to_dense()
    hess = curvature.hessian(mlp_apply, loss, params, batch).to_dense()
    np.testing.assert_allclose(fisher, ggn, atol=1e-12)
    assert np.abs(hess - ggn).max() > 1e-3  # tanh hidden layer: the residual term is not zero


def test_hessian_equals_ggn_for_a_linear_model(loss):
    params, batch = problem(loss, batch_size=6, in_dim=4, out_dim=3)
    params = params[-1:]  # a single affine layer: outputs are linear in params
    hess = curvature.hessian(mlp_apply, loss, params, batch).to_dense()
    ggn = curvature.ggn(mlp_apply, loss, params, batch).to_dense()
    np.testing.assert_allclose(hess, ggn, atol=1e-12)


def test_empirical_fisher_is_not_the_rank_one_mean_gradient_outer_product():
    """The classic bug: a jvp/vjp through the scalar mean loss gives ḡḡᵀ, which has rank 1."""
    loss = losses.softmax_cross_entropy()
    params, batch = problem(loss, batch_size=8, out_dim=3)
    x, y = batch
    op = curvature.empirical_fisher(mlp_apply, loss, params, batch)

    def mean_loss(p):
        return loss.mean(mlp_apply(p, x), y)

    def buggy_mv(v):  # vjp of the scalar loss times (jvp of the scalar loss): ḡ (ḡᵀv)
        _, jv = jax.jvp(mean_loss, (params,), (v,))
        _, vjp = jax.vjp(mean_loss, params)
        return vjp(jv)[0]

    buggy = curvature.Operator(buggy_mv, params).to_dense()
    correct = op.to_dense()
    assert np.linalg.matrix_rank(np.asarray(buggy), tol=1e-10) == 1
    assert np.linalg.matrix_rank(np.asarray(correct), tol=1e-10) == 8  # B independent g_i
    g = ravel_pytree(jax.grad(mean_loss)(params))[0]
    np.testing.assert_allclose(buggy, jnp.outer(g, g), atol=1e-12)
    assert np.abs(correct - buggy).max() > 1e-2


def test_fisher_mc_converges_to_fisher_in_expectation(loss):
    """Mean of R independent MC Fishers vs the exact Fisher, within 5 standard errors per entry."""
    params, batch = problem(loss, batch_size=4, out_dim=3)
    exact = curvature.fisher(mlp_apply, loss, params, batch).to_dense()
    reps, samples = 400, 4

    def one(key):
        return curvature.fisher_mc(
            mlp_apply, loss, params, batch, key=key, num_samples=samples
        ).to_dense()

    draws = jax.lax.map(one, jax.random.split(jax.random.PRNGKey(0), reps))
    mean = draws.mean(0)
    se = draws.std(0) / np.sqrt(reps)  # standard error of the mean of R draws
    assert np.all(np.abs(mean - exact) <= 5 * se + 1e-10)
    # More samples per draw shrink the error of one draw, as 1/sqrt(S).
    err_1 = jnp.mean((draws[:, None] - exact)[:100] ** 2)
    many = curvature.fisher_mc(
        mlp_apply, loss, params, batch, key=jax.random.PRNGKey(1), num_samples=400
    ).to_dense()
    assert jnp.mean((many - exact) ** 2) < err_1 / 10


def test_fisher_mc_is_deterministic_given_the_key():
    loss = losses.softmax_cross_entropy()
    params, batch = problem(loss)
    a = curvature.fisher_mc(mlp_apply, loss, params, batch, key=jax.random.PRNGKey(3)).to_dense()
    b = curvature.fisher_mc(mlp_apply, loss, params, batch, key=jax.random.PRNGKey(3)).to_dense()
    c = curvature.fisher_mc(mlp_apply, loss, params, batch, key=jax.random.PRNGKey(4)).to_dense()
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 0


def test_damping_and_sums_compose():
    loss = losses.squared_error()
    params, batch = problem(loss)
    op = curvature.ggn(mlp_apply, loss, params, batch)
    n = ravel_pytree(params)[0].size
    np.testing.assert_allclose(
        curvature.damped(op, 0.3).to_dense(), op.to_dense() + 0.3 * np.eye(n), atol=1e-12
    )
    np.testing.assert_allclose((2.0 * op + op).to_dense(), 3 * op.to_dense(), atol=1e-12)


def test_gradient_and_loss_from_the_linearization(loss):
    params, batch = problem(loss, batch_size=5)
    x, y = batch
    expected = jax.grad(lambda p: loss.mean(mlp_apply(p, x), y))(params)
    for name in curvature.CURVATURES:
        op = curvature.make(name, mlp_apply, loss, params, batch, key=jax.random.PRNGKey(0))
        np.testing.assert_allclose(
            ravel_pytree(op.gradient())[0], ravel_pytree(expected)[0], atol=1e-12
        )
        np.testing.assert_allclose(op.loss_value, loss.mean(mlp_apply(params, x), y), atol=1e-12)


def test_operators_under_jit(loss):
    params, batch = problem(loss, batch_size=5)
    v = jax.tree.map(jnp.ones_like, params)
    for name in curvature.CURVATURES:

        def f(p, b, k, name=name):
            return curvature.make(name, mlp_apply, loss, p, b, key=k).mv(v)

        eager = f(params, batch, jax.random.PRNGKey(0))
        jitted = jax.jit(f)(params, batch, jax.random.PRNGKey(0))
        np.testing.assert_allclose(
            ravel_pytree(jitted)[0], ravel_pytree(eager)[0], atol=1e-10, rtol=1e-10
        )


def test_model_is_linearized_once_not_per_product():
    """Counting calls of apply_fn while tracing: building the operator traces the model; each
    `.mv` must not run it again."""
    loss = losses.softmax_cross_entropy()
    params, batch = problem(loss)
    calls = []

    def counted(p, x):
        calls.append(1)
        return mlp_apply(p, x)

    for name in curvature.CURVATURES:
        calls.clear()
        op = curvature.make(name, counted, loss, params, batch, key=jax.random.PRNGKey(0))
        built = len(calls)
        for _ in range(3):
            op.mv(params)
        assert len(calls) == built, name


def test_bad_input_names_the_argument():
    loss = losses.softmax_cross_entropy()
    params, (x, y) = problem(loss, batch_size=5)
    with pytest.raises(ValueError, match="targets"):
        curvature.ggn(mlp_apply, loss, params, (x, y[:, None]))
    with pytest.raises(ValueError, match="batch"):
        curvature.ggn(mlp_apply, loss, params, (x, y[:3]))
    with pytest.raises(ValueError, match="batch"):
        curvature.ggn(mlp_apply, loss, params, x)
    with pytest.raises(ValueError, match="curvature"):
        curvature.make("fishr", mlp_apply, loss, params, (x, y))
    with pytest.raises(ValueError, match="key"):
        curvature.fisher_mc(mlp_apply, loss, params, (x, y), key=None)
    with pytest.raises(ValueError, match="num_samples"):
        curvature.fisher_mc(
            mlp_apply, loss, params, (x, y), key=jax.random.PRNGKey(0), num_samples=0
        )
