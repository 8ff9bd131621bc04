"""K-FAC's rank-k-plus-identity factor inverses (`natgrad.low_rank`, `input_factor_rank`,
`output_factor_rank`) against dense float64 oracles."""

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


def _sketch(a, k):
    """[A Ω | diag A] as K-FAC keeps a wide input factor."""
    omega = low_rank.sketch_matrix(a.shape[0], low_rank.width(k, a.shape[0]))
    return jnp.concatenate([a @ omega, jnp.diag(a)[:, None]], axis=1)


def _nystrom_oracle(a, k, d):
    """The rank-k-plus-identity inverse of A + dI from the dense Nyström approximation
    Â = Y (ΩᵀY)⁺ Yᵀ, Y = A Ω (numpy pseudo-inverse and eigendecomposition)."""
    a = np.asarray(a)
    omega = low_rank.sketch_matrix(a.shape[0], low_rank.width(k, a.shape[0]))
    y = a @ omega
    approx = y @ np.linalg.pinv(omega.T @ y, rcond=1e-12, hermitian=True) @ y.T
    lam, q = np.linalg.eigh(approx)
    lam, q = lam[::-1][:k], q[:, ::-1][:, :k]
    tail = (np.trace(a) - lam.sum()) / (a.shape[0] - k) + d
    return (q / (lam + d)) @ q.T + (np.eye(a.shape[0]) - q @ q.T) / tail


def test_exact_when_the_factor_has_rank_at_most_k():
    """A of rank r ≤ k: the top k eigenpairs are all of A (the others are 0), so
    (A + dI)⁻¹ comes out exactly, whatever the sketch."""
    n, k, d = 40, 6, 0.1
    u, _ = jnp.linalg.qr(jax.random.normal(jax.random.PRNGKey(2), (n, 5), jnp.float64))
    a = u @ jnp.diag(jnp.arange(1.0, 6.0) * 4) @ u.T
    inv = low_rank.from_sketch(_sketch(a, k), d, k)
    v = jax.random.normal(jax.random.PRNGKey(3), (n, 3), jnp.float64)
    np.testing.assert_allclose(
        low_rank.apply(inv, v), jnp.linalg.solve(a + d * jnp.eye(n), v), rtol=1e-9, atol=1e-12
    )
    # and `forward` is the damped factor itself
    np.testing.assert_allclose(low_rank.forward(inv, v), (a + d * jnp.eye(n)) @ v, rtol=1e-9)


def test_rank_between_k_and_the_sketch_width_gives_the_truncated_inverse():
    """k < rank A ≤ ℓ = 2k: Nyström recovers A exactly, so the inverse is the dense truncated
    one: the top k eigenpairs, the other eigenvalues replaced by their mean."""
    n, k, d = 50, 4, 0.05
    u, _ = jnp.linalg.qr(jax.random.normal(jax.random.PRNGKey(7), (n, 7), jnp.float64))
    a = u @ jnp.diag(jnp.asarray([30.0, 20, 12, 8, 3, 2, 1])) @ u.T
    want = _oracle(a + d * jnp.eye(n), k)
    got = low_rank.apply(low_rank.from_sketch(_sketch(a, k), d, k), jnp.eye(n))
    np.testing.assert_allclose(got, want, rtol=1e-8, atol=1e-10)


def test_full_rank_factor_matches_the_nystrom_oracle_and_finds_the_top_subspace():
    """A full-rank factor with a gap after k: `from_sketch` is the dense Nyström oracle; its
    basis spans the top-k eigenvectors of A up to a small angle, and its eigenvalues are
    underestimates (Nyström's Â ⪯ A), within 15 % here (ℓ = 12 columns against a tail of 54
    eigenvalues of ~0.05 beside a top of 10-20)."""
    k, d = 6, 0.01
    a = _spd(60, k, 10.0, jax.random.PRNGKey(0))
    inv = low_rank.from_sketch(_sketch(a, k), d, k)
    got = low_rank.apply(inv, jnp.eye(60))
    np.testing.assert_allclose(got, _nystrom_oracle(a, k, d), rtol=1e-7, atol=1e-9)
    mu, q = np.linalg.eigh(np.asarray(a))
    mu, q = mu[::-1][:k], q[:, ::-1][:, :k]
    basis = np.asarray(inv.q)
    assert np.linalg.norm(q - basis @ (basis.T @ q)) < 0.05
    lam = 1 / np.asarray(inv.inverse) - d
    assert np.all(lam <= mu * (1 + 1e-9)) and np.all(lam >= 0.85 * mu)


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


