"""Argument cases for callbacks, clipping and optimizers (see `tests/api/arguments.py`)."""

import math

import keras
import numpy as np

from keras_stability import callbacks
from keras_stability import clipping
from keras_stability import optimizers
from tests.api.arguments import Case

# -- shared values ---------------------------------------------------------

NAN, INF = math.nan, math.inf
BAD_POLICY = [
    "zclip",
    -1.0,
    0,
    NAN,
    INF,
    True,
    [1.0],
    {"class_name": "Nope", "config": {}},
]
BAD_SPIKES = ["yes", 1, 0, 2.5, {"class_name": "Nope", "config": {}}]
BAD_GRADS = ["x", None, 3, ["x"], [True]]
BAD_TENSOR = ["x", None, True]
BAD_COUNT = ["x", None, -1, 2.5, True]
BAD_POSITIVE = [0, -1.0, "1", True, None, NAN, INF]
BAD_PATH = [3, "", ["a"]]
BAD_VERBOSE = [3, -1, "1", None]
# `optimizer=`: None, an Optimizer held by the model, or an attribute name.
BAD_OPTIMIZER = [3, "", "d optimizer", ["d_optimizer"], True, "adam()"]
GOOD_OPTIMIZER = ["d_optimizer", keras.optimizers.SGD()]
GOOD_VERBOSE = {"verbose": [True]}  # Keras' callbacks take a bool too


def _ones(*shape):
    return keras.ops.ones(shape)


def _compiled_model():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    model.compile(keras.optimizers.SGD(), "mse")
    return model


def _uncompiled_model():
    return keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])


def _guard(built=False):
    guard = optimizers.GuardedOptimizer(keras.optimizers.SGD())
    if built:
        guard.build([keras.Variable(np.ones(2, "float32"))])
    return guard


def _schedule():
    return keras.optimizers.schedules.ExponentialDecay(0.1, 10, 0.5)


def _keep_weight_decay(epoch, weight_decay):
    return weight_decay


