"""Lanczos, SLQ and conditioning against dense float64 spectra; output KL against ½dᵀFd."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import LOSSES, mlp_apply, problem
from natgrad import _tree, curvature, diagnostics, losses, natural_gradient

KEY = jax.random.PRNGKey(0)


@functools.cache
def _dense_case(loss_name, name):
    loss = LOSSES[loss_name]()
    params, batch = problem(loss, batch_size=8, hidden=5)  # n = 38 parameters
    op = curvature.make(name, mlp_apply, loss, params, batch)
    return params, batch, op, jnp.linalg.eigvalsh(op.to_dense())


def _setup(loss, name="ggn"):
    return _dense_case(loss.name, name)


# --- Lanczos --------------------------------------------------------------------------------


def test_top_eigenvalues_match_dense_spectrum(loss):
    params, _, op, exact = _setup(loss)
    full = diagnostics.lanczos(op, params, key=KEY, num_iterations=exact.size)
    top = full.ritz_values[::-1][:5]
    np.testing.assert_allclose(top, exact[::-1][:5], rtol=0, atol=1e-12 * exact[-1])
    # with m = n the Ritz values are the whole spectrum (including the GGN's null space)
    np.testing.assert_allclose(full.ritz_values, exact, rtol=0, atol=1e-12 * exact[-1])
    np.testing.assert_allclose(full.ritz_weights.sum(), 1.0, atol=1e-12)


def test_partial_lanczos_on_the_indefinite_hessian_stays_inside_and_near_the_spectrum():
    params, _, op, exact = _setup(losses.softmax_cross_entropy(), "hessian")
    assert exact[0] < 0 < exact[-1]
    part = diagnostics.lanczos(op, params, key=KEY, num_iterations=20)
    distance = np.abs(np.asarray(part.ritz_values)[:, None] - np.asarray(exact)[None]).min(1)
    assert np.all(distance <= part.residuals + 1e-10)
    # interlacing: the Ritz values lie inside the spectrum; the top one has converged
    assert exact[0] - 1e-12 <= part.ritz_values[0] and part.ritz_values[-1] <= exact[-1] + 1e-12
    assert float(part.ritz_values[-1]) == pytest.approx(float(exact[-1]), rel=1e-5)


def test_lanczos_is_jittable_and_deterministic():
    loss = losses.softmax_cross_entropy()
    params, batch, op, exact = _setup(loss)

    @jax.jit
    def top(p, b, key):
        return diagnostics.top_eigenvalues(
            curvature.ggn(mlp_apply, loss, p, b), p, 3, key=key, num_iterations=15
        )

    jitted = top(params, batch, KEY)
    np.testing.assert_array_equal(jitted, top(params, batch, KEY))
    eager = diagnostics.top_eigenvalues(op, params, 3, key=KEY, num_iterations=15)
    np.testing.assert_allclose(jitted, eager, rtol=1e-12)
    # 15 of 38 steps already give the top 3 of a GGN (rank <= B × (outputs − 1) = 16)
    for key in (KEY, jax.random.PRNGKey(7)):
        np.testing.assert_allclose(top(params, batch, key), exact[::-1][:3], rtol=1e-10)


def test_a_plain_callable_is_an_operator():
    matrix = jnp.diag(jnp.arange(1.0, 9.0))
    top = diagnostics.top_eigenvalues(
        lambda v: {"a": matrix @ v["a"]}, {"a": jnp.zeros(8)}, 2, key=KEY, num_iterations=8
    )
    np.testing.assert_allclose(top, [8.0, 7.0], rtol=1e-13)


# --- SLQ ------------------------------------------------------------------------------------


def test_slq_moments_match_the_dense_spectrum_within_probe_error():
    """Σ_i w_i θ_i^k per probe is u ᵀA^k u exactly (Gauss quadrature, k < 2m), whose mean over
    uniform unit u is mean(λ^k) with variance 2/(n+2)·var(λ^k): a 4-standard-error test."""
    loss = losses.softmax_cross_entropy()
    params, _, op, exact = _setup(loss)
    n, probes = exact.size, 32
    sd = diagnostics.spectral_density(
        op, params, key=KEY, num_probes=probes, num_iterations=8, grid=300, log_floor=1e-8
    )
    assert sd.nodes.shape == sd.weights.shape == (probes, 8)
    np.testing.assert_allclose(sd.weights.sum(1), 1.0, atol=1e-12)
    for k in (1, 2):
        per_probe = np.sum(np.asarray(sd.weights) * np.asarray(sd.nodes) ** k, axis=1)
        standard_error = np.sqrt(2 / (n + 2) * np.var(exact**k) / probes)
        assert abs(per_probe.mean() - np.mean(exact**k)) <= 4 * standard_error
    # The density per decade integrates to 1 over log10 λ.
    assert jnp.all(sd.grid > 0) and jnp.all(sd.density >= 0)
    assert float(jnp.trapezoid(sd.density, jnp.log10(sd.grid))) == pytest.approx(1.0, abs=1e-12)
    # In λ, on a grid covering the nodes ± 8σ, it keeps the quadrature's mean (the Gaussian
    # kernel has mean zero).
    sigma = 0.01 * exact[-1]
    grid = jnp.linspace(sd.nodes.min() - 8 * sigma, sd.nodes.max() + 8 * sigma, 4001)
    density = diagnostics.broadened_density(sd.nodes, sd.weights, grid, sigma)
    assert float(jnp.trapezoid(density, grid)) == pytest.approx(1.0, abs=1e-12)
    mean_nodes = float(np.sum(sd.weights * sd.nodes) / probes)
    assert float(jnp.trapezoid(grid * density, grid)) == pytest.approx(mean_nodes, rel=1e-9)


# --- conditioning ---------------------------------------------------------------------------


def test_condition_number_and_suggested_damping_against_dense():
    params, _, op, exact = _setup(losses.sigmoid_cross_entropy())
    n, lam = exact.size, 1e-3
    est = diagnostics.condition_number(op, params, key=KEY, num_iterations=n, damping=lam)
    truth = (exact[-1] + lam) / (exact[0] + lam)
    assert float(est.condition_number) == pytest.approx(float(truth), rel=1e-6)
    partial = diagnostics.condition_number(op, params, key=KEY, num_iterations=6, damping=lam)
    assert partial.condition_number <= truth * (1 + 1e-12)  # Ritz values: a lower bound
    suggestion = diagnostics.suggest_damping(
        op, params, key=KEY, num_iterations=n, max_condition=100.0
    )
    kappa = (exact[-1] + suggestion.damping) / (max(exact[0], 0) + suggestion.damping)
    assert float(kappa) == pytest.approx(100.0, rel=1e-6)
    assert float(suggestion.condition_number) == pytest.approx(100.0, rel=1e-6)


# --- KL -------------------------------------------------------------------------------------


def test_output_kl_approaches_half_dFd_for_small_steps(loss):
    params, (x, y), _, _ = _setup(loss)
    fisher = curvature.fisher(mlp_apply, loss, params, (x, y))
    d = jax.tree.map(lambda a: jax.random.normal(jax.random.PRNGKey(3), a.shape), params)
    errors = []
    for t in (1e-1, 1e-2, 1e-3):
        step = _tree.scale(t, d)
        exact = diagnostics.output_kl(mlp_apply, loss, params, _tree.add(params, step), x)
        errors.append(abs(float(exact / diagnostics.predicted_kl(fisher, step)) - 1))
    # The relative error is O(t): it shrinks about tenfold per step.
    assert errors[-1] < 1e-3 and errors[2] < errors[1] / 5 < errors[0] / 25


def test_kl_closed_forms():
    z_p = jnp.array([[0.0, 1.0, -1.0], [2.0, 0.0, 0.5]])
    z_q = jnp.array([[0.5, 0.0, -1.0], [0.0, 0.0, 0.0]])
    p, q = jax.nn.softmax(z_p), jax.nn.softmax(z_q)
    categorical = jnp.sum(p * jnp.log(p / q), axis=1)
    bp, bq = jax.nn.sigmoid(z_p), jax.nn.sigmoid(z_q)
    bernoulli = jnp.sum(bp * jnp.log(bp / bq) + (1 - bp) * jnp.log((1 - bp) / (1 - bq)), axis=1)
    gaussian = 0.5 * jnp.sum((z_p - z_q) ** 2, axis=1)
    expected = {
        "softmax_cross_entropy": categorical,
        "sigmoid_cross_entropy": bernoulli,
        "squared_error": gaussian,
    }
    apply_fn = lambda params, inputs: params["z"]  # noqa: E731  outputs are the parameters
    for name, values in expected.items():
        loss = getattr(losses, name)()
        np.testing.assert_allclose(loss.kl(z_p, z_q), values, rtol=1e-12)
        kl = diagnostics.output_kl(apply_fn, loss, {"z": z_p}, {"z": z_q}, None)
        np.testing.assert_allclose(kl, values.mean(), rtol=1e-12)
        assert diagnostics.output_kl(apply_fn, loss, {"z": z_p}, {"z": z_p}, None) == 0
    # Categorical on two classes is Bernoulli on the logit difference.
    two = losses.softmax_cross_entropy().kl(jnp.array([[0.0, 1.3]]), jnp.array([[0.0, -0.4]]))
    one = losses.sigmoid_cross_entropy().kl(jnp.array([[1.3]]), jnp.array([[-0.4]]))
    np.testing.assert_allclose(two, one, rtol=1e-12)


def test_natural_gradient_step_kl_predicts_the_output_kl():
    loss = losses.softmax_cross_entropy()
    params, (x, y) = problem(loss, batch_size=16, hidden=8)
    # With λ = 1e-3 the step stays where the quadratic holds. (With λ = 1e-6 the step grows
    # along the Fisher's null space, whose outputs move only at second order: the true KL was
    # 16× the predicted one. The KL trust region bounds the quadratic, not the KL itself.)
    opt = natural_gradient(mlp_apply, loss, kl_radius=1e-4, maxiter=50, damping=1e-3)

    @jax.jit
    def step(params):
        grads = jax.grad(lambda p: loss.mean(mlp_apply(p, x), y))(params)
        updates, state = opt.update(grads, opt.init(params), params, batch=(x, y))
        new_params = optax.apply_updates(params, updates)
        return state.step_kl, diagnostics.output_kl(mlp_apply, loss, params, new_params, x)

    predicted, actual = step(params)
    assert float(predicted) == pytest.approx(1e-4, rel=1e-6)  # the trust region is active
    assert float(actual) == pytest.approx(float(predicted), rel=0.1)


# --- bad arguments --------------------------------------------------------------------------


def test_bad_arguments_raise_value_error_naming_them():
    loss = losses.squared_error()
    params, (x, _), op, _ = _setup(loss)
    lanczos_cases = [
        ("operator", lambda: diagnostics.lanczos(3, params, key=KEY, num_iterations=4)),
        ("params_like", lambda: diagnostics.lanczos(op, {}, key=KEY, num_iterations=4)),
        ("key", lambda: diagnostics.lanczos(op, params, key=None, num_iterations=4)),
        ("num_iterations", lambda: diagnostics.lanczos(op, params, key=KEY, num_iterations=39)),
        ("num_iterations", lambda: diagnostics.lanczos(op, params, key=KEY, num_iterations=2.5)),
        ("k", lambda: diagnostics.top_eigenvalues(op, params, 0, key=KEY, num_iterations=4)),
        (
            "num_iterations",
            lambda: diagnostics.top_eigenvalues(op, params, 5, key=KEY, num_iterations=4),
        ),
        (
            "num_probes",
            lambda: diagnostics.spectral_density(
                op, params, key=KEY, num_probes=0, num_iterations=4
            ),
        ),
        (
            "grid",
            lambda: diagnostics.spectral_density(
                op, params, key=KEY, num_probes=1, num_iterations=4, grid=1
            ),
        ),
        (
            "sigma",
            lambda: diagnostics.spectral_density(
                op, params, key=KEY, num_probes=1, num_iterations=4, sigma=-1.0
            ),
        ),
        (
            "damping",
            lambda: diagnostics.condition_number(
                op, params, key=KEY, num_iterations=4, damping=-1.0
            ),
        ),
        (
            "max_condition",
            lambda: diagnostics.suggest_damping(
                op, params, key=KEY, num_iterations=4, max_condition=1
            ),
        ),
        ("loss", lambda: diagnostics.output_kl(mlp_apply, "mse", params, params, x)),
        ("new_params", lambda: diagnostics.output_kl(mlp_apply, loss, params, params[:1], x)),
        ("d", lambda: diagnostics.predicted_kl(op, params[:1])),
        (
            "log_floor",
            lambda: diagnostics.broadened_density(
                jnp.ones((1, 2)), jnp.ones((1, 2)), jnp.ones(3), 0.1, log_floor=0.0
            ),
        ),
    ]
    for name, call in lanczos_cases:
        with pytest.raises(ValueError, match=f"^{name}:"):
            call()
