import keras
import keras_tuner
import numpy as np
import pytest

from keras_stability.tuning import DivergenceDetector
from keras_stability.tuning import RegularizationSettings
from keras_stability.tuning import StableHyperModel
from keras_stability.tuning import regularization_hyperparameters
from keras_stability.tuning import with_regularization

# One L2 strength is absurd on purpose: with SGD(0.1) each step multiplies
# the kernels by (1 - 0.2 * 1e8) and the loss overflows to inf/NaN.
L2_VALUES = [1e-4, 1e8, 1e-2]


def _data(n=300, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 6)).astype("float32")
    y = (x[:, 0] + x[:, 1] > 0).astype("int32")
    return x, y


def _build(hp):
    l2 = hp.Choice("l2", L2_VALUES)
    model = keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(
                8, activation="relu", kernel_regularizer=keras.regularizers.L2(l2)
            ),
            keras.layers.Dense(2),
        ]
    )
    model.compile(
        optimizer=keras.optimizers.SGD(0.1),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return model


def _statuses(tuner):
    return {t.hyperparameters.get("l2"): t.status for t in tuner.oracle.trials.values()}


def _search(tuner_cls, tmp_path, **kwargs):
    keras.utils.set_random_seed(0)
    x, y = _data()
    tuner = tuner_cls(
        StableHyperModel(_build),
        objective="val_loss",
        directory=str(tmp_path),
        project_name=tuner_cls.__name__,
        overwrite=True,
        seed=0,
        **kwargs,
    )
    tuner.search(
        x,
        y,
        validation_split=0.25,
        batch_size=32,
        verbose=0,
        **({} if tuner_cls is keras_tuner.Hyperband else {"epochs": 2}),
    )
    return tuner


def test_random_search_with_a_diverging_trial_completes(tmp_path):
    tuner = _search(keras_tuner.RandomSearch, tmp_path, max_trials=3)
    statuses = _statuses(tuner)
    assert statuses == {1e-4: "COMPLETED", 1e8: "FAILED", 1e-2: "COMPLETED"}
    failed = [t for t in tuner.oracle.trials.values() if t.status == "FAILED"][0]
    assert "FailedTrialError: Training diverged: loss=" in failed.message
    assert "'l2': 100000000.0" in failed.message
    assert failed.score is None
    best = tuner.oracle.get_best_trials(1)[0]
    assert best.status == "COMPLETED" and np.isfinite(best.score)
    assert tuner.get_best_hyperparameters(1)[0].get("l2") in (1e-4, 1e-2)
    scores = [t.score for t in tuner.oracle.trials.values() if t.status == "COMPLETED"]
    assert best.score == min(scores)


@pytest.mark.parametrize("tuner_name", ["BayesianOptimization", "Hyperband"])
def test_other_tuners_survive_divergence(tmp_path, tuner_name):
    tuner_cls = getattr(keras_tuner, tuner_name)
    kwargs = (
        {"max_trials": 3, "num_initial_points": 3}
        if tuner_name == "BayesianOptimization"
        else {"max_epochs": 2, "factor": 2, "hyperband_iterations": 1}
    )
    tuner = _search(tuner_cls, tmp_path, **kwargs)
    statuses = [t.status for t in tuner.oracle.trials.values()]
    assert "FAILED" in statuses and "COMPLETED" in statuses
    for trial in tuner.oracle.trials.values():
        if trial.hyperparameters.get("l2") == 1e8:
            assert trial.status == "FAILED"
    assert tuner.get_best_hyperparameters(1)[0].get("l2") != 1e8


def test_detector_stops_on_nan_with_reason():
    detector = DivergenceDetector()
    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
    model.stop_training = False
    detector.set_model(model)
    detector.on_train_begin()
    detector.on_epoch_begin(1)
    detector.on_train_batch_end(0, {"loss": 1.0})
    assert not detector.diverged and not model.stop_training
    detector.on_train_batch_end(4, {"loss": float("nan")})
    assert detector.diverged and model.stop_training
    assert detector.reason == "Training diverged: loss=nan at epoch 2, batch 5."
    detector.on_train_begin()  # reusable across fits
    assert not detector.diverged and detector.reason is None


def test_detector_threshold_and_val_loss():
    detector = DivergenceDetector(threshold=100.0)
    detector.set_model(keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)]))
    detector.on_train_begin()
    detector.on_epoch_end(0, {"loss": 3.0, "val_loss": float("inf")})
    assert detector.reason == "Training diverged: val_loss=inf at epoch 1, epoch end."
    detector.on_train_begin()
    detector.on_train_batch_end(0, {"loss": 250.0})
    assert detector.reason == "Training diverged: loss=250.0 at epoch 1, batch 1."


