import ast
import glob
import os
import re
import shutil
import subprocess
import sys
import tarfile
import textwrap
import zipfile

import pytest

from keras_stability import _startup
from tests.helpers import REPO_ROOT
from tests.helpers import Started
from tests.helpers import is_selected

# What TensorFlow's C++ runtime prints on import unless silenced.
TF_NOISE = ("oneDNN", "cuda", "cpu_feature_guard", "absl::InitializeLog")
# The launcher pip writes for `console_scripts` (pip >= 25; older pips strip
# `-script.pyw` too), pointed at this interpreter.
CONSOLE_SCRIPT = """#!{python}
import sys
from keras_stability.cli.main import main
if __name__ == '__main__':
    sys.argv[0] = sys.argv[0].removesuffix('.exe')
    sys.exit(main())
"""


def _run(*argv, env=None, timeout=300, cwd=REPO_ROOT):
    full_env = dict(os.environ)
    full_env.pop("TF_CPP_MIN_LOG_LEVEL", None)
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, *argv],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module", autouse=True)
def full_demo(request):
    """The whole demo, started when this module begins (if its test runs).

    It runs beside the module's other tests (on the second core); its test,
    last in the module, checks the output. Same command and environment as
    `_run` gives it.
    """
    if not is_selected(
        request, "test_demo_prints_loss_and_accuracy_well_above_chance_without_tf_noise"
    ):
        yield None
        return
    env = dict(os.environ)
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)
    child = Started([sys.executable, "-m", "keras_stability", "demo", "--quiet"], env)
    yield child
    child.kill()


def test_help_lists_demo_first():
    proc = _run("-m", "keras_stability", "--help")
    assert proc.returncode == 0, proc.stderr
    commands = re.findall(r"^    (\w+)\s", proc.stdout, flags=re.M)
    assert commands and commands[0] == "demo", proc.stdout


def test_demo_keeps_progress_bar_unless_quiet():
    proc = _run("-m", "keras_stability", "demo", "--parts", "example", "--epochs", "2")
    assert proc.returncode == 0, proc.stderr
    assert "Epoch 2/2" in proc.stdout and "accuracy:" in proc.stdout


