"""Argument checks shared by the optimiser factories: a ValueError naming the argument."""

from __future__ import annotations

import math

from natgrad.losses import Loss
from natgrad.preconditioners import Preconditioner, martens_diagonal


def loss(value) -> Loss:
    if not isinstance(value, Loss):
        raise ValueError(
            f"loss: expected a natgrad.losses loss such as softmax_cross_entropy(), "
            f"got {type(value).__name__}"
        )
    return value


def integer(name: str, value, *, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}: expected an integer >= {minimum}, got {value!r}")
    return value


def number(
    name: str,
    value,
    *,
    low: float = 0.0,
    high: float = math.inf,
    allow_low: bool = False,
    allow_high: bool = False,
) -> float:
    """A finite number in (low, high), its ends included where allowed."""
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value >= low if allow_low else value > low)
    ok = ok and (value <= high if allow_high else value < high)
    if not ok:
        left, right = "[" if allow_low else "(", "]" if allow_high else ")"
        raise ValueError(
            f"{name}: expected a finite number in {left}{low}, {high}{right}, got {value!r}"
        )
    return float(value)


def learning_rate(value):
    """A finite float > 0 or an optax schedule (any callable of the step count)."""
    if callable(value):
        return value
    return number("learning_rate", value)


def momentum(value) -> float | str:
    """μ in [0, 1), or ``"adaptive"`` (`_quadratic`)."""
    if isinstance(value, str):
        if value == "adaptive":
            return value
        raise ValueError(f"momentum: expected a number in [0, 1) or 'adaptive', got {value!r}")
    return number("momentum", value, high=1.0, allow_low=True)


def preconditioner(value) -> Preconditioner | None:
    if value is None or isinstance(value, Preconditioner):
        return value
    raise ValueError(
        f"preconditioner: expected None or a natgrad.preconditioners.Preconditioner, "
        f"got {type(value).__name__}"
    )


def cg_preconditioner(value, solver: str):
    """A CG factory's `preconditioner=`: ``"martens"`` is `martens_diagonal()` for CG and None
    for ``solver="dense"`` (an exact solve has nothing to precondition); other strings are
    refused; the rest is checked by `shared`."""
    if isinstance(value, str):
        if value != "martens":
            raise ValueError(
                f"preconditioner: expected 'martens', None or a Preconditioner, got {value!r}"
            )
        return martens_diagonal() if solver == "cg" else None
    return value


def warm_start(value) -> float:
    return number("warm_start", value, high=1.0, allow_low=True, allow_high=True)


def optional_integer(name: str, value) -> int | None:
    return None if value is None else integer(name, value)


_SHARED = {
    "learning_rate": learning_rate,
    "momentum": momentum,
    "warm_start": warm_start,
    "preconditioner": preconditioner,
    "reject_rises": bool,
    "curvature_batch": lambda v: optional_integer("curvature_batch", v),
}


def shared(*values) -> dict:
    """The `Parts` fields every CG-based factory takes the same way, in this order, checked:
    learning_rate, momentum, warm_start, preconditioner, reject_rises, curvature_batch."""
    return {name: check(v) for (name, check), v in zip(_SHARED.items(), values, strict=True)}