def test_regularization_hyperparameters_declares_log_scale_space():
    hp = keras_tuner.HyperParameters()
    settings = regularization_hyperparameters(
        hp, l1=(1e-6, 1e-3), clipping=("none", "clipnorm")
    )
    space = {p.name: p for p in hp.space}
    assert set(space) == {
        "l1",
        "l2",
        "dropout",
        "weight_decay",
        "clipping",
        "clip_threshold",
    }
    for name in ("l1", "l2", "weight_decay", "clip_threshold"):
        assert space[name].sampling == "log"
    assert space["dropout"].sampling == "linear"
    assert (space["l2"].min_value, space["l2"].max_value) == (1e-6, 1e-1)
    # Defaults: the smallest values and the first policy ("none").
    assert settings == RegularizationSettings(
        l1=1e-6, l2=1e-6, dropout=0.0, weight_decay=1e-6
    )
    assert settings.clipping_kwargs() == {}


def test_clip_threshold_is_conditional_on_policy():
    hp = keras_tuner.HyperParameters()
    hp.values["clipping"] = "global_clipnorm"
    regularization_hyperparameters(hp, clipping=("none", "global_clipnorm"))
    hp.values["clip_threshold"] = 2.5
    settings = regularization_hyperparameters(hp, clipping=("none", "global_clipnorm"))
    assert settings.clipping == "global_clipnorm" and settings.clip_threshold == 2.5
    optimizer = settings.optimizer(learning_rate=0.01)
    assert isinstance(optimizer, keras.optimizers.AdamW)
    assert optimizer.global_clipnorm == 2.5
    assert optimizer.weight_decay == settings.weight_decay
    hp.values["clipping"] = "none"
    assert (
        regularization_hyperparameters(
            hp, clipping=("none", "global_clipnorm")
        ).clip_threshold
        is None
    )


def test_fixed_and_disabled_knobs():
    hp = keras_tuner.HyperParameters()
    settings = regularization_hyperparameters(
        hp,
        l1=None,
        l2=1e-3,
        dropout=None,
        weight_decay=None,
        clipping=("clipvalue",),
        clip_threshold=0.5,
    )
    assert settings == RegularizationSettings(
        l2=1e-3, clipping="clipvalue", clip_threshold=0.5
    )
    assert settings.clipping_kwargs() == {"clipvalue": 0.5}
    reg = settings.kernel_regularizer()
    assert isinstance(reg, keras.regularizers.L1L2) and reg.l2 == 1e-3 and reg.l1 == 0.0
    assert RegularizationSettings().kernel_regularizer() is None