@pytest.mark.parametrize("bias", [True, False])
def test_kfac_keeps_the_sketch_of_the_exact_factor_and_inverts_it_blockwise(bias):
    """K-FAC's preconditioner with input_factor_rank=4: the 21-wide input factor of layer 0 is
    kept as its sketch [A Ω | diag A] (ℓ = 8), equal to that of the exact factor an exact run
    averages from the same statistics; layer 1's 7-wide one stays exact; and (F̂ + λ)⁻¹ g is,
    per layer, A⁻¹ [dW; db] G⁻¹ with A⁻¹ the dense Nyström oracle of the exact A."""
    params, x, y, loss = _problem()
    if not bias:
        params = [{"w": params[0]["w"]}, params[1]]
    make = natgrad.preconditioners.kfac
    pre = make(statistics_every=1, inverse_every=1, input_factor_rank=4)
    exact = make(statistics_every=1, inverse_every=1, input_factor_rank=None)
    state, exact_state = pre.init(params), exact.init(params)
    rows = 20 + bias
    assert state.factors.a[0].shape == (rows, 9) and state.factors.a[1].shape == (7, 7)
    assert isinstance(state.inverses.a[0], low_rank.LowRankInverse)
    assert not isinstance(state.inverses.a[1], low_rank.LowRankInverse)
    lam = 1e-2
    kw = dict(apply_fn=_mlp, loss=loss, damping=lam)
    g = jax.grad(lambda p: loss.mean(_mlp(p, x), y))(params)

    @jax.jit  # three updates, then the direction (F̂ + λ)⁻¹ g of the last one
    def run(state, exact_state):
        for i in range(3):
            key = jax.random.PRNGKey(6 + i)
            m, state = pre.update(state, params, (x, y), key=key, **kw)
            _, exact_state = exact.update(exact_state, params, (x, y), key=key, **kw)
        return m.inverse().mv(g), state, exact_state

    got, state, exact_state = run(state, exact_state)
    a_exact = exact_state.factors.a[0]
    np.testing.assert_allclose(state.factors.a[0], _sketch(a_exact, 4), rtol=1e-10, atol=1e-12)
    for i, layer in enumerate(g):
        a, gf = exact_state.factors.a[i], state.factors.g[i]
        da, dg = kronecker.pi_damping(a, gf, lam)
        a_damped = a + da * jnp.eye(a.shape[0])
        a_inv = _nystrom_oracle(a, 4, da) if i == 0 else jnp.linalg.inv(a_damped)
        g_inv = jnp.linalg.inv(gf + dg * jnp.eye(gf.shape[0]))
        has_b = "b" in layer
        v = jnp.concatenate([layer["w"], layer["b"][None]], 0) if has_b else layer["w"]
        want = a_inv @ v @ g_inv
        np.testing.assert_allclose(got[i]["w"], want[: layer["w"].shape[0]], rtol=1e-6, atol=1e-9)
        if has_b:
            np.testing.assert_allclose(got[i]["b"], want[-1], rtol=1e-6, atol=1e-9)


def _wide_problem():
    """An MLP 20-12-3 whose hidden layer's output factor G (12 × 12) has 3 large eigenvalues
    (its second layer's weights mostly in a 3-dimensional subspace), float64."""
    params, x, y, loss = _problem()
    k = jax.random.split(jax.random.PRNGKey(8), 3)
    w1 = jax.random.normal(k[1], (3, 3), jnp.float64) @ jax.random.normal(
        k[2], (3, 12), jnp.float64
    )
    params = [
        {"w": jax.random.normal(k[0], (20, 12), jnp.float64) / 4, "b": jnp.zeros(12, jnp.float64)},
        {
            "w": (w1.T + 0.05 * jax.random.normal(k[1], (12, 3), jnp.float64)) / 2,
            "b": jnp.zeros(3, jnp.float64),
        },
    ]
    return params, x, y, loss


