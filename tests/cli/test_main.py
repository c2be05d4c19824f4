import os
import re
import subprocess
import sys
import textwrap

import pytest

from tests.helpers import REPO_ROOT


def _run(*argv, env=None, timeout=300):
    full_env = dict(os.environ)
    full_env.pop("TF_CPP_MIN_LOG_LEVEL", None)
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, *argv],
        cwd=REPO_ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_help_lists_demo_first():
    proc = _run("-m", "keras_stability", "--help")
    assert proc.returncode == 0, proc.stderr
    commands = re.findall(r"^    (\w+)\s", proc.stdout, flags=re.M)
    assert commands and commands[0] == "demo", proc.stdout


@pytest.mark.slow
def test_demo_prints_loss_and_accuracy_well_above_chance_without_tf_noise():
    proc = _run("-m", "keras_stability", "demo", "--quiet")
    assert proc.returncode == 0, proc.stderr
    match = re.search(r"Test loss: ([\d.]+)\s+Test accuracy: ([\d.]+)", proc.stdout)
    assert match, proc.stdout
    loss, accuracy = float(match.group(1)), float(match.group(2))
    assert accuracy > 0.6 and loss < 1.0, (loss, accuracy)
    from keras_stability.cli.demo import PARTS

    for _, title in PARTS.values():  # every part ran, in order
        assert f"== {title} ==" in proc.stdout, proc.stdout
    # TensorFlow's C++ start-up lines are silenced by the CLI.
    for noise in ("oneDNN", "cuda", "cpu_feature_guard", "absl::InitializeLog"):
        assert noise not in proc.stderr, proc.stderr


def test_demo_keeps_progress_bar_unless_quiet():
    proc = _run("-m", "keras_stability", "demo", "--parts", "example", "--epochs", "2")
    assert proc.returncode == 0, proc.stderr
    assert "Epoch 2/2" in proc.stdout and "accuracy:" in proc.stdout


def test_demo_digits():
    proc = _run(
        "-m", "keras_stability", "demo", "--parts", "example", "--dataset", "digits",
        "--epochs", "3", "--quiet",
    )
    assert proc.returncode == 0, proc.stderr
    assert "64 features" in proc.stdout
    accuracy = float(re.search(r"Test accuracy: ([\d.]+)", proc.stdout).group(1))
    assert accuracy > 0.5, proc.stdout


def test_demo_unknown_dataset_lists_choices():
    proc = _run("-m", "keras_stability", "demo", "--dataset", "nope")
    assert proc.returncode == 2
    assert "invalid choice: 'nope'" in proc.stderr
    assert "'synthetic'" in proc.stderr and "'digits'" in proc.stderr


def test_demo_unknown_part_lists_choices():
    proc = _run("-m", "keras_stability", "demo", "--parts", "example,nope")
    assert proc.returncode == 2
    assert "unknown part(s) 'nope'" in proc.stderr and "example" in proc.stderr


def test_plain_import_keeps_tensorflow_logging_and_keras_3():
    # Importing the library must not change TensorFlow's logging set-up, nor
    # route tf.keras to the legacy package.
    code = textwrap.dedent(
        """
        import os
        import keras_stability
        import tensorflow as tf
        print(os.environ.get("TF_CPP_MIN_LOG_LEVEL"))
        print(tf.keras.__version__)
        """
    )
    proc = _run("-c", code)
    assert proc.returncode == 0, proc.stderr
    level, version = proc.stdout.split()
    assert level == "None"
    assert version.startswith("3."), version


def test_make_without_venv_support_says_what_to_install(tmp_path):
    fake = tmp_path / "python3"
    fake.write_text(
        "#!/bin/sh\n"
        'case "$*" in *ensurepip*) exit 1;; esac\n'
        f'exec "{sys.executable}" "$@"\n'
    )
    fake.chmod(0o755)
    proc = subprocess.run(
        ["make", "demo", f"PYTHON={fake}", f"VENV={tmp_path / 'venv'}"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0
    assert "-m venv' is not available" in proc.stdout
    assert "python3-venv" in proc.stdout
    assert not (tmp_path / "venv").exists()