def test_with_regularization_decorator_passes_settings():
    seen = {}

    @with_regularization(l2=(1e-5, 1e-2), clipping=None)
    def build(hp, settings):
        seen["settings"] = settings
        model = keras.Sequential(
            [
                keras.Input((4,)),
                keras.layers.Dense(3, kernel_regularizer=settings.kernel_regularizer()),
                keras.layers.Dropout(settings.dropout),
            ]
        )
        model.compile(optimizer=settings.optimizer(), loss="mse")
        return model

    hp = keras_tuner.HyperParameters()
    model = build(hp)
    assert seen["settings"].l2 == 1e-5 and seen["settings"].clipping == "none"
    assert "clipping" not in hp.values
    assert len(model.losses) == 1


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            {"l2": (-1.0, 1.0)},
            "Invalid value for argument `l2`. Expected None, a number >= 0 or a (min, max) pair with 0 < min <= max. Received: l2=(-1.0, 1.0)",
        ),
        (
            {"l2": (0.0, 1.0)},
            "Invalid value for argument `l2`. Expected None, a number >= 0 or a (min, max) pair with 0 < min <= max. Received: l2=(0.0, 1.0)",
        ),
        (
            {"dropout": (0.0, 1.0)},
            "Invalid value for argument `dropout`. Expected None, a number in [0, 1) or a (min, max) pair with 0 <= min <= max < 1. Received: dropout=(0.0, 1.0)",
        ),
        (
            {"clipping": ("none", "zclip")},
            "Invalid value for argument `clipping`. Expected a non-empty subset of ('none', 'clipnorm', 'global_clipnorm', 'clipvalue') or None. Received: clipping=('none', 'zclip')",
        ),
        (
            {"weight_decay": (1e-2, 1e-4)},
            "Invalid value for argument `weight_decay`. Expected None, a number >= 0 or a (min, max) pair with 0 < min <= max. Received: weight_decay=(0.01, 0.0001)",
        ),
        (
            {"clip_threshold": (0.1, 1.0, 10.0)},
            "Invalid value for argument `clip_threshold`. Expected None, a number >= 0 or a (min, max) pair with 0 < min <= max. Received: clip_threshold=(0.1, 1.0, 10.0)",
        ),
        (
            {"clip_threshold": None},
            "Invalid value for argument `clip_threshold`. Expected a positive number or a (min, max) range with clipping=('none', 'clipnorm', 'global_clipnorm'). Received: clip_threshold=None",
        ),
        (
            {"prefix": 3},
            "Invalid value for argument `prefix`. Expected a string. Received: prefix=3",
        ),
    ],
)
def test_bad_ranges(kwargs, message):
    with pytest.raises(ValueError) as info:
        regularization_hyperparameters(keras_tuner.HyperParameters(), **kwargs)
    assert str(info.value) == message


def test_prefix_names_hyperparameters_and_errors_name_the_argument():
    hp = keras_tuner.HyperParameters()
    regularization_hyperparameters(
        hp, prefix="head_", clipping="clipnorm", clip_threshold=1.0
    )
    assert {p.name for p in hp.space} == {
        "head_l2",
        "head_dropout",
        "head_weight_decay",
    }
    with pytest.raises(
        ValueError, match=r"Invalid value for argument `l2`\. .*Received: l2=-1"
    ):
        regularization_hyperparameters(
            keras_tuner.HyperParameters(), l2=-1, prefix="head_"
        )


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            {"l2": -1e-3},
            "Invalid value for argument `l2`. Expected a number >= 0. Received: l2=-0.001",
        ),
        (
            {"dropout": 1.0},
            "Invalid value for argument `dropout`. Expected a number in [0, 1). Received: dropout=1.0",
        ),
        (
            {"clipping": "zclip"},
            "Invalid value for argument `clipping`. Expected one of 'none', 'clipnorm', 'global_clipnorm', 'clipvalue'. Received: clipping='zclip'",
        ),
        (
            {"clipping": "clipnorm"},
            "Invalid value for argument `clip_threshold`. Expected a positive number when clipping='clipnorm'. Received: clip_threshold=None",
        ),
        (
            {"clip_threshold": 1.0},
            "Invalid value for argument `clip_threshold`. Expected None when clipping='none'. Received: clip_threshold=1.0",
        ),
    ],
)
def test_regularization_settings_are_validated(kwargs, message):
    # Before: RegularizationSettings accepted anything (dropout=1.0, l2=-1e-3, ...).
    with pytest.raises(ValueError) as info:
        RegularizationSettings(**kwargs)
    assert str(info.value) == message
    assert RegularizationSettings(l2=np.float32(0.5)).l2 == 0.5


def test_with_regularization_checks_ranges_when_decorating():
    with pytest.raises(ValueError, match="Invalid value for argument `l2`"):
        with_regularization(l2=(1.0, 0.1))
    with pytest.raises(ValueError, match="Invalid value for argument `l3`"):
        with_regularization(l3=0.1)


def test_hypermodel_bad_arguments():
    with pytest.raises(
        ValueError, match="Invalid value for argument `build_fn`. Expected a function"
    ):
        StableHyperModel(build_fn=3)
    with pytest.raises(ValueError, match="Invalid value for argument `threshold`"):
        StableHyperModel(_build, threshold=float("nan"))
