"""The Fashion-MNIST workloads of the timed benchmarks, and the lineup's per-mode protocol.

Every workload is a `benchmarks.timed_training.Problem` (model, training arrays, untimed metric).
Classifiers are scored by accuracy on the test images (the validation set), the autoencoder by
its loss on a fixed set of training images. The 2026 lineup's four (`MODES`, `workload`):

* ``mlp``: 784-128-10, batch 128 (the seed experiment).
* ``deep-mlp``: 784-512-512-10, batch 1024.
* ``autoencoder``: 784-256-64-16-64-256-784 (`natgrad.experiments.models.autoencoder`), batch 128.
* ``cnn``: `natgrad.experiments.models.cnn` with 8 and 16 channels (conv 3×3, ReLU, 2×2
  max-pool, twice, then dense 784 → 10), batch 128; the convolutions are declared with
  `natgrad.layers.conv2d`, so natgrad's K-FAC gives them Kronecker blocks (KFC).

Time to target builds its MLPs and autoencoder of any sizes with `classifier` and `autoencoder`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.timed_training import Problem
from natgrad.experiments import data, models

__all__ = ["MODES", "Workload", "autoencoder", "classifier", "load", "load_data", "workload"]


class Workload(NamedTuple):
    problem: Problem
    batch_size: int
    targets: tuple[float, ...]  # accuracies to reach (≥), or losses (≤) for the autoencoder
    higher_is_better: bool
    steps: int  # step budget per run
    seconds: float  # training-time budget per run
    note: str = ""
    conv: bool = False  # has convolutions (trained one step per compiled call)


# Per mode: data sizes, seeds, grid points, per workload (batch, targets, steps, seconds), and
# the batch-scaling study (batch sizes, target, steps, seconds, grid points). Quick targets come
# from short runs (the best peers reach them within the budget); full ones from the
# time-to-target benchmark (classifiers) and an extrapolation of the quick runs (autoencoder).
# The full budgets keep the whole protocol near two core-hours (docs/benchmarks.md).
MODES = {
    "full": {
        "num_train": None,
        "num_test": 10_000,
        "seeds": 3,
        "grid": 3,
        "workloads": {
            "mlp": (128, (0.85, 0.87), 5000, 10.0),
            "deep-mlp": (1024, (0.85, 0.88), 1500, 30.0),
            "autoencoder": (128, (230.0, 200.0), 3000, 20.0),
            "cnn": (128, (0.80, 0.85), 1000, 30.0),
        },
        "scaling": ((128, 512, 2048, 8192), 0.85, 2000, 20.0, 3),
    },
    "quick": {
        "num_train": 10_000,
        "num_test": 2_000,
        "seeds": 1,
        "grid": 1,
        "workloads": {
            "mlp": (128, (0.80, 0.83), 600, 2.0),
            "deep-mlp": (1024, (0.75, 0.80), 100, 4.0),
            "autoencoder": (128, (260.0, 240.0), 400, 3.0),
            "cnn": (128, (0.70, 0.75), 300, 4.0),
        },
        "scaling": ((128, 1024, 8192), 0.80, 300, 6.0, 1),
    },
}


def load(num_train: int | None = None, num_test: int | None = None, ds=None) -> data.Dataset:
    """Fashion-MNIST (`natgrad.experiments.data`; `ds` instead if given) with float32 inputs,
    int32 labels, cut to the first `num_train` / `num_test` examples (None: all). The inputs must
    be in [0, 1]: they are the autoencoder's Bernoulli targets."""
    ds = data.load_dataset("fashion-mnist") if ds is None else ds
    x_train = np.asarray(ds.x_train, np.float32)[:num_train]
    x_test = np.asarray(ds.x_test, np.float32)[:num_test]
    if min(x_train.min(), x_test.min()) < 0 or max(x_train.max(), x_test.max()) > 1:
        raise ValueError("dataset: expected inputs in [0, 1] (pixel intensities)")
    y_train = np.asarray(ds.y_train, np.int32)[:num_train]
    y_test = np.asarray(ds.y_test, np.int32)[:num_test]
    return ds._replace(x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)


def load_data(mode: str) -> data.Dataset:
    """Fashion-MNIST cut to the lineup mode's train and test sizes."""
    return load(MODES[mode]["num_train"], MODES[mode]["num_test"])


def classifier(ds, init, apply, loss) -> Problem:
    """The classifier (`init`, `apply`, `loss`) on `ds`, scored by its test accuracy."""
    x_test, y_test = jnp.asarray(ds.x_test), jnp.asarray(ds.y_test)
    accuracy = jax.jit(lambda p: jnp.mean(jnp.argmax(apply(p, x_test), -1) == y_test))
    return Problem(apply, loss, init, jnp.asarray(ds.x_train), jnp.asarray(ds.y_train), accuracy)


def autoencoder(ds, sizes: Sequence[int], eval_images: int) -> Problem:
    """The autoencoder of layer `sizes` on the pixels of `ds`, scored by its mean loss on the
    first `eval_images` training images."""
    model = models.autoencoder(sizes)
    pixels = jnp.asarray(ds.x_train)
    subset = pixels[:eval_images]
    loss = jax.jit(lambda p: model.loss.mean(model.apply(p, subset), subset))
    return Problem(model.apply, model.loss, model.init, pixels, pixels, loss)


def workload(name: str, ds, mode: str, batch_size: int | None = None) -> Workload:
    """Lineup workload `name` of `mode` on the dataset `ds` (batch size overridable)."""
    batch, targets, steps, seconds = MODES[mode]["workloads"][name]
    if name == "autoencoder":
        problem = autoencoder(ds, models.autoencoder().sizes, 2000)
        return Workload(problem, batch, targets, False, steps, seconds)
    if name == "cnn":
        model = models.cnn((8, 16))
    else:
        model = models.mlp((784, 128, 10) if name == "mlp" else (784, 512, 512, 10))
    problem = classifier(ds, model.init, model.apply, model.loss)
    return Workload(problem, batch_size or batch, targets, True, steps, seconds, conv=name == "cnn")
