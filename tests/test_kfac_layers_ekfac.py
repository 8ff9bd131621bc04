"""K-FAC blocks beyond dense layers: scale-and-shift, embeddings, and EKFAC, against float64
dense oracles (tests/oracles.py) on tiny models."""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import natgrad
import oracles
from conftest import mlp_params, train
from natgrad import ekfac, kronecker, layers, losses, preconditioners


def positions(params, pick):
    """Ravel positions of the leaves `pick(index_tree)` returns (a leaf or a list of leaves)."""
    flat, unravel = ravel_pytree(params)
    index = unravel(jnp.arange(flat.size, dtype=flat.dtype))
    leaves = pick(index)
    leaves = leaves if isinstance(leaves, list | tuple) else [leaves]
    return np.concatenate([np.asarray(leaf).reshape(-1) for leaf in leaves]).astype(int)


def one_update(apply, loss, params, batch, lam, updates=1, **options):
    """The damped K-FAC operator M as a dense matrix after `updates` updates on `batch`
    (statistics every step, only the newest kept; inverses every `inverse_every`), and its
    state."""
    options = {"curvature": "fisher", "ema_decay": 0.0, "inverse_every": 1} | options
    pre = preconditioners.kfac(statistics_every=1, **options)

    @jax.jit
    def run(params):
        state = pre.init(params)
        for i in range(updates):
            m, state = pre.update(
                state,
                params,
                batch,
                apply_fn=apply,
                loss=loss,
                damping=lam,
                key=jax.random.PRNGKey(i),
            )
        return m.to_dense(), m.inverse().to_dense(), state

    dense, inverse, state = run(params)
    # M⁻¹ (the factored inverses) inverts M (the damped products), on every block.
    np.testing.assert_allclose(inverse @ dense, np.eye(len(dense)), atol=1e-9)
    return np.asarray(dense), state


# --- the layers on ordinary params --------------------------------------------------------------


def test_layers_are_plain_jax_on_ordinary_params():
    x = jax.random.normal(jax.random.PRNGKey(0), (5, 3, 4))
    p = {"scale": jnp.arange(4.0), "bias": -jnp.ones(4)}
    np.testing.assert_array_equal(layers.scale_shift(p, x), x * p["scale"] + p["bias"])
    np.testing.assert_array_equal(layers.scale_shift({"scale": p["scale"]}, x), x * p["scale"])
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    want = (x - mean) / jnp.sqrt(var + 1e-6) * p["scale"] + p["bias"]
    np.testing.assert_allclose(layers.layer_norm(p, x), want, rtol=1e-12, atol=1e-12)
    table = {"embedding": jax.random.normal(jax.random.PRNGKey(1), (7, 3))}
    ids = jnp.array([[0, 6, 6], [2, 1, 0]])
    np.testing.assert_array_equal(layers.embedding(table, ids), table["embedding"][ids])


def test_layer_norm_matches_flax():
    nn = pytest.importorskip("flax.linen")
    x = jax.random.normal(jax.random.PRNGKey(0), (4, 6))
    module = nn.LayerNorm(param_dtype=jnp.float64)
    variables = module.init(jax.random.PRNGKey(1), x)
    params = {"scale": jnp.linspace(0.5, 2, 6), "bias": jnp.linspace(-1, 1, 6)}
    np.testing.assert_allclose(
        layers.layer_norm(params, x), module.apply({"params": params}, x), rtol=1e-12, atol=1e-12
    )
    assert set(variables["params"]) == {"scale", "bias"}  # the same parameter tree


