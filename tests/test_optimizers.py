"""natural_gradient and hessian_free as optax transformations."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

import natgrad
import oracles
from conftest import jitted_update, mlp_apply, mlp_params
from natgrad import damping as damping_lib
from natgrad import losses, step_rules
from natgrad.solvers import backtrack

CE = losses.softmax_cross_entropy()


def linear_apply(params, x):
    return x @ params["w"] + params["b"]


def classification(seed=0, n=200, d=5, k=3, noise=1.0):
    """Overlapping classes: the logistic-regression optimum is finite."""
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
    x = jax.random.normal(k1, (n, d))
    w_true = jax.random.normal(k2, (d, k))
    y = jnp.argmax(x @ w_true + noise * jax.random.gumbel(k3, (n, k)), axis=-1)
    return x, y


def train(opt, params, batch, steps, apply_fn=mlp_apply, loss=CE, key=None):
    state = opt.init(params)

    @jax.jit
    def step(params, state, key):
        value, grads = jax.value_and_grad(lambda p: loss.mean(apply_fn(p, batch[0]), batch[1]))(
            params
        )
        updates, state = opt.update(grads, state, params, batch=batch, key=key)
        return optax.apply_updates(params, updates), state, value

    key = jax.random.PRNGKey(42) if key is None else key
    values = []
    for i in range(steps):
        params, state, value = step(params, state, jax.random.fold_in(key, i))
        values.append(float(value))
    final = float(loss.mean(apply_fn(params, batch[0]), batch[1]))
    return params, state, values + [final]


def newton_optimum(loss, params, batch, apply_fn, iters=30):
    """Reference optimum by dense damped Newton in float64."""
    flat, unravel = ravel_pytree(params)

    def f(v):
        return loss.mean(apply_fn(unravel(v), batch[0]), batch[1])

    for _ in range(iters):
        g, h = jax.grad(f)(flat), jax.hessian(f)(flat)
        flat = flat - jnp.linalg.lstsq(h + 1e-12 * jnp.eye(flat.size), g)[0]
    return float(f(flat))


def test_logistic_regression_is_newton_converges_in_ten_steps():
    x, y = classification()
    params = {"w": jnp.zeros((5, 3)), "b": jnp.zeros(3)}
    opt = natgrad.natural_gradient(
        linear_apply,
        CE,
        curvature="fisher",
        step_rule="fixed",
        learning_rate=1.0,
        damping=1e-10,
        maxiter=60,
        tol=1e-14,
    )
    _, _, values = train(opt, params, (x, y), 10, apply_fn=linear_apply)
    best = newton_optimum(CE, params, (x, y), linear_apply)
    assert values[-1] - best < 1e-8
    # Plain gradient descent with a good step is still far away after 10x as many steps.
    _, _, sgd_values = train(optax.sgd(1.0), params, (x, y), 100, apply_fn=linear_apply)
    assert sgd_values[-1] - best > 1e-6


def test_linear_least_squares_one_ggn_step_is_exact():
    k1, k2 = jax.random.split(jax.random.PRNGKey(1))
    x = jax.random.normal(k1, (40, 6))
    y = jax.random.normal(k2, (40, 2))
    params = {"w": jnp.zeros((6, 2)), "b": jnp.zeros(2)}
    opt = natgrad.natural_gradient(
        linear_apply,
        losses.squared_error(),
        curvature="ggn",
        step_rule="fixed",
        damping=1e-12,
        maxiter=20,
        tol=1e-14,
    )
    new, _, _ = train(opt, params, (x, y), 1, apply_fn=linear_apply, loss=losses.squared_error())
    xa = jnp.concatenate([x, jnp.ones((40, 1))], axis=1)
    sol = jnp.linalg.lstsq(xa, y)[0]
    np.testing.assert_allclose(new["w"], sol[:6], atol=1e-8)
    np.testing.assert_allclose(new["b"], sol[6], atol=1e-8)


def small_mlp_problem(seed=0):
    x, y = classification(seed, n=64, d=4, k=3)
    params = mlp_params(jax.random.PRNGKey(seed + 1), [4, 8, 3])
    return params, (x, y)


@pytest.mark.parametrize("curvature", natgrad.curvature.CURVATURES)
def test_every_curvature_decreases_the_training_loss(curvature):
    params, batch = small_mlp_problem()
    opt = natgrad.natural_gradient(mlp_apply, CE, curvature=curvature)
    _, state, values = train(opt, params, batch, 30)
    assert values[-1] < 0.8 * values[0]
    assert all(np.isfinite(values))
    # Full batch: a step whose trial loss rises is rejected, so the loss never goes up.
    assert all(b <= a + 1e-12 for a, b in zip(values, values[1:], strict=False))
    if curvature != "hessian":  # PSD curvatures: every step decreased the loss
        assert int(state.rejected_steps) == 0
    else:  # the indefinite Hessian's rises were rejected, not taken
        assert int(state.rejected_steps) < 30


@pytest.mark.parametrize("delta", [1e-4, 1e-3])
def test_kl_trust_region_bounds_the_measured_kl(delta):
    params, (x, y) = small_mlp_problem(1)
    opt = natgrad.natural_gradient(
        mlp_apply,
        CE,
        step_rule="kl",
        kl_radius=delta,
        learning_rate=1e3,
        damping=1e-3,
        maxiter=30,
    )
    state = opt.init(params)
    grads = jax.grad(lambda p: CE.mean(mlp_apply(p, x), y))(params)
    updates, state = opt.update(grads, state, params, batch=(x, y))
    new = optax.apply_updates(params, updates)
    logp, logq = jax.nn.log_softmax(mlp_apply(params, x)), jax.nn.log_softmax(mlp_apply(new, x))
    kl = float(jnp.mean(jnp.sum(jnp.exp(logp) * (logp - logq), axis=-1)))
    assert abs(kl - delta) <= 0.25 * delta
    np.testing.assert_allclose(state.step_kl, delta, rtol=1e-6)


def test_levenberg_marquardt_rule():
    rule = damping_lib.levenberg_marquardt(1.0)
    lam = jnp.asarray(2.0)
    assert float(rule.update(lam, jnp.asarray(0.1))) == pytest.approx(3.0)
    assert float(rule.update(lam, jnp.asarray(0.9))) == pytest.approx(4 / 3)
    assert float(rule.update(lam, jnp.asarray(0.5))) == pytest.approx(2.0)
    assert float(rule.update(lam, jnp.asarray(-jnp.inf))) == pytest.approx(3.0)


def test_lm_damping_rises_after_a_bad_step_and_falls_after_a_good_one():
    params, (x, y) = small_mlp_problem(2)
    grads = jax.grad(lambda p: CE.mean(mlp_apply(p, x), y))(params)
    lm = damping_lib.levenberg_marquardt(1.0)
    # A step 50x too long: the quadratic model badly overpredicts the decrease (rho < 1/4).
    big = natgrad.natural_gradient(mlp_apply, CE, step_rule="fixed", learning_rate=50.0, damping=lm)
    _, s = big.update(grads, big.init(params), params, batch=(x, y))
    assert float(s.rho) < 0.25 and float(s.damping) > 1.0
    # A short step: the model is accurate (rho > 3/4).
    small = natgrad.natural_gradient(
        mlp_apply, CE, step_rule="fixed", learning_rate=0.05, damping=lm
    )
    _, s = small.update(grads, small.init(params), params, batch=(x, y))
    assert float(s.rho) > 0.75 and float(s.damping) < 1.0


@pytest.mark.parametrize("make", ["natural_gradient", "hessian_free"])
def test_nan_batch_leaves_parameters_unchanged(make):
    params, (x, y) = small_mlp_problem(3)
    opt = getattr(natgrad, make)(mlp_apply, CE)
    state = opt.init(params)
    x_bad = x.at[3, 1].set(jnp.nan)
    grads = jax.grad(lambda p: CE.mean(mlp_apply(p, x_bad), y))(params)

    @jax.jit
    def step(params, state):
        updates, state = opt.update(grads, state, params, batch=(x_bad, y))
        return optax.apply_updates(params, updates), state

    new, new_state = step(params, state)
    for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(a, b)
    assert int(new_state.rejected_steps) == 1
    # A non-finite batch says nothing about λ: it stays (issue 18: 40 NaN batches in a row
    # used to push λ to inf for good).
    assert float(new_state.damping) == float(state.damping)
    assert all(np.all(np.isfinite(a)) for a in jax.tree.leaves(new_state.direction))
    # Training goes on with good data afterwards.
    good = jax.grad(lambda p: CE.mean(mlp_apply(p, x), y))(new)
    updates, s2 = opt.update(good, new_state, new, batch=(x, y))
    assert int(s2.rejected_steps) == 1
    assert any(float(jnp.abs(u).max()) > 0 for u in jax.tree.leaves(updates))


def test_full_step_under_jit_and_optax_chain():
    params, batch = small_mlp_problem(4)
    opt = optax.chain(
        optax.add_decayed_weights(1e-4),
        optax.clip_by_global_norm(10.0),
        natgrad.natural_gradient(mlp_apply, CE, learning_rate=optax.linear_schedule(1.0, 0.5, 20)),
    )
    _, state, values = train(opt, params, batch, 20)
    assert values[-1] < values[0]
    ng_state = state[2]
    assert isinstance(ng_state, natgrad.NaturalGradientState)
    assert int(ng_state.count) == 20 and int(ng_state.cg_iterations) >= 1


def test_fisher_mc_needs_a_key_and_missing_arguments_fail_loudly():
    params, (x, y) = small_mlp_problem()
    opt = natgrad.natural_gradient(mlp_apply, CE, curvature="fisher_mc")
    state = opt.init(params)
    with pytest.raises(ValueError, match="key"):
        opt.update(params, state, params, batch=(x, y))
    with pytest.raises(ValueError, match="batch"):
        opt.update(params, state, params)
    with pytest.raises(ValueError, match="params"):
        opt.update(params, state, batch=(x, y), key=jax.random.PRNGKey(0))


@pytest.mark.parametrize(
    "kwargs,name",
    [
        ({"curvature": "fishr"}, "curvature"),
        ({"damping": -1.0}, "damping"),
        ({"maxiter": 0}, "maxiter"),
        ({"step_rule": "wolfe"}, "step_rule"),
        ({"learning_rate": -1.0}, "learning_rate"),
        ({"momentum": 1.0}, "momentum"),
        ({"preconditioner": "diag"}, "preconditioner"),
    ],
)
def test_bad_arguments_name_themselves(kwargs, name):
    with pytest.raises(ValueError, match=name):
        natgrad.natural_gradient(mlp_apply, CE, **kwargs)


def test_bad_arguments_hessian_free():
    with pytest.raises(ValueError, match="maxiter"):
        natgrad.hessian_free(mlp_apply, CE, maxiter=0)
    with pytest.raises(ValueError, match="loss"):
        natgrad.hessian_free(mlp_apply, "ce")
    with pytest.raises(ValueError, match="damping"):
        natgrad.hessian_free(mlp_apply, CE, damping=-3.0)


def test_batch_that_does_not_fit_the_model():
    params, (x, y) = small_mlp_problem()
    opt = natgrad.natural_gradient(mlp_apply, CE)
    state = opt.init(params)
    with pytest.raises(ValueError, match="batch"):
        opt.update(params, state, params, batch=(x, y[:10]))
    with pytest.raises(ValueError, match="targets"):
        opt.update(params, state, params, batch=(x, y + 10))


def test_momentum_and_preconditioner_train():
    params, batch = small_mlp_problem(5)
    opt = natgrad.natural_gradient(
        mlp_apply, CE, momentum=0.5, preconditioner=natgrad.preconditioners.martens_diagonal()
    )
    _, state, values = train(opt, params, batch, 20)
    assert values[-1] < 0.8 * values[0] and int(state.rejected_steps) == 0


# Hessian-free ------------------------------------------------------------------------------


def test_hessian_free_trains_a_small_mlp():
    """Full-batch, Martens' recipe as published: LM damping with no floor."""
    params, batch = small_mlp_problem(6)
    martens = natgrad.damping.levenberg_marquardt(1.0)
    opt = natgrad.hessian_free(mlp_apply, CE, maxiter=30, damping=martens)
    _, state, values = train(opt, params, batch, 15)
    assert values[-1] < 0.5 * values[0]
    assert all(b <= a + 1e-12 for a, b in zip(values, values[1:], strict=False))  # monotone
    assert int(state.cg_iterations) >= 1


