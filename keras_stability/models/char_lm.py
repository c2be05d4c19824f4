"""A small character-level causal transformer, for stability studies on a CPU.

`build_char_transformer(norm="post")` is the original Transformer's post-norm
layout, which spikes or diverges at learning rates that the pre-norm layout
with QK-normalization and LayerScale trains through
(`norm="pre", qk_norm=True, layerscale_init=1e-2`).
"""

import weakref

import keras
import numpy as np
from keras import ops

from keras_stability._checks import check_bool
from keras_stability._checks import check_choice
from keras_stability._checks import check_nonnegative_int
from keras_stability._checks import check_number
from keras_stability._checks import check_positive_int
from keras_stability._checks import check_str
from keras_stability._checks import check_verbose
from keras_stability._checks import invalid
from keras_stability._keras_internals import flatten_layers
from keras_stability.layers import StableTransformerBlock


@keras.saving.register_keras_serializable(package="keras_stability")
class TokenAndPositionEmbedding(keras.layers.Layer):
    """Sum of a token embedding and a learned position embedding.

    Args:
        vocab_size: Number of tokens, a positive integer.
        sequence_length: Longest sequence (number of positions), a positive
            integer.
        hidden_dim: Embedding width, a positive integer.
        **kwargs: Base `Layer` arguments.

    Raises:
        ValueError: If an argument is not a positive integer.
    """

    def __init__(self, vocab_size, sequence_length, hidden_dim, **kwargs):
        super().__init__(**kwargs)
        vocab_size = check_positive_int("vocab_size", vocab_size)
        sequence_length = check_positive_int("sequence_length", sequence_length)
        hidden_dim = check_positive_int("hidden_dim", hidden_dim)
        self.vocab_size = vocab_size
        self.sequence_length = sequence_length
        self.hidden_dim = hidden_dim
        self.token_embedding = keras.layers.Embedding(
            vocab_size, hidden_dim, name="token_embedding", dtype=self.dtype_policy
        )
        self.position_embedding = keras.layers.Embedding(
            sequence_length,
            hidden_dim,
            name="position_embedding",
            dtype=self.dtype_policy,
        )

    def build(self, input_shape):
        self.token_embedding.build(input_shape)
        self.position_embedding.build((input_shape[-1],))

    def call(self, ids):
        positions = ops.arange(ops.shape(ids)[-1])
        return self.token_embedding(ids) + self.position_embedding(positions)

    def compute_output_shape(self, input_shape):
        return (*input_shape, self.hidden_dim)

    def get_config(self):
        return {
            **super().get_config(),
            "vocab_size": self.vocab_size,
            "sequence_length": self.sequence_length,
            "hidden_dim": self.hidden_dim,
        }


