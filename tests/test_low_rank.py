"""K-FAC's rank-k-plus-identity input-factor inverse (`natgrad.low_rank`, `input_factor_rank`)
against dense float64 oracles."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import natgrad
from natgrad import kronecker, losses, low_rank


def _spd(n, k, gap, key):
    """U diag(s) Uᵀ + d·I plus a small full-rank part: k eigenvalues well above the rest."""
    k1, k2, k3 = jax.random.split(key, 3)
    u, _ = jnp.linalg.qr(jax.random.normal(k1, (n, k), jnp.float64))
    s = gap * (1 + jax.random.uniform(k2, (k,), jnp.float64))
    noise = jax.random.normal(k3, (n, n), jnp.float64) / n
    return u @ jnp.diag(s) @ u.T + 1e-3 * noise @ noise.T + 0.05 * jnp.eye(n)


def _oracle(m, k):
    """Q_k diag(1/μ_k) Q_kᵀ + (I − Q_k Q_kᵀ)/μ̄ from a dense eigendecomposition."""
    mu, q = jnp.linalg.eigh(m)
    mu, q = mu[::-1], q[:, ::-1]
    qk, tail = q[:, :k], jnp.mean(mu[k:])
    return (qk / mu[:k]) @ qk.T + (jnp.eye(m.shape[0]) - qk @ qk.T) / tail


def test_application_matches_the_dense_truncated_inverse():
    m = _spd(60, 6, 10.0, jax.random.PRNGKey(0))
    inv = low_rank.factorise(m, low_rank.init(60, 6, jnp.float64))
    v = jax.random.normal(jax.random.PRNGKey(1), (60, 7), jnp.float64)
    want = _oracle(m, 6) @ v
    # 4 subspace iterations with μ₇/μ₆ ≈ 0.06/10: converged far below this tolerance's 1e-6.
    np.testing.assert_allclose(low_rank.apply(inv, v), want, rtol=1e-6, atol=1e-8)


def test_exact_when_the_tail_is_flat():
    """M = low rank + d·I: the n − k smallest eigenvalues are all d, so the inverse is exact."""
    n, k = 40, 5
    u, _ = jnp.linalg.qr(jax.random.normal(jax.random.PRNGKey(2), (n, k), jnp.float64))
    m = u @ jnp.diag(jnp.arange(1.0, k + 1) * 4) @ u.T + 0.1 * jnp.eye(n)
    # (μ₆/μ₅ = 0.1/20.1 per iteration: 12 iterations converge to rounding)
    inv = low_rank.factorise(m, low_rank.init(n, k, jnp.float64), iterations=12)
    v = jax.random.normal(jax.random.PRNGKey(3), (n, 3), jnp.float64)
    np.testing.assert_allclose(low_rank.apply(inv, v), jnp.linalg.solve(m, v), rtol=1e-9)


def test_warm_start_converges_where_one_cold_round_does_not():
    """One subspace iteration from a random start is not enough for a small gap; refreshes
    warm-started from the previous basis converge to the oracle."""
    m = _spd(80, 8, 0.3, jax.random.PRNGKey(4))
    want = _oracle(m, 8)
    inv = low_rank.init(80, 8, jnp.float64)
    errors = []
    for _ in range(8):
        inv = low_rank.factorise(m, inv, iterations=1)
        dense = low_rank.apply(inv, jnp.eye(80))
        errors.append(float(jnp.linalg.norm(dense - want) / jnp.linalg.norm(want)))
    assert errors[0] > 1e-3 and errors[-1] < 1e-6 and errors[-1] < errors[0] * 1e-3


def _mlp(params, x):
    h = jnp.tanh(natgrad.layers.dense(params[0], x))
    return natgrad.layers.dense(params[1], h)


def _problem():
    k = jax.random.split(jax.random.PRNGKey(5), 4)
    params = [
        {"w": jax.random.normal(k[0], (20, 6), jnp.float64) / 4, "b": jnp.zeros(6, jnp.float64)},
        {"w": jax.random.normal(k[1], (6, 3), jnp.float64) / 2, "b": jnp.zeros(3, jnp.float64)},
    ]
    # inputs near a 3-dimensional subspace: with the bias, A has 4 large eigenvalues and a gap
    z = jax.random.normal(k[2], (32, 3), jnp.float64)
    x = z @ jax.random.normal(k[0], (3, 20), jnp.float64) + 0.05 * jax.random.normal(
        k[1], (32, 20), jnp.float64
    )
    y = jax.random.randint(k[3], (32,), 0, 3)
    return params, x, y, losses.softmax_cross_entropy()


def test_kfac_direction_is_the_blockwise_product_with_the_low_rank_input_inverse():
    """K-FAC's preconditioner with input_factor_rank=4: the 21-wide input factor of layer 0 gets
    a rank-4 inverse (layer 1's 7-wide one stays exact), and (F̂ + λ)⁻¹ g is, per layer,
    A⁻¹ [dW; db] G⁻¹ with that A⁻¹ = the dense oracle of the damped factor."""
    params, x, y, loss = _problem()
    pre = natgrad.preconditioners.kfac(statistics_every=1, inverse_every=1, input_factor_rank=4)
    state = pre.init(params)
    assert isinstance(state.inverses.a[0], low_rank.LowRankInverse)
    assert not isinstance(state.inverses.a[1], low_rank.LowRankInverse)
    lam = 1e-2
    key = jax.random.PRNGKey(6)
    for _ in range(12):  # refreshes warm-start the basis: it converges
        m, state = pre.update(state, params, (x, y), apply_fn=_mlp, loss=loss, damping=lam, key=key)
    g = jax.grad(lambda p: loss.mean(_mlp(p, x), y))(params)
    got = m.inverse().mv(g)
    for i, layer in enumerate(g):
        a, gf = state.factors.a[i], state.factors.g[i]
        da, dg = kronecker.pi_damping(a, gf, lam)
        a_damped = a + da * jnp.eye(a.shape[0])
        a_inv = _oracle(a_damped, 4) if i == 0 else jnp.linalg.inv(a_damped)
        g_inv = jnp.linalg.inv(gf + dg * jnp.eye(gf.shape[0]))
        v = jnp.concatenate([layer["w"], layer["b"][None]], 0)
        want = a_inv @ v @ g_inv
        np.testing.assert_allclose(got[i]["w"], want[:-1], rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(got[i]["b"], want[-1], rtol=1e-6, atol=1e-9)


def test_kfac_with_a_low_rank_input_factor_trains():
    params, x, y, loss = _problem()
    opt = natgrad.kfac(_mlp, loss, input_factor_rank=4, statistics_every=1, inverse_every=2)
    state = opt.init(params)
    value = lambda p: loss.mean(_mlp(p, x), y)  # noqa: E731
    start = value(params)
    for i in range(10):
        g = jax.grad(value)(params)
        updates, state = opt.update(g, state, params, batch=(x, y), key=jax.random.PRNGKey(i))
        params = jax.tree.map(lambda p, u: p + u, params, updates)
    assert int(state.rejected_steps) == 0 and float(value(params)) < 0.7 * float(start)


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "32"])
def test_input_factor_rank_rejects_bad_values(bad):
    with pytest.raises(ValueError, match="input_factor_rank"):
        natgrad.kfac(_mlp, losses.softmax_cross_entropy(), input_factor_rank=bad)


def test_input_factor_rank_is_not_for_ekfac():
    with pytest.raises(ValueError, match="input_factor_rank.*eigenvalue_correction"):
        natgrad.kfac(
            _mlp, losses.softmax_cross_entropy(), input_factor_rank=8, eigenvalue_correction=True
        )


def _dense_layers(sizes):
    def apply(params, x):
        for i, layer in enumerate(params):
            x = natgrad.layers.dense(layer, x)
            x = jax.nn.tanh(x) if i < len(params) - 1 else x
        return x

    keys = jax.random.split(jax.random.PRNGKey(3), len(sizes) - 1)
    params = [
        {"w": 0.1 * jax.random.normal(k, (m, n)), "b": jnp.zeros(n)}
        for k, m, n in zip(keys, sizes[:-1], sizes[1:], strict=True)
    ]
    return apply, params


def test_kfac_default_inverts_input_factors_wider_than_512_as_rank_32():
    """``input_factor_rank="auto"`` (`defaults.KFAC_INPUT_FACTOR_RANK`): rank 32 for the
    514-wide input factor, exact for the 512-wide one (not wider than 512); an int k takes
    every factor wider than 2k; None, and the default with EKFAC, invert every factor
    exactly."""
    from natgrad.optimizers import defaults

    apply, params = _dense_layers((513, 511, 3))
    loss = losses.softmax_cross_entropy()

    def inverses(**kwargs):
        state = natgrad.kfac(apply, loss, **kwargs).init(params).preconditioner_state
        return [isinstance(a, low_rank.LowRankInverse) for a in state.inverses.a], state

    kinds, state = inverses()
    assert defaults.KFAC_INPUT_FACTOR_RANK == "auto" and kinds == [True, False]
    assert state.inverses.a[0].q.shape == (514, 32)
    assert inverses(input_factor_rank=8)[0] == [True, True]
    assert inverses(input_factor_rank=None)[0] == [False, False]
    assert inverses(eigenvalue_correction=True)[0] == [False, False]
    with pytest.raises(ValueError, match="input_factor_rank.*'auto'"):
        natgrad.kfac(apply, loss, input_factor_rank="automatic")
    with pytest.raises(ValueError, match="input_factor_rank.*'auto'"):
        natgrad.preconditioners.kfac(input_factor_rank="exact")
