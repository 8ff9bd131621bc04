"""Preconditioners: diagonals against dense float64 oracles, and fewer CG iterations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import natgrad
from conftest import mlp_apply, mlp_params, problem, train
from natgrad import curvature, layers, losses, per_example, preconditioners, solvers


def dense_mlp(params, x):
    for layer in params[:-1]:
        x = jnp.tanh(layers.dense(layer, x))
    return layers.dense(params[-1], x)


def test_ggn_diagonal_is_the_diagonal_of_the_dense_ggn(loss):
    params, batch = problem(loss)
    dense = curvature.ggn(mlp_apply, loss, params, batch).to_dense()
    diag = jax.jit(lambda p, b: preconditioners.ggn_diagonal(mlp_apply, loss, p, b))(params, batch)
    np.testing.assert_allclose(ravel_pytree(diag)[0], jnp.diag(dense), rtol=1e-10, atol=1e-13)


def test_empirical_fisher_diagonal_is_the_diagonal_of_the_dense_empirical_fisher():
    loss = losses.softmax_cross_entropy()
    params, batch = problem(loss)
    dense = curvature.empirical_fisher(mlp_apply, loss, params, batch).to_dense()
    diag = preconditioners.empirical_fisher_diagonal(mlp_apply, loss, params, batch)
    np.testing.assert_allclose(ravel_pytree(diag)[0], jnp.diag(dense), rtol=1e-10, atol=1e-13)


def _small_cnn(params, x):
    """conv2d 3×3 stride 1 SAME, conv2d 2×2 stride 2 VALID without bias, dense: 6×6 images."""
    x = jnp.tanh(layers.conv2d(params[0], x.reshape(-1, 6, 6, 1)))
    x = jnp.tanh(layers.conv2d(params[1], x, strides=(2, 2), padding="VALID"))
    return layers.dense(params[2], x.reshape(x.shape[0], -1))


def _sequence_model(params, x):
    """A dense layer shared over 4 positions, layer norm, then mean-pooled to 3 logits."""
    h = jnp.tanh(layers.dense(params["embed"], x.reshape(x.shape[0], 4, -1)))
    h = layers.layer_norm(params["norm"], h)
    return layers.dense(params["out"], jnp.mean(h, axis=1))


def _declared_models():
    k = jax.random.split(jax.random.PRNGKey(3), 8)
    normal = lambda i, shape: 0.5 * jax.random.normal(k[i], shape)  # noqa: E731
    mlp = [{"w": normal(0, (3, 4)), "b": normal(1, (4,))}, {"w": normal(2, (4, 3))}]
    cnn = [
        {"w": normal(0, (3, 3, 1, 2)), "b": normal(1, (2,))},
        {"w": normal(2, (2, 2, 2, 3))},
        {"w": normal(3, (27, 3)), "b": normal(4, (3,))},
    ]
    seq = {
        "embed": {"w": normal(0, (2, 5)), "b": normal(1, (5,))},
        "norm": {"scale": 1 + normal(2, (5,)), "bias": normal(3, (5,))},
        "out": {"w": normal(4, (5, 3)), "b": normal(5, (3,))},
    }
    return {
        "mlp": (dense_mlp, mlp, jax.random.normal(k[5], (6, 3))),
        "cnn": (_small_cnn, cnn, jax.random.normal(k[5], (6, 36))),
        "sequence": (_sequence_model, seq, jax.random.normal(k[5], (6, 8))),
    }


@pytest.mark.parametrize("name", ["mlp", "cnn", "sequence"])
def test_one_pass_empirical_fisher_diagonal_of_declared_layers_matches_the_dense_oracle(name):
    """Declared dense (with and without bias, one position or 4 shared ones), conv2d (strides,
    paddings) and layer-norm layers: the one-backward-pass sum of squared per-example gradients
    is the diagonal of the dense empirical Fisher, and the loop over examples agrees."""
    apply_fn, params, x = _declared_models()[name]
    loss = losses.softmax_cross_entropy()
    batch = (x, jnp.arange(x.shape[0]) % 3)
    assert per_example.squared_gradient_sum(apply_fn, loss, params, batch) is not None

    @jax.jit  # one compile for the three
    def diagonals(p, b):
        dense = curvature.empirical_fisher(apply_fn, loss, p, b).to_dense()
        fast = preconditioners.empirical_fisher_diagonal(apply_fn, loss, p, b)
        looped = preconditioners.looped_empirical_fisher_diagonal(apply_fn, loss, p, b)
        return jnp.diag(dense), ravel_pytree(fast)[0], ravel_pytree(looped)[0]

    exact, diag, looped = diagonals(params, batch)
    assert jnp.min(exact) >= 0 and jnp.max(exact) > 1e-3
    np.testing.assert_allclose(diag, exact, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(diag, looped, rtol=1e-10, atol=1e-14)


def test_one_pass_sum_declines_models_with_parameters_outside_declared_layers():
    """Undeclared layers, a bare parameter, a declared-looking dict used by hand, an embedding:
    no one-pass sum (None), and `empirical_fisher_diagonal` still gives the exact diagonal."""
    loss = losses.softmax_cross_entropy()
    apply_fn, params, x = _declared_models()["mlp"]
    batch = (x, jnp.arange(x.shape[0]) % 3)

    def with_scalar(p, x):
        return dense_mlp(p["layers"], x) * p["temperature"]

    def by_hand(p, x):
        return jnp.tanh(layers.dense(p[0], x)) @ p[1]["w"]

    vocab = {"embedding": jax.random.normal(jax.random.PRNGKey(4), (5, 3))}

    def with_embedding(p, x):
        ids = (jnp.abs(x[:, :2]) * 3).astype(jnp.int32) % 5
        return dense_mlp(p["mlp"], jnp.mean(layers.embedding(p["vocab"], ids), axis=1))

    cases = [
        (mlp_apply, *problem(loss)),
        (with_scalar, {"layers": params, "temperature": jnp.asarray(1.5)}, batch),
        (by_hand, params, batch),
        (with_embedding, {"mlp": params, "vocab": vocab}, batch),
    ]
    for model, p, batch in cases:
        assert per_example.squared_gradient_sum(model, loss, p, batch) is None

        @jax.jit
        def diagonals(p, b, model=model):
            dense = curvature.empirical_fisher(model, loss, p, b).to_dense()
            diag = preconditioners.empirical_fisher_diagonal(model, loss, p, b)
            return jnp.diag(dense), ravel_pytree(diag)[0]

        exact, diag = diagonals(p, batch)
        np.testing.assert_allclose(diag, exact, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("alpha", [0.0, 0.25, 0.5, 0.6, 0.75, 1.0])
def test_martens_diagonal_is_the_damped_diagonal_to_the_power_alpha(alpha):
    """M = (diag + λ)^α, α = ¾ and the other quarter powers by square roots: NumPy's power."""
    loss = losses.softmax_cross_entropy()
    params, batch = problem(loss)
    pre = preconditioners.martens_diagonal(alpha=alpha)
    m, _ = pre.update(pre.init(params), params, batch, apply_fn=mlp_apply, loss=loss, damping=0.1)
    diag = preconditioners.empirical_fisher_diagonal(mlp_apply, loss, params, batch)
    expected = np.power(np.asarray(ravel_pytree(diag)[0]) + 0.1, alpha)
    ones = jax.tree.map(jnp.ones_like, params)
    np.testing.assert_allclose(ravel_pytree(m.mv(ones))[0], expected, rtol=1e-14)


