r"""The step's quadratic model along the search direction, with momentum.

With d the direction and Q the curvature of its model q(p) = gᵀp + ½ pᵀQp (`_directions`), the
search direction is s = d + μ s_prev (heavy-ball momentum on the preconditioned direction;
μ = 0: s = d), and the step p = −α s. The step rule and the reduction ratio read, along s,

    gᵀs,   sᵀQs,   sᵀ(Q + λI)s,   sᵀFs,

the last the second-order term of the output KL, ½ α² sᵀFs. F is the Fisher (= the GGN for
natgrad's losses): when Q is an indefinite Hessian, sᵀFs is one more GGN product.
"""

from __future__ import annotations

from natgrad import _tree
from natgrad import curvature as curvature_lib
from natgrad.optimizers._directions import DirectionResult


def along(mu, previous, res: DirectionResult, grads, lam, problem) -> tuple:
    """(s, {"gs", "sqs", "sas", "sfs"}); `problem` = (apply_fn, loss, params, batch) for sᵀFs."""
    dtype = lam.dtype
    if mu:
        s = _tree.axpy(mu, previous, res.d)
        qs = res.model.mv(s)
    else:
        s = res.d
        qs = res.model.mv(s) if res.qd is None else res.qd
    sqs = _tree.vdot(s, qs).astype(dtype)
    sas = sqs if res.damped_model else sqs + lam * _tree.vdot(s, s).astype(dtype)
    if res.model.psd:
        sfs = sqs
    else:  # the KL's second-order term is the Fisher (= GGN), not an indefinite Hessian
        sfs = _tree.vdot(s, curvature_lib.ggn(*problem).mv(s)).astype(dtype)
    return s, {"gs": _tree.vdot(grads, s).astype(dtype), "sqs": sqs, "sas": sas, "sfs": sfs}
