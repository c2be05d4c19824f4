import json
import os
import subprocess
import sys
import zipfile

import keras
import numpy as np
import pytest

from keras_stability.cli.main import main
from keras_stability.datasets import make_classification
from tests.helpers import REPO_ROOT
from tests.helpers import Started
from tests.helpers import is_selected


@pytest.fixture(scope="module", autouse=True)
def gradient_health_demo(request):
    """The demo's gradient_health part, started when this module begins.

    It runs beside the module's other tests (on the second core); its test,
    last in the module, checks the output.
    """
    if not is_selected(request, "test_demo_part_gradient_health"):
        yield None
        return
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (REPO_ROOT, env.get("PYTHONPATH")) if p
    )
    child = Started(
        [
            sys.executable,
            "-m",
            "keras_stability",
            "demo",
            "--parts",
            "gradient_health",
            "--quiet",
        ],
        env,
    )
    yield child
    child.kill()


def _save(
    tmp_path, activation, depth, initializer="glorot_uniform", compile_model=True
):
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((10,))]
        + [
            keras.layers.Dense(
                32, activation=activation, kernel_initializer=initializer
            )
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
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (REPO_ROOT, env.get("PYTHONPATH")) if p
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "keras_stability",
            "diagnose",
            model_path,
            "--data",
            data_path,
            "--steps",
            "8",
        ],
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


# -- fault table: every bad input exits 2 with one line on stderr ---------------
#
# Each case builds its inputs in `tmp_path` from a good model (`good.keras`,
# relu, 10 features -> 10 classes) and good data (`good.npz`, 128 samples) and
# returns the command's arguments. Before this table, 12 of these printed a
# traceback and exited 1 (the "unhealthy" code).


def _good(tmp_path):
    model = os.path.join(tmp_path, "good.keras")
    if not os.path.exists(model):
        _save(tmp_path, "relu", 1, "he_normal")
        os.rename(os.path.join(tmp_path, "relu1.keras"), model)
        x, y = make_classification(n_samples=128, seed=0)
        np.savez(os.path.join(tmp_path, "good.npz"), x=x, y=y)
    return model, os.path.join(tmp_path, "good.npz")


def _write(tmp_path, name, content):
    path = os.path.join(tmp_path, name)
    with open(path, "wb") as f:
        f.write(content)
    return path


def _data(tmp_path, name="bad.npz", **arrays):
    path = os.path.join(tmp_path, name)
    np.savez(path, **arrays)
    return path


def _xy(n=128):
    return make_classification(n_samples=n, seed=0)


