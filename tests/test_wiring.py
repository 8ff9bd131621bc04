"""Wiring tests: each optimiser's composition of parts, against dense float64 oracles.

These fail if a part is dropped or mis-wired: the direction replaced by the raw gradient, the
momentum ignored, the preconditioner not handed to CG, K-FAC's blocks not applied.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

import natgrad
import oracles
from conftest import jitted_update, mlp_apply, mlp_params
from natgrad import curvature, kronecker, layers, losses, operators, preconditioners

CE = losses.softmax_cross_entropy()
LAM = 0.1


def tiny_problem(seed=0, batch_size=12):
    key = jax.random.PRNGKey(seed)
    k1, k2, k3 = jax.random.split(key, 3)
    params = mlp_params(k1, [3, 4, 3])  # 31 parameters
    x = jax.random.normal(k2, (batch_size, 3))
    y = jax.random.randint(k3, (batch_size,), 0, 3)
    return params, (x, y)


def grad_of(params, batch, apply_fn=mlp_apply):
    return jax.grad(lambda p: CE.mean(apply_fn(p, batch[0]), batch[1]))(params)


def exact_ngd(**kwargs):
    """One natural-gradient step with α = 1, fixed λ and CG run to machine precision."""
    options = dict(
        learning_rate=1.0,
        step_rule="fixed",
        damping=LAM,
        maxiter=60,
        tol=0.0,
        warm_start=0.0,
        reject_rises=False,  # the direction's wiring, whatever the loss does
    )
    return natgrad.natural_gradient(mlp_apply, CE, **(options | kwargs))


def flat(tree):
    return np.asarray(ravel_pytree(tree)[0])


@pytest.mark.parametrize(
    "name, solver",
    [(n, "cg") for n in [*oracles.CURVATURES, "fisher_mc"]]
    + [(n, "dense") for n in oracles.CURVATURES],
)
def test_one_natural_gradient_step_is_the_dense_damped_solve(name, solver):
    params, batch = tiny_problem()
    key = jax.random.PRNGKey(7)
    damping = 1.0 if name == "hessian" else LAM  # keep H + λI positive definite
    opt = exact_ngd(curvature=name, damping=damping, solver=solver)
    g = grad_of(params, batch)
    updates, state = jitted_update(opt)(g, opt.init(params), params, batch=batch, key=key)
    if name == "fisher_mc":  # the optimiser draws its targets with the first half of its key
        matrix = oracles.fisher_mc(mlp_apply, CE, params, batch, jax.random.split(key)[0])
    else:
        matrix = oracles.CURVATURES[name](mlp_apply, CE, params, batch)
    expected = -oracles.damped_solve(matrix, flat(g), damping)
    assert np.linalg.norm(flat(updates) - expected) <= 1e-7 * np.linalg.norm(expected)
    assert int(state.rejected_steps) == 0


def test_momentum_follows_the_dense_recursion():
    """s₂ = d₂ + μ s₁, update −lr · s₂ (d₁, d₂ the dense damped solves at θ₁, θ₂)."""
    params, batch = tiny_problem(1)
    mu, lr = 0.7, 0.5
    opt = exact_ngd(momentum=mu, learning_rate=lr, curvature="ggn")
    state = opt.init(params)
    g1 = grad_of(params, batch)
    u1, state = opt.update(g1, state, params, batch=batch)
    params2 = optax.apply_updates(params, u1)
    g2 = grad_of(params2, batch)
    u2, state = opt.update(g2, state, params2, batch=batch)

    d1 = oracles.damped_solve(oracles.ggn(mlp_apply, CE, params, batch), flat(g1), LAM)
    d2 = oracles.damped_solve(oracles.ggn(mlp_apply, CE, params2, batch), flat(g2), LAM)
    np.testing.assert_allclose(flat(u1), -lr * d1, rtol=1e-7, atol=1e-12)
    expected = -lr * (d2 + mu * d1)
    assert np.linalg.norm(flat(u2) - expected) <= 1e-7 * np.linalg.norm(expected)
    assert np.linalg.norm(flat(u2) + lr * d2) > 1e-3 * np.linalg.norm(expected)  # μ matters


def _exact_preconditioner():
    """M = C + λI exactly (dense): preconditioned CG must then converge in one iteration."""

    def update(state, params, batch, *, apply_fn, loss, damping, key=None):
        matrix = jnp.asarray(oracles.ggn(apply_fn, loss, params, batch)) + damping * jnp.eye(
            flat(params).size
        )
        _, unravel = ravel_pytree(params)

        def mv(v):
            return unravel(matrix @ ravel_pytree(v)[0])

        def inverse(v):
            return unravel(jnp.linalg.solve(matrix, ravel_pytree(v)[0]))

        return operators.Operator(mv, params, inverse=inverse, psd=True), state

    return preconditioners.Preconditioner(lambda params: (), update)


@pytest.mark.parametrize("factory", [natgrad.hessian_free, natgrad.natural_gradient])
def test_the_preconditioner_reaches_cg(factory):
    params, batch = tiny_problem(2)
    g = grad_of(params, batch)
    common = dict(damping=LAM, maxiter=60, tol=1e-10, martens_stop=False)
    counts = {}
    for name, pre in [("none", None), ("exact", _exact_preconditioner())]:
        opt = factory(mlp_apply, CE, curvature="ggn", preconditioner=pre, **common)
        _, state = opt.update(g, opt.init(params), params, batch=batch)
        counts[name] = int(state.cg_iterations)
    assert counts["exact"] == 1, counts  # M⁻¹ r is the exact solution: one iteration
    assert counts["none"] > 5, counts


def test_hessian_free_default_preconditioner_changes_cg():
    params, batch = tiny_problem(3)
    g = grad_of(params, batch)
    its = {}
    for name, pre in [("none", None), ("martens", "martens")]:
        opt = natgrad.hessian_free(
            mlp_apply, CE, preconditioner=pre, damping=1e-3, maxiter=60, martens_stop=False
        )
        _, state = jitted_update(opt)(g, opt.init(params), params, batch=batch)
        its[name] = int(state.cg_iterations)
    assert its["none"] != its["martens"], its


def test_natural_gradient_default_is_five_iterations_preconditioned_by_martens_diagonal():
    params, batch = tiny_problem(3)
    g = grad_of(params, batch)

    def run(**kwargs):
        opt = natgrad.natural_gradient(mlp_apply, CE, damping=1e-3, tol=0.0, **kwargs)
        return jitted_update(opt)(g, opt.init(params), params, batch=batch)

    updates, state = run()
    explicit, _ = run(preconditioner=preconditioners.martens_diagonal(), maxiter=5)
    plain, _ = run(preconditioner=None, maxiter=5)
    assert int(state.cg_iterations) == 5
    np.testing.assert_allclose(flat(updates), flat(explicit), rtol=1e-12)
    assert np.linalg.norm(flat(updates) - flat(plain)) > 1e-3 * np.linalg.norm(flat(plain))
    # The exact solve has nothing to precondition: "martens" leaves it alone.
    dense = natgrad.natural_gradient(mlp_apply, CE, solver="dense")
    assert dense.init(params).preconditioner_state is None


def dense_mlp(params, x):
    for layer in params[:-1]:
        x = jnp.tanh(layers.dense(layer, x))
    return layers.dense(params[-1], x)


def _block_positions(params, layer):
    """Raveled positions of layer's [W; b] in row-major order (entry (j, k) of W̄ at j·n + k)."""
    marked = jax.tree.map(jnp.zeros_like, params)
    w = params[layer]["w"]
    m, n = w.shape
    ids = jnp.arange(1, (m + 1) * n + 1, dtype=w.dtype).reshape(m + 1, n)
    marked[layer] = {"w": ids[:m], "b": ids[m]}
    order = np.asarray(ravel_pytree(marked)[0])
    pos = np.nonzero(order)[0]
    return pos[np.argsort(order[pos])]