@pytest.mark.parametrize(
    "call, params, arg, name",
    [
        (layers.embedding, {"w": jnp.ones((5, 3))}, jnp.zeros(2, jnp.int32), "params"),
        (layers.embedding, {"embedding": jnp.ones((5, 3))}, jnp.zeros(2), "ids"),
        (
            layers.scale_shift,
            {"scale": jnp.ones(3), "bias": jnp.ones(2)},
            jnp.ones((2, 3)),
            "params",
        ),
        (layers.scale_shift, {"scale": jnp.ones(3)}, jnp.ones((2, 4)), "x"),
        (layers.layer_norm, {"w": jnp.ones(3)}, jnp.ones((2, 3)), "params"),
    ],
)
def test_bad_layer_params_raise_value_error_naming_them(call, params, arg, name):
    with pytest.raises(ValueError, match=name):
        call(params, arg)


def test_kinds_are_told_apart():
    table = {"embedding": jnp.ones((5, 3))}
    norm = {"scale": jnp.ones(3), "bias": jnp.ones(3)}
    assert not layers.is_dense_params(table) and not layers.is_dense_params(norm)
    kinds = [s.kind for s in layers.find_layers([{"w": jnp.ones((5, 3))}, table, norm])]
    assert kinds == ["dense", "embedding", "scale_shift"]


# --- scale-and-shift: the exact diagonal -------------------------------------------------------


def norm_net(params, x):
    """dense -> layer norm -> tanh -> (mean over positions) -> dense, x of shape (B, [T,] 3)."""
    h = jnp.tanh(layers.layer_norm(params["norm"], layers.dense(params["d0"], x)))
    if h.ndim == 3:
        h = h.mean(axis=1)
    return layers.dense(params["d1"], layers.scale_shift(params["affine"], h))


@pytest.mark.parametrize("shape", [(6, 3), (6, 4, 3)])
@pytest.mark.parametrize("loss", [losses.softmax_cross_entropy(), losses.squared_error()])
def test_scale_shift_block_is_the_exact_fisher_diagonal(shape, loss):
    key = jax.random.PRNGKey(0)
    d0, d1 = mlp_params(key, [3, 4, 2])
    params = {
        "d0": d0,
        "d1": d1,
        "norm": {"scale": 1 + 0.3 * jax.random.normal(key, (4,)), "bias": 0.2 * jnp.ones(4)},
        "affine": {"scale": jnp.linspace(0.5, 1.5, 4)},
    }
    x = jax.random.normal(jax.random.PRNGKey(1), shape)
    if loss.name == "squared_error":
        y = jax.random.normal(jax.random.PRNGKey(2), (shape[0], 2))
    else:
        y = jax.random.randint(jax.random.PRNGKey(2), (shape[0],), 0, 2)
    lam = 1e-3
    m, state = one_update(norm_net, loss, params, (x, y), lam)
    by_kind = state.registered_by_kind
    assert int(by_kind["scale_shift"]) == 2 and int(by_kind["dense"]) == 2
    fisher = oracles.fisher(norm_net, loss, params, (x, y))
    pos = positions(params, lambda p: [p["norm"]["bias"], p["norm"]["scale"], p["affine"]["scale"]])
    block = m[np.ix_(pos, pos)] - lam * np.eye(len(pos))
    # The block is diagonal, and its diagonal is the Fisher's, to float64 round-off.
    np.testing.assert_allclose(block, np.diag(np.diag(fisher)[pos]), rtol=1e-10, atol=1e-13)
    assert np.abs(np.diag(fisher)[pos]).min() > 1e-8  # nothing trivially zero


