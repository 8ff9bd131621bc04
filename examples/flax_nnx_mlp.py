"""Train a flax.nnx MLP on MNIST with natgrad: natural gradient, then Hessian-free.

    python examples/flax_nnx_mlp.py [--steps 300] [--hf-steps 60]

The adapter: split the module into its graph definition and its parameters (an `nnx.State`,
which is a pytree) and rebuild it inside ``apply_fn``:

    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    apply_fn = lambda p, x: nnx.merge(graphdef, p, rest)(x)

Data and training loop: `examples/_common.py` (mnist-5k: 5,000 real MNIST digits, 4,000 to
train, 1,000 to test).
"""

from __future__ import annotations

import argparse

from flax import nnx

import natgrad
from _common import load_mnist, train  # examples/_common.py: data and training loop


class MLP(nnx.Module):
    def __init__(self, rngs):
        self.hidden = nnx.Linear(784, 128, rngs=rngs)
        self.out = nnx.Linear(128, 10, rngs=rngs)

    def __call__(self, x):
        return self.out(nnx.relu(self.hidden(x)))  # logits


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="natural-gradient steps")
    parser.add_argument("--hf-steps", type=int, default=60, help="Hessian-free steps")
    parser.add_argument("--batch-size", type=int, default=128)
    args = parser.parse_args(argv)
    data = load_mnist()

    model = MLP(nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)  # the adapter:
    apply_fn = lambda p, x: nnx.merge(graphdef, p, rest)(x)  # noqa: E731

    loss = natgrad.losses.softmax_cross_entropy()
    results = {"initial_test_loss": float(loss.mean(apply_fn(params, data[1][0]), data[1][1]))}
    ng = natgrad.natural_gradient(apply_fn, loss)  # the defaults
    hf = natgrad.hessian_free(apply_fn, loss)  # larger batches: HF takes few, expensive steps
    for name, opt, steps, batch_size in [
        ("natural_gradient", ng, args.steps, args.batch_size),
        ("hessian_free", hf, args.hf_steps, 4 * args.batch_size),
    ]:  # both from the same initial weights
        trained, results[name] = train(opt, apply_fn, loss, params, data, steps, batch_size, name)
    nnx.update(model, trained)  # write the last run's parameters back into the module
    x, y = data[1][0][:1], data[1][1][0]
    print(f"first test digit: label {y}, the nnx model predicts {int(model(x).argmax())}")
    return results


if __name__ == "__main__":
    main()
