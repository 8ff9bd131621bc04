"""natgrad's optimisers: optax `GradientTransformationExtraArgs` taking `batch=` (and `key=`).

All three are compositions of the same parts (`_pipeline`): curvature → direction → step rule →
damping → guard, with one state layout, `State`.
"""

from natgrad.optimizers import defaults
from natgrad.optimizers._hessian_free import hessian_free
from natgrad.optimizers._kfac import kfac
from natgrad.optimizers._natural_gradient import SOLVERS, natural_gradient
from natgrad.optimizers._state import State

# One state type; the per-optimiser names are kept for readers' code.
NaturalGradientState = HessianFreeState = KFACState = State

__all__ = [
    "natural_gradient",
    "hessian_free",
    "kfac",
    "State",
    "NaturalGradientState",
    "HessianFreeState",
    "KFACState",
    "SOLVERS",
    "defaults",
]
