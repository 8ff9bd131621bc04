"""The time-to-target benchmark: target logic on hand-made curves, grids, and tiny end-to-end runs.

No wall-clock assertion: timings only need to be present and non-negative.
"""

import json
import math
import os

import jax
import numpy as np
import pytest

# `benchmarks` is a top-level package beside `src`: pyproject's pytest `pythonpath` adds the root.
from benchmarks import report, targets, workloads
from benchmarks import time_to_target as ttt
from benchmarks.grids import VALUES, grids
from benchmarks.timed_training import batch_order, eval_steps

import natgrad
from natgrad.experiments import data, models

CG_OPTIMIZERS = ("ngd-fisher", "ngd-empirical", "ngd-fisher-mc", "hessian-free")


def curve_run(optimizer, config, steps, seconds, metric):
    """A run record with a hand-made curve, as `timed_training.train` returns plus identity."""
    return {
        "optimizer": optimizer,
        "config": config,
        "steps": steps[-1],
        "train_seconds": seconds[-1],
        "curve": {"step": steps, "seconds": seconds, "metric": metric},
    }


# --------------------------------------------------------------------------------------------
# First crossing


def test_first_reach_returns_the_first_evaluation_at_or_past_the_target():
    steps, secs = [0, 10, 20, 30, 40], [0.0, 1.0, 2.0, 3.0, 4.0]
    acc = [0.1, 0.5, 0.85, 0.80, 0.9]
    assert targets.first_reach(steps, secs, acc, 0.85) == (20, 2.0)  # equality reaches
    assert targets.first_reach(steps, secs, acc, 0.86) == (40, 4.0)  # not the dip back at 30
    assert targets.first_reach(steps, secs, acc, 0.95) == (None, None)
    assert targets.first_reach(steps, secs, acc, 0.0) == (0, 0.0)


def test_first_reach_lower_is_better_and_skips_missing_values():
    steps, secs = [0, 10, 20, 30], [0.0, 0.5, 1.5, 2.5]
    loss = [5.0, None, float("nan"), 1.0]
    assert targets.first_reach(steps, secs, loss, 2.0, higher_is_better=False) == (30, 2.5)
    assert targets.first_reach(steps, secs, loss, 6.0, higher_is_better=False) == (0, 0.0)
    assert targets.first_reach([0, 1], [0.0, 1.0], [None, None], 1.0) == (None, None)


def test_best_per_optimizer_separates_fastest_and_fewest_steps():
    runs = [
        # cheap steps, many of them: fastest in seconds
        curve_run("adam", "lr=1", [0, 100, 200], [0.0, 1.0, 2.0], [0.1, 0.7, 0.9]),
        # expensive steps, few of them: fewest steps, slower
        curve_run("adam", "lr=2", [0, 50, 100], [0.0, 5.0, 10.0], [0.1, 0.9, 0.95]),
        curve_run("adam", "lr=3", [0, 100], [0.0, 0.1], [0.1, 0.2]),  # never reaches
        curve_run("sgd", "lr=1", [0, 100, 300], [0.0, 1.0, 3.0], [0.1, 0.2, 0.3]),
    ]
    best = targets.best_per_optimizer(runs, 0.9)
    assert list(best) == ["adam", "sgd"]
    adam = best["adam"]
    assert (adam["config"], adam["seconds"], adam["steps"]) == ("lr=1", 2.0, 200)
    assert (adam["fewest_steps"], adam["fewest_steps_config"]) == (50, "lr=2")
    assert adam["reached"] and adam["ran_seconds"] == 10.0 and adam["ran_steps"] == 200
    sgd = best["sgd"]
    assert not sgd["reached"] and sgd["seconds"] is None and sgd["fewest_steps"] is None
    assert (sgd["ran_seconds"], sgd["ran_steps"]) == (3.0, 300)


