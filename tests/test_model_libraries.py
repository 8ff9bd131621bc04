"""natgrad on models from flax (linen and nnx), equinox and dm-haiku (issue 8).

For each library the same tanh MLP is built in that library, its weights are read out into the
plain-JAX layout of `conftest.mlp_apply` (a list of {"w": (in, out), "b": (out,)}), and
optimiser steps on the library's own parameter pytree must give the same parameters, mapped back
to that layout, as the same steps on the plain network: the optimisers only see
`apply_fn(params, inputs)` and a pytree. Each example in examples/ must also train briefly.
The libraries are optional (``natgrad[models]``): a missing one skips its tests.
"""

import importlib.util
import os
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import natgrad
from compile_options import FAST_COMPILE
from conftest import mlp_apply
from natgrad import losses

HERE = os.path.dirname(os.path.abspath(__file__))
SIZES = (6, 8, 8, 3)
BATCH = 16
LIBRARIES = ("flax_linen", "flax_nnx", "equinox", "haiku")


def _cast(tree, dtype):
    return jax.tree.map(lambda a: jnp.asarray(a, dtype), tree)


# Each builder returns (apply_fn, params, to_plain): the one-line adapter documented in
# docs/model_libraries.md, the library's parameter pytree, and a map from that pytree to the
# plain list-of-layers layout.


def _flax_linen():
    pytest.importorskip("flax")
    from flax import linen as nn

    class MLP(nn.Module):
        sizes: tuple

        @nn.compact
        def __call__(self, x):
            for n in self.sizes[1:-1]:
                x = nn.tanh(nn.Dense(n)(x))
            return nn.Dense(self.sizes[-1])(x)

    model = MLP(SIZES)
    params = model.init(jax.random.PRNGKey(1), jnp.zeros((1, SIZES[0])))

    def to_plain(p):
        layers = p["params"]
        return [
            {"w": layers[f"Dense_{i}"]["kernel"], "b": layers[f"Dense_{i}"]["bias"]}
            for i in range(len(SIZES) - 1)
        ]

    return model.apply, params, to_plain


def _flax_nnx():
    pytest.importorskip("flax")
    from flax import nnx

    class MLP(nnx.Module):
        def __init__(self, sizes, rngs):
            self.layers = nnx.List(
                [nnx.Linear(m, n, rngs=rngs) for m, n in zip(sizes[:-1], sizes[1:], strict=True)]
            )

        def __call__(self, x):
            for layer in self.layers[:-1]:
                x = nnx.tanh(layer(x))
            return self.layers[-1](x)

    model = MLP(SIZES, nnx.Rngs(1))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def apply_fn(p, x):
        return nnx.merge(graphdef, p, rest)(x)

    def to_plain(p):
        layers = nnx.to_pure_dict(p)["layers"]
        return [{"w": layers[i]["kernel"], "b": layers[i]["bias"]} for i in range(len(SIZES) - 1)]

    return apply_fn, params, to_plain


def _equinox():
    eqx = pytest.importorskip("equinox")

    model = eqx.nn.MLP(
        SIZES[0],
        SIZES[-1],
        width_size=SIZES[1],
        depth=len(SIZES) - 2,
        activation=jnp.tanh,
        key=jax.random.PRNGKey(1),
    )
    params, static = eqx.partition(model, eqx.is_array)

    def apply_fn(p, x):
        return jax.vmap(eqx.combine(p, static))(x)

    def to_plain(p):  # eqx.nn.Linear stores weight as (out, in)
        return [{"w": layer.weight.T, "b": layer.bias} for layer in p.layers]

    return apply_fn, params, to_plain


