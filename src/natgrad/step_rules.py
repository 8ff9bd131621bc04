r"""Step rules: how far to move along the search direction s.

The optimiser moves by p = −α s. A rule sees the quantities of the step (`StepQuantities`):
the learning rate lr at this step (a float or an optax schedule's value), gᵀs, sᵀQs and
sᵀ(Q + λI)s for the curvature Q of the direction's quadratic model, sᵀFs for the Fisher F, the
loss f₀ before the step and `trial(α)` = f(θ − α s) (one forward pass per call). It returns α,
whether the step is allowed, and f(θ − α s) if it evaluated it (so ρ needs no second pass):

* `fixed()`:          α = lr.
* `quadratic()`:      α = min(lr, gᵀs / sᵀ(Q + λI)s), the minimiser of the damped quadratic model
                      along s; refused when sᵀ(Q + λI)s ≤ 0 (no minimiser: Q indefinite along s)
                      or gᵀs ≤ 0 (s is no descent direction).
* `kl(radius)`:       α = min(lr, sqrt(2δ / sᵀFs)). The KL between the model's output
                      distributions before and after the step is ½ α² sᵀFs to second order, so
                      this keeps it at most δ (TRPO's rule, Schulman et al. 2015).
* `line_search(...)`: the largest α = lr · shrinkᵏ, k ≤ max_steps, with the Armijo condition
                      f(θ − α s) ≤ f₀ − c α gᵀs (Martens & Sutskever 2012, §8.8); refused when
                      none passes.

Strings name them for convenience: ``"fixed" | "quadratic" | "kl" | "line_search"``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

__all__ = [
    "StepQuantities",
    "StepRule",
    "fixed",
    "quadratic",
    "kl",
    "line_search",
    "resolve",
    "STEP_RULES",
]

STEP_RULES = ("fixed", "quadratic", "kl", "line_search")

ARMIJO_C = 1e-2  # sufficient-decrease constant (Martens & Sutskever 2012, §8.8)
ARMIJO_SHRINK = 0.8  # step shrink factor of the line search (ibid.)
MAX_LINESEARCH = 20  # 0.8²⁰ ≈ 0.012: smaller steps are not worth a forward pass each


class StepQuantities(NamedTuple):
    """What a step rule may read; every field a scalar except `trial`."""

    lr: jax.Array  # the learning rate at this step
    gs: jax.Array  # gᵀs
    sqs: jax.Array  # sᵀQs, Q the curvature of the quadratic model
    sas: jax.Array  # sᵀ(Q + λI)s (= sqs when Q already includes the damping)
    sfs: jax.Array  # sᵀFs, F the Fisher (the KL's curvature)
    f0: jax.Array  # the loss before the step
    trial: Callable[[jax.Array], jax.Array]  # α ↦ f(θ − α s)
    f_unit: jax.Array | None  # f(θ − s) when already known, else None


class StepRule(NamedTuple):
    """`step_size(q) -> (α, allowed, f(θ − α s) or None)`."""

    name: str
    step_size: Callable[[StepQuantities], tuple[jax.Array, jax.Array, jax.Array | None]]


def _positive(name: str, value, *, allow_zero: bool = False) -> float:
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    ok = ok and math.isfinite(value) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name}: expected a finite number {bound}, got {value!r}")
    return float(value)


def fixed() -> StepRule:
    """α = lr."""
    return StepRule("fixed", lambda q: (q.lr, jnp.asarray(True), None))


def quadratic() -> StepRule:
    """α = min(lr, gᵀs / sᵀ(Q + λI)s), clipped at 0; refused without a positive curvature."""

    def step_size(q):
        ok = (q.sas > 0) & (q.gs > 0)
        return jnp.clip(q.gs / jnp.where(q.sas > 0, q.sas, 1.0), 0.0, q.lr), ok, None

    return StepRule("quadratic", step_size)


def kl(radius: float = 1e-3) -> StepRule:
    """α = min(lr, sqrt(2δ / sᵀFs)), δ = `radius`; α = lr when sᵀFs = 0 (s leaves the outputs
    unchanged)."""
    radius = _positive("kl_radius", radius)

    def step_size(q):
        safe = jnp.where(q.sfs > 0, q.sfs, 1.0)
        alpha = jnp.where(q.sfs > 0, jnp.minimum(q.lr, jnp.sqrt(2 * radius / safe)), q.lr)
        return alpha, jnp.asarray(True), None

    return StepRule("kl", step_size)


def line_search(
    c: float = ARMIJO_C, shrink: float = ARMIJO_SHRINK, max_steps: int = MAX_LINESEARCH
) -> StepRule:
    """Backtracking Armijo line search from α = lr, shrinking by `shrink` at most `max_steps`
    times; refused when no α passes (or gᵀs ≤ 0)."""
    c = _positive("armijo_c", c, allow_zero=True)
    if not (isinstance(shrink, int | float) and 0 < shrink < 1):
        raise ValueError(f"armijo_shrink: expected 0 < armijo_shrink < 1, got {shrink!r}")
    if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 0:
        raise ValueError(f"max_linesearch: expected an integer >= 0, got {max_steps!r}")

    def step_size(q):
        def armijo(alpha, f_alpha):
            return (f_alpha <= q.f0 - c * alpha * q.gs) & jnp.isfinite(f_alpha) & (q.gs > 0)

        alpha0 = jnp.asarray(q.lr, q.f0.dtype)
        # One loop, one forward pass in it (one copy of the model in the compiled program):
        # its first trip evaluates f(θ − α₀ s) unless that is known (f(θ − s) from Hessian-free's
        # backtracking, when α₀ = 1); every later trip shrinks α and evaluates again.
        if q.f_unit is None:
            pending, f_start = jnp.asarray(True), jnp.asarray(jnp.inf, q.f0.dtype)
        else:
            pending, f_start = alpha0 != 1, jnp.asarray(q.f_unit, q.f0.dtype)

        def cond(s):
            k, alpha, f_alpha, pending = s
            return pending | ((k < max_steps) & ~armijo(alpha, f_alpha))

        def body(s):
            k, alpha, _, pending = s
            alpha = jnp.where(pending, alpha, alpha * shrink)
            return jnp.where(pending, k, k + 1), alpha, q.trial(alpha), jnp.asarray(False)

        _, alpha, f_alpha, _ = lax.while_loop(cond, body, (jnp.int32(0), alpha0, f_start, pending))
        return alpha, armijo(alpha, f_alpha), f_alpha

    return StepRule("line_search", step_size)


def resolve(step_rule: str | StepRule, *, kl_radius: float = 1e-3) -> StepRule:
    """A `StepRule` from its name (``kl`` uses `kl_radius`) or the rule itself."""
    if isinstance(step_rule, StepRule):
        return step_rule
    if step_rule == "fixed":
        return fixed()
    if step_rule == "quadratic":
        return quadratic()
    if step_rule == "kl":
        return kl(kl_radius)
    if step_rule == "line_search":
        return line_search()
    raise ValueError(
        f"step_rule: expected one of {STEP_RULES} or a natgrad.step_rules.StepRule, "
        f"got {step_rule!r}"
    )
