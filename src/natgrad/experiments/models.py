"""The models of the experiments, in plain JAX: a ReLU MLP classifier and a deep autoencoder.

Parameters are a list of ``{"w": (m, n), "b": (n,)}`` dicts, one per dense layer, float32,
built from an explicit key with He initialisation: w ~ N(0, 2/m), b = 0. Every layer is computed
by `natgrad.layers.dense` (plain ``x @ w + b``), which declares it to K-FAC.

* `mlp` — the seed experiment's classifier, 784-128-10 with ReLU, trained on the softmax
  cross-entropy of the labels.
* `cnn` — a small convolutional classifier for 28 × 28 images (Fashion-MNIST): two 3 × 3
  convolutions (16 and 32 channels, "SAME", ReLU, each followed by 2 × 2 max-pooling) and a
  dense layer 7·7·32 → 10, convolutions declared with `natgrad.layers.conv2d` (K-FAC gives them
  Kronecker blocks, KFC) or, with ``declared=False``, computed by plain `lax.conv` (K-FAC falls
  back to diagonal blocks for them: the comparison of issue 16). Inputs arrive flat, (B, 784).
* `autoencoder` — a deep autoencoder in the style of Hinton & Salakhutdinov (2006) and Martens
  (2010), scaled to a small CPU: 784-256-64-16-64-256-784, ReLU hidden layers, a linear code layer
  (the narrowest), sigmoid outputs with the Bernoulli cross-entropy of the pixels as targets.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from natgrad import layers, losses

__all__ = ["Model", "mlp", "cnn", "autoencoder", "MODELS", "DEFAULT_HIDDEN", "build"]

Params = list[dict[str, jax.Array]]

MODELS = ("mlp", "autoencoder", "cnn")
DEFAULT_HIDDEN = {"mlp": (128,), "autoencoder": (256, 64, 16, 64, 256), "cnn": (16, 32)}


class Model(NamedTuple):
    """A model with its declared loss.

    ``classifier`` says what the targets are: the integer labels (and accuracy is defined) or,
    for an autoencoder, the inputs themselves.
    """

    name: str
    sizes: tuple[int, ...]
    init: Callable[[jax.Array], Params]
    apply: Callable[[Params, jax.Array], jax.Array]
    loss: losses.Loss
    classifier: bool

    def targets(self, inputs: Any, labels: Any) -> Any:
        """What the loss compares the outputs with: the labels, or the inputs for an autoencoder."""
        return labels if self.classifier else inputs


def _check_sizes(sizes: Sequence[int]) -> tuple[int, ...]:
    sizes = tuple(int(s) for s in sizes)
    if len(sizes) < 2 or min(sizes) < 1:
        raise ValueError(f"sizes: expected at least two positive layer widths, got {sizes}")
    return sizes


def _he_init(sizes: tuple[int, ...]) -> Callable[[jax.Array], Params]:
    def init(key: jax.Array) -> Params:
        params = []
        for i, (m, n) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
            w = jax.random.normal(jax.random.fold_in(key, i), (m, n), jnp.float32)
            params.append({"w": w * (2.0 / m) ** 0.5, "b": jnp.zeros(n, jnp.float32)})
        return params

    return init


def mlp(sizes: Sequence[int] = (784, 128, 10)) -> Model:
    """ReLU MLP; ``apply(params, x)`` returns the logits, shape (B, sizes[-1])."""
    sizes = _check_sizes(sizes)

    def apply(params: Params, x: jax.Array) -> jax.Array:
        for layer in params[:-1]:
            x = jax.nn.relu(layers.dense(layer, x))
        return layers.dense(params[-1], x)

    return Model("mlp", sizes, _he_init(sizes), apply, losses.softmax_cross_entropy(), True)


def cnn(channels: Sequence[int] = (16, 32), num_classes: int = 10, *, declared: bool = True):
    """Small CNN on flat 28 × 28 inputs; ``apply(params, x)`` returns (B, num_classes) logits."""
    channels = _check_sizes((1, *channels))
    side = 28 // 2 ** (len(channels) - 1)
    if side < 1:
        raise ValueError(f"hidden: too many convolutions for a 28 x 28 image, got {channels[1:]}")
    sizes = (784, *channels[1:], num_classes)

    def init(key: jax.Array) -> Params:
        params = []
        for i, (m, n) in enumerate(zip(channels[:-1], channels[1:], strict=True)):
            w = jax.random.normal(jax.random.fold_in(key, i), (3, 3, m, n), jnp.float32)
            params.append({"w": w * (2.0 / (9 * m)) ** 0.5, "b": jnp.zeros(n, jnp.float32)})
        return params + _he_init((side * side * channels[-1], num_classes))(
            jax.random.fold_in(key, len(channels))
        )

    def conv(layer, x):
        if declared:
            return layers.conv2d(layer, x)
        dims = ("NHWC", "HWIO", "NHWC")
        return (
            jax.lax.conv_general_dilated(x, layer["w"], (1, 1), "SAME", dimension_numbers=dims)
            + layer["b"]
        )

    def apply(params: Params, x: jax.Array) -> jax.Array:
        x = x.reshape(x.shape[0], 28, 28, 1).astype(params[0]["w"].dtype)
        for layer in params[:-1]:
            x = jax.nn.relu(conv(layer, x))
            x = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
        return layers.dense(params[-1], x.reshape(x.shape[0], -1))

    return Model("cnn", sizes, init, apply, losses.softmax_cross_entropy(), True)


def autoencoder(sizes: Sequence[int] = (784, 256, 64, 16, 64, 256, 784)) -> Model:
    """Deep autoencoder; ``apply(params, x)`` returns the output logits (sigmoid gives pixels).

    The narrowest hidden layer is the linear code layer; the others are ReLU.
    """
    sizes = _check_sizes(sizes)
    if sizes[0] != sizes[-1]:
        raise ValueError(f"sizes: an autoencoder's output must match its input, got {sizes}")
    hidden = sizes[1:-1]
    code = 1 + hidden.index(min(hidden)) if hidden else -1  # index of the code layer's output

    def apply(params: Params, x: jax.Array) -> jax.Array:
        for i, layer in enumerate(params[:-1], start=1):
            x = layers.dense(layer, x)
            x = x if i == code else jax.nn.relu(x)
        return layers.dense(params[-1], x)

    return Model(
        "autoencoder", sizes, _he_init(sizes), apply, losses.sigmoid_cross_entropy(), False
    )


def build(name: str, num_inputs: int, num_classes: int, hidden: Sequence[int] | None = None):
    """The model `name` (one of `MODELS`) for data with `num_inputs` features.

    `hidden` are the hidden-layer widths (default `DEFAULT_HIDDEN[name]`).
    """
    if name not in MODELS:
        raise ValueError(f"model: expected one of {MODELS}, got {name!r}")
    hidden = tuple(DEFAULT_HIDDEN[name] if hidden is None else hidden)
    if name == "mlp":
        return mlp((num_inputs, *hidden, num_classes))
    if name == "cnn":
        if num_inputs != 784:
            raise ValueError(f"model: cnn expects 28 x 28 images (784 inputs), got {num_inputs}")
        return cnn(hidden, num_classes)
    return autoencoder((num_inputs, *hidden, num_inputs))