def _haiku():
    hk = pytest.importorskip("haiku")

    f = hk.transform(lambda x: hk.nets.MLP(SIZES[1:], activation=jnp.tanh)(x))
    params = f.init(jax.random.PRNGKey(1), jnp.zeros((1, SIZES[0])))

    def apply_fn(p, x):
        return f.apply(p, None, x)

    def to_plain(p):
        return [
            {"w": p[f"mlp/~/linear_{i}"]["w"], "b": p[f"mlp/~/linear_{i}"]["b"]}
            for i in range(len(SIZES) - 1)
        ]

    return apply_fn, params, to_plain


BUILDERS = {
    "flax_linen": _flax_linen,
    "flax_nnx": _flax_nnx,
    "equinox": _equinox,
    "haiku": _haiku,
}


def _batch(dtype):
    kx, ky = jax.random.split(jax.random.PRNGKey(7))
    x = jax.random.normal(kx, (BATCH, SIZES[0]), dtype)
    return x, jax.random.randint(ky, (BATCH,), 0, SIZES[-1])


OPTIMISERS = {
    "natural_gradient": natgrad.natural_gradient,
    "natural_gradient_ggn": lambda f, loss: natgrad.natural_gradient(f, loss, curvature="ggn"),
    "hessian_free": natgrad.hessian_free,
}
LOSS = losses.softmax_cross_entropy()


def _make_step(optimiser, apply_fn):
    opt = OPTIMISERS[optimiser](apply_fn, LOSS)

    def step(params, state, x, y):
        grads = jax.grad(lambda p: LOSS.mean(apply_fn(p, x), y))(params)
        updates, state = opt.update(grads, state, params, batch=(x, y))
        return optax.apply_updates(params, updates), state

    return opt.init, step


_PLAIN_STEPS = {}  # the plain network's step is the same program for every library: compile once


def _steps(optimiser, apply_fn, params, batch, num_steps):
    """`num_steps` compiled optimiser steps (from the second on, warm start and λ count)."""
    key = (optimiser, jax.tree.leaves(params)[0].dtype)
    init, step = _make_step(optimiser, apply_fn)
    state = init(params)
    if apply_fn is not mlp_apply or key not in _PLAIN_STEPS:
        compiled = jax.jit(step).lower(params, state, *batch).compile(FAST_COMPILE)
        if apply_fn is mlp_apply:
            _PLAIN_STEPS[key] = compiled
    else:
        compiled = _PLAIN_STEPS[key]
    for _ in range(num_steps):
        params, state = compiled(params, state, *batch)
    return params, state


def _setup(library, dtype):
    apply_fn, params, to_plain = BUILDERS[library]()
    params = _cast(params, dtype)  # flax creates float32 even with x64; equinox/haiku follow x64
    plain = to_plain(params)
    assert [layer["w"].shape for layer in plain] == list(zip(SIZES[:-1], SIZES[1:], strict=True))
    batch = _batch(dtype)
    # The adapter computes the same function as the plain network on the same weights.
    out = apply_fn(params, batch[0])
    assert out.dtype == dtype
    rtol = 1e-5 if dtype == jnp.float32 else 1e-12
    np.testing.assert_allclose(out, mlp_apply(plain, batch[0]), rtol=rtol, atol=rtol)
    return apply_fn, params, to_plain, plain, batch


def _compare(optimiser, library, dtype, num_steps, tolerance):
    """Run both networks, map the library's parameters back, compare with atol = tol·max|Δθ|."""
    apply_fn, params, to_plain, plain, batch = _setup(library, dtype)
    lib_new, lib_state = _steps(optimiser, apply_fn, params, batch, num_steps)
    plain_new, plain_state = _steps(optimiser, mlp_apply, plain, batch, num_steps)

    assert int(lib_state.rejected_steps) == 0 and int(plain_state.rejected_steps) == 0
    # The parameters moved: equal parameters are not equal because nothing happened.
    moved = max(
        float(jnp.max(jnp.abs(a - b)))
        for a, b in zip(jax.tree.leaves(plain_new), jax.tree.leaves(plain), strict=True)
    )
    assert moved > 1e-2
    got = to_plain(lib_new)
    for i, (g, want) in enumerate(zip(got, plain_new, strict=True)):
        for name in ("w", "b"):
            assert g[name].dtype == dtype
            np.testing.assert_allclose(
                g[name], want[name], rtol=0, atol=tolerance * moved, err_msg=f"layer {i} {name}"
            )
    np.testing.assert_allclose(lib_state.damping, plain_state.damping, rtol=tolerance)
    np.testing.assert_allclose(lib_state.step_size, plain_state.step_size, rtol=tolerance)
    assert int(lib_state.cg_iterations) == int(plain_state.cg_iterations)