def test_kfac_direction_is_the_dense_block_diagonal_solve():
    params = mlp_params(jax.random.PRNGKey(4), [3, 4, 3])
    x = jax.random.normal(jax.random.PRNGKey(5), (16, 3))
    y = jax.random.randint(jax.random.PRNGKey(6), (16,), 0, 3)
    g = grad_of(params, (x, y), dense_mlp)
    opt = natgrad.kfac(
        dense_mlp,
        CE,
        learning_rate=1.0,
        step_rule="fixed",
        damping=LAM,
        inverse_every=1,
        reject_rises=False,
    )
    key = jax.random.PRNGKey(0)
    # The first step has no statistics yet: M = I, a plain gradient step. It folds this batch's
    # statistics in afterwards, and the next step's direction solves with them.
    update = jitted_update(opt)
    first, state = update(g, opt.init(params), params, batch=(x, y), key=key)
    np.testing.assert_allclose(flat(first), -flat(g), rtol=1e-12)
    updates, _ = update(g, state, params, batch=(x, y), key=key)
    factors = state.preconditioner_state.factors
    n = flat(params).size
    m = np.diag(flat(factors.diag) + LAM)  # every block starts diagonal; Kronecker ones below
    for layer in range(2):
        a, gg = np.asarray(factors.a[layer]), np.asarray(factors.g[layer])
        da, dg = (float(v) for v in kronecker.pi_damping(a, gg, LAM))
        block = np.kron(a + da * np.eye(len(a)), gg + dg * np.eye(len(gg)))
        pos = _block_positions(params, layer)
        m[np.ix_(pos, pos)] = block
    assert m.shape == (n, n)
    expected = -np.linalg.solve(m, flat(g))
    np.testing.assert_allclose(flat(updates), expected, rtol=1e-9, atol=1e-12)
    assert int(state.preconditioner_state.registered_layers) == 2