def test_scale_shift_sampled_diagonal_is_unbiased_and_beats_the_batch_mean_square():
    """With targets sampled from the model the block is unbiased for diag(F), with a variance
    that falls with the batch, unlike the generic fall-back (B · batch-mean gradient²)."""
    params = {
        "d": mlp_params(jax.random.PRNGKey(0), [3, 4])[0],
        "n": {"scale": jnp.ones(4), "bias": jnp.zeros(4)},
    }

    def net(p, x):
        return layers.scale_shift(p["n"], jnp.tanh(layers.dense(p["d"], x)))

    x = jax.random.normal(jax.random.PRNGKey(1), (32, 3))
    y = jax.random.randint(jax.random.PRNGKey(2), (32,), 0, 4)
    loss = losses.softmax_cross_entropy()
    fisher = oracles.fisher(net, loss, params, (x, y))
    pos = positions(params, lambda p: [p["n"]["bias"], p["n"]["scale"]])
    want = np.diag(fisher)[pos]
    pre = preconditioners.kfac(curvature="fisher_mc", ema_decay=0.0, statistics_every=1)

    def diag(key):
        state = pre.update(
            pre.init(params), params, (x, y), apply_fn=net, loss=loss, damping=1.0, key=key
        )[1]
        d = state.factors.diag["n"]
        return jnp.concatenate([d["bias"], d["scale"]])

    num = 200
    samples = np.asarray(jax.jit(jax.vmap(diag))(jax.random.split(jax.random.PRNGKey(3), num)))
    mean, se = samples.mean(0), samples.std(0, ddof=1) / np.sqrt(num)
    assert np.all(np.abs(mean - want) <= 5 * se + 1e-12)
    assert want.min() > 10 * se.max()  # the test can tell a wrong scale
    # Per-example squares: relative spread ~ 1/sqrt(B) per estimate, well under 1.
    assert np.max(samples.std(0) / want) < 0.6


# --- embeddings ---------------------------------------------------------------------------------


def embed_net(readout):
    """ids (B, T) -> embedding (B, T, d) -> fixed linear read-out -> (B, T·k)."""

    def apply(params, ids):
        z = layers.embedding(params, ids) @ readout
        return z.reshape(z.shape[0], -1)

    return apply


def test_embedding_block_is_the_exact_ggn_of_a_linear_readout_with_squared_error():
    vocab, d, batch, length = 5, 3, 6, 4
    readout = jax.random.normal(jax.random.PRNGKey(0), (d, 2))
    params = {"embedding": jax.random.normal(jax.random.PRNGKey(1), (vocab, d))}
    ids = jax.random.randint(jax.random.PRNGKey(2), (batch, length), 0, vocab - 1)  # token 4 unseen
    assert len(np.unique(np.asarray(ids))) < ids.size  # repeated tokens, within rows too
    y = jax.random.normal(jax.random.PRNGKey(3), (batch, length * 2))
    loss, lam, apply = losses.squared_error(), 1e-2, embed_net(readout)
    m, state = one_update(apply, loss, params, (ids, y), lam)
    assert int(state.registered_by_kind["embedding"]) == 1
    a, g = np.asarray(state.factors.a[0]), np.asarray(state.factors.g[0])
    counts = np.bincount(np.asarray(ids).reshape(-1), minlength=vocab)
    np.testing.assert_allclose(a, counts / ids.size, rtol=1e-14)  # A = diag(counts / rows)
    ggn = oracles.ggn(apply, loss, params, (ids, y))
    np.testing.assert_allclose(np.kron(np.diag(a), g), ggn, rtol=1e-10, atol=1e-12)
    # M is the factored-damped product, and M⁻¹ the elementwise divide by A + π√λ.
    pi = np.sqrt(a.mean() / (np.trace(g) / d))
    want = np.kron(np.diag(a + pi * np.sqrt(lam)), g + np.sqrt(lam) / pi * np.eye(d))
    np.testing.assert_allclose(m, want, rtol=1e-10, atol=1e-13)


# --- EKFAC --------------------------------------------------------------------------------------


def ekfac_update(apply, loss, params, batch, lam):
    """EKFAC's operator and state after two updates on the same batch: the basis from the first,
    the scalings re-estimated in it on the second (A and G from that batch alone)."""
    return one_update(
        apply, loss, params, batch, lam, updates=2, inverse_every=2, eigenvalue_correction=True
    )