@pytest.mark.parametrize("optimiser", list(OPTIMISERS))
@pytest.mark.parametrize("library", LIBRARIES)
def test_step_on_library_model_equals_step_on_plain_jax_network(library, optimiser):
    # float64, two steps: equal up to rounding in a different summation order (equinox stores
    # (out, in) weights and vmaps; its natural-gradient steps differ by ~1e-9 of the step).
    _compare(optimiser, library, jnp.float64, num_steps=2, tolerance=1e-7)


@pytest.mark.parametrize("library", LIBRARIES)
def test_float32_natural_gradient_step_on_library_model(library):
    # float32 (flax's default), one step. At the default λ = 1e-3 the 10 CG iterations do not
    # converge and amplify rounding: the same plain float32 step differs from the float64 one by
    # ~15% in ‖d‖ here, and equinox's other summation order moves the step by ~1e-3 of its size
    # (flax and haiku are bit-identical to the plain network). 1e-2 of the step still catches any
    # wrong mapping of weights or layers, which changes the step by O(1).
    _compare("natural_gradient", library, jnp.float32, num_steps=1, tolerance=1e-2)


def _load_example(name):
    path = os.path.join(HERE, "..", "examples", f"{name}_mlp.py")
    spec = importlib.util.spec_from_file_location(f"example_{name}_mlp", path)
    module = importlib.util.module_from_spec(spec)
    # Registered first, as an import would: dataclasses (flax modules' fields) resolve string
    # annotations through sys.modules[cls.__module__].
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # ~10 s each: two compilations of a 784-128-10 MLP step and MNIST loading
@pytest.mark.parametrize("library", LIBRARIES)
def test_example_trains(library, monkeypatch):
    monkeypatch.syspath_prepend(os.path.join(HERE, "..", "examples"))  # their _common.py
    pytest.importorskip("mlxtend")
    pytest.importorskip({"flax_linen": "flax", "flax_nnx": "flax"}.get(library, library))
    argv = ["--steps", "5", "--hf-steps", "2", "--batch-size", "64"]
    result = _load_example(library).main(argv)
    names = ("natural_gradient", "hessian_free") + (("kfac",) if library == "flax_linen" else ())
    for name in names:
        assert np.isfinite(result[name]["test_loss"]), (name, result)
        assert result[name]["test_loss"] < result["initial_test_loss"] - 0.1, (name, result)


# --- K-FAC ------------------------------------------------------------------------------------
# K-FAC needs more than apply_fn: the dense layers, declared by computing them with
# `natgrad.layers.dense(params, x)` on a {"w": (in, out), "b": (out,)} dict, which K-FAC swaps
# for a probe. Each builder below is the layer documented in docs/model_libraries.md for that
# library; it returns (apply_fn, params, to_plain) like the builders above.


def _kfac_flax_linen():
    pytest.importorskip("flax")
    nn, _, Dense = _flax_layers()

    class MLP(nn.Module):
        sizes: tuple

        @nn.compact
        def __call__(self, x):
            for n in self.sizes[1:-1]:
                x = nn.tanh(Dense(n)(x))
            return Dense(self.sizes[-1])(x)

    model = MLP(SIZES)
    params = model.init(jax.random.PRNGKey(1), jnp.zeros((1, SIZES[0])))

    def to_plain(p):
        return [dict(p["params"][f"Dense_{i}"]) for i in range(len(SIZES) - 1)]

    return model.apply, params, to_plain


