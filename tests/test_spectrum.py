"""`natgrad spectrum` on small synthetic data, called directly through its parser."""

import json
import os

import numpy as np
import pytest

from natgrad.experiments import cli, spectrum

SMALL = ["--dataset", "synthetic", "--hidden", "8", "--batch-size", "64", "--no-progress"]


def _parse(*argv):
    return cli.build_parser("spectrum").parse_args(["spectrum", *argv])


def test_spectrum_writes_json_and_figure(tmp_path, capsys):
    out = str(tmp_path / "spectrum")
    options = "--epochs 1 --num-iterations 12 --num-probes 2 --top-k 4".split()
    args = _parse(*SMALL, *options, "--out", out)
    assert args.handler is spectrum.run and args.curvature == "ggn"
    assert args.optimizer == "ngd-fisher"
    assert spectrum.run(args) == 0
    with open(os.path.join(out, "spectrum.json")) as f:
        document = json.load(f)
    assert document["num_parameters"] == 784 * 8 + 8 + 8 * 10 + 10
    assert document["num_iterations"] == 12 and document["batch_size"] == 64
    assert document["config"]["dataset"] == "synthetic"
    log_grid = np.log10(document["density"]["grid"])
    for name in ("init", "trained"):
        state = document["states"][name]
        top = np.asarray(state["top_eigenvalues"])
        assert top.shape == (4,) and np.all(np.diff(top) <= 0) and top[0] > 0
        assert np.asarray(state["ritz_weights"]).shape == (2, 12)
        assert np.trapezoid(state["density"], log_grid) == pytest.approx(1.0, abs=1e-6)
        assert 0 <= state["mass_below_floor"] <= 1
        assert state["optimizer_damping"] > 0 and state["suggested_damping"] > 0
    assert (
        document["states"]["init"]["top_eigenvalues"]
        != document["states"]["trained"]["top_eigenvalues"]
    )
    with open(os.path.join(out, "spectrum.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "init:" in printed and "trained:" in printed and "spectrum.json" in printed


def test_spectrum_rejects_top_k_above_the_iterations(tmp_path):
    args = _parse(*SMALL, "--top-k", "50", "--num-iterations", "20", "--out", str(tmp_path))
    with pytest.raises(cli.UsageError, match="--top-k"):
        spectrum.run(args)


def test_spectrum_options_are_checked_by_the_parser():
    for bad in (["--num-probes", "0"], ["--max-condition", "1"], ["--curvature", "adam"]):
        with pytest.raises(cli.UsageError, match=bad[0]):
            _parse(*SMALL, *bad)
