"""Argument cases for layers, regularizers, diagnostics, tuning, datasets, models,
distillation and pruning (see `tests/api/arguments.py`)."""

import math
import tempfile

import keras
import keras_tuner
import numpy as np

from keras_stability import datasets
from keras_stability import diagnostics
from keras_stability import distillation
from keras_stability import layers
from keras_stability import models
from keras_stability import pruning
from keras_stability import regularizers
from keras_stability import tuning
from tests.api.arguments import Case

TENSOR = "a tensor input of a function traced in the train step; keras.ops checks it"
NOT_NUMBERS = ["1", None, True, math.nan, math.inf]
NOT_POSITIVE_INTS = [0, -1, 2.5, "2", True, None]


def _dense():
    return {"block": keras.layers.Dense(4)}


LAYER_CASES = [
    Case(
        layers.ZLoss,
        bad={"coefficient": [-1e-4]},
        good={"coefficient": [np.float32(1e-3)]},
        config=True,
    ),
    Case(
        layers.z_loss,
        kwargs={"logits": np.zeros((2, 3), "float32")},
        bad={"coefficient": [-1.0]},
        skip={"logits": TENSOR, "mask": TENSOR},
    ),
    Case(layers.EmbeddingGradientShrink, bad={"alpha": [-0.1, 1.5]}, config=True),
    Case(
        layers.shrink_gradient,
        kwargs={"x": np.zeros((2, 3), "float32"), "alpha": 0.5},
        bad={"alpha": [-0.1, 1.5, *NOT_NUMBERS]},
        skip={"x": TENSOR},
    ),
    Case(
        layers.Residual,
        kwargs=_dense,
        bad={
            "block": ["dense", None, 3, keras.layers.Dense],
            "norm": ["middle"],
            "scale": ["fixup", 1],
            "norm_type": ["batch"],
            "layerscale_init": [0.0, -1.0],
            "depth": NOT_POSITIVE_INTS[:-1],
            "epsilon": [0.0, -1e-6],
        },
        config=True,
    ),
    Case(
        layers.deepnorm_constants, kwargs={"depth": 8}, bad={"depth": NOT_POSITIVE_INTS}
    ),
    Case(
        layers.QKNormMultiHeadAttention,
        kwargs={"num_heads": 2, "key_dim": 4},
        bad={
            "num_heads": NOT_POSITIVE_INTS,
            "key_dim": NOT_POSITIVE_INTS,
            "norm_type": ["batch"],
            "epsilon": [0.0, -1e-6],
        },
        config=True,
    ),
    Case(
        layers.StableTransformerBlock,
        kwargs={"num_heads": 2},
        bad={
            "num_heads": NOT_POSITIVE_INTS,
            "key_dim": NOT_POSITIVE_INTS[:-1],
            "intermediate_dim": NOT_POSITIVE_INTS[:-1],
            "dropout": [-0.1, 1.0],
            "norm": [None, "middle"],
            "norm_type": ["batch"],
            "layerscale_init": [0.0, -1.0, "1", True, math.nan, math.inf],
            "activation": ["nope", 3],
            "epsilon": [0.0, -1e-6],
        },
        good={"activation": []},
        config=True,
    ),
]


def _built_model():
    return keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])


def _attach_kwargs():
    return {"model": _built_model()}


REGULARIZER_CASES = [
    Case(
        regularizers.L2SP,
        bad={"alpha": [-0.1], "beta": [-1e-3]},
        good={"alpha": [np.float64(0.5)]},
        config=True,
    ),
    Case(
        regularizers.l2sp_penalty,
        kwargs={
            "weights": np.ones((2, 2)),
            "reference": np.zeros((2, 2)),
            "alpha": 0.1,
        },
        bad={"alpha": [-0.1, *NOT_NUMBERS]},
        skip={"weights": TENSOR, "reference": TENSOR},
    ),
    Case(
        regularizers.L2SP.attach,
        call=lambda **kw: regularizers.L2SP().attach(**kw),
        kwargs=_attach_kwargs,
        bad={
            "model": [keras.Sequential([keras.layers.Dense(2)]), "model", None],
            "backbone": [keras.layers.Dense(2), _built_model(), "backbone"],
        },
        id="L2SP.attach",
    ),
    Case(
        regularizers.L2SP.anchor_callback,
        call=lambda **kw: regularizers.L2SP().anchor_callback(**kw),
        bad={"model": ["model", 1], "backbone": ["backbone", 1]},
        id="L2SP.anchor_callback",
    ),
]