@pytest.mark.parametrize("layer", ["dense", "shared", "conv2d"])
@pytest.mark.parametrize("bias", [True, False])
def test_ekfac_scalings_are_the_fisher_diagonal_in_the_kfac_eigenbasis(layer, bias):
    """s = diag((Q_A ⊗ Q_G)ᵀ F (Q_A ⊗ Q_G)) from per-example gradients (summed over a sequence's
    positions or an image's pixels before squaring), so EKFAC is at least as close to F as K-FAC
    (George et al.)."""
    w_shape, shape = {
        "dense": ((3, 4), (8, 3)),
        "shared": ((3, 4), (8, 3, 3)),
        "conv2d": ((2, 2, 2, 4), (8, 3, 3, 2)),
    }[layer]
    params = {"w": jax.random.normal(jax.random.PRNGKey(0), w_shape) / 2}
    if bias:
        params["b"] = 0.1 * jax.random.normal(jax.random.PRNGKey(1), (4,))

    def apply(p, x):
        if layer == "conv2d":
            return layers.conv2d(p, x, padding="VALID").sum(axis=(1, 2))
        z = layers.dense(p, x)
        return z.sum(axis=1) if layer == "shared" else z

    x = jax.random.normal(jax.random.PRNGKey(2), shape) + 0.5
    y = jax.random.randint(jax.random.PRNGKey(3), (8,), 0, 4)
    loss, lam = losses.softmax_cross_entropy(), 1e-3
    m, state = ekfac_update(apply, loss, params, (x, y), lam)
    fisher = oracles.fisher(apply, loss, params, (x, y))
    pos = positions(params, lambda p: [p["w"], p["b"]] if bias else p["w"])
    fisher = fisher[np.ix_(pos, pos)]  # Kronecker order: rows of [W; b], row-major

    eig = state.eigenbasis
    q = np.kron(np.asarray(eig.q_a[0]), np.asarray(eig.q_g[0]))
    np.testing.assert_allclose(
        np.asarray(state.factors.s[0]).reshape(-1),
        np.diag(q.T @ fisher @ q),
        rtol=1e-10,
        atol=1e-14,
    )
    # The basis is K-FAC's: it diagonalises A ⊗ G.
    kron = np.kron(np.asarray(state.factors.a[0]), np.asarray(state.factors.g[0]))
    rotated = q.T @ kron @ q
    np.testing.assert_allclose(rotated, np.diag(np.diag(rotated)), atol=1e-10)

    ekfac_matrix = m[np.ix_(pos, pos)] - lam * np.eye(len(pos))  # damping: + λ on s exactly
    err_ekfac = np.linalg.norm(fisher - ekfac_matrix)
    err_kfac = np.linalg.norm(fisher - kron)
    print(f"Frobenius error vs the exact Fisher: EKFAC {err_ekfac:.4g}, K-FAC {err_kfac:.4g}")
    assert err_ekfac < (1 - 1e-3) * err_kfac  # strictly closer: a correction, not a tie


def test_ekfac_inverse_is_a_dense_solve_of_its_damped_matrix():
    """An MLP with two EKFAC blocks and a parameter on the diagonal block, after several steps
    (averaged scalings, a rotated basis)."""
    params = {"mlp": mlp_params(jax.random.PRNGKey(0), [3, 4, 2]), "temperature": jnp.ones(2)}

    def apply(p, x):
        h = jnp.tanh(layers.dense(p["mlp"][0], x))
        return p["temperature"] * layers.dense(p["mlp"][1], h)

    x = jax.random.normal(jax.random.PRNGKey(1), (8, 3))
    y = jax.random.randint(jax.random.PRNGKey(2), (8,), 0, 2)
    lam = 1e-2
    # `one_update` checks M⁻¹ M = I, M⁻¹ applied by the factored inverse.
    dense, state = one_update(
        apply,
        losses.softmax_cross_entropy(),
        params,
        (x, y),
        lam,
        updates=5,
        curvature="fisher_mc",
        ema_decay=0.5,
        inverse_every=2,
        eigenvalue_correction=True,
    )
    assert int(state.registered_by_kind["dense"]) == 2 and bool(state.eigenbasis.ready)
    np.testing.assert_allclose(dense, dense.T, atol=1e-12)
    assert np.linalg.eigvalsh(dense).min() >= lam * (1 - 1e-9)