def test_hessian_free_default_damping_has_a_floor():
    """The default LM rule never takes λ below MIN_DAMPING (mini-batch robustness), and still
    decreases the loss monotonically on a full batch."""
    from natgrad.optimizers.defaults import HESSIAN_FREE_MIN_DAMPING as MIN_DAMPING

    params, batch = small_mlp_problem(6)
    opt = natgrad.hessian_free(mlp_apply, CE, maxiter=30)
    _, state, values = train(opt, params, batch, 15)
    assert float(state.damping) == pytest.approx(MIN_DAMPING)  # ρ > ¾ pushed it to the floor
    assert values[-1] < 0.6 * values[0]
    assert all(b <= a + 1e-12 for a, b in zip(values, values[1:], strict=False))


def test_hessian_free_rejects_a_step_that_cannot_decrease_the_loss():
    params, (x, y) = small_mlp_problem(7)
    opt = natgrad.hessian_free(mlp_apply, CE)
    state = opt.init(params)
    grads = jax.grad(lambda p: CE.mean(mlp_apply(p, x), y))(params)
    ascent = jax.tree.map(jnp.negative, grads)  # a right-hand side that points uphill
    updates, new_state = opt.update(ascent, state, params, batch=(x, y))
    assert all(float(jnp.abs(u).max()) == 0 for u in jax.tree.leaves(updates))
    assert int(new_state.rejected_steps) == 1
    assert float(new_state.damping) > float(state.damping)