CASES = [
    # -- callbacks ---------------------------------------------------------
    Case(
        callbacks.ActivationMonitor,
        kwargs={"probe_data": np.zeros((2, 4), "float32")},
        bad={
            "probe_data": [None, "x", 3, [], {}, np.float32(1.0)],
            "check_freq": [0, -1],
            "saturation_epsilon": [0, 0.5, -0.1],
            "warn_fraction": [0, 1.5],
            "verbose": BAD_VERBOSE,
        },
        good=GOOD_VERBOSE,
        config=True,
    ),
    Case(
        callbacks.AdaptiveClipping,
        kwargs={"clipping": clipping.GlobalNorm(1.0)},
        bad={
            "clipping": BAD_POLICY,
            "skip_spikes": BAD_SPIKES,
            "verbose": BAD_VERBOSE,
            "optimizer": BAD_OPTIMIZER,
        },
        good={**GOOD_VERBOSE, "optimizer": GOOD_OPTIMIZER},
        config=True,
    ),
    Case(
        callbacks.GradientExplosionDetector,
        bad={
            "action": ["explode", None, "Rollback"],
            "snapshot_freq": [0, -5],
            "lr_factor": [0, 1, 1.5, -0.5],
            "skip_batches": [-1],
            "max_rollbacks": [-1],
            "max_consecutive_skips": [-1],
            "loss_z_threshold": [0, -1.0],
            "grad_z_threshold": [0, -1.0],
            "loss_factor": [1.0, 0.5],
            "regress_factor": [1.0, 0.5, "2", True, NAN, INF],
            "window": [0],
            "min_samples": [0, 200],  # 200 > window=128
            "diagnostic_path": BAD_PATH,
            "verbose": BAD_VERBOSE,
            "optimizer": [3, "", "not an identifier", ["d_optimizer"]],
            "check_every": [0, -1, 2.5, True, "10", None],
            "exclude_batches_path": BAD_PATH,
            "skip_spikes": ["yes", None],
        },
        good={**GOOD_VERBOSE, "check_every": [1, 64, np.int64(5)]},
        config=True,
    ),
    Case(
        callbacks.GradientMonitor,
        bad={
            "check_freq": [0],
            "log_dir": BAD_PATH,
            "histogram_bins": [-1],
            "vanish_floor": [0, -1e-8],
            "vanish_ratio": [0],
            "explode_norm": [0],
            "explode_factor": [0],
            "patience": [0],
            "verbose": BAD_VERBOSE,
            "read_freq": [0],
            "history_size": [0, 10, 63],  # the diagnosis reads 64 checks
            "optimizer": BAD_OPTIMIZER,
        },
        good={**GOOD_VERBOSE, "optimizer": GOOD_OPTIMIZER},
        config=True,
    ),
    Case(
        callbacks.GradualUnfreezing,
        kwargs={"schedule": 1},
        bad={
            "schedule": [0, -1, "1", 2.5, True, None, {}, {-1: 1}, {1: "a"}, {1: 1.5}],
            "layers": ["dense", 3, [], [3], [None]],
            "discriminative_factor": [0.5, 0, -1, "2", None, True, float("nan")],
            "verbose": BAD_VERBOSE,
        },
        good=GOOD_VERBOSE,
        config=True,
    ),
    Case(
        callbacks.LayerGradientStats,
        bad={
            "groups": [
                "x",
                [1],
                [("a", "layer")],
                [("a", "bogus", ["p"])],
                [("a", "layer", "p")],
            ],
            "check_freq": [0],
            "histogram_bins": [-1],
            "anomaly_factor": [1.0, 0.5, "2", True, NAN, INF],
            "buffer_size": [-1],
        },
    ),
    Case(
        callbacks.ScaledSchedule,
        kwargs=lambda: {"schedule": _schedule()},
        bad={
            "schedule": ["x", None, 3, 0.1, {"class_name": "Nope", "config": {}}],
            "factor": [0, -1.0],
        },
        config=True,
    ),
    Case(
        callbacks.WeightDecayScheduler,
        kwargs={"schedule": _keep_weight_decay},
        bad={"schedule": [None, 3, "x"], "verbose": BAD_VERBOSE},
        good=GOOD_VERBOSE,
    ),
    # -- clipping policies ---------------------------------------------------
    Case(
        clipping.AGC,
        bad={"clip_factor": [0, -1.0], "epsilon": [0, -1e-3]},
        config=True,
    ),
    Case(
        clipping.AutoClip,
        bad={"percentile": [0, 150, -1], "history_size": [0, -1]},
        config=True,
    ),
    Case(
        clipping.GlobalNorm,
        kwargs={"max_norm": 1.0},
        bad={"max_norm": BAD_POSITIVE},
        config=True,
    ),
    Case(
        clipping.SpikeSkipping,
        bad={
            "window": [0, 1],
            "z_threshold": [0, -1.0],
            "min_samples": [0, 1, 200],  # 200 > window=128
            "max_consecutive": [0],
        },
        config=True,
    ),
    Case(
        clipping.RobustSpikeSkipping,
        bad={
            "window": [0, 1],
            "z_threshold": [0, -1.0],
            "min_samples": [0, 1, 200],  # 200 > window=128
            "max_consecutive": [0],
            "min_ratio": [0, 1, 0.5, "10", True, None, NAN],
            "early_ratio": [0, 1, 0.5, "10", True, NAN],
            "peak_ratio": [0, 1, 0.5, "10", True, NAN],
        },
        config=True,
    ),
    Case(
        clipping.ZClip,
        bad={
            "alpha": [0, 1, 1.5],
            "z_threshold": [0],
            "warmup_steps": [0],
            "max_norm": [0, -1.0, "1", True, NAN, INF],
        },
        config=True,
    ),
    Case(
        clipping.get,
        kwargs={"identifier": None},
        bad={"identifier": BAD_POLICY},
    ),
    # -- clipping's pure functions ---------------------------------------------
    Case(
        clipping.adaptive_clip,
        kwargs=lambda: {
            "grads": [_ones(2, 3)],
            "params": [_ones(2, 3)],
            "clip_factor": 0.1,
        },
        bad={
            "grads": BAD_GRADS,
            "params": ["x", None, [], [None]],
            "clip_factor": BAD_POSITIVE,
            "epsilon": [0, -1.0],
            "apply_to": ["x", [1], [True, False], [None]],
        },
    ),
    Case(
        clipping.autoclip_threshold,
        kwargs=lambda: {
            "history": keras.ops.zeros((4,)),
            "count": 0,
            "norm": 1.0,
            "percentile": 50.0,
        },
        bad={
            "history": ["x", None, 3, np.zeros((2, 2), "float32")],
            "count": BAD_COUNT,
            "norm": BAD_TENSOR,
            "percentile": [0, 150, "1", True, None, NAN],
        },
    ),
    Case(
        clipping.clip_by_global_norm,
        kwargs=lambda: {"grads": [_ones(3)], "max_norm": 1.0},
        bad={"grads": BAD_GRADS, "max_norm": BAD_POSITIVE, "norm": ["x", True]},
    ),
    Case(
        clipping.global_norm,
        kwargs=lambda: {"grads": [_ones(3)]},
        bad={"grads": BAD_GRADS, "squares": ["x", 3, [1.0, 2.0], ["x"]]},
    ),
    Case(
        clipping.is_finite,
        kwargs=lambda: {"grads": [_ones(3)]},
        bad={"grads": BAD_GRADS},
    ),
    Case(
        clipping.masked_percentile,
        kwargs=lambda: {"values": keras.ops.ones((4,)), "count": 2, "percentile": 50.0},
        bad={
            "values": ["x", None, 3, np.zeros((2, 2), "float32")],
            "count": BAD_COUNT,
            "percentile": [0, 150, "1", True, None, NAN],
        },
    ),
    Case(
        clipping.scale_gradients,
        kwargs=lambda: {"grads": [_ones(3)], "scale": 0.5},
        bad={"grads": BAD_GRADS, "scale": ["x", None, True, NAN, INF]},
    ),
    Case(
        clipping.spike_step,
        kwargs=lambda: {
            "norm": 1.0,
            "history": keras.ops.zeros((8,)),
            "count": 0,
            "consecutive": 0,
            "z_threshold": 6.0,
            "min_samples": 2,
            "max_consecutive": 1,
        },
        bad={
            "norm": BAD_TENSOR,
            "history": ["x", None, 3, np.zeros((2, 2), "float32")],
            "count": BAD_COUNT,
            "consecutive": BAD_COUNT,
            "z_threshold": BAD_POSITIVE,
            "min_samples": [0, "1", 2.5, True, None],
            "max_consecutive": [0, "1", 2.5, True, None],
        },
    ),
    Case(
        clipping.robust_spike_step,
        kwargs=lambda: {
            "norm": 1.0,
            "history": keras.ops.zeros((8,)),
            "count": 0,
            "consecutive": 0,
            "z_threshold": 6.0,
            "min_samples": 2,
            "max_consecutive": 1,
            "min_ratio": 10.0,
        },
        bad={
            "norm": BAD_TENSOR,
            "history": ["x", None, 3, np.zeros((2, 2), "float32")],
            "count": BAD_COUNT,
            "consecutive": BAD_COUNT,
            "z_threshold": BAD_POSITIVE,
            "min_samples": [0, "1", 2.5, True, None],
            "max_consecutive": [0, "1", 2.5, True, None],
            "min_ratio": [1.0, 0, "10", True, None, NAN],
            "early_ratio": [1.0, 0, "10", True, NAN],
            "peak": ["x", True],
            "peak_ratio": [1.0, 0, "10", True, NAN],
        },
    ),
    Case(
        clipping.unitwise_norm, kwargs=lambda: {"x": _ones(2, 3)}, bad={"x": BAD_TENSOR}
    ),
    Case(
        clipping.zclip_step,
        kwargs=lambda: {
            "norm": 1.0,
            "mean": 0.0,
            "var": 0.0,
            "count": 0,
            "warmup_steps": 2,
            "alpha": 0.9,
            "z_threshold": 2.5,
        },
        bad={
            "norm": BAD_TENSOR,
            "mean": BAD_TENSOR,
            "var": BAD_TENSOR,
            "count": BAD_COUNT,
            "warmup_steps": [0, "1", 2.5, True, None],
            "alpha": [0, 1, "0.5", True, None, NAN],
            "z_threshold": BAD_POSITIVE,
            "max_norm": [0, -1.0, "1", True, NAN, INF],
            "epsilon": [0, -1e-6],
        },
    ),
    # -- optimizers ------------------------------------------------------------
    Case(
        optimizers.GuardedOptimizer,
        kwargs=lambda: {"inner_optimizer": keras.optimizers.SGD()},
        bad={
            "inner_optimizer": [
                "sgd",
                None,
                3,
                keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD()),
            ],
            "clipping": BAD_POLICY,
            "skip_spikes": BAD_SPIKES,
            "observers": ["x", 3, [1], [None]],
            "name": BAD_PATH,
        },
        config=True,
    ),
    Case(  # an optimizer that clips by itself: refused only with a policy
        optimizers.GuardedOptimizer,
        id="GuardedOptimizer(clipping=GlobalNorm)",
        kwargs=lambda: {
            "inner_optimizer": keras.optimizers.SGD(),
            "clipping": clipping.GlobalNorm(1.0),
        },
        bad={
            "inner_optimizer": [
                keras.optimizers.SGD(clipnorm=1.0),
                keras.optimizers.SGD(global_clipnorm=1.0),
                keras.optimizers.SGD(clipvalue=1.0),
            ]
        },
        skip={
            name: "checked by the GuardedOptimizer case"
            for name in (
                "clipping",
                "skip_spikes",
                "skip_nonfinite",
                "observers",
                "name",
            )
        },
    ),
    Case(
        optimizers.GuardedOptimizer.set_clipping,
        id="GuardedOptimizer.set_clipping",
        kwargs={"clipping": clipping.GlobalNorm(1.0)},
        call=lambda **kw: _guard().set_clipping(**kw),
        bad={"clipping": BAD_POLICY + [None]},
    ),
    Case(
        optimizers.GuardedOptimizer.set_skip_spikes,
        id="GuardedOptimizer.set_skip_spikes",
        kwargs={"skip_spikes": True},
        call=lambda **kw: _guard().set_skip_spikes(**kw),
        bad={"skip_spikes": BAD_SPIKES + [None, False]},
    ),
    Case(
        optimizers.GuardedOptimizer.skip_next,
        id="GuardedOptimizer.skip_next",
        call=lambda **kw: _guard(built=True).skip_next(**kw),
        bad={"n": [-1]},
    ),
    Case(
        optimizers.ensure_guarded,
        kwargs=lambda: {"model": _compiled_model()},
        bad={
            "model": ["model", None, 3, _uncompiled_model()],
            "clipping": BAD_POLICY,
            "skip_nonfinite": ["False", "no", 0, 1],
            "skip_spikes": BAD_SPIKES,
            # Also a name or an optimizer the model does not hold.
            "optimizer": BAD_OPTIMIZER + ["e_optimizer", keras.optimizers.SGD()],
        },
        good={"optimizer": ["optimizer"]},
    ),
    Case(
        optimizers.attach_observer,
        kwargs=lambda: {
            "model": _compiled_model(),
            "observer": optimizers.GradientObserver(),
        },
        bad={
            "model": ["model", None, 3, _uncompiled_model()],
            "observer": ["x", None, 3],
            "clipping": BAD_POLICY,
            "skip_nonfinite": ["False", "no", 0, 1],
            "skip_spikes": BAD_SPIKES,
            # Also a name or an optimizer the model does not hold.
            "optimizer": BAD_OPTIMIZER + ["e_optimizer", keras.optimizers.SGD()],
        },
        good={"optimizer": ["optimizer"]},
    ),
    Case(
        optimizers.detach_observer,
        kwargs=lambda: {
            "model": _compiled_model(),
            "observer": optimizers.GradientObserver(),
        },
        bad={
            "model": ["model", None, 3],
            "observer": ["x", None, 3],
            "optimizer": BAD_OPTIMIZER,
        },
        good={"optimizer": ["optimizer", "e_optimizer"]},
    ),
    Case(
        optimizers.strip_guard,
        kwargs=lambda: {"model": _compiled_model()},
        bad={
            "model": ["model", None, 3],
            # Also a name or an optimizer the model does not hold.
            "optimizer": BAD_OPTIMIZER + ["e_optimizer", keras.optimizers.SGD()],
        },
        good={"optimizer": ["optimizer"]},
    ),
]

EXEMPT = {
    "clipping.ClippingPolicy": "abstract base class of the policies; takes no argument",
    "optimizers.GradientObserver": "base class of user observers; takes no argument",
}
