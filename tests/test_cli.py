"""The `natgrad` command end to end: compare, determinism, kill-and-resume, bad input."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from natgrad.experiments import cli, lineup, report

NATGRAD = [sys.executable, "-m", "natgrad"]
SMALL = ["--dataset", "synthetic", "--hidden", "16", "--batch-size", "32", "--no-progress"]
TIMEOUT = 120


def _natgrad(*args, **kwargs):
    return subprocess.Popen(
        [*NATGRAD, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs
    )


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    """A download of mnist (where a network exists) never lands in the user's cache."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def _finish(proc):
    out, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 0, err
    return out, err


def _results(out_dir):
    return report.load_results(os.path.join(out_dir, "results.json"))


# --- compare ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    """The same small comparison twice, in parallel (2 cores): [(out_dir, stdout), ...]."""
    outs = [str(tmp_path_factory.mktemp(f"compare{i}")) for i in range(2)]
    args = ["compare", *SMALL, "--epochs", "2", "--eval-every", "0.5", "--seed", "3"]
    procs = [_natgrad(*args, "--out", out) for out in outs]
    return [(out, _finish(proc)[0]) for out, proc in zip(outs, procs, strict=True)]


def test_compare_writes_every_optimizer_of_the_lineup(compared):
    out, stdout = compared[0]
    names = list(lineup.default_lineup())
    document = _results(out)
    assert list(document["results"]) == names
    assert list(document["config"]["optimizers"]) == names
    assert document["config"]["optimizers"]["ngd-fisher-mc"]["damping"] == 1e-2
    assert document["config"]["seed"] == 3 and document["config"]["dataset"] == "synthetic"
    assert {"platform", "cpu_count", "jax"} <= set(document["machine"])
    num_classes = 10
    for name, result in document["results"].items():
        m = result["metrics"]
        values = [m["test_accuracy"], m["test_loss"], m["train_loss"], m["train_seconds"]]
        assert np.isfinite(values).all(), name
        assert m["test_accuracy"] > 2 / num_classes, name  # well above chance
        assert m["steps"] == 2 * (512 // 32)
        assert [p["epoch"] for p in result["curve"]] == [0, 0.5, 1, 1.5, 2]
        if name in ("sgd", "adam", "kfac"):  # no CG
            assert m["mean_cg_iterations"] is None
        else:
            assert m["mean_cg_iterations"] >= 1
    # Step KL at each evaluation: measured for all, with ½dᵀFd beside it for natural gradient.
    for name in ("sgd", "ngd-fisher"):
        for point in document["results"][name]["curve"][1:]:
            assert point["step_kl"] > 0, name
            if name == "sgd":
                assert point["step_kl_predicted"] is None
            else:
                assert 0.1 < point["step_kl"] / point["step_kl_predicted"] < 10
    table = open(os.path.join(out, "table.md")).read()
    rows = [line.split("|")[1].strip() for line in table.splitlines()[2:]]
    assert rows == names
    assert table in stdout + "\n" and os.path.join(out, "curves.png") in stdout
    with open(os.path.join(out, "curves.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_same_seed_gives_the_same_results_apart_from_timings(compared):
    (out_a, _), (out_b, _) = compared
    a, b = _results(out_a), _results(out_b)
    assert report.strip_timings(a) == report.strip_timings(b)
    assert a["results"]["sgd"]["metrics"]["train_seconds"] > 0  # timings are there, just stripped


def test_compare_on_two_devices_matches_one_device(compared, tmp_path):
    """--devices 2 shards each batch over 2 emulated CPU devices: same results, float32 noise."""
    out = str(tmp_path / "two")
    args = ["compare", *SMALL, "--epochs", "2", "--eval-every", "0.5", "--seed", "3"]
    _finish(_natgrad(*args, "--optimizers", "sgd,ngd-fisher", "--devices", "2", "--out", out))
    two = _results(out)
    one = _results(compared[0][0])
    assert two["config"]["devices"] == 2 and one["config"]["devices"] is None
    for name in ("sgd", "ngd-fisher"):
        a, b = one["results"][name], two["results"][name]
        assert b["metrics"]["steps"] == a["metrics"]["steps"]
        # Sums over the batch are reduced in another order on 2 devices: float32 rounding
        # differs, and an adaptive method (CG, LM damping) amplifies it step by step. SGD's
        # losses agree to float32 rounding (measured: equal digits). ngd-fisher's after 8 steps
        # move by ~2e-3 with any change of summation order, on one device too: measured 1.9596
        # / 1.9603 (one device, two commits whose CG differs only in where r₀ is computed) and
        # 1.9585 / 1.9619 (two devices); so 5e-3 there, and after 32 steps (0.8 %) 2 %.
        first, last = (b["curve"][1], a["curve"][1]), (b["curve"][-1], a["curve"][-1])
        rel = 1e-5 if name == "sgd" else 5e-3
        assert first[0]["train_loss"] == pytest.approx(first[1]["train_loss"], rel=rel), name
        assert last[0]["train_loss"] == pytest.approx(last[1]["train_loss"], rel=2e-2), name
        assert last[0]["train_loss"] < 0.7 * b["curve"][0]["train_loss"], name


def test_more_devices_than_exist_is_a_one_line_error(tmp_path, capsys):
    import jax

    assert jax.device_count() < 64  # backends started: main() cannot add devices in-process
    argv = ["compare", *SMALL, "--optimizers", "sgd", "--devices", "64"]
    assert cli.main([*argv, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--devices 64" in err[0]


# --- train, kill, resume ------------------------------------------------------------------

TRAIN = [
    "train", "--optimizer", "ngd-fisher-mc", *SMALL,  # ngd-fisher-mc: the RNG key matters
    "--epochs", "40", "--eval-every", "4", "--checkpoint-every", "5",
]  # fmt: skip
TOTAL_STEPS = 40 * (512 // 32)


def _params(out_dir):
    with np.load(os.path.join(out_dir, "params.npz")) as z:
        return {k: z[k] for k in z.files if k.startswith("leaf_")}


def _wait_for(path, proc, timeout=TIMEOUT):
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        assert proc.poll() is None, "training ended before its first checkpoint"
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.002)


def test_killed_and_resumed_training_ends_bitwise_like_an_uninterrupted_run(tmp_path):
    def args(i):
        return [
            *TRAIN,
            "--checkpoint-dir",
            str(tmp_path / f"ck{i}"),
            "--out",
            str(tmp_path / f"out{i}"),
        ]

    straight = _natgrad(*args(1))
    killed_args = args(2)
    victim = _natgrad(*killed_args)
    _wait_for(str(tmp_path / "ck2" / "checkpoint.npz"), victim)
    victim.send_signal(signal.SIGKILL)
    victim.communicate(timeout=TIMEOUT)
    assert victim.returncode == -signal.SIGKILL
    assert not (tmp_path / "out2" / "params.npz").exists()  # it really died mid-training
    _finish(straight)

    _, err = _finish(_natgrad(*killed_args, "--resume"))
    resumed = _results(tmp_path / "out2")["results"]["ngd-fisher-mc"]
    start = resumed["metrics"]["resumed_from_step"]
    assert 0 < start < TOTAL_STEPS and start % 5 == 0
    assert f"resumed from checkpoint at step {start}" in err

    a, b = _params(tmp_path / "out1"), _params(tmp_path / "out2")
    assert list(a) == list(b) and len(a) == 4
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].tobytes() == b[k].tobytes(), k
    # The curve and statistics carried through the checkpoint too.
    uninterrupted = _results(tmp_path / "out1")["results"]["ngd-fisher-mc"]
    assert uninterrupted["metrics"]["resumed_from_step"] is None
    for result in (resumed, uninterrupted):
        del result["metrics"]["resumed_from_step"]
    assert report.strip_timings(resumed) == report.strip_timings(uninterrupted)


def test_a_checkpoint_is_not_overwritten_without_resume(tmp_path, capsys):
    ck = tmp_path / "ck"
    ck.mkdir()
    (ck / "checkpoint.npz").write_bytes(b"x")
    args = ["train", "--optimizer", "sgd", *SMALL, "--checkpoint-dir", str(ck)]
    assert cli.main([*args, "--out", str(tmp_path / "out")]) == 2
    assert "pass --resume" in capsys.readouterr().err
    assert (ck / "checkpoint.npz").read_bytes() == b"x"
    assert cli.main([*args, "--out", str(tmp_path / "out"), "--resume"]) == 2
    assert "cannot read checkpoint" in capsys.readouterr().err


# --- bad input ----------------------------------------------------------------------------


def _bad_inputs(tmp_path):
    """case -> (argv, a string the error line must contain)."""
    out = ["--out", str(tmp_path / "out")]
    empty = tmp_path / "empty"
    empty.mkdir(exist_ok=True)
    return {
        "unknown optimizer": (["compare", *SMALL, "--optimizers", "sgd,nope", *out], "nope"),
        "unknown train optimizer": (
            ["train", "--optimizer", "nope", *SMALL, "--checkpoint-dir", str(tmp_path)],
            "ngd-fisher",
        ),
        "unknown dataset": (["compare", "--dataset", "cifar", *out], "mnist-5k"),
        "unwritable out": (["compare", *SMALL, "--out", "/proc/forbidden"], "/proc/forbidden"),
        "unwritable checkpoints": (
            ["train", "--optimizer", "sgd", *SMALL, "--checkpoint-dir", "/proc/x", *out],
            "/proc/x",
        ),
        "missing data dir": (
            ["compare", "--dataset", "mnist", "--data-dir", str(tmp_path / "nowhere"), *out],
            "nowhere",
        ),
        "no mnist in data dir": (
            ["compare", "--dataset", "mnist", "--data-dir", str(empty), *out],
            "",
        ),  # fmt: skip
        "unknown hyperparameter": (["compare", *SMALL, "--set", "sgd.lr=1", *out], "lr"),
        "bad hyperparameter": (
            ["compare", *SMALL, "--set", "ngd-fisher.kl_radius=-1", *out],
            "kl_radius",
        ),
        # optax.sgd checks nothing: natgrad's lineup refuses what would train on nonsense.
        "negative sgd rate": (
            ["compare", *SMALL, "--set", "sgd.learning_rate=-1", *out],
            "sgd.learning_rate",
        ),
        "nan sgd rate": (
            ["compare", *SMALL, "--set", "sgd.learning_rate=nan", *out],
            "sgd.learning_rate",
        ),
        "batch too large": (["compare", *SMALL, "--batch-size", "100000", *out], "batch-size"),
    }


BAD_INPUTS = [
    "unknown optimizer",
    "unknown train optimizer",
    "unknown dataset",
    "unwritable out",
    "unwritable checkpoints",
    "missing data dir",
    "no mnist in data dir",
    "unknown hyperparameter",
    "bad hyperparameter",
    "negative sgd rate",
    "nan sgd rate",
    "batch too large",
]


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_exits_2_with_one_line(case, tmp_path, capsys):
    argv, needle = _bad_inputs(tmp_path)[case]
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], captured.err
    assert "Traceback" not in captured.err and not captured.out


@pytest.mark.parametrize("case", ["unknown dataset", "unwritable out", "no mnist in data dir"])
def test_bad_input_from_the_shell_has_no_traceback(case, tmp_path):
    argv, needle = _bad_inputs(tmp_path)[case]
    proc = subprocess.run([*NATGRAD, *argv], capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and needle in proc.stderr
    assert "Traceback" not in proc.stderr


def test_help_and_lineup(capsys):
    assert cli.main(["--help"]) == 0
    assert "compare" in capsys.readouterr().out
    assert cli.main(["lineup"]) == 0
    listing = capsys.readouterr().out
    for name in lineup.default_lineup():
        assert name in listing
    assert json.dumps("empirical_fisher") in listing


def test_importing_natgrad_starts_no_jax_backend():
    """`--devices` (jax_num_cpu_devices) works only if nothing ran on a device before it."""
    code = (
        "from jax._src import xla_bridge as xb\n"
        "import natgrad, natgrad.experiments.cli as cli, natgrad.experiments.lineup as lineup\n"
        "lineup.resolve(lineup.default_lineup()); cli.build_parser()\n"
        "print(xb.backends_are_initialized())\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=TIMEOUT
    )
    assert proc.stdout.strip() == "False", proc.stderr
