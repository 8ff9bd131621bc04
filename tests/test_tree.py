"""Pytree vector arithmetic (`natgrad._tree`): reductions over raveled leaves, mixed dtypes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from natgrad import _tree


def _tree_pair(dtype_b=jnp.float64):
    k = jax.random.split(jax.random.PRNGKey(0), 6)
    x = {
        "w": jax.random.normal(k[0], (7, 5)),
        "b": jax.random.normal(k[1], (5,)),
        "s": jnp.asarray(2.0),
    }
    y = {"w": jax.random.normal(k[2], (7, 5)), "b": jax.random.normal(k[3], (5,)).astype(dtype_b)}
    y["s"] = jnp.asarray(-3.0)
    return x, y


@pytest.mark.parametrize("dtype_b", [jnp.float64, jnp.float32])
def test_vdot_and_norm_are_the_sums_over_every_leaf(dtype_b):
    """One vector when the leaves share a dtype, leaf by leaf when they do not: the same value."""
    x, y = _tree_pair(dtype_b)
    expected = sum(float(np.vdot(np.asarray(x[k]), np.asarray(y[k]))) for k in x)
    np.testing.assert_allclose(float(_tree.vdot(x, y)), expected, rtol=1e-6)
    np.testing.assert_allclose(float(jax.jit(_tree.vdot)(x, y)), expected, rtol=1e-6)
    squares = sum(float(np.sum(np.square(np.asarray(x[k])))) for k in x)
    np.testing.assert_allclose(float(_tree.norm(x)), np.sqrt(squares), rtol=1e-12)
    assert float(_tree.vdot({"a": jnp.ones(3)}, {"a": jnp.arange(3.0)})) == 3.0


@pytest.mark.parametrize("bad", [jnp.nan, jnp.inf, -jnp.inf])
@pytest.mark.parametrize("dtype_b", [jnp.float64, jnp.float32])
def test_all_finite_sees_a_bad_entry_in_any_leaf(bad, dtype_b):
    x, y = _tree_pair(dtype_b)
    assert bool(_tree.all_finite(y)) and bool(jax.jit(_tree.all_finite)(y))
    for key, index in (("w", (6, 4)), ("b", (0,)), ("s", ())):
        broken = dict(y, **{key: y[key].at[index].set(bad)})
        assert not bool(_tree.all_finite(broken))
        assert not bool(jax.jit(_tree.all_finite)(broken))
    assert _tree.all_finite({}) is True