def test_ekfac_rotation_keeps_the_old_approximations_diagonal():
    key = jax.random.PRNGKey(0)
    qa_old, qa_new, qg_old, qg_new = (
        jnp.linalg.qr(jax.random.normal(jax.random.fold_in(key, i), (k, k)))[0]
        for i, k in enumerate((3, 3, 2, 2))
    )
    s = jax.random.uniform(key, (3, 2))
    old = np.kron(qa_old, qg_old) @ np.diag(np.asarray(s).reshape(-1)) @ np.kron(qa_old, qg_old).T
    q_new = np.kron(qa_new, qg_new)
    np.testing.assert_allclose(
        ekfac.rotate(s, qa_old, qa_new, qg_old, qg_new).reshape(-1),
        np.diag(q_new.T @ old @ q_new),
        rtol=1e-12,
    )


def test_ekfac_trains_a_small_mlp_under_jit():
    params = mlp_params(jax.random.PRNGKey(0), [4, 8, 3])
    x = jax.random.normal(jax.random.PRNGKey(1), (64, 4))
    y = jnp.argmax(x[:, :3] + 0.3 * x[:, 3:], axis=1)

    def apply(p, x):
        return layers.dense(p[1], jnp.tanh(layers.dense(p[0], x)))

    loss = losses.softmax_cross_entropy()
    opt = natgrad.kfac(
        apply, loss, eigenvalue_correction=True, kl_radius=1e-2, inverse_every=5, statistics_every=1
    )
    batches = [
        (x[i % 4 * 16 : i % 4 * 16 + 16], y[i % 4 * 16 : i % 4 * 16 + 16]) for i in range(24)
    ]
    params, state, values = train(opt, apply, loss, params, batches)
    assert all(np.isfinite(values)) and int(state.rejected_steps) == 0
    assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(params))
    assert np.mean(values[-4:]) < 0.7 * np.mean(values[:4])


def test_a_transformer_like_block_trains_with_every_kind():
    """Embedding -> layer norm -> dense over positions -> mean -> dense: every parameter in a
    registered block, finite steps that lower the loss, with and without EKFAC."""
    vocab, d = 6, 4
    key = jax.random.PRNGKey(0)
    params = {
        "emb": {"embedding": jax.random.normal(key, (vocab, d))},
        "norm": {"scale": jnp.ones(d), "bias": jnp.zeros(d)},
        "mlp": mlp_params(jax.random.PRNGKey(1), [d, 8, 2]),
    }

    def apply(p, ids):
        h = layers.layer_norm(p["norm"], layers.embedding(p["emb"], ids))
        h = jnp.tanh(layers.dense(p["mlp"][0], h)).mean(axis=1)
        return layers.dense(p["mlp"][1], h)

    ids = jax.random.randint(jax.random.PRNGKey(2), (32, 5), 0, vocab)
    y = (jnp.sum(ids == 1, axis=1) > jnp.sum(ids == 2, axis=1)).astype(jnp.int32)
    loss = losses.softmax_cross_entropy()
    for correction in (False, True):
        opt = natgrad.kfac(apply, loss, eigenvalue_correction=correction, kl_radius=1e-2)
        _, state, values = train(opt, apply, loss, params, [(ids, y)] * 8)
        counts = {k: int(v) for k, v in state.preconditioner_state.registered_by_kind.items()}
        assert counts["embedding"] == 1 and counts["scale_shift"] == 1 and counts["dense"] == 2
        assert all(np.isfinite(values)) and values[-1] < values[0]


