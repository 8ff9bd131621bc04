"""The timed training loop of the benchmarks that time training to a target (time to target and
the 2026 lineup): compiled chunks of steps, untimed evaluation.

One run trains one optimiser from fixed initial parameters on a fixed batch order:

* `chunk` training steps are one `lax.scan` in one jitted function, compiled ahead of time
  (``jax.jit(...).lower(...).compile()``) before the clock starts. The batch indices and the
  sampling keys are computed inside it from the step number, so a call moves no data.
* The clock (`time.perf_counter`, outputs blocked) runs only around these calls: compilation and
  evaluation are measured too, but apart (``compile_seconds``, ``eval_seconds``).
* The metric (test accuracy, or the loss on a fixed set of training images) is evaluated after
  the steps listed by `eval_steps`: every chunk at first, then at steps growing by a constant
  factor, so a run's curve has ~40 points whatever its length and a step count read off it is
  exact to within that factor.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from natgrad.experiments import training

__all__ = ["Problem", "batch_order", "eval_steps", "make_chunk", "timed_loop", "train"]


class Problem(NamedTuple):
    """What a run trains on: the model, the training arrays, and the untimed evaluation."""

    apply_fn: Callable
    loss: Any  # a natgrad.losses loss
    init: Callable[[jax.Array], Any]  # key -> initial params
    inputs: jax.Array  # (N, features)
    targets: jax.Array  # (N,) labels, or (N, features) pixel targets for an autoencoder
    evaluate: Callable[[Any], float]  # params -> the metric (a Python float, blocks)


def batch_order(num_train: int, batch_size: int, steps: int, seed: int) -> np.ndarray:
    """Indices of each step's batch, shape (steps, batch_size), int32: epoch after epoch of
    `natgrad.experiments.training.batch_order` (a permutation seeded (seed, epoch), the last
    incomplete batch dropped), as the `natgrad` command trains."""
    per_epoch = training.steps_per_epoch(num_train, batch_size)
    epochs = range(-(-steps // per_epoch))
    order = [training.batch_order(num_train, batch_size, seed, e) for e in epochs]
    return np.concatenate(order)[:steps].astype(np.int32)


def eval_steps(budget: int, chunk: int, growth: float) -> list[int]:
    """Steps after which the metric is evaluated: multiples of `chunk`, each at least `growth`
    times the previous one (and one chunk later), ending at `budget` rounded down to a chunk."""
    if chunk < 1 or growth <= 1:
        raise ValueError(f"expected chunk >= 1 and growth > 1, got {chunk}, {growth}")
    last = budget - budget % chunk
    steps, s = [], chunk
    while s < last:
        steps.append(s)
        s = max(s + chunk, chunk * math.ceil(s * growth / chunk))
    return steps + [last] if last > 0 else steps


def make_chunk(opt: optax.GradientTransformation, problem: Problem, chunk: int) -> Callable:
    """``run(params, state, inputs, targets, order, root, start) -> (params, state, batch_losses,
    cg_iterations)``: steps ``start, …, start + chunk − 1`` of `training.make_step`; step s trains
    on ``inputs[order[s]]`` with the key ``fold_in(root, s)``; CG iterations are -1 without CG.
    A chunk of 1 is one straight-line step (the scan unrolled): XLA's CPU convolutions run ~10×
    slower inside a loop (measured: a CNN step 1.2 s in a scan, 0.1 s alone), so CNNs use it."""
    one_step = training.make_step(opt, problem.apply_fn, problem.loss)

    def run(params, state, inputs, targets, order, root, start):
        def step(carry, s):
            idx = order[s]
            batch, key = (inputs[idx], targets[idx]), jax.random.fold_in(root, s)
            params, state, value = one_step(*carry, batch, key)
            cg = training.state_stats(state, ["cg_iterations"]).get("cg_iterations", -1)
            return (params, state), (value, jnp.asarray(cg, jnp.int32))

        steps = start + jnp.arange(chunk, dtype=jnp.int32)
        (params, state), (values, cg) = lax.scan(step, (params, state), steps, unroll=chunk == 1)
        return params, state, values, cg

    return run


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def timed_loop(
    carry, advance, evaluate, *, steps, chunk, evals, max_seconds, stop, compile_seconds
):
    """Run ``advance(carry, start) -> (carry, batch_losses, cg_iterations or None)`` chunk by
    chunk under the clock, ``len(steps) // chunk`` chunks at most; ``evaluate(carry)`` (untimed)
    at step 0, after each step in `evals` and when the run stops. Stops early once the training
    time passes `max_seconds` (checked after each chunk), once ``stop(metric)`` holds, or once a
    batch loss or the metric is non-finite (the metric is then None). Returns (the run's record:
    the curve of step, seconds, metric, mean batch loss and CG iterations since the previous
    point, the timings and the stopping reason; the final carry)."""
    eval_seconds = 0.0

    def measure(c) -> float | None:
        nonlocal eval_seconds
        t0 = time.perf_counter()
        value = _finite_or_none(float(evaluate(c)))
        eval_seconds += time.perf_counter() - t0
        return value

    curve = {"step": [0], "seconds": [0.0], "metric": [measure(carry)]}
    curve |= {"batch_loss": [None], "cg_iterations": [None]}
    num_chunks = steps // chunk
    seconds, chunk_seconds, losses, cgs, stopped = 0.0, [], [], [], "step_budget"
    for c in range(num_chunks):
        t0 = time.perf_counter()
        carry, values, cg = jax.block_until_ready(advance(carry, c * chunk))
        chunk_seconds.append(time.perf_counter() - t0)
        seconds += chunk_seconds[-1]
        losses.append(np.asarray(values))
        cgs.append(np.full(chunk, -1) if cg is None else np.asarray(cg))
        diverged = not np.all(np.isfinite(losses[-1]))
        out_of_time = seconds >= max_seconds
        if not ((c + 1) * chunk in evals or diverged or out_of_time or c == num_chunks - 1):
            continue
        metric = None if diverged else measure(carry)
        batch_loss, cg_mean = float(np.mean(losses)), float(np.mean(cgs))
        curve["step"].append((c + 1) * chunk)
        curve["seconds"].append(seconds)
        curve["metric"].append(metric)
        curve["batch_loss"].append(_finite_or_none(batch_loss))
        curve["cg_iterations"].append(cg_mean if cg_mean >= 0 else None)
        losses, cgs = [], []
        if metric is None:
            stopped = "diverged"
        elif stop(metric):
            stopped = "target_reached"
        elif out_of_time:
            stopped = "time_budget"
        if stopped != "step_budget":
            break
    cg_seen = [v for v in curve["cg_iterations"] if v is not None]
    finals = [m for m in curve["metric"] if m is not None]
    record = {
        "compile_seconds": compile_seconds,
        "train_seconds": seconds,
        "eval_seconds": eval_seconds,
        "steps": curve["step"][-1],
        "step_seconds": statistics.median(chunk_seconds) / chunk if chunk_seconds else None,
        "mean_cg_iterations": statistics.fmean(cg_seen) if cg_seen else None,
        "final_metric": finals[-1] if finals else None,
        "stopped": stopped,
        "diverged": stopped == "diverged",
        "curve": curve,
    }
    return record, carry


_COMPILED: dict = {}


def _compiled(name, build, value, traced, problem, chunk, carry, args):
    """The AOT-compiled chunk of optimiser `name` at `value` and its compile seconds, cached. A
    `traced` knob is an argument of the compiled call (one compile serves the whole grid and every
    seed: optax's factories); otherwise (natgrad's factories check their arguments in Python) one
    compile per value, reused across seeds."""
    key = (name, None if traced else value, id(problem), args[2].shape)
    if key not in _COMPILED:

        def run(v, *a):
            return make_chunk(build(v), problem, chunk)(*a)

        t0 = time.perf_counter()
        lead = (jnp.float32(value),) if traced else ()
        # The carry (params, state) is donated: XLA updates it in place rather than copying
        # what a chunk leaves unchanged (K-FAC's factors between statistics passes).
        carry_args = (len(lead), len(lead) + 1)
        fn = jax.jit(run if traced else partial(run, value), donate_argnums=carry_args)
        fn = fn.lower(*lead, *carry, *args, jnp.int32(0)).compile()
        _COMPILED[key] = (fn, time.perf_counter() - t0, problem)  # the problem keeps its id
    fn, seconds, _ = _COMPILED[key]
    return (partial(fn, jnp.float32(value)) if traced else fn), seconds


def train(
    name: str,
    build: Callable[[float], optax.GradientTransformation],
    value: float,
    problem: Problem,
    order: np.ndarray,
    *,
    chunk: int,
    evals,
    max_seconds: float,
    stop: Callable[[float], bool],
    seed: int,
    traced: bool = False,
    eval_params: Callable[[Any, Any], Any] = lambda params, state: params,
):
    """Train ``build(value)`` (optimiser `name`) from the initial parameters
    ``problem.init(fold_in(PRNGKey(seed), 0))`` on the batches `order`, with the sampling keys
    ``fold_in(fold_in(PRNGKey(seed), 2), step)``; `timed_loop` does the rest, evaluating
    ``eval_params(params, state)``. Returns (the run's record, the final optimiser state)."""
    root = jax.random.PRNGKey(seed)
    params = problem.init(jax.random.fold_in(root, 0))
    # Buffers of their own: the chunk donates them (an optax state may hold params' arrays).
    params, state = jax.tree.map(jnp.copy, (params, build(value).init(params)))
    order_dev = jnp.asarray(order, jnp.int32)
    args = (problem.inputs, problem.targets, order_dev, jax.random.fold_in(root, 2))
    fn, compile_seconds = _compiled(
        name, build, value, traced, problem, chunk, (params, state), args
    )

    def advance(carry, start):
        params, state, values, cg = fn(*carry, *args, jnp.int32(start))
        return (params, state), values, cg

    record, (_, state) = timed_loop(
        (params, state),
        advance,
        lambda c: problem.evaluate(eval_params(*c)),
        steps=len(order),
        chunk=chunk,
        evals=set(evals),
        max_seconds=max_seconds,
        stop=stop,
        compile_seconds=compile_seconds,
    )
    return record, state
