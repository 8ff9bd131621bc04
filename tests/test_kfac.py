"""K-FAC: layer registration, Kronecker factors against dense float64 oracles, the optimiser."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import natgrad
import oracles
from conftest import mlp_params, train_step
from natgrad import curvature, kronecker, layers, losses, preconditioners
from natgrad.experiments import models


def dense_mlp(params, x, act=jnp.tanh):
    for layer in params[:-1]:
        x = act(layers.dense(layer, x))
    return layers.dense(params[-1], x)


def plain_mlp(params, x):
    for layer in params[:-1]:
        x = jnp.tanh(x @ layer["w"] + layer["b"])
    return x @ params[-1]["w"] + params[-1]["b"]


def linear_net(params, x):
    return dense_mlp(params, x, act=lambda h: h)


def damped_kron(a, g, lam):
    tr_a, tr_g = np.trace(a) / a.shape[0], np.trace(g) / g.shape[0]
    pi = np.sqrt(tr_a / tr_g)
    return np.kron(a + pi * np.sqrt(lam) * np.eye(len(a)), g + np.sqrt(lam) / pi * np.eye(len(g)))


# --- registration ----------------------------------------------------------------------------


def test_dense_is_plain_jax_and_a_probe_changes_no_forward_value():
    params = mlp_params(jax.random.PRNGKey(0), [3, 4, 2])
    x = jax.random.normal(jax.random.PRNGKey(1), (5, 3))
    np.testing.assert_array_equal(dense_mlp(params, x), plain_mlp(params, x))
    no_bias = {"w": params[0]["w"]}
    np.testing.assert_array_equal(layers.dense(no_bias, x), x @ no_bias["w"])

    tags = [
        (jnp.zeros((m + 1, m + 1)), jnp.zeros((n, n))) for _, m, n, _ in layers.find_dense(params)
    ]
    record = layers.Record()
    probed = layers.instrument(params, tags, record)
    assert isinstance(probed[0], layers.DenseProbe) and probed[0]["w"] is params[0]["w"]
    np.testing.assert_array_equal(dense_mlp(probed, x), plain_mlp(params, x))
    assert record.used == {0, 1}
    # Direct indexing still works on a probe; it just registers nothing.
    record = layers.Record()
    np.testing.assert_array_equal(
        plain_mlp(layers.instrument(params, tags, record), x), plain_mlp(params, x)
    )
    assert record.used == set()


def test_only_dense_looking_dicts_are_candidates():
    assert layers.is_dense_params({"w": jnp.ones((2, 3)), "b": jnp.ones(3)})
    assert layers.is_dense_params({"w": jnp.ones((2, 3))})
    assert not layers.is_dense_params({"w": jnp.ones((2, 3)), "b": jnp.ones(2)})
    assert not layers.is_dense_params({"w": jnp.ones(3)})
    assert not layers.is_dense_params({"w": jnp.ones((2, 3)), "scale": jnp.ones(3)})
    tree = {"a": [{"w": jnp.ones((2, 3)), "b": jnp.ones(3)}], "s": jnp.ones(4)}
    assert layers.find_dense(tree) == ((0, 2, 3, True),)


def test_experiment_models_declare_every_layer_and_compute_the_same():
    x = jax.random.uniform(jax.random.PRNGKey(1), (4, 6), jnp.float32)
    for model in (models.mlp((6, 5, 3)), models.autoencoder((6, 4, 2, 4, 6))):
        params = model.init(jax.random.PRNGKey(0))
        batch = (x, model.targets(x, jnp.zeros(4, jnp.int32)))
        seen = {}

        def stats(p, batch, model=model, seen=seen):
            f, seen["registered"], _ = kronecker.statistics(
                model.apply, model.loss, p, batch, key=jax.random.PRNGKey(2)
            )
            return f

        jax.eval_shape(stats, params, batch)  # registration is known at trace time
        assert seen["registered"] == (True,) * len(params)
    model = models.mlp((6, 5, 3))
    params = model.init(jax.random.PRNGKey(0))
    np.testing.assert_array_equal(model.apply(params, x), plain_relu(params, x))


def plain_relu(params, x):
    for layer in params[:-1]:
        x = jax.nn.relu(x @ layer["w"] + layer["b"])
    return x @ params[-1]["w"] + params[-1]["b"]


# --- factors against dense oracles ------------------------------------------------------------


@pytest.mark.parametrize("bias", [True, False])
def test_single_linear_layer_kronecker_product_is_the_exact_ggn(bias):
    key = jax.random.PRNGKey(0)
    params = {"w": jax.random.normal(key, (3, 2))}
    if bias:
        params["b"] = jax.random.normal(jax.random.PRNGKey(1), (2,))
    x = jax.random.normal(jax.random.PRNGKey(2), (7, 3))
    y = jax.random.normal(jax.random.PRNGKey(3), (7, 2))
    loss = losses.squared_error()
    f, registered, _ = kronecker.statistics(
        layers.dense, loss, params, (x, y), key=key, curvature="fisher"
    )
    assert registered == (True,) and f.a[0].shape == ((4, 4) if bias else (3, 3))
    pos = oracles.kron_positions(params, lambda p: p)
    ggn = np.asarray(curvature.ggn(layers.dense, loss, params, (x, y)).to_dense())
    np.testing.assert_allclose(np.kron(f.a[0], f.g[0]), ggn[np.ix_(pos, pos)], atol=1e-12)
    assert sorted(pos) == list(range(len(pos)))  # the block is the whole GGN


def test_linear_net_blocks_equal_the_fisher_blocks_in_expectation():
    """In a linear net with squared error, g = W₂ᵀ-backpropagated noise ε ~ N(0, I) independent of
    the layer inputs, so E[A ⊗ G] is exactly the Fisher's diagonal block."""
    params = mlp_params(jax.random.PRNGKey(0), [3, 4, 2])
    x = jax.random.normal(jax.random.PRNGKey(1), (16, 3))
    y = jax.random.normal(jax.random.PRNGKey(2), (16, 2))
    loss = losses.squared_error()
    fisher = np.asarray(curvature.fisher(linear_net, loss, params, (x, y)).to_dense())

    def blocks(key, fisher_type):
        f, _, _ = kronecker.statistics(
            linear_net, loss, params, (x, y), key=key, curvature=fisher_type
        )
        return [jnp.kron(a, g) for a, g in zip(f.a, f.g, strict=True)]

    oracles.assert_kron_blocks_match(blocks, fisher, params, num=400, atol=1e-12)