@pytest.mark.parametrize("input_rank", [None, 4])
def test_kfac_keeps_the_sketch_of_the_exact_output_factor_and_inverts_it_blockwise(input_rank):
    """output_factor_rank=3: the hidden layer's 12-wide G is kept as its sketch [G Ω | diag G]
    (ℓ = 6), equal to that of the exact G an exact run averages from the same statistics (the
    3-wide G of the last layer stays exact); (F̂ + λ)⁻¹ g is, per layer, A⁻¹ [dW; db] G⁻¹ with
    G⁻¹ the dense Nyström oracle of the exact G (and A⁻¹ A's, for both layers' A with
    input_factor_rank=4); and the damped product F̂ + λ, built from the same low-rank factors,
    undoes it."""
    params, x, y, loss = _wide_problem()
    make = natgrad.preconditioners.kfac
    pre = make(
        statistics_every=1, inverse_every=1, input_factor_rank=input_rank, output_factor_rank=3
    )
    exact = make(statistics_every=1, inverse_every=1, output_factor_rank=None)
    state, exact_state = pre.init(params), exact.init(params)
    assert state.factors.g[0].shape == (12, 7) and state.factors.g[1].shape == (3, 3)
    assert isinstance(state.inverses.g[0], low_rank.LowRankInverse)
    assert not isinstance(state.inverses.g[1], low_rank.LowRankInverse)
    lam = 1e-2
    kw = dict(apply_fn=_mlp, loss=loss, damping=lam)
    g = jax.grad(lambda p: loss.mean(_mlp(p, x), y))(params)

    @jax.jit
    def run(state, exact_state):
        for i in range(3):
            key = jax.random.PRNGKey(6 + i)
            m, state = pre.update(state, params, (x, y), key=key, **kw)
            _, exact_state = exact.update(exact_state, params, (x, y), key=key, **kw)
        direction = m.inverse().mv(g)
        return direction, m.mv(direction), state, exact_state

    got, back, state, exact_state = run(state, exact_state)
    g_exact = exact_state.factors.g[0]
    np.testing.assert_allclose(state.factors.g[0], _sketch(g_exact, 3), rtol=1e-10, atol=1e-14)
    for i, layer in enumerate(g):
        a, gf = exact_state.factors.a[i], exact_state.factors.g[i]
        da, dg = kronecker.pi_damping(a, gf, lam)
        low_a = input_rank is not None  # both A's (21 and 13 wide) are wider than 2·4
        a_inv = _nystrom_oracle(a, 4, da) if low_a else jnp.linalg.inv(a + da * jnp.eye(len(a)))
        g_inv = _nystrom_oracle(gf, 3, dg) if i == 0 else jnp.linalg.inv(gf + dg * jnp.eye(3))
        v = jnp.concatenate([layer["w"], layer["b"][None]], 0)
        want = a_inv @ v @ g_inv
        np.testing.assert_allclose(got[i]["w"], want[:-1], rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(got[i]["b"], want[-1], rtol=1e-6, atol=1e-9)
    for b, want in zip(jax.tree.leaves(back), jax.tree.leaves(g), strict=True):
        np.testing.assert_allclose(b, want, rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("problem, output_rank", [(_problem, None), (_wide_problem, 3)])
def test_kfac_with_low_rank_factors_trains(problem, output_rank):
    params, x, y, loss = problem()
    opt = natgrad.kfac(
        _mlp,
        loss,
        input_factor_rank=4,
        output_factor_rank=output_rank,
        statistics_every=1,
        inverse_every=2,
    )
    state = opt.init(params)
    value = lambda p: loss.mean(_mlp(p, x), y)  # noqa: E731

    @jax.jit
    def step(params, state, key):
        updates, state = opt.update(jax.grad(value)(params), state, params, batch=(x, y), key=key)
        return jax.tree.map(lambda p, u: p + u, params, updates), state

    start = value(params)
    for i in range(10):
        params, state = step(params, state, jax.random.PRNGKey(i))
    assert int(state.rejected_steps) == 0 and float(value(params)) < 0.7 * float(start)


@pytest.mark.parametrize("name", ["input_factor_rank", "output_factor_rank"])
@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "32"])
def test_factor_ranks_reject_bad_values(name, bad):
    with pytest.raises(ValueError, match=name):
        natgrad.kfac(_mlp, losses.softmax_cross_entropy(), **{name: bad})


