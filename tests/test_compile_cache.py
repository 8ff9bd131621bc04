"""The `natgrad` command keeps compiled steps in JAX's persistent compilation cache.

Each run is a fresh process (the cache outlives processes, not the in-memory one); a listener on
JAX's own monitoring events counts the cache hits.
"""

import json
import os
import subprocess
import sys

from natgrad.experiments import cli

RUN = """
import sys, jax
hits = []
jax.monitoring.register_event_listener(
    lambda event, **kw: hits.append(event) if event.endswith("/cache_hits") else None
)
from natgrad.experiments import cli
status = cli.main(sys.argv[1:])
print("HITS", len(hits))
sys.exit(status)
"""
ARGS = ["--dataset", "synthetic", "--hidden", "8", "--batch-size", "32", "--steps", "2"]


def _compare(tmp_path, cache, *flags):
    env = {**os.environ, "NATGRAD_CACHE_DIR": str(cache)}
    argv = [*flags, "compare", *ARGS, "--optimizers", "ngd-fisher", "--no-progress"]
    argv += ["--out", str(tmp_path / "out")]
    proc = subprocess.run(
        [sys.executable, "-c", RUN, *argv], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    hits = int(proc.stdout.split("HITS")[-1])
    with open(tmp_path / "out" / "results.json") as f:
        compile_seconds = json.load(f)["results"]["ngd-fisher"]["metrics"]["compile_seconds"]
    return hits, sorted(os.listdir(cache)), compile_seconds


def test_a_second_run_reads_the_steps_the_first_wrote(tmp_path):
    cache = tmp_path / "jax-cache"
    hits, written, _ = _compare(tmp_path, cache)
    steps = [name for name in written if name.startswith("jit_loop_step-")]
    assert hits == 0 and len(steps) == 1  # the training step was written
    # Read back, not compiled anew. (Which small programs pass the cache's compile-time
    # threshold depends on the machine's load, so other entries may come and go.)
    hits, again, _ = _compare(tmp_path, cache)
    assert hits >= 1 and [name for name in again if name.startswith("jit_loop_step-")] == steps
    hits, _, _ = _compare(tmp_path, cache, "--no-compile-cache")
    assert hits == 0


def test_the_cache_directory_and_how_to_turn_it_off(monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", "/somewhere/xdg")
    monkeypatch.delenv("NATGRAD_CACHE_DIR", raising=False)
    assert cli.cache_dir() == "/somewhere/xdg/natgrad/jax"
    monkeypatch.setenv("NATGRAD_CACHE_DIR", "/elsewhere")
    assert cli.cache_dir() == "/elsewhere"
    for off in ("off", "", "0"):
        monkeypatch.setenv("NATGRAD_CACHE_DIR", off)
        assert cli.cache_dir() is None


def test_importing_natgrad_or_the_benchmarks_leaves_the_jax_configuration_alone(tmp_path):
    code = (
        "import jax, natgrad, natgrad.experiments.cli, benchmarks.timing\n"
        "assert jax.config.jax_compilation_cache_dir is None\n"
        "assert jax.config.jax_persistent_cache_min_compile_time_secs == 1.0  # JAX's default\n"
    )
    env = {**os.environ, "NATGRAD_CACHE_DIR": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
