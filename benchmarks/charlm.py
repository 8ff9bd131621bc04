"""Character-level language modelling: natgrad.kfac (expand / reduce) against Adam.

The model and data are `natgrad.experiments.charlm`: a 2-block pre-norm transformer (width 64,
4 heads, context 64) on the Python standard library's source, batch 32 windows. Each optimiser
gets the same tuning budget, a 3-point grid of its main knob (Adam: learning rate; K-FAC: the KL
radius δ, with each weight-sharing approximation), the same initial parameters and the same
window order. The clock counts training steps only: the first step (compilation) is timed
apart, and the validation loss (256 held-out windows, nats per character) is computed every
`eval_every` steps outside the clock. Written: ``charlm.json`` and ``charlm.png`` (validation
loss against steps and against seconds of the best grid point of each).
"""

from __future__ import annotations

import argparse
import math
import os
import time

import jax
import optax

import natgrad
from benchmarks.timing import machine, write_json
from natgrad.experiments import charlm
from natgrad.experiments.training import make_step

GRIDS = {
    "adam": ("learning_rate", (1e-3, 3e-3, 1e-2)),
    "natgrad-kfac-expand": ("kl_radius", (1e-3, 1e-2, 1e-1)),
    "natgrad-kfac-reduce": ("kl_radius", (1e-3, 1e-2, 1e-1)),
}


def build(name: str, value: float, model) -> optax.GradientTransformation:
    if name == "adam":
        return optax.adam(value)
    sharing = name.rsplit("-", 1)[1]
    return natgrad.kfac(model.apply, model.loss, kl_radius=value, weight_sharing=sharing)


def run(name, value, model, params, data, steps, eval_every, batch) -> dict:
    opt = build(name, value, model)
    step = jax.jit(make_step(opt, model.apply, model.loss))
    vx, vt = charlm.windows(data.valid, 256, model.length, seed=10_000)
    evaluate = jax.jit(lambda p: model.loss.mean(model.apply(p, vx), vt) / model.length)
    p, state, key = params, opt.init(params), jax.random.PRNGKey(1)
    curve, clock, compile_s = [(0, 0.0, float(evaluate(p)))], 0.0, 0.0
    for i in range(steps):
        x, t = charlm.windows(data.train, batch, model.length, seed=i)
        key, sub = jax.random.split(key)
        start = time.perf_counter()
        p, state, value_ = step(p, state, (x, t), sub)
        jax.block_until_ready(value_)
        if i == 0:
            compile_s = time.perf_counter() - start
        else:
            clock += time.perf_counter() - start
        if (i + 1) % eval_every == 0 or i + 1 == steps:
            loss = float(evaluate(p))
            curve.append((i + 1, clock, loss))
            if math.isnan(loss):  # diverged: stop here
                break
    return {
        "value": value,
        "curve": curve,
        "compile_seconds": compile_s,
        "per_step_seconds": clock / max(1, curve[-1][0] - 1),
        "final_loss": curve[-1][2],
        "diverged": math.isnan(curve[-1][2]),
    }


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name, entry in results.items():
        best = entry["runs"][entry["best"]]
        steps, seconds, losses = zip(*best["curve"], strict=True)
        label = f"{name} ({GRIDS[name][0]}={best['value']:g})"
        axes[0].plot(steps, losses, label=label)
        axes[1].plot(seconds, losses, label=label)
    for ax, xlabel in zip(axes, ("steps", "training seconds"), strict=True):
        ax.set_xlabel(xlabel)
        ax.set_ylabel("validation loss (nats / char)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.charlm", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer steps, one grid point")
    parser.add_argument("--out", default="results/bench")
    args = parser.parse_args(argv)
    steps, eval_every, points = (60, 20, 1) if args.quick else (400, 50, 3)
    model = charlm.transformer()
    data = charlm.corpus(400_000 if args.quick else 2_000_000)
    params = model.init(jax.random.PRNGKey(0))
    results = {}
    for name, (knob, values) in GRIDS.items():
        runs = [run(name, v, model, params, data, steps, eval_every, 32) for v in values[:points]]
        best = min(range(len(runs)), key=lambda j: (runs[j]["diverged"], runs[j]["final_loss"]))
        results[name] = {"knob": knob, "runs": runs, "best": best}
        print(
            f"   {name}: best {knob}={runs[best]['value']:g}, loss {runs[best]['final_loss']:.3f}"
        )
    payload = {"machine": machine(), "steps": steps, "batch": 32, "optimizers": results}
    write_json(args.out, "charlm.json", payload)
    try:
        plot(results, os.path.join(args.out, "charlm.png"))
    except ImportError:
        print("   matplotlib not installed: no charlm.png")
    return payload


if __name__ == "__main__":
    main()
