"""`natgrad._random`: jax.random's numbers bit for bit, compiled as one elementwise kernel.

The tests run with float64 enabled (conftest), so jax.random's default float type is float64
here; float32 is passed explicitly where it matters.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from benchmarks.compile_time import kernels

from natgrad import _random

KEYS = {
    "typed": lambda seed: jax.random.key(seed),
    "raw": lambda seed: jax.random.PRNGKey(seed),
}
SHAPES = [(7,), (5, 3, 4), (128, 10), (1,)]
DTYPES = [jnp.float32, jnp.float64]


def _eq(a, b):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert a.dtype == b.dtype and a.shape == b.shape


@pytest.mark.parametrize("kind", sorted(KEYS))
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_draws_are_jax_randoms_numbers(kind, shape, dtype):
    key = KEYS[kind](11)
    _eq(_random.uniform(key, shape, dtype), jax.random.uniform(key, shape, dtype))
    _eq(
        _random.uniform(key, shape, dtype, -2.5, 4.0),
        jax.random.uniform(key, shape, dtype, -2.5, 4.0),
    )
    _eq(_random.gumbel(key, shape, dtype), jax.random.gumbel(key, shape, dtype))
    _eq(_random.normal(key, shape, dtype), jax.random.normal(key, shape, dtype))
    _eq(_random.rademacher(key, shape, dtype), jax.random.rademacher(key, shape, dtype))
    logits = jax.random.normal(jax.random.key(2), shape, dtype)
    _eq(_random.categorical(key, logits), jax.random.categorical(key, logits, axis=-1))
    p = jax.nn.sigmoid(logits)
    _eq(_random.bernoulli(key, p), jax.random.bernoulli(key, p))


@pytest.mark.parametrize("kind", sorted(KEYS))
def test_split_is_jax_randoms_split(kind):
    key = KEYS[kind](3)
    for num in (1, 2, 5):
        ours, theirs = _random.split(key, num), jax.random.split(key, num)
        assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
        if kind == "typed":
            ours, theirs = jax.random.key_data(ours), jax.random.key_data(theirs)
        _eq(ours, theirs)
    # Keys split from ours draw jax.random's numbers too.
    k1 = _random.split(key)[1]
    _eq(_random.normal(k1, (4,)), jax.random.normal(jax.random.split(key)[1], (4,)))


def test_same_numbers_under_jit_and_vmap():
    key = jax.random.key(5)
    draw = jax.jit(lambda k: _random.gumbel(k, (16, 3), jnp.float32))
    _eq(draw(key), jax.random.gumbel(key, (16, 3), jnp.float32))
    keys = jax.random.split(key, 4)
    _eq(
        jax.vmap(lambda k: _random.normal(k, (6,), jnp.float32))(keys),
        jax.vmap(lambda k: jax.random.normal(k, (6,), jnp.float32))(keys),
    )
    _eq(
        jax.random.key_data(jax.jit(lambda k: _random.split(k, 3))(key)),
        jax.random.key_data(jax.random.split(key, 3)),
    )


def test_other_generators_fall_back_to_jax_random():
    """A key of another PRNG implementation, the non-partitionable threefry, the high-range
    Gumbel mode and other float types are drawn by jax.random itself (the same numbers)."""
    rbg = jax.random.key(4, impl="rbg")
    _eq(_random.uniform(rbg, (5, 2), jnp.float32), jax.random.uniform(rbg, (5, 2), jnp.float32))
    _eq(jax.random.key_data(_random.split(rbg, 3)), jax.random.key_data(jax.random.split(rbg, 3)))
    key = jax.random.key(4)
    _eq(_random.uniform(key, (9,), jnp.float16), jax.random.uniform(key, (9,), jnp.float16))
    _eq(_random.normal(key, (9,), jnp.bfloat16), jax.random.normal(key, (9,), jnp.bfloat16))
    with jax.threefry_partitionable(False):
        _eq(_random.gumbel(key, (3, 4), jnp.float32), jax.random.gumbel(key, (3, 4), jnp.float32))
    # A draw of 2³² numbers or more would need the counter's high word: jax.random draws it.
    assert _random._counted(key, 2**32 - 1) is not None and _random._counted(key, 2**32) is None
    jax.config.update("jax_high_dynamic_range_gumbel", True)
    try:
        _eq(_random.gumbel(key, (3, 4), jnp.float32), jax.random.gumbel(key, (3, 4), jnp.float32))
    finally:
        jax.config.update("jax_high_dynamic_range_gumbel", False)


def test_categorical_takes_the_first_maximum_or_nan_as_argmax_does():
    key = jax.random.key(0)
    logits = jnp.array(
        [[0.0, jnp.inf, jnp.inf, 1.0], [jnp.nan, 0.0, jnp.nan, 2.0], [-jnp.inf] * 3 + [0.0]]
    )
    _eq(_random.categorical(key, logits), jax.random.categorical(key, logits, axis=-1))
    np.testing.assert_array_equal(_random.categorical(key, logits), [1, 0, 3])


def test_a_categorical_draw_compiles_to_a_few_kernels():
    """The point of the module: a categorical draw on a (128, 10) batch is a few kernels for
    XLA's CPU backend (the hash with its Gumbel noise, the maximum, the first index), where
    jax.random's rolled threefry loop alone is ~10."""
    logits = jnp.zeros((128, 10), jnp.float32)
    compiled = jax.jit(_random.categorical).lower(jax.random.key(0), logits).compile()
    assert kernels(compiled.as_text()) <= 4
