"""Data-parallel SPMD: a batch sharded over 4 emulated CPU devices gives the 1-device result.

The checks run in a subprocess (tests/spmd_worker.py) because the device count is fixed when jax
is first imported.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from natgrad import sharding

HERE = os.path.dirname(__file__)


@pytest.fixture(scope="module")
def report():
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    out = subprocess.run(
        [sys.executable, os.path.join(HERE, "spmd_worker.py"), "10"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def optimizer_rows(report):
    rows = {k: v for k, v in report.items() if isinstance(v, dict)}
    assert {
        "ngd-fisher",
        "ngd-fisher_mc",
        "ngd-empirical_fisher",
        "ngd-ggn",
        "ngd-hessian",
        "hessian-free",
    } <= set(rows)
    return rows


def test_worker_saw_four_devices(report):
    assert report["devices"] == 4


def test_one_sharded_step_equals_one_device(report):
    for name, row in optimizer_rows(report).items():
        assert row["one_step_max_diff"] <= 1e-5 * max(1.0, row["param_scale"]), name


def test_ten_sharded_steps_equal_ten_on_one_device(report):
    for name, row in optimizer_rows(report).items():
        assert row["ten_step_max_diff"] <= 1e-4 * max(1.0, row["param_scale"]), name
        assert row["rejected"] == 0, name


def test_kfac_conv_and_shared_dense_blocks_are_sharded_like_the_rest(report):
    rows = optimizer_rows(report)
    none = {"dense": 0, "conv2d": 0, "embedding": 0, "scale_shift": 0}
    assert rows["kfac"]["kronecker_blocks"] == none | {"dense": 2}
    assert rows["kfac-conv2d"]["kronecker_blocks"] == none | {"dense": 1, "conv2d": 1}
    assert rows["kfac-seq-reduce"]["kronecker_blocks"] == none | {"dense": 2}
    # EKFAC, embeddings and layer norm: the equality rows above cover them too.
    assert rows["kfac-ekfac"]["kronecker_blocks"] == none | {"dense": 2}
    assert rows["kfac-ekfac-conv2d"]["kronecker_blocks"] == none | {"dense": 1, "conv2d": 1}
    blocks = none | {"dense": 1, "embedding": 1, "scale_shift": 1}
    assert rows["kfac-embed-norm"]["kronecker_blocks"] == blocks


def test_xla_reduces_across_devices_and_never_gathers_the_batch(report):
    for name, row in optimizer_rows(report).items():
        assert row["all_reduce"] >= 1, name
        assert row["all_gather"] == 0, name


def test_outputs_keep_their_sharding(report):
    for name, row in optimizer_rows(report).items():
        assert row["params_replicated"] and row["state_replicated"], name
        assert row["param_devices"] == 4, name


def test_helpers_validate_arguments():
    with pytest.raises(ValueError, match="num_devices"):
        sharding.batch_mesh(len(jax.devices()) + 1)
    mesh = sharding.batch_mesh(1)
    with pytest.raises(ValueError, match="batch"):
        sharding.shard_batch((jnp.ones(())), mesh)
    x = sharding.shard_batch(jnp.ones((4, 2)), mesh)
    assert x.shape == (4, 2)


def test_data_parallel_example_trains_on_four_devices():
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    script = os.path.join(HERE, "..", "examples", "data_parallel.py")
    out = subprocess.run(
        [sys.executable, script, "--devices", "4", "--steps", "11", "--batch-size", "64"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    lines = [line.split() for line in out.stdout.splitlines() if line.startswith("step")]
    first, last = float(lines[0][3]), float(lines[-1][3])
    assert last < first and lines[-1][5] == "4"
