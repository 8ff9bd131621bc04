import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import LOSSES, make_targets
from natgrad import losses


def _per_example_hessian(loss, outputs, targets):
    """Dense H_i = ∂²nll/∂z² for each example, by autodiff."""
    return jax.vmap(lambda z, t: jax.hessian(lambda zz: loss.nll(zz[None], t[None])[0])(z))(
        outputs, targets
    )


@pytest.mark.parametrize("out_dim", [1, 4])
def test_hessian_vp_matches_autodiff(loss, out_dim):
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(1), 3)
    z = jax.random.normal(k1, (6, out_dim))
    t = make_targets(loss, k2, 6, out_dim)
    u = jax.random.normal(k3, (6, out_dim))
    h = _per_example_hessian(loss, z, t)
    np.testing.assert_allclose(loss.hessian_vp(z, t, u), jnp.einsum("bij,bj->bi", h, u), atol=1e-12)


@pytest.mark.parametrize("out_dim", [1, 4])
def test_fisher_vp_is_expected_score_outer_product(loss, out_dim):
    """E_y[s sᵀ] u estimated from many samples agrees with the closed-form expectation."""
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(2), 3)
    z = jax.random.normal(k1, (3, out_dim))
    u = jax.random.normal(k2, (3, out_dim))
    n = 40_000
    ys = jax.vmap(lambda k: loss.sample(k, z))(jax.random.split(k3, n))
    s = jax.vmap(lambda y: loss.score(z, y))(ys)  # (n, B, K)
    samples = s * jnp.sum(s * u, axis=-1, keepdims=True)
    mean, se = samples.mean(0), samples.std(0) / np.sqrt(n)
    exact = loss.fisher_vp(z, u)
    assert np.all(np.abs(mean - exact) <= 5 * se + 1e-12)


def test_fisher_equals_hessian_for_these_exponential_families(loss):
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(3), 3)
    z = jax.random.normal(k1, (4, 3))
    t = make_targets(loss, k2, 4, 3)
    u = jax.random.normal(k3, (4, 3))
    np.testing.assert_allclose(loss.fisher_vp(z, u), loss.hessian_vp(z, t, u), atol=1e-12)


def test_score_is_gradient_of_nll(loss):
    z = jax.random.normal(jax.random.PRNGKey(4), (5, 3))
    t = make_targets(loss, jax.random.PRNGKey(5), 5, 3)
    g = jax.grad(lambda zz: loss.mean(zz, t))(z)
    np.testing.assert_allclose(loss.score(z, t) / 5, g, atol=1e-12)


def test_known_values():
    z = jnp.array([[0.0, 0.0]])
    np.testing.assert_allclose(losses.softmax_cross_entropy().nll(z, jnp.array([1])), [np.log(2)])
    np.testing.assert_allclose(
        losses.squared_error().nll(jnp.array([[1.0, 2.0]]), jnp.array([[0.0, 0.0]])), [2.5]
    )
    np.testing.assert_allclose(
        losses.sigmoid_cross_entropy().nll(z, jnp.array([[1.0, 0.0]])), [2 * np.log(2)]
    )


def test_samples_follow_the_predictive_distribution():
    z = jnp.array([[2.0, 0.0, -1.0]])
    ys = jax.vmap(lambda k: losses.softmax_cross_entropy().sample(k, z))(
        jax.random.split(jax.random.PRNGKey(0), 20_000)
    )
    freq = np.bincount(np.asarray(ys[:, 0]), minlength=3) / 20_000
    p = np.asarray(jax.nn.softmax(z[0]))
    assert np.all(np.abs(freq - p) <= 5 * np.sqrt(p * (1 - p) / 20_000))


@pytest.mark.parametrize("name", list(LOSSES))
def test_bad_target_shape_names_targets(name):
    loss = LOSSES[name]()
    with pytest.raises(ValueError, match="targets"):
        loss.validate(jnp.zeros((4, 3)), jnp.zeros((5, 3), jnp.int32))


def test_label_out_of_range_is_rejected():
    with pytest.raises(ValueError, match=r"targets: labels must lie in \[0, 2\]"):
        losses.softmax_cross_entropy().validate(jnp.zeros((2, 3)), jnp.array([0, 3]))
    with pytest.raises(ValueError, match="integer"):
        losses.softmax_cross_entropy().validate(jnp.zeros((2, 3)), jnp.array([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        losses.sigmoid_cross_entropy().validate(jnp.zeros((2, 1)), jnp.array([[0.0], [2.0]]))


def test_range_check_skipped_under_jit():
    f = jax.jit(lambda t: losses.softmax_cross_entropy().validate(jnp.zeros((2, 3)), t) or 0)
    f(jnp.array([0, 1]))  # traced labels: no concrete check, no error


@pytest.mark.parametrize("out_dim", [1, 4])
def test_curvature_sqrt_squares_to_the_output_curvature(loss, out_dim):
    """Σ_k q_k q_kᵀ = H_z per example: the closed forms and the generic eigendecomposition."""
    k1, k2 = jax.random.split(jax.random.PRNGKey(7))
    z = jax.random.normal(k1, (5, out_dim))
    h = _per_example_hessian(loss, z, make_targets(loss, k2, 5, out_dim))
    closed = loss.curvature_sqrt(z)
    generic = losses.Loss.curvature_sqrt(loss, z)
    for q in (closed, generic):
        assert q.shape == (out_dim, 5, out_dim)
        np.testing.assert_allclose(jnp.einsum("kbi,kbj->bij", q, q), h, atol=1e-12)


def test_samples_are_jax_randoms_numbers():
    """The losses draw through `natgrad._random` (tests/test_random.py): a sample must be
    exactly jax.random's for the same key."""
    key = jax.random.PRNGKey(7)
    logits = jax.random.normal(jax.random.PRNGKey(1), (5, 3, 4))
    np.testing.assert_array_equal(
        losses.softmax_cross_entropy().sample(key, logits),
        jax.random.categorical(key, logits, axis=-1),
    )
    p = jax.nn.sigmoid(logits)
    np.testing.assert_array_equal(
        losses.sigmoid_cross_entropy().sample(key, logits), jax.random.bernoulli(key, p)
    )
    y = losses.squared_error().sample(key, logits)
    np.testing.assert_array_equal(y, logits + jax.random.normal(key, logits.shape, logits.dtype))