def _kfac_flax_nnx():
    pytest.importorskip("flax")
    from flax import nnx

    class Linear(nnx.Module):  # one Param holding the {"w", "b"} dict
        def __init__(self, m, n, rngs):
            w = nnx.initializers.lecun_normal()(rngs.params(), (m, n))
            b = 0.1 * jax.random.normal(rngs.params(), (n,))
            self.params = nnx.Param({"w": w, "b": b})

        def __call__(self, x):
            return natgrad.layers.dense(self.params.get_value(), x)

    class MLP(nnx.Module):
        def __init__(self, sizes, rngs):
            self.layers = nnx.List(
                [Linear(m, n, rngs) for m, n in zip(sizes[:-1], sizes[1:], strict=True)]
            )

        def __call__(self, x):
            for layer in self.layers[:-1]:
                x = nnx.tanh(layer(x))
            return self.layers[-1](x)

    graphdef, params, rest = nnx.split(MLP(SIZES, nnx.Rngs(1)), nnx.Param, ...)

    def apply_fn(p, x):
        return nnx.merge(graphdef, p, rest)(x)

    def to_plain(p):
        layers = nnx.to_pure_dict(p)["layers"]
        return [layers[i]["params"] for i in range(len(SIZES) - 1)]

    return apply_fn, params, to_plain


def _kfac_equinox():
    eqx = pytest.importorskip("equinox")

    class Linear(eqx.Module):  # a {"w", "b"} dict field instead of eqx.nn.Linear's arrays
        params: dict

        def __init__(self, m, n, key):
            kw, kb = jax.random.split(key)
            w = jax.random.normal(kw, (m, n)) / jnp.sqrt(m)
            self.params = {"w": w, "b": 0.1 * jax.random.normal(kb, (n,))}

        def __call__(self, x):
            return natgrad.layers.dense(self.params, x)

    class MLP(eqx.Module):
        layers: list

        def __init__(self, sizes, key):
            keys = jax.random.split(key, len(sizes) - 1)
            pairs = zip(sizes[:-1], sizes[1:], keys, strict=True)
            self.layers = [Linear(m, n, k) for m, n, k in pairs]

        def __call__(self, x):
            for layer in self.layers[:-1]:
                x = jnp.tanh(layer(x))
            return self.layers[-1](x)

    params, static = eqx.partition(MLP(SIZES, jax.random.PRNGKey(1)), eqx.is_array)

    def is_probe(node):  # K-FAC's probe replaces the dict: combine must take it whole
        return isinstance(node, natgrad.layers.DenseProbe)

    def apply_fn(p, x):
        return jax.vmap(eqx.combine(p, static, is_leaf=is_probe))(x)

    def to_plain(p):
        return [dict(layer.params) for layer in p.layers]

    return apply_fn, params, to_plain


KFAC_BUILDERS = {
    "flax_linen": _kfac_flax_linen,
    "flax_nnx": _kfac_flax_nnx,
    "equinox": _kfac_equinox,
}
KFAC_STEPS = 2


def dense_mlp(params, x):
    """The plain network of `conftest.mlp_apply` with its layers declared to K-FAC."""
    for layer in params[:-1]:
        x = jnp.tanh(natgrad.layers.dense(layer, x))
    return natgrad.layers.dense(params[-1], x)


def _kfac_run(apply_fn, params, batch, num_steps, **options):
    """[(params, state)] after each of `num_steps` K-FAC steps, key i at step i."""
    opt = natgrad.kfac(apply_fn, LOSS, **options)

    def step(params, state, x, y, key):
        grads = jax.grad(lambda p: LOSS.mean(apply_fn(p, x), y))(params)
        updates, state = opt.update(grads, state, params, batch=(x, y), key=key)
        return optax.apply_updates(params, updates), state

    state = opt.init(params)
    lowered = jax.jit(step).lower(params, state, *batch, jax.random.PRNGKey(0))
    compiled = lowered.compile(FAST_COMPILE)
    out = []
    for i in range(num_steps):
        params, state = compiled(params, state, *batch, jax.random.PRNGKey(i))
        out.append((params, state))
    return out


