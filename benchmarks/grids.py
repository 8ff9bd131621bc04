"""The optimisers of the time-to-target benchmark and the grid of each one's main knob.

Each optimiser runs every value of a small grid of one hyperparameter, the same values on every
model of a task: the learning rate of SGD+momentum and Adam, the KL radius δ of natural gradient
and K-FAC (with the KL trust region δ sets the step size), the initial damping λ₀ of Hessian-free
(then adapted by Levenberg-Marquardt). Every other hyperparameter is its factory's default, except
the few `Grid.fixed` lists; the JSON records all of it (`grid_record`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import optax

import natgrad

__all__ = ["MOMENTUM", "VALUES", "Grid", "grids", "grid_record", "hessian_free_lm"]

MOMENTUM = 0.9  # SGD's heavy-ball momentum


def hessian_free_lm(apply_fn, loss, min_damping: float):
    """Hessian-free with its default Levenberg-Marquardt damping (λ₀ = 1) floored at
    `min_damping` (default floor: `natgrad.optimizers.defaults.HESSIAN_FREE_MIN_DAMPING`)."""
    rule = natgrad.damping.levenberg_marquardt(max(1.0, min_damping), min_damping=min_damping)
    return natgrad.hessian_free(apply_fn, loss, damping=rule)


class Grid(NamedTuple):
    """One optimiser's grid: ``factory(**fixed, knob=value)`` (optax) or
    ``factory(apply_fn, loss, **fixed, knob=value)`` (natgrad, whose update takes batch=/key=);
    every hyperparameter not in `fixed` is the factory's default."""

    name: str
    factory: Callable[..., optax.GradientTransformation]
    knob: str
    values: tuple[float, ...]  # the first value is the one --quick uses
    fixed: dict[str, Any]
    takes_model: bool

    def build(self, value: float, apply_fn, loss) -> optax.GradientTransformation:
        kwargs = {**self.fixed, self.knob: value}
        if self.takes_model:
            return self.factory(apply_fn, loss, **kwargs)
        return self.factory(**kwargs)


# The grids; the first value of each is the one --quick runs. Chosen from short runs on
# Fashion-MNIST at batch 128 (δ = 1e-3 is natural_gradient's default); the autoencoder's δ is
# ~1000× the classifier's since its output KL sums over 784 Bernoulli pixels (SGD+momentum
# diverges there at lr 1e-2). Hessian-free's knob is its damping floor (default 0.5).
VALUES = {
    "classifier": {
        "sgd": (0.03, 0.01, 0.1),
        "adam": (1e-3, 3e-4, 3e-3),
        "kl_radius": (1e-4, 3e-4, 1e-3),
        "min_damping": (0.5, 0.1, 1.0),
    },
    "autoencoder": {
        "sgd": (1e-3, 3e-4, 3e-3),
        "adam": (1e-3, 3e-4, 3e-3),
        "kl_radius": (0.1, 0.03, 0.3),
        "min_damping": (0.5, 0.1, 1.0),
    },
}


def grids(task: str) -> list[Grid]:
    """Every optimiser of `task` ("classifier" or "autoencoder") with its grid.

    The natural-gradient variants are those of `natgrad.curvature` that differ here: the GGN is
    the Fisher for softmax and Bernoulli outputs (so "ngd-fisher" is natural gradient with the
    GGN too), and the indefinite Hessian is Newton-CG rather than natural gradient. The sampled
    curvatures get the fixed damping 1e-2 of the experiments' lineup. The autoencoder runs
    SGD+momentum, Adam, natural gradient, Hessian-free and K-FAC.
    K-FAC runs natural gradient's grid of δ.
    """
    if task not in VALUES:
        raise ValueError(f"task: expected one of {tuple(VALUES)}, got {task!r}")
    values = VALUES[task]
    ng, kl = natgrad.natural_gradient, values["kl_radius"]
    specs = [
        Grid("sgd", optax.sgd, "learning_rate", values["sgd"], {"momentum": MOMENTUM}, False),
        Grid("adam", optax.adam, "learning_rate", values["adam"], {}, False),
        Grid("ngd-fisher", ng, "kl_radius", kl, {}, True),
    ]
    if task == "classifier":
        specs += [
            Grid("ngd-empirical", ng, "kl_radius", kl, {"curvature": "empirical_fisher"}, True),
            Grid(
                "ngd-fisher-mc",
                ng,
                "kl_radius",
                kl,
                {"curvature": "fisher_mc", "damping": 1e-2},
                True,
            ),
        ]
    return specs + [
        Grid("hessian-free", hessian_free_lm, "min_damping", values["min_damping"], {}, True),
        Grid("kfac", natgrad.kfac, "kl_radius", kl, {}, True),
    ]


def grid_record(specs: Sequence[Grid]) -> dict[str, dict[str, Any]]:
    """The grids as run: per optimiser its knob, its values and the hyperparameters fixed here."""
    return {
        g.name: {
            "knob": g.knob,
            "values": list(g.values),
            "fixed": {
                k: v if isinstance(v, int | float | str) else repr(v) for k, v in g.fixed.items()
            },
            "factory": getattr(g.factory, "__qualname__", repr(g.factory)),
        }
        for g in specs
    }