NOT_ARRAYS = ["abc", None, [1.0, 2.0], [[]]]

DIAGNOSTICS_CASES = [
    Case(
        diagnostics.LayerFinding,
        kwargs={"layer": "dense", "status": "healthy", "norm": 0.5, "ratio": 1.0},
        bad={
            "layer": ["", None, 3],
            "status": ["ill", None],
            "norm": ["1", None, True],
            "ratio": ["1", None, True],
        },
    ),
    Case(
        diagnostics.diagnose_layers,
        kwargs={"norms": {"a": [1.0, 1.0, 1.0]}},
        bad={
            "norms": ["a", None, {"a": "x"}, {"a": [1.0], "b": [1.0, 2.0]}, {1: [1.0]}],
            "exclude": ["embedding", None, [1]],
            "vanish_floor": [0.0, -1.0],
            "vanish_ratio": [0.0, 1.0],
            "explode_norm": [0.0],
            "explode_factor": [1.0, 0.5],
            "patience": [0, -1],
        },
        good={"vanish_floor": [np.float32(1e-7)], "patience": [np.int64(2)]},
    ),
    Case(
        diagnostics.format_findings,
        kwargs={"findings": []},
        bad={"findings": ["x", None, [1]]},
    ),
    Case(
        diagnostics.RollingZScore,
        bad={
            "window": [0, -1],
            "z_threshold": [0.0, -1.0],
            "min_samples": [0, 200],
            "factor": [1.0, 0.5, "2", True, math.nan, math.inf],
        },
        good={"window": [np.int32(64)]},
    ),
    Case(
        diagnostics.dead_fraction,
        kwargs={"activations": np.zeros((2, 3))},
        bad={"activations": NOT_ARRAYS},
    ),
    Case(
        diagnostics.saturated_fraction,
        kwargs={"activations": np.zeros((2, 3)), "kind": "tanh"},
        bad={"activations": NOT_ARRAYS, "kind": ["relu", None], "epsilon": [0.0, 0.5]},
    ),
]


def _build(hp):
    return _built_model()


BAD_RANGES = [
    -1.0,
    (0.0, 1.0),
    (1.0, 0.1),
    (0.1, 1.0, 10.0),
    "1",
    True,
    math.nan,
    [math.inf, 1.0],
]
BAD_MONITORS = ["", (), [1], None, 3]

TUNING_CASES = [
    Case(
        tuning.RegularizationSettings,
        kwargs={"clipping": "clipnorm", "clip_threshold": 1.0},
        bad={
            "l1": [-1.0, *NOT_NUMBERS],
            "l2": [-1.0, *NOT_NUMBERS],
            "dropout": [-0.1, 1.0, *NOT_NUMBERS],
            "weight_decay": [-1.0, *NOT_NUMBERS],
            "clipping": ["zclip", None, 1],
            "clip_threshold": [0.0, -1.0, None, *NOT_NUMBERS],
        },
    ),
    Case(
        tuning.regularization_hyperparameters,
        kwargs=lambda: {"hp": keras_tuner.HyperParameters()},
        bad={
            "hp": [None, {}, "hp"],
            "l1": BAD_RANGES,
            "l2": BAD_RANGES,
            "dropout": [*BAD_RANGES, 1.0, (0.0, 1.0)],
            "weight_decay": BAD_RANGES,
            "clipping": [(), ("none", "zclip"), "zclip", 3],
            "clip_threshold": [*BAD_RANGES, 0.0, None],
        },
        good={"l1": [], "prefix": []},
    ),
    Case(
        tuning.with_regularization,
        kwargs={"build_fn": lambda hp, settings: None},
        bad={"build_fn": [3, "build"]},
    ),
    Case(
        tuning.DivergenceDetector,
        bad={"monitor": BAD_MONITORS, "threshold": ["1", True, math.nan, math.inf]},
        good={"threshold": [np.float32(10.0)]},
    ),
    Case(
        tuning.StableHyperModel,
        kwargs={"build_fn": _build},
        bad={
            "build_fn": [3, "build"],
            "monitor": BAD_MONITORS,
            "threshold": ["1", True, math.nan, math.inf],
            "name": [3, ""],
        },
    ),
]


