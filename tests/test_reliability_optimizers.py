"""Issue 18, items 1-5: the optimisers under numerical stress and bad input.

Each test reproduces an attempt that broke before (in the comment: what happened) and checks
what must hold now: parameters finite, λ finite and within its bounds, training resumes, a
step that raises the loss or carries a non-finite number is rejected, bad input is refused
with a ValueError naming the argument.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import natgrad
from conftest import jitted_update
from natgrad import layers, losses

CE = losses.softmax_cross_entropy()


def relu_mlp(params, x):
    for layer in params[:-1]:
        x = jax.nn.relu(layers.dense(layer, x))
    return layers.dense(params[-1], x)


def init(sizes=(8, 16, 3), seed=0, dtype=jnp.float32):
    params = []
    for i, (m, n) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        k = jax.random.PRNGKey(seed + i)
        w = (jax.random.normal(k, (m, n)) / math.sqrt(m)).astype(dtype)
        params.append({"w": w, "b": jnp.zeros(n, dtype)})
    return params


def data(n=64, d=8, seed=1, dtype=jnp.float32):
    x = jax.random.normal(jax.random.PRNGKey(seed), (n, d)).astype(dtype)
    y = jnp.argmax(x[:, :3], axis=1).astype(jnp.int32)
    return x, y


FACTORIES = {
    "natural_gradient": natgrad.natural_gradient,
    "hessian_free": natgrad.hessian_free,
    "kfac": natgrad.kfac,
}


def runner(opt):
    def mean_loss(p, x, y):
        return CE.mean(relu_mlp(p, x), y)

    @jax.jit
    def step(params, state, x, y, key):
        value, grads = jax.value_and_grad(mean_loss)(params, x, y)
        updates, state = opt.update(grads, state, params, batch=(x, y), key=key)
        return optax.apply_updates(params, updates), state, value

    return step, jax.jit(mean_loss)


def all_finite(tree):
    return all(bool(jnp.all(jnp.isfinite(a))) for a in jax.tree.leaves(tree))


@pytest.mark.parametrize("name", list(FACTORIES))
def test_fifty_nan_batches_then_fifty_good_ones(name):
    """Before: each rejected step multiplied λ by 10 with no cap: λ = inf after ~40 NaN batches,
    every later good batch rejected forever."""
    opt = FACTORIES[name](relu_mlp, CE)
    step, mean_loss = runner(opt)
    params, (x, y) = init(), data()
    state = opt.init(params)
    lam0 = float(state.damping)
    x_bad = x.at[0, 0].set(jnp.nan)
    for i in range(50):
        params, state, _ = step(params, state, x_bad, y, jax.random.PRNGKey(i))
        assert float(state.damping) == lam0  # a bad batch says nothing about λ
    assert int(state.rejected_steps) == 50 and all_finite(params)
    start = float(mean_loss(params, x, y))
    for i in range(50):
        params, state, _ = step(params, state, x, y, jax.random.PRNGKey(100 + i))
        assert math.isfinite(float(state.damping))
        assert float(state.damping) <= natgrad.damping.MAX_DAMPING
    assert all_finite(params)
    assert int(state.rejected_steps) < 50 + 25  # good batches are taken again
    assert float(mean_loss(params, x, y)) < 0.7 * start


@pytest.mark.parametrize("name", ["natural_gradient", "kfac"])
def test_repeated_refused_steps_keep_damping_bounded_and_recover(name):
    """Steps that always fail (a learning rate of 1e6 with the fixed step rule) raise λ at most to
    max_damping; with a sane rate afterwards the optimiser recovers."""
    rule = natgrad.damping.levenberg_marquardt(1e-2, min_damping=1e-2, max_damping=1e3)
    bad = FACTORIES[name](
        relu_mlp, CE, learning_rate=1e6, step_rule="fixed", damping=rule, reject_rises=True
    )
    step, mean_loss = runner(bad)
    params, (x, y) = init(), data()
    state = bad.init(params)
    start = float(mean_loss(params, x, y))
    for i in range(40):
        params, state, _ = step(params, state, x, y, jax.random.PRNGKey(i))
        assert float(state.damping) <= 1e3
        assert float(mean_loss(params, x, y)) <= start  # before: the loss rose to ~1e12
    assert all_finite(params)
    good = FACTORIES[name](relu_mlp, CE, damping=rule, reject_rises=True)
    step, _ = runner(good)
    state = state._replace(count=jnp.zeros_like(state.count))
    for i in range(40):
        params, state, _ = step(params, state, x, y, jax.random.PRNGKey(50 + i))
    assert float(mean_loss(params, x, y)) < 0.7 * start


def test_kfac_with_a_dead_layer_trains():
    """Before: a zero factor trace (all units of the first layer dead) made π = inf and every
    step was rejected (10/10, λ = 1e7)."""
    params, (x, y) = init(), data()
    params[0]["b"] = jnp.full_like(params[0]["b"], -100.0)
    opt = natgrad.kfac(relu_mlp, CE)
    step, mean_loss = runner(opt)
    state = opt.init(params)
    start = float(mean_loss(params, 5 * x, y))
    for i in range(10):
        params, state, _ = step(params, state, 5 * x, y, jax.random.PRNGKey(i))
    assert int(state.rejected_steps) < 10 and math.isfinite(float(state.damping))
    assert float(mean_loss(params, 5 * x, y)) < start


def test_kfac_with_huge_inputs_stays_finite():
    """Before: inputs × 1e6 → 50/50 steps rejected with λ = inf."""
    params, (x, y) = init(), data()
    opt = natgrad.kfac(relu_mlp, CE)
    step, mean_loss = runner(opt)
    state = opt.init(params)
    for i in range(20):
        params, state, _ = step(params, state, 1e6 * x, y, jax.random.PRNGKey(i))
    assert all_finite(params) and math.isfinite(float(state.damping))
    assert int(state.rejected_steps) < 20


def assert_loss_never_rises(opt, steps=10):
    params, (x, y) = init(), data()
    step, mean_loss = runner(opt)
    state = opt.init(params)
    value = float(mean_loss(params, x, y))
    for i in range(steps):
        params, state, _ = step(params, state, x, y, jax.random.PRNGKey(i))
        new = float(mean_loss(params, x, y))
        assert new <= value
        value = new


def test_kfac_tiny_fixed_damping_never_raises_the_loss():
    """Before: λ = 1e-12 fixed, no trial loss at all: loss 2.4 → ~120 after one step. K-FAC's
    guard against rises costs a forward pass, so it is asked for (off by default)."""
    assert_loss_never_rises(natgrad.kfac(relu_mlp, CE, damping=1e-12, reject_rises=True))


def test_kfac_tiny_fixed_damping_by_default_stays_finite_and_bounded():
    """λ = 1e-12 for 50 steps with K-FAC's defaults: params and λ finite, the loss finite."""
    params, (x, y) = init(), data()
    opt = natgrad.kfac(relu_mlp, CE, damping=1e-12)
    step, mean_loss = runner(opt)
    state = opt.init(params)
    for i in range(50):
        params, state, _ = step(params, state, x, y, jax.random.PRNGKey(i))
    assert all_finite(params) and math.isfinite(float(mean_loss(params, x, y)))
    assert float(state.damping) <= natgrad.damping.MAX_DAMPING