def test_hessian_free_uses_the_eval_batch_for_trial_losses():
    params, (x, y) = small_mlp_problem(8)
    opt = natgrad.hessian_free(mlp_apply, CE)
    grads = jax.grad(lambda p: CE.mean(mlp_apply(p, x), y))(params)
    _, s_same = opt.update(grads, opt.init(params), params, batch=(x, y))
    _, s_eval = opt.update(grads, opt.init(params), params, batch=(x, y), eval_batch=(x[:8], y[:8]))
    assert float(s_same.rho) != float(s_eval.rho)


def test_backtracking_keeps_the_earliest_iterate_before_the_loss_rises_again():
    class Res:
        saved = jnp.arange(6.0)  # iterate j is the scalar j
        saved_steps = jnp.array([5, 7, 9, 11, -1, -1])

    losses_by_iterate = jnp.array([3.0, 1.0, 2.0, 2.5, 9.0, 9.0])
    j, f = backtrack(Res, lambda d: losses_by_iterate[d.astype(int)])
    assert int(j) == 1 and float(f) == 1.0
    # Monotone: the last one is best.
    j, _ = backtrack(Res, lambda d: -d)
    assert int(j) == 3


def _line_search(trial, f0, f_unit, slope, *, lr, c, shrink, max_steps):
    rule = step_rules.line_search(c, shrink, max_steps)
    zero = jnp.asarray(0.0)
    q = step_rules.StepQuantities(
        lr=jnp.asarray(lr),
        gs=slope,
        sqs=zero,
        sas=zero,
        sfs=zero,
        f0=f0,
        trial=trial,
        f_unit=f_unit,
    )
    alpha, ok, value = rule.step_size(q)
    return alpha, value, ok