def _range_test_kwargs():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile("sgd", "mse")
    x = np.zeros((8, 3), "float32")
    return {"model": model, "x": x, "y": np.zeros((8, 2), "float32"), "num_steps": 5}


TUNING_CASES += [
    Case(
        tuning.find_learning_rate,
        kwargs=_range_test_kwargs,
        bad={
            "model": [None, "model", keras.Sequential([keras.layers.Dense(1)])],
            "start_lr": [0.0, -1.0],
            "end_lr": [0.0, 1e-9],
            "num_steps": [4, 0],
            "batch_size": [0, 2.5, "8"],
            "smoothing": [1.0, -0.1],
            "divergence_factor": [1.0, 0.5],
            "method": ["best", None],
            "verbose": [3, -1, "1"],
        },
        good={"verbose": [True]},  # as Keras' own `verbose`
        skip={
            "x": "any input `fit` takes; `fit` itself reports bad data",
            "y": "any target `fit` takes; `fit` itself reports bad data",
        },
    ),
    Case(
        tuning.running_median,
        kwargs={"learning_rates": [1e-3, 1e-2, 1e-1], "losses": [1.0, 0.5, 0.7]},
        bad={"decades": [0.0, -1.0, "1"]},
        skip={
            "learning_rates": "array-like data, read with numpy",
            "losses": "array-like data, read with numpy",
        },
    ),
    Case(
        tuning.suggest_learning_rate,
        kwargs={"learning_rates": [1e-3, 1e-2], "smoothed_losses": [1.0, 0.5]},
        bad={"method": ["best", None, 1]},
        skip={
            "learning_rates": "array-like data, read with numpy",
            "smoothed_losses": "array-like data, read with numpy",
        },
    ),
]

BAD_SEEDS = [-1]

DATASET_CASES = [
    Case(
        datasets.make_classification,
        kwargs={"n_samples": 20},
        bad={
            "n_samples": [0, -1],
            "n_features": [0],
            "n_classes": [1, 0],
            "clusters_per_class": [0],
            "class_sep": [0.0, -1.0],
            "seed": BAD_SEEDS,
        },
        good={"n_samples": [np.int64(20)]},
    ),
    Case(
        datasets.make_seasonal_series,
        kwargs={"n_steps": 50},
        bad={
            "n_steps": [1, 0, -5, 2.5, "50"],
            "train_fraction": [0.0, -0.5, 1.5, float("nan")],
            "seed": BAD_SEEDS,
        },
        good={"n_steps": [np.int64(50)], "train_fraction": [1.0, 0.1]},
    ),
    Case(
        datasets.train_test_split,
        kwargs={"x": np.zeros((10, 2)), "y": np.zeros(10)},
        bad={
            "x": ["abc", 3, [[1.0]]],
            "y": [np.zeros(9).tolist(), "abc"],
            "test_fraction": [0.0, 1.0, 1.5],
            "seed": BAD_SEEDS,
        },
    ),
    Case(
        datasets.load_dataset,
        bad={"name": ["nope", None], "test_fraction": [0.0, 1.0], "seed": BAD_SEEDS},
    ),
    Case(
        datasets.load_stdlib_text,
        kwargs={"modules": ["json"], "max_chars": 100},
        bad={
            "modules": ["json", [], [3], ["no_such_module_xyz"], None],
            "max_chars": [0, -1, 2.5, "10", True],
        },
    ),
    Case(
        datasets.make_char_lm_data,
        kwargs={"text": "abcdefgh" * 40, "seq_len": 8},
        bad={
            "text": ["", None, 3, "ab"],
            "seq_len": [0, -1, 10**6],
            "held_out_fraction": [0.0, 1.0],
            "vocab": ["abc", [], ["ab"], ["a", "a"], ["a", "b"], [3]],
        },
        good={"vocab": [list("abcdefgh"), tuple("hgfedcbaz")]},
    ),
    Case(
        datasets.load_stdlib_code,
        kwargs={"modules": ["copy"], "max_chars": 100},
        bad={
            "modules": ["copy", [], [3], ["no_such_module_xyz"], ["sys"], None],
            "max_chars": [0, -1, 2.5, "10", True],
        },
    ),
    Case(
        datasets.mix_replay,
        kwargs={
            "new": ([[0.0, 0.0]] * 6, [0] * 6),
            "old": ([[1.0, 1.0]] * 4, [1] * 4),
            "steps": 2,
            "batch_size": 4,
        },
        bad={
            "new": [
                None,
                [0.0, 0.0, 0.0],
                ([[0.0, 0.0]] * 6,),
                ([[0.0, 0.0]] * 6, [0] * 5),
            ],
            "old": [None, ([[1.0, 1.0, 1.0]] * 4, [1] * 4), ([], [])],
            "steps": [0, -1, 2.5, True, None],
            "replay_fraction": [-0.1, 1.0, 0.9],
            "batch_size": [0, -1, 2.5],
        },
    ),
    Case(
        datasets.load_fine_tuning_corpora,
        kwargs={"seq_len": 16, "max_chars": 2000},
        bad={
            "seq_len": [0, -1, 2.5, True],
            "held_out_fraction": [0.0, 1.0, "0.1"],
            "max_chars": [0, -1, 2.5, True, 20],
        },
    ),
]

