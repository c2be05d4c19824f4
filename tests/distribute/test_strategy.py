import json
import os

import pytest
import tensorflow as tf

from keras_stability import distribute as ksd
from tests.helpers import free_ports
from tests.helpers import run_in_subprocess


def _config(**overrides):
    config = {
        "cluster": {"worker": ["localhost:1234", "localhost:2345"]},
        "task": {"type": "worker", "index": 1},
    }
    config.update(overrides)
    return json.dumps(config)


def test_parse_tf_config_accepts_valid_and_unset(monkeypatch):
    assert ksd.parse_tf_config(_config())["task"]["index"] == 1
    monkeypatch.delenv("TF_CONFIG", raising=False)
    assert ksd.parse_tf_config() is None
    monkeypatch.setenv("TF_CONFIG", _config())
    assert ksd.parse_tf_config()["cluster"]["worker"][0] == "localhost:1234"


@pytest.mark.parametrize(
    "text, message",
    [
        ("{nope", r"TF_CONFIG: not valid JSON"),
        ("[1]", r"expected a JSON object"),
        (_config(cluster={}), r"field `cluster`"),
        (_config(cluster={"boss": ["a:1"]}), r"`cluster.boss`: unknown task type"),
        (
            _config(cluster={"worker": "a:1"}),
            r"`cluster.worker`: expected a non-empty list",
        ),
        (
            _config(cluster={"worker": ["localhost"]}),
            r"'localhost' is\s+not a 'host:port'",
        ),
        (_config(task=None), r"field `task`"),
        (_config(task={"type": "chief", "index": 0}), r"`task.type`: 'chief'"),
        (
            _config(task={"type": "worker", "index": 2}),
            r"`task.index`.*\[0, 2\).*index=2",
        ),
        (_config(task={"type": "worker", "index": "0"}), r"`task.index`.*index='0'"),
        (_config(task={"type": "worker", "index": True}), r"`task.index`.*index=True"),
        # Found by the audit: two chiefs and port 99999999 were accepted.
        (
            _config(cluster={"chief": ["a:1", "b:2"], "worker": ["c:3"]}),
            r"`cluster.chief`: a cluster has at most one chief",
        ),
        (_config(cluster={"worker": ["localhost:99999999"]}), r"port in 1..65535"),
        (_config(cluster={"worker": ["localhost:0"]}), r"'localhost:0' is not"),
        (_config(cluster={"worker": [":1234"]}), r"':1234' is not"),
        (_config(cluster={"worker": [1234]}), r"1234 is not a 'host:port'"),
        (_config(cluster={"evaluator": ["a:1", "b:2"]}), r"at most one evaluator"),
        (
            _config(cluster={"chief": ["a:1"], "worker": ["a:1"]}),
            r"`cluster.worker`: 'a:1' is also the address of a task of `cluster.chief`",
        ),
    ],
)
def test_parse_tf_config_names_the_bad_field(text, message):
    with pytest.raises(ValueError, match=message):
        ksd.parse_tf_config(text)


def test_parse_tf_config_says_where_the_text_came_from(monkeypatch):
    with pytest.raises(ValueError, match=r"\(read from the argument `text`\)\.$"):
        ksd.parse_tf_config("{nope")
    monkeypatch.setenv("TF_CONFIG", "{nope")
    with pytest.raises(
        ValueError, match=r"\(read from the TF_CONFIG environment variable\)"
    ):
        ksd.parse_tf_config()
    with pytest.raises(
        ValueError, match=r"`text`\. Expected a string or None\. Received: text=123"
    ):
        ksd.parse_tf_config(123)


def test_chief_path_and_is_chief_check_their_arguments():
    with pytest.raises(ValueError, match=r"`strategy`.*Received: strategy='mirrored'"):
        ksd.is_chief("mirrored")
    with pytest.raises(ValueError, match=r"`path`.*Received: path=3"):
        ksd.chief_path(3)
    assert ksd.chief_path(None) is None


def test_get_strategy_without_cluster_or_devices_is_default(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    monkeypatch.delenv("TPU_NAME", raising=False)
    strategy = ksd.get_strategy()
    assert strategy is tf.distribute.get_strategy()
    assert ksd.is_chief(strategy)
    assert ksd.chief_path("/x/logs", strategy) == "/x/logs"
    assert not ksd.multi_worker_fixes_enabled()


def test_get_strategy_rejects_malformed_tf_config_and_timeout(monkeypatch):
    monkeypatch.setenv("TF_CONFIG", _config(task={"type": "worker"}))
    with pytest.raises(ValueError, match=r"`task.index`"):
        ksd.get_strategy()
    monkeypatch.delenv("TF_CONFIG")
    with pytest.raises(
        ValueError, match=r"`timeout_seconds`.*Received: timeout_seconds=0"
    ):
        ksd.get_strategy(timeout_seconds=0)
    with pytest.raises(ValueError, match=r"`tpu`.*Received: tpu=''"):
        ksd.get_strategy(tpu="")


def strategy_after_a_dataset():
    """In a fresh process with a 2-worker TF_CONFIG: a dataset, then get_strategy()."""
    import tensorflow as tf

    from keras_stability import _keras_internals
    from keras_stability import distribute as ksd

    configurable_at_start = _keras_internals.collective_ops_configurable()
    tf.data.Dataset.range(4)  # the README's order, wrong
    try:
        ksd.get_strategy()
    except RuntimeError as e:
        return configurable_at_start, str(e)
    return configurable_at_start, None


def test_get_strategy_after_a_tensorflow_op_says_to_call_it_first():
    # Before the fix: TF's "Collective ops must be configured at program startup".
    ports = free_ports(2)
    tf_config = {
        "cluster": {"worker": [f"localhost:{p}" for p in ports]},
        "task": {"type": "worker", "index": 0},
    }
    configurable_at_start, message = run_in_subprocess(
        strategy_after_a_dataset,
        n_cpu_devices=1,
        timeout=120,
        env={"TF_CONFIG": json.dumps(tf_config)},
    )
    assert configurable_at_start  # importing keras_stability ran no op
    assert message is not None
    assert message.startswith(
        "keras_stability.distribute.get_strategy() must be called before any "
        "TensorFlow op runs (before the dataset, the model or any tensor is created)"
    ), message
    assert "2 workers" in message


def test_chief_from_tf_config_outside_a_scope(monkeypatch, tmp_path):
    # Host code after fit (a plot, a diagnostic) knows its role from TF_CONFIG.
    monkeypatch.setenv("TF_CONFIG", _config())  # worker 1 of 2, no chief
    assert not ksd.is_chief()
    other = ksd.chief_path(str(tmp_path / "plot.png"))
    assert other != str(tmp_path / "plot.png")
    assert other.endswith(f"worker_1{os.sep}plot.png")
    monkeypatch.setenv("TF_CONFIG", _config(task={"type": "worker", "index": 0}))
    assert ksd.is_chief()
    assert ksd.chief_path(str(tmp_path / "plot.png")) == str(tmp_path / "plot.png")
    chief_cluster = {"chief": ["localhost:1"], "worker": ["localhost:2"]}
    monkeypatch.setenv(
        "TF_CONFIG", _config(cluster=chief_cluster, task={"type": "worker", "index": 0})
    )
    assert not ksd.is_chief()
    monkeypatch.setenv(
        "TF_CONFIG", _config(cluster=chief_cluster, task={"type": "chief", "index": 0})
    )
    assert ksd.is_chief()
