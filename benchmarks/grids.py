"""The optimisers of the timed benchmarks and the grid of each one's main knob.

Each optimiser runs the values of a small grid of one hyperparameter: the learning rate of the
first-order ones, the KL radius δ of natural gradient and K-FAC (with the KL trust region δ sets
the step size), the damping floor of Hessian-free (Levenberg-Marquardt from max(1, floor)),
kfac-jax's initial damping. Every other hyperparameter is its factory's default, except the few
`Grid.fixed`; the JSON records all of it (`grid_record`).

* Time to target (`grids`, per task): SGD+momentum, Adam and natgrad's variants, every value of
  each grid run and the best per target reported.
* The 2026 lineup (`LINEUP`, `build`, `grid`): the peers and natgrad's public factories, the
  first ``grid`` values of each (3 in full mode, 1 in quick; the first value is the library
  default or the usual choice). The peers are imported only when built, so a missing package
  fails its row alone; kfac-jax runs in its own virtual environment
  (`benchmarks.peers.kfac_jax_rows`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import optax

import natgrad
from natgrad.experiments import lineup

__all__ = ["MOMENTUM", "VALUES", "Grid", "grids", "grid_record", "hessian_free_lm"]
__all__ += ["LINEUP", "KEYS", "FIXED", "grid", "build", "eval_params"]

MOMENTUM = 0.9  # SGD's heavy-ball momentum


def hessian_free_lm(apply_fn, loss, min_damping: float):
    """Hessian-free with its default Levenberg-Marquardt damping (λ₀ = 1) floored at
    `min_damping` (default floor: `natgrad.optimizers.defaults.HESSIAN_FREE_MIN_DAMPING`)."""
    rule = natgrad.damping.levenberg_marquardt(max(1.0, min_damping), min_damping=min_damping)
    return natgrad.hessian_free(apply_fn, loss, damping=rule)


class Grid(NamedTuple):
    """One optimiser's grid: ``factory(**fixed, knob=value)`` (optax) or
    ``factory(apply_fn, loss, **fixed, knob=value)`` (natgrad, whose update takes batch=/key=);
    every hyperparameter not in `fixed` is the factory's default. `autoencoder`: other values
    for the autoencoder (the lineup's; its output KL sums 784 pixels, so δ is ~100×)."""

    name: str
    factory: Callable[..., optax.GradientTransformation]
    knob: str
    values: tuple[float, ...]  # the first value is the one --quick uses
    fixed: dict[str, Any]
    takes_model: bool
    autoencoder: tuple[float, ...] | None = None

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
    """Every optimiser of the time-to-target `task` ("classifier" or "autoencoder") with its grid:
    the `natgrad compare` lineup's entries (`natgrad.experiments.lineup`: the same factories and
    fixed hyperparameters, e.g. the sampled Fisher's damping 1e-2), SGD with momentum.

    The natural-gradient variants are those of `natgrad.curvature` that differ here: the GGN is
    the Fisher for softmax and Bernoulli outputs (so "ngd-fisher" is natural gradient with the
    GGN too), and the indefinite Hessian is Newton-CG rather than natural gradient. The
    autoencoder runs SGD+momentum, Adam, natural gradient, Hessian-free and K-FAC. K-FAC runs
    natural gradient's grid of δ.
    """
    if task not in VALUES:
        raise ValueError(f"task: expected one of {tuple(VALUES)}, got {task!r}")
    values, entries = VALUES[task], lineup.registry()
    variants = ("ngd-empirical", "ngd-fisher-mc") if task == "classifier" else ()
    knobs = {"sgd": "learning_rate", "adam": "learning_rate", "hessian-free": "min_damping"}
    specs = []
    for name in ("sgd", "adam", "ngd-fisher", *variants, "hessian-free", "kfac"):
        e, knob = entries[name], knobs.get(name, "kl_radius")
        fixed = {k: v for k, v in e.chosen.items() if k != knob}
        fixed |= {"momentum": MOMENTUM} if name == "sgd" else {}
        factory = hessian_free_lm if name == "hessian-free" else e.factory
        grid = values.get(name, values.get(knob))  # SGD's and Adam's rates differ
        specs.append(Grid(name, factory, knob, grid, fixed, e.takes_model))
    return specs


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


# --------------------------------------------------------------------------------------------
# The 2026 lineup


def _muon(learning_rate):
    from optax.contrib import MuonDimensionNumbers as Dims

    def dims(params):  # 2-D weights and conv kernels (HWI→O); biases go to Adam
        return jax.tree.map(
            lambda x: {2: Dims((0,), (1,)), 4: Dims((0, 1, 2), (3,))}.get(x.ndim), params
        )

    return optax.contrib.muon(
        learning_rate, adam_learning_rate=1e-3, muon_weight_dimension_numbers=dims
    )


def _psgd_kron(learning_rate):
    import psgdax

    kron = psgdax.kron(learning_rate)  # declared ExtraArgs, but its update takes none: plain it
    return optax.GradientTransformation(kron.init, lambda g, s, p=None: kron.update(g, s, p))


def _contrib(name):
    return lambda **kwargs: getattr(optax.contrib, name)(**kwargs)


def _kfac_jax(**kwargs):
    raise ValueError("kfac-jax runs apart, in .venv-peers (benchmarks.peers.kfac_jax_rows)")


_LR, _KL = "learning_rate", "kl_radius"
_NG_KL, _AE_KL = (1e-3, 3e-4, 3e-3), (0.1, 0.03, 0.3)
LINEUP = {
    g.name: g
    for g in (
        Grid("adam", optax.adam, _LR, (1e-3, 3e-3, 3e-4), {}, False),
        Grid("sgd-momentum", optax.sgd, _LR, (0.03, 0.1, 0.01), {"momentum": 0.9}, False)._replace(
            autoencoder=(1e-3, 3e-4, 3e-3)
        ),
        Grid("nadamw", optax.nadamw, _LR, (1e-3, 3e-3, 3e-4), {}, False),
        Grid(
            "schedule-free-adamw",
            _contrib("schedule_free_adamw"),
            _LR,
            (2.5e-3, 1e-2, 1e-3),
            {},
            False,
        ),
        Grid("muon", _muon, _LR, (0.02, 0.05, 0.005), {}, False),
        Grid("psgd-kron", _psgd_kron, _LR, (1e-3, 3e-3, 3e-4), {}, False),
        Grid("kfac-jax", _kfac_jax, "initial_damping", (1.0, 0.1, 10.0), {}, False),
        Grid("natgrad-natural-gradient", natgrad.natural_gradient, _KL, _NG_KL, {}, True, _AE_KL),
        Grid("natgrad-hessian-free", hessian_free_lm, "min_damping", (0.5, 0.1, 1.0), {}, True),
        Grid("natgrad-kfac", natgrad.kfac, _KL, _NG_KL, {}, True, _AE_KL),
    )
}
KEYS = tuple(LINEUP)
# What the JSON shows as fixed, beyond the knob (the factory's other defaults are not listed).
FIXED = {
    "sgd-momentum": {"momentum": 0.9},
    "muon": {"adam_learning_rate": 1e-3, "dims": "2-D weights and conv kernels (HWI→O)"},
    "kfac-jax": {"use_adaptive_learning_rate": True, "use_adaptive_momentum": True},
    "natgrad-hessian-free": {"damping": "levenberg_marquardt(max(1, v), min_damping=v)"},
}


def grid(key: str, points: int, autoencoder: bool = False) -> tuple[str, tuple[float, ...]]:
    """(knob, values) of lineup optimiser `key`: its first `points` grid values for the task."""
    g = LINEUP[key]
    return g.knob, (g.autoencoder if autoencoder and g.autoencoder else g.values)[:points]


def build(key: str, value: float, apply_fn, loss) -> optax.GradientTransformation:
    """The lineup optimiser `key` with its knob at `value`; raises (ImportError, ...) if it
    cannot."""
    if key not in LINEUP:
        raise ValueError(f"optimizer: expected one of {KEYS}, got {key!r}")
    return LINEUP[key].build(value, apply_fn, loss)


def eval_params(key: str, params: Any, state: Any) -> Any:
    """The parameters to evaluate: schedule-free AdamW's averaged x sequence, else `params`."""
    if key == "schedule-free-adamw":
        return optax.contrib.schedule_free_eval_params(state, params)
    return params
