"""The timed training loop of the time-to-target benchmark: compiled chunks, untimed evaluation.

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
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from natgrad.experiments import training

__all__ = ["Problem", "batch_order", "eval_steps", "make_chunk", "train"]


class Problem(NamedTuple):
    """What a run trains on: the model, the training arrays, and the untimed evaluation."""

    apply_fn: Callable
    loss: Any  # a natgrad.losses loss
    init: Callable[[jax.Array], Any]  # key -> initial params
    inputs: jax.Array  # (N, features)
    targets: jax.Array  # (N,) labels, or (N, features) pixel targets for an autoencoder
    evaluate: Callable[[Any], float]  # params -> the metric (a Python float, blocks)


def batch_order(num_train: int, batch_size: int, steps: int, seed: int) -> np.ndarray:
    """Indices of each step's batch, shape (steps, batch_size), int32: a fresh seeded permutation
    per epoch, the last incomplete batch of each epoch dropped."""
    per_epoch = num_train // batch_size
    if per_epoch < 1:
        raise ValueError(f"batch_size {batch_size} is larger than the training set ({num_train})")
    rng = np.random.default_rng(seed)
    epochs = -(-steps // per_epoch)
    order = [
        rng.permutation(num_train)[: per_epoch * batch_size].reshape(per_epoch, batch_size)
        for _ in range(epochs)
    ]
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
    on ``inputs[order[s]]`` with the key ``fold_in(root, s)``; CG iterations are -1 without CG."""
    one_step = training.make_step(opt, problem.apply_fn, problem.loss)

    def run(params, state, inputs, targets, order, root, start):
        def step(carry, s):
            idx = order[s]
            batch, key = (inputs[idx], targets[idx]), jax.random.fold_in(root, s)
            params, state, value = one_step(*carry, batch, key)
            cg = training.state_stats(state, ["cg_iterations"]).get("cg_iterations", -1)
            return (params, state), (value, jnp.asarray(cg, jnp.int32))

        steps = start + jnp.arange(chunk, dtype=jnp.int32)
        (params, state), (values, cg) = lax.scan(step, (params, state), steps)
        return params, state, values, cg

    return run


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def train(
    opt: optax.GradientTransformation,
    problem: Problem,
    order: np.ndarray,
    *,
    chunk: int,
    evals: list[int],
    max_seconds: float,
    stop: Callable[[float], bool],
    seed: int,
) -> dict[str, Any]:
    """Train `opt` from the initial parameters ``problem.init(fold_in(PRNGKey(seed), 0))``.

    Runs ``len(order)`` steps (rounded down to a chunk) at most; evaluates after each step in
    `evals` and when the run stops. Stops early once the training time passes `max_seconds`
    (checked after each chunk), once ``stop(metric)`` holds, or once a batch loss is non-finite.
    Returns the run's record: the curve (step, seconds, metric, mean batch loss and CG
    iterations since the previous point) and the run's timings and stopping reason.
    """
    root = jax.random.PRNGKey(seed)
    params = problem.init(jax.random.fold_in(root, 0))
    state = opt.init(params)
    sample_root = jax.random.fold_in(root, 2)
    order_dev = jnp.asarray(order, jnp.int32)
    args = (problem.inputs, problem.targets, order_dev, sample_root)

    start = time.perf_counter()
    fn = jax.jit(make_chunk(opt, problem, chunk))
    compiled = fn.lower(params, state, *args, jnp.int32(0)).compile()
    compile_seconds = time.perf_counter() - start

    eval_seconds = 0.0

    def evaluate(p) -> float | None:
        nonlocal eval_seconds
        t0 = time.perf_counter()
        value = _finite_or_none(float(problem.evaluate(p)))
        eval_seconds += time.perf_counter() - t0
        return value

    curve: dict[str, list] = {
        "step": [0],
        "seconds": [0.0],
        "metric": [evaluate(params)],
        "batch_loss": [None],
        "cg_iterations": [None],
    }
    eval_at = set(evals)
    num_chunks = len(order) // chunk
    seconds, chunk_seconds, losses, cgs = 0.0, [], [], []
    stopped = "step_budget"
    for c in range(num_chunks):
        t0 = time.perf_counter()
        params, state, values, cg = compiled(params, state, *args, jnp.int32(c * chunk))
        jax.block_until_ready((params, state, values, cg))
        chunk_seconds.append(time.perf_counter() - t0)
        seconds += chunk_seconds[-1]
        losses.append(np.asarray(values))
        cgs.append(np.asarray(cg))
        step = (c + 1) * chunk
        diverged = not np.all(np.isfinite(losses[-1]))
        out_of_time = seconds >= max_seconds
        if not (step in eval_at or diverged or out_of_time or c == num_chunks - 1):
            continue
        metric = evaluate(params)
        batch_loss, cg_mean = float(np.mean(losses)), float(np.mean(cgs))
        curve["step"].append(step)
        curve["seconds"].append(seconds)
        curve["metric"].append(metric)
        curve["batch_loss"].append(_finite_or_none(batch_loss))
        curve["cg_iterations"].append(cg_mean if cg_mean >= 0 else None)
        losses, cgs = [], []
        if diverged or metric is None:
            stopped = "diverged"
            break
        if stop(metric):
            stopped = "target_reached"
            break
        if out_of_time:
            stopped = "time_budget"
            break
    cg_seen = [v for v in curve["cg_iterations"] if v is not None]
    return {
        "compile_seconds": compile_seconds,
        "train_seconds": seconds,
        "eval_seconds": eval_seconds,
        "steps": curve["step"][-1],
        "step_seconds_median": statistics.median(chunk_seconds) / chunk if chunk_seconds else None,
        "mean_cg_iterations": statistics.fmean(cg_seen) if cg_seen else None,
        "stopped": stopped,
        "final_state": _state_stats(state),
        "curve": curve,
    }


def _state_stats(state) -> dict[str, float | None]:
    """The scalar state fields a reader wants after a run (damping, rejected steps), if present."""
    out = {}
    for name in ("damping", "rejected_steps", "step_size"):
        value = getattr(state, name, None)
        if value is not None and jnp.ndim(value) == 0:
            out[name] = _finite_or_none(float(value))
    return out