@pytest.mark.parametrize("kwargs", [{"eigenvalue_correction": 1}, {"eigenvalue_correction": "yes"}])
def test_bad_eigenvalue_correction_raises_value_error(kwargs):
    with pytest.raises(ValueError, match="eigenvalue_correction"):
        natgrad.kfac(layers.dense, losses.softmax_cross_entropy(), **kwargs)
    with pytest.raises(ValueError, match="eigenvalue_correction"):
        preconditioners.kfac(**kwargs)


def test_flax_layers_register_and_stock_ones_fall_back():
    """The docs' flax LayerNorm / Embed give the plain-JAX K-FAC update; the stock nn.LayerNorm
    and nn.Embed run under K-FAC with diagonal blocks (their dicts become probes, unused)."""
    nn = pytest.importorskip("flax.linen")

    class LayerNorm(nn.Module):
        @nn.compact
        def __call__(self, x):
            self.param("scale", nn.initializers.ones, (x.shape[-1],))
            self.param("bias", nn.initializers.zeros, (x.shape[-1],))
            return layers.layer_norm(self.variables["params"], x)

    class Embed(nn.Module):
        @nn.compact
        def __call__(self, ids):
            self.param("embedding", nn.initializers.normal(1.0), (5, 3))
            return layers.embedding(self.variables["params"], ids)

    class Dense(nn.Module):
        @nn.compact
        def __call__(self, x):
            self.param("w", nn.initializers.lecun_normal(), (x.shape[-1], 2))
            return layers.dense(self.variables["params"], x)

    def net(embed, norm):
        class Net(nn.Module):
            @nn.compact
            def __call__(self, ids):
                return Dense()(norm()(embed()(ids)).mean(axis=1))

        return Net()

    def plain(p, ids):
        h = layers.layer_norm(p["norm"], layers.embedding(p["embed"], ids))
        return layers.dense(p["dense"], h.mean(axis=1))

    ids = jax.random.randint(jax.random.PRNGKey(0), (8, 4), 0, 5)
    y = jax.random.randint(jax.random.PRNGKey(1), (8,), 0, 2)
    loss = losses.softmax_cross_entropy()

    def update(apply, params):
        opt = natgrad.kfac(apply, loss, inverse_every=1)
        grads = jax.grad(lambda p: loss.mean(apply(p, ids), y))(params)
        return opt.update(
            grads, opt.init(params), params, batch=(ids, y), key=jax.random.PRNGKey(2)
        )

    ours = net(Embed, LayerNorm)
    variables = jax.tree.map(lambda a: a.astype(jnp.float64), ours.init(jax.random.PRNGKey(3), ids))
    v = variables["params"]
    same = {"embed": v["Embed_0"], "norm": v["LayerNorm_0"], "dense": v["Dense_0"]}
    flax_updates, flax_state = jax.jit(lambda p: update(ours.apply, p))(variables)
    plain_updates, _ = jax.jit(lambda p: update(plain, p))(same)
    counts = flax_state.preconditioner_state.registered_by_kind
    assert int(counts["embedding"]) == 1 and int(counts["scale_shift"]) == 1
    for name, key in (("Embed_0", "embed"), ("LayerNorm_0", "norm"), ("Dense_0", "dense")):
        flax_leaves = jax.tree.leaves(flax_updates["params"][name])
        for a, b in zip(flax_leaves, jax.tree.leaves(plain_updates[key]), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)

    stock = net(lambda: nn.Embed(5, 3), nn.LayerNorm)
    variables = stock.init(jax.random.PRNGKey(3), ids)
    updates, state = jax.jit(lambda p: update(stock.apply, p))(variables)
    counts = state.preconditioner_state.registered_by_kind
    assert int(counts["embedding"]) == 0 and int(counts["scale_shift"]) == 0
    assert int(counts["dense"]) == 1
    assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(updates))


