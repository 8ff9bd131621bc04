r"""The step's quadratic model along the search direction, with momentum.

With d the direction and Q the curvature of its model q(p) = gᵀp + ½ pᵀQp (`_directions`), the
search direction is s = d + μ s_prev (heavy-ball momentum on the preconditioned direction;
μ = 0: s = d), and the step p = −α s. The step rule and the reduction ratio read, along s,

    gᵀs,   sᵀQs,   sᵀ(Q + λI)s,   sᵀFs,

the last the second-order term of the output KL, ½ α² sᵀFs. F is the Fisher (= the GGN for
natgrad's losses): when Q is an indefinite Hessian, sᵀFs is one more GGN product.

Adaptive momentum (``momentum="adaptive"``; kfac-jax's adaptive learning rate and momentum,
Martens & Grosse 2015 §7): the step p = −(a d + c s_prev) minimising the damped quadratic model
q(p) = gᵀp + ½ pᵀ(C + λI)p over span{d, s_prev}, C the batch's exact curvature, solves

    [dᵀ(C+λ)d       dᵀ(C+λ)s_prev    ] [a]   [gᵀd     ]
    [s_prevᵀ(C+λ)d  s_prevᵀ(C+λ)s_prev] [c] = [gᵀs_prev],

so μ = c / a and s = d + μ s_prev; the optimum along that s is α = a, what the ``"quadratic"``
step rule returns (kfac-jax's adaptive learning rate), while ``"kl"`` caps the same s by its
trust region. C is the direction's own curvature when it is exact (CG's: Cd, or for
Hessian-free's backtracked iterate dᵀCd, comes free; one product, C s_prev), else (K-FAC, whose
Q is its approximation M) the GGN on the curvature examples, two products. Where
the 2×2 system has no positive-definite solution with a > 0 (the first step, s_prev = 0, an
indefinite Hessian, a non-finite product), μ = 0: the step falls back to d.
"""

from __future__ import annotations

import jax.numpy as jnp

from natgrad import _tree
from natgrad import curvature as curvature_lib
from natgrad.optimizers._directions import DirectionResult

ADAPTIVE = "adaptive"


def along(mu, previous, res: DirectionResult, grads, lam, problem) -> tuple:
    """(s, {"gs", "sqs", "sas", "sfs"}, the μ taken); `problem` = (apply_fn, loss, params,
    batch) for sᵀFs and the exact curvature of adaptive momentum."""
    dtype = lam.dtype
    model, damped = res.model, res.damped_model
    if mu == ADAPTIVE:  # the exact curvature, undamped, even where the direction's is not
        s, sqs, model, mu = _adaptive(previous, res, grads, lam, problem)
        damped = False
    elif mu:
        s = _tree.axpy(mu, previous, res.d)
        sqs = _dot(s, model.mv(s), dtype)
    else:
        s = res.d
        sqs = _d_q_d(res, model, dtype)
    sas = sqs if damped else sqs + lam * _dot(s, s, dtype)
    if model.psd:
        sfs = sqs
    else:  # the KL's second-order term is the Fisher (= GGN), not an indefinite Hessian
        sfs = _dot(s, curvature_lib.ggn(*problem).mv(s), dtype)
    gs = _dot(grads, s, dtype)
    return s, {"gs": gs, "sqs": sqs, "sas": sas, "sfs": sfs}, jnp.asarray(mu, dtype)


def _dot(u, v, dtype):
    return _tree.vdot(u, v).astype(dtype)


def _d_q_d(res: DirectionResult, model, dtype):
    """dᵀQd: the direction's own when it came free, else from Q d (one product if not free)."""
    if res.dqd is not None:
        return jnp.asarray(res.dqd, dtype)
    return _dot(res.d, model.mv(res.d) if res.qd is None else res.qd, dtype)


def _adaptive(previous, res: DirectionResult, grads, lam, problem) -> tuple:
    """(s, sᵀC s, C, μ) of adaptive momentum (module docstring)."""
    dtype = lam.dtype
    d = res.d
    if res.damped_model:  # the direction's model is an approximation: the exact GGN instead
        model = curvature_lib.ggn(*problem)
        dcd = _dot(d, model.mv(d), dtype)
    else:
        model = res.model
        dcd = _d_q_d(res, model, dtype)
    cp = model.mv(previous)
    dcp, pcp = _dot(d, cp, dtype), _dot(previous, cp, dtype)

    a11 = dcd + lam * _dot(d, d, dtype)
    a12 = dcp + lam * _dot(d, previous, dtype)
    a22 = pcp + lam * _dot(previous, previous, dtype)
    b1, b2 = _dot(grads, d, dtype), _dot(grads, previous, dtype)
    det = a11 * a22 - a12 * a12
    # Positive definite with room to spare (a relative gap, so rounding cannot pass a singular
    # system: s_prev = 0 gives det = 0), and a descent coefficient a > 0 on d.
    solvable = (a11 > 0) & (a22 > 0) & (det > 1e-6 * a11 * a22)
    safe = jnp.where(solvable, det, 1.0)
    a = (a22 * b1 - a12 * b2) / safe
    c = (a11 * b2 - a12 * b1) / safe
    ok = solvable & (a > 0) & jnp.isfinite(a) & jnp.isfinite(c)
    mu = jnp.where(ok, c / jnp.where(ok, a, 1.0), 0.0)
    s = _tree.axpy(mu, previous, d)
    # sᵀCs = dᵀCd + 2μ dᵀC s_prev + μ² s_prevᵀC s_prev, from the scalars above.
    return s, dcd + 2.0 * mu * dcp + mu * mu * pcp, model, mu