_KFAC_RUNS = {}  # one compiled run per model, shared by the tests below


def _kfac_runs(library):
    """(library model's run, plain network's run, initial plain params), float64."""
    if library not in _KFAC_RUNS:
        apply_fn, params, to_plain = KFAC_BUILDERS[library]()
        params = _cast(params, jnp.float64)
        plain = to_plain(params)
        batch = _batch(jnp.float64)
        np.testing.assert_allclose(
            apply_fn(params, batch[0]), mlp_apply(plain, batch[0]), rtol=1e-12, atol=1e-12
        )
        runs = (
            [(to_plain(p), s) for p, s in _kfac_run(apply_fn, params, batch, KFAC_STEPS)],
            _kfac_run(dense_mlp, plain, batch, KFAC_STEPS),
            plain,
        )
        _KFAC_RUNS[library] = runs
    return _KFAC_RUNS[library]


@pytest.mark.parametrize("library", list(KFAC_BUILDERS))
def test_kfac_step_on_registering_library_model_equals_plain_jax_step(library):
    lib_run, plain_run, plain = _kfac_runs(library)
    for step, ((got, lib_state), (want, plain_state)) in enumerate(
        zip(lib_run, plain_run, strict=True), start=1
    ):
        assert int(lib_state.rejected_steps) == 0 and int(plain_state.rejected_steps) == 0
        assert (
            int(lib_state.preconditioner_state.registered_layers)
            == int(plain_state.preconditioner_state.registered_layers)
            == 3
        )
        moved = max(
            float(jnp.max(jnp.abs(a - b)))
            for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(plain), strict=True)
        )
        assert moved > 1e-3, step
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            for name in ("w", "b"):
                assert g[name].dtype == jnp.float64
                np.testing.assert_allclose(
                    g[name], w[name], rtol=0, atol=1e-9 * moved, err_msg=f"step {step} {i} {name}"
                )
        for a, b in zip(
            jax.tree.leaves(lib_state.preconditioner_state.factors[:2]),
            jax.tree.leaves(plain_state.preconditioner_state.factors[:2]),
            strict=True,
        ):
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14)
        np.testing.assert_allclose(lib_state.step_size, plain_state.step_size, rtol=1e-10)
        np.testing.assert_allclose(lib_state.step_kl, plain_state.step_kl, rtol=1e-9)


@pytest.mark.parametrize("library", list(KFAC_BUILDERS))
def test_kfac_sees_registering_library_layers_as_kronecker_blocks(library):
    # A silent fall-back to diagonal blocks would leave registered_layers at 0, the factors at
    # zero and the diagonal block non-zero.
    (_, state), _ = _kfac_runs(library)[0]
    curv = state.preconditioner_state
    assert int(state.preconditioner_state.registered_layers) == len(SIZES) - 1
    pairs = list(zip(SIZES[:-1], SIZES[1:], strict=True))
    assert [a.shape for a in curv.factors.a] == [(m + 1, m + 1) for m, _ in pairs]
    assert [g.shape for g in curv.factors.g] == [(n, n) for _, n in pairs]
    for a, g, a_inv, g_inv in zip(*curv.factors[:2], *curv.inverses, strict=True):
        # A = mean of [a, 1][a, 1]ᵀ: its homogeneous corner is exactly 1; G is a non-zero PSD.
        np.testing.assert_allclose(a[-1, -1], 1.0, rtol=1e-12)
        assert bool(jnp.all(jnp.diag(a) > 0)) and bool(jnp.all(jnp.diag(g) > 0))
        np.testing.assert_allclose(a, a.T, atol=1e-12)
        np.testing.assert_allclose(g, g.T, atol=1e-12)
        assert bool(jnp.any(a_inv != 0)) and bool(jnp.any(g_inv != 0))
    for leaf in jax.tree.leaves(curv.factors.diag):  # every parameter is in a Kronecker block
        assert bool(jnp.all(leaf == 0))


