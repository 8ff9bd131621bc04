"""natgrad's optimisers: optax `GradientTransformationExtraArgs` taking `batch=` (and `key=`)."""

from natgrad.optimizers.hessian_free import HessianFreeState, hessian_free
from natgrad.optimizers.natural_gradient import STEP_RULES, NaturalGradientState, natural_gradient

__all__ = [
    "natural_gradient",
    "NaturalGradientState",
    "STEP_RULES",
    "hessian_free",
    "HessianFreeState",
]
