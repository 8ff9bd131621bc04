"""benchmarks.phases: the ladder arithmetic, a real (tiny) run, and its REPORT.md section."""

from __future__ import annotations

import json
import math

import pytest
from benchmarks import phases, report
from benchmarks.timing import setup


def _samples(name, per_step, sgd, repeats=3):
    """Samples as `bench` records them: seconds per chain of `LENGTH` steps, every round alike."""
    out = {(name, i): [t * phases.LENGTH] * repeats for i, t in enumerate(per_step)}
    out["sgd"] = [sgd * phases.LENGTH] * repeats
    return out


def test_a_cg_ladder_splits_the_default_step_into_its_parts():
    rungs = [(None, None), ("1 iteration", None), ("warm", None), ("pre", None), ("rule", None)]
    ladder = {"kind": "cg", "rungs": rungs}
    # default 10, 1 iteration 6 (so 1 per iteration at k = 5), then 5, 4.5, 4; SGD 1.
    row = phases._phases("ng", ladder, _samples("ng", [10, 6, 5, 4.5, 4], 1.0), 5.0, 3)
    ms = {part: v["ms"] / 1e3 for part, v in row["phases"].items()}
    assert ms[phases.CG] == pytest.approx(5.0)
    assert ms["warm"] == pytest.approx(1.0) and ms["pre"] == pytest.approx(0.5)
    assert ms["rule"] == pytest.approx(0.5) and ms[phases.SGD] == pytest.approx(1.0)
    assert ms[phases.BOOKKEEPING] == pytest.approx(2.0)  # 4 − SGD − one iteration
    parts = [v for part, v in row["phases"].items() if part != "whole step"]
    assert sum(v["ms"] for v in parts) == pytest.approx(row["step_ms"])
    assert sum(v["percent"] for v in parts) == pytest.approx(100.0)
    assert row["phases"][phases.CG]["over_sgd"] == pytest.approx(5.0)
    assert row["cg_iterations"] == 5.0


def test_a_kfac_ladder_takes_its_application_from_its_own_timing():
    ladder = {"kind": "kfac", "rungs": [(None, None), ("inverses", None), ("statistics", None)]}
    samples = _samples("k", [3.0, 2.5, 2.0], 1.0)
    samples[("application", "k")] = [0.75 * phases.LENGTH] * 3
    row = phases._phases("k", ladder, samples, 0.0, 3)
    ms = {part: v["ms"] / 1e3 for part, v in row["phases"].items()}
    assert ms["inverses"] == pytest.approx(0.5) and ms["statistics"] == pytest.approx(0.5)
    assert ms["application A⁻¹ V G⁻¹"] == pytest.approx(0.75)
    assert ms["the rest (KL step, bookkeeping)"] == pytest.approx(0.25)
    assert row["cg_iterations"] is None and row["step_ms"] == pytest.approx(3e3)


@pytest.mark.slow
def test_a_tiny_run_measures_every_rung_and_reports_it(tmp_path, monkeypatch):
    monkeypatch.setattr(phases, "LENGTH", 5)
    params, apply_fn, batch, loss = setup((12, 6, 3), 24)  # 3 batches of 8
    problem = (params, apply_fn, batch, loss)
    payload = phases.bench(2, names=("natural_gradient", "kfac"), problem=problem, batch_size=8)
    assert payload["batch_size"] == 8 and payload["batches"] == 3
    assert set(payload["optimizers"]) == {"natural_gradient", "kfac"}
    ng = payload["optimizers"]["natural_gradient"]
    assert 1 < ng["cg_iterations"] <= 5
    for row in payload["optimizers"].values():
        assert row["step_ms"] > 0 and math.isfinite(row["step_ms"])
        parts = [v["ms"] for part, v in row["phases"].items() if part != "whole step"]
        assert sum(parts) == pytest.approx(row["step_ms"], rel=1e-6)
    payload = {"benchmark": "phases", **payload}
    (tmp_path / "phases.json").write_text(json.dumps(payload, allow_nan=False))
    report.write(str(tmp_path))
    text = (tmp_path / "REPORT.md").read_text()
    assert "## Where a step goes" in text and "**natural_gradient**" in text
    assert "| the warm start's product |" in text and "| statistics pass (amortised) |" in text


def test_the_default_problem_is_a_batch_of_real_digits():
    params, apply_fn, (x, y), loss = phases.digits_problem()
    n = phases.NUM_BATCHES * phases.BATCH_SIZE
    assert x.shape == (n, 784) and y.shape == (n,)
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0 and set(y.tolist()) == set(range(10))
    assert apply_fn(params, x).shape == (n, 10)
