"""Training: the one training step every harness uses, and the loop of the `natgrad` command.

`make_step` builds the step, ``value_and_grad`` of the mean loss, ``update`` and
``apply_updates``, for any optax transform: natgrad's optimizers (and any
`optax.GradientTransformationExtraArgs`) get ``batch=(x, t)`` and ``key=``. The benchmarks, the
examples and `train` below all jit this one function.

`train` trains one optimizer of a comparison. Fairness and reproducibility:

* Every optimizer starts from the same parameters, ``model.init(k_init)`` with
  ``k_init, k_run = split(PRNGKey(seed))``, and sees the same batches: epoch e visits the training
  set in the order ``numpy.random.default_rng((seed, e)).permutation(N)``, in ⌊N/B⌋ full batches.
* One jitted step (`make_step`), compiled ahead of time (``jit(step).lower(...).compile()``) and
  timed apart from training; the step's key is split from the state's key. The optimizer state
  is donated to the step (XLA updates it in place: K-FAC's factors and inverses are megabytes
  that a step without statistics would otherwise copy into new buffers), the parameters are
  not (the step's output KL is measured between the parameters before and after it).
* Training time counts the steps only (batch gathering, the step, fetching its stats); it
  excludes compilation, evaluation and checkpointing.
* The state (params, optimizer state, RNG key) and the progress (step, curve so far, running sums
  of the optimizer's statistics) are everything a checkpoint needs, so a resumed run continues
  bit for bit where the checkpoint left off: the batch order is a function of (seed, epoch).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from natgrad import sharding
from natgrad.diagnostics import output_kl
from natgrad.experiments import checkpoint
from natgrad.experiments.lineup import Optimizer
from natgrad.experiments.models import Model

__all__ = [
    "RunConfig",
    "RunError",
    "RunResult",
    "TrainState",
    "batch_order",
    "eval_steps",
    "init_state",
    "make_step",
    "state_stats",
    "train",
]

# Statistics read from a natgrad optimizer's state after every step and averaged over the run.
AVERAGED_STATS = ("cg_iterations", "step_kl")
# Read once, from the final state.
FINAL_STATS = ("rejected_steps", "damping")
EVAL_CHUNK = 2048


class RunError(ValueError):
    """A run that cannot start as asked (one-line message)."""


@dataclass(frozen=True)
class RunConfig:
    """How to train: the same for every optimizer of a comparison."""

    epochs: int = 2
    batch_size: int = 128
    seed: int = 0
    eval_every: float = 0.25  # in epochs
    devices: int | None = None  # shard each batch over this many devices (None: no mesh)
    max_steps: int | None = None  # train this many steps instead of `epochs` epochs

    def total_steps(self, spe: int) -> int:
        """Steps of the run at `spe` steps per epoch."""
        return self.max_steps if self.max_steps is not None else spe * self.epochs


class TrainState(NamedTuple):
    params: Any
    opt_state: Any
    key: jax.Array


@dataclass
class Progress:
    """What a checkpoint records besides the state: how far the run got and what it measured."""

    step: int = 0
    train_seconds: float = 0.0
    curve: list[dict[str, Any]] = field(default_factory=list)
    stat_sums: dict[str, float] = field(default_factory=dict)


class RunResult(NamedTuple):
    name: str
    hyperparameters: dict[str, Any]
    metrics: dict[str, Any]
    curve: list[dict[str, Any]]
    state: TrainState


def steps_per_epoch(num_train: int, batch_size: int) -> int:
    """⌊N/B⌋: every batch is full, so the step compiles once."""
    if batch_size < 1 or batch_size > num_train:
        raise RunError(f"--batch-size {batch_size}: expected 1 to {num_train} (the training set)")
    return num_train // batch_size


def batch_order(num_train: int, batch_size: int, seed: int, epoch: int) -> np.ndarray:
    """Example indices of epoch `epoch`, shape (steps_per_epoch, batch_size)."""
    spe = steps_per_epoch(num_train, batch_size)
    order = np.random.default_rng((seed, epoch)).permutation(num_train)
    return order[: spe * batch_size].reshape(spe, batch_size)


def eval_steps(spe: int, epochs: int, eval_every: float) -> list[int]:
    """Steps after which to evaluate: 0, every `eval_every` epochs, and the last."""
    total = spe * epochs
    interval = eval_every * spe
    steps = {0, total}
    k = 1
    while k * interval < total:
        steps.add(min(total, max(1, round(k * interval))))
        k += 1
    return sorted(steps)


def init_state(model: Model, optimizer: Optimizer, seed: int) -> TrainState:
    """The initial state: the same parameters and run key for every optimizer."""
    init_key, run_key = jax.random.split(jax.random.PRNGKey(seed))
    params = model.init(init_key)
    return TrainState(params, optimizer.transform.init(params), run_key)


def make_step(transform: optax.GradientTransformation, apply_fn: Callable, loss) -> Callable:
    """``step(params, opt_state, batch, key) -> (params, opt_state, loss value)``, pure.

    ``batch = (x, t)``; the mean loss is ``loss.mean(apply_fn(params, x), t)`` (a
    `natgrad.losses` loss). ``key`` goes to ``update`` with the batch when `transform` takes
    extra arguments (natgrad's optimizers use it for sampled curvature), with ``value=`` (the loss
    just computed, which spares natgrad a forward pass); jit the step yourself.
    """
    extra_args = isinstance(transform, optax.GradientTransformationExtraArgs)

    def step(params, opt_state, batch, key):
        x, t = batch
        value, grads = jax.value_and_grad(lambda p: loss.mean(apply_fn(p, x), t))(params)
        if extra_args:
            updates, opt_state = transform.update(
                grads, opt_state, params, batch=batch, key=key, value=value
            )
        else:
            updates, opt_state = transform.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    return step


def state_stats(opt_state: Any, names: Iterable[str]) -> dict[str, Any]:
    """The fields `names` that `opt_state` has (natgrad's states log them; optax's have none)."""
    return {name: getattr(opt_state, name) for name in names if hasattr(opt_state, name)}


def _loop_step(model: Model, optimizer: Optimizer) -> Callable:
    """``step(params, opt_state, key, x, t) -> (params, opt_state, key, stats)`` of `train`."""
    step = make_step(optimizer.transform, model.apply, model.loss)

    def loop_step(params, opt_state, key, x, t):
        key, sub = jax.random.split(key)
        params, opt_state, loss = step(params, opt_state, (x, t), sub)
        return params, opt_state, key, {"loss": loss, **state_stats(opt_state, AVERAGED_STATS)}

    return loop_step


def make_step_kl(model: Model) -> Callable:
    """``step_kl(before, after, x)``: the mean output KL of one step on its batch (diagnostics).

    Measured at evaluation points only, outside the timed training, beside the optimizer's
    quadratic prediction ½ dᵀF d (its state's ``step_kl``) where it has one.
    """
    return jax.jit(lambda before, after, x: output_kl(model.apply, model.loss, before, after, x))


def make_evaluate(model: Model) -> Callable:
    """``evaluate(params, x, t) -> (mean loss, accuracy or None)`` over a whole set, chunked."""

    @jax.jit
    def sums(params, x, t, mask):
        outputs = model.apply(params, x)
        loss = jnp.sum(jnp.where(mask, model.loss.nll(outputs, t), 0.0))
        if not model.classifier:
            return loss, jnp.zeros((), jnp.int32)
        correct = jnp.sum(mask & (jnp.argmax(outputs, axis=-1) == t))
        return loss, correct

    def evaluate(params, x, t):
        n = len(x)
        size = min(EVAL_CHUNK, n)
        loss, correct = 0.0, 0
        for start in range(0, n, size):
            xs, ts = x[start : start + size], t[start : start + size]
            pad = size - len(xs)
            mask = np.arange(size) < len(xs)
            if pad:
                xs = np.concatenate([xs, np.zeros((pad, *xs.shape[1:]), xs.dtype)])
                ts = np.concatenate([ts, np.zeros((pad, *ts.shape[1:]), ts.dtype)])
            chunk_loss, chunk_correct = jax.device_get(sums(params, xs, ts, mask))
            loss += float(chunk_loss)
            correct += int(chunk_correct)
        return loss / n, (correct / n if model.classifier else None)

    return evaluate


def run_identity(optimizer: Optimizer, model: Model, data, config: RunConfig) -> dict[str, Any]:
    """What determines a run's trajectory; a checkpoint must come from the same identity."""
    identity = {
        "optimizer": optimizer.name,
        "hyperparameters": optimizer.hyperparameters,
        "model": model.name,
        "sizes": list(model.sizes),
        "dataset": data.name,
        "num_train": len(data.x_train),
        "seed": config.seed,
        "batch_size": config.batch_size,
    }
    return json.loads(json.dumps(identity, default=repr))


def _placement(devices: int | None, batch_size: int):
    """(put_state, put_batch, batch sharding or None) for a run on `devices` devices.

    With a mesh the state is replicated and each batch split over the "batch" axis: XLA turns
    the batch means inside the gradient and every curvature product into all-reduces.
    """
    if devices is None:
        return (lambda tree: tree), (lambda tree: tree), None
    available = jax.device_count()
    if devices > available:
        raise RunError(f"--devices {devices}: only {available} device(s) available")
    if batch_size % devices:
        raise RunError(f"--batch-size {batch_size}: expected a multiple of --devices {devices}")
    mesh = sharding.batch_mesh(devices)
    return (
        lambda tree: sharding.replicate(tree, mesh),
        lambda tree: sharding.shard_batch(tree, mesh),
        sharding.batch_sharding(mesh),
    )


def _compile(step, state: TrainState, x_spec, t_spec):
    start = time.perf_counter()
    compiled = jax.jit(step, donate_argnums=1).lower(*state, x_spec, t_spec).compile()
    return compiled, time.perf_counter() - start


def _start_from(path, resume, initial, identity, spe, total, log):
    """(state, progress, step resumed from or None): the checkpoint's if resuming, else initial."""
    checkpoint.remove_stale_temporaries(path)  # from a writer killed mid-write
    directory = os.path.dirname(path)
    if not os.path.exists(path):
        if resume:
            log(f"{identity['optimizer']}: no checkpoint in {directory}; starting at step 0")
        return initial, Progress(), None
    if not resume:
        raise RunError(
            f"{directory} already holds a checkpoint; pass --resume to continue it "
            f"or choose another --checkpoint-dir"
        )
    state, progress = _resume(path, initial, identity, spe)
    if progress.step > total:
        raise RunError(f"checkpoint {path} is at step {progress.step}, past this run's {total}")
    log(
        f"{identity['optimizer']}: resumed from checkpoint at step {progress.step} "
        f"(epoch {progress.step // spe}, batch {progress.step % spe})"
    )
    return state, progress, progress.step


def _resume(path: str, template: TrainState, identity: dict, spe: int):
    state, record = checkpoint.load(path, template)
    saved = _field(path, record, "identity", dict, "an object")
    if saved != identity:
        diff = [k for k in identity if saved.get(k) != identity[k]]
        raise RunError(
            f"checkpoint {path} is from a different run (differs in: {', '.join(diff)}); "
            f"use another --checkpoint-dir"
        )
    return state, _progress(path, record, spe)


# The fields of a curve point (`train`'s record_point): always numbers, or numbers or null.
_CURVE_NUMBERS = ("step", "epoch", "time_seconds", "train_loss", "test_loss")
_CURVE_OPTIONAL = ("test_accuracy", "step_kl", "step_kl_predicted")


def _progress(path: str, record: dict, spe: int) -> Progress:
    """The Progress in a checkpoint's record, every field checked (an edited file fails here)."""
    saved = _field(path, record, "progress", dict, "an object")
    fields = {f.name for f in dataclasses.fields(Progress)}
    if set(saved) - fields:
        raise checkpoint.CheckpointError(
            f"checkpoint {path}: record field 'progress' has unexpected keys "
            f"{sorted(set(saved) - fields)}"
        )
    step = _field(path, saved, "step", int, "an integer >= 0", "progress.", lambda v: v >= 0)
    _field(path, saved, "train_seconds", float, "a number >= 0", "progress.", lambda v: v >= 0)
    curve = _field(path, saved, "curve", list, "a non-empty list", "progress.", len)
    for i, point in enumerate(curve):
        where = f"progress.curve[{i}]"
        if not isinstance(point, dict):
            raise checkpoint.CheckpointError(
                f"checkpoint {path}: record field {where!r} is {point!r:.40}, expected an object"
            )
        for key in _CURVE_NUMBERS:
            _field(path, point, key, float, "a number", where + ".")
        for key in _CURVE_OPTIONAL:
            _field(path, point, key, float, "a number or null", where + ".", none_ok=True)
    sums = _field(path, saved, "stat_sums", dict, "an object", "progress.")
    for key in sums:
        _field(path, sums, key, float, "a number", "progress.stat_sums.")
    epoch = _field(path, record, "epoch", int, "an integer")
    position = _field(path, record, "position", int, "an integer")
    if (epoch, position) != divmod(step, spe):
        raise RunError(f"checkpoint {path}: inconsistent position in the batch order")
    return Progress(**saved)


def _field(path, record, key, kind, expected, prefix="", ok=None, none_ok=False):
    """``record[key]`` if it is a `kind` (int for float too; never bool) and `ok` of it holds."""
    value = record.get(key)
    if none_ok and value is None:
        return value
    kinds = (int, float) if kind is float else kind
    fits = isinstance(value, kinds) and not isinstance(value, bool)
    if not fits or (ok is not None and not ok(value)):
        shown = "missing" if key not in record else f"{value!r:.40}"
        raise checkpoint.CheckpointError(
            f"checkpoint {path}: record field '{prefix}{key}' is {shown}, expected {expected}"
        )
    return value


def _save(path: str, state: TrainState, progress: Progress, identity: dict, spe: int) -> None:
    epoch, position = divmod(progress.step, spe)
    record = {
        "identity": identity,
        "progress": asdict(progress),
        "epoch": epoch,
        "position": position,
    }
    checkpoint.save(path, state, record)


def _postfix(progress: Progress, spe: int, loss: float) -> str:
    text = f"epoch {progress.step / spe:.2f} loss {loss:.4f}"
    if progress.curve and progress.curve[-1]["test_accuracy"] is not None:
        text += f" acc {progress.curve[-1]['test_accuracy']:.2%}"
    return text


def train(
    optimizer: Optimizer,
    model: Model,
    data,
    config: RunConfig,
    *,
    checkpoint_dir: str | None = None,
    checkpoint_every: int = 100,
    resume: bool = False,
    progress_bar: bool = True,
    log: Callable[[str], None] | None = None,
) -> RunResult:
    """Train `model` on `data` (a `natgrad.experiments.data.Dataset`) with `optimizer`.

    With `checkpoint_dir`, the state is checkpointed every `checkpoint_every` steps and at the
    end; `resume` continues from the checkpoint there (or starts afresh if there is none). The
    progress bar goes to stderr (tqdm hides it when stderr is not a terminal).
    """
    log = log or (lambda message: None)
    n = len(data.x_train)
    spe = steps_per_epoch(n, config.batch_size)
    total = config.total_steps(spe)
    evals = {s for s in eval_steps(spe, -(-total // spe), config.eval_every) if s < total}
    evals.add(total)
    identity = run_identity(optimizer, model, data, config)
    x_train, t_train = data.x_train, model.targets(data.x_train, data.y_train)
    x_test, t_test = data.x_test, model.targets(data.x_test, data.y_test)

    put_state, put_batch, batch_spec = _placement(config.devices, config.batch_size)
    state = init_state(model, optimizer, config.seed)
    progress, resumed_from = Progress(), None
    ckpt = checkpoint.path_in(checkpoint_dir) if checkpoint_dir else None
    if ckpt:
        state, progress, resumed_from = _start_from(ckpt, resume, state, identity, spe, total, log)
    state = put_state(state)
    # The step donates the optimizer state: buffers of its own, not shared with the parameters
    # (an optax state may hold the very arrays it was initialised from) or the caller's state.
    state = state._replace(opt_state=jax.tree.map(jnp.copy, state.opt_state))

    step = _loop_step(model, optimizer)
    x_spec = jax.ShapeDtypeStruct(
        (config.batch_size, *x_train.shape[1:]), x_train.dtype, sharding=batch_spec
    )
    t_spec = jax.ShapeDtypeStruct(
        (config.batch_size, *t_train.shape[1:]), t_train.dtype, sharding=batch_spec
    )
    compiled, compile_seconds = _compile(step, state, x_spec, t_spec)
    evaluate = make_evaluate(model)

    step_kl = make_step_kl(model)

    def record_point(step_kl_measured=None, step_kl_predicted=None):
        train_loss, _ = evaluate(state.params, x_train, t_train)
        test_loss, test_accuracy = evaluate(state.params, x_test, t_test)
        progress.curve.append(
            {
                "step": progress.step,
                "epoch": progress.step / spe,
                "time_seconds": progress.train_seconds,
                "train_loss": train_loss,
                "test_loss": test_loss,
                "test_accuracy": test_accuracy,
                "step_kl": step_kl_measured,
                "step_kl_predicted": step_kl_predicted,
            }
        )

    if progress.step == 0 and not progress.curve:
        record_point()
    bar = tqdm(
        total=total,
        initial=progress.step,
        desc=f"{optimizer.name:>14}",
        unit="step",
        file=sys.stderr,
        disable=None if progress_bar else True,
        dynamic_ncols=True,
    )
    order_epoch, order = -1, None
    with bar:
        while progress.step < total:
            epoch, position = divmod(progress.step, spe)
            if epoch != order_epoch:
                order_epoch, order = epoch, batch_order(n, config.batch_size, config.seed, epoch)
            start = time.perf_counter()
            idx = order[position]
            batch = put_batch((x_train[idx], t_train[idx]))
            *new_state, stats = compiled(*state, *batch)
            stats = jax.device_get(stats)
            progress.train_seconds += time.perf_counter() - start
            before, state = state.params, TrainState(*new_state)
            progress.step += 1
            loss = float(stats.pop("loss"))
            for name, value in stats.items():
                progress.stat_sums[name] = progress.stat_sums.get(name, 0.0) + float(value)
            if progress.step in evals:
                measured = float(step_kl(before, state.params, batch[0]))
                predicted = float(stats["step_kl"]) if "step_kl" in stats else None
                record_point(measured, predicted)
            if ckpt and (progress.step % checkpoint_every == 0 or progress.step == total):
                _save(ckpt, state, progress, identity, spe)
            bar.set_postfix_str(_postfix(progress, spe, loss), refresh=False)
            bar.update(1)

    metrics = _metrics(state, progress, spe, compile_seconds, resumed_from)
    return RunResult(optimizer.name, optimizer.hyperparameters, metrics, progress.curve, state)


def _metrics(state, progress, spe, compile_seconds, resumed_from) -> dict[str, Any]:
    last = progress.curve[-1]
    metrics: dict[str, Any] = {
        "test_accuracy": last["test_accuracy"],
        "test_loss": last["test_loss"],
        "train_loss": last["train_loss"],
        "steps": progress.step,
        "epochs": progress.step / spe,
        "train_seconds": progress.train_seconds,
        "compile_seconds": compile_seconds,
        "resumed_from_step": resumed_from,
    }
    for name in AVERAGED_STATS:
        total = progress.stat_sums.get(name)
        # One state layout: K-FAC's has cg_iterations too, always 0; no CG ran, so no mean.
        none = total is None or (name == "cg_iterations" and total == 0)
        metrics[f"mean_{name}"] = None if none else total / max(progress.step, 1)
    for name in FINAL_STATS:
        value = getattr(state.opt_state, name, None)
        metrics[f"final_{name}" if name == "damping" else name] = (
            None if value is None else jax.device_get(value).item()
        )
    return metrics
