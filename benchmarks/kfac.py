"""K-FAC's cost and its worth as a preconditioner, float32, single-threaded BLAS.

1. Step time (MLP 784-128-10 at batch 128, and 784-512-512-10 at batch 1024): the whole jitted
   training step (`value_and_grad` + `update` + `apply_updates`) of `natgrad.kfac` with its
   defaults (statistics every 5 steps, inverses every 50, input and output factors at least 256
   wide inverted as rank 32 plus identity), with the old schedule (statistics every step,
   inverses every 5), with the guard's trial loss (`reject_rises=True`), and with exact inverses
   of every factor (`input_factor_rank=None, output_factor_rank=None`, the default before), over
   `optax.sgd`'s, each jitted with its parameters and state donated as a training loop runs it
   (K-FAC's factors and inverses are then updated in place rather than copied every step; the
   row ``kfac_not_donated`` is the default K-FAC jitted without donation, ÷ the donated SGD
   step). The optimisers take turns (interleaved rounds); a sample is one full period of 50
   consecutive steps, so the amortised statistics and inverses are in it; the ratio to SGD is
   taken within each round and its median reported.
2. Where the time goes: each phase of a K-FAC step as its own jitted function, ÷ an SGD step —
   the gradient (forward and backward), a forward pass (the trial loss), the statistics pass
   (instrumented forward and backward, folded into the averages), the inverses of the damped
   factors, and their application A⁻¹ V G⁻¹ to the gradient — and the amortised sum of the
   default step, gradient + application + statistics / 5 + inverses / 50.
3. CG iterations to reach ‖r‖ ≤ tol·‖b‖ on (GGN + λI) d = g (g the gradient), with no
   preconditioner, Martens' diagonal, the exact GGN diagonal, Hutchinson's diagonal and K-FAC
   (one batch's statistics, λ-damped). The GGN of a batch of 128 has rank ≤ 128·9 = 1152 of
   101,770 parameters: on its null space the damped matrix is λI, which plain CG handles in one
   step and any non-scalar preconditioner spreads out, so the counts are reported as measured.
"""

from __future__ import annotations

import statistics
import time
from functools import partial

import jax
import jax.numpy as jnp
import optax

import natgrad
from benchmarks.timing import command, machine, median_seconds, setup
from natgrad import curvature, kronecker, preconditioners, solvers
from natgrad.experiments import training
from natgrad.optimizers import defaults

SIZES = (784, 128, 10)
BATCH_SIZE = 128
MODELS = (((784, 128, 10), 128), ((784, 512, 512, 10), 1024))
PERIOD = defaults.KFAC_INVERSE_EVERY  # a timed sample holds one inverse refresh
TARGETS = {(784, 128, 10): 3.0, (784, 512, 512, 10): 1.5}  # targets for K-FAC step ÷ SGD step


def _optimizers(apply_fn, loss):
    kfac = natgrad.kfac
    return {
        "sgd": optax.sgd(0.1),
        "adam": optax.adam(1e-3),
        "kfac": kfac(apply_fn, loss),
        "kfac_reject_rises": kfac(apply_fn, loss, reject_rises=True),
        "kfac_every_step_inverse_5": kfac(apply_fn, loss, statistics_every=1, inverse_every=5),
        "kfac_exact_inverses": kfac(
            apply_fn, loss, input_factor_rank=None, output_factor_rank=None
        ),
    }


