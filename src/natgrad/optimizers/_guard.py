r"""The guard: whether a step is taken, and λ for the next one.

A step is rejected when the batch is bad (its gradient or loss is non-finite), when the step is
non-finite (its direction, step size, curvature, preconditioner state or trial loss), or when it
is refused (the step rule found no acceptable α, or the trial loss rose). Then

    λ' = λ                              for a bad batch: the data, not λ, was at fault;
    λ' = rule.update(λ, ρ = −∞)         for a finite refused step, when the rule reads ρ
                                        (Levenberg-Marquardt: λ · 3/2);
    λ' = rule.reject(λ)                 otherwise (× REJECT_FACTOR, at most max_damping);

and after an accepted step λ' = rule.update(λ, ρ). λ' is clipped to the rule's bounds on
every path, so no sequence of batches drives it to 0 or ∞.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from natgrad.damping import DampingRule


def reduction_ratio(actual, predicted) -> jax.Array:
    """ρ = actual / predicted reduction; −∞ when the loss is non-finite or rose with no predicted
    rise (Martens 2010, §4.1)."""
    rho = actual / predicted
    bad = ~jnp.isfinite(actual) | ~jnp.isfinite(rho) | (predicted >= 0)
    return jnp.where(bad, -jnp.inf, rho)


def verdict(
    rule: DampingRule, damping, rho, *, bad_batch, finite, refused
) -> tuple[jax.Array, jax.Array]:
    """(accepted, λ for the next step)."""
    accepted = ~bad_batch & finite & ~refused
    if rule.needs_rho:
        on_reject = jnp.where(finite, rule.update(damping, -jnp.inf), rule.reject(damping))
    else:
        on_reject = rule.reject(damping)
    new = jnp.where(accepted, rule.update(damping, rho), jnp.where(bad_batch, damping, on_reject))
    return accepted, jnp.clip(new, rule.min_damping, rule.max_damping).astype(damping.dtype)


def judge(
    rule: DampingRule, damping, *, f0, f1, predicted, reject_rises, bad_batch, finite, allowed
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(accepted, λ for the next step, ρ) of a step whose trial loss is f1 (None: not
    evaluated, so ρ is NaN and nothing rose)."""
    if f1 is None:
        rho = jnp.asarray(jnp.nan, damping.dtype)
        rose = jnp.asarray(False)
    else:
        rho = reduction_ratio(f1 - f0, predicted).astype(damping.dtype)
        rose = (f1 > f0) if reject_rises else jnp.asarray(False)
        finite = finite & jnp.isfinite(f1)
    accepted, new = verdict(
        rule, damping, rho, bad_batch=bad_batch, finite=finite, refused=~allowed | rose
    )
    return accepted, new, rho
