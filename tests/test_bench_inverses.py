"""benchmarks.inverses: each method inverts, Newton–Schulz's convergence condition, a tiny run."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from benchmarks import inverses, report
from benchmarks.timing import setup


def _spd(n, seed, damping=0.1):
    a = jax.random.normal(jax.random.PRNGKey(seed), (n, n), jnp.float64)
    return a @ a.T / n + damping * jnp.eye(n, dtype=jnp.float64)


def test_every_method_inverts_a_damped_spd_matrix():
    m = _spd(12, 0)
    near = jnp.linalg.inv(m + 1e-3 * jnp.eye(12))  # a start close to M⁻¹
    exact = np.linalg.inv(np.asarray(m))
    for name, fn in inverses.methods().items():
        x = fn(m, near)
        if name == "newton_schulz_1":  # one step: error squared, not gone
            assert inverses.residual(m, x) < inverses.residual(m, near) ** 2 * 12**0.5
        else:
            np.testing.assert_allclose(x, exact, rtol=1e-6, atol=1e-8, err_msg=name)


def test_newton_schulz_squares_the_residual_and_diverges_from_a_far_start():
    """E = I − MX becomes E² each iteration: from ‖E‖ < 1 it converges quadratically, from a
    start that M moved too far from (‖E‖ > 1) it blows up — why K-FAC does not use it."""
    m = _spd(10, 1)
    eye = jnp.eye(10, dtype=m.dtype)
    x0 = jnp.linalg.inv(m) @ (eye + 0.3 * (_spd(10, 2) - eye) / 3)
    e0 = eye - m @ x0
    x1 = inverses.newton_schulz(m, x0, 1)
    np.testing.assert_allclose(eye - m @ x1, e0 @ e0, atol=1e-12)
    far = 3.0 * jnp.linalg.inv(m)  # E = −2I
    assert inverses.residual(m, inverses.newton_schulz(m, far, 5)) > 1e3


@pytest.mark.slow
def test_a_tiny_run_times_every_method_on_trained_factors(monkeypatch):
    monkeypatch.setattr(inverses, "SNAPSHOTS", (3, 6))
    params, apply_fn, batch, loss = setup((12, 6, 3), 24)  # 3 batches of 8
    payload = inverses.bench(2, problem=(params, apply_fn, batch, loss), batch_size=8)
    rows = {r["factor"]: r for r in payload["factors"]}
    assert set(rows) == {"A0", "G0", "A1", "G1"}
    assert rows["A0"]["width"] == 13 and rows["G1"]["width"] == 3
    for r in rows.values():
        assert r["moved"] > 0  # the factors did change between the snapshots
        for name in inverses.methods():
            assert r[f"{name}_over_sgd"] > 0 and math.isfinite(r[f"{name}_over_sgd"])
        for name in ("lu", "cholesky", "eigh"):  # float32 on damped factors
            assert r[f"{name}_residual"] < 1e-3
    lines = report.generic_section(payload)
    assert any("lu_over_sgd" in line for line in lines)
