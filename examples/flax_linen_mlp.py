"""Train a flax.linen MLP on MNIST with natgrad: natural gradient, Hessian-free, then K-FAC.

    python examples/flax_linen_mlp.py [--steps 300] [--hf-steps 60]

The adapter is nothing at all: linen's ``model.apply(params, inputs)`` already has the signature
natgrad's optimisers want, and ``params`` (a nested dict) is an ordinary pytree.
K-FAC also needs to see the dense layers: the MLP is built from a small `Dense` module that
computes its output with `natgrad.layers.dense` (see docs/model_libraries.md).
Data and training loop: `examples/_common.py` (mnist-5k: 5,000 real MNIST digits, 4,000 to
train, 1,000 to test).
"""

from __future__ import annotations

import argparse

import jax
from flax import linen as nn

import natgrad
from _common import load_mnist, train  # examples/_common.py: data and training loop


class Dense(nn.Module):
    """nn.Dense as K-FAC sees it: params "w" (in, out) and "b", applied by natgrad.layers.dense."""

    features: int

    @nn.compact
    def __call__(self, x):
        self.param("w", nn.initializers.lecun_normal(), (x.shape[-1], self.features))
        self.param("b", nn.initializers.zeros, (self.features,))
        return natgrad.layers.dense(self.variables["params"], x)  # K-FAC's probe arrives here


class MLP(nn.Module):
    dense: type = nn.Dense  # MLP(dense=Dense) for K-FAC: same initialisers, same initial weights

    @nn.compact
    def __call__(self, x):
        x = nn.relu(self.dense(128)(x))
        return self.dense(10)(x)  # logits


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="natural-gradient and K-FAC steps")
    parser.add_argument("--hf-steps", type=int, default=60, help="Hessian-free steps")
    parser.add_argument("--batch-size", type=int, default=128)
    args = parser.parse_args(argv)
    data = load_mnist()

    model = MLP()
    params = model.init(jax.random.PRNGKey(0), data[0][0][:1])
    apply_fn = model.apply  # the adapter: linen's apply is already apply_fn(params, inputs)

    loss = natgrad.losses.softmax_cross_entropy()
    results = {"initial_test_loss": float(loss.mean(apply_fn(params, data[1][0]), data[1][1]))}
    ng = natgrad.natural_gradient(apply_fn, loss)  # the defaults
    hf = natgrad.hessian_free(apply_fn, loss)  # larger batches: HF takes few, expensive steps
    for name, opt, steps, batch_size in [
        ("natural_gradient", ng, args.steps, args.batch_size),
        ("hessian_free", hf, args.hf_steps, 4 * args.batch_size),
    ]:  # both from the same initial weights
        _, results[name] = train(opt, apply_fn, loss, params, data, steps, batch_size, name)

    # K-FAC: the same MLP from the registering Dense (params {"w", "b"}; same initial weights).
    kfac_model = MLP(dense=Dense)
    kfac_params = kfac_model.init(jax.random.PRNGKey(0), data[0][0][:1])
    opt = natgrad.kfac(kfac_model.apply, loss)
    _, results["kfac"] = train(
        opt, kfac_model.apply, loss, kfac_params, data, args.steps, args.batch_size, "kfac"
    )
    return results


if __name__ == "__main__":
    main()
