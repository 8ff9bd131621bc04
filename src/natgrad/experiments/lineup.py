"""The optimizer lineup: name -> factory with every default hyperparameter in the open.

Each entry's hyperparameters are its factory's keyword arguments with their defaults, read from
the factory's signature, overlaid by the few the experiment chooses (the learning rates of SGD and
Adam, the curvature and damping of the natural-gradient variants). `natgrad lineup` prints them;
results.json records them; ``--set NAME.KEY=VALUE`` overrides any of them for one optimizer.
This module is also the `natgrad lineup` command (`run`).

``damping=None`` is the library default: Levenberg-Marquardt adaptation (natgrad.damping). A
number means a fixed λ.
"""

from __future__ import annotations

import inspect
import json
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import natgrad

if TYPE_CHECKING:
    import optax

__all__ = [
    "Entry",
    "Optimizer",
    "LineupError",
    "registry",
    "default_lineup",
    "parse_override",
    "resolve",
    "build",
    "HELP",
    "add_arguments",
    "run",
]

HELP = "list the optimizers and their default hyperparameters"

# Arguments the runner supplies itself: they are not hyperparameters.
_MODEL_ARGS = ("apply_fn", "loss")


class LineupError(ValueError):
    """A user's choice of optimizers or hyperparameters that cannot be used (one line)."""


@dataclass(frozen=True)
class Entry:
    """One optimizer of the lineup.

    `factory` is called as ``factory(apply_fn, loss, **hyper)`` when `takes_model` (natgrad's
    optimizers, whose ``update`` needs ``batch=`` and ``key=``) else ``factory(**hyper)`` (optax).
    """

    name: str
    factory: Callable[..., optax.GradientTransformation]
    chosen: Mapping[str, Any]
    takes_model: bool
    summary: str

    def defaults(self) -> dict[str, Any]:
        """Every hyperparameter with its default: the signature's, then the experiment's."""
        hyper = {}
        for p in inspect.signature(self.factory).parameters.values():
            if p.name in _MODEL_ARGS or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                continue
            if p.name in self.chosen:
                hyper[p.name] = self.chosen[p.name]
            elif p.default is not p.empty:
                hyper[p.name] = p.default
        return hyper | dict(self.chosen)


class Optimizer(NamedTuple):
    """A built optimizer of the lineup with the hyperparameters it was built with."""

    name: str
    transform: optax.GradientTransformation
    hyperparameters: dict[str, Any]


def registry() -> dict[str, Entry]:
    """Every optimizer the experiments know, in the order of the default lineup."""
    import optax

    entries = [
        Entry("sgd", optax.sgd, {"learning_rate": 0.1}, False, "plain SGD"),
        Entry("adam", optax.adam, {"learning_rate": 1e-3}, False, "Adam"),
        Entry(
            "ngd-empirical",
            natgrad.natural_gradient,
            {"curvature": "empirical_fisher"},
            True,
            "NGD, empirical Fisher (1/B) Σ g_i g_iᵀ",
        ),
        Entry(
            "ngd-fisher-mc",
            natgrad.natural_gradient,
            # Measured: the 1-sample Monte-Carlo Fisher needs more damping than LM's floor.
            {"curvature": "fisher_mc", "damping": 1e-2},
            True,
            "NGD, Fisher from one sampled target per example",
        ),
        Entry(
            "ngd-fisher",
            natgrad.natural_gradient,
            {},
            True,
            "NGD, exact Fisher, KL trust region, LM damping",
        ),
        Entry("hessian-free", natgrad.hessian_free, {}, True, "Martens' Hessian-free"),
        Entry("kfac", natgrad.kfac, {}, True, "K-FAC"),
    ]
    return {e.name: e for e in entries}


def default_lineup() -> tuple[str, ...]:
    """The optimizers `natgrad compare` runs by default: all of them."""
    return tuple(registry())


