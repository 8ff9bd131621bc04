r"""How to invert K-FAC's damped factors on this CPU: LU, Cholesky, eigh or Newton–Schulz.

Issue 14's lever "compare LU, Cholesky, eigh and Newton–Schulz updates", on real factors:
`natgrad.kfac` with every factor exact trains 784-128-10 on mnist-5k's digits
(`benchmarks.phases.digits_problem`, batch 128, defaults otherwise) and its moving averages are
taken after 50 and after 100 steps — one inverse period apart at the default ``inverse_every`` —
and damped as K-FAC damps them, M = A + π√λ I, G + √λ/π I (λ = 1e-3). Each method inverts the
step-100 factor:

* LU: ``jnp.linalg.inv`` (natgrad's choice above 512 wide, `natgrad.kronecker._lu_inverse`);
* Cholesky: ``cho_factor`` and ``cho_solve`` against I;
* eigh: Q diag(1/w) Qᵀ (natgrad batches the factors up to 512 wide into one eigh);
* Newton–Schulz: X ← X(2I − MX), 1, 2, 3 and 5 iterations from the step-50 inverse (the one a
  refresh would replace; it converges when ‖I − M X₀‖ < 1).

Reported per factor: its width, how much it moved (‖M₁₀₀ − M₅₀‖_F / ‖M₅₀‖_F), and for each method
the time ÷ one SGD step of the same model (both jitted, single calls timed in interleaved rounds,
the ratio formed within each round, medians) and the residual ‖MX − I‖_F / √n in float32.
"""

from __future__ import annotations

import statistics

import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl
import numpy as np
import optax

import natgrad
from benchmarks.phases import BATCH_SIZE, digits_problem
from benchmarks.timing import command, machine, median_seconds
from natgrad import kronecker
from natgrad.experiments import training

DAMPING = 1e-3
SNAPSHOTS = (50, 100)
NEWTON_SCHULZ = (1, 2, 3, 5)


def newton_schulz(m: jax.Array, x: jax.Array, iterations: int) -> jax.Array:
    """X ← X(2I − MX), `iterations` times: M⁻¹ quadratically when ‖I − MX₀‖ < 1."""
    two = 2 * jnp.eye(m.shape[0], dtype=m.dtype)
    for _ in range(iterations):
        x = x @ (two - m @ x)
    return x


def _cholesky(m: jax.Array) -> jax.Array:
    return jsl.cho_solve(jsl.cho_factor(m), jnp.eye(m.shape[0], dtype=m.dtype))


def _eigh(m: jax.Array) -> jax.Array:
    w, q = jnp.linalg.eigh(m)
    return (q / w) @ q.T


def methods() -> dict:
    """name → jitted ``(M, X₀) -> X``."""
    out = {
        "lu": jax.jit(lambda m, x0: jnp.linalg.inv(m)),
        "cholesky": jax.jit(lambda m, x0: _cholesky(m)),
        "eigh": jax.jit(lambda m, x0: _eigh(m)),
    }
    for k in NEWTON_SCHULZ:
        out[f"newton_schulz_{k}"] = jax.jit(lambda m, x0, k=k: newton_schulz(m, x0, k))
    return out


def residual(m: jax.Array, x: jax.Array) -> float:
    n = m.shape[0]
    return float(jnp.linalg.norm(m @ x - jnp.eye(n, dtype=m.dtype)) / np.sqrt(n))


def damped_factors(factors, damping: float = DAMPING) -> dict[str, jax.Array]:
    """{"A0": ..., "G0": ..., ...}: each layer's A and G with K-FAC's factored damping."""
    out = {}
    for i, (a, g) in enumerate(zip(factors.a, factors.g, strict=True)):
        da, dg = kronecker.pi_damping(a, g, damping)
        out[f"A{i}"] = a + da * jnp.eye(a.shape[0], dtype=a.dtype)
        out[f"G{i}"] = g + dg * jnp.eye(g.shape[0], dtype=g.dtype)
    return out