def test_armijo_line_search():
    # f(alpha) = (alpha - 0.3)^2 with slope 0.6 at 0 along the direction; f0 = 0.09.
    f = lambda a: (a - 0.3) ** 2  # noqa: E731
    alpha, value, ok = _line_search(
        f,
        jnp.asarray(0.09),
        f(jnp.asarray(1.0)),
        jnp.asarray(0.6),
        lr=1.0,
        c=1e-2,
        shrink=0.8,
        max_steps=20,
    )
    assert bool(ok) and value <= 0.09 - 1e-2 * alpha * 0.6
    assert float(alpha) == pytest.approx(0.8**3)  # 1, .8, .64 fail; .512 passes
    _, _, ok = _line_search(
        f,
        jnp.asarray(0.09),
        f(jnp.asarray(1.0)),
        jnp.asarray(-0.6),
        lr=1.0,
        c=1e-2,
        shrink=0.8,
        max_steps=5,
    )
    assert not bool(ok)


def test_armijo_line_search_counts_its_trials_and_uses_a_known_unit_loss():
    # f_unit known and α₀ = 1: the first trial is free; α₀ ≠ 1 or f_unit unknown: evaluated.
    # The same α in every case (1, .8, .64 fail; .512 passes).
    f = lambda a: (a - 0.3) ** 2  # noqa: E731
    f0, slope = jnp.asarray(0.09), jnp.asarray(0.6)
    kw = dict(c=1e-2, shrink=0.8, max_steps=20)
    for f_unit, lr, evaluated in ((f(jnp.asarray(1.0)), 1.0, 3), (None, 1.0, 4), (0.0, 0.8, 3)):
        calls = []

        def trial(a, calls=calls):
            jax.debug.callback(lambda a: calls.append(float(a)), a)
            return f(a)

        unit = None if f_unit is None else jnp.asarray(f_unit)
        alpha, value, ok = _line_search(trial, f0, unit, slope, lr=lr, **kw)
        assert bool(ok) and float(alpha) == pytest.approx(0.8**3)
        assert len(calls) == evaluated
        assert calls[-1] == pytest.approx(0.8**3)