def test_applied_inverse_solves_the_damped_kronecker_system_densely():
    """Two tanh layers registered, one extra parameter on a diagonal block."""
    params = {"mlp": mlp_params(jax.random.PRNGKey(0), [3, 4, 2]), "scale": jnp.ones(2)}

    def apply(p, x):
        return p["scale"] * dense_mlp(p["mlp"], x)

    x = jax.random.normal(jax.random.PRNGKey(1), (8, 3))
    y = jax.random.randint(jax.random.PRNGKey(2), (8,), 0, 2)
    loss, lam = losses.softmax_cross_entropy(), 1e-2
    pre = preconditioners.kfac(inverse_every=1, statistics_every=1, ema_decay=0.5)
    flat, unravel = ravel_pytree(params)
    v = jax.random.normal(jax.random.PRNGKey(5), flat.shape)

    @jax.jit
    def two_updates(params):  # the second averages and refreshes
        state = pre.init(params)
        for i in range(2):
            m, state = pre.update(
                state,
                params,
                (x, y),
                apply_fn=apply,
                loss=loss,
                damping=lam,
                key=jax.random.PRNGKey(i),
            )
        return state, ravel_pytree(m.inverse()(unravel(v)))[0]

    state, got = two_updates(params)
    m = np.diag(np.asarray(ravel_pytree(state.factors.diag)[0]) + lam)
    for layer in range(2):
        pos = oracles.kron_positions(params, lambda p, layer=layer: p["mlp"][layer])
        a, g = np.asarray(state.factors.a[layer]), np.asarray(state.factors.g[layer])
        m[np.ix_(pos, pos)] = damped_kron(a, g, lam)
    np.testing.assert_allclose(got, np.linalg.solve(m, v), rtol=1e-9, atol=1e-12)


# --- the optimiser -----------------------------------------------------------------------------


