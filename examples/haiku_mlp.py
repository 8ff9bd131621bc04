"""Train a dm-haiku MLP on MNIST with natgrad: natural gradient, then Hessian-free.

    python examples/haiku_mlp.py [--steps 300] [--hf-steps 60]

The adapter: `hk.transform` gives ``apply(params, rng, inputs)``; natgrad wants
``apply_fn(params, inputs)``, so pass no rng (the MLP is deterministic):

    apply_fn = lambda p, x: f.apply(p, None, x)

(``hk.without_apply_rng(hk.transform(...)).apply`` is the same function.) The parameters are
haiku's nested dict ``{"mlp/~/linear_0": {"w": ..., "b": ...}, ...}``.
Data and training loop: `examples/_common.py` (mnist-5k: 5,000 real MNIST digits, 4,000 to
train, 1,000 to test).
"""

from __future__ import annotations

import argparse

import haiku as hk
import jax

import natgrad
from _common import load_mnist, train  # examples/_common.py: data and training loop


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="natural-gradient steps")
    parser.add_argument("--hf-steps", type=int, default=60, help="Hessian-free steps")
    parser.add_argument("--batch-size", type=int, default=128)
    args = parser.parse_args(argv)
    data = load_mnist()

    f = hk.transform(lambda x: hk.nets.MLP([128, 10])(x))  # relu between layers, logits out
    params = f.init(jax.random.PRNGKey(0), data[0][0][:1])
    apply_fn = lambda p, x: f.apply(p, None, x)  # noqa: E731  -- the adapter

    loss = natgrad.losses.softmax_cross_entropy()
    results = {"initial_test_loss": float(loss.mean(apply_fn(params, data[1][0]), data[1][1]))}
    ng = natgrad.natural_gradient(apply_fn, loss)  # the defaults
    hf = natgrad.hessian_free(apply_fn, loss)  # larger batches: HF takes few, expensive steps
    for name, opt, steps, batch_size in [
        ("natural_gradient", ng, args.steps, args.batch_size),
        ("hessian_free", hf, args.hf_steps, 4 * args.batch_size),
    ]:  # both from the same initial weights
        trained, results[name] = train(opt, apply_fn, loss, params, data, steps, batch_size, name)
    return results


if __name__ == "__main__":
    main()
