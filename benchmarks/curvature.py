"""Cost of one curvature-vector product relative to one gradient, side by side in one process.

MLP 784-512-512-10, batch 1024, float32. For each operator we time, jitted,
  build + k products   for k = 1 and k = K,
so one product costs (T_K − T_1)/(K − 1) and the build (the single linearization) costs
T_1 minus one product. Each is divided by the median time of `jax.grad` of the mean loss. The
naive product (a fresh `jax.jvp` and `jax.vjp` per call) is timed the same way for contrast;
inside a loop XLA hoists its loop-invariant forward pass, so its honest per-call cost is
`single_call_over_grad` (build + one product in one jitted call).
Targets: ggn / fisher ≤ 1.2×, empirical_fisher and fisher_mc ≤ 1.3×, hessian ≤ 2.5×.
"""

from __future__ import annotations

import jax
import optax
from jax import lax

from benchmarks.timing import command, machine, median_seconds, setup
from natgrad import curvature

TARGETS = {"ggn": 1.2, "fisher": 1.2, "empirical_fisher": 1.3, "fisher_mc": 1.3, "hessian": 2.5}


def _products(build, k):
    """jit: build the operator, apply it k times (normalising, so nothing overflows or folds)."""

    def run(params, data, key):
        op = build(params, data, key)

        def body(_, v):
            w = op.mv(v)
            return optax.tree.scale(1.0 / (optax.tree.norm(w) + 1e-30), w)

        return lax.fori_loop(0, k, body, params)

    return jax.jit(run)


def seed_style(apply_fn, loss):
    """The naive product: a fresh forward pass (jvp) and backward pass (vjp) on every call."""

    def build(params, data, key):
        x, y = data
        model = lambda p: apply_fn(p, x)  # noqa: E731

        def mv(v):
            z, jv = jax.jvp(model, (params,), (v,))
            _, vjp = jax.vjp(model, params)
            return vjp(loss.hessian_vp(z, y, jv) / x.shape[0])[0]

        return curvature.Operator(mv, params)

    return build


def run(quick: bool = False) -> dict:
    sizes, batch_size, k = ((784, 128, 10), 128, 6) if quick else ((784, 512, 512, 10), 1024, 11)
    repeats = 5 if quick else 25
    key = jax.random.PRNGKey(0)
    params, apply_fn, data, loss = setup(sizes, batch_size)

    grad = jax.jit(jax.grad(lambda p, d: loss.mean(apply_fn(p, d[0]), d[1])))
    t_grad = median_seconds(grad, params, data, repeats=repeats)

    def builder(name):
        return lambda p, d, kk: curvature.make(name, apply_fn, loss, p, d, key=kk)

    builders = {name: builder(name) for name in curvature.CURVATURES}
    builders["seed_style_jvp_vjp"] = seed_style(apply_fn, loss)
    results = {}
    for name, build in builders.items():
        t1 = median_seconds(_products(build, 1), params, data, key, repeats=repeats)
        tk = median_seconds(_products(build, k), params, data, key, repeats=repeats)
        per_product = max(tk - t1, 0.0) / (k - 1)
        results[name] = {
            "product_over_grad": per_product / t_grad,
            # One jitted call = build + one product: what a fresh jvp + vjp per call costs.
            "single_call_over_grad": t1 / t_grad,
            "build_over_grad": max(t1 - per_product, 0.0) / t_grad,
            "target": TARGETS.get(name),
            "meets_target": None if name not in TARGETS else per_product / t_grad <= TARGETS[name],
        }
    return {
        "benchmark": "curvature",
        "model": list(sizes),
        "batch_size": batch_size,
        "dtype": "float32",
        "products_per_timing": k,
        "grad_seconds": t_grad,
        "operators": results,
        "machine": machine(),
    }


def _show(payload: dict):
    for name, r in payload["operators"].items():
        yield (
            f"  {name:20s} product/grad {r['product_over_grad']:.2f}  "
            f"build/grad {r['build_over_grad']:.2f}  "
            f"single call/grad {r['single_call_over_grad']:.2f}  target {r['target']}"
        )


def main(argv=None) -> dict:
    return command(argv, __doc__, "curvature", run, _show)


if __name__ == "__main__":
    main()
