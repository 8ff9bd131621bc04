"""Shared fixtures: tiny models whose dense curvature matrices are cheap to form in float64."""

import os

import jax

# The `natgrad` command caches compiled steps on disk (natgrad.experiments.cli.compilation_cache);
# the tests' runs, in-process or in subprocesses, do not, unless a test asks for it.
os.environ.setdefault("NATGRAD_CACHE_DIR", "off")
# The in-process tests compile with tests/compile_options.py's FAST_COMPILE (no LLVM expensive
# passes): the suite is XLA-compile bound, and this about halves each compile. Only this
# process's CPU backend gets the flags (it is initialised here): the subprocesses the tests start
# (the CLI, the README, the examples) inherit the caller's XLA_FLAGS and compile as users do.
if os.environ.get("NATGRAD_TEST_FULL_COMPILE") != "1":
    from compile_options import FAST_COMPILE

    _user_flags = os.environ.get("XLA_FLAGS")
    _fast = [f"--{name}={str(value).lower()}" for name, value in FAST_COMPILE.items()]
    os.environ["XLA_FLAGS"] = " ".join([_user_flags or "", *_fast]).strip()
    jax.devices()
    if _user_flags is None:
        del os.environ["XLA_FLAGS"]
    else:
        os.environ["XLA_FLAGS"] = _user_flags
# Dense oracles are float64. Tests that exercise float32 paths ask for float32 explicitly.
jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import pytest  # noqa: E402

from natgrad import losses  # noqa: E402


def mlp_params(key, sizes):
    """A tanh MLP with biases, as a list of {"w", "b"} dicts."""
    params = []
    for i, (m, n) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        kw, kb = jax.random.split(jax.random.fold_in(key, i))
        params.append(
            {
                "w": jax.random.normal(kw, (m, n)) / jnp.sqrt(m),
                "b": 0.1 * jax.random.normal(kb, (n,)),
            }
        )
    return params


def mlp_apply(params, x):
    for layer in params[:-1]:
        x = jnp.tanh(x @ layer["w"] + layer["b"])
    return x @ params[-1]["w"] + params[-1]["b"]


def train_step(opt, apply_fn, loss):
    """The library's training step (`natgrad.experiments.training.make_step`), jitted."""
    from natgrad.experiments import training

    return jax.jit(training.make_step(opt, apply_fn, loss))


def train(opt, apply_fn, loss, params, batches):
    """`train_step` over `batches`, key PRNGKey(i) at step i: (params, state, batch losses)."""
    step, state, values = train_step(opt, apply_fn, loss), opt.init(params), []
    for i, batch in enumerate(batches):
        params, state, value = step(params, state, batch, jax.random.PRNGKey(i))
        values.append(float(value))
    return params, state, values


def make_targets(loss, key, batch_size, out_dim):
    if loss.name == "softmax_cross_entropy":
        return jax.random.randint(key, (batch_size,), 0, out_dim)
    if loss.name == "sigmoid_cross_entropy":
        return jax.random.bernoulli(key, 0.4, (batch_size, out_dim)).astype(jnp.float64)
    return jax.random.normal(key, (batch_size, out_dim))


LOSSES = {
    "softmax_cross_entropy": losses.softmax_cross_entropy,
    "squared_error": losses.squared_error,
    "sigmoid_cross_entropy": losses.sigmoid_cross_entropy,
}


@pytest.fixture(params=list(LOSSES))
def loss(request):
    return LOSSES[request.param]()


def problem(loss, *, batch_size=5, in_dim=3, hidden=4, out_dim=3, seed=0):
    """(params, batch) for a 1-hidden-layer tanh MLP."""
    key = jax.random.PRNGKey(seed)
    k1, k2, k3 = jax.random.split(key, 3)
    params = mlp_params(k1, [in_dim, hidden, out_dim])
    x = jax.random.normal(k2, (batch_size, in_dim))
    y = make_targets(loss, k3, batch_size, out_dim)
    return params, (x, y)


# --- `make test-fast`: the slow marker from tests/slow_tests.txt ---------------------------

_SLOW_TESTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "slow_tests.txt")


def slow_test_prefixes() -> list[str]:
    """The entries of tests/slow_tests.txt (comments and blank lines dropped)."""
    with open(_SLOW_TESTS, encoding="utf-8") as f:
        lines = (line.split("#", 1)[0].strip() for line in f)
        return [line for line in lines if line]


def _is_listed(nodeid: str, prefixes: list[str]) -> bool:
    """`nodeid` is a listed file or test, or starts with a listed ``prefix*``."""
    for p in prefixes:
        if p.endswith("*"):
            if nodeid.startswith(p[:-1]):
                return True
        elif nodeid == p or nodeid.startswith((p + "::", p + "[")):
            return True
    return False


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(config, items):
    prefixes = slow_test_prefixes()
    for item in items:
        if _is_listed(item.nodeid, prefixes):
            item.add_marker(pytest.mark.slow)


def jitted_update(opt):
    """`opt.update` under jit: one compiled program, where an eager call compiles each operation
    (and each lax loop anew at every call) — the tests' time, not what they check."""
    return jax.jit(lambda grads, state, params, **kw: opt.update(grads, state, params, **kw))
