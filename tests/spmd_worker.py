"""Run natgrad steps on 4 emulated CPU devices and on 1, and report what differs, as JSON.

Started as a subprocess by tests/test_sharding.py: XLA_FLAGS must be set before jax is imported,
and the test process has imported jax already.
"""

import os

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"

import json  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import natgrad  # noqa: E402
from compile_options import FAST_COMPILE  # noqa: E402
from natgrad import sharding  # noqa: E402

LOSS = natgrad.losses.softmax_cross_entropy()


def init(key, sizes=(20, 16, 5)):
    return [
        {"w": jax.random.normal(jax.random.fold_in(key, i), (m, n)) / np.sqrt(m), "b": jnp.zeros(n)}
        for i, (m, n) in enumerate(zip(sizes[:-1], sizes[1:], strict=True))
    ]


def apply(params, x):
    for layer in params[:-1]:
        x = jnp.tanh(natgrad.layers.dense(layer, x))  # declared to K-FAC; plain x @ w + b
    return natgrad.layers.dense(params[-1], x)


def cnn_init(key):
    k1, k2 = jax.random.split(key)
    return {
        "conv": {"w": jax.random.normal(k1, (3, 3, 2, 4)) / np.sqrt(18), "b": jnp.zeros(4)},
        "head": {"w": jax.random.normal(k2, (4, 5)) / 2.0, "b": jnp.zeros(5)},
    }


def cnn_apply(params, x):
    """(B, 6, 6, 2) → conv 3×3 stride 2 → tanh → mean pool → dense: K-FAC's conv2d block."""
    h = jnp.tanh(natgrad.layers.conv2d(params["conv"], x, strides=(2, 2)))
    return natgrad.layers.dense(params["head"], jnp.mean(h, axis=(1, 2)))


def seq_init(key):
    return [
        {"w": jax.random.normal(key, (5, 6)) / np.sqrt(5), "b": jnp.zeros(6)},
        {
            "w": jax.random.normal(jax.random.fold_in(key, 1), (6, 5)) / np.sqrt(6),
            "b": jnp.zeros(5),
        },
    ]


def seq_apply(params, x):
    """(B, 4, 5) → dense at each of the 4 positions → tanh → mean → dense: a shared layer."""
    h = jnp.mean(jnp.tanh(natgrad.layers.dense(params[0], x)), axis=1)
    return natgrad.layers.dense(params[1], h)


def embed_init(key):
    return {
        "embed": {"embedding": jax.random.normal(key, (6, 8))},
        "norm": {"scale": jnp.ones(8), "bias": jnp.zeros(8)},
        "head": {
            "w": jax.random.normal(jax.random.fold_in(key, 1), (8, 5)) / 3.0,
            "b": jnp.zeros(5),
        },
    }


def embed_apply(params, x):
    """(B, 4) floats → token ids in [0, 6) → embedding → layer norm → mean → dense."""
    ids = jnp.clip(jnp.floor(2 * x + 3), 0, 5).astype(jnp.int32)
    h = natgrad.layers.layer_norm(params["norm"], natgrad.layers.embedding(params["embed"], ids))
    return natgrad.layers.dense(params["head"], jnp.mean(h, axis=1))


# name -> (init, apply, input shape of one example)
MODELS = {
    "mlp": (init, apply, (20,)),
    "cnn": (cnn_init, cnn_apply, (6, 6, 2)),
    "seq": (seq_init, seq_apply, (4, 5)),
    "embed": (embed_init, embed_apply, (4,)),
}


