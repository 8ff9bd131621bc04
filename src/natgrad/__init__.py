"""natgrad: natural-gradient and Hessian-free optimisation for JAX, as optax transformations.

The submodules and the optimisers are imported on first use (PEP 562 ``__getattr__``), so
``import natgrad`` does not import JAX until something of natgrad is used: the ``natgrad``
command answers ``--help`` and ``--version`` without it.
"""

import importlib

SUBMODULES = (
    "curvature",
    "damping",
    "dense",
    "diagnostics",
    "kronecker",
    "layers",
    "losses",
    "low_rank",
    "operators",
    "optimizers",
    "preconditioners",
    "sharding",
    "solvers",
    "step_rules",
)
# natgrad.<name> is natgrad.optimizers.<name>
OPTIMIZERS = (
    "natural_gradient",
    "NaturalGradientState",
    "hessian_free",
    "HessianFreeState",
    "kfac",
    "KFACState",
    "State",
)
__all__ = [*SUBMODULES, *OPTIMIZERS]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in SUBMODULES:
        return importlib.import_module(f"natgrad.{name}")
    if name in OPTIMIZERS:
        value = getattr(importlib.import_module("natgrad.optimizers"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'natgrad' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
