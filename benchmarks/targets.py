"""Targets, best grid values and the goals of the time-to-target benchmark, from recorded runs.

A run is a dict with ``optimizer``, ``config`` (its grid value, as text) and ``curve`` (lists
``step``, ``seconds`` and ``metric``, one entry per evaluation; ``metric`` None once diverged),
plus ``steps`` and ``train_seconds``: how far it got.

* The time and steps to reach a target are those of the first evaluation reaching it (so they
  are upper bounds, exact to within the evaluation spacing).
* Per optimiser, over its grid: the value reaching the target in the least time, and separately
  the value reaching it in the fewest steps.
* A goal compares the best natgrad optimiser with a first-order reference as a ratio
  ``ours / reference`` that must be ≤ a limit. When the reference never reaches the target,
  its time or steps are larger than anything it ran, so the goal is met if ours ≤ limit × that
  (and undecided otherwise); when no natgrad optimiser reaches it, the goal is not met; when
  neither does, it is undecided (None).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

__all__ = [
    "FIRST_ORDER",
    "GOALS",
    "first_reach",
    "best_per_optimizer",
    "goal",
    "classifier_summary",
    "autoencoder_summary",
    "step_costs",
]

FIRST_ORDER = ("sgd", "adam")
# The goals, as limits on ours / reference (the autoencoder's 4× and 14× speed-ups inverted).
GOALS = {
    "classifier_time_over_adam": 0.5,
    "classifier_steps_over_sgd": 0.1,
    "autoencoder_time_over_sgd": 1 / 4,
    "autoencoder_steps_over_sgd": 1 / 14,
}
# K-FAC's authors (Martens & Grosse 2015) on their deep autoencoders, against SGD+momentum.
KFAC_PAPER = {"fewer_seconds": 3.8, "fewer_updates": 14.7}


def first_reach(
    steps: Sequence[int],
    seconds: Sequence[float],
    values: Sequence[float | None],
    target: float,
    *,
    higher_is_better: bool = True,
) -> tuple[int | None, float | None]:
    """(step, seconds) of the first evaluation whose value reaches `target` (≥ when
    `higher_is_better`, else ≤), or (None, None) if none does. None or NaN values never reach."""
    for step, secs, value in zip(steps, seconds, values, strict=True):
        if value is None or not math.isfinite(value):
            continue
        if (value >= target) if higher_is_better else (value <= target):
            return int(step), float(secs)
    return None, None


def best_per_optimizer(
    runs: Sequence[dict], target: float, *, higher_is_better: bool = True
) -> dict[str, dict[str, Any]]:
    """Per optimiser (in order of first appearance): over its runs, the config reaching `target`
    in the least time (``config``, ``seconds``, ``steps``), the fewest steps it needed in any
    config (``fewest_steps``, ``fewest_steps_config``), and when none reached it, how far its
    runs got without (``ran_seconds``, ``ran_steps``: the largest of each)."""
    out: dict[str, dict[str, Any]] = {}
    for run in runs:
        row = out.setdefault(
            run["optimizer"],
            {
                "reached": False,
                "config": None,
                "seconds": None,
                "steps": None,
                "fewest_steps": None,
                "fewest_steps_config": None,
                "ran_seconds": 0.0,
                "ran_steps": 0,
            },
        )
        row["ran_seconds"] = max(row["ran_seconds"], run["train_seconds"])
        row["ran_steps"] = max(row["ran_steps"], run["steps"])
        c = run["curve"]
        step, secs = first_reach(
            c["step"], c["seconds"], c["metric"], target, higher_is_better=higher_is_better
        )
        if step is None:
            continue
        row["reached"] = True
        if row["seconds"] is None or secs < row["seconds"]:
            row.update(config=run["config"], seconds=secs, steps=step)
        if row["fewest_steps"] is None or step < row["fewest_steps"]:
            row.update(fewest_steps=step, fewest_steps_config=run["config"])
    return out


def goal(ours: float | None, reference: float | None, bound: float, limit: float) -> dict:
    """``ratio = ours / reference`` and ``met = ratio ≤ limit``.

    `ours` or `reference` is None when it never reached the target; `bound` is then what the
    reference ran without reaching it (its true value is larger). A reference of 0 (the target
    held from the start) decides nothing.
    """
    if ours is None:
        met = None if reference is None else False
        return {"ratio": None, "limit": limit, "met": met}
    if reference is None:
        return {"ratio": None, "limit": limit, "met": True if ours <= limit * bound else None}
    if reference == 0:
        return {"ratio": None, "limit": limit, "met": None}
    return {"ratio": ours / reference, "limit": limit, "met": ours / reference <= limit}


def _best_natgrad(best: dict[str, dict], field: str) -> tuple[str | None, float | None]:
    """The natgrad optimiser (not first-order) with the smallest `field`, and that value."""
    rows = [
        (row[field], name)
        for name, row in best.items()
        if name not in FIRST_ORDER and row[field] is not None
    ]
    if not rows:
        return None, None
    value, name = min(rows)
    return name, value


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def _reference(best: dict[str, dict], name: str) -> dict[str, Any]:
    """The first-order reference's row, or an empty one when it did not run."""
    empty = {"seconds": None, "fewest_steps": None, "ran_seconds": 0.0, "ran_steps": 0}
    return best.get(name, empty)