def build_char_transformer(
    vocab_size,
    sequence_length,
    num_blocks=2,
    hidden_dim=64,
    num_heads=4,
    norm="pre",
    qk_norm=False,
    layerscale_init=None,
    name=None,
):
    """Builds a causal character language model (logits for the next character).

    Args:
        vocab_size: Number of characters.
        sequence_length: Characters per input window.
        num_blocks: Transformer blocks. Defaults to `2`.
        hidden_dim: Width, a multiple of `num_heads`. Defaults to `64`.
        num_heads: Attention heads. Defaults to `4`.
        norm: `"pre"` (normalize each branch's input, plus a final norm) or
            `"post"` (normalize after each residual sum, the original
            Transformer). Defaults to `"pre"`.
        qk_norm: Normalize queries and keys. Defaults to `False`.
        layerscale_init: LayerScale initial value, or `None`. Defaults to `None`.
        name: Model name. Defaults to `"char_transformer_<norm>"`.

    Returns:
        A functional `keras.Model` from int32 ids `(batch, sequence_length)`
        to logits `(batch, sequence_length, vocab_size)`.

    Raises:
        ValueError: On a bad argument, e.g. a `hidden_dim` that `num_heads`
            does not divide.
    """
    vocab_size = check_positive_int("vocab_size", vocab_size)
    sequence_length = check_positive_int("sequence_length", sequence_length)
    num_blocks = check_positive_int("num_blocks", num_blocks)
    hidden_dim = check_positive_int("hidden_dim", hidden_dim)
    num_heads = check_positive_int("num_heads", num_heads)
    if hidden_dim % num_heads:
        raise invalid("num_heads", num_heads, f"a divisor of hidden_dim={hidden_dim}")
    norm = check_choice("norm", norm, ("pre", "post"))
    qk_norm = check_bool("qk_norm", qk_norm)
    layerscale_init = check_number(
        "layerscale_init", layerscale_init, low=0.0, low_open=True, allow_none=True
    )
    name = check_str("name", name, allow_none=True)
    ids = keras.Input(shape=(sequence_length,), dtype="int32", name="ids")
    x = TokenAndPositionEmbedding(
        vocab_size, sequence_length, hidden_dim, name="embedding"
    )(ids)
    for i in range(num_blocks):
        x = StableTransformerBlock(
            num_heads=num_heads,
            norm=norm,
            qk_norm=qk_norm,
            layerscale_init=layerscale_init,
            name=f"block_{i}",
        )(x)
    if norm == "pre":
        x = keras.layers.LayerNormalization(epsilon=1e-6, name="final_norm")(x)
    logits = keras.layers.Dense(vocab_size, name="logits")(x)
    return keras.Model(ids, logits, name=name or f"char_transformer_{norm}")


def generate(model, vocab, prompt, length=80, temperature=0.8, seed=0, top_k=None):
    """Samples `length` characters after `prompt` from a character model.

    Args:
        model: A model from `build_char_transformer`.
        vocab: The list of characters (index -> character).
        prompt: Starting text; characters not in `vocab` are dropped.
        length: Characters to generate. Defaults to `80`.
        temperature: Softmax temperature, >= 0; `0` is greedy decoding (the
            most likely character every step, the same text for every
            `seed`). Defaults to `0.8`.
        seed: Seed of the sampler. Defaults to `0`.
        top_k: Sample only among the `top_k` most likely characters (top-k
            sampling, renormalized), a positive integer at most the size of
            `vocab`, or `None` for the whole vocabulary. Defaults to `None`.

    Returns:
        `prompt` followed by the generated characters.

    Raises:
        ValueError: On a bad argument, e.g. a `vocab` whose size is not the
            model's number of logits.
    """
    if not isinstance(model, keras.Model) or len(model.input_shape) != 2:
        raise invalid("model", model, "a model from `build_char_transformer`")
    if (
        not isinstance(vocab, (list, tuple))
        or not vocab
        or not all(isinstance(c, str) and len(c) == 1 for c in vocab)
    ):
        raise invalid("vocab", vocab, "a non-empty list of characters")
    if model.output_shape[-1] != len(vocab):
        raise invalid(
            "vocab",
            f"{len(vocab)} characters",
            f"as many characters as the model has logits ({model.output_shape[-1]})",
        )
    prompt = check_str("prompt", prompt, allow_empty=True)
    length = check_nonnegative_int("length", length)
    temperature = check_number("temperature", temperature, low=0.0)
    seed = check_nonnegative_int("seed", seed)
    top_k = check_positive_int("top_k", top_k, allow_none=True)
    if top_k is not None and top_k > len(vocab):
        raise invalid(
            "top_k", top_k, f"at most the number of characters ({len(vocab)})"
        )
    index = {c: i for i, c in enumerate(vocab)}
    ids = [index[c] for c in prompt if c in index] or [0]
    seq_len = model.input_shape[1]
    rng = np.random.default_rng(seed)
    out = list(ids)
    forward = _compiled_forward(model, seq_len) if length else None
    for _ in range(length):
        window = out[-seq_len:]
        pad = seq_len - len(window)
        x = np.array([window + [0] * pad], dtype="int32")
        logits = np.asarray(forward(x), dtype="float64")
        logits = logits[0, len(window) - 1]
        if temperature == 0.0:
            out.append(int(np.argmax(logits)))
            continue
        logits = logits / temperature
        if top_k is not None and top_k < len(vocab):
            # Keep the top_k largest logits (ties at the cut stay in).
            cut = np.partition(logits, -top_k)[-top_k]
            logits = np.where(logits >= cut, logits, -np.inf)
        p = np.exp(logits - logits.max())
        out.append(int(rng.choice(len(vocab), p=p / p.sum())))
    return prompt + "".join(vocab[i] for i in out[len(ids) :])