FACTORIES = {
    "natural_gradient": lambda **kw: natgrad.natural_gradient(mlp_apply, CE, **kw),
    "hessian_free": lambda **kw: natgrad.hessian_free(mlp_apply, CE, **kw),
    "kfac": lambda **kw: natgrad.kfac(dense_mlp, CE, **kw),
}
COMMON_FIELDS = ("count", "damping", "step_size", "rho", "step_kl", "rejected_steps")


@pytest.mark.parametrize("name", list(FACTORIES))
@pytest.mark.parametrize(
    "damping", [0.5, natgrad.damping.levenberg_marquardt(0.5, min_damping=0.1)]
)
def test_one_vocabulary(name, damping):
    params, batch = tiny_problem(5)
    schedule = optax.linear_schedule(1.0, 0.25, transition_steps=2)
    opt = FACTORIES[name](learning_rate=schedule, damping=damping, momentum=0.5)
    state = opt.init(params)
    step = jax.jit(lambda p, s, k: opt.update(grad_of(p, batch), s, p, batch=batch, key=k))
    for i in range(3):
        updates, state = step(params, state, jax.random.PRNGKey(i))
        params = optax.apply_updates(params, updates)
        # the schedule caps α (the first trial of the line search): α ≤ lr(count)
        assert float(state.step_size) <= float(schedule(i)) + 1e-12
    for field in COMMON_FIELDS:
        assert jnp.shape(getattr(state, field)) == ()
    assert int(state.count) == 3 and np.isfinite(float(state.damping))
    assert float(state.damping) >= 0.1


def test_constant_schedule_as_learning_rate():
    params, batch = tiny_problem(6)
    for name, make in FACTORIES.items():
        opt = make(
            learning_rate=optax.constant_schedule(0.5), step_rule="fixed", reject_rises=False
        )
        updates, state = opt.update(
            grad_of(params, batch), opt.init(params), params, batch=batch, key=jax.random.PRNGKey(0)
        )
        assert float(state.step_size) == pytest.approx(0.5), name


def test_operators_share_one_protocol():
    params, batch = tiny_problem(7)
    op = curvature.ggn(mlp_apply, CE, params, batch)
    damped = operators.damped(op, LAM)
    dense = np.asarray(damped.to_dense())
    np.testing.assert_allclose(dense, oracles.ggn(mlp_apply, CE, params, batch) + LAM * np.eye(31))
    d = operators.diagonal(jax.tree.map(lambda a: jnp.full_like(a, 2.0), params))
    v = jax.tree.map(jnp.ones_like, params)
    np.testing.assert_allclose(flat(d.inverse()(d(v))), flat(v))
    res = natgrad.solvers.cg(
        damped, op.gradient(), maxiter=60, tol=1e-12, preconditioner=d.inverse()
    )
    np.testing.assert_allclose(
        flat(res.x), np.linalg.solve(dense, flat(op.gradient())), rtol=1e-8, atol=1e-12
    )
    with pytest.raises(ValueError, match="inverse"):
        op.inverse()
