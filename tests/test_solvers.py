import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from natgrad import solvers


def spd(key, n, cond=10.0):
    q, _ = jnp.linalg.qr(jax.random.normal(key, (n, n)))
    eig = jnp.logspace(0, jnp.log10(cond), n)
    return (q * eig) @ q.T


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 12), seed=st.integers(0, 10_000), log_cond=st.floats(0.0, 4.0))
def test_cg_matches_dense_solve_on_random_spd(n, seed, log_cond):
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    a = spd(k1, n, 10.0**log_cond)
    b = jax.random.normal(k2, (n,))
    res = solvers.cg(lambda v: a @ v, b, maxiter=10 * n, tol=1e-12)
    np.testing.assert_allclose(res.x, jnp.linalg.solve(a, b), rtol=1e-6, atol=1e-8)
    assert solvers.STATUS_NAMES[int(res.status)] == "converged"
    np.testing.assert_allclose(res.residual, b - a @ res.x, atol=1e-8)
    np.testing.assert_allclose(res.phi, 0.5 * res.x @ a @ res.x - b @ res.x, rtol=1e-8, atol=1e-12)


def test_pytree_solution_matches_dense_solve():
    a = spd(jax.random.PRNGKey(0), 5)
    b = {"u": jnp.arange(3.0), "v": jnp.ones((2,))}

    def mv(t):
        flat = jnp.concatenate([t["u"], t["v"]])
        out = a @ flat
        return {"u": out[:3], "v": out[3:]}

    res = solvers.cg(mv, b, maxiter=50, tol=1e-12)
    dense = solvers.dense_solve(mv, b)
    np.testing.assert_allclose(res.x["u"], dense["u"], atol=1e-10)
    np.testing.assert_allclose(res.x["v"], dense["v"], atol=1e-10)