# One compiled forward pass per model, kept between calls of `generate`:
# tracing costs 0.3 to 0.5 s on the benchmark's 2- and 4-block models, as
# much as 50 to 100 generated characters. Weak keys: the cache never keeps a
# model alive (the traced function reaches the model only through a weakref).
_FORWARDS = weakref.WeakKeyDictionary()


def _compiled_forward(model, seq_len):
    """`model(x, training=False)` for one window, as a `tf.function`.

    Traced on the first call of `generate` for `model` and reused while the
    model's variables and dtype policies are the same objects (a model
    quantized, pruned or rebuilt in place is traced again).
    """
    import tensorflow as tf

    key = (
        seq_len,
        tuple(id(v) for v in model.weights),
        tuple(
            str(layer.dtype_policy)
            for layer in flatten_layers(model, include_self=True)
        ),
    )
    cached = _FORWARDS.get(model)
    if cached is not None and cached[0] == key:
        return cached[1]
    ref = weakref.ref(model)
    forward = tf.function(
        lambda x: ref()(x, training=False),
        input_signature=[tf.TensorSpec((1, seq_len), tf.int32)],
    )
    # Traced now, so that the concrete function holds the variables (and
    # their ids in `key` cannot be reused while the entry lives).
    forward = forward.get_concrete_function()
    _FORWARDS[model] = (key, forward)
    return forward


# The case study's model variants: what a plain model does, what users reach
# for first (Keras' global_clipnorm), and this library's stabilized recipe.
VARIANTS = ("post_norm", "post_norm_clipnorm", "stabilized")


