"""The `natgrad` command when things go wrong around it (issue 18, items 6, 7 and 12).

6. A write that fails after training loses nothing: the rest is written, the table printed, the
   unwritable files go to a temp directory, and one line says so (status 1, no traceback).
7. Concurrent runs: an --out in use by a live run is refused (one line, status 2), the lock of
   a dead run is taken over, and cleaning stale temp files spares another live writer's.
12. `--version`; `train` without --checkpoint-dir; `--steps N`; `--help` imports no JAX.
"""

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from natgrad.experiments import checkpoint, cli, report, session, training

SMALL = ["--dataset", "synthetic", "--hidden", "8", "--batch-size", "64", "--no-progress"]
COMPARE = ["compare", *SMALL, "--optimizers", "sgd", "--steps", "4", "--eval-every", "1"]
TIMEOUT = 120


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _error_line(err: str) -> str:
    """The one error line after the runs' summary lines (stderr is not a terminal here)."""
    lines = [line for line in err.strip().splitlines() if not line.startswith("sgd: ")]
    return _one_line("\n".join(lines))


# --- 6: failed writes after training -----------------------------------------------------


def _spare(line: str) -> str:
    match = re.search(r"written to (\S+) instead", line)
    assert match, line
    return match.group(1)


def test_results_json_being_a_directory_loses_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    (out / "results.json").mkdir(parents=True)
    assert cli.main([*COMPARE, "--out", str(out)]) == 1
    captured = capsys.readouterr()
    line = _error_line(captured.err)
    assert "could not write" in line and str(out / "results.json") in line
    assert "| sgd |" in captured.out  # the table is printed
    assert (out / "table.md").read_text().splitlines()[2].startswith("| sgd |")
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    saved = report.load_results(os.path.join(_spare(line), "results.json"))
    assert saved["results"]["sgd"]["metrics"]["steps"] == 4