def test_equinox_layers_under_vmap_give_the_plain_jax_update():
    """Dict-field equinox layers under the vmap adapter (one example per call, the sequence
    given its unit batch axis) get the same K-FAC and EKFAC updates as the batched plain model."""
    eqx = pytest.importorskip("equinox")

    class Field(eqx.Module):
        params: dict
        call: Callable = eqx.field(static=True)

        def __call__(self, x):
            return self.call(self.params, x)

    keys = jax.random.split(jax.random.PRNGKey(0), 2)
    plain_params = {
        "e": {"embedding": jax.random.normal(keys[0], (5, 3))},
        "n": {"scale": jnp.linspace(0.5, 1.5, 3), "bias": jnp.zeros(3)},
        "l": {"w": jax.random.normal(keys[1], (3, 2)), "b": jnp.zeros(2)},
    }
    modules = (
        Field(plain_params["e"], layers.embedding),
        Field(plain_params["n"], lambda p, x: layers.layer_norm(p, x[None])[0]),
        Field(plain_params["l"], layers.dense),
    )

    def one_example(mods, ids):  # ids: (T,)
        return mods[2](mods[1](mods[0](ids)).mean(axis=0))

    params, static = eqx.partition(modules, eqx.is_array)

    def is_probe(node):
        return isinstance(node, layers.LayerProbe)

    def apply_eqx(p, ids):
        return jax.vmap(lambda i: one_example(eqx.combine(p, static, is_leaf=is_probe), i))(ids)

    def apply_plain(p, ids):
        h = layers.layer_norm(p["n"], layers.embedding(p["e"], ids))
        return layers.dense(p["l"], h.mean(axis=1))

    ids = jax.random.randint(jax.random.PRNGKey(1), (8, 4), 0, 5)
    y = jax.random.randint(jax.random.PRNGKey(2), (8,), 0, 2)
    loss = losses.softmax_cross_entropy()
    for correction in (False, True):
        opt_options = {"inverse_every": 1, "eigenvalue_correction": correction}

        def update(apply, p, opt_options=opt_options):
            opt = natgrad.kfac(apply, loss, **opt_options)
            g = jax.grad(lambda q: loss.mean(apply(q, ids), y))(p)
            key = jax.random.PRNGKey(3)
            return opt.update(g, opt.init(p), p, batch=(ids, y), key=key)

        eqx_updates, state = jax.jit(lambda p, u=update: u(apply_eqx, p))(params)
        plain_updates, _ = jax.jit(lambda p, u=update: u(apply_plain, p))(plain_params)
        counts = state.preconditioner_state.registered_by_kind
        assert [int(counts[k]) for k in ("embedding", "scale_shift", "dense")] == [1, 1, 1]
        for mod, key in zip(eqx_updates, ("e", "n", "l"), strict=True):
            for k in mod.params:
                np.testing.assert_allclose(
                    mod.params[k], plain_updates[key][k], rtol=1e-9, atol=1e-14
                )


@pytest.mark.parametrize("curvature", ["fisher_mc", "fisher"])
def test_diagonal_blocks_land_on_the_unregistered_layer_with_any_number_of_columns(curvature):
    """With K > 1 output columns ("fisher") the vmapped cotangent of a dense dict has a 3-D "w"
    and no longer looks like a layer: the diagonal blocks must still follow the params' nodes."""
    params = mlp_params(jax.random.PRNGKey(0), [3, 4, 2])

    def half(p, x):  # the first layer by hand (unregistered), the second declared
        return layers.dense(p[1], jnp.tanh(x @ p[0]["w"] + p[0]["b"]))

    x = jax.random.normal(jax.random.PRNGKey(1), (8, 3))
    y = jax.random.randint(jax.random.PRNGKey(2), (8,), 0, 2)
    f, registered, _ = kronecker.statistics(
        half,
        losses.softmax_cross_entropy(),
        params,
        (x, y),
        key=jax.random.PRNGKey(3),
        curvature=curvature,
    )
    assert registered == (False, True)
    assert all(bool(jnp.all(leaf > 0)) for leaf in jax.tree.leaves(f.diag[0]))
    assert all(bool(jnp.all(leaf == 0)) for leaf in jax.tree.leaves(f.diag[1]))
