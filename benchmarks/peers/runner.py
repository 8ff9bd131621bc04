"""The lineup's protocol: tune each optimiser on the same grid budget, then run the seeds.

Per workload and optimiser (AlgoPerf-like, docs/benchmarks.md):

1. Tuning: every grid value on seed 0. The chosen value reaches the top target in the least
   training time (then: the lower target; then: the best final metric).
2. Seeds: the chosen value on seeds 1 … n−1 too. Seed s fixes the initial parameters, the
   batch order and natgrad's sampling keys, the same for every optimiser.
3. Clock: chunks of steps are one ahead-of-time compiled call (``jax.jit(...).lower(...)
   .compile()`` before the clock starts); evaluation happens between chunks, untimed; a run
   stops at the top target, its step or time budget, or a non-finite loss (``diverged``).

kfac-jax needs jax 0.9.0.1: its rows come from `benchmarks.peers.kfac_jax_rows`, run in
``.venv-peers`` as a subprocess, and are merged. A row that cannot be built or run says
``"status": "failed: <reason>"``. Usage: ``python -m benchmarks.peers [--quick] [--workloads …]``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import time

from benchmarks import grids, timing, workloads
from benchmarks.targets import first_reach
from benchmarks.timed_training import batch_order, eval_steps, train

GROWTH = 1.25
SCALING = ("adam", "muon", "natgrad-kfac", "natgrad-natural-gradient")


def chunk_size(w: workloads.Workload) -> int:
    """Steps per compiled call: 10 at batch 128, fewer for big batches (finer stopping); 1 for
    a CNN (`timed_training.make_chunk`: convolutions are slow inside a loop on CPU)."""
    return 1 if w.conv else max(1, min(10, 1280 // w.batch_size))


def loop_options(w: workloads.Workload, order) -> dict:
    """`timed_training`'s schedule for `w`: chunks, evaluations 1.25× apart, the time budget,
    and a stop at the top target."""
    top, chunk = w.targets[-1], chunk_size(w)
    return {
        "chunk": chunk,
        "evals": set(eval_steps(len(order), chunk, GROWTH)),
        "max_seconds": w.seconds,
        "stop": (lambda m: m >= top) if w.higher_is_better else (lambda m: m <= top),
    }


def with_targets(record: dict, w: workloads.Workload) -> dict:
    """`record` with the steps and seconds to each target of `w` (first evaluation reaching it)."""
    c = record["curve"]
    hits = {
        str(t): first_reach(
            c["step"], c["seconds"], c["metric"], t, higher_is_better=w.higher_is_better
        )
        for t in w.targets
    }
    record["steps_to_target"] = {t: h[0] for t, h in hits.items()}
    record["seconds_to_target"] = {t: h[1] for t, h in hits.items()}
    return record


def run_optax(key: str, value: float, w: workloads.Workload, seed: int) -> dict:
    """One run of the optax-compatible optimiser `key` (peers and natgrad) at `value`."""
    p = w.problem
    order = batch_order(len(p.inputs), w.batch_size, w.steps, seed + 1)
    record, _ = train(
        key,
        lambda v: grids.build(key, v, p.apply_fn, p.loss),
        value,
        p,
        order,
        seed=seed,
        traced=not grids.LINEUP[key].takes_model,
        eval_params=lambda params, state: grids.eval_params(key, params, state),
        **loop_options(w, order),
    )
    return with_targets(record, w)


def _score(run: dict, w: workloads.Workload) -> tuple:
    """Smaller is better: seconds to the top target, then to the lower, then the final metric
    (negated when higher is better)."""
    secs = [run["seconds_to_target"][str(t)] for t in reversed(w.targets)]
    final = run["final_metric"]
    final = math.inf if final is None else (-final if w.higher_is_better else final)
    return (*[math.inf if s is None else s for s in secs], final)


def row(key: str, w: workloads.Workload, mode: str, run_fn, autoencoder: bool, points=None):
    """One optimiser's row: tuning over its grid on seed 0, then the other seeds at the chosen
    value; ``failed: <reason>`` if any run raises."""
    knob, values = grids.grid(key, points or workloads.MODES[mode]["grid"], autoencoder)
    out = {"status": "ok", "knob": knob, "grid": list(values), "fixed": grids.FIXED.get(key)}
    try:
        tuning = [run_fn(key, v, w, 0) | {"seed": 0, "grid_point": {knob: v}} for v in values]
        best = min(range(len(values)), key=lambda i: _score(tuning[i], w))
        more = [
            run_fn(key, values[best], w, s) | {"seed": s, "grid_point": {knob: values[best]}}
            for s in range(1, workloads.MODES[mode]["seeds"])
        ]
    except Exception as err:  # a peer that cannot run still gets its row
        return out | {"status": f"failed: {type(err).__name__}: {str(err)[:200]}", "runs": []}
    for r, v in zip(tuning, values, strict=True):
        brief = f"{r['steps']} steps {r['train_seconds']:.2f} s final {r['final_metric']}"
        print(f"  {key:26s} {knob}={v:<8g} {brief} to target {r['seconds_to_target']}", flush=True)
    out["tuning"] = [{k: v for k, v in r.items() if k != "curve"} for r in tuning]
    return out | {"chosen": {knob: values[best]}, "runs": [tuning[best], *more]}


def median_reach(values) -> float | None:
    """The median over seeds of a step count or time to a target, an unreached one (None)
    counting as +∞; None when that median is a miss (most seeds missed), or with no seeds."""
    med = statistics.median([math.inf if v is None else v for v in values] or [math.inf])
    return None if med == math.inf else med


def summary(opt_row: dict, targets) -> dict:
    """Median and (min, max) over seeds of the seconds and steps to each target and the final
    metric; the median of the seeds counts an unreached target as +∞ (so it is None when most
    seeds miss it)."""
    out = {}
    for field in ("seconds_to_target", "steps_to_target"):
        for t in targets:
            vals = [r[field][str(t)] for r in opt_row.get("runs", [])]
            ok = sorted(v for v in vals if v is not None)
            out[f"{field}:{t}"] = {
                "median": median_reach(vals),
                "spread": [ok[0], ok[-1]] if ok else None,
            }
    finals = [r["final_metric"] for r in opt_row.get("runs", []) if r["final_metric"] is not None]
    out["final_metric"] = statistics.median(finals) if finals else None
    steps = [r["step_seconds"] for r in opt_row.get("runs", []) if r["step_seconds"]]
    out["step_seconds"] = statistics.median(steps) if steps else None
    return out


def kfac_jax_rows(mode: str, names, out: str) -> dict:
    """kfac-jax's rows from ``.venv-peers`` (a subprocess), or failed rows saying why."""
    python = os.environ.get("PEERS_PYTHON", ".venv-peers/bin/python")
    path = os.path.join(out, f"kfac-jax-{mode}.json")
    cmd = [python, "-m", "benchmarks.peers.kfac_jax_rows", mode, path, *names]
    if not os.path.exists(python):
        reason = f"failed: {python} missing (make bench-peers builds it)"
        return {n: {"status": reason, "runs": []} for n in names}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.join(root, "src"), root])}
    if os.path.exists(path):
        os.remove(path)  # never merge a stale file
    proc = subprocess.run(cmd, stderr=subprocess.PIPE, text=True, timeout=3600, env=env)
    if proc.returncode != 0 or not os.path.exists(path):
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1][:200]
        return {n: {"status": f"failed: kfac-jax subprocess: {tail}", "runs": []} for n in names}
    with open(path) as f:
        return json.load(f)


