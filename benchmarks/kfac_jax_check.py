"""natgrad's Kronecker blocks against kfac-jax's, on the same model, parameters and batch.

Run in the kfac-jax venv (kfac-jax 0.0.8 needs jax 0.9.0.1): ``make kfac-jax-check``, i.e.
``.venv-peers/bin/python -m benchmarks.kfac_jax_check [OUT.json]`` with natgrad's ``src`` on the
path. Float64. For each model, both libraries estimate the exact-GGN Kronecker blocks from one
batch (kfac-jax: estimation mode ``ggn_exact``, its graph matcher finding the layers; natgrad:
``curvature="ggn"``, the layers declared with `natgrad.layers`), and we compare the block
products F̂ v for random parameter-shaped v. Comparing products makes the check independent of
how each library orders a layer's rows (a conv patch's (kh, kw, c_in) flattening) and where it
puts the scale between A and G.

* ``cnn``: conv2d 3×3 "SAME" (2 → 3 channels), ReLU, conv2d 3×3 "VALID" stride 2 (3 → 4),
  flatten, dense → 5 classes, softmax cross-entropy; batch 4 of 7 × 7 × 2 images.
* ``sequence``: dense 3 → 6 over (batch 4, 5 positions), tanh, dense 6 → 4 per position, a
  softmax cross-entropy at every position — the *expand* setting (kfac-jax's repeated-dense
  block is expand).
"""

from __future__ import annotations

import json
import sys

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
from jax.flatten_util import ravel_pytree  # noqa: E402

from natgrad import kronecker, layers, losses  # noqa: E402


def _conv(p, x, stride, padding, declared):
    if declared:
        return layers.conv2d(p, x, strides=(stride, stride), padding=padding)
    dims = ("NHWC", "HWIO", "NHWC")
    y = jax.lax.conv_general_dilated(x, p["w"], (stride, stride), padding, dimension_numbers=dims)
    return y + p["b"]


def cnn(declared):
    def apply(params, x):
        h = jax.nn.relu(_conv(params[0], x, 1, "SAME", declared))
        h = _conv(params[1], h, 2, "VALID", declared)
        h = h.reshape(h.shape[0], -1)
        return layers.dense(params[2], h) if declared else h @ params[2]["w"] + params[2]["b"]

    return apply


def sequence(declared):
    def apply(params, x):
        dense = layers.dense if declared else (lambda p, v: v @ p["w"] + p["b"])
        return dense(params[1], jnp.tanh(dense(params[0], x)))

    return apply


def problem(name, key):
    k = jax.random.split(key, 8)
    if name == "cnn":
        shapes = [(3, 3, 2, 3), (3, 3, 3, 4), (3 * 3 * 4, 5)]
        x = jax.random.normal(k[0], (4, 7, 7, 2))
        t = jax.random.randint(k[1], (4,), 0, 5)
        model = cnn
    else:
        shapes = [(3, 6), (6, 4)]
        x = jax.random.normal(k[0], (4, 5, 3))
        t = jax.random.randint(k[1], (4, 5), 0, 4)
        model = sequence
    params = [
        {
            "w": jax.random.normal(k[2 + i], s) / jnp.sqrt(jnp.prod(jnp.array(s[:-1]))),
            "b": 0.1 * jax.random.normal(k[5 + i], s[-1:]),
        }
        for i, s in enumerate(shapes)
    ]
    return params, (x, t), model


def kfac_jax_product(params, batch, apply, vectors):
    import kfac_jax

    def loss_fn(p, b):
        x, t = b
        logits = apply(p, x)
        flat = logits.reshape(-1, logits.shape[-1])
        kfac_jax.register_softmax_cross_entropy_loss(flat, t.reshape(-1))
        return losses.softmax_cross_entropy().mean(logits, t)

    est = kfac_jax.BlockDiagonalCurvature(func=loss_fn, default_estimation_mode="ggn_exact")
    key = jax.random.PRNGKey(0)
    state = est.init(key, (params, batch), None, None)
    state = est.update_curvature_matrix_estimate(
        state, 0.0, 1.0, 0.0, batch[0].shape[0], key, (params, batch)
    )
    kinds = [type(b).__name__ for b in est.blocks]
    products = [est.multiply(state, v, 0.0, True, False, None) for v in vectors]
    return products, kinds


def natgrad_product(params, batch, apply, vectors):
    state = kronecker.init(params)
    stats, registered, _ = kronecker.statistics(
        apply,
        losses.softmax_cross_entropy(),
        params,
        batch,
        key=jax.random.PRNGKey(0),
        curvature="ggn",
    )
    state = kronecker.update(state, stats, 0.0, registered, ema_decay=0.0, refresh=False)
    return [kronecker.damped_product(state, 0.0, registered, v) for v in vectors], registered


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    out = {"jax": jax.__version__, "models": {}}
    for name in ("cnn", "sequence"):
        params, batch, model = problem(name, jax.random.PRNGKey(1))
        vectors = [
            jax.tree.map(
                lambda p, i=i: jax.random.normal(jax.random.PRNGKey(10 + i), p.shape), params
            )
            for i in range(3)
        ]
        theirs, kinds = kfac_jax_product(params, batch, model(False), vectors)
        ours, registered = natgrad_product(params, batch, model(True), vectors)
        errors = []
        for a, b in zip(ours, theirs, strict=True):
            fa, fb = ravel_pytree(a)[0], ravel_pytree(b)[0]
            errors.append(float(jnp.linalg.norm(fa - fb) / jnp.linalg.norm(fb)))
        out["models"][name] = {
            "kfac_jax_blocks": kinds,
            "natgrad_registered": list(registered),
            "max_relative_error": max(errors),
        }
        print(f"{name}: kfac-jax blocks {kinds}; max relative error of F̂v {max(errors):.2e}")
    if argv:
        with open(argv[0], "w") as f:
            json.dump(out, f, indent=2)
    return out


if __name__ == "__main__":
    main()
