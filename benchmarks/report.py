"""REPORT.md and plots from the benchmark JSONs in one directory.

``python -m benchmarks.report [--out results/bench]`` (re)writes ``REPORT.md`` from every JSON
there: the time-to-target tables with their goals met / not met, where the time goes, and the
grids (``time_to_target.json``), then a summary of ``curvature.json``, ``steps.json``,
``kfac.json``, ``sharding.json`` and any other ``*.json``; plus PNG plots of the time-to-target
curves against time and against steps. `benchmarks.time_to_target` calls `write` at its end;
run this module again after the last benchmark so that every JSON is summarised.

`write_lineup` writes the 2026 lineup's ``REPORT-peers[-quick].md`` (`benchmarks.peers`): per
workload a table, curves and a verdict; the batch-scaling plot.
"""

from __future__ import annotations

import argparse
import datetime
import glob
import json
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["write", "markdown", "plot_curves", "plot_task", "write_lineup", "verdict", "main"]

REPORT_NAME = "REPORT.md"


# --------------------------------------------------------------------------------------------
# Formatting


def fmt(value: Any, digits: int = 3) -> str:
    """A table cell: None as an em dash, booleans as yes/no, floats to `digits` significant
    digits (whole numbers from 10^digits on)."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        text = f"{value:.{digits}g}"
        return f"{value:.0f}" if "e+" in text else text
    if isinstance(value, list | tuple):
        return ", ".join(fmt(v, digits) for v in value)
    return str(value)


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    """A markdown table; cells that are not strings go through `fmt`."""
    cells = [[c if isinstance(c, str) else fmt(c) for c in row] for row in rows]
    return [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
        *("| " + " | ".join(row) + " |" for row in cells),
        "",
    ]


def met(value: bool | None) -> str:
    return {True: "**met**", False: "not met", None: "undecided"}[value]


def _is_scalar(value: Any) -> bool:
    return value is None or isinstance(value, bool | int | float | str)


# --------------------------------------------------------------------------------------------
# Time to target


def _reached(row: dict, field: str, config: str) -> str:
    if row[field] is None:
        return f"not reached (ran {fmt(row['ran_seconds'])} s, {row['ran_steps']} steps)"
    return f"{fmt(row[field])} ({row[config]})"


def _time_split(summary: dict, name: str | None, reference: str) -> str:
    """Where a time ratio comes from: ours ÷ reference's = (steps ratio) × (per-step ratio),
    both for the configs that reached the target fastest."""
    rows = summary["optimizers"]
    ours, ref = rows.get(name or "", {}), rows.get(reference, {})
    if not (ours.get("steps") and ref.get("steps") and ours.get("seconds") and ref.get("seconds")):
        return ""
    steps = ours["steps"] / ref["steps"]
    per_step = (ours["seconds"] / ours["steps"]) / (ref["seconds"] / ref["steps"])
    return f"{fmt(steps, 2)}× the steps × {fmt(per_step, 2)}× the time per step"


def _goal_rows(payload: dict) -> list[list[Any]]:
    """[task, target, measure, best natgrad, value, goal, met, why] per goal."""
    rows = []
    for name, task in payload["classifier"].items():
        for s in task["summary"]:
            target = f"{100 * s['target']:g} % test acc."
            for kind, what in (("time", "time / Adam's"), ("steps", "steps / SGD+m's")):
                g = s["goals"][kind]
                why = _time_split(s, g["natgrad"], "adam") if kind == "time" else ""
                row = [_label(name), target, what, g["natgrad"], g["ratio"]]
                rows.append(row + [f"≤ {fmt(g['limit'])}", met(g["met"]), why])
    ae = payload.get("autoencoder")
    if ae and ae["summary"]["goals"]:
        s = ae["summary"]
        target = f"loss {fmt(ae['target'], 4)} (SGD+m's best)"
        for kind, what in (("time", "SGD+m's s ÷ s"), ("steps", "SGD+m's updates ÷ updates")):
            g = s["goals"][kind]
            why = _time_split(s, g["natgrad"], "sgd") if kind == "time" else ""
            row = ["autoencoder", target, what, g["natgrad"], g["speedup"]]
            rows.append(row + [f"≥ {fmt(g['speedup_goal'])}", met(g["met"]), why])
    return rows


def _target_table(summary: dict, unit: str, ratios: dict[str, str]) -> list[str]:
    """Per optimiser: its fastest config's seconds and steps, its fewest steps over its grid,
    and the two `ratios` (field: header), time first."""
    (time_ratio, time_header), (steps_ratio, steps_header) = ratios.items()
    rows = [
        [opt, _reached(r, "seconds", "config"), r["steps"], r[time_ratio]]
        + [_reached(r, "fewest_steps", "fewest_steps_config"), r[steps_ratio]]
        for opt, r in summary["optimizers"].items()
    ]
    header = ["optimizer", "seconds (fastest config)", f"its {unit}", time_header]
    return table(header + [f"fewest {unit} (config)", steps_header], rows)


def _classifier_section(name: str, task: dict, plot: str | None) -> list[str]:
    lines = [
        f"### {_label(name)}",
        "",
        f"Budget per run: {task['step_budget']} steps or {fmt(task['seconds_budget'])} s of "
        f"training; metric: accuracy on the {task['metric'].split('_')[0]} set.",
        "",
    ]
    for s in task["summary"]:
        lines += [f"Target {100 * s['target']:g} %:", ""]
        ratios = {"seconds_over_adam": "time / Adam", "fewest_steps_over_sgd": "steps / SGD+m"}
        lines += _target_table(s, "steps", ratios)
    if plot:
        lines += [f"![{_label(name)}]({plot})", ""]
    return lines


def _autoencoder_section(ae: dict, plot: str | None) -> list[str]:
    summary = ae["summary"]
    paper = summary.get("kfac_paper") or {}
    lines = [
        f"### Autoencoder {'-'.join(str(s) for s in ae['model'])}",
        "",
        f"Budget per run: {ae['step_budget']} steps or {fmt(ae['seconds_budget'])} s of training. "
        f"Metric: mean Bernoulli cross-entropy on {ae['eval_images']} training images. "
        f"Target: SGD+momentum's best, {fmt(ae['target'], 4)}. "
        f"K-FAC's authors report {fmt(paper.get('fewer_seconds'))}× fewer seconds and "
        f"{fmt(paper.get('fewer_updates'))}× fewer updates than "
        "SGD+momentum (Martens & Grosse 2015, on larger autoencoders and growing batches).",
        "",
    ]
    ratios = {"fewer_seconds": "SGD+m s ÷ s", "fewer_updates": "SGD+m updates ÷ updates"}
    lines += _target_table(summary, "updates", ratios)
    if plot:
        lines += [f"![autoencoder]({plot})", ""]
    return lines


def _costs_section(payload: dict) -> list[str]:
    tasks = {_label(k): v for k, v in payload["classifier"].items()}
    if payload.get("autoencoder"):
        tasks["autoencoder"] = payload["autoencoder"]
    rows = []
    for label, task in tasks.items():
        for opt, c in task["step_costs"].items():
            step_ms = None if c["step_seconds"] is None else 1e3 * c["step_seconds"]
            rows.append([label, opt, step_ms, c["step_over_adam"], c["mean_cg_iterations"]])
            rows[-1] += [c["compile_seconds"], c["train_seconds"], c["eval_seconds"]]
    totals = {
        k: sum(r[k] for t in tasks.values() for r in t["runs"])
        for k in ("train_seconds", "compile_seconds", "eval_seconds")
    }
    header = ["task", "optimizer", "ms / step", "step / Adam's", "CG iters / step"]
    return [
        "### Where the time goes",
        "",
        "Median training-step time over an optimiser's runs (chunks of "
        f"{payload['settings']['chunk']} steps in one compiled call), its ratio to Adam's, the "
        "mean CG iterations per step, the median compile time, and the training and evaluation "
        "seconds summed over its runs.",
        "",
        *table(header + ["compile s", "train s (all runs)", "eval s (all runs)"], rows),
        f"Whole benchmark: {fmt(payload['total_seconds'])} s = {fmt(totals['train_seconds'])} s "
        f"training + {fmt(totals['compile_seconds'])} s compiling + "
        f"{fmt(totals['eval_seconds'])} s evaluating + data and set-up.",
        "",
    ]


def _grids_section(payload: dict) -> list[str]:
    rows = [
        [task, opt, g["knob"], fmt(g["values"]), json.dumps(g["fixed"]) if g["fixed"] else ""]
        for task, grids in payload["grids"].items()
        for opt, g in grids.items()
    ]
    return [
        "### Grids",
        "",
        "Each optimiser runs every value of its grid; the tables above show the best per target. "
        "Hyperparameters not listed are the factory's defaults.",
        "",
        *table(["task", "optimizer", "knob", "values", "fixed"], rows),
    ]


def time_to_target_section(payload: dict, plots: dict[str, str]) -> list[str]:
    if payload.get("skipped"):
        return [f"Skipped: {payload.get('reason')}", ""]
    ds = payload["dataset"]
    lines = [
        f"{ds['name']}, {ds['num_train']} training / {ds['num_test']} test examples, batch "
        f"{payload['settings']['batch_size']}, seed {payload['seed']}. {payload['note']}.",
        "",
        "### Goals",
        "",
        "The best natgrad optimiser (natural gradient, Hessian-free, K-FAC) against the tuned "
        "first-order reference; steps are read at the evaluation points, so within "
        f"{fmt(100 * (payload['settings']['eval_growth'] - 1), 2)} % of the true count. The last "
        "column splits a time ratio into its steps ratio and its per-step cost ratio.",
        "",
        *table(
            ["task", "target", "measure", "best natgrad", "value", "goal", "met", "time ratio ="],
            _goal_rows(payload),
        ),
    ]
    for name, task in payload["classifier"].items():
        lines += _classifier_section(name, task, plots.get(name))
    if payload.get("autoencoder"):
        lines += _autoencoder_section(payload["autoencoder"], plots.get("autoencoder"))
    return lines + _costs_section(payload) + _grids_section(payload)


# --------------------------------------------------------------------------------------------
# The other benchmarks


def curvature_section(p: dict) -> list[str]:
    rows = [
        [n, r["product_over_grad"], r["build_over_grad"], r["single_call_over_grad"]]
        + [r["target"], r["meets_target"]]
        for n, r in p["operators"].items()
    ]
    header = ["operator", "product / grad", "build / grad", "single call / grad", "target"]
    return [
        f"MLP {fmt(p['model'])}, batch {p['batch_size']}, {p['dtype']}: one curvature-vector "
        "product in units of one gradient.",
        "",
        *table(header + ["met"], rows),
    ]


def steps_section(p: dict) -> list[str]:
    lines = []
    for m in p["models"]:
        rows = [
            [n, r["step_over_sgd"], r.get("target_over_sgd"), r.get("met"), r["step_over_grad"]]
            + [r.get("cg_iterations"), r.get("budget_2_plus_1.2k"), r.get("within_budget")]
            for n, r in m["optimizers"].items()
        ]
        header = ["optimizer", "step / SGD's", "target", "met", "step / grad", "CG iters"]
        header += ["budget 2+1.2k"]
        lines += [f"MLP {fmt(m['model'])}, batch {m['batch_size']}:", ""]
        lines += table(header + ["within"], rows)
    return lines


def phases_section(p: dict) -> list[str]:
    lines = [
        f"MLP {fmt(p['model'])}, batch {p['batch_size']}: each default step split into its "
        f"phases by ladders of variants (each rung one part fewer), {p['steps_per_sample']} "
        f"steps a sample in one `lax.scan` (no per-call dispatch, so the ratios to SGD run higher "
        f"than the dispatched steps above), {p['rounds']} interleaved rounds, medians; an SGD "
        f"step {fmt(p['sgd_step_ms'])} ms.",
        "",
    ]
    for name, row in p["optimizers"].items():
        k = row.get("cg_iterations")
        its = f", {fmt(k)} CG iterations on average" if k else ""
        lines += [f"**{name}**: {fmt(row['step_ms'])} ms a step{its}.", ""]
        rows = [[part, v["ms"], v["over_sgd"], v["percent"]] for part, v in row["phases"].items()]
        lines += table(["phase", "ms", "÷ SGD step", "% of the step"], rows)
    return lines


def compile_section(p: dict) -> list[str]:
    fs, c = p["first_step"], p["cache"]
    rows = [
        [n, r["total_seconds"], r["over_adam"], r["kernels"], r.get("met")]
        for n, r in fs["optimizers"].items()
    ]
    cached = [
        [n, r["first_seconds"], r["second_seconds"], r["met"]] for n, r in c["optimizers"].items()
    ]
    return [
        f"First-step compile (trace + lower + XLA), MLP {fmt(fs['model'])}, batch "
        f"{fs['batch_size']}, defaults; {fs['rounds']} interleaved rounds, the ratio to Adam's "
        f"taken within each (target ≤ {fmt(fs['target'])}):",
        "",
        *table(["optimizer", "compile s", "÷ Adam's", "kernels", "met"], rows),
        f"`{c['command']}`: each optimizer's compile seconds, compiled in the first run, read "
        f"from the cache in the second (target < {fmt(c['target_seconds'])} s):",
        "",
        *table(["optimizer", "first run s", "second run s", "met"], cached),
    ]


def sharding_section(p: dict) -> list[str]:
    rows = [[r["devices"], r["step_seconds"], r["examples_per_second"]] for r in p["runs"]]
    est = p["estimate_100M_params_8_devices"]
    return [
        f"MLP {fmt(p['model'])}, batch {p['batch_size']}, {p['optimizer']}. {p['note']}.",
        "",
        *table(["devices", "step s", "examples / s"], rows),
        f"Throughput 4 devices / 1: {fmt(p['throughput_4_over_1'])}. Estimate for 100M "
        f"parameters on 8 devices: {fmt(est['bytes_per_device_per_cg_iteration'] / 1e6)} MB per "
        f"device per CG iteration, {est['allreduces_per_step']} all-reduces per step.",
        "",
    ]


def _is_cell(value: Any) -> bool:
    """A scalar or a list of scalars: what fits in one table cell."""
    return _is_scalar(value) or (isinstance(value, list) and all(map(_is_scalar, value)))


def _records(value: Any, path: str, out: list[tuple[str, list[dict]]]) -> None:
    """Collect (path, rows) for every table nested in `value`: a dict of dicts gives one row
    per key, a list of dicts one row per item, any other dict one row; the rows keep the fields
    that fit in a cell, and the other fields are searched the same way."""
    if isinstance(value, dict) and value and all(isinstance(v, dict) for v in value.values()):
        records = [({"": k}, v, f"{path}.{k}") for k, v in value.items()]
    elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        records = [({}, v, f"{path}[{i}]") for i, v in enumerate(value)]
    elif isinstance(value, dict):
        records = [({}, value, path)]
    else:
        return
    rows = [{**key, **{c: x for c, x in v.items() if _is_cell(x)}} for key, v, _ in records]
    if any(len(r) > len(key) for r, (key, _, _) in zip(rows, records, strict=True)):
        out.append((path, rows))
    for _, v, where in records:
        for c, x in v.items():
            if not _is_cell(x):
                _records(x, f"{where}.{c}", out)


def generic_section(p: dict) -> list[str]:
    """Any JSON: its top-level scalars, then a table for each nested dict or list of records."""
    p = {k: v for k, v in p.items() if k not in ("benchmark", "machine")}
    lines = [f"- {k}: {fmt(v)}" for k, v in p.items() if _is_cell(v)]
    lines += [""] if lines else []
    found: list[tuple[str, list[dict]]] = []
    for key, value in p.items():
        if not _is_cell(value):
            _records(value, key, found)
    for path, rows in found:
        columns = list(dict.fromkeys(c for r in rows for c in r))
        lines += [f"{path}:", "", *table(columns, [[r.get(c) for c in columns] for r in rows])]
    return lines


def _first(curve, target):
    """(steps, seconds) of the first evaluation at or below `target`, or (None, None)."""
    return next(((st, sec) for st, sec, loss in curve if loss <= target), (None, None))


def charlm_section(payload: dict) -> list[str]:
    """The character-level transformer (`benchmarks.charlm`): each optimiser's best grid point
    against Adam's final loss, and which ends lowest."""
    runs = {name: e["runs"][e["best"]] for name, e in payload["optimizers"].items()}
    adam = runs["adam"]
    target = adam["final_loss"]
    lines = [
        f"Transformer (`natgrad.experiments.charlm`: 2 pre-norm blocks, width 64, 4 heads, "
        f"context 64) on the Python standard library's source, batch {payload['batch']}, "
        f"{payload['steps']} steps; validation loss in nats per character (lower is better); "
        f"each optimiser's best of its {len(payload['optimizers']['adam']['runs'])}-point grid. "
        "Target: Adam's final loss.",
        "",
        "| optimiser | best knob | final loss | steps to target | seconds to target "
        "| step ÷ Adam's | compile s |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in runs.items():
        knob = payload["optimizers"][name]["knob"]
        steps, seconds = _first(r["curve"], target)
        ratio = r["per_step_seconds"] / adam["per_step_seconds"]
        lines.append(
            f"| {name} | {knob}={r['value']:g} | {r['final_loss']:.3f} | "
            f"{steps if steps is not None else 'not reached'} | "
            f"{'—' if seconds is None else f'{seconds:.1f}'} | {ratio:.2f} | "
            f"{r['compile_seconds']:.1f} |"
        )
    best = min(runs, key=lambda n: runs[n]["final_loss"])
    lines += ["", f"Lowest final loss: **{best}** ({runs[best]['final_loss']:.3f}).", ""]
    reached = {n: _first(r["curve"], target)[1] for n, r in runs.items()}
    first = min((n for n in reached if reached[n] is not None), key=lambda n: reached[n])
    if first == "adam":  # natgrad loses the clock: say by how much and why
        ours = [n for n in runs if n != "adam"]
        why = ", ".join(
            f"{n}: step {runs[n]['per_step_seconds'] / adam['per_step_seconds']:.2f}× Adam's, "
            + (
                "target not reached"
                if reached[n] is None
                else f"target at {reached[n] / reached['adam']:.2f}× Adam's seconds"
            )
            for n in ours
        )
        lines += [f"First to the target in wall time: **adam** — natgrad loses here ({why}).", ""]
    else:
        lines += [f"First to the target in wall time: **{first}** ({reached[first]:.1f} s).", ""]
    return lines + ["![charlm](charlm.png)", ""]


SECTIONS: dict[str, tuple[str, Callable[[dict], list[str]]]] = {
    "curvature": ("Curvature products", curvature_section),
    "steps": ("Optimiser steps", steps_section),
    "phases": ("Where a step goes", phases_section),
    "kfac": ("K-FAC", generic_section),
    "inverses": ("Inverting the factors: LU, Cholesky, eigh, Newton–Schulz", generic_section),
    "compile_time": ("Compilation", compile_section),
    "sharding": ("Sharding", sharding_section),
    "charlm": ("Character-level transformer", charlm_section),
}


# --------------------------------------------------------------------------------------------
# Plots


def _representative(task: dict, name: str, higher_is_better: bool) -> dict:
    """The run to plot for optimiser `name`: its fastest config on the hardest target it
    reached, else its run with the best metric."""
    mine = [r for r in task["runs"] if r["optimizer"] == name]
    summaries = task["summary"] if isinstance(task["summary"], list) else [task["summary"]]
    for s in reversed(summaries):
        config = s["optimizers"].get(name, {}).get("config")
        if config is not None:
            return next(r for r in mine if r["config"] == config)
    sign = 1.0 if higher_is_better else -1.0

    def best(run):
        values = [sign * m for m in run["curve"]["metric"] if m is not None]
        return max(values, default=-math.inf)

    return max(mine, key=best)


def plot_curves(series, targets, path: str, title: str, ylabel: str, *, log_y: bool) -> str:
    """Metric vs training seconds (left) and vs steps (right), log x scales, one line per
    ``(label, curve, line style)`` of `series`; the `targets` dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for label, c, style in series:
        points = zip(c["step"], c["seconds"], c["metric"], strict=True)
        points = [p for p in points if p[0] > 0 and p[2] is not None]
        if points:
            steps, secs, metric = zip(*points, strict=True)
            axes[0].plot(secs, metric, style, marker=".", label=label)
            axes[1].plot(steps, metric, style, marker=".", label=label)
    for ax, xlabel in zip(axes, ("training seconds", "steps"), strict=True):
        for t in targets:
            ax.axhline(t, color="grey", linestyle="--", linewidth=0.8)
        ax.set(xscale="log", yscale="log" if log_y else "linear", xlabel=xlabel, ylabel=ylabel)
        ax.grid(True, alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_task(task: dict, path: str, title: str, *, higher_is_better: bool) -> str:
    """A time-to-target task's curves: per optimiser the run `_representative` picks."""
    series = []
    for name in dict.fromkeys(r["optimizer"] for r in task["runs"]):
        run = _representative(task, name, higher_is_better)
        series.append((f"{name} ({run['config']})", run["curve"], "-"))
    summaries = task["summary"] if isinstance(task["summary"], list) else [task["summary"]]
    targets = [s["target"] for s in summaries if s["target"] is not None]
    ylabel = task["metric"].replace("_", " ")
    return plot_curves(series, targets, path, title, ylabel, log_y=not higher_is_better)


def _label(name: str) -> str:
    """A time-to-target classifier's title: "MLP 784-128-10", "CNN 16-32"."""
    return f"CNN {name[4:]}" if name.startswith("cnn-") else f"MLP {name}"


def _plots(payload: dict, out_dir: str) -> dict[str, str]:
    """Plot each task; {task name: PNG file name}."""
    plots = {}
    for name, task in payload["classifier"].items():
        file = f"time_to_target_{_label(name).lower().replace(' ', '_')}.png"
        plot_task(task, os.path.join(out_dir, file), _label(name), higher_is_better=True)
        plots[name] = file
    ae = payload.get("autoencoder")
    if ae and ae["target"] is not None:
        file = "time_to_target_autoencoder.png"
        title = f"Autoencoder {'-'.join(str(s) for s in ae['model'])}"
        plot_task(ae, os.path.join(out_dir, file), title, higher_is_better=False)
        plots["autoencoder"] = file
    return plots


# --------------------------------------------------------------------------------------------
# The report


def _load(out_dir: str) -> dict[str, dict]:
    payloads = {}
    for path in sorted(glob.glob(os.path.join(out_dir, "*.json"))):
        with open(path) as f:
            try:
                payload = json.load(f)
            except json.JSONDecodeError:
                continue
        if isinstance(payload, dict):
            payloads[os.path.splitext(os.path.basename(path))[0]] = payload
    return payloads


def _stamp(out_dir: str, name: str, payload: dict) -> str:
    mtime = os.path.getmtime(os.path.join(out_dir, f"{name}.json"))
    when = datetime.datetime.fromtimestamp(mtime).strftime("%Y-%m-%d %H:%M")
    mode = f", {payload['mode']} mode" if "mode" in payload else ""
    return f"_{name}.json, written {when}{mode}_"


def markdown(payloads: dict[str, dict], out_dir: str, plots: dict[str, str]) -> str:
    """The report's text for `payloads` ({JSON name without .json: content})."""
    machine = next((p["machine"] for p in payloads.values() if "machine" in p), None)
    lines = ["# natgrad benchmarks", ""]
    if machine:
        lines += [
            f"Machine: {machine.get('processor')}, {machine.get('cpu_count')} CPUs, "
            f"JAX {machine.get('jax')} ({machine.get('jax_backend')}).",
            "",
        ]
    if not payloads:
        lines += ["No benchmark JSON found.", ""]
    known = ("time_to_target", *SECTIONS)  # time to target first, then SECTIONS' order
    order = [n for n in known if n in payloads] + [n for n in payloads if n not in known]
    for name in order:
        payload = payloads[name]
        title, render = SECTIONS.get(name, (name, generic_section))
        if name == "time_to_target":
            title, render = "Time to target", lambda p: time_to_target_section(p, plots)
        lines += [f"## {title}", "", _stamp(out_dir, name, payload), ""]
        try:
            lines += render(payload)
        except (KeyError, TypeError, ValueError, StopIteration) as err:
            lines += [f"(unexpected layout, {type(err).__name__}: {err}; shown generically)", ""]
            lines += generic_section(payload)
    return "\n".join(lines).rstrip() + "\n"


def write(out_dir: str) -> list[str]:
    """Write REPORT.md (and the time-to-target plots) from the JSONs in `out_dir`; the paths."""
    payloads = _load(out_dir)
    ttt = payloads.get("time_to_target")
    plots = _plots(ttt, out_dir) if ttt and not ttt.get("skipped") else {}
    path = os.path.join(out_dir, REPORT_NAME)
    with open(path, "w") as f:
        f.write(markdown(payloads, out_dir, plots))
    return [path] + [os.path.join(out_dir, p) for p in plots.values()]


# --------------------------------------------------------------------------------------------
# The 2026 lineup (benchmarks.peers): REPORT-peers[-quick].md
#
# The verdict of a workload takes its highest target reached (median over seeds) by any
# optimiser and names the fastest in wall time and in steps, the best peer and the best natgrad
# optimiser, and the ratio natgrad ÷ best peer (< 1: natgrad is faster).


def _spread(cell: dict | None, digits: int = 2) -> str:
    """A median over seeds with its [min, max], or an em dash when not reached."""
    if not cell or cell["median"] is None:
        return "—"
    (lo, hi), text = cell["spread"], f"{cell['median']:.{digits}f}"
    return text if lo == hi else f"{text} [{lo:.{digits}f}, {hi:.{digits}f}]"


def _best(rows: dict, field: str, natgrad: bool | None):
    """(keys, value) of the smallest median `field` among ok rows (natgrad only / peers only);
    tied keys joined by " = "."""
    pick = [
        (r["summary"][field]["median"], key)
        for key, r in rows.items()
        if r["status"] == "ok"
        and r["summary"][field]["median"] is not None
        and (natgrad is None or key.startswith("natgrad") == natgrad)
    ]
    if not pick:
        return None, None
    value = min(pick)[0]
    return " = ".join(k for v, k in pick if v == value), value


def verdict(name: str, wl: dict) -> str:
    rows, unit = wl["optimizers"], {"seconds": "s", "steps": "steps"}
    label = {"seconds": "wall time", "steps": "steps"}
    for t in reversed(wl["targets"]):
        if _best(rows, f"seconds_to_target:{t}", None)[0] is not None:
            break
    else:
        return f"**{name}**: no optimiser reached {wl['targets'][0]} within the budget."
    steps = "steps are read at evaluations 1.25× apart, so close step counts are ties"
    parts = [f"**{name}** (target {t}):"]
    for kind in ("seconds", "steps"):
        field = f"{kind}_to_target:{t}"
        win, wv = _best(rows, field, None)
        peer, pv = _best(rows, field, False)
        ours, ov = _best(rows, field, True)
        text = f"In {label[kind]} {win} {'tie' if ' = ' in win else 'wins'} ({wv:.4g} {unit[kind]})"
        if ours is None:
            text += f"; best peer {peer}; no natgrad optimiser reaches {t}"
        elif peer is None:
            text += f"; best natgrad {ours}; no peer reaches {t}"
        else:
            ahead = "tie" if ov == pv else ("natgrad" if ov < pv else peer) + " ahead"
            text += (
                f"; best peer {peer} {pv:.4g}, best natgrad {ours} {ov:.4g}: natgrad ÷ peer "
                f"= {ov / pv:.2f}× ({ahead})"
            )
        parts.append(text + ".")
    return " ".join(parts) + f" ({steps})."


_COLUMNS = (("seconds", 2), ("steps", 0))


def _lineup_table(wl: dict) -> list[str]:
    t1, t2 = wl["targets"][0], wl["targets"][-1]
    rows = []
    for key, r in wl["optimizers"].items():
        s, runs = r.get("summary", {}), r.get("runs", [])
        if r["status"] != "ok":
            rows.append([key, r["status"]] + [""] * 9)
            continue
        rows.append(
            [key, "ok", ", ".join(f"{k}={v:g}" for k, v in r["chosen"].items())]
            + [_spread(s[f"{f}_to_target:{t}"], d) for t in (t1, t2) for f, d in _COLUMNS]
            + ["—" if s["final_metric"] is None else f"{s['final_metric']:.4g}"]
            + ["—" if not s["step_seconds"] else f"{1e3 * s['step_seconds']:.1f}"]
            + [f"{max(run['compile_seconds'] for run in runs):.1f}"]
            + [f"{sum(run['diverged'] for run in runs)}/{len(runs)}"]
        )
    header = ["optimiser", "status", "chosen", f"s to {t1}", f"steps to {t1}", f"s to {t2}"]
    header += [f"steps to {t2}", "final", "ms/step", "compile s", "diverged"]
    return table(header, rows)


def _lineup_plots(result: dict, stem: str) -> list[str]:
    written = []
    for name, wl in result["workloads"].items():
        series = [
            (key, r["runs"][0]["curve"], "-" if key.startswith("natgrad") else "--")
            for key, r in wl["optimizers"].items()
            if r["status"] == "ok" and r["runs"]
        ]
        title = f"{name} (seed 0, chosen grid point)"
        log_y = wl["metric"] != "test_accuracy"
        written.append(f"{stem}-{name}.png")
        plot_curves(series, wl["targets"], written[-1], title, wl["metric"], log_y=log_y)
    bs = result.get("batch_scaling")
    if bs:
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for key, points in bs["optimizers"].items():
            xy = [(p["batch_size"], p["steps_to_target"]) for p in points if p["steps_to_target"]]
            if xy:
                ax.plot(*zip(*xy, strict=True), "o-", label=key)
        ax.set(xscale="log", yscale="log", xlabel="batch size", ylabel="steps to target")
        ax.set_title(f"seed MLP: steps to {bs['target']} test accuracy")
        ax.legend(fontsize=8)
        written.append(f"{stem}-batch-scaling.png")
        fig.savefig(written[-1], dpi=90, bbox_inches="tight")
        plt.close(fig)
    return written


def write_lineup(json_path: str) -> list[str]:
    """REPORT-peers[-quick].md and the PNGs beside the lineup's `json_path`; the paths written."""
    with open(json_path) as f:
        result = json.load(f)
    out = os.path.dirname(json_path) or "."
    stem = os.path.join(out, os.path.basename(json_path)[: -len(".json")])
    pngs, base = _lineup_plots(result, stem), os.path.basename(stem)
    lines = [
        f"# natgrad against the 2026 lineup ({result['mode']} mode)",
        "",
        "Protocol: docs/benchmarks.md. Cells: median over seeds [min, max]; — = not reached.",
        f"Whole run: {result['total_seconds']:.0f} s.",
        "",
    ]
    if result.get("parts"):
        secs = " s, ".join(f"{p['seconds']:.0f}" for p in result["parts"])
        lines[-2] = f"Whole run: {len(result['parts'])} parts side by side, {secs} s."
    for name, wl in result["workloads"].items():
        lines += [f"## {name} (batch {wl['batch_size']}, {wl['metric']})", ""]
        lines += ([f"Note: {wl['note']}.", ""] if wl["note"] else []) + _lineup_table(wl)
        lines += [verdict(name, wl), "", f"![{name}]({base}-{name}.png)", ""]
    bs = result.get("batch_scaling")
    if bs:
        lines += [f"## Batch-size scaling (seed MLP, steps to {bs['target']}; — = not reached)", ""]
        rows = [[k, *(p["steps_to_target"] for p in v)] for k, v in bs["optimizers"].items()]
        lines += table(["optimiser", *map(str, bs["batch_sizes"])], rows)
        lines += [f"![scaling]({base}-batch-scaling.png)", ""]
    report = os.path.join(out, f"REPORT-{base}.md")
    with open(report, "w") as f:
        f.write("\n".join(lines))
    return [report, *pngs]


def main(argv: Sequence[str] | None = None) -> list[str]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results/bench")
    args = parser.parse_args(argv)
    written = write(args.out)
    print("wrote " + ", ".join(written))
    return written


if __name__ == "__main__":
    main()