@pytest.mark.parametrize("library", LIBRARIES)
def test_kfac_falls_back_to_diagonal_blocks_on_stock_library_layers(library):
    # nn.Dense, nnx.Linear, eqx.nn.Linear and hk.Linear compute x @ w themselves, so no layer is
    # registered and every parameter gets a diagonal block. haiku's {"w", "b"} dicts look dense
    # (K-FAC makes factors for them) but hk.Linear never passes them to natgrad.layers.dense.
    apply_fn, params, _ = BUILDERS[library]()
    params = _cast(params, jnp.float64)
    x, y = _batch(jnp.float64)
    runs = _kfac_run(apply_fn, params, (x, y), 3)
    state = runs[-1][1]
    assert int(state.rejected_steps) == 0 and int(state.preconditioner_state.registered_layers) == 0
    assert len(state.preconditioner_state.factors.a) == (
        len(SIZES) - 1 if library == "haiku" else 0
    )
    for a in state.preconditioner_state.factors.a:
        assert bool(jnp.all(a == 0))
    for leaf in jax.tree.leaves(state.preconditioner_state.factors.diag):
        assert bool(jnp.all(leaf > 0))
    values = [float(LOSS.mean(apply_fn(p, x), y)) for p, _ in [(params, None), *runs]]
    assert all(b < a for a, b in zip(values, values[1:], strict=False)), values


# --- K-FAC on convolutions and sequence layers declared in flax and equinox -------------------
#
# A small CNN (conv 3×3 SAME → conv 3×3 stride 2 VALID → mean pool → dense) and a sequence
# model (dense at every token → mean over tokens → dense), each built from the registering
# layers of docs/model_libraries.md, must take the K-FAC steps of the same network in plain JAX.

IMAGE = (5, 5, 2)  # one NHWC example
TOKENS = (4, 6)  # one (T, d) example


def cnn_plain(params, x):
    h = jnp.tanh(natgrad.layers.conv2d(params[0], x))
    h = jnp.tanh(natgrad.layers.conv2d(params[1], h, strides=(2, 2), padding="VALID"))
    return natgrad.layers.dense(params[2], jnp.mean(h, axis=(1, 2)))


def seq_plain(params, x):
    return natgrad.layers.dense(
        params[1], jnp.mean(jnp.tanh(natgrad.layers.dense(params[0], x)), 1)
    )


def _flax_layers():
    from flax import linen as nn

    class Conv(nn.Module):  # nn.Conv's kernel layout, initialiser and call, declared to K-FAC
        features: int
        kernel_size: tuple = (3, 3)
        strides: tuple = (1, 1)
        padding: str = "SAME"
        param_dtype: Any = jnp.float32  # as nn.Conv

        @nn.compact
        def __call__(self, x):
            shape = (*self.kernel_size, x.shape[-1], self.features)
            self.param("w", nn.initializers.lecun_normal(), shape, self.param_dtype)
            self.param("b", nn.initializers.zeros, (self.features,), self.param_dtype)
            p = self.variables["params"]
            return natgrad.layers.conv2d(p, x, strides=self.strides, padding=self.padding)

    class Dense(nn.Module):
        features: int

        @nn.compact
        def __call__(self, x):
            self.param("w", nn.initializers.lecun_normal(), (x.shape[-1], self.features))
            self.param("b", nn.initializers.normal(0.1), (self.features,))
            return natgrad.layers.dense(self.variables["params"], x)

    return nn, Conv, Dense