def trained_factors(problem, steps, batch_size: int = BATCH_SIZE) -> dict[int, dict]:
    """K-FAC's damped factors (all exact) after each number of `steps` of training on `problem`
    ``(params, apply_fn, data, loss)``, its data taken `batch_size` examples a step."""
    params, apply_fn, data, loss = problem
    opt = natgrad.kfac(apply_fn, loss, input_factor_rank=None, output_factor_rank=None)
    step = jax.jit(training.make_step(opt, apply_fn, loss))
    state, key = opt.init(params), jax.random.PRNGKey(0)
    batches = jax.tree.leaves(data)[0].shape[0] // batch_size
    snaps = {}
    for t in range(max(steps) + 1):
        if t in steps:
            snaps[t] = damped_factors(state.preconditioner_state.factors)
        i = t % batches
        batch = jax.tree.map(lambda a, i=i: a[i * batch_size : (i + 1) * batch_size], data)
        params, state, _ = step(params, state, batch, jax.random.fold_in(key, t))
    return snaps


def bench(rounds: int, problem=None, batch_size: int = BATCH_SIZE) -> dict:
    problem = digits_problem() if problem is None else problem
    params, apply_fn, data, loss = problem
    snaps = trained_factors(problem, SNAPSHOTS, batch_size)
    old, new = (snaps[t] for t in SNAPSHOTS)
    sgd = optax.sgd(0.1)
    sgd_step = jax.jit(training.make_step(sgd, apply_fn, loss))
    first = jax.tree.map(lambda a: a[:batch_size], data)
    sgd_args = (params, sgd.init(params), first, jax.random.PRNGKey(1))
    fns = methods()
    starts = {name: jnp.linalg.inv(m) for name, m in old.items()}
    for name, m in new.items():  # compile everything before the clock
        for fn in fns.values():
            jax.block_until_ready(fn(m, starts[name]))
    jax.block_until_ready(sgd_step(*sgd_args))
    ratios: dict = {f: {m: [] for m in fns} for f in new}
    for _ in range(rounds):
        for f, m in new.items():
            for label, fn in fns.items():
                sgd_s = median_seconds(sgd_step, *sgd_args, repeats=1, warmup=0)
                t = median_seconds(fn, m, starts[f], repeats=1, warmup=0)
                ratios[f][label].append(t / sgd_s)
    rows = []
    for f, m in new.items():
        row = {
            "factor": f,
            "width": int(m.shape[0]),
            "moved": float(jnp.linalg.norm(m - old[f]) / jnp.linalg.norm(old[f])),
            "start_residual": residual(m, starts[f]),
        }
        for label, fn in fns.items():
            row[f"{label}_over_sgd"] = statistics.median(ratios[f][label])
            row[f"{label}_residual"] = residual(m, fn(m, starts[f]))
        rows.append(row)
    return {"rounds": rounds, "damping": DAMPING, "snapshots": list(SNAPSHOTS), "factors": rows}


def run(quick: bool = False) -> dict:
    return {
        "benchmark": "inverses",
        "note": "time ÷ one SGD step (interleaved, medians) and residual ‖MX − I‖/√n of each "
        "method on K-FAC's damped factors after 100 steps; Newton–Schulz from the step-50 inverse",
        **bench(rounds=3 if quick else 9),
        "machine": machine(),
    }


def _show(payload: dict):
    labels = ["lu", "cholesky", "eigh", *(f"newton_schulz_{k}" for k in NEWTON_SCHULZ)]
    yield "factor width moved | " + " | ".join(labels) + "   (÷ SGD step, residual)"
    for r in payload["factors"]:
        cells = [f"{r[f'{m}_over_sgd']:.2f} {r[f'{m}_residual']:.0e}" for m in labels]
        yield f"{r['factor']:6s} {r['width']:5d} {r['moved']:.2f} | " + " | ".join(cells)


def main(argv=None) -> dict:
    return command(argv, __doc__, "inverses", run, _show)


if __name__ == "__main__":
    main()
