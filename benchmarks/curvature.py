"""Cost of one curvature-vector product relative to one gradient, side by side in one process.

MLP 784-512-512-10, batch 1024, float32. For each operator we time, jitted,
  build + k products   for k = 1 and k = K,
so one product costs (T_K − T_1)/(K − 1) and the build (the single linearization) costs
T_1 minus one product. Each is divided by the time of `jax.grad` of the mean loss taken in the
same round: the gradient and every operator take turns (interleaved rounds, one sample of each
per round, itself a median of a few calls), the ratios are formed within each round and their
medians reported, so a machine that slows down for a while moves a round's timings alike. The
naive product (a fresh `jax.jvp` and `jax.vjp` per call) is timed the same way for contrast;
inside a loop XLA hoists its loop-invariant forward pass, so its honest per-call cost is
`single_call_over_grad` (build + one product in one jitted call).
Targets: ggn / fisher ≤ 1.2×, empirical_fisher and fisher_mc ≤ 1.3×, hessian ≤ 2.5×.
"""

from __future__ import annotations

import statistics

import jax

from benchmarks.timing import applied, command, machine, median_seconds, setup
from natgrad import curvature

# Samples per round of each timing (the gradient, build + 1 product, build + k products).
SAMPLES = 3

TARGETS = {"ggn": 1.2, "fisher": 1.2, "empirical_fisher": 1.3, "fisher_mc": 1.3, "hessian": 2.5}


def _products(build, k):
    """jit: build the operator, apply it k times (normalising, so nothing overflows or folds)."""

    def run(params, data, key):
        return applied(build(params, data, key).mv, params, k)

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
    rounds = 3 if quick else 9
    key = jax.random.PRNGKey(0)
    params, apply_fn, data, loss = setup(sizes, batch_size)

    grad = jax.jit(jax.grad(lambda p, d: loss.mean(apply_fn(p, d[0]), d[1])))

    def builder(name):
        return lambda p, d, kk: curvature.make(name, apply_fn, loss, p, d, key=kk)

    builders = {name: builder(name) for name in curvature.CURVATURES}
    builders["seed_style_jvp_vjp"] = seed_style(apply_fn, loss)
    jitted = {name: (_products(b, 1), _products(b, k)) for name, b in builders.items()}
    for one, many in jitted.values():  # compile and warm up before the first round
        jax.block_until_ready((one(params, data, key), many(params, data, key)))
    grads, product, single = [], {n: [] for n in jitted}, {n: [] for n in jitted}
    for _ in range(rounds):
        g = median_seconds(grad, params, data, repeats=SAMPLES, warmup=1)
        grads.append(g)
        for name, (one, many) in jitted.items():
            t1 = median_seconds(one, params, data, key, repeats=SAMPLES, warmup=0)
            tk = median_seconds(many, params, data, key, repeats=SAMPLES, warmup=0)
            product[name].append(max(tk - t1, 0.0) / (k - 1) / g)
            single[name].append(t1 / g)
    results = {}
    for name in jitted:
        per_product = statistics.median(product[name])
        one_call = statistics.median(single[name])
        results[name] = {
            "product_over_grad": per_product,
            # One jitted call = build + one product: what a fresh jvp + vjp per call costs.
            "single_call_over_grad": one_call,
            "build_over_grad": max(one_call - per_product, 0.0),
            "product_over_grad_rounds": product[name],
            "target": TARGETS.get(name),
            "meets_target": None if name not in TARGETS else per_product <= TARGETS[name],
        }
    return {
        "benchmark": "curvature",
        "model": list(sizes),
        "batch_size": batch_size,
        "dtype": "float32",
        "products_per_timing": k,
        "grad_seconds": statistics.median(grads),
        "rounds": rounds,
        "note": "interleaved rounds in one process, ratios taken within each round, medians",
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