def test_goal_ratio_bounds_and_undecided_cases():
    assert targets.goal(1.0, 4.0, 4.0, 0.5) == {"ratio": 0.25, "limit": 0.5, "met": True}
    assert targets.goal(3.0, 4.0, 4.0, 0.5)["met"] is False
    # the reference never got there in 10 s: ours = 4 s ≤ 0.5 × 10 s is met, 6 s is undecided
    assert targets.goal(4.0, None, 10.0, 0.5) == {"ratio": None, "limit": 0.5, "met": True}
    assert targets.goal(6.0, None, 10.0, 0.5)["met"] is None
    assert targets.goal(None, 4.0, 4.0, 0.5)["met"] is False  # ours never got there
    assert targets.goal(None, None, 4.0, 0.5)["met"] is None  # nobody did
    assert targets.goal(0.0, 0.0, 0.0, 0.5)["met"] is None  # the target held from the start


def test_classifier_summary_goals_on_hand_made_curves():
    runs = [
        curve_run("sgd", "a", [0, 500, 1000], [0.0, 1.0, 2.0], [0.1, 0.8, 0.86]),
        curve_run("adam", "a", [0, 400, 800], [0.0, 1.0, 2.0], [0.1, 0.86, 0.88]),
        curve_run("ngd-fisher", "a", [0, 50, 100], [0.0, 0.4, 3.0], [0.1, 0.86, 0.87]),
        curve_run("hessian-free", "a", [0, 10, 20], [0.0, 5.0, 9.0], [0.1, 0.5, 0.6]),
    ]
    s85 = targets.classifier_summary(runs, 0.85)
    time_goal, steps_goal = s85["goals"]["time"], s85["goals"]["steps"]
    assert time_goal["natgrad"] == "ngd-fisher" and time_goal["ratio"] == pytest.approx(0.4)
    assert time_goal["met"] is True  # 0.4 s ≤ 0.5 × Adam's 1.0 s
    assert steps_goal["natgrad"] == "ngd-fisher" and steps_goal["ratio"] == pytest.approx(0.05)
    assert steps_goal["met"] is True  # 50 ≤ 0.1 × SGD's 1000
    assert s85["optimizers"]["ngd-fisher"]["seconds_over_adam"] == pytest.approx(0.4)
    assert s85["optimizers"]["hessian-free"]["seconds"] is None
    s88 = targets.classifier_summary(runs, 0.88)
    # SGD never reaches 88 % in 1000 steps, NGD never does either: steps undecided; time: NGD
    # never reaches, Adam does, so not met
    assert s88["goals"]["steps"]["met"] is None
    assert s88["goals"]["time"]["met"] is False
    # without any natgrad run, nothing is decided
    first_order = targets.classifier_summary(runs[:2], 0.85)
    assert first_order["goals"]["time"]["met"] is None
    assert first_order["goals"]["steps"]["natgrad"] is None


def test_autoencoder_summary_speedups():
    runs = [
        curve_run("sgd", "a", [0, 1000, 2000], [0.0, 4.0, 8.0], [500.0, 300.0, 250.0]),
        curve_run("adam", "a", [0, 500, 1000], [0.0, 2.0, 4.0], [500.0, 260.0, 240.0]),
        curve_run("ngd-fisher", "a", [0, 100], [0.0, 2.0], [500.0, 249.0]),
    ]
    s = targets.autoencoder_summary(runs, 250.0)
    ngd = s["optimizers"]["ngd-fisher"]
    assert ngd["fewer_seconds"] == pytest.approx(4.0) and ngd["fewer_updates"] == pytest.approx(20)
    assert s["optimizers"]["adam"]["fewer_seconds"] == pytest.approx(2.0)
    assert s["goals"]["time"]["speedup"] == pytest.approx(4.0) and s["goals"]["time"]["met"]
    assert s["goals"]["steps"]["speedup"] == pytest.approx(20.0) and s["goals"]["steps"]["met"]
    assert targets.autoencoder_summary(runs, None)["goals"] == {}


# --------------------------------------------------------------------------------------------
# Schedules, data, grids