def test_out_removed_during_compare_is_made_again(tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    train = training.train

    def train_then_remove_out(*args, **kwargs):
        result = train(*args, **kwargs)
        shutil.rmtree(out)
        return result

    monkeypatch.setattr(training, "train", train_then_remove_out)
    assert cli.main([*COMPARE, "--out", str(out)]) == 0
    assert report.load_results(str(out / "results.json"))["results"]["sgd"]["metrics"]["steps"]
    assert (out / "curves.png").exists() and (out / "table.md").exists()


def test_out_replaced_by_a_file_during_train_keeps_everything_elsewhere(
    tmp_path, capsys, monkeypatch
):
    out = tmp_path / "out"
    train = training.train

    def train_then_replace_out(*args, **kwargs):
        result = train(*args, **kwargs)
        shutil.rmtree(out)
        out.write_text("in the way")
        return result

    monkeypatch.setattr(training, "train", train_then_replace_out)
    argv = ["train", "--optimizer", "sgd", *SMALL, "--steps", "3", "--out", str(out)]
    assert cli.main(argv) == 1
    captured = capsys.readouterr()
    line = _error_line(captured.err)
    for name in ("results.json", "table.md", "curves.png", "params.npz"):
        assert str(out / name) in line
        assert os.path.exists(os.path.join(_spare(line), name)), name
    assert "| sgd |" in captured.out


# --- 7: concurrent runs ------------------------------------------------------------------

HOLD = """
import sys, time
from natgrad.experiments import session
with session.claimed((sys.argv[1], "--out")):
    print("holding", flush=True)
    time.sleep(120)
"""


@contextlib.contextmanager
def _held(directory):
    """Another live process holding `directory`'s lock, as a concurrent run does."""
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(directory)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "holding"
        yield holder
    finally:
        holder.kill()
        holder.wait(timeout=TIMEOUT)


def test_an_out_in_use_by_a_live_run_is_refused_and_taken_over_once_it_died(tmp_path, capsys):
    out = tmp_path / "out"
    with _held(out) as holder:
        assert cli.main([*COMPARE, "--out", str(out)]) == 2
        line = _one_line(capsys.readouterr().err)
        assert "in use" in line and f"pid {holder.pid}" in line and str(out) in line
        assert not (out / "results.json").exists()
    # The holder died (SIGKILL): its lock file, with its pid, stays and is taken over.
    assert (out / session.LOCK_NAME).read_text().strip() == str(holder.pid)
    assert cli.main([*COMPARE, "--out", str(out)]) == 0
    assert (out / session.LOCK_NAME).read_text().strip() == str(os.getpid())


def test_the_checkpoint_dir_is_locked_too(tmp_path, capsys):
    ck = tmp_path / "ck"
    argv = ["train", "--optimizer", "sgd", *SMALL, "--steps", "2"]
    with _held(ck):
        assert cli.main([*argv, "--checkpoint-dir", str(ck), "--out", str(tmp_path / "o")]) == 2
        assert "--checkpoint-dir" in _one_line(capsys.readouterr().err)
    # --out and --checkpoint-dir may be one directory: one lock, not a conflict with itself.
    same = str(tmp_path / "same")
    assert cli.main([*argv, "--checkpoint-dir", same, "--out", same]) == 0


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait(timeout=TIMEOUT)
    return proc.pid


def test_cleaning_stale_temporaries_spares_a_live_writers_file(tmp_path):
    path = str(tmp_path / "checkpoint.npz")
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        mine = f".checkpoint.npz.{live.pid}.k2j4.tmp"
        dead = f".checkpoint.npz.{_dead_pid()}.x9q1.tmp"
        for name in (mine, dead):
            (tmp_path / name).write_bytes(b"half")
        assert checkpoint.remove_stale_temporaries(path) == [dead]
        assert sorted(os.listdir(tmp_path)) == [mine]
    finally:
        live.kill()
        live.wait(timeout=TIMEOUT)


def test_temp_files_carry_the_writers_pid(tmp_path):
    seen = []

    def write(f):
        seen.extend(n for n in os.listdir(tmp_path) if n.endswith(".tmp"))
        f.write(b"data")

    checkpoint.write_atomic(str(tmp_path / "a.json"), write)
    assert len(seen) == 1 and seen[0].startswith(f".a.json.{os.getpid()}.")


# --- 12: the first five minutes ----------------------------------------------------------


def test_version():
    import natgrad

    proc = subprocess.run(
        [sys.executable, "-m", "natgrad", "--version"],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert proc.returncode == 0 and proc.stdout.strip() == f"natgrad {natgrad.__version__}"


@pytest.mark.parametrize("argv", [["--help"], ["--version"], ["lineup", "--help"]])
def test_help_and_version_import_no_jax(argv):
    code = (
        "import sys\n"
        "from natgrad.experiments import cli\n"
        f"status = cli.main({argv!r})\n"
        "print(status, sorted(m for m in sys.modules if m == 'jax' or m.startswith('jax.')))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=TIMEOUT
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "0 []"


def test_train_needs_no_checkpoint_dir_and_stops_after_steps(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    argv = ["train", "--optimizer", "ngd-fisher", *SMALL, "--steps", "5", "--eval-every", "2"]
    assert cli.main([*argv, "--out", str(out)]) == 0
    document = report.load_results(str(out / "results.json"))
    result = document["results"]["ngd-fisher"]
    assert result["metrics"]["steps"] == 5 and document["config"]["steps"] == 5
    assert [p["step"] for p in result["curve"]] == [0, 5]
    assert (out / "params.npz").exists()
    found = [n for _, _, names in os.walk(tmp_path) for n in names if n == checkpoint.FILENAME]
    assert not found
    assert "final parameters: " + str(out / "params.npz") in capsys.readouterr().out


def test_resume_without_a_checkpoint_dir_is_one_line(tmp_path, capsys):
    argv = ["train", "--optimizer", "sgd", *SMALL, "--resume", "--out", str(tmp_path)]
    assert cli.main(argv) == 2
    assert "--checkpoint-dir" in _one_line(capsys.readouterr().err)


def test_steps_longer_than_the_epochs_continue_the_batch_order(tmp_path):
    out = tmp_path / "out"
    # synthetic: 512 training examples, batch 64: 8 steps per epoch; --steps 12 runs 1.5 epochs
    assert cli.main([*COMPARE[:-4], "--steps", "12", "--epochs", "1", "--out", str(out)]) == 0
    metrics = json.loads((out / "results.json").read_text())["results"]["sgd"]["metrics"]
    assert metrics["steps"] == 12 and metrics["epochs"] == 1.5