def _copies_of_sine(fn, *args) -> int:
    return jax.jit(fn).lower(*args).as_text().count("sine")


def test_backtracking_and_line_search_hold_one_copy_of_the_loss():
    # Each loop evaluates the loss inside itself only: one copy of the model in the program.
    class Res:
        saved = jnp.arange(6.0)
        saved_steps = jnp.array([5, 7, 9, 11, -1, -1])

    assert _copies_of_sine(lambda s: backtrack(Res, lambda d: jnp.sin(d * s))[1], 1.0) == 1
    for f_unit in (None, jnp.asarray(0.5)):

        def search(s, f_unit=f_unit):
            trial = lambda a: jnp.sin(a * s) + 1.0  # noqa: E731
            return _line_search(
                trial,
                jnp.asarray(0.0),
                f_unit,
                jnp.asarray(1.0),
                lr=1.0,
                c=0.1,
                shrink=0.5,
                max_steps=5,
            )[0]

        assert _copies_of_sine(search, 1.0) == 1


def test_float32_parameters_stay_float32():
    params, (x, y) = small_mlp_problem(9)
    params = jax.tree.map(lambda a: a.astype(jnp.float32), params)
    x = x.astype(jnp.float32)
    for opt in (natgrad.natural_gradient(mlp_apply, CE), natgrad.hessian_free(mlp_apply, CE)):
        new, state, values = train(opt, params, (x, y), 3)
        assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(new))
        assert state.damping.dtype == jnp.float32 and np.isfinite(values[-1])


