"""natgrad: natural-gradient and Hessian-free optimisation for JAX, as optax transformations."""

from natgrad import (
    curvature,
    damping,
    diagnostics,
    layers,
    losses,
    preconditioners,
    sharding,
    solvers,
)
from natgrad.optimizers import (
    HessianFreeState,
    NaturalGradientState,
    hessian_free,
    natural_gradient,
)
from natgrad.optimizers.kfac import KFACState, kfac

__all__ = [
    "curvature",
    "damping",
    "diagnostics",
    "layers",
    "losses",
    "preconditioners",
    "sharding",
    "solvers",
    "natural_gradient",
    "NaturalGradientState",
    "hessian_free",
    "HessianFreeState",
    "kfac",
    "KFACState",
]
__version__ = "0.1.0"
