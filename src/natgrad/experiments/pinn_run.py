r"""Optimisers on a PINN workload, one wall-clock budget each: the runs behind ``natgrad pinn``.

Every optimiser is a jitted step ``(params, state) -> (params, state, loss)``; `run` calls it until
the budget (seconds of stepping, compilation and evaluation excluded) or `max_steps` is used, and
records (step, seconds, loss, relative L² error) on a roughly geometric schedule. Optimisers run
one after another, never concurrently, so each gets the same machine.

The lineup (``OPTIMIZERS``):

* ``engd-dense``: energy natural gradient = Gauss-Newton on the residuals (Müller & Zeinhofer 2023):
  d = (JᵀJ/B + λI)⁻¹ g solved exactly by ``natgrad.dense`` (Woodbury when there are fewer
  residuals than parameters), then the paper's line search: α = argmin_{α ∈ {2⁻ᵏ: k = 0..29}}
  L(θ − αd), all 30 trial losses in one vmapped pass (no step if none is below L(θ)).
  λ = 1e-10 fixed: measured on poisson2d (tanh 2-32-32-1, 300 steps), λ = 1e-8 stalls at a
  relative error of 2.5e-6, λ = L(θ) (Levenberg) at 1.6e-4, λ = 1e-12 breaks the Cholesky
  factorisation of RRᵀ + λI (RRᵀ is numerically singular), λ = 1e-10 reaches 4e-7.
* ``ngd-dense``: the same solve through the public API, ``natgrad.natural_gradient(residual_fn,
  squared_error(), curvature="ggn", solver="dense", step_rule="line_search", damping=1e-10)``
  (Armijo backtracking from α = 1 instead of the paper's grid; rising steps rejected).
* ``ngd-cg``: ``natgrad.natural_gradient`` with the GGN, 200 CG iterations, the quadratic-model
  step and Levenberg-Marquardt damping allowed down to 1e-10 (the classification defaults, a
  KL trust region and λ ≥ 1e-2, cap the accuracy of a regression to zero residual).
* ``hessian-free``: ``natgrad.hessian_free`` (GGN, Martens preconditioner, Armijo backtracking),
  200 CG iterations, LM damping from 1 down to 1e-10 (its default floor 0.5 is for mini-batches).
* ``adam-<lr>``, ``gd-<lr>``: optax.adam / optax.sgd at each learning rate of a small grid.
* ``lbfgs``: ``optax.lbfgs()`` (zoom line search).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

import natgrad
from natgrad import dense
from natgrad.experiments import training
from natgrad.experiments.pinn import Workload, relative_l2

__all__ = [
    "LINE_SEARCH_GRID",
    "OPTIMIZERS",
    "THRESHOLDS",
    "Stepper",
    "engd_dense",
    "make_stepper",
    "optimizer_names",
    "run",
    "time_to",
]

PyTree = Any
THRESHOLDS = (1e-3, 1e-4, 1e-5, 1e-6, 1e-7)
LINE_SEARCH_GRID = tuple(0.5**k for k in range(30))
OPTIMIZERS = ("engd-dense", "ngd-dense", "ngd-cg", "hessian-free", "adam", "lbfgs", "gd")
ENGD_DAMPING = 1e-10
ADAM_LRS = (1e-3, 3e-3, 1e-2)
GD_LRS = (1e-4, 1e-3)


class Stepper(NamedTuple):
    init: Callable[[PyTree], Any]
    step: Callable[[PyTree, Any], tuple[PyTree, Any, jax.Array]]  # jitted
    hyper: dict[str, Any]


def _mean_loss(work: Workload) -> Callable[[PyTree], jax.Array]:
    loss = natgrad.losses.squared_error()
    inputs, targets = work.batch
    return lambda p: loss.mean(work.apply_fn(p, inputs), targets)


def _stepper(work: Workload, opt, hyper) -> Stepper:
    """The jitted full-batch `training.make_step` of `opt` (natgrad's get the batch)."""
    step = training.make_step(opt, work.apply_fn, natgrad.losses.squared_error())
    return Stepper(opt.init, jax.jit(lambda p, s: step(p, s, work.batch, None)), hyper)


def _lbfgs(work: Workload) -> Stepper:
    loss_fn = _mean_loss(work)
    opt = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(loss_fn)

    def step(params, state):
        value, grads = value_and_grad(params, state=state)
        updates, state = opt.update(grads, state, params, value=value, grad=grads, value_fn=loss_fn)
        return optax.apply_updates(params, updates), state, value

    return Stepper(opt.init, jax.jit(step), {"memory_size": 10, "linesearch": "zoom"})


def engd_dense(work: Workload, *, damping: float = ENGD_DAMPING, method: str = "auto") -> Stepper:
    """ENGD with an exact (dense / Woodbury) Gauss-Newton solve and the log-grid line search."""
    loss = natgrad.losses.squared_error()
    loss_fn = _mean_loss(work)
    grid = jnp.asarray(LINE_SEARCH_GRID)

    def step(params, state):
        value, grads = jax.value_and_grad(loss_fn)(params)
        d, _ = dense.dense_direction(
            "ggn", work.apply_fn, loss, params, work.batch, grads, damping, method=method
        )

        def moved(alpha):
            return jax.tree.map(lambda p, v: p - alpha * v, params, d)

        trials = jax.vmap(lambda a: loss_fn(moved(a)))(grid)
        trials = jnp.where(jnp.isfinite(trials), trials, jnp.inf)
        # Guard: no finite trial below the current loss (say a failed factorisation) -> stay.
        alpha = jnp.where(jnp.min(trials) < value, grid[jnp.argmin(trials)], 0.0)
        return moved(alpha), state, value

    hyper = {"damping": damping, "method": method, "line_search": "2^-k, k=0..29"}
    return Stepper(lambda p: (), jax.jit(step), hyper)


def optimizer_names(names: Sequence[str], adam_lrs=ADAM_LRS, gd_lrs=GD_LRS) -> list[str]:
    """Expand "adam" and "gd" into one entry per learning rate; check the names."""
    out = []
    for name in names:
        if name == "adam":
            out += [f"adam-{lr:g}" for lr in adam_lrs]
        elif name == "gd":
            out += [f"gd-{lr:g}" for lr in gd_lrs]
        elif name in OPTIMIZERS:
            out.append(name)
        else:
            raise ValueError(f"optimizers: expected names from {OPTIMIZERS}, got {name!r}")
    return out


def make_stepper(name: str, work: Workload) -> Stepper:
    """The optimiser called `name` (from `optimizer_names`) on `work`."""
    ng, lm = natgrad.natural_gradient, natgrad.damping.levenberg_marquardt
    # name: (factory, hyperparameters, Levenberg-Marquardt damping (λ₀, floor) or None)
    natgrads = {
        "ngd-dense": (
            ng,
            {"curvature": "ggn", "solver": "dense", "step_rule": "line_search"},
            None,
        ),
        "ngd-cg": (
            ng,
            {"curvature": "ggn", "maxiter": 200, "step_rule": "quadratic"},
            (1e-3, 1e-10),
        ),
        "hessian-free": (natgrad.hessian_free, {"maxiter": 200}, (1.0, 1e-10)),
    }
    if name == "engd-dense":
        return engd_dense(work)
    if name in natgrads:
        factory, hyper, rule = natgrads[name]
        damping = ENGD_DAMPING if rule is None else lm(rule[0], min_damping=rule[1])
        opt = factory(work.apply_fn, natgrad.losses.squared_error(), damping=damping, **hyper)
        shown = f"levenberg_marquardt({rule[0]:g}, min_damping={rule[1]:g})" if rule else damping
        return _stepper(work, opt, hyper | {"damping": shown})
    if name == "lbfgs":
        return _lbfgs(work)
    family, _, lr = name.partition("-")
    if family in ("adam", "gd") and lr:
        rate = float(lr)
        opt = optax.adam(rate) if family == "adam" else optax.sgd(rate)
        return _stepper(work, opt, {"learning_rate": rate})
    raise ValueError(f"optimizer: unknown name {name!r}")


def run(
    stepper: Stepper,
    work: Workload,
    *,
    budget_seconds: float,
    max_steps: int = 1_000_000,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Step until `budget_seconds` of stepping or `max_steps`; the curve and summary."""
    error_of = jax.jit(lambda p: relative_l2(p, work.problem, work.test))
    params = work.params
    state = stepper.init(params)
    start = time.perf_counter()
    jax.block_until_ready(stepper.step(params, state))  # compile (the result is discarded)
    compile_seconds = time.perf_counter() - start
    curve = [{"step": 0, "seconds": 0.0, "loss": math.nan, "rel_l2": float(error_of(params))}]
    elapsed, step, next_eval, last_eval = 0.0, 0, 1, 0.0
    status = "budget"
    while step < max_steps:
        t0 = time.perf_counter()
        params, state, value = stepper.step(params, state)
        jax.block_until_ready(params)
        elapsed += time.perf_counter() - t0
        step += 1
        done = elapsed >= budget_seconds or step >= max_steps
        if not math.isfinite(float(value)):
            status = "diverged"
            done = True
        if done or step >= next_eval or elapsed - last_eval >= budget_seconds / 50:
            err = float(error_of(params))
            curve.append({"step": step, "seconds": elapsed, "loss": float(value), "rel_l2": err})
            next_eval, last_eval = max(step + 1, math.ceil(step * 1.1)), elapsed
            if log is not None and (done or len(curve) % 10 == 0):
                log(f"  step {step:6d}  {elapsed:7.1f}s  loss {float(value):.3e}  err {err:.3e}")
        if done:
            break
    if step >= max_steps:
        status = "max_steps"
    finite = [c["rel_l2"] for c in curve if math.isfinite(c["rel_l2"])]
    return {
        "hyper": stepper.hyper,
        "status": status,
        "steps": step,
        "train_seconds": elapsed,
        "compile_seconds": compile_seconds,
        "final_rel_l2": curve[-1]["rel_l2"],
        "best_rel_l2": min(finite) if finite else math.nan,
        "time_to_seconds": {f"{t:g}": time_to(curve, t) for t in THRESHOLDS},
        "curve": curve,
    }


def time_to(curve: Sequence[dict[str, float]], threshold: float) -> float | None:
    """Seconds of stepping until the recorded error first is ≤ `threshold` (None if never)."""
    for point in curve:
        if point["rel_l2"] <= threshold:
            return point["seconds"]
    return None