def test_hutchinson_estimate_is_unbiased():
    loss = losses.softmax_cross_entropy()
    params, batch = problem(loss)
    num = 2000

    @jax.jit
    def oracle_and_samples(params, batch):
        op = curvature.ggn(mlp_apply, loss, params, batch)
        one = lambda k: ravel_pytree(preconditioners.hutchinson_estimate(op, k, 1))[0]  # noqa: E731
        return jnp.diag(op.to_dense()), jax.vmap(one)(jax.random.split(jax.random.PRNGKey(0), num))

    exact, samples = oracle_and_samples(params, batch)
    op = curvature.ggn(mlp_apply, loss, params, batch)
    samples = np.asarray(samples)
    mean, se = samples.mean(axis=0), samples.std(axis=0, ddof=1) / np.sqrt(num)
    assert np.abs(exact).max() > 10 * se.max()  # precise enough to see a wrong estimator
    assert np.all(np.abs(mean - exact) <= 5 * se + 1e-12)
    # Several probes in one call average them: the same keys give the same mean.
    many = preconditioners.hutchinson_estimate(op, jax.random.PRNGKey(1), 8)
    again = preconditioners.hutchinson_estimate(op, jax.random.PRNGKey(1), 8)
    np.testing.assert_array_equal(ravel_pytree(many)[0], ravel_pytree(again)[0])


