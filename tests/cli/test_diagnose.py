import os
import subprocess
import sys

import keras
import numpy as np
import pytest

from keras_stability.cli.main import main
from keras_stability.datasets import make_classification
from tests.helpers import REPO_ROOT


def _save(tmp_path, activation, depth, initializer="glorot_uniform", compile_model=True):
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((10,))]
        + [
            keras.layers.Dense(32, activation=activation, kernel_initializer=initializer)
            for _ in range(depth)
        ]
        + [keras.layers.Dense(10)]
    )
    if compile_model:
        model.compile(
            keras.optimizers.SGD(0.01),
            keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
    path = os.path.join(tmp_path, f"{activation}{depth}.keras")
    model.save(path)
    return path


@pytest.fixture
def data_path(tmp_path):
    x, y = make_classification(n_samples=128, seed=0)
    path = os.path.join(tmp_path, "data.npz")
    np.savez(path, x=x, y=y)
    return path


def test_healthy_model_exit_0(tmp_path, data_path, capsys):
    model_path = _save(tmp_path, "relu", 3, "he_normal")
    code = main(["diagnose", model_path, "--data", data_path, "--steps", "6"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "Trained 6 steps" in out and "Verdict: healthy." in out
    assert "0% dead units" in out


def test_deep_sigmoid_exit_1_names_layers_and_remedies(tmp_path, data_path):
    model_path = _save(tmp_path, "sigmoid", 12)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO_ROOT, env.get("PYTHONPATH")) if p)
    proc = subprocess.run(
        [sys.executable, "-m", "keras_stability", "diagnose", model_path, "--data", data_path, "--steps", "8"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Vanishing gradients in" in proc.stdout
    lines = proc.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("layer "))
    first, last = lines[header + 2], lines[header + 2 + 12]
    assert first.startswith("dense") and first.rstrip().endswith("vanishing")
    assert last.rstrip().endswith("healthy")  # the output layer
    assert "He initialisation" in proc.stdout
    assert "NOT healthy" in proc.stdout


def test_bad_inputs_exit_2(tmp_path, data_path, capsys):
    model_path = _save(tmp_path, "relu", 1)
    assert main(["diagnose", os.path.join(tmp_path, "missing.keras"), "--data", data_path]) == 2
    assert "no such file" in capsys.readouterr().err
    bad = os.path.join(tmp_path, "bad.npz")
    np.savez(bad, features=np.zeros((4, 10)))
    assert main(["diagnose", model_path, "--data", bad]) == 2
    assert "expected arrays `x` and `y`" in capsys.readouterr().err
    uncompiled = _save(tmp_path, "tanh", 1, compile_model=False)
    assert main(["diagnose", uncompiled, "--data", data_path]) == 2
    assert "not compiled" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["diagnose", model_path, "--data", data_path, "--steps", "0"])


@pytest.mark.slow
def test_demo_part_gradient_health(tmp_path):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO_ROOT, env.get("PYTHONPATH")) if p)
    proc = subprocess.run(
        [sys.executable, "-m", "keras_stability", "demo", "--parts", "gradient_health", "--quiet"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "layers flagged vanishing (dense," in proc.stdout
    assert "plain fit: weights finite=False" in proc.stdout
    assert "Same with GradientExplosionDetector:" in proc.stdout
    assert "weights finite=True" in proc.stdout