def test_kfac_trains_a_small_mnist_mlp_under_jit():
    data = pytest.importorskip("natgrad.experiments.data").load_dataset("mnist-5k")
    model = models.mlp((784, 32, 10))
    params = model.init(jax.random.PRNGKey(0))
    opt = natgrad.kfac(model.apply, model.loss)
    state = opt.init(params)
    step = train_step(opt, model.apply, model.loss)
    x, y = jnp.asarray(data.x_train[:1024]), jnp.asarray(data.y_train[:1024])
    values = []
    for i in range(40):
        sl = slice(128 * (i % 8), 128 * (i % 8 + 1))
        params, state, value = step(params, state, (x[sl], y[sl]), jax.random.PRNGKey(i))
        values.append(float(value))
    assert int(state.rejected_steps) == 0 and int(state.preconditioner_state.registered_layers) == 2
    assert np.mean(values[-8:]) < 0.4 * np.mean(values[:2])
    assert 0 < float(state.step_kl) <= 1e-3 * (1 + 1e-5)


@pytest.mark.parametrize(
    "options",
    [
        {"momentum": 0.5},
        {"damping": natgrad.damping.levenberg_marquardt(1e-2)},
        {"curvature": "fisher"},
        {"fisher_type": "exact"},
        {"curvature": "empirical_fisher"},
    ],
)
def test_kfac_variants_take_finite_steps_that_lower_the_loss(options):
    params = mlp_params(jax.random.PRNGKey(0), [4, 6, 3])
    x = jax.random.normal(jax.random.PRNGKey(1), (32, 4))
    y = jnp.argmax(x[:, :3], axis=1)
    loss = losses.softmax_cross_entropy()
    opt = natgrad.kfac(dense_mlp, loss, kl_radius=1e-2, **options)
    state, step = opt.init(params), train_step(opt, dense_mlp, loss)
    values = []
    for i in range(4):
        params, state, value = step(params, state, (x, y), jax.random.PRNGKey(i))
        values.append(float(value))
    assert int(state.rejected_steps) == 0 and values[-1] < values[0]
    if "damping" in options:
        assert np.isfinite(float(state.rho))


def test_unregistered_layers_fall_back_to_a_diagonal_block():
    params = mlp_params(jax.random.PRNGKey(0), [3, 4, 2])
    x = jax.random.normal(jax.random.PRNGKey(1), (8, 3))
    y = jax.random.randint(jax.random.PRNGKey(2), (8,), 0, 2)
    loss = losses.softmax_cross_entropy()

    def half(p, x):  # first layer declared, second written by hand
        return jnp.tanh(layers.dense(p[0], x)) @ p[1]["w"] + p[1]["b"]

    for apply, count in ((plain_mlp, 0), (half, 1), (dense_mlp, 2)):
        opt = natgrad.kfac(apply, loss)
        state = train_step(opt, apply, loss)(
            params, opt.init(params), (x, y), jax.random.PRNGKey(3)
        )[1]
        assert int(state.preconditioner_state.registered_layers) == count
        diag = state.preconditioner_state.factors.diag
        assert bool(jnp.all(diag[1]["w"] > 0)) == (count < 2)
        assert bool(jnp.all(diag[0]["w"] == 0)) == (count >= 1)
    # The diagonal block alone: Δ = g / (d + λ).
    curv = kronecker.init(params)
    curv = curv._replace(factors=curv.factors._replace(diag=jax.tree.map(jnp.ones_like, params)))
    out = kronecker.apply_inverse(curv, 1.0, (False, False), jax.tree.map(jnp.ones_like, params))
    for leaf in jax.tree.leaves(out):
        np.testing.assert_allclose(leaf, 0.5)


