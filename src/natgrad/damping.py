r"""Damping rules: how λ in (C + λI) d = g changes from step to step, always within bounds.

A rule is a `DampingRule(initial, update, needs_rho, min_damping, max_damping)`: the optimiser
keeps λ in its state, starts from `initial` and after each accepted step sets λ ← update(λ, ρ),
where

    ρ = (f(θ + p) − f(θ)) / (q(p) − q(0)),   q(p) − q(0) = gᵀp + ½ pᵀCp,

is the reduction ratio: the actual change of the loss over the change the quadratic model
predicted. ρ ≈ 1 means the model is trustworthy and λ may shrink; ρ small or negative means the
step went too far and λ must grow. Rules with `needs_rho=False` spare the optimiser the extra
forward pass that computing f(θ + p) costs.

After a rejected step (a non-finite direction or trial loss, or a rise the step rule forbids)
the optimiser sets λ ← `rule.reject(λ)` = min(λ · `REJECT_FACTOR`, max_damping): repeated
failures escalate, but never past `max_damping`, and the rule brings λ back down once good steps
return. A batch whose gradient or loss is itself non-finite says nothing about λ and leaves it
unchanged. So λ ∈ [min_damping, max_damping] on every path.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import jax.numpy as jnp

__all__ = [
    "DampingRule",
    "fixed",
    "levenberg_marquardt",
    "as_rule",
    "REJECT_FACTOR",
    "MAX_DAMPING",
]

REJECT_FACTOR = 10.0  # λ ← 10 λ after a rejected step (a strong, quickly undone push)
# λ's ceiling: at 1e6 the step is (g / λ) to 1e-6 relative accuracy, a tiny gradient step, and
# Levenberg-Marquardt (× 2/3 per good step) comes back from it to 1e-2 in ~45 steps.
MAX_DAMPING = 1e6

# Levenberg-Marquardt constants of Martens (2010, §4.1) and Martens & Sutskever (2012, §8.5).
LM_LOWER, LM_UPPER = 0.25, 0.75  # ρ < ¼: grow λ;  ρ > ¾: shrink λ
LM_INCREASE, LM_DECREASE = 3.0 / 2.0, 2.0 / 3.0


class DampingRule(NamedTuple):
    """`initial` λ; `update(λ, ρ) -> λ'`; `needs_rho` says whether `update` reads ρ; λ stays in
    [`min_damping`, `max_damping`]."""

    initial: float
    update: Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray]
    needs_rho: bool
    min_damping: float = 0.0
    max_damping: float = MAX_DAMPING

    def reject(self, damping: jnp.ndarray) -> jnp.ndarray:
        """λ after a rejected step: × REJECT_FACTOR, at least min_damping, at most max_damping."""
        grown = jnp.maximum(damping * REJECT_FACTOR, self.min_damping)
        return jnp.clip(grown, self.min_damping, self.max_damping).astype(damping.dtype)


def _check_damping(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name}: expected a finite damping >= 0, got {value!r}")
    value = float(value)
    if not (value >= 0 and math.isfinite(value)):
        raise ValueError(f"{name}: expected a finite damping >= 0, got {value}")
    return value


def fixed(value: float, *, max_damping: float = MAX_DAMPING) -> DampingRule:
    """λ stays at `value`; after a rejected step it is raised (at most to `max_damping`) for the
    next step only."""
    value = _check_damping("damping", value)
    ceiling = max(value, _check_damping("max_damping", max_damping))
    return DampingRule(
        value,
        lambda lam, rho: jnp.full_like(lam, value),
        needs_rho=False,
        min_damping=value,
        max_damping=ceiling,
    )


def levenberg_marquardt(
    initial: float = 1.0,
    *,
    increase: float = LM_INCREASE,
    decrease: float = LM_DECREASE,
    lower: float = LM_LOWER,
    upper: float = LM_UPPER,
    min_damping: float = 1e-8,
    max_damping: float = MAX_DAMPING,
) -> DampingRule:
    """Levenberg-Marquardt: ρ < lower → λ·increase; ρ > upper → λ·decrease; clipped to bounds.

    A non-finite or increasing loss gives ρ = −∞ (the optimiser's convention), so λ grows.
    """
    initial = _check_damping("initial", initial)
    min_damping = _check_damping("min_damping", min_damping)
    max_damping = _check_damping("max_damping", max_damping)
    if not min_damping <= max_damping:
        raise ValueError(
            f"min_damping/max_damping: expected min_damping <= max_damping, "
            f"got {min_damping}, {max_damping}"
        )
    if not min_damping <= initial <= max_damping:
        raise ValueError(
            f"initial: expected a damping within [min_damping, max_damping] = "
            f"[{min_damping}, {max_damping}], got {initial}"
        )
    for name, value in (("increase", increase), ("decrease", decrease)):
        if not isinstance(value, int | float) or not math.isfinite(value):
            raise ValueError(f"{name}: expected a finite number, got {value!r}")
    if not (increase > 1 and 0 < decrease < 1):
        raise ValueError(
            f"increase/decrease: expected increase > 1 > decrease > 0, got {increase}, {decrease}"
        )
    if not lower < upper:
        raise ValueError(f"lower/upper: expected lower < upper, got {lower}, {upper}")

    def update(lam, rho):
        lam = jnp.where(rho < lower, lam * increase, jnp.where(rho > upper, lam * decrease, lam))
        return jnp.clip(lam, min_damping, max_damping)

    return DampingRule(initial, update, True, min_damping, max_damping)


def as_rule(damping: float | DampingRule) -> DampingRule:
    """A float becomes `fixed(damping)`; a rule passes through."""
    if isinstance(damping, DampingRule):
        return damping
    if isinstance(damping, int | float) and not isinstance(damping, bool):
        return fixed(damping)
    raise ValueError(
        f"damping: expected a float >= 0 or a natgrad.damping rule, got {type(damping).__name__}"
    )