_CHAR_DATA = {}


def _char_data():
    if not _CHAR_DATA:
        _CHAR_DATA.update(
            datasets.make_char_lm_data("the quick brown fox. " * 30, seq_len=8)
        )
    return _CHAR_DATA


_CHAR_MODEL = {}


def _char_model():
    if not _CHAR_MODEL:
        _CHAR_MODEL["model"] = models.build_char_transformer(
            5, 8, num_blocks=1, hidden_dim=8, num_heads=2
        )
    return _CHAR_MODEL["model"]


def _train_kwargs():
    return {
        "variant": "post_norm",
        "data": _char_data(),
        "epochs": 1,
        "num_blocks": 1,
        "hidden_dim": 8,
        "num_heads": 2,
    }


MODEL_CASES = [
    Case(
        models.TokenAndPositionEmbedding,
        kwargs={"vocab_size": 10, "sequence_length": 8, "hidden_dim": 4},
        bad={
            "vocab_size": NOT_POSITIVE_INTS,
            "sequence_length": NOT_POSITIVE_INTS,
            "hidden_dim": NOT_POSITIVE_INTS,
        },
        good={"vocab_size": [np.int64(10)]},
        config=True,
    ),
    Case(
        models.build_char_transformer,
        kwargs={
            "vocab_size": 5,
            "sequence_length": 8,
            "num_blocks": 1,
            "hidden_dim": 8,
            "num_heads": 2,
        },
        bad={
            "vocab_size": NOT_POSITIVE_INTS,
            "sequence_length": NOT_POSITIVE_INTS,
            "num_blocks": [0, -1],
            "hidden_dim": [0, -1],
            "num_heads": [0, 3],
            "norm": [None, "middle"],
            "layerscale_init": [0.0, -1.0, "1", True, math.nan, math.inf],
            "name": [3, ""],
        },
    ),
    Case(
        models.generate,
        kwargs=lambda: {
            "model": _char_model(),
            "vocab": list("abcde"),
            "prompt": "ab",
            "length": 2,
        },
        bad={
            "model": [None, "model", keras.layers.Dense(2)],
            "vocab": ["abcde", [], list("abc"), ["ab", "c", "d", "e", "f"], None],
            "prompt": [None, 3],
            "length": [-1],
            "temperature": [-1.0, math.nan, math.inf, "1"],
            "seed": [-1],
            "top_k": [0, -1, 6, 2.5, True, "2"],
        },
        good={"temperature": [0.0, 0], "top_k": [None, 1, 5]},
    ),
    Case(
        models.train_char_lm,
        kwargs=_train_kwargs,
        bad={
            "variant": ["plain", None],
            "data": [None, {"vocab": []}, "data"],
            "learning_rate": [0.0, -1.0],
            "epochs": [0],
            "batch_size": [0],
            "seed": [-1],
            "num_blocks": [0],
            "hidden_dim": [0],
            "num_heads": [0, 3],
            "monitor_every": [0],
            "verbose": [3, -1, "auto", None],
        },
        good={"verbose": [True]},  # Keras' fit takes verbose=True as 1
    ),
]