def test_preconditioned_cg_needs_fewer_iterations_than_plain_cg():
    """MLP 6-8-3, squared error, inputs with standard deviations from 10⁻² to 10², λ = 10⁻⁶: the
    scales differ by orders of magnitude across parameters, which plain CG pays for."""
    params = mlp_params(jax.random.PRNGKey(0), [6, 8, 3])
    x = jax.random.normal(jax.random.PRNGKey(1), (512, 6)) * jnp.logspace(-2, 2, 6)
    y = jax.random.normal(jax.random.PRNGKey(2), (512, 3))
    loss, lam = losses.squared_error(), 1e-6
    candidates = {
        "martens": preconditioners.martens_diagonal(),
        "exact": preconditioners.exact_diagonal(),
        "hutchinson": preconditioners.hutchinson_diagonal(num_probes=200),
        "kfac": preconditioners.kfac(curvature="fisher"),
    }

    @jax.jit
    def iterations(params, x, y):
        op = curvature.ggn(dense_mlp, loss, params, (x, y))
        b, matvec = op.gradient(), curvature.damped(op, lam).mv
        out = {"none": solvers.cg(matvec, b, maxiter=1000, tol=1e-6)}
        for name, pre in candidates.items():
            m, _ = pre.update(
                pre.init(params),
                params,
                (x, y),
                apply_fn=dense_mlp,
                loss=loss,
                damping=lam,
                key=jax.random.PRNGKey(3),
            )
            out[name] = solvers.cg(matvec, b, maxiter=1000, tol=1e-6, preconditioner=m.inverse())
        return {k: (r.iterations, r.status) for k, r in out.items()}

    counts = iterations(params, x, y)
    plain = int(counts.pop("none")[0])
    for name, (its, status) in counts.items():
        assert int(status) == solvers.CONVERGED, name
        assert int(its) < 0.75 * plain, (name, int(its), plain)


@pytest.mark.parametrize(
    "pre",
    [preconditioners.exact_diagonal(), preconditioners.hutchinson_diagonal(num_probes=4)],
    ids=["exact", "hutchinson"],
)
def test_diagonal_preconditioners_plug_into_natural_gradient(pre):
    params = mlp_params(jax.random.PRNGKey(0), [4, 6, 3])
    x = jax.random.normal(jax.random.PRNGKey(1), (32, 4))
    y = jnp.argmax(x[:, :3], axis=1)
    loss = losses.softmax_cross_entropy()
    opt = natgrad.natural_gradient(dense_mlp, loss, preconditioner=pre)

    params, state, values = train(opt, dense_mlp, loss, params, [(x, y)] * 2)
    assert int(state.rejected_steps) == 0 and values[-1] < values[0]


def test_bad_arguments_raise_value_error_naming_them():
    for make, name in [
        (lambda: preconditioners.martens_diagonal(alpha=-1.0), "alpha"),
        (lambda: preconditioners.exact_diagonal(alpha="one"), "alpha"),
        (lambda: preconditioners.hutchinson_diagonal(num_probes=0), "num_probes"),
        (lambda: preconditioners.hutchinson_diagonal(ema_decay=1.0), "ema_decay"),
        (lambda: preconditioners.kfac(inverse_every=0), "inverse_every"),
        (lambda: preconditioners.kfac(fisher_type="ggn"), "fisher_type"),
    ]:
        with pytest.raises(ValueError, match=name):
            make()
    loss = losses.softmax_cross_entropy()
    params, batch = problem(loss)
    for pre in (preconditioners.hutchinson_diagonal(), preconditioners.kfac()):
        with pytest.raises(ValueError, match="key"):
            pre.update(pre.init(params), params, batch, apply_fn=mlp_apply, loss=loss, damping=1.0)
