r"""Conjugate gradient built for optimisation, over pytrees, jit-able.

``cg`` solves A x = b for a symmetric A given only as a product ``matvec(v)``, by minimising the
quadratic φ(x) = ½ xᵀAx − bᵀx. Preconditioned CG (Nocedal & Wright, Alg. 5.3), with M⁻¹ given
as ``preconditioner(r)``:

    r₀ = b − A x₀,  y₀ = M⁻¹ r₀,  p₀ = y₀
    α_i = r_iᵀ y_i / p_iᵀ A p_i
    x_{i+1} = x_i + α_i p_i,  r_{i+1} = r_i − α_i A p_i,  y_{i+1} = M⁻¹ r_{i+1}
    β_i = r_{i+1}ᵀ y_{i+1} / r_iᵀ y_i,  p_{i+1} = y_{i+1} + β_i p_i

φ costs no extra product: with A x = b − r, φ(x) = −½ xᵀ(b + r).

What optimisation adds (Martens 2010, "Deep learning via Hessian-free optimization", §4.4–4.6):

* warm start from ``x0`` (the decayed previous solution);
* Martens' stopping rule on relative progress of φ: stop at iteration i when i > k, φ(x_i) < 0
  and (φ(x_i) − φ(x_{i−k})) / φ(x_i) < kε, with k = max(10, ⌈0.1 i⌉) and ε = 5·10⁻⁴;
* exit on non-positive curvature pᵀAp ≤ 0 (A is not positive definite along p), returning the
  last good iterate, flagged (so does a non-finite pᵀAp); a non-finite φ or rᵀM⁻¹r after an
  update (overflow, a failing preconditioner) ends with status ``nonfinite`` and that update's
  iterate, which callers must not use (natgrad's optimisers reject the step);
* the iterates at i = ⌈5·1.3ʲ⌉ saved for Hessian-free backtracking, plus the last one, each
  with its φ (free, as above), so that the quadratic model at the iterate backtracking keeps
  costs no product: x_jᵀA x_j = 2(φ(x_j) + bᵀx_j).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.flatten_util import ravel_pytree

from natgrad import _tree
from natgrad.operators import Operator, as_matvec

__all__ = [
    "Backtracked",
    "CGResult",
    "cg",
    "cg_backtrack",
    "backtrack",
    "dense_solve",
    "save_schedule",
    "STATUS_NAMES",
]

PyTree = Any

# Why CG stopped (CGResult.status).
CONVERGED, MARTENS, MAXITER, NEGATIVE_CURVATURE, NONFINITE = range(5)
STATUS_NAMES = ("converged", "martens", "maxiter", "negative_curvature", "nonfinite")

MARTENS_EPS = 5e-4  # ε of Martens' rule (Martens 2010, §4.4)
MARTENS_MIN_K = 10  # k = max(10, ⌈0.1 i⌉) (ibid.)


class CGResult(NamedTuple):
    """The solution and why CG stopped.

    Attributes:
      x: the last good iterate (with status ``nonfinite``: the last update's, maybe not
        finite).
      iterations: CG iterations done (products with A, not counting the warm-start residual).
      status: int code, `STATUS_NAMES[status]` says why CG stopped.
      residual: r = b − A x (CG's recursively updated residual), so A x = b − r costs no
        product.
      residual_norm: ‖r‖.
      phi: φ(x) = ½ xᵀAx − bᵀx.
      saved: iterates at `saved_steps` (leading axis per leaf), or None if not requested.
      saved_steps: iteration index of each saved slot, −1 where unused; the last used slot
        always holds the final x.
      saved_phi: φ of each saved iterate (NaN where unused), or None.
    """

    x: PyTree
    iterations: jax.Array
    status: jax.Array
    residual: PyTree
    residual_norm: jax.Array
    phi: jax.Array
    saved: PyTree | None
    saved_steps: jax.Array | None
    saved_phi: jax.Array | None = None


class Backtracked(NamedTuple):
    """What `cg_backtrack` returns.

    Attributes:
      result: CG's `CGResult` (with saved iterates).
      d: the saved iterate backtracking kept.
      kept_iteration: the CG iteration d is from.
      loss: ``loss_of(d)``.
      phi: φ(d) = ½ dᵀA d − bᵀd, so dᵀA d = 2(φ + bᵀd) with no product.
    """

    result: CGResult
    d: PyTree
    kept_iteration: jax.Array
    loss: jax.Array
    phi: jax.Array


def _phi(x, b, r) -> jax.Array:
    """φ(x) = ½ xᵀAx − bᵀx = −½ xᵀ(b + r), with r = b − Ax."""
    return -0.5 * _tree.vdot(x, _tree.add(b, r))


def save_schedule(maxiter: int) -> tuple[int, ...]:
    """Iterations ⌈5·1.3ʲ⌉ ≤ maxiter (Martens 2010, §4.6) at which iterates are saved."""
    steps, j = [], 0
    while (i := math.ceil(5 * 1.3**j)) <= maxiter:
        if not steps or i != steps[-1]:
            steps.append(i)
        j += 1
    return tuple(steps)


class _State(NamedTuple):
    i: jax.Array
    setup: jax.Array  # the warm start's set-up trip (r₀, y₀) is next
    x: PyTree
    r: PyTree
    p: PyTree
    ry: jax.Array
    phi_hist: jax.Array
    status: jax.Array
    done: jax.Array
    saved: PyTree | None
    saved_steps: jax.Array | None


def cg(
    matvec: Operator | Callable[[PyTree], PyTree],
    b: PyTree,
    *,
    x0: PyTree | None = None,
    maxiter: int = 50,
    tol: float = 1e-5,
    atol: float = 0.0,
    preconditioner: Operator | Callable[[PyTree], PyTree] | None = None,
    martens_stop: bool = False,
    save_iterates: bool = False,
) -> CGResult:
    """Preconditioned conjugate gradient for A x = b, A symmetric (positive definite).

    Args:
      matvec: A as a `natgrad.operators.Operator` (e.g. `damped(op, λ)`) or v ↦ A v on pytrees
        shaped like `b`.
      b: right-hand side.
      x0: warm start (default zeros).
      maxiter: at most this many iterations (a Python int ≥ 1).
      tol, atol: stop when ‖r‖ ≤ max(tol·‖b‖, atol).
      preconditioner: M⁻¹ as an Operator (e.g. ``m.inverse()``) or r ↦ M⁻¹ r, M symmetric
        positive definite.
      martens_stop: also stop by Martens' relative-progress rule on φ.
      save_iterates: keep the iterates at `save_schedule(maxiter)` and the last one.

    Returns:
      A `CGResult`. Under `jax.jit` everything but `maxiter`, `martens_stop` and
      `save_iterates` may be traced.
    """
    res, unravel = _run(
        matvec,
        b,
        x0=x0,
        maxiter=maxiter,
        tol=tol,
        atol=atol,
        preconditioner=preconditioner,
        martens_stop=martens_stop,
        save_iterates=save_iterates,
    )
    return _unraveled(res, unravel)


def cg_backtrack(
    matvec: Operator | Callable[[PyTree], PyTree],
    b: PyTree,
    loss_of: Callable[[PyTree], jax.Array],
    **options,
) -> Backtracked:
    """``cg(matvec, b, save_iterates=True, **options)`` followed by `backtrack` with `loss_of`.

    `options` are `cg`'s (x0, maxiter, tol, atol, preconditioner, martens_stop). Returns a
    `Backtracked`: the saved iterate d kept, the CG iteration it is from, ``loss_of(d)`` and
    φ(d). The same as the two calls, but the backtracking reads CG's saved iterates as the one
    raveled buffer CG wrote them to, not split into leaves (a copy of every saved iterate, and
    kernels, in the compiled program).
    """
    res, unravel = _run(matvec, b, save_iterates=True, **options)
    to_tree = unravel if unravel is not None else (lambda v: v)
    j, f_j = backtrack(res, lambda v: loss_of(to_tree(v)))
    d = to_tree(jax.tree.map(lambda s: s[j], res.saved))
    return Backtracked(_unraveled(res, unravel), d, res.saved_steps[j], f_j, res.saved_phi[j])


def _run(matvec, b, *, x0=None, maxiter=50, preconditioner=None, **options):
    """`_cg` on `b` raveled when its leaves share a dtype; the result and the unravel (or
    None). `options`: `cg`'s tol, atol, martens_stop, save_iterates."""
    if int(maxiter) < 1:
        raise ValueError(f"maxiter: expected an integer >= 1, got {maxiter}")
    defaults = {"tol": 1e-5, "atol": 0.0, "martens_stop": False, "save_iterates": False}
    options = {**defaults, **options, "maxiter": int(maxiter)}
    matvec = as_matvec(matvec)
    precond = as_matvec(preconditioner) if preconditioner is not None else None
    if not _tree.ravels(b):
        return _cg(matvec, b, x0=x0, preconditioner=precond, **options), None
    # Several leaves of one dtype: CG's vector arithmetic on them raveled into one vector, one
    # kernel per update instead of one per leaf (XLA's CPU backend compiles each separately).
    flat_b, unravel = ravel_pytree(b)

    def flat(f):
        return lambda v: _tree.ravel(f(unravel(v)))

    res = _cg(
        flat(matvec),
        flat_b,
        x0=None if x0 is None else _tree.ravel(_tree.cast_like(x0, b)),
        preconditioner=None if precond is None else flat(precond),
        **options,
    )
    return res, unravel


def _unraveled(res: CGResult, unravel) -> CGResult:
    if unravel is None:
        return res
    return res._replace(
        x=unravel(res.x),
        residual=unravel(res.residual),
        saved=None if res.saved is None else jax.vmap(unravel)(res.saved),
    )


def _cg(matvec, b, *, x0, maxiter, tol, atol, preconditioner, martens_stop, save_iterates):
    """`cg` on pytrees, `matvec` and `preconditioner` (or None) plain callables.

    With a warm start the loop's first trip is a set-up trip: it computes r₀ = b − A x₀ and
    y₀ = M⁻¹ r₀ with the loop body's own product and preconditioner (selects pick the set-up's
    values), so the compiled program holds one copy of each rather than one before the loop and
    one in it (a copy of a 784-128-10 MLP's product is ~17 kernels to compile, ~15 % of natural
    gradient's step program). It is not counted as an iteration.
    """
    warm = x0 is not None
    track_phi = martens_stop or save_iterates  # φ of every iterate, in phi_hist
    precond = preconditioner if preconditioner is not None else (lambda r: r)
    bnorm = _tree.norm(b)
    threshold = jnp.maximum(tol * bnorm, atol)
    dtype = bnorm.dtype

    if warm:
        x = _tree.cast_like(x0, b)
        # p = x₀ so that the set-up trip's product is A x₀, with no select on the product's
        # input; r and ry are placeholders it replaces (ry = 1 keeps its unused β finite).
        r, p = b, x
        ry = jnp.ones((), dtype)
        phi0 = jnp.zeros((), dtype)
        converged0 = jnp.bool_(False)
    else:
        x = _tree.zeros_like(b)
        r = b
        y = precond(r)
        p = y
        ry = _tree.vdot(r, y)
        phi0 = _phi(x, b, r)
        converged0 = _tree.norm(r) <= threshold
    phi_hist = jnp.zeros(maxiter + 1, dtype).at[0].set(phi0)

    schedule = save_schedule(maxiter) if save_iterates else ()
    if save_iterates:
        slots = len(schedule) + 1  # + the last iterate
        # One slot more, written when nothing is saved: each iteration writes one iterate
        # into the buffer instead of selecting between two whole buffers.
        saved = jax.tree.map(lambda a: jnp.zeros((slots + 1, *a.shape), a.dtype), x)
        saved_steps = jnp.full((slots + 1,), -1, jnp.int32)
    else:
        saved, saved_steps = None, None
    sched = jnp.asarray(schedule if schedule else (0,), jnp.int32)

    state = _State(
        i=jnp.int32(0),
        setup=jnp.bool_(warm),
        x=x,
        r=r,
        p=p,
        ry=ry,
        phi_hist=phi_hist,
        status=jnp.where(converged0, CONVERGED, MAXITER).astype(jnp.int32),
        done=converged0,
        saved=saved,
        saved_steps=saved_steps,
    )

    def cond(s: _State):
        return jnp.logical_and(s.setup | (s.i < maxiter), jnp.logical_not(s.done))

    def body(s: _State) -> _State:
        setup = s.setup
        ap = matvec(s.p)  # on the set-up trip A x₀
        pap = _tree.vdot(s.p, ap)
        alpha = s.ry / pap
        # A bad pᵀAp keeps x and r (the last good iterate). The select reads a scalar known
        # before the update, so XLA fuses it into the update's own pass over the vectors; a
        # select on φ (known only after another pass) would cost one pass more per iteration.
        # On the set-up trip ap = A x₀ and pᵀAp means nothing.
        negative = (pap <= 0) & ~setup
        early = (negative | ~jnp.isfinite(pap)) & ~setup
        x_new = _tree.where(early | setup, s.x, _tree.axpy(alpha, s.p, s.x))
        r_step = _tree.where(early, s.r, _tree.axpy(-alpha, ap, s.r))
        r_new = _tree.where(setup, _tree.sub(b, ap), r_step) if warm else r_step
        y_new = precond(r_new)
        ry_new = _tree.vdot(r_new, y_new)
        p_step = _tree.axpy(ry_new / s.ry, s.p, y_new)
        p_new = _tree.where(setup, y_new, p_step) if warm else p_step
        i = jnp.where(setup, s.i, s.i + 1)
        # Two passes over the vectors only when something reads them: φ for Martens' rule and
        # for saved iterates (else it is computed once, after the loop; an x that overflows
        # shows in rᵀM⁻¹r too), ‖r‖ apart from rᵀM⁻¹r when M ≠ I.
        finite = (jnp.isfinite(pap) | setup) & jnp.isfinite(ry_new)
        phi_hist = s.phi_hist
        if track_phi:
            phi = _phi(x_new, b, r_new)
            phi_hist = phi_hist.at[i].set(phi)
            finite = finite & jnp.isfinite(phi)
        r_norm = jnp.sqrt(ry_new) if preconditioner is None else _tree.norm(r_new)

        nonfinite = jnp.logical_not(finite)
        bad = negative | nonfinite
        converged = r_norm <= threshold
        if martens_stop:
            k = jnp.maximum(MARTENS_MIN_K, jnp.ceil(0.1 * i).astype(jnp.int32))
            phi_k = phi_hist[jnp.maximum(i - k, 0)]
            stalled = (i > k) & (phi < 0) & ((phi - phi_k) / phi < k * MARTENS_EPS) & ~setup
        else:
            stalled = jnp.bool_(False)

        status = jnp.select(
            [nonfinite, negative, converged, stalled],
            [NONFINITE, NEGATIVE_CURVATURE, CONVERGED, MARTENS],
            MAXITER,
        ).astype(jnp.int32)
        new = _State(
            i=jnp.where(early, s.i, i),  # x and r were kept: no iteration was done
            setup=jnp.bool_(False),
            x=x_new,
            r=r_new,
            p=p_new,
            ry=jnp.where(bad & ~setup, s.ry, ry_new),
            phi_hist=jnp.where(early, s.phi_hist, phi_hist),
            status=status,
            done=bad | converged | stalled,
            saved=s.saved,
            saved_steps=s.saved_steps,
        )
        if save_iterates:
            slot = jnp.sum(sched < i)  # searchsorted, without its loop
            do_save = jnp.logical_not(bad | setup) & (slot < len(schedule)) & (sched[slot] == i)
            slot = jnp.where(do_save, slot, slots)
            saved, steps = _save(s.saved, s.saved_steps, slot, x_new, i)
            new = new._replace(saved=saved, saved_steps=steps)
        return new

    final = lax.while_loop(cond, body, state)
    saved, saved_steps = final.saved, final.saved_steps
    if save_iterates:
        saved = jax.tree.map(lambda buf: buf[:slots], saved)
        saved_steps = saved_steps[:slots]
        # The final iterate goes in the slot after the last scheduled one that was filled,
        # unless it is already there.
        used = jnp.sum(saved_steps >= 0)
        last_is_final = (used > 0) & (saved_steps[jnp.maximum(used - 1, 0)] == final.i)
        slot = jnp.where(last_is_final, used - 1, used)
        saved, saved_steps = _save(saved, saved_steps, slot, final.x, final.i)
        saved_phi = jnp.where(
            saved_steps >= 0, final.phi_hist[jnp.maximum(saved_steps, 0)], jnp.nan
        )
    else:
        saved_phi = None

    return CGResult(
        x=final.x,
        iterations=final.i,
        status=final.status,
        residual=final.r,
        residual_norm=_tree.norm(final.r),
        phi=final.phi_hist[final.i] if track_phi else _phi(final.x, b, final.r),
        saved=saved,
        saved_steps=saved_steps,
        saved_phi=saved_phi,
    )


def _save(saved, saved_steps, slot, x, i):
    saved = jax.tree.map(lambda buf, a: buf.at[slot].set(a), saved, x)
    return saved, saved_steps.at[slot].set(i)


def backtrack(res: CGResult, loss_of: Callable[[PyTree], jax.Array]) -> tuple[jax.Array, jax.Array]:
    """Index of the saved CG iterate to keep (Martens 2010, §4.6), and its loss.

    Start at the last saved iterate (`res` from ``cg(..., save_iterates=True)``); step back while
    the previous iterate has a lower `loss_of`. A non-finite loss counts as +∞.
    """
    last = jnp.sum(res.saved_steps >= 0) - 1
    take = lambda j: jax.tree.map(lambda s: s[j], res.saved)  # noqa: E731

    # One loop with the loss inside it (one copy of the model in the compiled program): the
    # first trip takes the last iterate whatever its loss, each later trip the one before,
    # kept while it is lower.
    def cond(c):
        return c[3]

    def body(c):
        j, best, f_best, _ = c
        value = loss_of(take(j))
        value = jnp.where(jnp.isfinite(value), value, jnp.inf)
        better = (value < f_best) | (j == last)
        best, f_best = jnp.where(better, j, best), jnp.where(better, value, f_best)
        return j - 1, best, f_best, better & (j > 0)

    f_start = jnp.asarray(jnp.inf, jax.eval_shape(loss_of, take(0)).dtype)
    _, j, f_j, _ = lax.while_loop(cond, body, (last, last, f_start, jnp.asarray(True)))
    return j, f_j


def dense_solve(matvec: Callable[[PyTree], PyTree], b: PyTree) -> PyTree:
    """Oracle for small problems: form A from `matvec` densely and solve with `jnp.linalg.solve`."""
    flat_b, unravel = ravel_pytree(b)
    a = Operator(as_matvec(matvec), b).to_dense()
    return unravel(jnp.linalg.solve(a, flat_b))