def optimizers():
    """name -> (optimiser, model name)."""
    ng = natgrad.natural_gradient
    opts = {f"ngd-{c}": (ng(apply, LOSS, curvature=c), "mlp") for c in natgrad.curvature.CURVATURES}
    opts["ngd-momentum-precond"] = (
        ng(apply, LOSS, momentum=0.5, preconditioner=natgrad.preconditioners.martens_diagonal()),
        "mlp",
    )
    opts["hessian-free"] = (natgrad.hessian_free(apply, LOSS), "mlp")
    opts["kfac"] = (natgrad.kfac(apply, LOSS), "mlp")
    # Rank-3 inverses from sketches of the 21-wide input and the 16-wide output factor.
    opts["kfac-low-rank"] = (
        natgrad.kfac(apply, LOSS, input_factor_rank=3, output_factor_rank=3),
        "mlp",
    )
    # K-FAC's other blocks: a convolution (KFC), and a dense layer over a sequence axis reduced
    # (expand is what the conv row computes for its shared pixels).
    opts["kfac-conv2d"] = (natgrad.kfac(cnn_apply, LOSS), "cnn")
    opts["kfac-seq-reduce"] = (natgrad.kfac(seq_apply, LOSS, weight_sharing="reduce"), "seq")
    # EKFAC on a dense and a conv net; embeddings and layer norm (their own blocks). Not EKFAC
    # on the embedding model: its head's A has a repeated (null) eigenvalue at the start, where
    # the eigenbasis is not unique and 1 and 4 devices pick different ones — two valid EKFACs
    # that then drift apart (docs/optimizers.md).
    opts["kfac-ekfac"] = (natgrad.kfac(apply, LOSS, eigenvalue_correction=True), "mlp")
    opts["kfac-ekfac-conv2d"] = (natgrad.kfac(cnn_apply, LOSS, eigenvalue_correction=True), "cnn")
    opts["kfac-embed-norm"] = (natgrad.kfac(embed_apply, LOSS), "embed")
    return opts


def make_step(opt, apply):
    def step(params, state, batch, key):
        grads = jax.grad(lambda p: LOSS.mean(apply(p, batch[0]), batch[1]))(params)
        updates, state = opt.update(grads, state, params, batch=batch, key=key)
        return optax.apply_updates(params, updates), state

    return jax.jit(step)


def max_diff(a, b):
    return max(
        float(jnp.max(jnp.abs(x - y)))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


def main():
    steps = int(sys.argv[1]) if len(sys.argv) > 1 else 10
    mesh = sharding.batch_mesh(4)
    report = {"devices": jax.device_count()}
    for name, (opt, model) in optimizers().items():
        init_fn, apply_fn, shape = MODELS[model]
        params = init_fn(jax.random.PRNGKey(0))
        data = [
            (
                jax.random.normal(jax.random.PRNGKey(10 + i), (64, *shape)),
                jax.random.randint(jax.random.PRNGKey(100 + i), (64,), 0, 5),
            )
            for i in range(steps)
        ]
        step = make_step(opt, apply_fn)
        p1, s1 = params, opt.init(params)
        p4, s4 = sharding.replicate(params, mesh), sharding.replicate(opt.init(params), mesh)
        key0, batch4 = jax.random.PRNGKey(1000), sharding.shard_batch(data[0], mesh)
        # Both programs compiled alike (compile_options: XLA's compile time is most of this
        # check's; the partitioning, and so the collectives, are those of a default compile).
        step1 = step.lower(p1, s1, data[0], key0).compile(FAST_COMPILE)
        step4 = step.lower(p4, s4, batch4, key0).compile(FAST_COMPILE)
        hlo = step4.as_text()
        one_step = None
        for i, batch in enumerate(data):
            key = jax.random.PRNGKey(1000 + i)
            p1, s1 = step1(p1, s1, batch, key)
            p4, s4 = step4(p4, s4, sharding.shard_batch(batch, mesh), key)
            if i == 0:
                one_step = max_diff(p1, p4)
        report[name] = {
            "one_step_max_diff": one_step,
            "ten_step_max_diff": max_diff(p1, p4),
            "param_scale": max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(p1)),
            "all_reduce": len(re.findall(r"all-reduce(-start)?\(", hlo)),
            "all_gather": len(re.findall(r"all-gather(-start)?\(", hlo)),
            "params_replicated": all(
                leaf.sharding.is_fully_replicated for leaf in jax.tree.leaves(p4)
            ),
            "state_replicated": all(
                leaf.sharding.is_fully_replicated
                for leaf in jax.tree.leaves(s4)
                if hasattr(leaf, "sharding")
            ),
            "param_devices": min(len(leaf.sharding.device_set) for leaf in jax.tree.leaves(p4)),
            "rejected": int(getattr(s4, "rejected_steps", 0)),
            "kronecker_blocks": {
                kind: int(count)
                for kind, count in getattr(
                    getattr(s4, "preconditioner_state", None), "registered_by_kind", {}
                ).items()
            },
        }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
