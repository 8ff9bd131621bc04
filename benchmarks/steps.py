"""Per-step time of each optimiser relative to an `optax.sgd` step, side by side in one process.

MLP 784-128-10 at batch 128 and MLP 784-512-512-10 at batch 1024, float32. A step is the whole
jitted training step of `natgrad.experiments.training.make_step`. For the
natural-gradient steps we also report step / gradient against the budget 2 + 1.2k gradients for
k CG iterations, and the number of curvature products the step really made. A sample is a chain
of 5 steps: it holds one of K-FAC's statistics passes but, with inverses every 50 steps, rarely
an inversion; `benchmarks/kfac.py` times K-FAC over whole 50-step periods (its honest amortised
cost).
"""

from __future__ import annotations

import statistics
from types import SimpleNamespace

import jax

import natgrad
from benchmarks.timing import command, machine, median_seconds, setup
from natgrad.experiments import lineup as experiments_lineup
from natgrad.experiments import training


def lineup(apply_fn, loss):
    """The experiments' lineup (`natgrad.experiments.lineup`) plus natural gradient with the
    GGN, with the Hessian, and with 10 unpreconditioned CG iterations."""
    ng = natgrad.natural_gradient
    model = SimpleNamespace(apply=apply_fn, loss=loss)
    hyper = experiments_lineup.resolve(experiments_lineup.default_lineup())
    opts = {name: experiments_lineup.build(name, h, model).transform for name, h in hyper.items()}
    opts["ngd-ggn"] = ng(apply_fn, loss, curvature="ggn")
    opts["ngd-hessian"] = ng(apply_fn, loss, curvature="hessian")
    # The default until 2026-12-08 (10 plain CG iterations): the 2 + 1.2k budget prices CG's
    # iterations, and this row has nothing else (no preconditioner's pass) in its step.
    opts["ngd-plain"] = ng(apply_fn, loss, preconditioner=None, maxiter=10)
    return opts


def make_step(opt, apply_fn, loss):
    """The jitted ``step(params, state, batch, key) -> (params, state, loss)``."""
    return jax.jit(training.make_step(opt, apply_fn, loss))


# Issue 14's limits on a default step ÷ an SGD step (natural gradient's default is ngd-fisher).
STEP_TARGETS = {
    ("kfac", (784, 128, 10)): 3.0,
    ("kfac", (784, 512, 512, 10)): 1.5,
    ("ngd-fisher", (784, 128, 10)): 5.0,
    ("hessian-free", (784, 128, 10)): 6.0,
}

# Samples per round: each a median of this many chains (of CHAIN steps) or gradients.
SAMPLES = 3

# Steps timed back to back, the state threaded through: K-FAC takes its statistics every 5th
# step, so a median over repeats of one step from one state would never see them.
CHAIN = 5


def chain(step, params, state, data, key):
    """`CHAIN` consecutive steps; the per-step time is this over CHAIN."""
    for i in range(CHAIN):
        params, state, value = step(params, state, data, jax.random.fold_in(key, i))
    return params, state, value


def warm_up(step, params, state, data, key):
    """Compile, then a few real steps so warm starts, damping and statistics are representative."""
    for i in range(3):
        params, state, _ = step(params, state, data, jax.random.fold_in(key, i))
    return params, state


def seconds_per_step(step, params, state, data, repeats: int, *, key=None, warmup=2) -> float:
    """Median over `repeats` samples of `CHAIN` consecutive steps from (params, state), per step."""
    key = jax.random.PRNGKey(2) if key is None else key
    samples = median_seconds(chain, step, params, state, data, key, repeats=repeats, warmup=warmup)
    return samples / CHAIN


def bench_model(sizes, batch_size, repeats, names=None) -> dict:
    """Every optimiser's step and one gradient, timed in interleaved rounds: each round takes one
    sample of each (a median of `SAMPLES` chains), and the ratios to SGD's step and to the
    gradient are taken within the round, their medians reported; a machine that slows down
    for a while then moves every timing of that round alike."""
    params, apply_fn, data, loss = setup(sizes, batch_size)
    key = jax.random.PRNGKey(2)
    grad = jax.jit(jax.grad(lambda p, d: loss.mean(apply_fn(p, d[0]), d[1])))
    steps, rows = {}, {}
    for name, opt in lineup(apply_fn, loss).items():
        if names and name not in names:
            continue
        step = make_step(opt, apply_fn, loss)
        p, s = warm_up(step, params, opt.init(params), data, key)
        steps[name] = (step, p, s)
    samples = {name: [] for name in steps}
    grads = []
    for _ in range(repeats):
        grads.append(median_seconds(grad, params, data, repeats=SAMPLES, warmup=1))
        for name, (step, p, s) in steps.items():  # compiled and warm: `warm_up` ran them
            samples[name].append(seconds_per_step(step, p, s, data, SAMPLES, key=key, warmup=0))
    t_grad = statistics.median(grads)
    for name, (step, p, s) in steps.items():
        t = statistics.median(samples[name])
        over_grad = statistics.median(a / g for a, g in zip(samples[name], grads, strict=True))
        row = {"step_seconds": t, "step_over_grad": over_grad}
        # The state after the timed step tells how much work it did.
        _, s_after, _ = step(p, s, data, key)
        k = getattr(s_after, "cg_iterations", None)
        if k is not None and name.startswith("ngd"):  # the budget is natural gradient's
            k = int(k)
            row["cg_iterations"] = k
            row["budget_2_plus_1.2k"] = 2 + 1.2 * k
            row["within_budget"] = over_grad <= 2 + 1.2 * k
        rows[name] = row
    for name, row in rows.items():
        row["step_over_sgd"] = None
        if "sgd" in samples:
            ratios = zip(samples[name], samples["sgd"], strict=True)
            row["step_over_sgd"] = statistics.median(a / b for a, b in ratios)
        target = STEP_TARGETS.get((name, tuple(sizes)))
        if target is not None and row["step_over_sgd"] is not None:
            row["target_over_sgd"] = target
            row["met"] = row["step_over_sgd"] <= target
    return {
        "model": list(sizes),
        "batch_size": batch_size,
        "grad_seconds": t_grad,
        "rounds": repeats,
        "optimizers": rows,
    }


def run(quick: bool = False) -> dict:
    configs = (
        [((784, 128, 10), 128)] if quick else [((784, 128, 10), 128), ((784, 512, 512, 10), 1024)]
    )
    repeats = 5 if quick else 7  # interleaved rounds
    return {
        "benchmark": "steps",
        "dtype": "float32",
        "note": "interleaved rounds in one process, ratios taken within each round, medians",
        "models": [bench_model(sizes, b, repeats) for sizes, b in configs],
        "machine": machine(),
    }


def _show(payload: dict):
    for m in payload["models"]:
        yield f"MLP {m['model']} batch {m['batch_size']}:"
        for name, r in m["optimizers"].items():
            extra = (
                f"  CG {r['cg_iterations']}  step/grad {r['step_over_grad']:.1f} "
                f"(budget {r['budget_2_plus_1.2k']:.1f})"
                if "cg_iterations" in r
                else ""
            )
            goal = f"  (target ≤ {r['target_over_sgd']:g})" if "target_over_sgd" in r else ""
            yield f"  {name:15s} step/sgd {r['step_over_sgd']:6.1f}{goal}{extra}"


def main(argv=None) -> dict:
    return command(argv, __doc__, "steps", run, _show)


if __name__ == "__main__":
    main()
