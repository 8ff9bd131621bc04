"""`python -m benchmarks.variants`: candidate optimisers side by side on a lineup workload."""

import json

import pytest
from benchmarks import variants

from natgrad.experiments import data


def test_variants_reach_targets_and_summarise(tmp_path, capsys):
    ds = data.synthetic(num_train=1024, num_test=256, seed=3)
    out = tmp_path / "v.json"
    argv = ["mlp", "sgd=optax.sgd(0.1)", "kfac=natgrad.kfac(A, L)", "--orders", "2"]
    argv += ["--seconds", "3", "--targets", "0.5,1.01", "--json", str(out)]
    result = variants.main(argv, dataset=ds)
    summary = result["summary"]
    assert set(summary) == {"sgd", "kfac"}
    for s in summary.values():
        assert s["steps_to_target"]["0.5"] > 0 and s["seconds_to_target"]["0.5"] > 0
        assert s["steps_to_target"]["1.01"] is None  # an accuracy above 1 is never reached
        assert s["step_ms"] > 0
    assert json.loads(out.read_text())["orders"] == 2
    printed = capsys.readouterr().out
    assert "kfac order 1" in printed and "1.01: — steps / —" in printed


@pytest.mark.parametrize(
    "argv, words",
    [
        (["mlp", "no-equals-sign"], "name=expression"),
        (["mlp", "a=optax.sgd(0.1)", "--orders", "0"], "--orders"),
        (["mlp", "a=optax.sgd(0.1)", "--targets", "0.8,high"], "could not convert"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(argv, words, capsys):
    with pytest.raises(SystemExit) as e:
        variants.main(argv, dataset=data.synthetic())
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and words in err


def test_median_reach_counts_a_miss_as_infinite():
    assert variants.median_reach([10, None, 30]) == 30
    assert variants.median_reach([10, None, None]) is None
