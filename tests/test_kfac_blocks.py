"""K-FAC blocks beyond dense layers on vectors: convolutions (KFC) and dense layers over extra
axes (expand / reduce), against dense float64 GGN oracles (tests/oracles.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import natgrad
import oracles
from conftest import train
from natgrad import kronecker, layers, losses, preconditioners

SQUARED = losses.squared_error()


def ggn_oracle(apply_fn, params, batch):
    """The dense GGN of the squared error (tests/oracles.py) with outputs flattened per example
    (squared error sums over every output axis, so flattening changes nothing)."""
    x, y = batch
    flat = lambda p, x: apply_fn(p, x).reshape(x.shape[0], -1)  # noqa: E731
    return oracles.ggn(flat, SQUARED, params, (x, y.reshape(y.shape[0], -1)))


def damped_kron(a, g, lam):
    pi = np.sqrt((np.trace(a) / a.shape[0]) / (np.trace(g) / g.shape[0]))
    return np.kron(a + pi * np.sqrt(lam) * np.eye(len(a)), g + np.sqrt(lam) / pi * np.eye(len(g)))


def factors(apply_fn, params, batch, curvature="ggn", weight_sharing="expand", key=None):
    f, registered, _ = kronecker.statistics(
        apply_fn,
        SQUARED,
        params,
        batch,
        key=jax.random.PRNGKey(0) if key is None else key,
        curvature=curvature,
        weight_sharing=weight_sharing,
    )
    assert all(registered)
    return f


def conv_params(key, kh, kw, c_in, c_out, bias=True):
    kw_, kb = jax.random.split(key)
    p = {"w": jax.random.normal(kw_, (kh, kw, c_in, c_out)) / np.sqrt(kh * kw * c_in)}
    if bias:
        p["b"] = 0.1 * jax.random.normal(kb, (c_out,))
    return p


# --- conv2d: plain JAX --------------------------------------------------------------------------


CONV_CASES = [
    ((1, 1), "SAME", True),
    ((2, 1), "VALID", True),
    ((2, 2), ((1, 0), (2, 1)), False),
]


@pytest.mark.parametrize("strides, padding, bias", CONV_CASES)
def test_conv2d_is_flax_conv(strides, padding, bias):
    nn = pytest.importorskip("flax.linen")
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 7, 6, 3))
    conv = nn.Conv(4, (3, 2), strides=strides, padding=padding, use_bias=bias)
    variables = conv.init(jax.random.PRNGKey(0), x)
    if bias:  # flax starts at b = 0: move it so a dropped bias shows
        variables = {"params": {**variables["params"], "bias": jnp.arange(4.0)}}
    p = variables["params"]
    ours = {"w": p["kernel"], **({"b": p["bias"]} if bias else {})}
    want = conv.apply(variables, x)
    got = layers.conv2d(ours, x, strides=strides, padding=padding)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_conv2d_probe_changes_no_forward_value_and_registers_the_slot():
    params = [conv_params(jax.random.PRNGKey(0), 3, 3, 2, 3), {"w": jnp.ones((3, 2))}]
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 5, 5, 2))

    def apply(p, x):
        return layers.dense(p[1], jnp.mean(layers.conv2d(p[0], x, strides=(2, 2)), axis=(1, 2)))

    slots = layers.find_layers(params)
    assert [(s.kind, s.m, s.n, s.has_bias) for s in slots] == [
        ("conv2d", 18, 3, True),
        ("dense", 3, 2, False),
    ]
    tags = [(jnp.zeros((s.m + 1, s.m + 1)), jnp.zeros((s.n, s.n))) for s in slots]
    record = layers.Record()
    probed = layers.instrument(params, tags, record)
    assert isinstance(probed[0], layers.LayerProbe)
    np.testing.assert_array_equal(apply(probed, x), apply(params, x))
    assert record.used == {0, 1}


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"strides": (0, 1)}, "strides"),
        ({"strides": 2}, "strides"),
        ({"padding": "FULL"}, "padding"),
        ({"padding": ((1, 1),)}, "padding"),
        ({"padding": ((1, -1), (0, 0))}, "padding"),
    ],
)
def test_conv2d_bad_options_raise_value_error_naming_them(kwargs, name):
    params = conv_params(jax.random.PRNGKey(0), 3, 3, 2, 3)
    with pytest.raises(ValueError, match=name):
        layers.conv2d(params, jnp.ones((1, 5, 5, 2)), **kwargs)


def test_conv2d_takes_numpy_integers_and_lists_for_its_options():
    params = conv_params(jax.random.PRNGKey(0), 3, 3, 2, 3)
    x = jax.random.normal(jax.random.PRNGKey(1), (1, 5, 5, 2))
    got = layers.conv2d(params, x, strides=[np.int64(2), 1], padding=[(1, np.int32(0)), (1, 1)])
    want = layers.conv2d(params, x, strides=(2, 1), padding=((1, 0), (1, 1)))
    np.testing.assert_array_equal(got, want)


def test_layers_reject_mismatched_params_and_inputs_naming_them():
    conv = conv_params(jax.random.PRNGKey(0), 3, 3, 2, 3)
    with pytest.raises(ValueError, match="x"):
        layers.conv2d(conv, jnp.ones((1, 5, 5, 3)))  # c_in 3, kernel wants 2
    with pytest.raises(ValueError, match="x"):
        layers.conv2d(conv, jnp.ones((5, 5, 2)))  # not NHWC
    with pytest.raises(ValueError, match="params"):
        layers.conv2d({"w": jnp.ones((3, 2))}, jnp.ones((1, 5, 5, 3)))
    with pytest.raises(ValueError, match="params"):
        layers.dense(conv, jnp.ones((1, 2)))
    with pytest.raises(ValueError, match="x"):
        layers.dense({"w": jnp.ones((3, 2))}, jnp.ones((4, 2)))
    with pytest.raises(ValueError, match="weight_sharing"):
        natgrad.kfac(lambda p, x: x, SQUARED, weight_sharing="pool")
    with pytest.raises(ValueError, match="weight_sharing"):
        preconditioners.kfac(weight_sharing=None)


# --- conv2d: Kronecker blocks against the dense GGN ------------------------------------------


def linear_conv_net(conv_options):
    """conv (kh × kw, the options) then a 1×1 conv: a per-pixel linear map, squared error per
    pixel. Every output pixel's loss depends on its own patch only, through the same
    Jacobian, so KFC's factorisation is exact for both layers (expand)."""

    def apply(p, x):
        return layers.conv2d(p[1], layers.conv2d(p[0], x, **conv_options), padding="VALID")

    return apply


