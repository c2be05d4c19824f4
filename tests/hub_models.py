"""Tiny keras-hub causal LMs built from scratch (no presets, no download).

keras-hub is the optional `hub` extra, which `make test` installs; a test
module that uses these imports keras-hub with `pytest.importorskip` first.
"""

import keras


def tiny_gpt2(
    vocabulary_size=64, num_layers=2, num_heads=2, sequence_length=32, seed=0
):
    """A `GPT2CausalLM` of hidden size 32 and FFN 64, seeded."""
    import keras_hub

    keras.utils.set_random_seed(seed)
    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=vocabulary_size,
        num_layers=num_layers,
        num_heads=num_heads,
        hidden_dim=32,
        intermediate_dim=64,
        max_sequence_length=sequence_length,
    )
    return keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=None)


def tiny_gemma(vocabulary_size=64, num_layers=2, seed=0):
    """A `GemmaCausalLM`: hidden 32, FFN 64, 4 query heads sharing 2 key/value heads."""
    import keras_hub

    keras.utils.set_random_seed(seed)
    backbone = keras_hub.models.GemmaBackbone(
        vocabulary_size=vocabulary_size,
        num_layers=num_layers,
        num_query_heads=4,
        num_key_value_heads=2,
        hidden_dim=32,
        intermediate_dim=64,
        head_dim=8,
    )
    return keras_hub.models.GemmaCausalLM(backbone=backbone, preprocessor=None)


def tiny_llama(vocabulary_size=64, num_layers=2, seed=0):
    """A `LlamaCausalLM`: hidden 32, FFN 48, 4 query heads sharing 2 key/value heads."""
    import keras_hub

    keras.utils.set_random_seed(seed)
    backbone = keras_hub.models.LlamaBackbone(
        vocabulary_size=vocabulary_size,
        num_layers=num_layers,
        num_query_heads=4,
        num_key_value_heads=2,
        hidden_dim=32,
        intermediate_dim=48,
    )
    return keras_hub.models.LlamaCausalLM(backbone=backbone, preprocessor=None)
