"""Optimiser variants side by side on one lineup workload: steps and seconds to its targets.

    python -m benchmarks.variants mlp 'default=natgrad.kfac(A, L)' \\
        'adaptive=natgrad.kfac(A, L, momentum="adaptive", kl_radius=0.03)' --orders 3 --train 20000

Each variant is ``name=expression``; the expression builds an optax transformation from
``natgrad``, ``optax``, ``A`` (the workload's apply function) and ``L`` (its loss). Every data
order trains every variant in turn (interleaved, one process), with `benchmarks.timed_training`'s
loop: compiled chunks, evaluation off the clock, the lineup's budgets (`--seconds` overrides).
Prints each run, then per variant the median steps and seconds to each target (— where no
order reached it in its budget, or fewer than half did) and the median step time. This is how
docs/benchmarks.md compares candidate defaults.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

import optax

import natgrad
from benchmarks import workloads
from benchmarks.peers.runner import loop_options, median_reach, with_targets
from benchmarks.timed_training import batch_order, train


def parse_variant(text: str) -> tuple[str, str]:
    name, sep, expression = text.partition("=")
    if not sep or not name.strip() or not expression.strip():
        raise ValueError(f"variant: expected name=expression, got {text!r}")
    return name.strip(), expression.strip()


def build(expression: str, problem):
    scope = {"natgrad": natgrad, "optax": optax, "A": problem.apply_fn, "L": problem.loss}
    return eval(expression, scope)  # a benchmark's own command line, like timeit's


def run(w: workloads.Workload, variants: dict[str, str], orders: int, log=print) -> dict:
    runs = {name: [] for name in variants}
    p = w.problem
    for seed in range(orders):
        order = batch_order(len(p.inputs), w.batch_size, w.steps, seed + 1)
        for name, expression in variants.items():
            record, _ = train(
                name,
                lambda _v, e=expression: build(e, p),
                0.0,
                p,
                order,
                seed=seed,
                **loop_options(w, order),
            )
            record = with_targets(record, w)
            runs[name].append(record)
            secs = {t: s and round(s, 2) for t, s in record["seconds_to_target"].items()}
            log(
                f"{name} order {seed}: steps {record['steps_to_target']}, seconds {secs}, "
                f"{1e3 * record['step_seconds']:.2f} ms a step"
            )
    summary = {}
    for name, records in runs.items():
        targets = records[0]["steps_to_target"]
        summary[name] = {
            "steps_to_target": {
                t: median_reach([r["steps_to_target"][t] for r in records]) for t in targets
            },
            "seconds_to_target": {
                t: median_reach([r["seconds_to_target"][t] for r in records]) for t in targets
            },
            "step_ms": 1e3 * statistics.median(r["step_seconds"] for r in records),
        }
    return {"variants": variants, "orders": orders, "summary": summary}


def main(argv=None, dataset=None) -> dict:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("workload", choices=sorted(workloads.MODES["full"]["workloads"]))
    ap.add_argument("variants", nargs="+", help="name=expression")
    ap.add_argument("--orders", type=int, default=3, help="data orders (default 3)")
    ap.add_argument("--train", type=int, default=None, help="first N training images only")
    ap.add_argument("--batch", type=int, default=None, help="batch size (default: the workload's)")
    ap.add_argument("--seconds", type=float, default=None, help="training budget per run")
    ap.add_argument("--targets", default=None, help="comma-separated, e.g. 0.84,0.85,0.87")
    ap.add_argument("--json", default=None, help="write the runs' summary here")
    args = ap.parse_args(argv)
    try:
        variants = dict(parse_variant(v) for v in args.variants)
        if args.orders < 1:
            raise ValueError(f"--orders: expected an integer >= 1, got {args.orders}")
        targets = None if args.targets is None else tuple(float(t) for t in args.targets.split(","))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    ds = workloads.load_data("full") if dataset is None else dataset
    if args.train:
        ds = ds._replace(x_train=ds.x_train[: args.train], y_train=ds.y_train[: args.train])
    w = workloads.workload(args.workload, ds, "full", batch_size=args.batch)
    if args.seconds is not None:
        w = w._replace(seconds=args.seconds)
    if targets is not None:
        w = w._replace(targets=targets)
    result = run(w, variants, args.orders)
    for name, s in result["summary"].items():
        reach = ", ".join(
            f"{t}: {s['steps_to_target'][t] or '—'} steps / "
            + ("—" if s["seconds_to_target"][t] is None else f"{s['seconds_to_target'][t]:.2f} s")
            for t in s["steps_to_target"]
        )
        print(f"{name}: {reach}; {s['step_ms']:.2f} ms a step")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