def _goals(best: dict[str, dict], time_ref: str, steps_ref: str, limits: tuple) -> dict:
    """The time goal (best natgrad seconds ÷ `time_ref`'s) and the steps goal (fewest natgrad
    steps ÷ `steps_ref`'s) against `limits`; undecided (None) if no natgrad optimiser ran."""
    goals = {}
    for kind, field, ref, bound, limit in (
        ("time", "seconds", time_ref, "ran_seconds", limits[0]),
        ("steps", "fewest_steps", steps_ref, "ran_steps", limits[1]),
    ):
        name, value = _best_natgrad(best, field)
        reference = _reference(best, ref)
        g = goal(value, reference[field], reference[bound], limit)
        if all(n in FIRST_ORDER for n in best):
            g["met"] = None
        goals[kind] = {"natgrad": name, "reference": ref, **g}
    return goals


def classifier_summary(runs: Sequence[dict], target: float) -> dict[str, Any]:
    """One accuracy target: per optimiser its best configs with ``seconds_over_adam`` (its best
    time ÷ Adam's) and ``fewest_steps_over_sgd`` (its fewest steps ÷ SGD+momentum's), and the two
    goals for the best natgrad optimiser: time ≤ 0.5 × Adam's, steps ≤ 0.1 × SGD+momentum's."""
    best = best_per_optimizer(runs, target)
    adam, sgd = _reference(best, "adam"), _reference(best, "sgd")
    for row in best.values():
        row["seconds_over_adam"] = _ratio(row["seconds"], adam["seconds"])
        row["fewest_steps_over_sgd"] = _ratio(row["fewest_steps"], sgd["fewest_steps"])
    limits = (GOALS["classifier_time_over_adam"], GOALS["classifier_steps_over_sgd"])
    return {"target": target, "optimizers": best, "goals": _goals(best, "adam", "sgd", limits)}


def autoencoder_summary(runs: Sequence[dict], target: float | None) -> dict[str, Any]:
    """Per optimiser the seconds and updates to reach `target` (SGD+momentum's best training
    loss) with the speed-ups ``fewer_seconds`` = SGD's seconds ÷ its seconds and
    ``fewer_updates`` = SGD's updates ÷ its updates; the goals ≥ 4× and ≥ 14× for the best
    natgrad optimiser (as ratios ≤ 1/4 and ≤ 1/14, with their inverses as ``speedup``)."""
    if target is None:
        return {"target": None, "optimizers": {}, "goals": {}}
    best = best_per_optimizer(runs, target, higher_is_better=False)
    sgd = _reference(best, "sgd")
    for row in best.values():
        row["fewer_seconds"] = _ratio(sgd["seconds"], row["seconds"])
        row["fewer_updates"] = _ratio(sgd["fewest_steps"], row["fewest_steps"])
    limits = (GOALS["autoencoder_time_over_sgd"], GOALS["autoencoder_steps_over_sgd"])
    goals = _goals(best, "sgd", "sgd", limits)
    for g in goals.values():
        g["speedup"] = None if not g["ratio"] else 1 / g["ratio"]
        g["speedup_goal"] = 1 / g["limit"]
    return {"target": target, "optimizers": best, "goals": goals, "kfac_paper": KFAC_PAPER}


def step_costs(runs: Sequence[dict]) -> dict[str, dict[str, float | None]]:
    """Where the time goes, per optimiser over its runs: the median training-step time and its
    ratio to Adam's, the mean CG iterations per step, and the median compile time."""
    out: dict[str, dict[str, float | None]] = {}
    for name in dict.fromkeys(r["optimizer"] for r in runs):
        mine = [r for r in runs if r["optimizer"] == name]
        step = [r["step_seconds"] for r in mine if r["step_seconds"] is not None]
        cg = [r["mean_cg_iterations"] for r in mine if r["mean_cg_iterations"] is not None]
        out[name] = {
            "step_seconds": statistics.median(step) if step else None,
            "mean_cg_iterations": statistics.fmean(cg) if cg else None,
            "compile_seconds": statistics.median(r["compile_seconds"] for r in mine),
            "eval_seconds": sum(r["eval_seconds"] for r in mine),
            "train_seconds": sum(r["train_seconds"] for r in mine),
        }
    adam = out.get("adam", {}).get("step_seconds")
    for row in out.values():
        row["step_over_adam"] = _ratio(row["step_seconds"], adam)
    return out