@pytest.mark.parametrize("name", ["input_factor_rank", "output_factor_rank"])
def test_factor_ranks_are_not_for_ekfac(name):
    with pytest.raises(ValueError, match=f"{name}.*eigenvalue_correction"):
        natgrad.kfac(_mlp, losses.softmax_cross_entropy(), eigenvalue_correction=True, **{name: 8})


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


def test_kfac_default_keeps_factors_at_least_256_wide_at_rank_32():
    """``"auto"`` (`defaults.KFAC_INPUT_FACTOR_RANK`, `KFAC_OUTPUT_FACTOR_RANK`): rank 32 for
    the input and output factors at least 256 wide (A 256 and 257, G 256), exact for the
    narrower ones (A 255, G 254 and 3); an int k takes every factor wider than 2k; None, and
    the default with EKFAC, invert every factor exactly."""
    from natgrad.optimizers import defaults

    apply, params = _dense_layers((255, 256, 254, 3))
    loss = losses.softmax_cross_entropy()

    def inverses(**kwargs):
        state = natgrad.kfac(apply, loss, **kwargs).init(params).preconditioner_state
        low = lambda fs: [isinstance(f, low_rank.LowRankInverse) for f in fs]  # noqa: E731
        return (low(state.inverses.a), low(state.inverses.g)), state

    kinds, state = inverses()
    assert defaults.KFAC_INPUT_FACTOR_RANK == defaults.KFAC_OUTPUT_FACTOR_RANK == "auto"
    assert kinds == ([True, True, False], [True, False, False])
    assert state.inverses.a[0].q.shape == (256, 32) and state.inverses.g[0].q.shape == (256, 32)
    assert [a.shape for a in state.factors.a] == [(256, 65), (257, 65), (255, 255)]
    assert [g.shape for g in state.factors.g] == [(256, 65), (254, 254), (3, 3)]
    assert kronecker.sketches(state) == ((64, 64), (64, 0), (0, 0))
    assert inverses(input_factor_rank=8, output_factor_rank=1)[0] == ([True] * 3, [True] * 3)
    assert inverses(input_factor_rank=None)[0] == ([False] * 3, [True, False, False])
    assert inverses(output_factor_rank=None)[0] == ([True, True, False], [False] * 3)
    assert inverses(eigenvalue_correction=True)[0] == ([False] * 3, [False] * 3)
    for name in ("input_factor_rank", "output_factor_rank"):
        with pytest.raises(ValueError, match=f"{name}.*'auto'"):
            natgrad.kfac(apply, loss, **{name: "automatic"})
        with pytest.raises(ValueError, match=f"{name}.*'auto'"):
            natgrad.preconditioners.kfac(**{name: "exact"})


def test_a_wide_embedding_keeps_its_output_factor_whole():
    """An embedding fills its own statistics (token counts and Σ g gᵀ, `natgrad.blocks`), so
    "auto" leaves its 512-wide G whole while the dense head's 513-wide A is sketched; K-FAC's
    updates run and are finite."""

    def apply(params, ids):
        h = natgrad.layers.embedding(params["embed"], ids)
        return natgrad.layers.dense(params["head"], jnp.mean(h, axis=1))

    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(4), 3)
    params = {
        "embed": {"embedding": 0.1 * jax.random.normal(k1, (50, 512))},
        "head": {"w": 0.05 * jax.random.normal(k2, (512, 5)), "b": jnp.zeros(5)},
    }
    ids = jax.random.randint(k3, (16, 4), 0, 50)
    y = jax.random.randint(k3, (16,), 0, 5)
    loss = losses.softmax_cross_entropy()
    opt = natgrad.kfac(apply, loss, statistics_every=1, inverse_every=1)
    state = opt.init(params)
    pre = state.preconditioner_state
    assert sorted(f.shape for f in pre.factors.g) == [(5, 5), (512, 512)]
    assert sorted(a.shape for a in pre.factors.a) == [(50,), (513, 65)]
    grads = jax.grad(lambda p: loss.mean(apply(p, ids), y))(params)
    update = jax.jit(lambda g, s, k: opt.update(g, s, params, batch=(ids, y), key=k))
    for i in range(3):
        updates, state = update(grads, state, jax.random.PRNGKey(i))
    assert int(state.rejected_steps) == 0
    assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))