def bench_steps(sizes, batch_size, rounds: int, period: int) -> dict:
    params, apply_fn, data, loss = setup(sizes, batch_size)
    key = jax.random.PRNGKey(2)
    opts = _optimizers(apply_fn, loss)
    # Parameters and state donated, as a training loop runs a step: XLA then updates K-FAC's
    # factors and inverses in place instead of copying them on every step.
    steps = {
        n: jax.jit(training.make_step(o, apply_fn, loss), donate_argnums=(0, 1))
        for n, o in opts.items()
    }
    opts["kfac_not_donated"] = opts["kfac"]
    steps["kfac_not_donated"] = jax.jit(training.make_step(opts["kfac"], apply_fn, loss))
    states = {}
    for name, opt in opts.items():  # compile, and a first period so the state is typical
        p, s = jax.tree.map(jnp.copy, (params, opt.init(params)))
        for i in range(period):
            p, s, _ = steps[name](p, s, data, jax.random.fold_in(key, i))
        states[name] = jax.block_until_ready((p, s))
    samples = {name: [] for name in opts}
    for _ in range(rounds):
        for name in opts:
            p, s = states[name]
            start = time.perf_counter()
            for i in range(period):
                p, s, _ = steps[name](p, s, data, jax.random.fold_in(key, i))
            jax.block_until_ready((p, s))
            samples[name].append((time.perf_counter() - start) / period)
            states[name] = (p, s)
    sgd = samples["sgd"]
    rows = {
        name: {
            "step_seconds": statistics.median(t),
            "step_over_sgd": statistics.median(a / b for a, b in zip(t, sgd, strict=True)),
        }
        for name, t in samples.items()
    }
    target = TARGETS.get(tuple(sizes))
    rows["kfac"]["target_step_over_sgd"] = target
    rows["kfac"]["within_target"] = target is not None and rows["kfac"]["step_over_sgd"] <= target
    return {"model": list(sizes), "batch_size": batch_size, "optimizers": rows}


def phase_functions(apply_fn, loss, params, data, key, input_factor_rank, output_factor_rank):
    """K-FAC's three phases as jitted functions — the statistics pass folded into the averages
    ``(state, params, data, key)``, the inverse refresh ``(state)`` and the application
    A⁻¹ V G⁻¹ ``(state, grads)`` — and a state after one of each (λ = 1e-3)."""
    pre = preconditioners.kfac(
        statistics_every=1,
        inverse_every=1,
        input_factor_rank=input_factor_rank,
        output_factor_rank=output_factor_rank,
    )
    state = pre.init(params)

    def statistics_pass(state, params, data, key):
        sketches = kronecker.sketches(state)
        stats, registered, _ = kronecker.statistics(
            apply_fn, loss, params, data, key=key, sketches=sketches
        )
        return kronecker.update(state, stats, 1e-3, registered, ema_decay=0.95, refresh=False)

    stats_fn = jax.jit(statistics_pass)
    state = stats_fn(state, params, data, key)
    registered = (True,) * len(state.factors.a)
    inverse_fn = jax.jit(lambda st, r=registered: kronecker.refresh_inverses(st, 1e-3, r, True))
    state = inverse_fn(state)
    apply_inv = jax.jit(lambda st, g, r=registered: kronecker.apply_inverse(st, 1e-3, r, g))
    return stats_fn, inverse_fn, apply_inv, state


def bench_phases(sizes, batch_size, repeats: int) -> dict:
    """Each phase of a K-FAC step ÷ an SGD step, and their amortised sum: with the default
    rank-32 inverses of the wide factors and with exact ones (the statistics are the same pass)."""
    params, apply_fn, data, loss = setup(sizes, batch_size)
    key = jax.random.PRNGKey(2)
    sgd = optax.sgd(0.1)
    sgd_step = jax.jit(training.make_step(sgd, apply_fn, loss))
    sgd_state = sgd.init(params)
    grads = jax.grad(lambda p: loss.mean(apply_fn(p, data[0]), data[1]))(params)
    grad_fn = jax.jit(jax.value_and_grad(lambda p, d: loss.mean(apply_fn(p, d[0]), d[1])))
    forward_fn = jax.jit(lambda p, d: loss.mean(apply_fn(p, d[0]), d[1]))
    phases = {
        "sgd_step": lambda: sgd_step(params, sgd_state, data, key),
        "gradient": lambda: grad_fn(params, data),
        "forward": lambda: forward_fn(params, data),
    }
    variants = {
        "default": (defaults.KFAC_INPUT_FACTOR_RANK, defaults.KFAC_OUTPUT_FACTOR_RANK),
        "exact": (None, None),
    }
    for name, (rank_a, rank_g) in variants.items():
        stats_fn, inverse_fn, apply_inv, state = phase_functions(
            apply_fn, loss, params, data, key, rank_a, rank_g
        )
        phases[f"statistics_{name}"] = partial(stats_fn, state, params, data, key)
        phases[f"inverses_{name}"] = partial(inverse_fn, state)
        phases[f"application_{name}"] = partial(apply_inv, state, grads)
    seconds = {name: median_seconds(fn, repeats=repeats) for name, fn in phases.items()}
    ratio = {name: t / seconds["sgd_step"] for name, t in seconds.items()}
    every_s, every_i = defaults.KFAC_STATISTICS_EVERY, defaults.KFAC_INVERSE_EVERY
    amortised = {
        name: ratio["gradient"]
        + ratio[f"application_{name}"]
        + ratio[f"statistics_{name}"] / every_s
        + ratio[f"inverses_{name}"] / every_i
        for name in variants
    }
    return {
        "model": list(sizes),
        "batch_size": batch_size,
        "phase_over_sgd": ratio,
        "amortised_sum_over_sgd": amortised,
        "statistics_every": every_s,
        "inverse_every": every_i,
        "factor_ranks": {name: list(ranks) for name, ranks in variants.items()},
    }