def _pair():
    keras.utils.set_random_seed(0)

    def model(width, name):
        inputs = keras.Input((4,), name=f"{name}_input")
        hidden = keras.layers.Dense(width, name=f"{name}_hidden")(inputs)
        return keras.Model(
            inputs, keras.layers.Dense(3, name=f"{name}_logits")(hidden), name=name
        )

    return model(2, "student"), model(6, "teacher")


def _distiller_kwargs():
    student, teacher = _pair()
    return {"student": student, "teacher": teacher}


def _compile(**kwargs):
    distiller = distillation.Distiller(*_pair())
    distiller.compile(**kwargs)
    return distiller


SPARSE_CE = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
LOGITS = np.zeros((2, 3), "float32")
BAD_TEMPERATURES = [
    0.0,
    -1.0,
    math.inf,
    lambda epoch: -1.0,
    distillation.LinearSchedule(2.0, 0.0, 2),
]
BAD_ALPHAS = [-0.1, 1.5, lambda epoch: 2.0, distillation.LinearSchedule(0.0, 2.0, 3)]

DISTILLATION_CASES = [
    Case(
        distillation.Distiller,
        kwargs=_distiller_kwargs,
        bad={
            "student": [
                None,
                "student",
                keras.layers.Dense(3),
                keras.Sequential([keras.layers.Dense(3)]),
            ],
            "teacher": [None, "teacher", keras.layers.Dense(3)],
            "feature_distillation": ["hint", [3]],
            "name": [""],
        },
        config=True,
    ),
    Case(
        distillation.Distiller.compile,
        call=_compile,
        kwargs={"student_loss_fn": SPARSE_CE},
        bad={
            "optimizer": ["nope", 3, None],
            "metrics": ["accuracy", 3, [3]],
            "student_loss_fn": [None, "nope", 3],
            "distillation_loss_fn": ["nope", 3],
            "alpha": BAD_ALPHAS,
            "temperature": BAD_TEMPERATURES,
            "ignore_class": [0.5, "-1", True],
        },
        good={
            "temperature": [np.float32(2.0)],
            "ignore_class": [-1, np.int64(0), None],
        },
        id="Distiller.compile",
    ),
    Case(
        distillation.FeatureDistillation,
        kwargs={
            "teacher_layer_name": "teacher_hidden",
            "student_layer_name": "student_hidden",
        },
        bad={
            "teacher_layer_name": ["", None, 3],
            "student_layer_name": ["", None, 3],
            "loss": ["nope", 3, None],
            "weight": [-1.0],
        },
        config=True,
    ),
    Case(
        distillation.LinearSchedule,
        kwargs={"start": 8.0, "end": 2.0, "epochs": 5},
        bad={
            "start": NOT_NUMBERS,
            "end": NOT_NUMBERS,
            "epochs": [1, 0, 2.5, "5", True, None],
        },
        good={"epochs": [np.int64(3)]},
        config=True,
    ),
    Case(
        distillation.DistillationScheduler,
        kwargs={"alpha": distillation.LinearSchedule(0.0, 1.0, 3)},
        bad={
            "temperature": [3.0, "t", lambda epoch: 0.0],
            "alpha": [0.5, "a", lambda epoch: 2.0],
        },
    ),
    Case(
        distillation.combine_losses,
        kwargs={"student_loss": 1.0, "soft_loss": 2.0, "alpha": 0.5},
        bad={"alpha": [-0.1, 1.5, *NOT_NUMBERS]},
        skip={"student_loss": TENSOR, "soft_loss": TENSOR},
    ),
    Case(
        distillation.soften,
        kwargs={"logits": LOGITS, "temperature": 2.0},
        bad={"temperature": [0.0, -1.0, *NOT_NUMBERS]},
        skip={"logits": TENSOR},
    ),
    Case(
        distillation.soft_target_loss,
        kwargs={"teacher_logits": LOGITS, "student_logits": LOGITS, "temperature": 2.0},
        bad={"temperature": [0.0, -1.0, *NOT_NUMBERS], "loss_fn": ["kl", 3]},
        skip={
            "teacher_logits": TENSOR,
            "student_logits": TENSOR,
            "sample_weight": TENSOR,
        },
    ),
    Case(
        distillation.top1_agreement,
        kwargs={"teacher_logits": LOGITS, "student_logits": LOGITS},
        skip={"teacher_logits": TENSOR, "student_logits": TENSOR},
    ),
    Case(
        distillation.compute_teacher_outputs,
        kwargs=lambda: {"teacher_fn": _pair()[1], "x": np.zeros((4, 4), "float32")},
        bad={
            "teacher_fn": [None, "teacher", lambda x: x],
            "x": ["abc", None],
            "batch_size": [0, -1],
        },
    ),
]