def test_quadratic_rule_refuses_indefinite_curvature():
    """Before: with the Hessian, sᵀ(C + λI)s ≤ 0 was accepted (α clipped) and the loss rose."""
    opt = natgrad.natural_gradient(
        relu_mlp, CE, curvature="hessian", step_rule="quadratic", damping=1e-8, learning_rate=10.0
    )
    assert_loss_never_rises(opt)


def test_hessian_free_raises_a_fixed_damping_after_a_failed_line_search():
    """Before: line-search rejections never raised a fixed λ, so HF stalled (48/50 rejected)."""
    params, (x, y) = init(), data()
    grads = jax.grad(lambda p: CE.mean(relu_mlp(p, x), y))(params)
    ascent = jax.tree.map(jnp.negative, grads)  # no step along it lowers the loss
    opt = natgrad.hessian_free(relu_mlp, CE, damping=1e-4)
    _, state = jitted_update(opt)(ascent, opt.init(params), params, batch=(x, y))
    assert int(state.rejected_steps) == 1 and float(state.damping) > 1e-4


@pytest.mark.parametrize("name", list(FACTORIES))
@pytest.mark.parametrize("label", [-1, 3])
def test_bad_labels_under_jit_are_rejected(name, label):
    """Before: −1 wrapped to the last class; a label ≥ C gave a NaN loss that kfac accepted."""
    params, (x, y) = init(), data()
    y = y.at[0].set(label)  # traced: the eager label check cannot see it under jit
    opt = FACTORIES[name](relu_mlp, CE)
    step, _ = runner(opt)
    new, state, value = step(params, opt.init(params), x, y, jax.random.PRNGKey(0))
    assert not math.isfinite(float(value))
    assert int(state.rejected_steps) == 1
    for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_kfac_in_half_precision(dtype):
    """Before: LAPACK NotImplementedError (no float16/bfloat16 inverse)."""
    params, (x, y) = init(dtype=dtype), data(dtype=dtype)
    opt = natgrad.kfac(relu_mlp, CE)
    step, _ = runner(opt)
    state = opt.init(params)
    for i in range(3):
        params, state, _ = step(params, state, x, y, jax.random.PRNGKey(i))
    assert all(a.dtype == dtype for a in jax.tree.leaves(params)) and all_finite(params)
    assert state.preconditioner_state.factors.a[0].dtype == jnp.float32