@pytest.mark.parametrize(
    "make, solver",
    [
        (natgrad.natural_gradient, "cg"),
        (natgrad.natural_gradient, "dense"),
        (natgrad.hessian_free, "dense"),
    ],
)
def test_curvature_batch_solves_with_the_first_examples_curvature_and_the_whole_gradient(
    make, solver
):
    """Martens' curvature mini-batch: d = (C_n + λI)⁻¹ g with C_n the GGN of every ⌈B/n⌉-th
    example (here every 4th of 16) and g the caller's gradient of the whole batch (dense
    float64 oracle)."""
    params, (x, y) = small_mlp_problem(3)
    batch, n, lam = (x[:16], y[:16]), 5, 0.1
    flat, unravel = ravel_pytree(params)
    g = oracles.gradient(mlp_apply, CE, params, batch)
    kwargs = dict(
        curvature="ggn",
        damping=lam,
        step_rule="fixed",
        learning_rate=1.0,
        warm_start=0.0,
        reject_rises=False,
        solver=solver,
    )
    if solver == "cg":
        kwargs |= dict(maxiter=200, tol=1e-13)
    if make is natgrad.hessian_free:
        kwargs |= dict(preconditioner=None)

    def update(curvature_batch):
        opt = make(mlp_apply, CE, curvature_batch=curvature_batch, **kwargs)
        updates, _ = jitted_update(opt)(unravel(g), opt.init(params), params, batch=batch)
        return np.asarray(ravel_pytree(updates)[0])

    every_4th = oracles.ggn(mlp_apply, CE, params, (x[:16:4], y[:16:4]))
    sub = update(n)
    np.testing.assert_allclose(sub, -oracles.damped_solve(every_4th, g, lam), rtol=1e-7, atol=1e-10)
    whole = -oracles.damped_solve(oracles.ggn(mlp_apply, CE, params, batch), g, lam)
    np.testing.assert_allclose(update(None), whole, rtol=1e-7, atol=1e-10)
    assert np.max(np.abs(sub - whole)) > 1e-3 * np.max(np.abs(whole))


@pytest.mark.parametrize("make", [natgrad.natural_gradient, natgrad.hessian_free, natgrad.kfac])
@pytest.mark.parametrize("value", [0, -4, 2.5, "8"])
def test_bad_curvature_batch_names_itself(make, value):
    with pytest.raises(ValueError, match="curvature_batch"):
        make(mlp_apply, CE, curvature_batch=value)


def test_curvature_examples_are_strided_and_at_most_n():
    from natgrad.optimizers._pipeline import curvature_examples

    x, y = jnp.arange(1024.0)[:, None], jnp.arange(1024)
    for size, n, rows in (
        (1024, 512, range(0, 1024, 2)),
        (1000, 512, range(0, 1000, 2)),
        (1024, 300, range(0, 1024, 4)),
        (1024, 1, [0]),
    ):
        (cx, cy), whole = curvature_examples((x[:size], y[:size]), n)
        assert not whole and len(cy) <= n
        np.testing.assert_array_equal(cy, list(rows))
        np.testing.assert_array_equal(cx[:, 0], cy.astype(cx.dtype))
    for n in (128, 512, None):
        batch = (x[:128], y[:128])
        got, whole = curvature_examples(batch, n)
        assert whole and got is batch


@pytest.mark.parametrize("make", [natgrad.natural_gradient, natgrad.hessian_free])
def test_cg_optimisers_trace_one_curvature_product(make, monkeypatch):
    # CG's loop body holds the one product with C: its quadratic model along d comes from CG
    # (natural gradient: Cd from the residual; Hessian-free's backtracked iterate: dᵀCd from
    # its saved φ), not from another product after the loop.
    from natgrad.curvature import CurvatureOperator

    calls = []
    original = CurvatureOperator.mv

    def counted(self, v):
        calls.append(1)
        return original(self, v)

    monkeypatch.setattr(CurvatureOperator, "mv", counted)
    params, (x, y) = small_mlp_problem(3)
    opt = make(mlp_apply, CE)
    grads = jax.grad(lambda p: CE.mean(mlp_apply(p, x), y))(params)
    jax.jit(lambda g, s, p: opt.update(g, s, p, batch=(x, y))).lower(
        grads, opt.init(params), params
    )
    assert len(calls) == 1