@pytest.mark.parametrize("strides, padding, bias", CONV_CASES)
def test_conv_kronecker_blocks_equal_the_dense_ggn_blocks_where_kfc_is_exact(
    strides, padding, bias
):
    apply = linear_conv_net({"strides": strides, "padding": padding})
    params = [
        conv_params(jax.random.PRNGKey(0), 3, 2, 2, 3, bias),
        conv_params(jax.random.PRNGKey(1), 1, 1, 3, 2, True),
    ]
    x = jax.random.normal(jax.random.PRNGKey(2), (3, 6, 5, 2))
    y = jax.random.normal(jax.random.PRNGKey(3), apply(params, x).shape)
    ggn = ggn_oracle(apply, params, (x, y))
    f = factors(apply, params, (x, y))
    assert f.a[0].shape == ((3 * 2 * 2 + bias,) * 2) and f.g[1].shape == (2, 2)
    for layer in range(2):
        pos = oracles.kron_positions(params, lambda p, layer=layer: p[layer])
        block = ggn[np.ix_(pos, pos)]
        assert np.abs(block).max() > 1e-2
        np.testing.assert_allclose(np.kron(f.a[layer], f.g[layer]), block, atol=1e-11)
    # Not a tautology: with a non-linearity in between, positions couple through the second
    # layer's Jacobian only via the activations' slopes, and KFC is an approximation.
    tanh_net = lambda p, x: layers.conv2d(  # noqa: E731
        p[1], jnp.tanh(layers.conv2d(p[0], x, strides=strides, padding=padding)), padding="VALID"
    )
    pos = oracles.kron_positions(params, lambda p: p[0])
    f = factors(tanh_net, params, (x, y))
    block = ggn_oracle(tanh_net, params, (x, y))[np.ix_(pos, pos)]
    assert np.abs(np.kron(f.a[0], f.g[0]) - block).max() > 1e-3


def test_conv_patches_follow_the_kernel_flattening():
    """A asymmetric in (kh, kw, c_in): a wrong patch order would permute A's rows against W's."""
    params = [conv_params(jax.random.PRNGKey(0), 2, 3, 2, 1, bias=False)]
    x = jax.random.normal(jax.random.PRNGKey(1), (1, 4, 5, 2))

    def apply(p, x):
        return layers.conv2d(p[0], x, padding="VALID")

    f = factors(apply, params, (x, jnp.zeros((1, 3, 3, 1))))
    patches = np.stack(
        [np.asarray(x[0, i : i + 2, j : j + 3, :]).reshape(-1) for i in range(3) for j in range(3)]
    )
    np.testing.assert_allclose(f.a[0], patches.T @ patches / 9, atol=1e-12)
    np.testing.assert_allclose(f.g[0], [[9.0]], atol=1e-12)  # one output channel, 9 pixels


