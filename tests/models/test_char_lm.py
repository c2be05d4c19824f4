"""`generate`: temperature, greedy decoding at temperature 0, top-k sampling."""

import collections

import numpy as np
import pytest

from keras_stability.models import build_char_transformer
from keras_stability.models import generate

VOCAB = list("abcdef")
# Next-character log-probabilities the model is made to give at every step,
# whatever the input: a > b > c > d > e > f.
BIAS = np.array([2.0, 1.5, 1.0, 0.5, 0.0, -0.5], dtype="float32")


@pytest.fixture(scope="module")
def fixed_model():
    """A char LM whose logits are BIAS at every position (zero logits kernel)."""
    model = build_char_transformer(
        len(VOCAB), 8, num_blocks=1, hidden_dim=8, num_heads=2
    )
    layer = model.get_layer("logits")
    kernel, _ = layer.get_weights()
    layer.set_weights([np.zeros_like(kernel), BIAS])
    return model


def counts(model, n=300, **kwargs):
    text = generate(model, VOCAB, "a", length=n, **kwargs)
    assert len(text) == n + 1 and text[0] == "a"
    return collections.Counter(text[1:])


def test_temperature_zero_is_greedy_for_every_seed(fixed_model):
    for seed in (0, 1, 2):
        assert generate(
            fixed_model, VOCAB, "ab", length=20, temperature=0, seed=seed
        ) == ("ab" + "a" * 20)


def test_top_k_samples_only_the_k_most_likely_characters(fixed_model):
    full = counts(fixed_model, temperature=1.0)
    # Without top-k every character shows up (f has probability ~3%).
    assert set(full) == set(VOCAB), full
    top2 = counts(fixed_model, temperature=1.0, top_k=2)
    assert set(top2) == {"a", "b"}, top2
    # Renormalized over a and b: p(a) = 1 / (1 + e^-0.5) = 0.62.
    assert 0.55 < top2["a"] / 300 < 0.70, top2
    top1 = counts(fixed_model, temperature=1.0, top_k=1, seed=5)
    assert top1 == {"a": 300}
    # top_k equal to the vocabulary size is plain sampling, same draws.
    assert counts(fixed_model, temperature=1.0, top_k=len(VOCAB)) == full


def test_lower_temperature_concentrates_the_samples(fixed_model):
    hot = counts(fixed_model, temperature=2.0)
    cold = counts(fixed_model, temperature=0.25)
    # At T=0.25 p(a) = 1 / sum(exp(-4 * [0, .5, 1, 1.5, 2, 2.5])) = 0.86.
    assert cold["a"] > 0.8 * 300 > hot["a"], (cold, hot)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"top_k": 0}, "top_k"),
        ({"top_k": 7}, "top_k"),
        ({"top_k": 2.5}, "top_k"),
        ({"top_k": True}, "top_k"),
        ({"temperature": -0.1}, "temperature"),
    ],
)
def test_bad_arguments_name_the_argument(fixed_model, kwargs, name):
    with pytest.raises(ValueError, match=f"Invalid value for argument `{name}`"):
        generate(fixed_model, VOCAB, "a", length=2, **kwargs)


def _small_model(bias):
    model = build_char_transformer(
        len(VOCAB), 8, num_blocks=1, hidden_dim=8, num_heads=2
    )
    layer = model.get_layer("logits")
    kernel, _ = layer.get_weights()
    layer.set_weights([np.zeros_like(kernel), np.asarray(bias, "float32")])
    return model


def test_generate_traces_once_per_model_and_reads_the_current_weights():
    from keras_stability.models import char_lm

    model = _small_model(BIAS)
    assert generate(model, VOCAB, "a", length=5, temperature=0) == "a" + "a" * 5
    forward = char_lm._FORWARDS[model][1]
    # New values in the same variables: the cached trace reads them.
    model.get_layer("logits").bias.assign(BIAS[::-1])
    assert generate(model, VOCAB, "a", length=5, temperature=0) == "a" + "f" * 5
    assert char_lm._FORWARDS[model][1] is forward
    # Quantized in place (the kernel variables replaced): traced again.
    from keras_stability import pruning

    pruning.quantize(model)
    assert generate(model, VOCAB, "a", length=5, temperature=0) == "a" + "f" * 5
    assert char_lm._FORWARDS[model][1] is not forward


def test_the_generate_cache_does_not_keep_a_model_alive():
    import gc
    import weakref

    from keras_stability.models import char_lm

    model = _small_model(BIAS)
    generate(model, VOCAB, "a", length=2)
    ref = weakref.ref(model)
    assert model in char_lm._FORWARDS
    del model
    gc.collect()
    assert ref() is None