def bench_cg(damping: float, tol: float, maxiter: int, num_probes: int) -> dict:
    params, apply_fn, data, loss = setup(SIZES, BATCH_SIZE)
    candidates = {
        "none": None,
        "martens_diagonal": preconditioners.martens_diagonal(),
        "exact_ggn_diagonal": preconditioners.exact_diagonal(),
        "hutchinson_diagonal": preconditioners.hutchinson_diagonal(num_probes=num_probes),
        "kfac": preconditioners.kfac(),
    }

    def solve(pre):
        @jax.jit
        def run(params, data, key):
            op = curvature.ggn(apply_fn, loss, params, data)
            apply_inverse = None
            if pre is not None:
                m, _ = pre.update(
                    pre.init(params),
                    params,
                    data,
                    apply_fn=apply_fn,
                    loss=loss,
                    damping=damping,
                    key=key,
                )
                apply_inverse = m.inverse()
            res = solvers.cg(
                curvature.damped(op, damping).mv,
                op.gradient(),
                maxiter=maxiter,
                tol=tol,
                preconditioner=apply_inverse,
            )
            return res.iterations, res.status, res.residual_norm / optax.tree.norm(op.gradient())

        return run(params, data, jax.random.PRNGKey(3))

    rows = {}
    for name, pre in candidates.items():
        iterations, status, rel = solve(pre)
        rows[name] = {
            "iterations": int(iterations),
            "status": solvers.STATUS_NAMES[int(status)],
            "relative_residual": float(rel),
        }
    return {"damping": damping, "tol": tol, "maxiter": maxiter, "preconditioners": rows}


def run(quick: bool = False) -> dict:
    models = MODELS[:1] if quick else MODELS
    rounds, period = (2, 10) if quick else (7, PERIOD)
    return {
        "benchmark": "kfac",
        "dtype": "float32",
        "note": "step times interleaved in one process; per-round ratios to SGD, medians",
        "steps": [bench_steps(sizes, b, rounds, period) for sizes, b in models],
        "phases": [bench_phases(sizes, b, 5 if quick else 15) for sizes, b in models],
        "cg": [
            bench_cg(d, tol=1e-4, maxiter=300 if quick else 1000, num_probes=10)
            for d in (1e-3, 1e-1)
        ],
        "machine": machine(),
    }


def _show(payload: dict):
    for block in payload["steps"]:
        yield f"  MLP {block['model']} batch {block['batch_size']}:"
        for name, row in block["optimizers"].items():
            ms, ratio = 1e3 * row["step_seconds"], row["step_over_sgd"]
            yield f"    {name:26s} {ms:7.2f} ms  step/sgd {ratio:5.2f}"
    for block in payload["phases"]:
        parts = ", ".join(f"{k} {v:.2f}" for k, v in block["phase_over_sgd"].items())
        yield f"  phases ÷ sgd, MLP {block['model']}: {parts}"
        sums = ", ".join(f"{k} {v:.2f}" for k, v in block["amortised_sum_over_sgd"].items())
        yield f"    amortised sum (rank-32 wide factors vs exact): {sums}"
    for block in payload["cg"]:
        yield f"  CG to tol {block['tol']:g} at damping {block['damping']:g}:"
        for name, row in block["preconditioners"].items():
            yield f"    {name:20s} {row['iterations']:5d} iterations ({row['status']})"


def main(argv=None) -> dict:
    return command(argv, __doc__, "kfac", run, _show)


if __name__ == "__main__":
    main()