def _identity_graph():
    """`inputs` and `outputs` of a one-input functional model."""
    inputs = keras.Input((3,))
    return {"inputs": inputs, "outputs": inputs}


def _prunable():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8,))
    hidden = keras.layers.Dense(8, activation="relu")(inputs)
    return keras.Model(inputs, keras.layers.Dense(4)(hidden))


def _constant():
    return pruning.ConstantSparsity(0.5, begin_step=0, frequency=1)


def _unbuilt():
    return keras.Sequential([keras.layers.Dense(2)])


class _Subclassed(keras.Model):
    def call(self, x):
        return x


NOT_MODELS = [None, "model", 3]
BAD_SCHEDULES = [
    None,
    0.5,
    lambda step: 0.5,
    lambda step: (True, 1.0),
    lambda step: (True, -0.1),
    lambda step: (True, keras.ops.where(step > 1, 1.0, 0.5)),
]
BAD_PRUNING_OPTIONS = {
    "pruning_schedule": BAD_SCHEDULES,
    "sparsity_m_by_n": [(4, 2), (0, 4), (2.0, 4), "2:4", (2, 4, 8), 2],
    "block_size": [(0, 2), (1,), "1x1", (1.5, 1), None],
    "block_pooling_type": ["SUM", "avg", None],
}
# Not a regex, a list of them or a callable; an empty list; a bad regex.
BAD_FILTERS = [3, [], ["dense", 2], "(", {"dense": True}]
BAD_SPARSITIES = [-0.1, 1.0, *NOT_NUMBERS]
BAD_STEPS = [-1, 2.5, "0", True, None]

