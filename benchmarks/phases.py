r"""Where a step goes: each natgrad optimiser's default step split into its phases, ms and %.

MLP 784-128-10 at batch 128 of real digits (mnist-5k's first 3,200 training images, which
natgrad's demo uses, 25 batches in turn), float32, one process. A sample is `LENGTH`
consecutive training steps (`natgrad.experiments.training.make_step`: the caller's
`value_and_grad`, `update`, `apply_updates`) in one jitted `lax.scan`, from a state that already
ran one such chain, so a sample holds exactly one of K-FAC's inverse refreshes and `LENGTH / 5`
of its statistics passes. There is no per-call dispatch in a scan, so a step's ratio to an SGD
step runs higher here than in `benchmarks.steps` (one dispatched call a step, as issue 14's
targets are stated).

The phases come from a ladder of variants, each rung taking one part away from the one before:

natural gradient, Hessian-free   default (k̄ CG iterations, the mean over the sample)
                                 → 1 iteration → no warm start → no preconditioner
                                 → a fixed step and damping, no rejection check.
  CG = k̄ · (T_default − T_1 iteration) / (k̄ − 1); each later rung's part = T_before − T_rung;
  the caller's gradient and update = an `optax.sgd` step; the linearization and the
  bookkeeping = T_last − T_sgd − one iteration. Hessian-free's CG includes its backtracking over
  the saved iterates (forward passes), its step rule is the Armijo line search.
K-FAC                            default → no inverse refresh → no statistics pass.
  inverses, statistics = the differences; the application A⁻¹ V G⁻¹ is timed on its own (as in
  `benchmarks.kfac`); the rest (KL step size, finiteness, bookkeeping) = T_last − T_sgd −
  application.

The parts sum to the default step by construction. Every variant and the SGD step take turns
(interleaved rounds, one sample each per round); the phases are formed within each round and
their medians reported, each in ms, ÷ the SGD step and as a % of the default step. Besides the
defaults, the same ladders for the old defaults on today's code — those of 2026-12-02, when issue
14 asked for cheaper steps (natural gradient: 10 CG iterations, no preconditioner; K-FAC:
statistics every step, inverses every 5, every factor exact, every example in the statistics) —
so a run shows what the defaults' changes bought.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from jax import lax

import natgrad
from benchmarks import kfac as kfac_bench
from benchmarks.timing import applied, command, machine, median_seconds
from natgrad.experiments import data as data_lib
from natgrad.experiments import models, training

SIZES = (784, 128, 10)
BATCH_SIZE = 128
LENGTH = 50  # steps per sample: one of K-FAC's inverse periods
NUM_BATCHES = 25  # distinct batches the steps cycle through
NEVER = 10**9  # a period that does not come round again within a sample

SGD = "gradient and update (an optax.sgd step)"
BOOKKEEPING = "linearization, state, bookkeeping"
CG = "CG iterations"


def cg_ladder(make: Callable, base: dict, removals: list[tuple[str, dict]]) -> list:
    """[(part removed, optimiser)]: the default, then 1 iteration, then each removal in turn."""
    rungs = [(None, make(**base)), ("1 iteration", make(**{**base, "maxiter": 1}))]
    options = {**base, "maxiter": 1}
    for part, change in removals:
        options = {**options, **change}
        rungs.append((part, make(**options)))
    return rungs


def ladders(apply_fn, loss) -> dict[str, dict]:
    ng = lambda **kw: natgrad.natural_gradient(apply_fn, loss, **kw)  # noqa: E731
    hf = lambda **kw: natgrad.hessian_free(apply_fn, loss, **kw)  # noqa: E731
    kf = lambda **kw: natgrad.kfac(apply_fn, loss, **kw)  # noqa: E731
    warm = ("the warm start's product", {"warm_start": 0.0})
    pre = ("Martens' diagonal (its pass, M⁻¹ in the iteration)", {"preconditioner": None})
    fixed = {"step_rule": "fixed", "learning_rate": 0.1, "reject_rises": False}
    ng_rule = ("KL step size, LM's ρ forward pass, rejection check", {**fixed, "damping": 1e-2})
    hf_rule = ("line search, LM's ρ, rejection check", {**fixed, "damping": 1.0})
    old_kfac = {
        "statistics_every": 1,
        "inverse_every": 5,
        "input_factor_rank": None,
        "output_factor_rank": None,
        "curvature_batch": None,
    }
    return {
        "natural_gradient": {"kind": "cg", "rungs": cg_ladder(ng, {}, [warm, pre, ng_rule])},
        "natural_gradient, old defaults (10 plain CG iterations)": {
            "kind": "cg",
            "rungs": cg_ladder(ng, {"maxiter": 10, "preconditioner": None}, [warm, ng_rule]),
        },
        "hessian_free": {"kind": "cg", "rungs": cg_ladder(hf, {}, [warm, pre, hf_rule])},
        "kfac": {"kind": "kfac", "ranks": ("auto", "auto"), "rungs": kfac_ladder(kf, {})},
        "kfac, old defaults (statistics every step, inverses every 5, exact factors)": {
            "kind": "kfac",
            "ranks": (None, None),
            "rungs": kfac_ladder(kf, old_kfac),
        },
    }


def kfac_ladder(make: Callable, base: dict) -> list:
    no_inverses = {**base, "inverse_every": NEVER}
    no_statistics = {**no_inverses, "statistics_every": NEVER}
    return [
        (None, make(**base)),
        ("inverse refresh (amortised)", make(**no_inverses)),
        ("statistics pass (amortised)", make(**no_statistics)),
    ]


def chain(opt, apply_fn, loss, batch_size):
    """jit: `LENGTH` steps from (params, state) in a `lax.scan`, step i on the (i mod n)-th batch
    of `batch_size` of the n stacked in `data`; returns the final parameters, state, and the CG
    iterations of each step (0 for an optimiser without CG)."""
    step = training.make_step(opt, apply_fn, loss)

    @jax.jit
    def run(params, state, data, key):
        n = data[1].shape[0] // batch_size

        def body(carry, i):
            p, s = carry
            start = (i % n) * batch_size
            batch = jax.tree.map(lambda a: lax.dynamic_slice_in_dim(a, start, batch_size), data)
            p, s, _ = step(p, s, batch, jax.random.fold_in(key, i))
            return (p, s), jnp.asarray(getattr(s, "cg_iterations", 0), jnp.float32)

        (params, state), iterations = lax.scan(body, (params, state), jnp.arange(LENGTH))
        return params, state, iterations

    return run


def application_chain(apply_inverse):
    """jit: K-FAC's application `LENGTH` times in a loop (`benchmarks.timing.applied`), as a
    sample of the steps is `LENGTH` steps in a scan."""
    return jax.jit(lambda state, grads: applied(lambda v: apply_inverse(state, v), grads, LENGTH))


def digits_problem():
    """(params, apply_fn, data, loss): `natgrad.experiments.models.mlp` of `SIZES` (He init from
    PRNGKey(0)) and the first `NUM_BATCHES` × `BATCH_SIZE` training digits of mnist-5k with their
    labels. Real digits in changing batches rather than `benchmarks.timing.setup`'s one batch of
    random labels: CG's iteration counts (Martens' stopping rule, LM's damping) depend on them,
    and a model trained on one batch over and over soon fits it."""
    model = models.mlp(SIZES)
    images = data_lib.load_mnist_5k()
    n = NUM_BATCHES * BATCH_SIZE
    batch = (jnp.asarray(images.x_train[:n], jnp.float32), jnp.asarray(images.y_train[:n]))
    return model.init(jax.random.PRNGKey(0)), model.apply, batch, model.loss


def bench(repeats: int, names=None, problem=None, batch_size: int = BATCH_SIZE) -> dict:
    """The ladders of `names` (all by default) on `problem` (default `digits_problem()`), its
    data taken `batch_size` examples a step."""
    params, apply_fn, data, loss = digits_problem() if problem is None else problem
    first = jax.tree.map(lambda a: a[:batch_size], data)
    key = jax.random.PRNGKey(2)
    all_ladders = {n: v for n, v in ladders(apply_fn, loss).items() if not names or n in names}
    samples: dict = {}
    runs, warm, iterations = {}, {}, {}

    def prepare(label, opt):
        run = chain(opt, apply_fn, loss, batch_size)
        p, s, _ = run(params, opt.init(params), data, key)  # compile, and one chain to warm up
        _, _, its = jax.block_until_ready(run(p, s, data, key))  # what each sample will run
        runs[label], warm[label], samples[label] = run, (p, s), []
        return float(jnp.mean(its))

    sgd_opt = optax.sgd(0.01)
    prepare("sgd", sgd_opt)
    for name, ladder in all_ladders.items():
        for i, (_, opt) in enumerate(ladder["rungs"]):
            k = prepare((name, i), opt)
            if i == 0:
                iterations[name] = k
    # K-FAC's application on its own, with the factor ranks of each K-FAC ladder.
    grads = jax.grad(lambda p: loss.mean(apply_fn(p, first[0]), first[1]))(params)
    applications = {}
    for name, ladder in all_ladders.items():
        if ladder["kind"] == "kfac":
            *_, apply_inv, state = kfac_bench.phase_functions(
                apply_fn, loss, params, first, key, *ladder["ranks"]
            )
            applications[name] = (application_chain(apply_inv), state)
            jax.block_until_ready(applications[name][0](state, grads))
            samples[("application", name)] = []
    for _ in range(repeats):
        for label, run in runs.items():
            p, s = warm[label]
            samples[label].append(median_seconds(run, p, s, data, key, repeats=1, warmup=0))
        for name, (apply_inv, state) in applications.items():
            t = median_seconds(apply_inv, state, grads, repeats=1, warmup=0)
            samples[("application", name)].append(t)
    rows = {}
    for name, ladder in all_ladders.items():
        rows[name] = _phases(name, ladder, samples, iterations.get(name, 0.0), repeats)
    return {
        "model": list(SIZES),
        "batch_size": batch_size,
        "batches": int(data[1].shape[0]) // batch_size,
        "steps_per_sample": LENGTH,
        "rounds": repeats,
        "sgd_step_ms": 1e3 * statistics.median(samples["sgd"]) / LENGTH,
        "optimizers": rows,
    }


def _phases(name: str, ladder: dict, samples: dict, k: float, repeats: int) -> dict:
    """Per round: the ladder's differences; then medians, in ms per step, ÷ SGD and % of step."""
    rungs = ladder["rungs"]
    per_round = []
    for r in range(repeats):
        seconds = [samples[(name, i)][r] / LENGTH for i in range(len(rungs))]
        sgd = samples["sgd"][r] / LENGTH
        if ladder["kind"] == "cg":  # CG's iterations from the slope between k̄ and 1
            tail = (seconds[0] - seconds[1]) / max(k - 1.0, 1e-9)
            parts = {CG: k * tail}
        else:
            tail = samples[("application", name)][r] / LENGTH
            parts = {"application A⁻¹ V G⁻¹": tail}
        for i in range(1 if ladder["kind"] == "kfac" else 2, len(rungs)):
            parts[rungs[i][0]] = seconds[i - 1] - seconds[i]
        parts[SGD] = sgd
        parts[BOOKKEEPING if ladder["kind"] == "cg" else "the rest (KL step, bookkeeping)"] = (
            seconds[-1] - sgd - tail
        )
        parts["whole step"] = seconds[0]
        per_round.append(parts)
    whole = statistics.median(p["whole step"] for p in per_round)
    phases = {}
    for part in per_round[0]:
        ms = statistics.median(p[part] for p in per_round)
        over_sgd = statistics.median(p[part] / p[SGD] for p in per_round)
        share = statistics.median(p[part] / p["whole step"] for p in per_round)
        phases[part] = {"ms": 1e3 * ms, "over_sgd": over_sgd, "percent": 100 * share}
    k = k if ladder["kind"] == "cg" else None
    return {"cg_iterations": k, "step_ms": 1e3 * whole, "phases": phases}


def run(quick: bool = False) -> dict:
    return {
        "benchmark": "phases",
        "dtype": "float32",
        "note": (
            "ladders of variants, each rung one part fewer; interleaved rounds, the phases "
            "formed within each round, medians"
        ),
        **bench(3 if quick else 7),
        "machine": machine(),
    }


def _show(payload: dict):
    yield f"SGD step {payload['sgd_step_ms']:.3f} ms"
    for name, row in payload["optimizers"].items():
        k = row["cg_iterations"]
        yield f"{name}: {row['step_ms']:.2f} ms a step" + (f", {k:.1f} CG iterations" if k else "")
        for part, p in row["phases"].items():
            ms, over, pc = p["ms"], p["over_sgd"], p["percent"]
            yield f"  {part:55s} {ms:7.3f} ms  {over:5.2f}× SGD  {pc:5.1f} %"


def main(argv=None) -> dict:
    return command(argv, __doc__, "phases", run, _show)


if __name__ == "__main__":
    main()
