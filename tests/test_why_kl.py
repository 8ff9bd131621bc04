"""examples/why_kl.py: natural gradient beats tuned gradient descent from every start."""

import importlib.util
import math
import os

import numpy as np
import pytest

HERE = os.path.dirname(__file__)


@pytest.fixture(scope="module")
def why_kl():
    path = os.path.join(HERE, "..", "examples", "why_kl.py")
    spec = importlib.util.spec_from_file_location("example_why_kl", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_natural_gradient_needs_fewer_iterations_from_every_start(why_kl):
    data = why_kl.sample_data(0)
    for start in why_kl.STARTS:
        # each method with its own best step size from STEP_SIZES = 1, 1/2, ..., 1/4096
        gd, ngd = why_kl.tune("gd", start, data), why_kl.tune("ngd", start, data)
        assert ngd.iterations < gd.iterations, (start, gd.iterations, ngd.iterations)
        for result in (gd, ngd):
            assert result.converged
            mu, log_sigma = result.path[-1]
            # ‖∇L‖ ≤ 1e-8 and the Hessian at the MLE is diag(1/σ², 2): |θ − θ*| ≲ σ²·1e-8
            assert mu == pytest.approx(data.mean(), abs=1e-6)
            assert math.exp(log_sigma) == pytest.approx(data.std(), abs=1e-6)
        # GD's best step is inside the grid, not capped by its largest value
        assert gd.step_size < why_kl.STEP_SIZES[0]


def test_closed_forms(why_kl):
    assert why_kl.gaussian_kl(0, 0.1, 1, 0.1) == pytest.approx(50.0)
    assert why_kl.gaussian_kl(0, 10, 1, 10) == pytest.approx(0.005)
    assert why_kl.gaussian_kl(0.3, 1.5, 0.3, 1.5) == 0
    # at the MLE the Fisher equals the Hessian ∇²L (finite differences here)
    data = why_kl.sample_data(1)
    theta = np.array([data.mean(), math.log(data.std())])
    h, eye = 1e-4, np.eye(2)
    hess = np.array(
        [
            [
                (
                    why_kl.nll(theta + h * (eye[i] + eye[j]), data)
                    - why_kl.nll(theta + h * (eye[i] - eye[j]), data)
                    - why_kl.nll(theta - h * (eye[i] - eye[j]), data)
                    + why_kl.nll(theta - h * (eye[i] + eye[j]), data)
                )
                / (4 * h * h)
                for j in range(2)
            ]
            for i in range(2)
        ]
    )
    np.testing.assert_allclose(hess, why_kl.fisher(theta), rtol=1e-5, atol=1e-6)


def test_figures_are_written(why_kl, tmp_path):
    fits = why_kl.main(["--out", str(tmp_path)])
    assert len(fits["gd"]) == len(fits["ngd"]) == len(why_kl.STARTS)
    for name in ("two_gaussians.png", "proximal_paths.png"):
        with open(tmp_path / name, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_bad_arguments_name_themselves(why_kl):
    data = why_kl.sample_data(0)
    cases = [
        ("method", lambda: why_kl.fit("adam", (0, 1), data, 0.1)),
        ("step_size", lambda: why_kl.fit("gd", (0, 1), data, 0.0)),
        ("start", lambda: why_kl.fit("gd", (0, -1), data, 0.1)),
        ("data", lambda: why_kl.fit("gd", (0, 1), [1.0, 1.0], 0.1)),
        ("step_sizes", lambda: why_kl.tune("gd", (0, 1), data, [8.0])),
    ]
    for name, call in cases:
        with pytest.raises(ValueError, match=f"^{name}:"):
            call()
