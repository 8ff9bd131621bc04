"""K-FAC's cost and its worth as a preconditioner, on MLP 784-128-10 at batch 128, float32.

1. Step time: the whole jitted training step (`value_and_grad` + `update` + `apply_updates`) of
   `natgrad.kfac` with inverses refreshed every 5 steps, over `optax.sgd`'s, measured side by side
   in one process. A timed sample is 5 consecutive steps (`benchmarks.steps.chain`), so it holds
   exactly one refresh. Also reported: K-FAC with the refresh never due (the per-step cost
   alone) — the difference is what inverting the 785 × 785 and 128 × 128 factors costs — and
   K-FAC with BLAS held to one thread by `threadpoolctl`, when installed (`benchmarks` already
   sets OPENBLAS_NUM_THREADS=1; on a shared, oversubscribed machine multithreaded OpenBLAS
   factorisations of n ≥ 256 were measured to take ~0.5 s instead of ~5 ms).
2. CG iterations to reach ‖r‖ ≤ tol·‖b‖ on (GGN + λI) d = g (g the gradient), with no
   preconditioner, Martens' diagonal, the exact GGN diagonal, Hutchinson's diagonal and K-FAC
   (one batch's statistics, λ-damped). The GGN of a batch of 128 has rank ≤ 128·9 = 1152 of
   101,770 parameters: on its null space the damped matrix is λI, which plain CG handles in one
   step and any non-scalar preconditioner spreads out, so the counts are reported as measured.
"""

from __future__ import annotations

import argparse

import jax
import optax

import natgrad
from benchmarks.steps import CHAIN, make_step, seconds_per_step, warm_up
from benchmarks.timing import batch, machine, mlp, write_json
from natgrad import _tree, curvature, losses, preconditioners, solvers

SIZES = (784, 128, 10)
BATCH_SIZE = 128
INVERSE_EVERY = CHAIN  # so a timed chain of steps holds exactly one refresh


def bench_steps(repeats: int) -> dict:
    params, apply_fn = mlp(SIZES, jax.random.PRNGKey(0))  # layers declared to K-FAC
    data = batch(jax.random.PRNGKey(1), BATCH_SIZE)
    loss = losses.softmax_cross_entropy()
    opts = {
        "sgd": (optax.sgd(0.1), False),
        "kfac": (natgrad.kfac(apply_fn, loss, inverse_every=INVERSE_EVERY), True),
        "kfac_no_refresh": (natgrad.kfac(apply_fn, loss, inverse_every=10**9), True),
    }
    key = jax.random.PRNGKey(2)

    def timed(opt, extra):
        step = make_step(opt, apply_fn, loss, extra)
        p, s = warm_up(step, params, opt.init(params), data, key)
        return seconds_per_step(step, p, s, data, repeats, key=key)

    rows = {name: {"step_seconds": timed(opt, extra)} for name, (opt, extra) in opts.items()}
    try:
        import threadpoolctl
    except ImportError:
        threadpoolctl = None
    if threadpoolctl is not None:
        with threadpoolctl.threadpool_limits(1, "blas"):
            rows["kfac_blas_1_thread"] = {"step_seconds": timed(opts["kfac"][0], True)}
    for row in rows.values():
        row["step_over_sgd"] = row["step_seconds"] / rows["sgd"]["step_seconds"]
    rows["kfac"]["target_step_over_sgd"] = 3.0
    rows["kfac"]["within_target"] = rows["kfac"]["step_over_sgd"] <= 3.0
    return rows


def bench_cg(damping: float, tol: float, maxiter: int, num_probes: int) -> dict:
    params, apply_fn = mlp(SIZES, jax.random.PRNGKey(0))
    data = batch(jax.random.PRNGKey(1), BATCH_SIZE)
    loss = losses.softmax_cross_entropy()
    candidates = {
        "none": None,
        "martens_diagonal": preconditioners.martens_diagonal(),
        "exact_ggn_diagonal": preconditioners.exact_diagonal(),
        "hutchinson_diagonal": preconditioners.hutchinson_diagonal(num_probes=num_probes),
        "kfac": preconditioners.kfac(),
    }

    def solve(pre):
        @jax.jit
        def run(params, data, key):
            op = curvature.ggn(apply_fn, loss, params, data)
            apply_inverse = None
            if pre is not None:
                m, _ = pre.update(
                    pre.init(params),
                    params,
                    data,
                    apply_fn=apply_fn,
                    loss=loss,
                    damping=damping,
                    key=key,
                )
                apply_inverse = m.inverse()
            res = solvers.cg(
                curvature.damped(op, damping).mv,
                op.gradient(),
                maxiter=maxiter,
                tol=tol,
                preconditioner=apply_inverse,
            )
            return res.iterations, res.status, res.residual_norm / _tree.norm(op.gradient())

        return run(params, data, jax.random.PRNGKey(3))

    rows = {}
    for name, pre in candidates.items():
        iterations, status, rel = solve(pre)
        rows[name] = {
            "iterations": int(iterations),
            "status": solvers.STATUS_NAMES[int(status)],
            "relative_residual": float(rel),
        }
    return {"damping": damping, "tol": tol, "maxiter": maxiter, "preconditioners": rows}


def run(quick: bool = False) -> dict:
    repeats = 5 if quick else 20
    return {
        "benchmark": "kfac",
        "dtype": "float32",
        "model": list(SIZES),
        "batch_size": BATCH_SIZE,
        "inverse_every": INVERSE_EVERY,
        "note": "step times side by side in one process; medians after compilation",
        "steps": bench_steps(repeats),
        "cg": [
            bench_cg(d, tol=1e-4, maxiter=300 if quick else 1000, num_probes=10)
            for d in (1e-3, 1e-1)
        ],
        "machine": machine(),
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default="results/bench")
    args = parser.parse_args(argv)
    payload = run(args.quick)
    path = write_json(args.out, "kfac.json", payload)
    for name, row in payload["steps"].items():
        ms, ratio = 1e3 * row["step_seconds"], row["step_over_sgd"]
        print(f"  {name:16s} {ms:7.2f} ms  step/sgd {ratio:5.2f}")
    for block in payload["cg"]:
        print(f"  CG to tol {block['tol']:g} at damping {block['damping']:g}:")
        for name, row in block["preconditioners"].items():
            print(f"    {name:20s} {row['iterations']:5d} iterations ({row['status']})")
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main()
