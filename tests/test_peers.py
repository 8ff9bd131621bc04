"""The peers lineup end to end on a tiny workload: JSON schema, and failed peers keep their row."""

import json

import numpy as np
import pytest
from benchmarks import grids, workloads
from benchmarks.peers import runner

from natgrad.experiments import data

TINY = {
    "num_train": 512,
    "num_test": 256,
    "seeds": 2,
    "grid": 2,
    "workloads": {"mlp": (32, (0.3, 0.5), 20, 30.0)},
    "scaling": ((32,), 0.3, 20, 30.0, 1),
}


def test_tiny_lineup_schema_and_failed_rows(tmp_path, monkeypatch):
    ds = data.synthetic(num_train=512, num_test=256, num_features=784, num_classes=10, seed=0)
    monkeypatch.setitem(workloads.MODES, "quick", TINY)
    monkeypatch.setattr(workloads, "load_data", lambda mode: ds)
    monkeypatch.setattr(runner, "SCALING", ("adam",))
    monkeypatch.setenv("PEERS_PYTHON", str(tmp_path / "no-such-python"))
    build = grids.build

    def broken(key, *args):
        if key == "psgd-kron":
            raise ImportError("No module named 'psgdax'")
        return build(key, *args)

    monkeypatch.setattr(grids, "build", broken)
    keys = ["adam", "sgd-momentum", "psgd-kron", "kfac-jax"]
    runner.main(["--quick", "--out", str(tmp_path), "--optimizers", *keys])

    result = json.loads((tmp_path / "peers-quick.json").read_text())
    rows = result["workloads"]["mlp"]["optimizers"]
    assert list(rows) == keys
    assert rows["psgd-kron"]["status"].startswith("failed: ImportError")
    assert rows["kfac-jax"]["status"].startswith("failed: ")
    assert rows["psgd-kron"]["runs"] == [] and rows["kfac-jax"]["runs"] == []
    for key in ("adam", "sgd-momentum"):
        row = rows[key]
        assert row["status"] == "ok" and len(row["grid"]) == 2 and len(row["runs"]) == 2
        assert [r["seed"] for r in row["runs"]] == [0, 1]
        for run in row["runs"]:
            assert run["grid_point"] == row["chosen"]
            assert set(run["steps_to_target"]) == set(run["seconds_to_target"]) == {"0.3", "0.5"}
            assert isinstance(run["diverged"], bool) and run["compile_seconds"] > 0
            assert run["step_seconds"] > 0 and np.isfinite(run["final_metric"])
            assert run["curve"]["step"][0] == 0 and run["steps"] <= 20
    points = result["batch_scaling"]["optimizers"]["adam"]
    assert [p["batch_size"] for p in points] == [32]
    report = (tmp_path / "REPORT-peers-quick.md").read_text()
    assert "| psgd-kron | failed: ImportError" in report
    # Parts run side by side merge into one result and report: every workload, the scaling.
    a = {k: v for k, v in result.items() if k != "batch_scaling"} | {"total_seconds": 5.0}
    b = result | {"workloads": {"mlp-b": result["workloads"]["mlp"]}, "total_seconds": 7.0}
    paths = []
    for name, part in (("a", a), ("b", b)):
        paths.append(str(tmp_path / f"part-{name}.json"))
        (tmp_path / f"part-{name}.json").write_text(json.dumps(part))
    merged = runner.main(["--merge", *paths, "--out", str(tmp_path / "merged")])
    assert list(merged["workloads"]) == ["mlp", "mlp-b"] and merged["total_seconds"] == 7.0
    assert merged["batch_scaling"] == result["batch_scaling"]
    report = (tmp_path / "merged" / "REPORT-peers-quick.md").read_text()
    assert "2 parts side by side, 5 s, 7 s." in report and "## mlp-b" in report


def test_unknown_optimizer_is_rejected(capsys):
    with pytest.raises(SystemExit) as exc:
        runner.main(["--quick", "--optimizers", "lion"])
    assert exc.value.code == 2


def test_missing_dataset_exits_2_with_one_line(monkeypatch, capsys):
    def missing(mode):
        raise data.DataNotFoundError("fashion-mnist: no IDX files")

    monkeypatch.setattr(workloads, "load_data", missing)
    with pytest.raises(SystemExit) as exc:
        runner.main(["--quick", "--optimizers", "adam"])
    assert exc.value.code == 2
    assert capsys.readouterr().err.count("\n") == 1