def test_demo_digits():
    proc = _run(
        "-m",
        "keras_stability",
        "demo",
        "--parts",
        "example",
        "--dataset",
        "digits",
        "--epochs",
        "3",
        "--quiet",
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


def _console_script(tmp_path):
    script = tmp_path / "bin" / "keras-stability"
    script.parent.mkdir()
    script.write_text(CONSOLE_SCRIPT.format(python=sys.executable))
    script.chmod(0o755)
    return str(script)


def _run_script(script, *argv, env=None, cwd):
    # The script's own folder, not the cwd, leads sys.path: point PYTHONPATH
    # at this checkout so the child imports the package under test.
    path = os.pathsep.join(p for p in (REPO_ROOT, os.environ.get("PYTHONPATH")) if p)
    return _run(script, *argv, env={"PYTHONPATH": path, **(env or {})}, cwd=cwd)


def test_module_launch_names_itself_python_m():
    proc = _run("-m", "keras_stability", "demo", "--dataset", "nope")
    assert proc.returncode == 2
    assert proc.stderr.startswith("usage: python -m keras_stability demo "), proc.stderr
    assert "python -m keras_stability demo: error: argument --dataset" in proc.stderr


def test_console_script_is_quiet_and_names_itself(tmp_path):
    # Fails before the fix: the script printed TensorFlow's C++ start-up lines
    # and called itself `python -m keras_stability`.
    script = _console_script(tmp_path)
    proc = _run_script(script, "--help", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: keras-stability [-h] [--version] COMMAND"), (
        proc.stdout
    )
    assert "python -m" not in proc.stdout
    assert proc.stderr == "", proc.stderr  # TensorFlow was imported, silently

    proc = _run_script(script, "demo", "--dataset", "nope", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.startswith("usage: keras-stability demo "), proc.stderr
    assert (
        "keras-stability demo: error: argument --dataset: invalid choice" in proc.stderr
    )
    for noise in TF_NOISE:
        assert noise not in proc.stderr, proc.stderr


def test_installed_console_script_is_quiet(tmp_path):
    script = os.path.join(os.path.dirname(sys.executable), "keras-stability")
    if not os.path.exists(script):
        pytest.skip("the package is not installed in this interpreter's environment")
    proc = _run_script(script, "--version", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    from keras_stability.version import __version__

    assert proc.stdout.strip() == __version__
    assert proc.stderr == "", proc.stderr


@pytest.mark.parametrize(
    ("orig_argv", "argv0", "module", "script", "prog"),
    [
        (
            ["python", "-m", "keras_stability", "demo"],
            "-m",
            True,
            False,
            "python -m keras_stability",
        ),
        (
            ["python", "-X", "dev", "-m", "keras_stability"],
            "/x/keras_stability/__main__.py",
            True,
            False,
            "python -m keras_stability",
        ),
        (
            ["python", "-mkeras_stability"],
            "-m",
            True,
            False,
            "python -m keras_stability",
        ),
        (
            ["python", "-m", "pytest", "-m", "keras_stability"],
            "-m",
            False,
            False,
            "python -m keras_stability",
        ),
        (
            ["python", "-c", "pass", "-m", "keras_stability"],
            "-c",
            False,
            False,
            "python -m keras_stability",
        ),
        (
            ["python", "/venv/bin/keras-stability", "demo"],
            "/venv/bin/keras-stability",
            False,
            True,
            "keras-stability",
        ),
        (
            ["python", "C:/venv/Scripts/keras-stability-script.py"],
            "C:/venv/Scripts/keras-stability-script.py",
            False,
            True,
            "keras-stability",
        ),
        (["python", "train.py"], "train.py", False, False, "python -m keras_stability"),
        (["python"], "", False, False, "python -m keras_stability"),
    ],
)
def test_launch_detection(monkeypatch, orig_argv, argv0, module, script, prog):
    monkeypatch.setattr(sys, "orig_argv", orig_argv)
    monkeypatch.setattr(sys, "argv", [argv0])
    assert _startup.launched_as_module() is module
    assert _startup.launched_as_console_script() is script
    assert _startup.launched_as_cli() is (module or script)
    assert _startup.program_name() == prog


# Makes `import sklearn` fail in the child as on a machine without it.
NO_SKLEARN = """
import sys

class _NoScikitLearn:
    def find_spec(self, name, path=None, target=None):
        if name == "sklearn" or name.startswith("sklearn."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, _NoScikitLearn())
"""


@pytest.mark.parametrize("launch", ["module", "console script"])
def test_demo_digits_without_scikit_learn_says_what_to_install(tmp_path, launch):
    # Before: a traceback ending in an ImportError that recommended
    # `pip install keras-stability[notebooks]`, which no index serves.
    (tmp_path / "sitecustomize.py").write_text(NO_SKLEARN)
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path), REPO_ROOT])}
    argv = ["demo", "--dataset", "digits", "--parts", "example", "--quiet"]
    if launch == "module":
        proc = _run("-m", "keras_stability", *argv, env=env)
        prog = "python -m keras_stability"
    else:
        proc = _run(_console_script(tmp_path), *argv, env=env, cwd=tmp_path)
        prog = "keras-stability"
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert proc.stdout == ""
    assert proc.stderr == (
        f"{prog} demo: error: --dataset digits needs scikit-learn, which cannot be "
        "imported (No module named 'sklearn'); install it with: pip install "
        "scikit-learn\n"
    )


def _imports(path):
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield node.module
            yield from (f"{node.module}.{alias.name}" for alias in node.names)