def test_mixed_precision_parameters():
    """Before: bfloat16 and float32 leaves → a while_loop carry type error in CG."""
    params, (x, y) = init(), data()
    params[0] = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params[0])
    for name in FACTORIES:
        opt = FACTORIES[name](relu_mlp, CE)
        step, _ = runner(opt)
        new, state, _ = step(params, opt.init(params), x, y, jax.random.PRNGKey(0))
        assert [a.dtype for a in jax.tree.leaves(new)] == [a.dtype for a in jax.tree.leaves(params)]
        assert all_finite(new), name


@pytest.mark.parametrize("name", list(FACTORIES))
def test_bad_parameters_are_refused(name):
    """Before: int params → "cannot convert float NaN to integer"; empty params → IndexError."""
    opt = FACTORIES[name](relu_mlp, CE)
    with pytest.raises(ValueError, match="params"):
        opt.init([{"w": jnp.ones((2, 2), jnp.int32), "b": jnp.zeros(2, jnp.int32)}])
    with pytest.raises(ValueError, match="params"):
        opt.init([])


@pytest.mark.parametrize(
    "make, name",
    [
        (lambda: natgrad.natural_gradient(relu_mlp, CE, learning_rate=math.inf), "learning_rate"),
        (lambda: natgrad.natural_gradient(relu_mlp, CE, learning_rate=math.nan), "learning_rate"),
        (lambda: natgrad.natural_gradient(relu_mlp, CE, kl_radius=math.inf), "kl_radius"),
        (lambda: natgrad.natural_gradient(relu_mlp, CE, warm_start=1.5), "warm_start"),
        (lambda: natgrad.hessian_free(relu_mlp, CE, warm_start=2.0), "warm_start"),
        (lambda: natgrad.kfac(relu_mlp, CE, damping=math.inf), "damping"),
        (lambda: natgrad.hessian_free(relu_mlp, CE, learning_rate=-1.0), "learning_rate"),
        (
            lambda: natgrad.damping.levenberg_marquardt(1.0, min_damping=2.0, max_damping=1.0),
            "min_damping",
        ),
        (lambda: natgrad.damping.levenberg_marquardt(math.inf), "initial"),
        (lambda: natgrad.damping.levenberg_marquardt(1.0, max_damping=math.inf), "max_damping"),
    ],
)
def test_bad_hyperparameters_name_themselves(make, name):
    """Before: inf, warm_start > 1 and min > max damping bounds were accepted."""
    with pytest.raises(ValueError, match=name):
        make()


