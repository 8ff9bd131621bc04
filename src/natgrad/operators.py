r"""Linear operators on parameter pytrees: one protocol for every matrix natgrad uses.

An `Operator` is a symmetric linear map v ↦ A v on pytrees shaped like `params`, never formed:

    op.mv(v)  (or op(v))   the product A v
    op.to_dense()          the n×n matrix in `ravel_pytree(params)` order (tests, small models)
    a + b,  α · a          sums and scalings are operators again
    damped(op, λ)          A + λI (Tikhonov damping by composition, not by a flag)
    op.inverse()           A⁻¹ as an operator, where the operator knows it (diagonals, K-FAC blocks)
    op.psd                 the tag "A is positive semi-definite" (Gauss-Newton, Fisher: yes;
                           the Hessian: no), which the KL step rule reads

Curvature operators (`natgrad.curvature`), damped operators, diagonal and Kronecker
preconditioners (`natgrad.preconditioners`) are all Operators, so `natgrad.solvers.cg`, the step
rules and `natgrad.diagnostics` accept any of them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from natgrad import _tree

__all__ = ["Operator", "identity", "damped", "diagonal", "as_matvec"]

PyTree = Any


class Operator:
    """A symmetric linear map on pytrees shaped like `params`.

    Args:
      mv: v ↦ A v.
      params: a pytree with the shapes and dtypes of the vectors A acts on.
      inverse: v ↦ A⁻¹ v when it is known cheaply, else None.
      psd: whether A is known to be positive semi-definite.
    """

    def __init__(
        self,
        mv: Callable[[PyTree], PyTree],
        params: PyTree,
        *,
        inverse: Callable[[PyTree], PyTree] | None = None,
        psd: bool = False,
    ):
        self._mv = mv
        self._inverse = inverse
        self.params = params
        self.psd = psd

    def mv(self, v: PyTree) -> PyTree:
        """The product of the operator with `v` (a pytree shaped like params)."""
        return self._mv(v)

    __call__ = mv

    def inverse(self) -> Operator:
        """A⁻¹ as an operator; ValueError when this operator has no cheap inverse."""
        if self._inverse is None:
            raise ValueError(
                f"inverse: this {type(self).__name__} has no cheap inverse; solve with "
                "natgrad.solvers.cg"
            )
        return Operator(self._inverse, self.params, inverse=self._mv, psd=self.psd)

    def to_dense(self) -> jax.Array:
        """The n×n matrix, columns in `jax.flatten_util.ravel_pytree(params)` order.

        Costs n products: for small models and tests. Compiled as one program (called eagerly,
        the n products vmapped op by op compiled each operation: 3-9x slower on small models).
        """
        flat, unravel = ravel_pytree(self.params)

        def column(e):
            return ravel_pytree(self.mv(unravel(e)))[0]

        return jax.jit(jax.vmap(column))(jnp.eye(flat.size, dtype=flat.dtype)).T

    def __add__(self, other: Operator) -> Operator:
        if not isinstance(other, Operator):
            return NotImplemented
        return Operator(
            lambda v: _tree.add(self.mv(v), other.mv(v)), self.params, psd=self.psd and other.psd
        )

    def __mul__(self, alpha) -> Operator:
        if isinstance(alpha, Operator):
            return NotImplemented
        return Operator(lambda v: _tree.scale(alpha, self.mv(v)), self.params)

    __rmul__ = __mul__


def identity(params: PyTree) -> Operator:
    """The identity on pytrees shaped like `params`."""
    return Operator(lambda v: v, params, inverse=lambda v: v, psd=True)


def damped(op: Operator, damping) -> Operator:
    """op + damping · I (Tikhonov damping); `damping` may be a traced scalar ≥ 0."""
    out = op + damping * identity(op.params)
    out.psd = op.psd
    return out


def diagonal(d: PyTree) -> Operator:
    """v ↦ d ⊙ v leafwise, with inverse v ↦ v / d (d > 0 where the inverse is used)."""
    return Operator(
        lambda v: jax.tree.map(lambda a, s: a * s.astype(a.dtype), v, d),
        d,
        inverse=lambda v: jax.tree.map(lambda a, s: a / s.astype(a.dtype), v, d),
        psd=True,
    )


def as_matvec(a: Operator | Callable[[PyTree], PyTree]) -> Callable[[PyTree], PyTree]:
    """The product v ↦ A v of an Operator or of a plain callable."""
    return a.mv if isinstance(a, Operator) else a
