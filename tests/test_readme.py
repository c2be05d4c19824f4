"""Every ```python block of README.md runs as written.

Each block runs on its own: in a fresh namespace (nothing defined
beforehand, not even its imports), in its own empty folder, as `__main__`.
A block that leans on a name defined in another block, or keeps a `...`
placeholder, fails here as it would for a reader who pastes it. To pay for
TensorFlow's import once, the blocks run one after another in one child
interpreter, with `keras.backend.clear_session()` between them. The
multi-worker block (the one calling `get_strategy`) also runs as two worker
processes on loopback, as its text says.
"""

import ast
import json
import os
import re
import subprocess
import sys

import pytest

from tests.helpers import REPO_ROOT
from tests.helpers import free_ports

README = os.path.join(REPO_ROOT, "README.md")
FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```[ \t]*$", re.M | re.S)
# Fence languages the README may use besides `python`, none of them Python.
OTHER_LANGUAGES = {"console", "text", ""}


def _blocks():
    with open(README) as f:
        text = f.read()
    blocks = []
    for match in FENCE.finditer(text):
        language, code = match.group(1).strip(), match.group(2)
        line = text.count("\n", 0, match.start()) + 1
        heading = re.findall(r"^#+ (.+)$", text[: match.start()], re.M)
        blocks.append((language, code, line, heading[-1] if heading else ""))
    return blocks


PYTHON_BLOCKS = [
    (code, line, heading)
    for language, code, line, heading in _blocks()
    if language == "python"
]


def _id(block):
    _, line, heading = block
    return f"line{line}-{re.sub(r'[^A-Za-z0-9]+', '_', heading).strip('_')[:30]}"


def _env(**extra):
    env = dict(os.environ)
    env.pop("TF_CONFIG", None)
    env.update(
        TF_CPP_MIN_LOG_LEVEL="3",
        MPLBACKEND="Agg",
        # The blocks import this checkout's package from an empty folder.
        PYTHONPATH=os.pathsep.join(
            p for p in (REPO_ROOT, os.environ.get("PYTHONPATH")) if p
        ),
        **extra,
    )
    return env


def _start(code, cwd, name="block.py", **env):
    path = os.path.join(cwd, name)
    with open(path, "w") as f:
        f.write(code)
    return subprocess.Popen(
        [sys.executable, path],
        cwd=cwd,
        env=_env(**env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _finish(proc, timeout=300):
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        output, _ = proc.communicate()
        raise AssertionError(
            f"timed out after {timeout} s:\n{output[-5000:]}"
        ) from None
    return proc.returncode, output


def test_readme_blocks_are_python_or_marked_as_something_else():
    languages = [language for language, *_ in _blocks()]
    assert set(languages) - {"python"} <= OTHER_LANGUAGES, languages
    # The quickstart, the Keras example, the API sections and multi-worker.
    assert len(PYTHON_BLOCKS) >= 10, len(PYTHON_BLOCKS)


@pytest.mark.parametrize("block", PYTHON_BLOCKS, ids=[_id(b) for b in PYTHON_BLOCKS])
def test_readme_block_has_no_placeholder(block):
    code, line, _ = block
    tree = ast.parse(code, f"README.md:{line}")
    placeholders = [
        node.lineno
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and node.value is Ellipsis
    ]
    assert placeholders == [], (
        f"`...` on line(s) {placeholders} of the block at README.md:{line}"
    )


# Runs every block of the JSON file argv[1] in a fresh namespace and its own
# folder under argv[2]; writes {line: {"error": traceback or None, "output"}}.
RUNNER = """
import contextlib, io, json, os, sys, time, traceback

import keras

blocks, root, results_path = json.load(open(sys.argv[1])), sys.argv[2], sys.argv[3]
results = {}
for block in blocks:
    folder = os.path.join(root, "block%d" % block["line"])
    os.makedirs(folder)
    os.chdir(folder)
    out = io.StringIO()
    error = None
    start = time.perf_counter()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            code = compile(block["code"], "README.md:%d" % block["line"], "exec")
            exec(code, {"__name__": "__main__"})
        except BaseException:
            error = traceback.format_exc()
    keras.backend.clear_session()
    results[block["line"]] = {"error": error, "output": out.getvalue()[-3000:]}
    print("README.md:%d %s in %.1f s" % (
        block["line"], "failed" if error else "ok", time.perf_counter() - start), flush=True)
json.dump(results, open(results_path, "w"))
"""


@pytest.fixture(scope="module")
def block_results(tmp_path_factory):
    """Runs the blocks in two child interpreters side by side (alternate
    blocks each, in README order): the test process only waits, so the two
    use the 2 cores of a small machine."""
    root = tmp_path_factory.mktemp("readme")
    with open(root / "runner.py", "w") as f:
        f.write(RUNNER)
    procs = []
    for part in range(2):
        folder = root / f"part{part}"
        folder.mkdir()
        blocks = [
            {"code": code, "line": line} for code, line, _ in PYTHON_BLOCKS[part::2]
        ]
        with open(folder / "blocks.json", "w") as f:
            json.dump(blocks, f)
        command = [
            sys.executable,
            str(root / "runner.py"),
            str(folder / "blocks.json"),
            str(folder),
            str(folder / "results.json"),
        ]
        procs.append(
            (
                folder,
                subprocess.Popen(
                    command,
                    cwd=folder,
                    env=_env(),
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                ),
            )
        )
    results = {}
    for folder, proc in procs:
        stdout, stderr = proc.communicate(timeout=900)
        assert proc.returncode == 0, stdout + stderr[-5000:]
        with open(folder / "results.json") as f:
            results.update({int(k): v for k, v in json.load(f).items()})
    return results


@pytest.mark.parametrize("block", PYTHON_BLOCKS, ids=[_id(b) for b in PYTHON_BLOCKS])
def test_readme_block_runs_alone(block, block_results):
    _, line, _ = block
    result = block_results[line]
    assert result["error"] is None, (
        f"README.md:{line} failed:\n{result['error']}\noutput (end):\n{result['output']}"
    )


MULTI_WORKER = [b for b in PYTHON_BLOCKS if "get_strategy(" in b[0]]


@pytest.mark.distributed
@pytest.mark.parametrize("block", MULTI_WORKER, ids=[_id(b) for b in MULTI_WORKER])
def test_readme_multi_worker_block_runs_on_two_workers(block, tmp_path):
    # The same script on each worker, only TF_CONFIG's index differs; both
    # share the working folder as they would share storage on a cluster.
    code, line, _ = block
    ports = free_ports(2)
    cluster = {"worker": [f"localhost:{port}" for port in ports]}
    procs = [
        _start(
            code,
            str(tmp_path),
            name=f"worker{index}.py",
            TF_CONFIG=json.dumps(
                {"cluster": cluster, "task": {"type": "worker", "index": index}}
            ),
        )
        for index in range(2)
    ]
    results = [_finish(proc) for proc in procs]
    for index, (returncode, output) in enumerate(results):
        assert returncode == 0, f"worker {index} of README.md:{line}:\n{output[-5000:]}"
        # One replica per worker, all-reduced; worker 0 is the chief.
        assert f"2 replica(s), chief: {index == 0}" in output, output[-5000:]
    assert os.path.isdir(tmp_path / "logs")  # written by the chief


def test_readme_states_the_multi_worker_order():
    with open(README) as f:
        text = " ".join(f.read().split())
    assert (
        "call `get_strategy()` first, before any dataset, model, layer or tensor is made"
        in text
    )
    (block,) = MULTI_WORKER
    code = block[0]
    first_tensor = min(
        code.index(w) for w in ("load_dataset(", "tf.data", "build_example_model(")
    )
    assert code.index("get_strategy(") < first_tensor
