"""kfac-jax's rows of the lineup, run in ``.venv-peers`` (kfac-jax 0.0.8 needs jax 0.9.0.1).

Same workloads, seeds, batch order, initial parameters, grid budget and clock as the other rows
(`benchmarks.peers.runner`), with kfac-jax's reference configuration: adaptive learning rate,
momentum and damping (Levenberg-Marquardt), the knob being the initial damping; the layers are
found by its graph matcher and the loss is registered in the value function. kfac-jax jits its
step itself, one call per step: the first 6 steps (every compiled variant, since the damping
adapts every 5 steps) run on copies before the clock (``compile_seconds``); each step's batch is
gathered on device in the clock.

Usage: ``.venv-peers/bin/python -m benchmarks.peers.kfac_jax_rows MODE OUT.json WORKLOAD…``.
"""

from __future__ import annotations

import json
import sys
import time

import jax
import jax.numpy as jnp

from benchmarks import workloads
from benchmarks.peers import runner
from benchmarks.timed_training import batch_order, timed_loop


def run_kfac_jax(key: str, value: float, w: workloads.Workload, seed: int) -> dict:
    import kfac_jax

    p = w.problem

    def loss_fn(params, batch):
        x, t = batch
        out = p.apply_fn(params, x)
        if w.higher_is_better:
            kfac_jax.register_softmax_cross_entropy_loss(out, t)
        else:
            kfac_jax.register_sigmoid_cross_entropy_loss(out, t)
        return p.loss.mean(out, t)

    opt = kfac_jax.Optimizer(
        value_and_grad_func=jax.value_and_grad(loss_fn),
        l2_reg=0.0,
        use_adaptive_learning_rate=True,
        use_adaptive_momentum=True,
        use_adaptive_damping=True,
        initial_damping=value,
        num_burnin_steps=0,
        multi_device=False,
    )
    root = jax.random.PRNGKey(seed)
    params = p.init(jax.random.fold_in(root, 0))
    order = jnp.asarray(batch_order(len(p.inputs), w.batch_size, w.steps, seed + 1))
    keys = jax.random.fold_in(root, 2)

    def step(params, state, s):
        batch = (p.inputs[order[s]], p.targets[order[s]])
        rng = jax.random.fold_in(keys, s)
        return opt.step(params, state, rng, batch=batch, global_step_int=s)

    state = opt.init(params, jax.random.fold_in(root, 3), (p.inputs[order[0]], p.targets[order[0]]))
    t0 = time.perf_counter()
    copy = (jax.tree.map(jnp.copy, params), jax.tree.map(jnp.copy, state))
    for s in range(6):
        copy = step(*copy, s)[:2]
    jax.block_until_ready(copy)
    compile_seconds = time.perf_counter() - t0

    def advance(carry, start):
        losses = []
        for s in range(start, start + runner.chunk_size(w)):
            *carry, stats = step(*carry, s)
            losses.append(stats["loss"])
        return tuple(carry), jnp.stack(losses), None

    record, _ = timed_loop(
        (params, state),
        advance,
        lambda c: p.evaluate(c[0]),
        steps=len(order),
        compile_seconds=compile_seconds,
        **runner.loop_options(w, order),
    )
    return runner.with_targets(record, w)


def main(argv) -> None:
    mode, out, names = argv[0], argv[1], argv[2:]
    ds = workloads.load_data(mode)
    rows = {}
    for name in names:
        print(f"{name} (kfac-jax, jax {jax.__version__}):", flush=True)
        w = workloads.workload(name, ds, mode)
        rows[name] = runner.row("kfac-jax", w, mode, run_kfac_jax, name == "autoencoder")
    with open(out, "w") as f:
        json.dump(rows, f)


if __name__ == "__main__":
    main(sys.argv[1:])
