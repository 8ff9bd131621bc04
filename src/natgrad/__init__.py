"""natgrad: natural-gradient and Hessian-free optimisation for JAX, as optax transformations."""

from natgrad import (
    curvature,
    damping,
    dense,
    diagnostics,
    kronecker,
    layers,
    losses,
    operators,
    optimizers,
    preconditioners,
    sharding,
    solvers,
    step_rules,
)
from natgrad.optimizers import (
    HessianFreeState,
    KFACState,
    NaturalGradientState,
    State,
    hessian_free,
    kfac,
    natural_gradient,
)

__all__ = [
    "curvature",
    "damping",
    "dense",
    "diagnostics",
    "kronecker",
    "layers",
    "operators",
    "optimizers",
    "step_rules",
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
    "State",
]
__version__ = "0.1.0"
