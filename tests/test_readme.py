"""The README's code runs as pasted: every ```python block after a ``<!-- runnable`` comment.

The blocks run in order, as one script, in a fresh interpreter (no test-suite configuration such
as float64), the way a new user pastes them; then a few checks on what they left behind.
"""

import os
import re
import subprocess
import sys

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
_BLOCK = re.compile(r"^<!-- runnable[^\n]*-->\n```python\n(.*?)^```$", re.MULTILINE | re.DOTALL)

CHECKS = """
import math
assert math.isfinite(float(value))
first = float(loss.mean(apply_fn(init(k_init), x), y))
assert float(value) < first, (float(value), first)
for leaf in jax.tree.leaves(params):
    assert bool(jnp.all(jnp.isfinite(leaf)))
try:
    kfac.update(jax.tree.map(jnp.zeros_like, params), kfac_state, params, batch=(x, y))
except ValueError as err:
    assert "key" in str(err), err
else:
    raise AssertionError("kfac.update without key= did not raise")
print("README checks passed")
"""


def runnable_blocks(text: str) -> list[str]:
    """The python blocks of `text` marked runnable, in order."""
    return _BLOCK.findall(text)


def test_the_marker_finds_the_library_example():
    with open(README, encoding="utf-8") as f:
        blocks = runnable_blocks(f.read())
    assert len(blocks) >= 2
    assert "natgrad.natural_gradient(" in blocks[0] and "key=key" in blocks[1]


def test_readme_python_blocks_run_as_pasted(tmp_path):
    with open(README, encoding="utf-8") as f:
        script = "\n".join(runnable_blocks(f.read())) + CHECKS
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["OPENBLAS_NUM_THREADS"] = "1"
    proc = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "natural gradient: loss" in proc.stdout and "K-FAC: loss" in proc.stdout
    assert "README checks passed" in proc.stdout


# --- make test / make test-fast (issue 18.13) ---------------------------------------------

MAKEFILE = os.path.join(os.path.dirname(README), "Makefile")


def _recipe(target: str) -> list[str]:
    """The command lines of `target` in the Makefile."""
    with open(MAKEFILE, encoding="utf-8") as f:
        lines = f.read().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"{target}:"))
    recipe = []
    for line in lines[start + 1 :]:
        if not line.startswith("\t"):
            break
        recipe.append(line.strip())
    return recipe


def test_make_test_fast_skips_the_slow_tests_and_make_test_runs_everything():
    fast = [line for line in _recipe("test-fast") if "pytest" in line]
    full = [line for line in _recipe("test") if "pytest" in line]
    assert len(fast) == 1 and '-m "not slow"' in fast[0]
    assert len(full) == 1 and "not slow" not in full[0] and " -k " not in full[0]


def test_readme_says_how_long_make_test_takes_and_offers_test_fast():
    with open(README, encoding="utf-8") as f:
        text = " ".join(f.read().split())
    assert re.search(r"make test`? is the full suite[^.]*about \d+ minutes", text)
    assert "make test-fast" in text and "under 2 minutes" in text


def test_every_slow_test_entry_names_an_existing_test():
    """A renamed test would silently drop out of the slow list (and slow down test-fast)."""
    from conftest import slow_test_prefixes

    root = os.path.dirname(README)
    entries = slow_test_prefixes()
    assert (
        "tests/test_cli.py::test_killed_and_resumed_training_ends_bitwise_like_an_uninterrupted_run"
        in entries
    )
    for entry in entries:
        path, _, test = entry.rstrip("*").partition("::")
        assert os.path.isfile(os.path.join(root, path)), entry
        name = re.split(r"[\[*]", test)[0]
        if name:
            with open(os.path.join(root, path), encoding="utf-8") as f:
                assert re.search(rf"^def {re.escape(name)}\(", f.read(), re.MULTILINE), entry


def test_readme_names_the_models_extra_the_examples_need():
    """Issue 18.14: the extra was mentioned only in docs/model_libraries.md."""
    with open(os.path.join(os.path.dirname(README), "pyproject.toml"), encoding="utf-8") as f:
        extra = re.search(r"^models = \[(.*?)\]", f.read(), re.MULTILINE | re.DOTALL).group(1)
    with open(README, encoding="utf-8") as f:
        text = f.read()
    assert 'pip install -e ".[models]"' in text
    for package in ("flax", "equinox", "haiku"):
        assert package in extra, package
        assert package in text.split('pip install -e ".[models]"')[0].rsplit("\n\n", 1)[-1]