@pytest.mark.parametrize("name", list(FACTORIES))
def test_schedules_as_learning_rate(name):
    """Before: optax.constant_schedule(0.5) crashed natural_gradient and kfac ('float' object has
    no attribute 'astype'); any schedule crashed hessian_free."""
    params, (x, y) = init(), data()
    for lr in (optax.constant_schedule(0.5), optax.exponential_decay(1.0, 10, 0.5)):
        opt = FACTORIES[name](relu_mlp, CE, learning_rate=lr)
        step, _ = runner(opt)
        new, state, _ = step(params, opt.init(params), x, y, jax.random.PRNGKey(0))
        assert all_finite(new) and float(state.step_size) <= float(lr(0)) + 1e-7


def test_kfac_warns_when_no_layer_is_declared():
    """Before: a model with plain x @ w + b silently got diagonal blocks (0.906 vs 0.940)."""

    def plain(params, x):
        for layer in params[:-1]:
            x = jax.nn.relu(x @ layer["w"] + layer["b"])
        return x @ params[-1]["w"] + params[-1]["b"]

    params, (x, y) = init(), data()
    opt = natgrad.kfac(plain, CE)
    grads = jax.grad(lambda p: CE.mean(plain(p, x), y))(params)
    with pytest.warns(UserWarning, match="natgrad.layers.dense"):
        opt.update(grads, opt.init(params), params, batch=(x, y), key=jax.random.PRNGKey(0))
    declared = natgrad.kfac(relu_mlp, CE)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        declared.update(
            grads, declared.init(params), params, batch=(x, y), key=jax.random.PRNGKey(0)
        )


@pytest.mark.parametrize(
    "make",
    [
        lambda: natgrad.natural_gradient(relu_mlp, CE),
        lambda: natgrad.natural_gradient(
            relu_mlp, CE, preconditioner=natgrad.preconditioners.kfac()
        ),
        lambda: natgrad.hessian_free(relu_mlp, CE),
        lambda: natgrad.kfac(relu_mlp, CE, statistics_every=1, inverse_every=2),
        lambda: natgrad.kfac(
            relu_mlp, CE, inverse_every=2, input_factor_rank=2, output_factor_rank=2
        ),
        lambda: natgrad.kfac(relu_mlp, CE, eigenvalue_correction=True),
    ],
    ids=[
        "natural_gradient",
        "ngd_kfac_preconditioner",
        "hessian_free",
        "kfac",
        "kfac_low_rank",
        "ekfac",
    ],
)
def test_the_state_can_be_donated_to_a_jitted_step(make):
    """A training loop donates params and state (`jax.jit(..., donate_argnums=(0, 1))`) so that
    XLA updates K-FAC's factors in place. Before, `init` put one zero array in several fields
    (and K-FAC's inverses shared their factors' arrays): XLA refused with "Attempt to donate
    the same buffer twice". (`kfac_low_rank`: the 9-wide input factor and the 16-wide output
    factor get rank-2 inverses.)"""
    params = init()
    x, y = data()
    opt = make()

    def step(params, state, key):
        value, grads = jax.value_and_grad(lambda p: CE.mean(relu_mlp(p, x), y))(params)
        updates, state = opt.update(grads, state, params, batch=(x, y), key=key, value=value)
        return optax.apply_updates(params, updates), state, value

    donated = jax.jit(step, donate_argnums=(0, 1))
    params, state = jax.tree.map(jnp.copy, params), opt.init(params)
    values = []
    for i in range(4):  # the outputs of one call are the donated inputs of the next
        params, state, value = donated(params, state, jax.random.PRNGKey(i))
        values.append(float(value))
    assert all(np.isfinite(values)) and values[-1] < values[0]


def test_the_guards_finiteness_check_sees_every_non_finite_entry():
    """`_tree.all_finite` (every guard's check) sums a · 0 per leaf: exactly 0, or NaN when any
    entry is ±inf or NaN; large finite values must not read as overflow."""
    from natgrad import _tree

    check = jax.jit(_tree.all_finite)
    ok = {"w": jnp.full((3, 4), 3e38), "n": jnp.arange(3), "b": jnp.array([True])}
    assert bool(check(ok)) and _tree.all_finite({}) is True
    for bad in (jnp.inf, -jnp.inf, jnp.nan):
        tree = dict(ok, w=ok["w"].at[2, 1].set(bad))
        assert not bool(check(tree)), bad
    assert not bool(check([jnp.ones(2), jnp.array([jnp.nan], jnp.bfloat16)]))
