"""Checkpoints: bitwise round trips, atomic writes, clear errors on a mismatched template."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import natgrad
from natgrad.experiments import checkpoint, models


def _state(seed=0):
    """A realistic training state: MLP params, a natgrad optimizer state (rho NaN), a key."""
    model = models.mlp((6, 5, 3))
    params = model.init(jax.random.PRNGKey(seed))
    opt = natgrad.natural_gradient(model.apply, model.loss, curvature="fisher_mc")
    opt_state = opt.init(params)._replace(
        direction=jax.tree.map(lambda p: p * 0.5, params), damping=jnp.float32(0.1 * seed + 0.01)
    )
    return {"params": params, "opt_state": opt_state, "key": jax.random.PRNGKey(seed + 7)}


def _bits(tree):
    return [
        (np.asarray(x).dtype, np.asarray(x).shape, np.asarray(x).tobytes())
        for x in jax.tree.leaves(tree)
    ]


def test_round_trip_is_bitwise(tmp_path):
    state = _state()
    assert np.isnan(state["opt_state"].rho)  # NaN must survive bit for bit too
    path = str(tmp_path / "ckpt.npz")
    checkpoint.save(path, state, {"step": 3, "curve": [{"loss": 0.5}]})
    loaded, record = checkpoint.load(path, _state(seed=1))  # template: same structure, other values
    assert record == {"step": 3, "curve": [{"loss": 0.5}]}
    assert jax.tree.structure(loaded) == jax.tree.structure(state)
    assert _bits(loaded) == _bits(state)
    assert isinstance(loaded["opt_state"], natgrad.NaturalGradientState)


def test_atomic_write_leaves_no_temp_files(tmp_path):
    path = str(tmp_path / "ckpt.npz")
    checkpoint.save(path, _state(), {"step": 1})
    checkpoint.save(path, _state(seed=2), {"step": 2})
    assert os.listdir(tmp_path) == ["ckpt.npz"]
    assert checkpoint.load(path, _state())[1] == {"step": 2}


def test_failed_write_keeps_the_old_file_and_no_temp(tmp_path):
    path = str(tmp_path / "ckpt.npz")
    checkpoint.save(path, _state(), {"step": 1})

    def crash(f):
        f.write(b"partial")
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError):
        checkpoint.write_atomic(path, crash)
    assert os.listdir(tmp_path) == ["ckpt.npz"]
    assert checkpoint.load(path, _state())[1] == {"step": 1}


def test_stale_temporaries_of_a_killed_writer_are_removed(tmp_path):
    path = str(tmp_path / "ckpt.npz")
    checkpoint.save(path, _state(), {"step": 1})
    (tmp_path / ".ckpt.npz.abc123.tmp").write_bytes(b"half")
    (tmp_path / "other.tmp").write_bytes(b"not ours")
    assert checkpoint.remove_stale_temporaries(path) == [".ckpt.npz.abc123.tmp"]
    assert sorted(os.listdir(tmp_path)) == ["ckpt.npz", "other.tmp"]


def test_mismatched_template_is_a_clear_error(tmp_path):
    path = str(tmp_path / "ckpt.npz")
    checkpoint.save(path, _state(), {})
    wider = models.mlp((6, 7, 3)).init(jax.random.PRNGKey(0))
    with pytest.raises(
        checkpoint.CheckpointError, match=r"array \d+ is float32\[5\].*needs float32\[7\]"
    ):
        checkpoint.load(path, {**_state(), "params": wider})
    with pytest.raises(checkpoint.CheckpointError, match="different structure"):
        checkpoint.load(path, {"params": _state()["params"]})
    doubles = jax.tree.map(
        lambda x: x.astype(jnp.float64) if x.dtype == jnp.float32 else x, _state()
    )
    with pytest.raises(checkpoint.CheckpointError, match="needs float64"):
        checkpoint.load(path, doubles)


def test_unreadable_checkpoint_is_a_clear_error(tmp_path):
    path = tmp_path / "ckpt.npz"
    path.write_bytes(b"not a zip file")
    with pytest.raises(checkpoint.CheckpointError, match="cannot read checkpoint"):
        checkpoint.load(str(path), _state())
    with pytest.raises(checkpoint.CheckpointError, match="no checkpoint"):
        checkpoint.load(str(tmp_path / "missing.npz"), _state())
