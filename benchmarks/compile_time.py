"""What compiling a natgrad step costs, against optax.adam's, and what the persistent cache saves.

1. First-step compile (MLP 784-128-10 at batch 128, float32, each optimiser with its defaults):
   the whole training step of `natgrad.experiments.training.make_step` (`value_and_grad` +
   `update` + `apply_updates`) traced, lowered and compiled by XLA, timed apart, with a new
   optimiser and a new `jax.jit` each time (nothing reused from an earlier round). The
   optimisers take turns; the ratio to Adam's is taken within each round and its median
   reported (target ≤ 3). The kernels are the compiled program's fusions and library calls
   (XLA's CPU backend compiles each kernel with LLVM: its compile time grows with their count).
2. The persistent compilation cache of the `natgrad` command: ``natgrad compare`` (MNIST-5k,
   every optimiser of its lineup, a few steps) run twice in fresh processes on an empty cache
   directory; each optimiser's ``compile_seconds`` from the first run (compiled and written)
   and the second (read back). Target: the second run starts training in under a second per
   optimiser.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import optax

import natgrad
from benchmarks.timing import command, machine, setup
from natgrad.experiments import training

TARGET_RATIO = 3.0  # compile ÷ Adam's (issue 14)
TARGET_CACHED_SECONDS = 1.0  # per optimiser, a second `natgrad compare`


def optimizers(apply_fn, loss) -> dict:
    """Factories of the optimisers compared, each called afresh for every compile."""
    return {
        "adam": lambda: optax.adam(1e-3),
        "sgd": lambda: optax.sgd(1e-2),
        "natural_gradient": lambda: natgrad.natural_gradient(apply_fn, loss),
        "kfac": lambda: natgrad.kfac(apply_fn, loss),
        "hessian_free": lambda: natgrad.hessian_free(apply_fn, loss),
    }


# An instruction line `%name = <shape> fusion(...)` or `custom-call(...)`; the shape may be a
# tuple with spaces, `(f32[128]{0}, s32[128]{0})`, as a multi-output fusion's is.
_KERNEL = re.compile(r"^\s*(?:ROOT )?%\S+ = .*? (?:fusion|custom-call)\(", re.MULTILINE)


def kernels(hlo_text: str) -> int:
    """Fusions and library calls (custom-call) in a compiled program's HLO text, fused
    computations' bodies excluded: what XLA's CPU backend emits code for."""
    return len(_KERNEL.findall(hlo_text))


def compile_once(make, params, batch, apply_fn, loss, key) -> dict:
    opt = make()
    state = opt.init(params)
    # make_step returns a new function each call, so nothing is reused from an earlier round.
    jitted = jax.jit(training.make_step(opt, apply_fn, loss))
    t0 = time.perf_counter()
    traced = jitted.trace(params, state, batch, key)
    t1 = time.perf_counter()
    lowered = traced.lower()
    t2 = time.perf_counter()
    compiled = lowered.compile()
    t3 = time.perf_counter()
    return {
        "trace_seconds": t1 - t0,
        "lower_seconds": t2 - t1,
        "compile_seconds": t3 - t2,
        "total_seconds": t3 - t0,
        "kernels": kernels(compiled.as_text()),
    }


def first_step(rounds: int) -> dict:
    params, apply_fn, batch, loss = setup((784, 128, 10), 128)
    key = jax.random.PRNGKey(3)
    makes = optimizers(apply_fn, loss)
    compile_once(makes["adam"], params, batch, apply_fn, loss, key)  # the process's first compile
    samples = {name: [] for name in makes}
    for _ in range(rounds):
        for name, make in makes.items():
            samples[name].append(compile_once(make, params, batch, apply_fn, loss, key))
    rows = {}
    for name, runs in samples.items():
        pairs = zip(runs, samples["adam"], strict=True)
        ratios = [r["total_seconds"] / a["total_seconds"] for r, a in pairs]
        row = {
            field: statistics.median(r[field] for r in runs)
            for field in ("trace_seconds", "lower_seconds", "compile_seconds", "total_seconds")
        }
        row["kernels"] = runs[-1]["kernels"]
        row["over_adam"] = statistics.median(ratios)
        row["over_adam_rounds"] = ratios
        if name not in ("adam", "sgd"):
            row["target"] = TARGET_RATIO
            row["met"] = row["over_adam"] <= TARGET_RATIO
        rows[name] = row
    return {
        "model": [784, 128, 10],
        "batch_size": 128,
        "rounds": rounds,
        "target": TARGET_RATIO,
        "optimizers": rows,
    }


def _compare_once(cache: str, out: str, steps: int) -> dict:
    env = {**os.environ, "NATGRAD_CACHE_DIR": cache}
    argv = ["compare", "--dataset", "mnist-5k", "--steps", str(steps), "--no-progress"]
    argv += ["--eval-every", "100", "--out", out]
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "natgrad", *argv],
        capture_output=True,
        text=True,
        env=env,
        timeout=1800,
    )
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"natgrad compare failed: {proc.stderr.strip()[-500:]}")
    with open(os.path.join(out, "results.json")) as f:
        results = json.load(f)["results"]
    compiled = {name: r["metrics"]["compile_seconds"] for name, r in results.items()}
    return {"wall_seconds": wall, "compile_seconds": compiled}


def cached_rerun(steps: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cache = os.path.join(tmp, "cache")
        first = _compare_once(cache, os.path.join(tmp, "first"), steps)
        second = _compare_once(cache, os.path.join(tmp, "second"), steps)
    rows = {
        name: {
            "first_seconds": first["compile_seconds"][name],
            "second_seconds": second["compile_seconds"][name],
            "met": second["compile_seconds"][name] < TARGET_CACHED_SECONDS,
        }
        for name in first["compile_seconds"]
    }
    return {
        "command": "natgrad compare --dataset mnist-5k --steps "
        f"{steps} (twice, NATGRAD_CACHE_DIR an empty directory)",
        "target_seconds": TARGET_CACHED_SECONDS,
        "first_wall_seconds": first["wall_seconds"],
        "second_wall_seconds": second["wall_seconds"],
        "optimizers": rows,
    }


def run(quick: bool = False) -> dict:
    return {
        "benchmark": "compile_time",
        "note": "first-step compile ratios within interleaved rounds, medians; the cache part "
        "from two fresh processes",
        "first_step": first_step(rounds=2 if quick else 7),
        "cache": cached_rerun(steps=4 if quick else 20),
        "machine": machine(),
    }


def _show(payload: dict):
    fs = payload["first_step"]
    yield f"first-step compile, MLP {fs['model']} batch {fs['batch_size']}, {fs['rounds']} rounds:"
    for name, r in fs["optimizers"].items():
        verdict = "" if "met" not in r else (" met" if r["met"] else " missed")
        yield (
            f"  {name:17s} {r['total_seconds']:6.2f} s  ÷ adam {r['over_adam']:5.2f}  "
            f"kernels {r['kernels']}{verdict}"
        )
    c = payload["cache"]
    yield f"{c['command']}: compile s first → second run"
    for name, r in c["optimizers"].items():
        yield f"  {name:17s} {r['first_seconds']:6.2f} → {r['second_seconds']:5.2f}"


def main(argv=None) -> dict:
    return command(argv, __doc__, "compile_time", run, _show)


if __name__ == "__main__":
    main()
