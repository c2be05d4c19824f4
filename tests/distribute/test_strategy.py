import json
import os

import pytest
import tensorflow as tf

from keras_stability import distribute as ksd


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
        (_config(cluster={"worker": "a:1"}), r"`cluster.worker`: expected a non-empty list"),
        (_config(cluster={"worker": ["localhost"]}), r"'localhost' is\s+not a 'host:port'"),
        (_config(task=None), r"field `task`"),
        (_config(task={"type": "chief", "index": 0}), r"`task.type`: 'chief'"),
        (_config(task={"type": "worker", "index": 2}), r"`task.index`.*\[0, 2\).*index=2"),
        (_config(task={"type": "worker", "index": "0"}), r"`task.index`.*index='0'"),
    ],
)
def test_parse_tf_config_names_the_bad_field(text, message):
    with pytest.raises(ValueError, match=message):
        ksd.parse_tf_config(text)


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
    with pytest.raises(ValueError, match=r"`timeout_seconds`.*Received: timeout_seconds=0"):
        ksd.get_strategy(timeout_seconds=0)


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
    monkeypatch.setenv("TF_CONFIG", _config(cluster=chief_cluster, task={"type": "worker", "index": 0}))
    assert not ksd.is_chief()
    monkeypatch.setenv("TF_CONFIG", _config(cluster=chief_cluster, task={"type": "chief", "index": 0}))
    assert ksd.is_chief()