def test_eval_steps_are_chunk_multiples_growing_to_the_budget():
    steps = eval_steps(1005, 10, 1.3)
    assert steps[0] == 10 and steps[-1] == 1000
    assert all(s % 10 == 0 for s in steps)
    assert all(b >= max(a + 10, 1.3 * a) for a, b in zip(steps[:-2], steps[1:-1], strict=True))
    assert eval_steps(30, 10, 2.0) == [10, 20, 30]
    assert eval_steps(5, 10, 2.0) == []


def test_batch_order_is_a_fresh_permutation_per_epoch():
    order = batch_order(100, 32, 7, seed=1)  # 3 batches per epoch, 4 examples dropped
    assert order.shape == (7, 32) and order.dtype == np.int32
    for epoch in (order[0:3], order[3:6]):
        assert len(set(epoch.ravel())) == 96
    assert not np.array_equal(order[0:3], order[3:6])
    np.testing.assert_array_equal(order, batch_order(100, 32, 7, seed=1))
    with pytest.raises(ValueError):
        batch_order(10, 32, 1, seed=0)


def test_prepare_cuts_the_training_set_and_checks_the_pixel_range():
    ds = data.synthetic(num_train=40, num_test=8, num_features=5, num_classes=2, seed=0)
    arrays = workloads.load(30, ds=ds)
    assert arrays.x_train.shape == (30, 5) and arrays.y_train.shape == (30,)
    assert arrays.x_train.dtype == np.float32 and arrays.y_train.dtype == np.int32
    assert arrays.x_test.shape == (8, 5) and arrays.name == "synthetic"
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        workloads.load(ds=ds._replace(x_test=2 * ds.x_test - 1))


@pytest.mark.parametrize("task", ["classifier", "autoencoder"])
def test_grids_cover_the_lineup_and_build(task):
    names = [g.name for g in grids(task)]
    expected = ["sgd", "adam", "ngd-fisher"]
    expected += ["ngd-empirical", "ngd-fisher-mc"] if task == "classifier" else []
    expected += ["hessian-free", "kfac"]
    assert names == expected
    model = models.mlp((4, 3, 2)) if task == "classifier" else models.autoencoder((4, 2, 4))
    for g in grids(task):
        assert len(g.values) >= 2 and len(set(g.values)) == len(g.values)
        opt = g.build(g.values[0], model.apply, model.loss)
        opt.init(model.init(jax.random.PRNGKey(0)))


def test_kfac_runs_natural_gradients_grid_of_kl_radii():
    for task in VALUES:
        kfac = [g for g in grids(task) if g.name == "kfac"]
        assert len(kfac) == 1 and kfac[0].factory is natgrad.kfac and kfac[0].takes_model
        assert kfac[0].knob == "kl_radius" and kfac[0].values == VALUES[task]["kl_radius"]


# --------------------------------------------------------------------------------------------
# End to end, tiny


def tiny_settings(**changes):
    settings = ttt.Settings(
        num_train=None,
        classifiers=(ttt.Classifier((16, 8, 4), (0.4, 0.6), steps=30, seconds=60.0),),
        autoencoder=ttt.Autoencoder((16, 6, 3, 6, 16), steps=30, seconds=60.0, eval_images=64),
        batch_size=16,
        chunk=10,
        eval_growth=1.5,
        grid_size=1,
    )
    return settings._replace(**changes)


@pytest.fixture(scope="module")
def tiny_data():
    return data.synthetic(num_train=256, num_test=128, num_features=16, num_classes=4, seed=0)


def check_curve(run, budget):
    c = run["curve"]
    assert len(c["step"]) == len(c["seconds"]) == len(c["metric"]) == len(c["batch_loss"])
    assert c["step"][0] == 0 and c["seconds"][0] == 0.0
    assert all(b > a for a, b in zip(c["step"], c["step"][1:], strict=False))
    assert all(b >= a for a, b in zip(c["seconds"], c["seconds"][1:], strict=False))
    assert run["steps"] == c["step"][-1] <= budget
    assert run["train_seconds"] == c["seconds"][-1]
    assert run["compile_seconds"] >= 0 and run["eval_seconds"] >= 0
    assert run["stopped"] in ("step_budget", "time_budget", "target_reached", "diverged")


