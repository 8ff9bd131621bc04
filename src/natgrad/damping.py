r"""Damping rules: how λ in (C + λI) d = g changes from step to step.

A rule is a `DampingRule(initial, update, needs_rho)`: the optimiser keeps λ in its state, starts
from `initial` and after each accepted step sets λ ← update(λ, ρ), where

    ρ = (f(θ + p) − f(θ)) / (q(p) − q(0)),   q(p) − q(0) = gᵀp + ½ pᵀCp,

is the reduction ratio: the actual change of the loss over the change the quadratic model
predicted. ρ ≈ 1 means the model is trustworthy and λ may shrink; ρ small or negative means the
step went too far and λ must grow. Rules with `needs_rho=False` spare the optimiser the extra
forward pass that computing f(θ + p) costs.

After a rejected step (anything non-finite) the optimiser multiplies λ by `REJECT_FACTOR`
whatever the rule, so repeated failures escalate.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import jax.numpy as jnp

__all__ = ["DampingRule", "fixed", "levenberg_marquardt", "as_rule", "REJECT_FACTOR"]

REJECT_FACTOR = 10.0  # λ ← 10 λ after a non-finite step (a strong, quickly undone push)

# Levenberg-Marquardt constants of Martens (2010, §4.1) and Martens & Sutskever (2012, §8.5).
LM_LOWER, LM_UPPER = 0.25, 0.75  # ρ < ¼: grow λ;  ρ > ¾: shrink λ
LM_INCREASE, LM_DECREASE = 3.0 / 2.0, 2.0 / 3.0


class DampingRule(NamedTuple):
    """`initial` λ; `update(λ, ρ) -> λ'`; `needs_rho` says whether `update` reads ρ."""

    initial: float
    update: Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray]
    needs_rho: bool


def _check_damping(name: str, value: float) -> float:
    value = float(value)
    if not (value >= 0 and math.isfinite(value)):
        raise ValueError(f"{name}: expected a finite damping >= 0, got {value}")
    return value


def fixed(value: float) -> DampingRule:
    """λ stays at `value` (after a rejected step it is raised for the next step only)."""
    value = _check_damping("damping", value)
    return DampingRule(value, lambda lam, rho: jnp.full_like(lam, value), needs_rho=False)


def levenberg_marquardt(
    initial: float = 1.0,
    *,
    increase: float = LM_INCREASE,
    decrease: float = LM_DECREASE,
    lower: float = LM_LOWER,
    upper: float = LM_UPPER,
    min_damping: float = 1e-8,
    max_damping: float = 1e8,
) -> DampingRule:
    """Levenberg-Marquardt: ρ < lower → λ·increase; ρ > upper → λ·decrease; clipped to bounds.

    A non-finite or increasing loss gives ρ = −∞ (the optimiser's convention), so λ grows.
    """
    initial = _check_damping("initial", initial)
    if not (increase > 1 and 0 < decrease < 1):
        raise ValueError(
            f"increase/decrease: expected increase > 1 > decrease > 0, got {increase}, {decrease}"
        )
    if not lower < upper:
        raise ValueError(f"lower/upper: expected lower < upper, got {lower}, {upper}")

    def update(lam, rho):
        lam = jnp.where(rho < lower, lam * increase, jnp.where(rho > upper, lam * decrease, lam))
        return jnp.clip(lam, min_damping, max_damping)

    return DampingRule(initial, update, needs_rho=True)


def as_rule(damping: float | DampingRule) -> DampingRule:
    """A float becomes `fixed(damping)`; a rule passes through."""
    if isinstance(damping, DampingRule):
        return damping
    if isinstance(damping, int | float):
        return fixed(damping)
    raise ValueError(
        f"damping: expected a float >= 0 or a natgrad.damping rule, got {type(damping).__name__}"
    )