def test_nothing_outside_cli_imports_cli():
    # The CLI is an entry point on top of the library: the package, the
    # benchmarks and the tests of everything else never import it.
    offenders = []
    for folder in ("keras_stability", "benchmarks", "tests"):
        for path in glob.glob(
            os.path.join(REPO_ROOT, folder, "**", "*.py"), recursive=True
        ):
            rel = os.path.relpath(path, REPO_ROOT)
            if rel.startswith(
                (os.path.join("keras_stability", "cli"), os.path.join("tests", "cli"))
            ):
                continue
            if rel == os.path.join("keras_stability", "__main__.py"):
                continue  # `python -m keras_stability` is the CLI's door
            bad = [
                m
                for m in _imports(path)
                if m == "keras_stability.cli" or m.startswith("keras_stability.cli.")
            ]
            if bad:
                offenders.append((rel, bad))
    assert offenders == []


@pytest.mark.slow
def test_make_dist_builds_a_wheel_and_an_sdist(tmp_path):
    # A copy of the checkout (tracked and new files, nothing ignored), so the
    # build leaves this one clean; `STAMP=` skips the .venv set-up.
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    copy = tmp_path / "repo"
    for rel in files:
        if os.path.isfile(os.path.join(REPO_ROOT, rel)):
            os.makedirs(copy / os.path.dirname(rel), exist_ok=True)
            shutil.copy2(os.path.join(REPO_ROOT, rel), copy / rel)
    proc = subprocess.run(
        ["make", "dist", "STAMP=", f"PY={sys.executable}"],
        cwd=copy,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    from keras_stability.version import __version__

    (wheel,) = glob.glob(str(copy / "dist" / "*.whl"))
    (sdist,) = glob.glob(str(copy / "dist" / "*.tar.gz"))
    assert os.path.basename(wheel) == f"keras_stability-{__version__}-py3-none-any.whl"
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        info = f"keras_stability-{__version__}.dist-info"
        metadata = z.read(f"{info}/METADATA").decode()
        entry_points = z.read(f"{info}/entry_points.txt").decode()
        license_text = z.read(f"{info}/licenses/LICENSE").decode()
    packages = {n.split("/")[0] for n in names}
    assert packages == {"keras_stability", info}, packages
    for module in (
        "keras_stability/__init__.py",
        "keras_stability/_startup.py",
        "keras_stability/cli/main.py",
        "keras_stability/models/example.py",
        "keras_stability/pruning/masks.py",
    ):
        assert module in names, module
    assert not [n for n in names if "tests/" in n or "benchmarks/" in n]
    assert "Author: The keras-stability authors" in metadata
    assert "License: Apache-2.0" in metadata
    assert "keras-stability = keras_stability.cli.main:main" in entry_points
    assert (
        "Apache License" in license_text and "Version 2.0, January 2004" in license_text
    )
    with tarfile.open(sdist) as t:
        members = t.getnames()
    root = f"keras_stability-{__version__}"
    for rel in (
        "LICENSE",
        "README.md",
        "setup.cfg",
        "pyproject.toml",
        "keras_stability/__init__.py",
    ):
        assert f"{root}/{rel}" in members, rel


@pytest.mark.slow
def test_demo_prints_loss_and_accuracy_well_above_chance_without_tf_noise(full_demo):
    # Last in the module: the demo started with it (see `full_demo`).
    proc = full_demo.finish(timeout=300)
    assert proc.returncode == 0, proc.stderr
    match = re.search(r"Test loss: ([\d.]+)\s+Test accuracy: ([\d.]+)", proc.stdout)
    assert match, proc.stdout
    loss, accuracy = float(match.group(1)), float(match.group(2))
    assert accuracy > 0.6 and loss < 1.0, (loss, accuracy)
    from keras_stability.cli.demo import PARTS

    for _, title in PARTS.values():  # every part ran, in order
        assert f"== {title} ==" in proc.stdout, proc.stdout
    # TensorFlow's C++ start-up lines are silenced by the CLI.
    for noise in TF_NOISE:
        assert noise not in proc.stderr, proc.stderr