PRUNING_CASES = [
    Case(
        pruning.prune_low_magnitude,
        kwargs=lambda: {"to_prune": _prunable(), "pruning_schedule": _constant()},
        bad={
            "to_prune": [*NOT_MODELS, _unbuilt()],
            **BAD_PRUNING_OPTIONS,
            # None is TF-MOT's default schedule, ConstantSparsity(0.5, 0).
            "pruning_schedule": [s for s in BAD_SCHEDULES if s is not None],
            "sparsity_m_by_n": [*BAD_PRUNING_OPTIONS["sparsity_m_by_n"], (2, 3)],
            "filters": [*BAD_FILTERS, "^no_such_layer"],
            "pruning_policy": ["PruneForLatencyOnXNNPack", object()],
            "initial_step": BAD_STEPS,
        },
        good={
            "sparsity_m_by_n": [(np.int64(2), np.int64(4))],
            "pruning_schedule": [None],
        },
    ),
    Case(
        pruning.Pruner,
        kwargs=lambda: {
            "variables": [keras.Variable(np.ones((4, 4), "float32"))],
            "pruning_schedule": _constant(),
        },
        bad={
            "variables": [[], None, [np.ones(2)], "w"],
            **BAD_PRUNING_OPTIONS,
            "input_axes": [[5], [0, 1], "x", [1.5]],
        },
        good={"input_axes": [[0], [-2]]},
    ),
    Case(
        pruning.find_pruner,
        kwargs=lambda: {"model": _prunable()},
        bad={"model": NOT_MODELS},
    ),
    Case(
        pruning.find_pruners,
        kwargs=lambda: {"model": _prunable()},
        bad={"model": NOT_MODELS},
    ),
    Case(
        pruning.prunable_weights,
        kwargs=lambda: {"to_prune": _prunable()},
        bad={"to_prune": [*NOT_MODELS, _unbuilt()], "filters": BAD_FILTERS},
    ),
    Case(
        pruning.sparsity_report,
        kwargs=lambda: {"model": _prunable()},
        bad={"model": [*NOT_MODELS, _unbuilt()]},
    ),
    Case(
        pruning.strip_pruning,
        kwargs=lambda: {"model": _prunable()},
        bad={"model": NOT_MODELS},
    ),
    Case(
        pruning.resolve_policy_maps,
        kwargs=lambda: {"model": _prunable()},
        bad={"model": [*NOT_MODELS, _unbuilt(), keras.layers.Dense(2)]},
    ),
    Case(
        pruning.quantize,
        kwargs=lambda: {"model": _prunable()},
        bad={
            "model": [*NOT_MODELS, _unbuilt(), keras.layers.Dense(2)],
            "mode": ["int4", "float8", None, 8],
        },
        skip={"filters": "passed to Keras' model.quantize, which checks it"},
    ),
    Case(
        pruning.compressed_size,
        kwargs=lambda: {"model": _prunable()},
        bad={
            "model": [*NOT_MODELS, _unbuilt(), keras.layers.Dense(2)],
            "file": ["h5", None, 1],
        },
        good={"file": ["keras"]},
    ),
    Case(
        pruning.sparse_storage,
        kwargs=lambda: {"model": _prunable()},
        bad={
            "model": [*NOT_MODELS, _unbuilt(), keras.layers.Dense(2), _Subclassed()],
            "min_sparsity": [-0.1, 1.5, None],
        },
    ),
    Case(
        pruning.SparseStorageDense,
        kwargs={"units": 4},
        bad={"min_sparsity": [-0.1, 1.5, None]},
        config=True,
    ),
    Case(
        pruning.SparseStorageEinsumDense,
        kwargs={"equation": "ab,bc->ac", "output_shape": 4},
        bad={"min_sparsity": [-0.1, 1.5, None]},
        config=True,
    ),
    Case(
        pruning.SparseStorageEmbedding,
        kwargs={"input_dim": 10, "output_dim": 4},
        bad={"min_sparsity": [-0.1, 1.5, None]},
        config=True,
    ),
    Case(
        pruning.SparseStorageModel,
        kwargs=lambda: _identity_graph(),
        bad={"min_sparsity": [-0.1, 1.5, None]},
    ),
    Case(
        pruning.SparseStorageSequential,
        kwargs={},
        bad={"min_sparsity": [-0.1, 1.5, None]},
    ),
    Case(
        pruning.shrink,
        kwargs=lambda: {"model": _prunable(), "fraction": 0.5},
        bad={
            "model": NOT_MODELS,
            "fraction": [-0.1, 1.0, *NOT_NUMBERS],
            "criterion": ["l3", None],
        },
    ),
    Case(
        pruning.shrink_plan,
        kwargs=lambda: {"model": _prunable(), "fraction": 0.5},
        bad={
            "model": NOT_MODELS,
            "fraction": [-0.1, 1.0, *NOT_NUMBERS],
            "criterion": ["l3", None],
        },
    ),
    Case(
        pruning.PruningSummaries,
        kwargs=lambda: {"log_dir": tempfile.mkdtemp()},
        bad={
            "log_dir": ["", None, 3],
            "update_freq": [0, -1, 2.5, "batch", None, True],
        },
        good={"update_freq": [123, np.int64(3)]},  # a number of batches
        config=True,
    ),
    Case(pruning.UpdatePruningStep, config=True),
    Case(
        pruning.PolynomialDecay,
        kwargs={
            "initial_sparsity": 0.0,
            "final_sparsity": 0.8,
            "begin_step": 0,
            "end_step": 100,
        },
        bad={
            "initial_sparsity": BAD_SPARSITIES,
            "final_sparsity": BAD_SPARSITIES,
            "begin_step": BAD_STEPS,
            "end_step": [0, *BAD_STEPS],
            "power": [0, -1, math.inf],
            "frequency": [0, -1],
        },
        good={"power": [2.5], "end_step": [np.int32(226)]},
        # TF-MOT's own get_config ({"class_name", "config"}), kept for TF-MOT.
    ),
    Case(
        pruning.ConstantSparsity,
        kwargs={"target_sparsity": 0.5, "begin_step": 0},
        bad={
            "target_sparsity": BAD_SPARSITIES,
            "begin_step": BAD_STEPS,
            "end_step": [-2],
            "frequency": [0, -1],
        },
    ),
]