def check_first_crossings(task, higher_is_better):
    """Each table entry is the first crossing on the curve of the config it names."""
    summaries = task["summary"] if isinstance(task["summary"], list) else [task["summary"]]
    for s in summaries:
        for name, row in s["optimizers"].items():
            if row["config"] is None:
                continue
            run = next(
                r for r in task["runs"] if (r["optimizer"], r["config"]) == (name, row["config"])
            )
            c = run["curve"]
            expect = targets.first_reach(
                c["step"], c["seconds"], c["metric"], s["target"], higher_is_better=higher_is_better
            )
            assert (row["steps"], row["seconds"]) == expect


def test_main_writes_json_report_and_plots(tmp_path, tiny_data):
    settings = tiny_settings(optimizers=("sgd", "ngd-fisher"))
    other = {"benchmark": "sharding", "mode": "quick", "throughput_4_over_1": 0.5, "runs": []}
    (tmp_path / "sharding.json").write_text(json.dumps(other))  # laid out unexpectedly
    (tmp_path / "kfac.json").write_text(json.dumps({"benchmark": "kfac", "speedup": 2.5}))
    payload = ttt.main(["--out", str(tmp_path), "--quick"], dataset=tiny_data, settings=settings)

    saved = json.loads((tmp_path / "time_to_target.json").read_text())
    json.dumps(saved, allow_nan=False)  # strict JSON: no NaN or infinity anywhere
    assert saved["benchmark"] == "time_to_target" and saved["mode"] == "quick"
    assert saved["settings"]["classifiers"][0]["sizes"] == [16, 8, 4]
    assert set(saved["grids"]["classifier"]) == {"sgd", "ngd-fisher"}
    assert saved["grids"]["autoencoder"]["ngd-fisher"]["values"] == [
        VALUES["autoencoder"]["kl_radius"][0]
    ]
    assert payload["dataset"] == saved["dataset"]

    clf = saved["classifier"]["16-8-4"]
    assert [s["target"] for s in clf["summary"]] == [0.4, 0.6]
    for s in clf["summary"]:
        assert set(s["optimizers"]) == {"sgd", "ngd-fisher"}
        assert set(s["goals"]) == {"time", "steps"}
    for run in clf["runs"]:
        check_curve(run, clf["step_budget"])
    check_first_crossings(clf, higher_is_better=True)

    ae = saved["autoencoder"]
    sgd_losses = [m for r in ae["runs"] if r["optimizer"] == "sgd" for m in r["curve"]["metric"]]
    assert ae["target"] == min(m for m in sgd_losses if m is not None)
    assert ae["summary"]["optimizers"]["sgd"]["reached"]
    assert {r["optimizer"] for r in ae["runs"]} == {"sgd", "ngd-fisher"}
    for run in ae["runs"]:
        check_curve(run, ae["step_budget"])
    check_first_crossings(ae, higher_is_better=False)
    assert set(ae["step_costs"]) == {"sgd", "ngd-fisher"}

    text = (tmp_path / "REPORT.md").read_text()
    for needle in ("## Time to target", "### Goals", "MLP 16-8-4", "Autoencoder", "## Sharding"):
        assert needle in text
    assert "unexpected layout" in text and "throughput_4_over_1: 0.5" in text
    assert "## K-FAC" in text and "speedup: 2.5" in text
    assert "met" in text and "Where the time goes" in text
    for name in ("time_to_target_mlp_16-8-4.png", "time_to_target_autoencoder.png"):
        assert (tmp_path / name).stat().st_size > 1000


def test_every_optimizer_trains_on_the_classifier(tiny_data):
    classifier = ttt.Classifier((16, 8, 4), (0.4, 0.6), steps=20, seconds=60.0)
    settings = tiny_settings(classifiers=(classifier,), autoencoder=None)
    payload = ttt.run(settings, tiny_data, mode="test")
    clf = payload["classifier"]["16-8-4"]
    names = [g.name for g in grids("classifier")]
    assert [r["optimizer"] for r in clf["runs"]] == names
    assert list(clf["summary"][0]["optimizers"]) == names
    for run in clf["runs"]:
        check_curve(run, 20)
        if run["optimizer"] in CG_OPTIMIZERS:
            assert run["mean_cg_iterations"] > 0
    assert payload["autoencoder"] is None
    json.dumps(payload, allow_nan=False)


