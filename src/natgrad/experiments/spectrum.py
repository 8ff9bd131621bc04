r"""`natgrad spectrum`: the curvature's spectrum at initialisation and after training.

    natgrad spectrum [--optimizer ngd-fisher] [--curvature ggn] [--top-k 10]
                     [--num-iterations 40] [--num-probes 8] [--max-condition 1000]
                     [--out results/<dataset>-spectrum] [same data/model/run options as compare]

On one fixed batch (the first batch of epoch 0 in `natgrad.experiments.training.batch_order`, the
same examples for both states), for the initial parameters and for the parameters after
``--epochs`` of training with ``--optimizer`` (`natgrad.experiments.training.train`):

1. one Lanczos run of ``--num-iterations`` steps: the ``--top-k`` largest Ritz values with their
   residual bounds, κ(C) and κ(C + λI) at the optimizer's damping λ (lower bounds: the Ritz values
   lie inside the spectrum), and the damping `natgrad.diagnostics.suggest_damping` gives for
   κ ≤ ``--max-condition``;
2. stochastic Lanczos quadrature with ``--num-probes`` probes: the spectral density per decade,
   φ(log10 λ), on a common grid for both states. Eigenvalues below the floor
   ``FLOOR × (largest top eigenvalue)`` (the null space of a GGN, rounding, negative curvature of
   the Hessian) are counted at the floor, and their share of the spectrum is reported.

Writes ``spectrum.json`` (everything above, and the raw Ritz nodes and weights) and
``spectrum.png`` (both densities on a log λ axis, the top eigenvalues marked) to ``--out``.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import numpy as np

from natgrad.experiments import session
from natgrad.experiments.options import UsageError, number

__all__ = ["HELP", "add_arguments", "run", "FLOOR"]

HELP = "curvature spectrum at initialisation and after training"
FLOOR = 1e-6  # relative to the largest eigenvalue: below it, "zero" curvature
GRID_POINTS = 400


def _int_at_least(low: int):
    return number(int, lambda v: v >= low, f"an integer >= {low}")


def add_arguments(p) -> None:
    """The `spectrum` options: the optimizer and data/run options, and what to measure."""
    from natgrad.curvature import CURVATURES
    from natgrad.experiments import lineup, options

    p.description = (
        "The curvature's spectrum at initialisation and after training: top eigenvalues "
        "(Lanczos), spectral density (stochastic Lanczos quadrature), conditioning."
    )
    p.add_argument("--optimizer", default="ngd-fisher", choices=lineup.default_lineup())
    options.add_common(p)
    p.add_argument("--curvature", default="ggn", choices=CURVATURES, help="the operator analysed")
    p.add_argument("--top-k", type=_int_at_least(1), default=10, help="top eigenvalues reported")
    p.add_argument(
        "--num-iterations", type=_int_at_least(2), default=40, help="Lanczos steps per run"
    )
    p.add_argument("--num-probes", type=_int_at_least(1), default=8, help="SLQ start vectors")
    p.add_argument(
        "--max-condition",
        type=number(float, lambda v: 1 < v < math.inf, "a number > 1"),
        default=1e3,
        help="κ target of the suggested damping",
    )
    p.add_argument("--out", help="output directory (default: results/<dataset>-spectrum)")


def _analyse(model, curvature: str, m: int, num_probes: int, batch):
    """A jitted ``(params, key) -> (Lanczos run, SLQ nodes, SLQ weights, loss)`` on `batch`."""
    import jax

    from natgrad import curvature as curvature_lib
    from natgrad import diagnostics

    def analyse(params, key):
        k_op, k_top, k_slq = jax.random.split(key, 3)
        op = curvature_lib.make(curvature, model.apply, model.loss, params, batch, key=k_op)
        top = diagnostics.lanczos(op, params, key=k_top, num_iterations=m)
        # only the nodes and weights are kept: the density is drawn on a grid common to both
        slq = diagnostics.spectral_density(
            op, params, key=k_slq, num_probes=num_probes, num_iterations=m, grid=2
        )
        return top, slq.nodes, slq.weights, op.loss_value

    return jax.jit(analyse)


def _finite(x) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def _summarise(top, nodes, weights, loss_value, k, damping, max_condition) -> dict[str, Any]:
    from natgrad import diagnostics

    order = np.argsort(np.asarray(top.ritz_values))[::-1][:k]
    undamped = diagnostics.ConditionEstimate.from_lanczos(top)
    suggestion = diagnostics.DampingSuggestion.from_lanczos(top, max_condition)
    per_probe = np.sum(np.asarray(weights) * np.asarray(nodes), axis=1)
    record = {
        "loss": float(loss_value),
        "top_eigenvalues": np.asarray(top.ritz_values)[order].tolist(),
        "top_residuals": np.asarray(top.residuals)[order].tolist(),
        "smallest_ritz_value": float(undamped.smallest),
        "condition_number": _finite(undamped.condition_number),
        "suggested_damping": float(suggestion.damping),
        "mean_eigenvalue": float(per_probe.mean()),
        "mean_eigenvalue_stderr": float(per_probe.std(ddof=1) / np.sqrt(len(per_probe)))
        if len(per_probe) > 1
        else None,
        "ritz_nodes": np.asarray(nodes).tolist(),
        "ritz_weights": np.asarray(weights).tolist(),
        "optimizer_damping": None if damping is None else float(damping),
        "damped_condition_number": None,
    }
    if damping is not None:
        damped = diagnostics.ConditionEstimate.from_lanczos(top, float(damping))
        record["damped_condition_number"] = _finite(damped.condition_number)
    return record


def _add_density(states: dict[str, dict], floor: float) -> dict[str, Any]:
    """Broaden every state's SLQ nodes on one grid in log10 λ (σ = 1/50 of the nodes' span)."""
    from natgrad import diagnostics

    logs = [np.log10(np.maximum(np.asarray(s["ritz_nodes"]), floor)) for s in states.values()]
    lo, hi = min(x.min() for x in logs), max(x.max() for x in logs)
    sigma = (hi - lo) / 50 if hi > lo else 0.1
    grid = np.logspace(lo - 3 * sigma, hi + 3 * sigma, GRID_POINTS)
    for state in states.values():
        nodes, weights = np.asarray(state["ritz_nodes"]), np.asarray(state["ritz_weights"])
        density = diagnostics.broadened_density(nodes, weights, grid, sigma, log_floor=floor)
        state["density"] = np.asarray(density).tolist()
        state["mass_below_floor"] = float(np.sum(weights[nodes < floor]) / len(nodes))
    return {"grid": grid.tolist(), "sigma_decades": float(sigma), "floor": floor}


def _plot(path: str, document: dict[str, Any], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = np.asarray(document["density"]["grid"])
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    for (name, state), color in zip(
        document["states"].items(), ("tab:blue", "tab:orange"), strict=True
    ):
        label = f"{name} (mass below floor {100 * state['mass_below_floor']:.0f}%)"
        ax.plot(grid, state["density"], color=color, label=label)
        for value in state["top_eigenvalues"]:
            if value > 0:
                ax.axvline(value, color=color, alpha=0.35, lw=0.8, ymax=0.12)
    ax.axvline(document["density"]["floor"], color="grey", ls=":", lw=0.8, label="floor")
    ax.set_xscale("log")
    # log y: the null-space spike at the floor would otherwise flatten the rest of the spectrum
    ax.set_yscale("log")
    peak = max(max(s["density"]) for s in document["states"].values())
    ax.set_ylim(1e-5 * peak, 2 * peak)
    ax.set_xlabel("eigenvalue λ  (ticks at the bottom: top eigenvalues)")
    ax.set_ylabel("density per decade (log scale)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _line(name: str, state: dict[str, Any], max_condition: float) -> str:
    def fmt(x):
        return "inf (θ_min ≤ 0: singular or indefinite)" if x is None else f"{x:.3g}"

    text = (
        f"{name:>8}: top {', '.join(f'{v:.3g}' for v in state['top_eigenvalues'][:3])}; "
        f"κ(C) ≥ {fmt(state['condition_number'])}"
    )
    if state["optimizer_damping"] is not None:
        text += (
            f"; κ(C + λI) ≥ {fmt(state['damped_condition_number'])} at the optimizer's "
            f"λ = {state['optimizer_damping']:.3g}"
        )
    return text + f"; suggested λ {state['suggested_damping']:.3g} (κ ≤ {max_condition:g})"


def run(args) -> int:
    """Run `natgrad spectrum` with parsed `args`; writes spectrum.json and spectrum.png."""
    out = args.out or os.path.join("results", f"{args.dataset}-spectrum")
    with session.claimed((out, "--out")):
        return _measure(args, out)


def _measure(args, out: str) -> int:
    import jax

    from natgrad.experiments import training

    if args.top_k > args.num_iterations:
        raise UsageError(
            f"--top-k {args.top_k}: must be at most --num-iterations ({args.num_iterations})"
        )
    hyper, dataset, model, (optimizer,), config = session.set_up(args, [args.optimizer])

    idx = training.batch_order(len(dataset.x_train), config.batch_size, config.seed, 0)[0]
    x = dataset.x_train[idx]
    batch = (x, model.targets(x, dataset.y_train[idx]))
    initial = training.init_state(model, optimizer, config.seed)
    n = sum(int(np.size(leaf)) for leaf in jax.tree.leaves(initial.params))
    m = min(args.num_iterations, n)
    analyse = _analyse(model, args.curvature, m, args.num_probes, batch)
    key = jax.random.fold_in(jax.random.PRNGKey(config.seed), 1)  # the same probes for both

    def measure(params, opt_state):
        top, nodes, weights, loss_value = jax.device_get(analyse(params, key))
        damping = getattr(opt_state, "damping", None)
        k = min(args.top_k, m)
        return _summarise(top, nodes, weights, loss_value, k, damping, args.max_condition)

    states = {"init": measure(initial.params, initial.opt_state)}
    result = training.train(
        optimizer, model, dataset, config, progress_bar=not args.no_progress, log=session.say
    )
    states["trained"] = measure(result.state.params, result.state.opt_state)

    largest = max(max(s["top_eigenvalues"][0], 0.0) for s in states.values())
    floor = FLOOR * largest if largest > 0 else FLOOR
    document = {
        "config": session.config_record("spectrum", args, dataset, model, hyper),
        "curvature": args.curvature,
        "optimizer": args.optimizer,
        "num_parameters": n,
        "batch_size": len(idx),
        "num_iterations": m,
        "num_probes": args.num_probes,
        "max_condition": args.max_condition,
        "training": result.metrics,
        "density": _add_density(states, floor),
        "states": states,
    }
    json_path, png_path = os.path.join(out, "spectrum.json"), os.path.join(out, "spectrum.png")
    with open(json_path, "w") as f:
        json.dump(document, f, indent=1)
    sizes = "-".join(map(str, model.sizes))
    title = (
        f"{args.curvature} spectrum, {model.name} {sizes} on {dataset.name} (batch {len(idx)}), "
        f"before/after {args.epochs} epoch(s) of {args.optimizer}"
    )
    _plot(png_path, document, title)
    print(f"{args.curvature} spectrum of {model.name} {sizes} ({n} parameters), batch {len(idx)}:")
    for name, state in states.items():
        print(_line(name, state, args.max_condition))
    print(f"results: {json_path}  figure: {png_path}")
    return 0