def _truncated(path, tmp_path, name):
    with open(path, "rb") as f:
        content = f.read()
    return _write(tmp_path, name, content[: len(content) // 2])


def _rewrite_keras_config(path, tmp_path, name, edit):
    out = os.path.join(tmp_path, name)
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(out, "w") as dst:
        for item in src.infolist():
            content = src.read(item.filename)
            if item.filename == "config.json":
                content = json.dumps(edit(json.loads(content))).encode()
            dst.writestr(item, content)
    return out


def _lambda_model(tmp_path):
    model = keras.Sequential(
        [
            keras.Input((10,)),
            keras.layers.Lambda(lambda t: t * 2),
            keras.layers.Dense(10),
        ]
    )
    model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    path = os.path.join(tmp_path, "lambda.keras")
    model.save(path)
    return path


def _unknown_layer(config):
    config["config"]["layers"][1]["class_name"] = "NoSuchLayer"
    config["config"]["layers"][1]["module"] = "no_such_package.layers"
    return config


def _case(build):
    def run(tmp_path):
        model, data = _good(tmp_path)
        return build(tmp_path, model, data)

    return run


BAD_INPUTS = {
    # model file
    "missing model": (
        _case(lambda t, m, d: [os.path.join(t, "missing.keras"), "--data", d]),
        r"missing.keras: no such file",
    ),
    "model is a directory": (
        _case(lambda t, m, d: [str(t), "--data", d]),
        r": is a directory, expected a \.keras file",
    ),
    "zero-byte model": (
        _case(lambda t, m, d: [_write(t, "empty.keras", b""), "--data", d]),
        r"empty.keras: is empty \(0 bytes\)",
    ),
    "truncated model": (
        _case(lambda t, m, d: [_truncated(m, t, "half.keras"), "--data", d]),
        r"half.keras: a truncated or damaged \.keras file \(no zip directory\)",
    ),
    "model not a zip": (
        _case(lambda t, m, d: [_write(t, "text.keras", b"not a model\n"), "--data", d]),
        r"text.keras: not a \.keras file \(a zip archive written by model.save\)",
    ),
    "npz given as the model": (
        _case(lambda t, m, d: [_rewrite_name(d, t, "data.keras"), "--data", d]),
        r"data.keras: cannot load the model \(KeyError: .*config.json",
    ),
    "Lambda layer (safe mode)": (
        _case(lambda t, m, d: [_lambda_model(t), "--data", d]),
        r"lambda.keras: cannot load the model \(ValueError: Requested the "
        r"deserialization of a `Lambda` layer .*disallowed by default\.\)$",
    ),
    "unknown layer class": (
        _case(
            lambda t, m, d: [
                _rewrite_keras_config(m, t, "unknown.keras", _unknown_layer),
                "--data",
                d,
            ]
        ),
        r"unknown.keras: cannot load the model \(TypeError: Could not locate class "
        r"'NoSuchLayer'\.",
    ),
    "uncompiled model": (
        _case(lambda t, m, d: [_save(t, "tanh", 1, compile_model=False), "--data", d]),
        r"tanh1.keras: the model is not compiled \(no optimizer or loss\)",
    ),
    "two-input model": (
        _case(lambda t, m, d: [_two_inputs(t), "--data", d]),
        r"two.keras: the model takes 2 inputs; diagnose feeds it one array, `x`",
    ),
    # data file
    "missing data": (
        _case(lambda t, m, d: [m, "--data", os.path.join(t, "missing.npz")]),
        r"missing.npz: no such file",
    ),
    "data is a directory": (
        _case(lambda t, m, d: [m, "--data", str(t)]),
        r": is a directory, expected a \.npz file",
    ),
    "zero-byte data": (
        _case(lambda t, m, d: [m, "--data", _write(t, "empty.npz", b"")]),
        r"empty.npz: is empty \(0 bytes\)",
    ),
    "truncated data": (
        _case(lambda t, m, d: [m, "--data", _truncated(d, t, "half.npz")]),
        r"half.npz: a truncated or damaged \.npz file \(no zip directory\)",
    ),
    "text file as data": (
        _case(lambda t, m, d: [m, "--data", _write(t, "notes.txt", b"x,y\n1,2\n")]),
        r"notes.txt: not an \.npz file \(expected np.savez\(path, x=x, y=y\)\)",
    ),
    "a single .npy array as data": (
        _case(lambda t, m, d: [m, "--data", _npy(t)]),
        r"x.npy: holds a single array, not an \.npz file",
    ),
    "no x or y in data": (
        _case(lambda t, m, d: [m, "--data", _data(t, features=_xy()[0])]),
        r"bad.npz: expected arrays `x` and `y` \(or `x_train` and `y_train`\); found features",
    ),
    "x without y": (
        _case(lambda t, m, d: [m, "--data", _data(t, x=_xy()[0])]),
        r"bad.npz: expected arrays `x` and `y`.*found x",
    ),
    "x and y of different lengths": (
        _case(lambda t, m, d: [m, "--data", _data(t, x=_xy()[0], y=_xy()[1][:100])]),
        r"bad.npz: `x` has 128 samples but `y` has 100",
    ),
    "wrong feature shape": (
        _case(lambda t, m, d: [m, "--data", _data(t, x=_xy()[0][:, :7], y=_xy()[1])]),
        r"bad.npz: `x` has samples of shape \(7,\) but the model takes \(10,\)",
    ),
    "empty arrays": (
        _case(
            lambda t, m, d: [
                m,
                "--data",
                _data(t, x=np.zeros((0, 10), "float32"), y=np.zeros(0, "int32")),
            ]
        ),
        r"bad.npz: `x` is empty \(0 samples\)",
    ),
    "NaN in x": (
        _case(
            lambda t, m, d: [m, "--data", _data(t, x=_with_nan(_xy()[0]), y=_xy()[1])]
        ),
        r"bad.npz: `x` has 3 NaN or infinite values",
    ),
    "string features": (
        _case(
            lambda t, m, d: [m, "--data", _data(t, x=_xy()[0].astype(str), y=_xy()[1])]
        ),
        r"bad.npz: `x` has dtype <U\d+; expected numbers",
    ),
    "non-numeric labels": (
        _case(
            lambda t, m, d: [
                m,
                "--data",
                _data(t, x=_xy()[0], y=np.array(["cat", "dog"] * 64)),
            ]
        ),
        r"bad.npz: `y` has dtype <U3; expected numbers",
    ),
    "labels out of range": (
        _case(lambda t, m, d: [m, "--data", _data(t, x=_xy()[0], y=_xy()[1] + 40)]),
        r"the model cannot be trained on .*bad.npz: InvalidArgumentError: Received a "
        r"label value of 4\d which is outside the valid range of \[0, 10\)",
    ),
}


def _rewrite_name(path, tmp_path, name):
    with open(path, "rb") as f:
        return _write(tmp_path, name, f.read())


def _two_inputs(tmp_path):
    a, b = keras.Input((10,)), keras.Input((10,))
    model = keras.Model(
        [a, b], keras.layers.Dense(10)(keras.layers.Concatenate()([a, b]))
    )
    model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    path = os.path.join(tmp_path, "two.keras")
    model.save(path)
    return path


def _npy(tmp_path):
    path = os.path.join(tmp_path, "x.npy")
    np.save(path, _xy()[0])
    return path


def _with_nan(x):
    x = x.copy()
    x[[3, 50, 70], 1] = [np.nan, np.inf, np.nan]
    return x


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_exits_2_with_one_line(tmp_path, capsys, case):
    build, message = BAD_INPUTS[case]
    argv = build(tmp_path)
    capsys.readouterr()
    code = main(["diagnose", *argv, "--steps", "2"])
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert code == 2, captured.out + captured.err
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("error: "), lines[0]
    assert __import__("re").search(message, lines[0]), lines[0]
    assert captured.out == ""


BAD_OPTIONS = {
    "steps 0": ["--steps", "0"],
    "batch size not a number": ["--batch-size", "abc"],
    "negative patience": ["--patience", "-1"],
    "no --data": None,
}


@pytest.mark.parametrize("case", BAD_OPTIONS)
def test_bad_option_exits_2_with_argparse_usage_and_one_error_line(
    tmp_path, capsys, case
):
    model, data = _good(tmp_path)
    argv = [model] + (["--data", data] + BAD_OPTIONS[case] if BAD_OPTIONS[case] else [])
    with pytest.raises(SystemExit) as info:
        main(["diagnose", *argv])
    assert info.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("usage: python -m keras_stability diagnose")
    assert lines[-1].startswith("python -m keras_stability diagnose: error: "), lines
    assert "Traceback" not in "\n".join(lines)


def test_bad_inputs_in_a_real_process_print_no_traceback(tmp_path):
    model, data = _good(tmp_path)
    truncated = _truncated(model, tmp_path, "half.keras")
    lambda_model = _lambda_model(tmp_path)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (REPO_ROOT, env.get("PYTHONPATH")) if p
    )
    script = (
        "import sys\n"
        "from keras_stability.cli.main import main\n"
        "codes = [main(['diagnose', m, '--data', d]) for m, d in "
        f"[({truncated!r}, {data!r}), ({lambda_model!r}, {data!r}), ({model!r}, {str(tmp_path)!r})]]\n"
        "print(codes)\n"
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "keras_stability",
            "diagnose",
            truncated,
            "--data",
            data,
        ],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, (
        proc.stderr
    )
    assert "Traceback" not in proc.stderr
    proc = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.stdout.strip() == "[2, 2, 2]", proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_demo_part_gradient_health(gradient_health_demo):
    # Last in the module: the demo started with it (see `gradient_health_demo`).
    proc = gradient_health_demo.finish(timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "layers flagged vanishing (dense," in proc.stdout
    assert "plain fit: weights finite=False" in proc.stdout
    assert "Same with GradientExplosionDetector:" in proc.stdout
    assert "weights finite=True" in proc.stdout