def _char_lm_kwargs():
    model = models.build_char_transformer(
        vocab_size=11, sequence_length=8, num_blocks=2, hidden_dim=16, num_heads=4
    )
    return {"model": model, "num_heads": 2}


def _transformer_shrink_case(target):
    return Case(
        target,
        kwargs=_char_lm_kwargs,
        bad={
            "model": [
                None,
                "lm",
                keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)]),
            ],
            "num_heads": [0, 5, 2.0, "2", True],
            "intermediate_dim": [0, 10**6, 2.5, "8", True],
            "hidden_dim": [0, 10**6, 2.5, "8", True],
            "num_layers": [0, 3, 1.5, "1", True],
            "data": ["text", np.zeros((2, 8, 3), "int32")],
            "block_importance": ["angle", None],
            "batch_size": [0, -1],
            "keep_blocks": [[0, 0], [5], [-1], 1, "0", [True], [0.0]],
        },
    )


DISTILLATION_CASES.append(
    Case(
        distillation.prune_and_distill,
        kwargs=lambda: {
            "teacher": _char_lm_kwargs()["model"],
            "x": np.zeros((4, 8), "int32"),
            "num_layers": 1,
            "epochs": 1,
            "batch_size": 4,
            "verbose": 0,
        },
        bad={
            "teacher": [None, "lm"],
            "x": ["text", None],
            "num_heads": [0, 5, 2.0, "2", True],
            "intermediate_dim": [0, 10**6, 2.5, True],
            "hidden_dim": [0, 10**6, 2.5, True],
            "num_layers": [0, 3, 1.5, "1", True],
            "calibration_samples": [0, -1],
            "block_importance": ["angle", None],
            "epochs": [0, -1],
            "batch_size": [0, -1],
            "optimizer": ["nope", None],
            "alpha": [-0.1, 1.5],
            "temperature": [0.0, -1.0],
            "keep_blocks": [[0, 0], [5], "0", [-1]],
            "block_candidates": [0, 1.5, True, 2],
            "search_steps": [0, -1, 2.5, 2],
            "search_restart": ["yes", None, 1],
        },
        skip={"y": "labels, checked by `fit`", "sample_weight": TENSOR},
    )
)

PRUNING_CASES += [
    _transformer_shrink_case(pruning.shrink_transformer),
    _transformer_shrink_case(pruning.shrink_transformer_plan),
]


CASES = [
    *LAYER_CASES,
    *REGULARIZER_CASES,
    *DIAGNOSTICS_CASES,
    *TUNING_CASES,
    *DATASET_CASES,
    *MODEL_CASES,
    *DISTILLATION_CASES,
    *PRUNING_CASES,
]
EXEMPT = {
    "tuning.LearningRateRange": "a result record that find_learning_rate builds",
    "datasets.load_digits": "takes no argument",
}