def batch_scaling(ds, mode: str) -> dict:
    """Steps to the scaling target on the seed MLP per batch size, each tuned on its grid (fewest
    steps), for `SCALING`'s optimisers; seed 0."""
    sizes, target, steps, seconds, points = workloads.MODES[mode]["scaling"]
    result = {"workload": "mlp", "target": target, "batch_sizes": list(sizes), "optimizers": {}}
    for key in SCALING:
        result["optimizers"][key] = found = []
        for b in sizes:
            base = workloads.workload("mlp", ds, mode, b)
            w = base._replace(targets=(target,), steps=steps, seconds=seconds)
            r = row(key, w, mode, run_optax, False, points)
            tuned = [t for t in r.get("tuning", []) if t["steps_to_target"][str(target)]]
            best = min(tuned, key=lambda t: t["steps_to_target"][str(target)], default=None)
            point = {"batch_size": b, "status": r["status"], "grid_point": None}
            for field in ("grid_point", "steps_to_target", "seconds_to_target"):
                point[field] = best and (
                    best[field] if field == "grid_point" else best[field][str(target)]
                )
            found.append(point)
    return result


def merge(paths, out: str) -> dict:
    """One result (and report) from runs of parts of one mode, e.g. workloads run side by side
    on separate cores: the workloads of each, the batch scaling of the one that has it, and the
    longest part's time as the whole run's."""
    parts = []
    for path in paths:
        with open(path) as f:
            parts.append(json.load(f))
    if len({p["mode"] for p in parts}) != 1:
        raise SystemExit("benchmarks.peers: --merge: the parts are of different modes")
    result = {"mode": parts[0]["mode"], "protocol": parts[0]["protocol"], "workloads": {}}
    for p in parts:
        result["workloads"] |= p["workloads"]
        result |= {"batch_scaling": p["batch_scaling"]} if "batch_scaling" in p else {}
    result["total_seconds"] = max(p["total_seconds"] for p in parts)
    result["parts"] = [
        {"json": path, "seconds": p["total_seconds"]} for path, p in zip(paths, parts, strict=True)
    ]
    name = f"peers{'-quick' if result['mode'] == 'quick' else ''}.json"
    path = timing.write_json(out, name, result)
    from benchmarks import report

    print("wrote", path, *report.write_lineup(path), flush=True)
    return result


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description="natgrad against the 2026 lineup")
    parser.add_argument("--quick", action="store_true", help="10k examples, 1 seed, grids of 1")
    parser.add_argument("--workloads", nargs="+", help="default: all of the mode's workloads")
    parser.add_argument("--optimizers", nargs="+", default=list(grids.KEYS))
    parser.add_argument("--no-scaling", action="store_true")
    parser.add_argument("--out", default="results")
    parser.add_argument(
        "--merge", nargs="+", metavar="JSON", help="merge the results of runs of parts instead"
    )
    args = parser.parse_args(argv)
    if args.merge:
        return merge(args.merge, args.out)
    timing.compilation_cache()
    mode = "quick" if args.quick else "full"
    args.workloads = args.workloads or list(workloads.MODES[mode]["workloads"])
    unknown = set(args.optimizers) - set(grids.KEYS) or set(args.workloads) - set(
        workloads.MODES[mode]["workloads"]
    )
    if unknown:
        parser.error(f"unknown names {sorted(unknown)}")
    os.makedirs(args.out, exist_ok=True)
    start = time.perf_counter()
    from natgrad.experiments.data import DataError

    try:
        ds = workloads.load_data(mode)
    except DataError as err:
        parser.exit(2, f"benchmarks.peers: Fashion-MNIST not available ({err}); run make data\n")
    kfac = kfac_jax_rows(mode, args.workloads, args.out) if "kfac-jax" in args.optimizers else {}
    result = {"mode": mode, "protocol": workloads.MODES[mode], "workloads": {}}
    for name in args.workloads:
        print(f"{name}:", flush=True)
        w = workloads.workload(name, ds, mode)
        rows = {}
        for key in args.optimizers:
            ae = name == "autoencoder"
            rows[key] = kfac[name] if key == "kfac-jax" else row(key, w, mode, run_optax, ae)
            rows[key]["summary"] = summary(rows[key], w.targets)
        result["workloads"][name] = {
            "metric": "test_accuracy" if w.higher_is_better else "train_loss (2000 images)",
            "targets": list(w.targets),
            "batch_size": w.batch_size,
            "note": w.note,
            "optimizers": rows,
        }
    path = os.path.join(args.out, f"peers{'-quick' if args.quick else ''}.json")
    for part in ("workloads", "batch_scaling"):  # the JSON is written after each part
        if part == "batch_scaling" and not args.no_scaling:
            result["batch_scaling"] = batch_scaling(ds, mode)
        result["total_seconds"] = time.perf_counter() - start
        with open(path, "w") as f:
            json.dump(result, f, indent=1)
    from benchmarks import report

    print(
        "wrote",
        path,
        *report.write_lineup(path),
        f"total {result['total_seconds']:.0f} s",
        flush=True,
    )
    return result