def train_char_lm(
    variant,
    data,
    learning_rate=3e-2,
    epochs=4,
    batch_size=32,
    seed=0,
    num_blocks=2,
    hidden_dim=64,
    num_heads=4,
    monitor_every=5,
    verbose=0,
):
    """Trains one variant of the character model and measures it.

    Variants (`VARIANTS`):
    - `"post_norm"`: the original post-norm Transformer, Adam, nothing else;
    - `"post_norm_clipnorm"`: the same with Keras' `global_clipnorm=1.0`;
    - `"stabilized"`: pre-norm blocks with QK-normalization and LayerScale,
      `GuardedOptimizer(Adam, clipping=ZClip())` and a
      `GradientExplosionDetector(action="rollback")`.

    Every variant but `"post_norm_clipnorm"` gets a `GradientMonitor`
    (per-layer gradient norms every `monitor_every` steps); the monitor
    needs the gradients in the train step, which an optimizer that clips by
    its own `global_clipnorm` does not expose.

    Args:
        variant: One of `VARIANTS`.
        data: Output of `keras_stability.datasets.make_char_lm_data`.
        learning_rate: Adam's learning rate. Defaults to `3e-2`.
        epochs: Epochs. Defaults to `4`.
        batch_size: Windows per step. Defaults to `32`.
        seed: Seed of initialisation and shuffling. Defaults to `0`.
        num_blocks: Transformer blocks. Defaults to `2`.
        hidden_dim: Width. Defaults to `64`.
        num_heads: Attention heads. Defaults to `4`.
        monitor_every: Steps between per-layer gradient reads.
            Defaults to `5`.
        verbose: Verbosity of `fit`. Defaults to `0`.

    Returns:
        Dict with `"model"`, `"monitor"` (the `GradientMonitor`, or `None`),
        `"raw_loss"` (per step), `"test_loss"`, `"perplexity"` (held out,
        `exp(test_loss)`), `"diverged"` (non-finite test loss or weights) and
        `"events"` (detector events; empty for the other variants).

    Raises:
        ValueError: On a bad argument, before anything is built or trained.
    """
    from keras_stability.callbacks import GradientExplosionDetector
    from keras_stability.callbacks import GradientMonitor
    from keras_stability.clipping import ZClip
    from keras_stability.optimizers import GuardedOptimizer

    variant = check_choice("variant", variant, VARIANTS)
    keys = ("vocab", "x_train", "y_train", "x_test", "y_test")
    if not isinstance(data, dict) or not all(k in data for k in keys):
        raise invalid(
            "data", data, f"the dict of `make_char_lm_data` (keys {', '.join(keys)})"
        )
    learning_rate = check_number("learning_rate", learning_rate, low=0.0, low_open=True)
    epochs = check_positive_int("epochs", epochs)
    batch_size = check_positive_int("batch_size", batch_size)
    seed = check_nonnegative_int("seed", seed)
    num_blocks = check_positive_int("num_blocks", num_blocks)
    hidden_dim = check_positive_int("hidden_dim", hidden_dim)
    num_heads = check_positive_int("num_heads", num_heads)
    monitor_every = check_positive_int("monitor_every", monitor_every)
    verbose = check_verbose("verbose", verbose)
    keras.utils.set_random_seed(seed)
    vocab_size, seq_len = len(data["vocab"]), data["x_train"].shape[1]
    stabilized = variant == "stabilized"
    model = build_char_transformer(
        vocab_size,
        seq_len,
        num_blocks=num_blocks,
        hidden_dim=hidden_dim,
        num_heads=num_heads,
        norm="pre" if stabilized else "post",
        qk_norm=stabilized,
        layerscale_init=1e-2 if stabilized else None,
        name=f"char_lm_{variant}",
    )
    if variant == "post_norm_clipnorm":
        optimizer = keras.optimizers.Adam(learning_rate, global_clipnorm=1.0)
    else:
        optimizer = keras.optimizers.Adam(learning_rate)
    raw = _RawLoss()
    monitor = None
    callbacks = [raw]
    if variant != "post_norm_clipnorm":
        monitor = GradientMonitor(check_freq=monitor_every, verbose=0)
        callbacks.append(monitor)
    detector = None
    if stabilized:
        optimizer = GuardedOptimizer(optimizer, clipping=ZClip())
        detector = GradientExplosionDetector(
            action="rollback", snapshot_freq=20, verbose=0
        )
        callbacks.append(detector)
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    model.fit(
        data["x_train"],
        data["y_train"],
        batch_size=batch_size,
        epochs=epochs,
        verbose=verbose,
        callbacks=callbacks,
    )
    test_loss = float(
        model.evaluate(data["x_test"], data["y_test"], batch_size=256, verbose=0)
    )
    finite = np.isfinite(test_loss) and all(
        np.isfinite(np.asarray(w)).all() for w in model.get_weights()
    )
    return {
        "model": model,
        "monitor": monitor,
        "raw_loss": raw.losses,
        "test_loss": test_loss,
        "perplexity": float(np.exp(test_loss)) if finite else float("inf"),
        "diverged": not finite,
        "events": list(detector.events) if detector is not None else [],
    }


class _RawLoss(keras.callbacks.Callback):
    """Keeps the per-step loss (the tracker the monitor and detector share)."""

    def on_train_begin(self, logs=None):
        from keras_stability.callbacks.raw_loss import RawLossTracker

        self.losses = []
        self._tracker = RawLossTracker.shared(
            self.model, (self.params or {}).get("steps")
        )
        self._tracker.start_fit()

    def on_epoch_begin(self, epoch, logs=None):
        self._tracker.start_epoch(epoch)

    def on_train_batch_end(self, batch, logs=None):
        self.losses.append(float(self._tracker.update_once(batch, logs)))