def test_a_nan_batch_leaves_params_and_state_unchanged():
    params = mlp_params(jax.random.PRNGKey(0), [3, 4, 2])
    x = jax.random.normal(jax.random.PRNGKey(1), (8, 3))
    y = jax.random.randint(jax.random.PRNGKey(2), (8,), 0, 2)
    loss = losses.softmax_cross_entropy()
    opt = natgrad.kfac(dense_mlp, loss)
    step = train_step(opt, dense_mlp, loss)
    params1, state, _ = step(params, opt.init(params), (x, y), jax.random.PRNGKey(0))
    params2, state2, _ = step(params1, state, (x.at[0, 0].set(jnp.nan), y), jax.random.PRNGKey(1))
    for a, b in zip(jax.tree.leaves(params1), jax.tree.leaves(params2), strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(
        jax.tree.leaves(state.preconditioner_state),
        jax.tree.leaves(state2.preconditioner_state),
        strict=True,
    ):
        np.testing.assert_array_equal(a, b)
    assert int(state2.rejected_steps) == 1 and float(state2.step_size) == 0.0


@pytest.mark.parametrize("statistics_every", [1, 5])
def test_a_refused_step_folds_none_of_its_statistics(statistics_every):
    """K-FAC folds a step's statistics in after its verdict: a finite batch whose step is
    refused (the loss rose) must leave the averages, inverses and counters as they were."""
    params = mlp_params(jax.random.PRNGKey(0), [3, 4, 2])
    x = jax.random.normal(jax.random.PRNGKey(1), (8, 3))
    y = jax.random.randint(jax.random.PRNGKey(2), (8,), 0, 2)
    loss = losses.softmax_cross_entropy()
    good = natgrad.kfac(dense_mlp, loss, statistics_every=statistics_every, inverse_every=1)
    params, state, _ = train_step(good, dense_mlp, loss)(
        params, good.init(params), (x, y), jax.random.PRNGKey(0)
    )
    assert int(state.preconditioner_state.updates) == 1
    wild = natgrad.kfac(
        dense_mlp,
        loss,
        learning_rate=1e6,
        step_rule="fixed",
        reject_rises=True,
        statistics_every=statistics_every,
        inverse_every=1,
    )
    step = train_step(wild, dense_mlp, loss)
    after = state
    for i in range(3):
        _, after, _ = step(params, after, (x, y), jax.random.PRNGKey(1 + i))
    assert int(after.rejected_steps) == 3
    for a, b in zip(
        jax.tree.leaves(state.preconditioner_state),
        jax.tree.leaves(after.preconditioner_state),
        strict=True,
    ):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"learning_rate": -1.0}, "learning_rate"),
        ({"kl_radius": 0.0}, "kl_radius"),
        ({"damping": 0.0}, "damping"),
        ({"damping": "big"}, "damping"),
        ({"momentum": 1.0}, "momentum"),
        ({"ema_decay": 1.0}, "ema_decay"),
        ({"inverse_every": 0}, "inverse_every"),
        ({"inverse_every": 2.5}, "inverse_every"),
        ({"fisher_type": "ggn"}, "fisher_type"),
        ({"curvature": "hessian"}, "curvature"),
        ({"curvature": "gauss"}, "curvature"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(kwargs, name):
    with pytest.raises(ValueError, match=name):
        natgrad.kfac(dense_mlp, losses.softmax_cross_entropy(), **kwargs)


def test_bad_calls_raise_value_error_naming_the_argument():
    params = mlp_params(jax.random.PRNGKey(0), [3, 4, 2])
    x, y = jnp.ones((4, 3)), jnp.zeros(4, jnp.int32)
    loss = losses.softmax_cross_entropy()
    with pytest.raises(ValueError, match="loss"):
        natgrad.kfac(dense_mlp, "cross-entropy")
    opt = natgrad.kfac(dense_mlp, loss)
    state = opt.init(params)

    def update(opt, **kwargs):
        return jax.jit(lambda p: opt.update(p, state, p, **kwargs))(params)

    with pytest.raises(ValueError, match="key"):
        update(opt, batch=(x, y))
    with pytest.raises(ValueError, match="batch"):
        update(opt, key=jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="targets"):
        update(opt, batch=(x, y + 5), key=jax.random.PRNGKey(0))
    empirical = natgrad.kfac(dense_mlp, loss, curvature="empirical_fisher")
    update(empirical, batch=(x, y))  # the empirical Fisher needs no key


# --- K-FAC as a preconditioner; flax --------------------------------------------------------


def test_kfac_preconditioner_in_natural_gradient_and_hessian_free():
    params = mlp_params(jax.random.PRNGKey(0), [4, 6, 3])
    x = jax.random.normal(jax.random.PRNGKey(1), (32, 4))
    y = jnp.argmax(x[:, :3], axis=1)
    loss = losses.softmax_cross_entropy()
    for opt in (
        natgrad.natural_gradient(dense_mlp, loss, preconditioner=preconditioners.kfac()),
        natgrad.hessian_free(dense_mlp, loss, preconditioner=preconditioners.kfac(), maxiter=10),
    ):
        state, step = opt.init(params), train_step(opt, dense_mlp, loss)
        p, values = params, []
        for i in range(2):
            p, state, value = step(p, state, (x, y), jax.random.PRNGKey(i))
            values.append(float(value))
        assert int(state.rejected_steps) == 0 and values[-1] < values[0]


def test_a_flax_mlp_registers_its_layers_and_gets_the_plain_jax_update():
    nn = pytest.importorskip("flax.linen")

    class Dense(nn.Module):
        features: int

        @nn.compact
        def __call__(self, x):
            self.param("w", nn.initializers.lecun_normal(), (x.shape[-1], self.features))
            self.param("b", nn.initializers.normal(0.1), (self.features,))
            return layers.dense(self.variables["params"], x)

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = jnp.tanh(Dense(4)(x))  # Dense_0
            return Dense(2)(h)

    x = jax.random.normal(jax.random.PRNGKey(1), (8, 3))
    y = jax.random.randint(jax.random.PRNGKey(2), (8,), 0, 2)
    module, loss = MLP(), losses.softmax_cross_entropy()
    variables = module.init(jax.random.PRNGKey(0), x)
    same = [variables["params"][f"Dense_{i}"] for i in range(2)]  # the same weights, plain JAX

    def update(apply, params):
        opt = natgrad.kfac(apply, loss, inverse_every=1)
        grads = jax.grad(lambda p: loss.mean(apply(p, x), y))(params)
        return opt.update(grads, opt.init(params), params, batch=(x, y), key=jax.random.PRNGKey(3))

    flax_updates, flax_state = jax.jit(lambda v: update(module.apply, v))(variables)
    plain_updates, _ = jax.jit(lambda p: update(dense_mlp, p))(same)
    assert int(flax_state.preconditioner_state.registered_layers) == 2
    for i in range(2):
        for k in ("w", "b"):
            np.testing.assert_allclose(
                flax_updates["params"][f"Dense_{i}"][k], plain_updates[i][k], rtol=1e-10
            )


def test_non_finite_statistics_and_inverses_are_dropped_and_flagged():
    """K-FAC folds a step's statistics in after the step, so nothing rejects them there: an
    update with non-finite statistics keeps the averages, a refresh of non-finite factors keeps
    the inverses, and `finite` says so."""
    params = [{"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}]
    state = kronecker.init(params)
    registered = (True,)
    ones = state.factors._replace(a=(jnp.eye(4),), g=(jnp.eye(2),))
    good = kronecker.update(state, ones, 1e-3, registered, ema_decay=0.9, refresh=True)
    assert bool(good.finite) and int(good.updates) == 1
    assert float(jnp.abs(good.inverses.a[0]).sum()) > 0
    nan = ones._replace(a=(jnp.full((4, 4), jnp.nan),))
    bad = kronecker.update(good, nan, 1e-3, registered, ema_decay=0.9, refresh=False)
    assert not bool(bad.finite) and int(bad.updates) == 1
    np.testing.assert_array_equal(bad.factors.a[0], good.factors.a[0])
    poisoned = good._replace(factors=nan)
    refreshed = kronecker.refresh_inverses(poisoned, 1e-2, registered, True)
    assert not bool(refreshed.finite)
    np.testing.assert_array_equal(refreshed.inverses.a[0], good.inverses.a[0])
    assert float(refreshed.inverse_damping) == float(good.inverse_damping)
    assert bool(kronecker.refresh_inverses(poisoned, 1e-3, registered, False).finite)


@pytest.mark.parametrize("eigh_max_width", [kronecker.EIGH_MAX_WIDTH, 6])
def test_refreshed_inverses_invert_every_damped_factor(monkeypatch, eigh_max_width):
    """Factors of widths 13, 12, 7, 5 and 3 (A's with their bias): one batched eigh inverts
    those no wider than `EIGH_MAX_WIDTH` (padded with identity blocks, grouped by width), LU
    the wider ones; each must be the damped factor's inverse, in float64."""
    monkeypatch.setattr(kronecker, "EIGH_MAX_WIDTH", eigh_max_width)
    params = mlp_params(jax.random.PRNGKey(0), [12, 6, 4, 3])
    state = kronecker.init(params)
    keys = iter(jax.random.split(jax.random.PRNGKey(1), 8))

    def spd(f):
        x = jax.random.normal(next(keys), (f.shape[0], 2 * f.shape[0]), jnp.float64)
        return x @ x.T / x.shape[1]

    factors = state.factors._replace(
        a=tuple(spd(a) for a in state.factors.a), g=tuple(spd(g) for g in state.factors.g)
    )
    lam = 0.3
    state = kronecker.refresh_inverses(state._replace(factors=factors), lam, (True,) * 3, True)
    assert bool(state.finite)
    for a, g, a_inv, g_inv in zip(factors.a, factors.g, *state.inverses, strict=True):
        da, dg = kronecker.pi_damping(a, g, lam)
        for m, d, inv in ((a, da, a_inv), (g, dg, g_inv)):
            want = np.linalg.inv(np.asarray(m) + float(d) * np.eye(m.shape[0]))
            np.testing.assert_allclose(inv, want, rtol=1e-9, atol=1e-12)


def test_inverse_of_a_slightly_indefinite_factor_is_positive_definite_and_bounded():
    """A factor is PSD in exact arithmetic; rounding (float32 running averages, reductions
    across devices) can leave eigenvalues slightly below 0, below −d even when the damping d is
    tiny. Then the damped factor is indefinite and its exact inverse (what LU returned) has a
    negative eigenvalue: an uphill preconditioner. The batched eigh clamps the damped
    eigenvalues at d, so the inverse is positive definite and no larger than 1/d."""
    params = mlp_params(jax.random.PRNGKey(0), [40, 6, 3])
    state = kronecker.init(params)
    x = jax.random.normal(jax.random.PRNGKey(3), (41, 10), jnp.float64)
    v = jax.random.normal(jax.random.PRNGKey(4), (41,), jnp.float64)
    v = v - x @ jnp.linalg.lstsq(x, v)[0]  # in the null space of x xᵀ
    a = x @ x.T - 1e-4 * jnp.outer(v, v) / (v @ v)  # eigenvalue −1e-4 along v
    g = tuple(g + jnp.eye(g.shape[0]) for g in state.factors.g)
    factors = state.factors._replace(a=(a, state.factors.a[1] + jnp.eye(7)), g=g)
    state = kronecker.refresh_inverses(state._replace(factors=factors), 1e-12, (True, True), True)
    da, _ = kronecker.pi_damping(a, g[0], 1e-12)
    assert float(da) < 1e-4  # so a + d I is indefinite
    inv = np.asarray(state.inverses.a[0])
    eig = np.linalg.eigvalsh(inv)
    assert bool(state.finite) and np.allclose(inv, inv.T)
    assert eig.min() > 0 and eig.max() <= 1.0001 / float(da)


def test_curvature_batch_takes_the_statistics_of_the_first_examples_only():
    """`curvature_batch=n`: the factors are those of every ⌈B/n⌉-th example (the same state as
    K-FAC given only them), the step the caller's gradient of the whole batch."""
    params = mlp_params(jax.random.PRNGKey(0), [3, 4, 2])
    x = jax.random.normal(jax.random.PRNGKey(1), (12, 3))
    y = jax.random.randint(jax.random.PRNGKey(2), (12,), 0, 2)
    loss = losses.softmax_cross_entropy()
    grads = jax.grad(lambda p: loss.mean(dense_mlp(p, x), y))(params)
    key = jax.random.PRNGKey(3)

    def update(opt, batch):
        @jax.jit
        def run(batch):
            state = opt.init(params)
            for _ in range(2):  # the second step uses the first one's factors
                updates, state = opt.update(grads, state, params, batch=batch, key=key)
            return updates, state.preconditioner_state

        return run(batch)

    sub, sub_state = update(natgrad.kfac(dense_mlp, loss, curvature_batch=5), (x, y))
    ref, ref_state = update(natgrad.kfac(dense_mlp, loss), (x[::3], y[::3]))  # ⌈12/5⌉ = 3
    whole, whole_state = update(natgrad.kfac(dense_mlp, loss, curvature_batch=None), (x, y))
    got, expected = jax.tree.leaves((sub, sub_state)), jax.tree.leaves((ref, ref_state))
    for a, b in zip(got, expected, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)
    assert not np.allclose(sub_state.factors.a[0], whole_state.factors.a[0])
