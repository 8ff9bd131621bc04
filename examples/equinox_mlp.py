"""Train an equinox MLP on MNIST with natgrad: natural gradient, then Hessian-free.

    python examples/equinox_mlp.py [--steps 300] [--hf-steps 60]

The adapter: partition the module into its arrays (the parameters, a pytree shaped like the
module) and the rest, recombine inside ``apply_fn``, and vmap because equinox layers act on a
single example:

    params, static = eqx.partition(model, eqx.is_array)
    apply_fn = lambda p, x: jax.vmap(eqx.combine(p, static))(x)

Data and training loop: `examples/_common.py` (mnist-5k: 5,000 real MNIST digits, 4,000 to
train, 1,000 to test).
"""

from __future__ import annotations

import argparse

import equinox as eqx
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

    model = eqx.nn.MLP(784, 10, width_size=128, depth=1, key=jax.random.PRNGKey(0))
    params, static = eqx.partition(model, eqx.is_array)  # the adapter:
    apply_fn = lambda p, x: jax.vmap(eqx.combine(p, static))(x)  # noqa: E731

    loss = natgrad.losses.softmax_cross_entropy()
    results = {"initial_test_loss": float(loss.mean(apply_fn(params, data[1][0]), data[1][1]))}
    ng = natgrad.natural_gradient(apply_fn, loss)  # the defaults
    hf = natgrad.hessian_free(apply_fn, loss)  # larger batches: HF takes few, expensive steps
    for name, opt, steps, batch_size in [
        ("natural_gradient", ng, args.steps, args.batch_size),
        ("hessian_free", hf, args.hf_steps, 4 * args.batch_size),
    ]:  # both from the same initial weights
        trained, results[name] = train(opt, apply_fn, loss, params, data, steps, batch_size, name)
    model = eqx.combine(trained, static)  # the last run's parameters as a module again
    x, y = data[1][0][0], data[1][1][0]
    print(f"first test digit: label {y}, the eqx model predicts {int(model(x).argmax())}")
    return results


if __name__ == "__main__":
    main()