def check_names(names: Iterable[str]) -> tuple[str, ...]:
    """`names` in order, without repeats; LineupError naming an unknown one and the choices."""
    known = registry()
    out: list[str] = []
    for name in names:
        if name not in known:
            raise LineupError(f"unknown optimizer {name!r}; choose from {', '.join(known)}")
        if name not in out:
            out.append(name)
    if not out:
        raise LineupError(f"no optimizer given; choose from {', '.join(known)}")
    return tuple(out)


def parse_value(text: str) -> Any:
    """'true'/'false' -> bool, 'none'/'null' -> None, ints, floats, anything else a string."""
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_override(text: str) -> tuple[str, str, Any]:
    """``"NAME.KEY=VALUE"`` -> (NAME, KEY, parsed VALUE)."""
    left, sep, value = text.partition("=")
    name, dot, key = left.strip().partition(".")
    if not (sep and dot and name and key.strip()):
        raise LineupError(f"--set {text!r}: expected OPTIMIZER.HYPERPARAMETER=VALUE")
    return name, key.strip(), parse_value(value)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _coerce(name: str, key: str, default: Any, value: Any) -> Any:
    """`value` for a hyperparameter whose default is `default`; LineupError on a wrong kind.

    Hyperparameters whose default is None accept anything: the factory checks them.
    """
    if isinstance(default, bool) and not isinstance(value, bool):
        raise LineupError(f"--set {name}.{key}: expected true or false, got {value!r}")
    if _is_number(default) and not _is_number(value):
        raise LineupError(f"--set {name}.{key}: expected a number, got {value!r}")
    # optax's factories check nothing: a NaN, infinite or non-positive rate would train on.
    if _is_number(value) and not math.isfinite(value):
        raise LineupError(f"--set {name}.{key}: expected a finite number, got {value!r}")
    if key == "learning_rate" and _is_number(value) and value <= 0:
        raise LineupError(f"--set {name}.{key}: expected a number > 0, got {value!r}")
    # An integer given for a float hyperparameter ("1" for a learning rate) means that float.
    if isinstance(default, float) and isinstance(value, int):
        return float(value)
    return value


def resolve(
    names: Iterable[str], overrides: Iterable[tuple[str, str, Any]] = ()
) -> dict[str, dict[str, Any]]:
    """Hyperparameters of each optimizer in `names`: its defaults with `overrides` applied.

    Raises LineupError for an unknown optimizer, an override of an optimizer not in `names`, or
    an unknown hyperparameter (naming the known ones).
    """
    names = check_names(names)
    known = registry()
    hyper = {name: known[name].defaults() for name in names}
    for name, key, value in overrides:
        if name not in known:
            raise LineupError(f"--set: unknown optimizer {name!r}; choose from {', '.join(known)}")
        if name not in hyper:
            raise LineupError(f"--set: optimizer {name!r} is not in this run ({', '.join(names)})")
        if key not in hyper[name]:
            raise LineupError(
                f"--set: unknown hyperparameter {key!r} for {name}; "
                f"choose from {', '.join(hyper[name])}"
            )
        hyper[name][key] = _coerce(name, key, hyper[name][key], value)
    return hyper


def build(name: str, hyper: Mapping[str, Any], model) -> Optimizer:
    """The optimizer `name` with hyperparameters `hyper` for `model` (a `models.Model`)."""
    entry = registry()[name]
    try:
        if entry.takes_model:
            transform = entry.factory(model.apply, model.loss, **hyper)
        else:
            transform = entry.factory(**hyper)
    except (TypeError, ValueError) as err:
        raise LineupError(f"{name}: {err}") from None
    return Optimizer(name, transform, dict(hyper))


def add_arguments(p) -> None:
    """`natgrad lineup` takes no options."""


def run(args) -> int:
    """`natgrad lineup`: print every optimizer with its hyperparameters."""
    for name, entry in registry().items():
        hyper = json.dumps(entry.defaults(), default=repr)
        print(f"{name:14} {entry.summary}\n{'':14} {hyper}")
    return 0
