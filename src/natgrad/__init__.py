"""natgrad: natural-gradient and Hessian-free optimisation for JAX, as optax transformations."""

from natgrad import curvature, losses, solvers

__all__ = ["curvature", "losses", "solvers"]
__version__ = "0.1.0"
