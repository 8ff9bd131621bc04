"""The lineup: every optimiser's key, its one tuned knob and that knob's grid.

Each optimiser gets the same tuning budget: the first ``grid`` values of its list (3 in full
mode, 1 in quick; the first value is the library default or the usual choice). Everything else
is the factory's default except `FIXED`. natgrad's rows call the public factories
(`natgrad.natural_gradient`, `natgrad.hessian_free`, `natgrad.kfac`) with their defaults plus
the knob. The peers are imported only when built, so a missing package fails its row alone.
kfac-jax runs in its own virtual environment (`benchmarks.peers.kfac_jax_rows`).
"""

from __future__ import annotations

from typing import Any

import jax
import optax

import natgrad

__all__ = ["KEYS", "FIXED", "TRACEABLE", "grid", "build", "eval_params"]

# Factories that accept a traced knob (so one compiled step serves the whole grid).
TRACEABLE = ("adam", "sgd-momentum", "nadamw", "schedule-free-adamw", "muon", "psgd-kron")
# knob, values (classifiers), values (autoencoder: its output KL sums 784 pixels, so δ is ~100×)
GRIDS = {
    "adam": ("learning_rate", (1e-3, 3e-3, 3e-4), None),
    "sgd-momentum": ("learning_rate", (0.03, 0.1, 0.01), (1e-3, 3e-4, 3e-3)),
    "nadamw": ("learning_rate", (1e-3, 3e-3, 3e-4), None),
    "schedule-free-adamw": ("learning_rate", (2.5e-3, 1e-2, 1e-3), None),
    "muon": ("learning_rate", (0.02, 0.05, 0.005), None),
    "psgd-kron": ("learning_rate", (1e-3, 3e-3, 3e-4), None),
    "kfac-jax": ("initial_damping", (1.0, 0.1, 10.0), None),
    "natgrad-natural-gradient": ("kl_radius", (1e-3, 3e-4, 3e-3), (0.1, 0.03, 0.3)),
    "natgrad-hessian-free": ("min_damping", (0.5, 0.1, 1.0), None),
    "natgrad-kfac": ("kl_radius", (1e-3, 3e-4, 3e-3), (0.1, 0.03, 0.3)),
}
KEYS = tuple(GRIDS)
FIXED = {
    "sgd-momentum": {"momentum": 0.9},
    "muon": {"adam_learning_rate": 1e-3, "dims": "2-D weights and conv kernels (HWI→O)"},
    "kfac-jax": {"use_adaptive_learning_rate": True, "use_adaptive_momentum": True},
    "natgrad-hessian-free": {"damping": "levenberg_marquardt(max(1, v), min_damping=v)"},
}


def grid(key: str, points: int, autoencoder: bool = False) -> tuple[str, tuple[float, ...]]:
    """(knob, values) of `key`: its first `points` grid values for the task."""
    knob, values, ae_values = GRIDS[key]
    return knob, (ae_values if autoencoder and ae_values else values)[:points]


def _muon_dims(params):
    from optax.contrib import MuonDimensionNumbers as Dims

    def dims(x):
        return {2: Dims((0,), (1,)), 4: Dims((0, 1, 2), (3,))}.get(x.ndim)

    return jax.tree.map(dims, params)


def build(key: str, value: float, apply_fn, loss) -> optax.GradientTransformation:
    """The optimiser `key` with its knob at `value`; raises (ImportError, ...) if it cannot."""
    if key == "adam":
        return optax.adam(value)
    if key == "sgd-momentum":
        return optax.sgd(value, momentum=0.9)
    if key == "nadamw":
        return optax.nadamw(value)
    if key == "schedule-free-adamw":
        return optax.contrib.schedule_free_adamw(value)
    if key == "muon":
        dims = _muon_dims
        return optax.contrib.muon(
            value, adam_learning_rate=1e-3, muon_weight_dimension_numbers=dims
        )
    if key == "psgd-kron":
        import psgdax

        kron = psgdax.kron(value)  # declared ExtraArgs, but its update takes none: plain it
        return optax.GradientTransformation(kron.init, lambda g, s, p=None: kron.update(g, s, p))
    if key == "natgrad-natural-gradient":
        return natgrad.natural_gradient(apply_fn, loss, kl_radius=value)
    if key == "natgrad-hessian-free":
        rule = natgrad.damping.levenberg_marquardt(max(1.0, value), min_damping=value)
        return natgrad.hessian_free(apply_fn, loss, damping=rule)
    if key == "natgrad-kfac":
        return natgrad.kfac(apply_fn, loss, kl_radius=value)
    raise ValueError(f"optimizer: expected one of {KEYS} (kfac-jax runs apart), got {key!r}")


def eval_params(key: str, params: Any, state: Any) -> Any:
    """The parameters to evaluate: schedule-free AdamW's averaged x sequence, else `params`."""
    if key == "schedule-free-adamw":
        return optax.contrib.schedule_free_eval_params(state, params)
    return params