def test_conv_applied_inverse_is_a_dense_damped_solve_of_the_factored_blocks():
    """conv → tanh → mean pool → dense, with an extra scale on a diagonal block; both weight
    sharings; the preconditioner under jit."""
    params = {
        "conv": conv_params(jax.random.PRNGKey(0), 3, 3, 2, 3),
        "head": {"w": jax.random.normal(jax.random.PRNGKey(1), (3, 2)), "b": jnp.zeros(2)},
        "scale": jnp.ones(2),
    }

    def apply(p, x):
        h = jnp.tanh(layers.conv2d(p["conv"], x, strides=(2, 1)))
        return p["scale"] * layers.dense(p["head"], jnp.mean(h, axis=(1, 2)))

    x = jax.random.normal(jax.random.PRNGKey(2), (6, 5, 5, 2))
    y = jax.random.randint(jax.random.PRNGKey(3), (6,), 0, 2)
    loss, lam = losses.softmax_cross_entropy(), 1e-2
    flat, unravel = ravel_pytree(params)
    v = jax.random.normal(jax.random.PRNGKey(5), flat.shape)
    for sharing in ("expand", "reduce"):
        pre = preconditioners.kfac(
            inverse_every=1, statistics_every=1, ema_decay=0.5, weight_sharing=sharing
        )

        @jax.jit
        def two_updates(params, pre=pre):
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
            return (
                state,
                ravel_pytree(m.inverse()(unravel(v)))[0],
                ravel_pytree(m.mv(unravel(v)))[0],
            )

        state, got, product = two_updates(params)
        assert {k: int(c) for k, c in state.registered_by_kind.items()} == {
            "dense": 1,
            "conv2d": 1,
            "embedding": 0,
            "scale_shift": 0,
        }
        m = np.diag(np.asarray(ravel_pytree(state.factors.diag)[0]) + lam)
        for slot, name in enumerate(("conv", "head")):
            pos = oracles.kron_positions(params, lambda p, name=name: p[name])
            a, g = np.asarray(state.factors.a[slot]), np.asarray(state.factors.g[slot])
            m[np.ix_(pos, pos)] = damped_kron(a, g, lam)
        np.testing.assert_allclose(got, np.linalg.solve(m, v), rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(product, m @ v, rtol=1e-9, atol=1e-12)


def test_conv_sampled_fisher_blocks_match_the_exact_ones_in_expectation():
    """fisher_mc's G is an average of sampled g gᵀ whose expectation is the exact G; A does not
    depend on the targets. The tolerance is 5 standard errors of the sample mean."""
    apply = linear_conv_net({"strides": (1, 1), "padding": "SAME"})
    params = [
        conv_params(jax.random.PRNGKey(0), 3, 3, 1, 2),
        conv_params(jax.random.PRNGKey(1), 1, 1, 2, 2),
    ]
    x = jax.random.normal(jax.random.PRNGKey(2), (2, 4, 4, 1))
    y = jnp.zeros(apply(params, x).shape)
    ggn = ggn_oracle(apply, params, (x, y))

    def blocks(key, curvature):
        f = factors(apply, params, (x, y), curvature=curvature, key=key)
        return [jnp.kron(a, g) for a, g in zip(f.a, f.g, strict=True)]

    oracles.assert_kron_blocks_match(blocks, ggn, params, num=300, atol=1e-11)


# --- dense over extra axes: expand vs reduce --------------------------------------------------


def per_position_net(p, x):
    """(B, T, d) → dense → dense, squared error at every position: expand is exact."""
    return layers.dense(p[1], layers.dense(p[0], x))


def pooled_net(p, x):
    """(B, T, d) → dense → mean over T → dense, squared error on (B, k): reduce is exact."""
    return layers.dense(p[1], jnp.mean(layers.dense(p[0], x), axis=1))


def shared_params():
    return [
        {"w": jax.random.normal(jax.random.PRNGKey(0), (3, 4)), "b": jnp.arange(4.0) / 4},
        {"w": jax.random.normal(jax.random.PRNGKey(1), (4, 2)), "b": jnp.ones(2)},
    ]


@pytest.mark.parametrize(
    "net, exact",
    [(per_position_net, "expand"), (pooled_net, "reduce")],
    ids=["per-position", "pooled"],
)
def test_each_weight_sharing_is_exact_in_its_own_setting_and_only_there(net, exact):
    params = shared_params()
    x = jax.random.normal(jax.random.PRNGKey(2), (3, 5, 3))
    y = jax.random.normal(jax.random.PRNGKey(3), net(params, x).shape)
    pos = oracles.kron_positions(params, lambda p: p[0])
    block = ggn_oracle(net, params, (x, y))[np.ix_(pos, pos)]
    other = "reduce" if exact == "expand" else "expand"
    f = factors(net, params, (x, y), weight_sharing=exact)
    np.testing.assert_allclose(np.kron(f.a[0], f.g[0]), block, atol=1e-11)
    f = factors(net, params, (x, y), weight_sharing=other)
    gap = np.abs(np.kron(f.a[0], f.g[0]) - block).max()
    assert gap > 0.05 * np.abs(block).max(), gap


def test_weight_sharing_changes_nothing_for_a_layer_on_vectors():
    params = shared_params()
    x = jax.random.normal(jax.random.PRNGKey(2), (6, 3))
    y = jax.random.normal(jax.random.PRNGKey(3), (6, 2))
    ggn = ggn_oracle(per_position_net, params, (x, y))
    for sharing in ("expand", "reduce"):
        f = factors(per_position_net, params, (x, y), weight_sharing=sharing)
        pos = oracles.kron_positions(params, lambda p: p[1])
        np.testing.assert_allclose(np.kron(f.a[1], f.g[1]), ggn[np.ix_(pos, pos)], atol=1e-11)


def test_a_per_example_sequence_layer_with_a_unit_batch_axis_gets_the_batched_factors():
    """An equinox-style model vmapped over examples: dense(p, x[None])[0] on one (T, d)
    example gives the same expand and reduce factors as the batched call."""

    def per_example(p, x):  # x: (T, d), one example
        h = layers.dense(p[0], x[None])[0]
        return layers.dense(p[1], jnp.mean(h, axis=0))

    def vmapped(p, x):
        return jax.vmap(per_example, in_axes=(None, 0))(p, x)

    params = shared_params()
    x = jax.random.normal(jax.random.PRNGKey(2), (3, 5, 3))
    y = jax.random.normal(jax.random.PRNGKey(3), (3, 2))
    for sharing in ("expand", "reduce"):
        want = factors(pooled_net, params, (x, y), weight_sharing=sharing)
        got = factors(vmapped, params, (x, y), weight_sharing=sharing)
        for a, b in zip(jax.tree.leaves(got[:2]), jax.tree.leaves(want[:2]), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


# --- a small CNN trains ----------------------------------------------------------------------


def cnn_init(key):
    k1, k2, k3 = jax.random.split(key, 3)
    return {
        "conv1": conv_params(k1, 3, 3, 1, 4),
        "conv2": conv_params(k2, 3, 3, 4, 6),
        "head": {"w": jax.random.normal(k3, (6 * 2 * 2, 3)) / np.sqrt(24), "b": jnp.zeros(3)},
    }


def cnn(p, x):
    """(B, 8, 8, 1) → conv 3×3 → relu → 2×2 avg pool → conv 3×3 → relu → 2×2 pool → dense."""

    def pool(h):
        b, hh, ww, c = h.shape
        return h.reshape(b, hh // 2, 2, ww // 2, 2, c).mean(axis=(2, 4))

    h = pool(jax.nn.relu(layers.conv2d(p["conv1"], x)))
    h = pool(jax.nn.relu(layers.conv2d(p["conv2"], h)))
    return layers.dense(p["head"], h.reshape(h.shape[0], -1))


@pytest.mark.parametrize("sharing", ["expand", "reduce"])
def test_a_small_cnn_trains_with_kfac_under_jit(sharing):
    key = jax.random.PRNGKey(0)
    x = jax.random.normal(key, (64, 8, 8, 1))
    y = (jnp.mean(x[:, :4], axis=(1, 2, 3)) > 0).astype(jnp.int32) + (
        jnp.mean(x[:, :, :4], axis=(1, 2, 3)) > 0
    ).astype(jnp.int32)
    params = cnn_init(jax.random.PRNGKey(1))
    loss = losses.softmax_cross_entropy()
    opt = natgrad.kfac(cnn, loss, weight_sharing=sharing, inverse_every=2, statistics_every=1)

    params, state, values = train(opt, cnn, loss, params, [(x, y)] * 6)
    curv = state.preconditioner_state
    assert int(state.rejected_steps) == 0 and int(curv.registered_layers) == 3
    counts = {k: int(v) for k, v in curv.registered_by_kind.items()}
    assert counts == {"dense": 1, "conv2d": 2, "embedding": 0, "scale_shift": 0}
    assert all(np.isfinite(values)) and all(np.all(np.isfinite(a)) for a in jax.tree.leaves(params))
    assert values[-1] < 0.9 * values[0], values
    assert [a.shape for a in curv.factors.a] == [(10, 10), (37, 37), (25, 25)]