def _cnn_flax_linen():
    pytest.importorskip("flax")
    nn, Conv, Dense = _flax_layers()

    class CNN(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = jnp.tanh(Conv(3)(x))
            h = jnp.tanh(Conv(4, strides=(2, 2), padding="VALID")(h))
            return Dense(3)(jnp.mean(h, axis=(1, 2)))

    model = CNN()
    params = model.init(jax.random.PRNGKey(1), jnp.zeros((1, *IMAGE)))
    names = ("Conv_0", "Conv_1", "Dense_0")
    return model.apply, params, lambda p: [dict(p["params"][n]) for n in names]


def _seq_flax_linen():
    pytest.importorskip("flax")
    nn, _, Dense = _flax_layers()

    class Sequence(nn.Module):  # Dense acts on (batch, tokens, d) as it is
        @nn.compact
        def __call__(self, x):
            h = jnp.tanh(Dense(5)(x))  # Dense_0 (a module is named when it is built)
            return Dense(3)(jnp.mean(h, axis=1))

    model = Sequence()
    params = model.init(jax.random.PRNGKey(1), jnp.zeros((1, *TOKENS)))
    return model.apply, params, lambda p: [dict(p["params"][f"Dense_{i}"]) for i in range(2)]


def _equinox_layers():
    eqx = pytest.importorskip("equinox")

    class Conv2d(eqx.Module):  # HWC images (eqx.nn.Conv2d is CHW); a {"w", "b"} dict field
        params: dict
        strides: tuple = eqx.field(static=True)
        padding: str = eqx.field(static=True)

        def __init__(self, c_in, c_out, key, strides=(1, 1), padding="SAME"):
            w = jax.random.normal(key, (3, 3, c_in, c_out)) / jnp.sqrt(9 * c_in)
            self.params = {"w": w, "b": jnp.zeros(c_out)}
            self.strides, self.padding = strides, padding

        def __call__(self, x):  # one example under the adapter's vmap: add the batch axis
            y = natgrad.layers.conv2d(
                self.params, x[None], strides=self.strides, padding=self.padding
            )
            return y[0]

    class Linear(eqx.Module):
        params: dict

        def __init__(self, m, n, key):
            kw, kb = jax.random.split(key)
            w = jax.random.normal(kw, (m, n)) / jnp.sqrt(m)
            self.params = {"w": w, "b": 0.1 * jax.random.normal(kb, (n,))}

        def __call__(self, x):  # one example: (d,) or (tokens, d); [None] keeps reduce per example
            return natgrad.layers.dense(self.params, x[None])[0]

    def adapter(model):
        params, static = eqx.partition(model, eqx.is_array)

        def is_probe(node):
            return isinstance(node, natgrad.layers.LayerProbe)

        return lambda p, x: jax.vmap(eqx.combine(p, static, is_leaf=is_probe))(x), params

    return eqx, Conv2d, Linear, adapter


def _cnn_equinox():
    eqx, Conv2d, Linear, adapter = _equinox_layers()

    class CNN(eqx.Module):
        layers: list

        def __init__(self, key):
            k = jax.random.split(key, 3)
            self.layers = [
                Conv2d(2, 3, k[0]),
                Conv2d(3, 4, k[1], strides=(2, 2), padding="VALID"),
                Linear(4, 3, k[2]),
            ]

        def __call__(self, x):
            h = jnp.tanh(self.layers[0](x))
            h = jnp.tanh(self.layers[1](h))
            return self.layers[2](jnp.mean(h, axis=(0, 1)))

    apply_fn, params = adapter(CNN(jax.random.PRNGKey(1)))
    return apply_fn, params, lambda p: [dict(layer.params) for layer in p.layers]


def _seq_equinox():
    eqx, _, Linear, adapter = _equinox_layers()

    class Sequence(eqx.Module):
        layers: list

        def __init__(self, key):
            k1, k2 = jax.random.split(key)
            self.layers = [Linear(TOKENS[1], 5, k1), Linear(5, 3, k2)]

        def __call__(self, x):  # x: (tokens, d)
            return self.layers[1](jnp.mean(jnp.tanh(self.layers[0](x)), axis=0))

    apply_fn, params = adapter(Sequence(jax.random.PRNGKey(1)))
    return apply_fn, params, lambda p: [dict(layer.params) for layer in p.layers]


SHARED_BUILDERS = {
    "cnn-flax_linen": (_cnn_flax_linen, cnn_plain, IMAGE, "expand", {"dense": 1, "conv2d": 2}),
    "cnn-equinox": (_cnn_equinox, cnn_plain, IMAGE, "expand", {"dense": 1, "conv2d": 2}),
    "seq-flax_linen": (_seq_flax_linen, seq_plain, TOKENS, "reduce", {"dense": 2, "conv2d": 0}),
    "seq-equinox": (_seq_equinox, seq_plain, TOKENS, "reduce", {"dense": 2, "conv2d": 0}),
}


@pytest.mark.parametrize("model", list(SHARED_BUILDERS))
def test_kfac_on_library_conv_and_sequence_layers_equals_plain_jax(model):
    builder, plain_apply, shape, weight_sharing, kinds = SHARED_BUILDERS[model]
    apply_fn, params, to_plain = builder()
    params = _cast(params, jnp.float64)
    plain = to_plain(params)
    kx, ky = jax.random.split(jax.random.PRNGKey(7))
    batch = (jax.random.normal(kx, (8, *shape)), jax.random.randint(ky, (8,), 0, 3))
    np.testing.assert_allclose(
        apply_fn(params, batch[0]), plain_apply(plain, batch[0]), rtol=1e-12, atol=1e-12
    )
    lib_run = _kfac_run(apply_fn, params, batch, KFAC_STEPS, weight_sharing=weight_sharing)
    plain_run = _kfac_run(plain_apply, plain, batch, KFAC_STEPS, weight_sharing=weight_sharing)
    for (got, lib_state), (want, plain_state) in zip(lib_run, plain_run, strict=True):
        assert int(lib_state.rejected_steps) == 0
        counts = lib_state.preconditioner_state.registered_by_kind
        assert {k: int(v) for k, v in counts.items()} == {"embedding": 0, "scale_shift": 0} | kinds
        moved = max(
            float(jnp.max(jnp.abs(a - b)))
            for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(plain), strict=True)
        )
        assert moved > 1e-3
        for g, w in zip(to_plain(got), want, strict=True):
            for name in ("w", "b"):
                np.testing.assert_allclose(g[name], w[name], rtol=0, atol=1e-9 * moved)
        for a, b in zip(
            jax.tree.leaves(lib_state.preconditioner_state.factors[:2]),
            jax.tree.leaves(plain_state.preconditioner_state.factors[:2]),
            strict=True,
        ):
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14)


def test_flax_conv_adapter_initialises_and_computes_like_nn_conv():
    pytest.importorskip("flax")
    nn, Conv, _ = _flax_layers()
    x = jax.random.normal(jax.random.PRNGKey(2), (2, *IMAGE))
    for kwargs in ({}, {"strides": (2, 2), "padding": "VALID"}):
        ours, stock = Conv(4, **kwargs), nn.Conv(4, (3, 3), **kwargs)
        p_ours = ours.init(jax.random.PRNGKey(0), x)["params"]
        p_stock = stock.init(jax.random.PRNGKey(0), x)["params"]
        np.testing.assert_array_equal(p_ours["w"], p_stock["kernel"])
        np.testing.assert_array_equal(p_ours["b"], p_stock["bias"])
        np.testing.assert_allclose(
            ours.apply({"params": p_ours}, x), stock.apply({"params": p_stock}, x), rtol=1e-6
        )
