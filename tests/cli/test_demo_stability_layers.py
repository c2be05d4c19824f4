import argparse

from keras_stability.cli.demo import PARTS
from keras_stability.cli.demo import DemoContext
from keras_stability.datasets import load_dataset


def test_stability_layers_part_trains_deep_rezero_model():
    fn, title = PARTS["stability_layers"]
    args = argparse.Namespace(seed=0, epochs=3, quiet=True)
    train, test = load_dataset("synthetic", seed=0)
    said = []
    ctx = DemoContext(args, train, test)
    ctx.say = said.append
    result = fn(ctx)
    assert "ReZero" in title
    assert result["accuracy"] > 0.5  # chance is 0.1
    assert "8 ReZero residual blocks" in said[-1]