@pytest.mark.parametrize("martens_stop", [False, True])
def test_pytree_of_one_dtype_runs_as_the_raveled_system(martens_stop):
    """Leaves of one dtype are solved raveled into one vector (one kernel per update): the
    same result, field by field, as CG on the raveled system by hand, with the warm start,
    the preconditioner and the saved iterates unraveled to the tree's shape."""
    a = spd(jax.random.PRNGKey(1), 9, cond=30.0)
    split = lambda v: {"w": v[:6].reshape(2, 3), "b": v[6:]}  # noqa: E731

    def join(t):  # the tree's leaves in their order, "b" then "w"
        return jnp.concatenate([t["b"], t["w"].ravel()])

    perm = jnp.concatenate([jnp.arange(6, 9), jnp.arange(6)])
    a_tree = a[perm][:, perm]  # A in the raveled order of the tree's leaves
    d = jnp.diag(a)

    def mv(t):
        return split(a @ jnp.concatenate([t["w"].ravel(), t["b"]]))

    def precond(t):
        return split(jnp.concatenate([t["w"].ravel(), t["b"]]) / d)

    b = split(jax.random.normal(jax.random.PRNGKey(2), (9,)))
    x0 = split(0.1 * jnp.ones(9))
    options = dict(maxiter=7, tol=1e-10, martens_stop=martens_stop, save_iterates=True)
    tree = solvers.cg(mv, b, x0=x0, preconditioner=precond, **options)
    flat = solvers.cg(
        lambda v: a_tree @ v, join(b), x0=join(x0), preconditioner=lambda v: v / d[perm], **options
    )
    assert jax.tree.structure(tree.x) == jax.tree.structure(b)
    assert tree.saved["w"].shape == (len(solvers.save_schedule(7)) + 1, 2, 3)
    # The same algorithm; only the products' summation order differs.
    for field in ("iterations", "status", "saved_steps"):
        np.testing.assert_array_equal(getattr(tree, field), getattr(flat, field))
    for field in ("residual_norm", "phi"):
        np.testing.assert_allclose(getattr(tree, field), getattr(flat, field), rtol=1e-10)
    np.testing.assert_allclose(join(tree.x), flat.x, rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(join(tree.residual), flat.residual, rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(jax.vmap(join)(tree.saved), flat.saved, rtol=1e-10, atol=1e-13)


def test_pytree_of_mixed_dtypes_is_solved_leaf_by_leaf():
    a = spd(jax.random.PRNGKey(3), 5)
    b = {"u": jnp.arange(1.0, 4.0), "v": jnp.ones((2,), jnp.float32)}

    def mv(t):
        out = a @ jnp.concatenate([t["u"], t["v"].astype(jnp.float64)])
        return {"u": out[:3], "v": out[3:].astype(jnp.float32)}

    res = solvers.cg(mv, b, maxiter=50, tol=1e-6)
    assert res.x["u"].dtype == jnp.float64 and res.x["v"].dtype == jnp.float32
    exact = jnp.linalg.solve(a, jnp.concatenate([b["u"], b["v"].astype(jnp.float64)]))
    np.testing.assert_allclose(res.x["u"], exact[:3], rtol=1e-5)
    np.testing.assert_allclose(res.x["v"], exact[3:], rtol=1e-5)


def test_warm_start_from_the_solution_needs_no_iterations():
    a = spd(jax.random.PRNGKey(1), 8)
    b = jnp.ones(8)
    x = jnp.linalg.solve(a, b)
    res = solvers.cg(lambda v: a @ v, b, x0=x, tol=1e-8)
    assert int(res.iterations) == 0
    near = solvers.cg(lambda v: a @ v, b, x0=x + 1e-3, tol=1e-10, maxiter=100)
    cold = solvers.cg(lambda v: a @ v, b, tol=1e-10, maxiter=100)
    np.testing.assert_allclose(near.x, x, atol=1e-9)
    assert int(near.iterations) <= int(cold.iterations)


def test_jacobi_preconditioner_cuts_iterations_on_an_ill_conditioned_system():
    key = jax.random.PRNGKey(2)
    n = 60
    d = jnp.logspace(0, 5, n)  # badly scaled diagonal plus a small coupling
    c = 0.01 * spd(key, n, 5.0)
    a = jnp.diag(d) + c * jnp.sqrt(jnp.outer(d, d))
    b = jnp.ones(n)
    plain = solvers.cg(lambda v: a @ v, b, maxiter=500, tol=1e-8)
    pre = solvers.cg(
        lambda v: a @ v, b, maxiter=500, tol=1e-8, preconditioner=lambda r: r / jnp.diag(a)
    )
    np.testing.assert_allclose(pre.x, jnp.linalg.solve(a, b), rtol=1e-5)
    assert int(pre.iterations) * 3 < int(plain.iterations)


def test_negative_curvature_exit_returns_last_good_iterate():
    a = jnp.diag(jnp.array([1.0, 2.0, -1.0]))
    b = jnp.array([1.0, 1.0, 1.0])
    res = solvers.cg(lambda v: a @ v, b, maxiter=10)
    assert solvers.STATUS_NAMES[int(res.status)] == "negative_curvature"
    assert jnp.all(jnp.isfinite(res.x))
    # The returned iterate decreased φ from 0 and was reached before the bad direction.
    assert float(res.phi) < 0
    np.testing.assert_allclose(res.residual, b - a @ res.x, atol=1e-12)  # r matches the kept x
    np.testing.assert_allclose(res.phi, 0.5 * res.x @ a @ res.x - b @ res.x, atol=1e-12)
    # Indefinite from the first direction: nothing good, x stays at the start.
    first = solvers.cg(lambda v: a @ v, jnp.array([0.0, 0.0, 1.0]), maxiter=10)
    assert int(first.iterations) == 0
    np.testing.assert_array_equal(first.x, jnp.zeros(3))


def test_martens_rule_stops_earlier_than_a_tight_tolerance():
    a = spd(jax.random.PRNGKey(3), 200, cond=1e5)
    b = jax.random.normal(jax.random.PRNGKey(4), (200,))
    tight = solvers.cg(lambda v: a @ v, b, maxiter=400, tol=1e-14)
    martens = solvers.cg(lambda v: a @ v, b, maxiter=400, tol=1e-14, martens_stop=True)
    assert solvers.STATUS_NAMES[int(martens.status)] == "martens"
    assert int(martens.iterations) < int(tight.iterations)
    # ... while already having most of the achievable decrease of φ.
    phi_star = -0.5 * b @ jnp.linalg.solve(a, b)
    assert float(martens.phi) < 0.9 * float(phi_star)


def test_saved_iterates_follow_martens_schedule():
    assert solvers.save_schedule(30) == (5, 7, 9, 11, 15, 19, 25)
    a = spd(jax.random.PRNGKey(5), 40, cond=1e3)
    b = jnp.ones(40)
    res = solvers.cg(lambda v: a @ v, b, maxiter=30, tol=1e-30, save_iterates=True)
    steps = np.asarray(res.saved_steps)
    assert list(steps) == [5, 7, 9, 11, 15, 19, 25, 30]
    np.testing.assert_array_equal(res.saved[-1], res.x)
    # Iterate 5 equals a fresh 5-iteration solve.
    five = solvers.cg(lambda v: a @ v, b, maxiter=5, tol=1e-30)
    np.testing.assert_allclose(res.saved[0], five.x, atol=1e-12)


def test_saved_iterates_when_converging_early():
    a = jnp.diag(jnp.arange(1.0, 7.0))
    res = solvers.cg(lambda v: a @ v, jnp.ones(6), maxiter=30, tol=1e-10, save_iterates=True)
    steps = np.asarray(res.saved_steps)
    assert steps[0] == 5 and steps[1] == int(res.iterations) == 6 and np.all(steps[2:] == -1)
    np.testing.assert_array_equal(res.saved[1], res.x)


def test_cg_under_jit_with_traced_tolerance_and_preconditioner():
    a = spd(jax.random.PRNGKey(6), 10)

    @jax.jit
    def solve(b, tol, diag):
        return solvers.cg(
            lambda v: a @ v,
            b,
            tol=tol,
            maxiter=50,
            preconditioner=lambda r: r / diag,
            martens_stop=True,
            save_iterates=True,
        )

    res = solve(jnp.ones(10), 1e-10, jnp.diag(a))
    np.testing.assert_allclose(res.x, jnp.linalg.solve(a, jnp.ones(10)), rtol=1e-6)


def test_nonfinite_product_stops_with_a_flag():
    res = solvers.cg(lambda v: v * jnp.nan, jnp.ones(3), maxiter=5)
    assert solvers.STATUS_NAMES[int(res.status)] == "nonfinite"
    np.testing.assert_array_equal(res.x, jnp.zeros(3))


def test_preconditioner_failing_after_an_update_keeps_that_update_flagged():
    # M⁻¹ fails (NaN) once the residual has shrunk: the first update is good (finite φ), the
    # next direction cannot be formed. CG stops flagged, with the first iterate.
    a = spd(jax.random.PRNGKey(7), 6)
    b = jnp.ones(6)
    bnorm = jnp.linalg.norm(b)

    def failing(r):
        return jnp.where(jnp.linalg.norm(r) < 0.999 * bnorm, jnp.nan, 1.0) * r

    res = solvers.cg(lambda v: a @ v, b, maxiter=10, preconditioner=failing)
    one = solvers.cg(lambda v: a @ v, b, maxiter=1)
    assert solvers.STATUS_NAMES[int(res.status)] == "nonfinite"
    assert int(res.iterations) == 1
    np.testing.assert_allclose(res.x, one.x, rtol=1e-12)
    np.testing.assert_allclose(res.residual, b - a @ res.x, atol=1e-12)


def test_bad_maxiter():
    with pytest.raises(ValueError, match="maxiter"):
        solvers.cg(lambda v: v, jnp.ones(2), maxiter=0)


def _textbook_pcg(a, b, x0, minv, iterations):
    """Nocedal & Wright's Alg. 5.3 in NumPy float64: the iterates x_1 … x_k from x0."""
    a, b, x, minv = (np.asarray(t, np.float64) for t in (a, b, x0, minv))
    r = b - a @ x
    y = minv @ r
    p = y
    out = []
    for _ in range(iterations):
        ap = a @ p
        alpha = (r @ y) / (p @ ap)
        x = x + alpha * p
        r_new = r - alpha * ap
        y_new = minv @ r_new
        p = y_new + (r_new @ y_new) / (r @ y) * p
        r, y = r_new, y_new
        out.append(x)
    return out


@pytest.mark.parametrize("martens_stop", [False, True])
def test_warm_started_preconditioned_cg_follows_the_textbook_iterates(martens_stop):
    # The warm start's r₀ = b − A x₀ and y₀ = M⁻¹ r₀ are computed on the loop's set-up trip:
    # iterates, φ, the residual and the saved iterates must be the textbook ones from x₀.
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(11), 3)
    n = 12
    a = spd(k1, n, 1e3)
    b = jax.random.normal(k2, (n,))
    x0 = 0.3 * jax.random.normal(k3, (n,))
    minv = jnp.diag(1.0 / (jnp.diag(a) + 0.5))
    for k, steps in ((1, [1]), (3, [3]), (7, [5, 7, -1])):
        res = solvers.cg(
            lambda v: a @ v,
            b,
            x0=x0,
            maxiter=k,
            tol=0.0,
            preconditioner=lambda r: minv @ r,
            martens_stop=martens_stop,
            save_iterates=True,
        )
        ref = _textbook_pcg(a, b, x0, minv, k)
        assert int(res.iterations) == k
        np.testing.assert_allclose(res.x, ref[-1], rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(res.residual, b - a @ res.x, atol=1e-9)
        np.testing.assert_allclose(res.phi, 0.5 * res.x @ a @ res.x - b @ res.x, rtol=1e-9)
        for slot, i in enumerate(np.asarray(res.saved_steps)):
            if i > 0:
                np.testing.assert_allclose(res.saved[slot], ref[i - 1], rtol=1e-9, atol=1e-12)
        assert list(np.asarray(res.saved_steps)) == steps


def test_warm_start_compiles_one_product_and_one_preconditioner():
    # The set-up trip reuses the loop body's product and preconditioner: each is traced once
    # (one copy in the compiled program), not once before the loop and once in it.
    traced = {"matvec": 0, "precond": 0}
    a = spd(jax.random.PRNGKey(3), 5)

    def matvec(v):
        traced["matvec"] += 1
        return a @ v

    def precond(r):
        traced["precond"] += 1
        return r / jnp.diag(a)

    b = jnp.ones(5)
    x = jax.jit(lambda x0: solvers.cg(matvec, b, x0=x0, maxiter=5, preconditioner=precond).x)
    np.testing.assert_allclose(x(0.1 * b), jnp.linalg.solve(a, b), rtol=1e-6)
    assert traced == {"matvec": 1, "precond": 1}


def test_nonfinite_warm_start_stops_flagged_before_any_iteration():
    a = spd(jax.random.PRNGKey(4), 4)
    x0 = jnp.array([1.0, jnp.nan, 0.0, 0.0])
    res = solvers.cg(lambda v: a @ v, jnp.ones(4), x0=x0, maxiter=5)
    assert solvers.STATUS_NAMES[int(res.status)] == "nonfinite"
    assert int(res.iterations) == 0


def test_cg_backtrack_is_cg_with_saved_iterates_then_backtrack():
    a = jnp.diag(jnp.linspace(1.0, 30.0, 7))
    b = {"u": jnp.ones(4), "v": jnp.arange(3.0)}
    flat = lambda t: jnp.concatenate([t["u"], t["v"]])  # noqa: E731
    matvec = lambda t: {"u": (a @ flat(t))[:4], "v": (a @ flat(t))[4:]}  # noqa: E731
    options = dict(x0={"u": 0.1 * jnp.ones(4), "v": jnp.zeros(3)}, maxiter=7, tol=0.0)
    ref = solvers.cg(matvec, b, save_iterates=True, **options)
    # A loss least at the 5th iterate, so backtracking steps back from the 7th to it.
    target = flat(jax.tree.map(lambda s: s[0], ref.saved))
    loss_of = lambda t: jnp.sum((flat(t) - target) ** 2)  # noqa: E731
    res, d, kept, f_d, phi = solvers.cg_backtrack(matvec, b, loss_of, **options)
    j, f_j = solvers.backtrack(ref, loss_of)
    for leaf in ("u", "v"):
        np.testing.assert_allclose(d[leaf], ref.saved[leaf][j], rtol=1e-12)
        np.testing.assert_allclose(res.saved[leaf], ref.saved[leaf], rtol=1e-12)
        np.testing.assert_allclose(res.x[leaf], ref.x[leaf], rtol=1e-12)
    assert int(kept) == int(ref.saved_steps[j]) and float(f_d) == pytest.approx(float(f_j))
    assert int(kept) == 5 < int(res.iterations)  # it did step back
    x = np.asarray(flat(d))
    np.testing.assert_allclose(float(phi), 0.5 * x @ a @ x - flat(b) @ x, rtol=1e-10)


@pytest.mark.parametrize("martens_stop", [False, True])
@pytest.mark.parametrize("warm", [False, True])
def test_saved_iterates_carry_their_phi(martens_stop, warm):
    a = spd(jax.random.PRNGKey(7), 30)
    b = jax.random.normal(jax.random.PRNGKey(8), (30,))
    x0 = 0.1 * b if warm else None
    res = solvers.cg(
        lambda v: a @ v,
        b,
        x0=x0,
        maxiter=20,
        tol=0.0,
        martens_stop=martens_stop,
        save_iterates=True,
    )
    used = np.asarray(res.saved_steps) >= 0
    assert used.sum() >= 3
    for slot in np.flatnonzero(used):
        x = np.asarray(res.saved[slot])
        expected = 0.5 * x @ np.asarray(a) @ x - np.asarray(b) @ x
        np.testing.assert_allclose(float(res.saved_phi[slot]), expected, rtol=1e-9)
    assert np.isnan(np.asarray(res.saved_phi)[~used]).all()
    np.testing.assert_allclose(float(res.phi), float(res.saved_phi[used][-1]), rtol=1e-12)