def test_the_cnn_task_runs_kfac_with_and_without_conv_blocks(tmp_path):
    images = data.synthetic(num_train=64, num_test=32, num_features=784, num_classes=10, seed=0)
    classifier = ttt.Classifier((2, 3), (0.2, 0.3), 4, 60.0, "cnn", ("adam", "kfac"))
    settings = tiny_settings(classifiers=(classifier,), autoencoder=None, chunk=2)
    payload = ttt.run(settings, images, mode="test")
    cnn = payload["classifier"]["cnn-2-3"]
    assert cnn["model"] == ["cnn", 2, 3]
    assert [r["optimizer"] for r in cnn["runs"]] == ["adam", "kfac", "kfac-diagonal-conv"]
    for run in cnn["runs"]:
        check_curve(run, 4)
    json.dumps(payload, allow_nan=False)
    with open(tmp_path / "time_to_target.json", "w") as f:
        json.dump(payload, f)
    report.write(str(tmp_path))
    text = (tmp_path / "REPORT.md").read_text()
    assert "### CNN 2-3" in text and "kfac-diagonal-conv" in text


def test_report_without_time_to_target_summarises_the_others(tmp_path):
    curvature = {
        "benchmark": "curvature",
        "model": [784, 128, 10],
        "batch_size": 128,
        "dtype": "float32",
        "operators": {
            "ggn": {
                "product_over_grad": 1.1,
                "build_over_grad": 0.5,
                "single_call_over_grad": 1.6,
                "target": 1.2,
                "meets_target": True,
            }
        },
    }
    kfac = {
        "benchmark": "kfac",
        "model": [784, 512, 10],
        "steps": {"sgd": {"step_seconds": 0.01}, "kfac": {"step_seconds": 0.03}},
        "cg": [{"damping": 1e-3, "preconditioners": {"kfac": {"iterations": 12, "ok": True}}}],
    }
    (tmp_path / "curvature.json").write_text(json.dumps(curvature))
    (tmp_path / "kfac.json").write_text(json.dumps(kfac))
    (tmp_path / "broken.json").write_text("{")
    written = report.main(["--out", str(tmp_path)])
    assert written == [os.path.join(str(tmp_path), "REPORT.md")]
    text = (tmp_path / "REPORT.md").read_text()
    assert "## Curvature products" in text and "| ggn | 1.1 | 0.5 | 1.6 | 1.2 | yes |" in text
    # an unknown layout is shown generically, nested tables included
    assert "- model: 784, 512, 10" in text and "| kfac | 0.03 |" in text
    assert "cg[0].preconditioners:" in text and "| kfac | 12 | yes |" in text


def test_fmt_cells():
    assert report.fmt(None) == "—" and report.fmt(True) == "yes"
    assert report.fmt(0.123456) == "0.123" and report.fmt(3) == "3"
    assert report.fmt(math.inf) == "inf" and report.fmt([1.0, 2.5]) == "1, 2.5"
    assert report.fmt(1057.4) == "1057" and report.fmt(999.96) == "1000"


def test_main_without_fashion_mnist_writes_a_skipped_record(tmp_path, monkeypatch):
    monkeypatch.setattr(ttt, "load_fashion_mnist", lambda: (None, "no IDX files in /nowhere"))
    payload = ttt.main(["--out", str(tmp_path), "--quick"])
    assert payload["skipped"] and "no IDX files" in payload["reason"]
    saved = json.loads((tmp_path / "time_to_target.json").read_text())
    assert saved["skipped"] and saved["mode"] == "quick"
    assert "Skipped: Fashion-MNIST not available" in (tmp_path / "REPORT.md").read_text()
