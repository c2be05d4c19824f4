"""Pins every private Keras name the library relies on (`keras_stability._keras_internals`)."""

import inspect

import numpy as np
import pytest

from keras_stability import _keras_internals


def test_installed_keras_is_a_tested_version():
    assert _keras_internals.keras_version_tested()


def test_print_msg_signature_is_the_one_we_call():
    from keras.src.utils import io_utils

    params = list(inspect.signature(io_utils.print_msg).parameters)
    assert params[:2] == ["message", "line_break"]


def test_print_msg_prints(capsys):
    _keras_internals.print_msg("hello from the library")
    assert "hello from the library" in capsys.readouterr().out


def test_file_utils_has_what_backup_uses():
    for name in ("exists", "rmtree", "join"):
        assert callable(getattr(_keras_internals.file_utils, name))


# --- distribute: multi-worker `fit` patches, `BackupAndRestore`, `get_strategy` ---

# SHA-256 of the Keras functions the multi-worker patches replace, as in Keras
# 3.15.1. When this test fails, Keras changed them: check whether
# keras-team/keras#20585 is fixed (then drop the patch) or re-derive the patch
# from the new code, and update the digests.
MULTI_WORKER_PINNED = {
    "TensorFlowTrainer._maybe_symbolic_build": (
        "92a504f5eba9b29f81f1bf26180bdd5bf5186b06b7bda426534b90d2d02bc1c2"
    ),
    "reduce_per_replica": "2e7d54b1e6edc29a8c6a7e6b66cd4c8be3ba7842412c93753ac3afe169fa7fb8",
}


def test_multi_worker_patched_keras_code_is_unchanged_upstream():
    import keras

    digests = {
        name: _keras_internals.source_digest(fn)
        for name, fn in _keras_internals.multi_worker_patch_targets().items()
    }
    assert digests == MULTI_WORKER_PINNED, (
        "Keras changed code that keras_stability patches for multi-worker fit "
        f"(Keras {keras.__version__}); see keras_stability/_keras_internals.py."
    )


def test_fit_reads_initial_epoch_and_train_function_as_backup_relies_on():
    # BackupAndRestore resumes inside an epoch by setting `_initial_epoch` and
    # swapping `train_function` for the steps already done; both work only
    # while fit reads them this way.
    from keras.src.backend.tensorflow.trainer import TensorFlowTrainer

    source = inspect.getsource(TensorFlowTrainer.fit)
    assert "initial_epoch = self._initial_epoch or initial_epoch" in source
    assert "logs = self.train_function(iterator)" in source
    assert "with epoch_iterator.catch_stop_iteration():" in source
    assert "self.make_train_function()\n        callbacks.on_train_begin()" in source


def test_skip_train_batches_consumes_data_without_training():
    import keras
    import numpy as np

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(keras.optimizers.SGD(0.1), "mse")
    x = np.arange(12, dtype="float32").reshape(6, 2) / 10
    y = x.sum(1, keepdims=True)
    reference = keras.models.clone_model(model)
    reference.set_weights(model.get_weights())
    reference.compile(keras.optimizers.SGD(0.1), "mse")
    reference.fit(x[2:], y[2:], batch_size=2, shuffle=False, verbose=0)  # 2 steps

    class Skip(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            _keras_internals.skip_train_batches(self.model, 1)

    model.fit(x, y, batch_size=2, shuffle=False, verbose=0, callbacks=[Skip()])
    assert not _keras_internals.skipping_train_batches(model)
    assert int(model.optimizer.iterations) == 2
    for a, b in zip(model.get_weights(), reference.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_collective_ops_configurable_reads_tensorflows_own_test():
    # Once any op ran (this process has), TF refuses to configure collectives.
    from tensorflow.python.eager import context

    ctx = context.context()
    assert hasattr(ctx, "_context_handle") and hasattr(ctx, "_collective_leader")
    ctx.ensure_initialized()
    assert _keras_internals.collective_ops_configurable() is (
        ctx._collective_leader is not None
    )


def test_file_utils_has_what_backup_files_use():
    for name in (
        "exists",
        "isdir",
        "listdir",
        "makedirs",
        "remove",
        "rmtree",
        "copy",
        "join",
        "File",
        "is_remote_path",
    ):
        assert callable(getattr(_keras_internals.file_utils, name)), name
    assert _keras_internals.file_utils.is_remote_path("gs://bucket/backup")
    assert not _keras_internals.file_utils.is_remote_path("/tmp/backup")


# -- Callbacks, clipping and optimizers ---------------------------------------


def _tiny_model(optimizer="sgd"):
    import keras

    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    model.compile(optimizer, "mse")
    return model


def _xy():
    import numpy as np

    return np.ones((8, 3), "float32"), np.ones((8, 1), "float32")


def test_loss_tracker_is_a_mean_with_total_and_count():
    import keras
    import numpy as np

    model = _tiny_model()
    x, y = _xy()
    model.fit(x, y, batch_size=4, epochs=1, verbose=0)
    tracker = _keras_internals.loss_tracker(model)
    assert isinstance(tracker, keras.metrics.Mean)
    count = float(np.asarray(tracker.count))
    assert count == 8.0  # samples of the epoch
    loss = model.evaluate(x, y, verbose=0)  # resets and reuses the tracker
    assert float(np.asarray(tracker.total)) / float(np.asarray(tracker.count)) == loss
    assert _keras_internals.loss_tracker(object()) is None


def test_learning_rate_object_is_what_the_optimizer_reads():
    import keras

    schedule = keras.optimizers.schedules.ExponentialDecay(0.1, 10, 0.5)
    opt = keras.optimizers.SGD(schedule)
    assert _keras_internals.learning_rate_object(opt) is schedule
    halved = keras.optimizers.schedules.ExponentialDecay(0.05, 10, 0.5)
    _keras_internals.set_learning_rate_object(opt, halved)
    opt.build([keras.Variable(1.0)])
    assert float(opt.learning_rate) == pytest.approx(
        0.05
    )  # read through `_learning_rate`
    constant = keras.optimizers.SGD(0.3)
    assert isinstance(_keras_internals.learning_rate_object(constant), keras.Variable)


def test_flatten_layers_and_optimizer_has_variable():
    import keras

    inner = keras.Sequential(
        [keras.Input((3,)), keras.layers.Dense(2, name="inner_dense")]
    )
    model = keras.Sequential([inner, keras.layers.Dense(1, name="head")])
    names = [
        layer.name
        for layer in _keras_internals.flatten_layers(model, include_self=False)
    ]
    assert "inner_dense" in names and "head" in names and model.name not in names
    opt = keras.optimizers.SGD()
    opt.build(model.layers[-1].trainable_variables)
    assert _keras_internals.optimizer_has_variable(opt, model.layers[-1].kernel)
    assert not _keras_internals.optimizer_has_variable(opt, inner.layers[0].kernel)


@pytest.mark.parametrize("n", [100, 96])
def test_build_from_data_builds_the_shapes_and_state_fit_builds(n):
    import keras

    def model():
        m = keras.Sequential([keras.layers.Dense(4), keras.layers.Dense(1)])
        m.compile("adam", "mse", metrics=["mae"])
        return m

    x = np.zeros((n, 3), "float32")
    y = np.zeros((n, 1), "float32")
    fitted = model()
    fitted.fit(x, y, batch_size=32, epochs=1, verbose=0)
    built = model()
    assert _keras_internals.build_from_data(built, x, y, 32) is x
    # A last partial batch leaves the batch dimension free, as in `fit`.
    assert built.inputs[0].shape == fitted.inputs[0].shape
    assert built.inputs[0].shape == ((None, 3) if n % 32 else (32, 3))
    assert built.optimizer.built and int(built.optimizer.iterations) == 0
    assert [v.shape for v in built.variables] == [v.shape for v in fitted.variables]

    def batches():
        yield x[:32], y[:32]
        yield x[32:64], y[32:64]
        yield x[64:], y[64:]

    gen = batches()
    again = _keras_internals.build_from_data(model(), gen)
    assert [b[0].shape[0] for b in again] == [32, 32, n - 64]  # nothing lost


def test_is_graph_model_tells_sequential_and_functional_from_subclassed():
    import keras

    inputs = keras.Input((3,))
    functional = keras.Model(inputs, keras.layers.Dense(2)(inputs))
    sequential = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])

    class Subclassed(keras.Model):
        def call(self, x):
            return x

    assert _keras_internals.is_graph_model(functional)
    assert _keras_internals.is_graph_model(sequential)
    assert not _keras_internals.is_graph_model(Subclassed())
    assert not _keras_internals.is_graph_model(keras.layers.Dense(2))


def test_all_reduce_sum_gradients_is_the_method_keras_calls():
    import keras
    from keras.src.backend.tensorflow import optimizer as tf_optimizer

    source = inspect.getsource(tf_optimizer.TFOptimizer._backend_update_step)
    assert "self._all_reduce_sum_gradients(" in source
    opt = keras.optimizers.SGD()
    with _keras_internals.gradients_already_reduced([opt]):
        pairs = [(1, "a"), (2, "b")]
        assert opt._all_reduce_sum_gradients(pairs) == pairs
    assert "_all_reduce_sum_gradients" not in vars(opt)  # undone


def test_fit_calls_train_function_then_callbacks_with_its_logs():
    """The loop our log routes rely on (Keras' TensorFlow `fit`)."""
    from keras.src.backend.tensorflow import trainer as tf_trainer
    from keras.src.callbacks import callback_list
    from keras.src.utils import python_utils

    fit = inspect.getsource(tf_trainer.TensorFlowTrainer.fit)
    assert "logs = self.train_function(iterator)" in fit
    assert "callbacks.on_train_batch_end(end_step, logs)" in fit
    assert "epoch_logs = dict(self._get_metrics_result_or_logs(logs))" in fit
    batch_end = inspect.getsource(callback_list.CallbackList._on_train_batch_end)
    assert "pythonify_logs(logs)" in batch_end
    assert python_utils.pythonify_logs({"n": 3}) == {"n": 3.0}  # every value a float


def test_wrap_train_step_adds_values_to_the_logs_and_is_replaced_by_key():
    import keras

    model = _tiny_model()
    x, y = _xy()
    assert _keras_internals.wrap_train_step(
        model, "one", lambda: {"extra": keras.ops.convert_to_tensor(7.0)}
    )
    assert not _keras_internals.wrap_train_step(model, "one", lambda: {})  # same key
    history = model.fit(x, y, batch_size=4, epochs=1, verbose=0)
    assert history.history["extra"] == [7.0]
    assert _keras_internals.wrap_train_step(
        model, "two", lambda: {"other": keras.ops.convert_to_tensor(1.0)}
    )
    model.make_train_function(force=True)
    history = model.fit(x, y, batch_size=4, epochs=1, verbose=0)
    assert "extra" not in history.history and history.history["other"] == [1.0]


def test_train_function_hook_reaches_callbacks_before_it_and_survives_a_retrace():
    import keras

    model = _tiny_model()
    x, y = _xy()
    seen = []

    class First(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            seen.append(("batch", logs["hooked"]))

        def on_epoch_end(self, epoch, logs=None):
            seen.append(("epoch", logs["hooked"]))

        def on_train_begin(self, logs=None):
            # As our callbacks do: attach in on_train_begin (an unforced
            # make_train_function, which fit calls before, drops stale hooks).
            _keras_internals.add_train_function_hook(self.model, hook)
            _keras_internals.add_train_function_hook(self.model, hook)  # once only
            self.model.make_train_function(force=True)  # a retrace keeps the hook

    calls = []

    def hook(logs):
        calls.append(len(calls))
        logs["hooked"] = len(calls)

    model.fit(x, y, batch_size=4, epochs=1, verbose=0, callbacks=[First()])
    assert seen == [("batch", 1.0), ("batch", 2.0), ("epoch", 2.0)]
    assert _keras_internals.remove_train_function_hook(model, hook)
    assert not _keras_internals.remove_train_function_hook(model, hook)
    assert "make_train_function" not in vars(model)
    model.fit(x, y, batch_size=4, epochs=1, verbose=0)
    assert len(calls) == 2  # no longer called


def test_a_hook_left_by_a_fit_that_raised_is_dropped_by_the_next_fit():
    import keras

    model = _tiny_model()
    x, y = _xy()
    calls = []

    class AttachThenCrash(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            _keras_internals.add_train_function_hook(self.model, calls.append)

        def on_train_batch_end(self, batch, logs=None):
            raise RuntimeError("crash")

    with pytest.raises(RuntimeError, match="crash"):
        model.fit(
            x, y, batch_size=4, epochs=1, verbose=0, callbacks=[AttachThenCrash()]
        )
    assert len(calls) == 1
    model.fit(x, y, batch_size=4, epochs=1, verbose=0)  # Keras runs no on_train_end
    assert len(calls) == 1
    assert "make_train_function" not in vars(model)


def _progress_line(value, verbose=1):
    import io
    from contextlib import redirect_stdout

    from keras.src.utils.progbar import Progbar

    out = io.StringIO()
    with redirect_stdout(out):
        bar = Progbar(target=1, verbose=verbose, stateless_metrics=set())
        bar.update(1, [("count", value)], finalize=True)
    return out.getvalue()


def test_progress_bar_prints_floats_so_counts_need_logged_int():
    # What ProgbarLogger does (`stateless_metrics=set()`): every value is
    # printed with {:.4f} / {:.4e}, an int too.
    assert "count: 0.0000e+00" in _progress_line(0)
    assert "count: 3.0000" in _progress_line(3)
    from keras.src.callbacks.progbar_logger import ProgbarLogger

    assert "stateless_metrics=set()" in inspect.getsource(
        ProgbarLogger._maybe_init_progbar
    )
    LoggedInt = _keras_internals.LoggedInt
    for verbose in (1, 2):
        assert "count: 0\n" in _progress_line(LoggedInt(0), verbose) + "\n"
        line = _progress_line(LoggedInt(3), verbose)
        assert "count: 3" in line and "3.0" not in line
    assert "count: 2.5000" in _progress_line(LoggedInt(2.5))  # not whole: as a float


def test_logged_int_is_a_float_elsewhere():
    import json
    import pickle

    value = _keras_internals.LoggedInt(4)
    assert isinstance(value, float) and value == 4 and str(value) == "4.0"
    assert json.dumps({"n": value}) == '{"n": 4.0}'
    assert pickle.loads(pickle.dumps(value)) == 4.0
    assert f"{value}" == "4" and f"{value:.2f}" == "4" and f"{value / 2}" == "2"


def test_gradient_accumulation_state_is_what_keras_apply_reads():
    import keras
    from keras.src.optimizers import base_optimizer

    source = inspect.getsource(base_optimizer.BaseOptimizer._backend_apply_gradients)
    assert "self._iterations + 1" in source and "(g + acc_g) / steps" in source
    weights = [
        keras.Variable(np.zeros((2,), "float32")),
        keras.Variable(np.zeros((1,), "float32")),
    ]
    opt = keras.optimizers.SGD(1.0, gradient_accumulation_steps=3)
    opt.apply([np.ones((2,), "float32"), np.full((1,), 2.0, "float32")], weights)
    assert int(_keras_internals.raw_iterations(opt).numpy()) == 1
    assert int(opt.iterations) == 0  # raw // 3
    by_variable = _keras_internals.gradient_accumulators(opt, weights[::-1])
    np.testing.assert_array_equal(by_variable[0].numpy(), [2.0])
    np.testing.assert_array_equal(by_variable[1].numpy(), [1.0, 1.0])
    assert len(_keras_internals.gradient_accumulators(opt)) == 2


def test_merge_calls_inline_makes_maybe_merge_call_call_its_function():
    import tensorflow as tf
    from tensorflow.python.distribute import merge_call_interim

    source = inspect.getsource(merge_call_interim.strategy_supports_no_merge_call)
    assert "strategy.extended._use_merge_call()" in source
    strategy = tf.distribute.MirroredStrategy(["/cpu:0"])
    with strategy.scope():
        assert not tf.__internal__.distribute.strategy_supports_no_merge_call()
        with _keras_internals.merge_calls_inline(strategy):
            assert tf.__internal__.distribute.strategy_supports_no_merge_call()
            called = tf.__internal__.distribute.interim.maybe_merge_call(
                lambda s, x: (s, x), strategy, 7
            )
            assert called == (strategy, 7)
        assert not tf.__internal__.distribute.strategy_supports_no_merge_call()
    assert "_use_merge_call" not in vars(strategy.extended)  # undone


def test_quiet_tracing_warning_sets_the_flag_tensorflow_reads():
    import inspect

    import tensorflow as tf
    from tensorflow.python.eager.polymorphic_function import polymorphic_function

    function = _keras_internals.quiet_tracing_warning(tf.function(lambda: 1))
    assert function._omit_frequent_tracing_warning is True
    # The flag TensorFlow passes to its frequent-tracing detector.
    source = inspect.getsource(polymorphic_function.Function.__call__)
    assert "self._omit_frequent_tracing_warning" in source


def test_assign_add_is_one_op_in_the_step_with_keras_result():
    import keras
    import tensorflow as tf

    counter = keras.Variable(3, dtype="int32", trainable=False)
    total = keras.Variable(0.5, dtype="float32", trainable=False)

    @tf.function
    def step(flag):
        _keras_internals.assign_add(counter, 1)
        _keras_internals.assign_add(total, tf.cast(flag, "float32"))

    step(tf.constant(True))
    step(tf.constant(False))
    assert int(counter.numpy()) == 5
    assert float(total.numpy()) == 1.5
    graph = step.get_concrete_function(tf.TensorSpec((), tf.bool)).graph
    kinds = [op.type for op in graph.get_operations()]
    assert kinds.count("AssignAddVariableOp") == 2
    assert "AssignVariableOp" not in kinds and "ReadVariableOp" not in kinds
    # In a stateless scope Keras records the update instead.
    with keras.StatelessScope() as scope:
        _keras_internals.assign_add(counter, 2)
    assert int(scope.get_current_value(counter)) == 7
    assert int(counter.numpy()) == 5


def test_read_is_one_read_for_several_uses_with_the_value_at_that_point():
    import keras
    import tensorflow as tf

    counter = keras.Variable(3, dtype="int32", trainable=False)

    @tf.function
    def step():
        before = _keras_internals.read(counter)
        counter.assign(before + 10)
        after = _keras_internals.read(counter)
        return before, keras.ops.maximum(before - 1, 0), after

    before, lowered, after = step()
    assert (int(before), int(lowered), int(after)) == (3, 2, 13)
    kinds = [op.type for op in step.get_concrete_function().graph.get_operations()]
    assert kinds.count("ReadVariableOp") == 2


_COPY_WARNING = "__array__ implementation doesn't accept a copy keyword"


def test_to_numpy_reads_variables_without_numpys_copy_warning():
    import warnings

    import keras
    import tensorflow as tf

    keras_variable = keras.Variable([1.0, 2.0])
    values = {
        "keras variable": keras_variable,
        "tensorflow variable": tf.Variable([1.0, 2.0]),
        "eager tensor": tf.constant([1.0, 2.0]),
        "array": np.array([1.0, 2.0], "float32"),
        "list": [1.0, 2.0],
    }
    # Keras' own conversion warns on a variable under NumPy 2 (the reason
    # `to_numpy` exists); if a Keras release fixes it, this says so.
    with pytest.warns(DeprecationWarning, match=_COPY_WARNING):
        keras.ops.convert_to_numpy(keras_variable)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", _COPY_WARNING, DeprecationWarning)
        for name, value in values.items():
            result = _keras_internals.to_numpy(value)
            assert isinstance(result, np.ndarray), name
            np.testing.assert_array_equal(result, [1.0, 2.0], err_msg=name)


def test_a_fit_with_the_detector_warns_nothing_about_copy_keywords():
    # The detector read its learning-rate variable with
    # `keras.ops.convert_to_numpy` at `on_train_begin`: a DeprecationWarning
    # in every `fit` with NumPy 2.
    import warnings

    import keras

    from keras_stability.callbacks import GradientExplosionDetector

    x = np.random.default_rng(0).normal(size=(64, 4)).astype("float32")
    y = (x[:, 0] > 0).astype("int32")
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    model.compile(
        keras.optimizers.Adam(1e-3),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("error", _COPY_WARNING, DeprecationWarning)
        model.fit(
            x,
            y,
            epochs=1,
            batch_size=16,
            verbose=0,
            callbacks=[GradientExplosionDetector(verbose=0)],
        )


def test_keras_collects_garbage_per_deleted_variable_and_quantize_defers_it(
    monkeypatch,
):
    # Keras' `Layer.__delattr__` runs `gc.collect()` for every variable it
    # deletes; `Model.quantize` deletes each float kernel it replaces.
    # `pruning.quantize` runs them as one collection.
    import gc

    import keras

    from keras_stability import pruning

    calls = []
    collect = gc.collect
    monkeypatch.setattr(gc, "collect", lambda *a, **k: calls.append(1) or collect())

    def mlp():
        return keras.Sequential(
            [keras.Input((4,)), keras.layers.Dense(3), keras.layers.Dense(2)]
        )

    keras_model = mlp()
    keras_model.quantize("int8")
    assert len(calls) == 2  # one per Dense kernel replaced
    calls.clear()
    ours = mlp()
    ours.set_weights(mlp().get_weights())
    assert pruning.quantize(ours) is ours
    assert len(calls) == 1
    assert [str(w.dtype) for w in ours.weights if w.path.endswith("kernel")] == [
        "int8",
        "int8",
    ]
    with _keras_internals.one_garbage_collection():
        pass
    assert len(calls) == 2  # the one on leaving


def test_run_through_graph_and_direct_sublayers_are_what_sparse_storage_inlines():
    import keras

    inner_dense = keras.layers.Dense(3, name="inner_dense")
    inner_in = keras.Input((4,))
    inner = keras.Model(inner_in, inner_dense(inner_in), name="inner")
    x = keras.Input((4,))
    model = keras.Model(x, keras.layers.Dense(2, name="head")(inner(x)))
    direct = _keras_internals.flatten_layers(model, include_self=False, recursive=False)
    assert {"inner", "head"} <= {layer.name for layer in direct}
    assert inner_dense not in direct  # owned by `inner`, not by `model`
    called = []

    def operation_fn(operation):
        called.append(operation.name)
        return operation

    data = np.ones((2, 4), "float32")
    out = _keras_internals.run_through_graph(model, [data], operation_fn)
    np.testing.assert_allclose(np.asarray(out), np.asarray(model(data)), rtol=1e-6)
    assert called == ["inner", "head"]


def test_applying_optimizer_is_the_optimizer_whose_apply_runs_the_constraints():
    import keras

    seen = []

    class Record(keras.constraints.Constraint):
        def __call__(self, w):
            seen.append(_keras_internals.applying_optimizer())
            return w

    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((3,)), keras.layers.Dense(2, kernel_constraint=Record())]
    )
    optimizer = keras.optimizers.SGD(0.1)
    model.compile(optimizer, "mse", run_eagerly=True)
    model.fit(np.ones((4, 3)), np.ones((4, 2)), verbose=0, epochs=1)
    assert seen and all(o is optimizer for o in seen)
    assert _keras_internals.applying_optimizer() is None  # outside `apply`


# SHA-256 of the `ProgbarLogger` methods `print_as_integers` wraps, as in Keras
# 3.15.1. When this test fails, Keras changed them: check they still take the
# logs they print as their last argument, and update the digests.
PROGBAR_LOGGER_PINNED = {
    "_update_progbar": "c23660c0a745e7e83fd6f26933c434d54d41332e3db21adf27d2cae71b738f32",
    "_finalize_progbar": "2ff21c1f8242c01abe8ea98ccaad5dbe1f1264f4915aee61c011e2d2a6882663",
}


def test_progbar_logger_wrapped_code_is_unchanged_upstream():
    import keras

    digests = {
        name: _keras_internals.source_digest(fn)
        for name, fn in _keras_internals.progbar_logger_patch_targets().items()
    }
    assert digests == PROGBAR_LOGGER_PINNED, (
        "Keras changed ProgbarLogger code that keras_stability wraps "
        f"(Keras {keras.__version__}); see keras_stability/_keras_internals.py."
    )


def test_print_as_integers_only_changes_the_marked_models_keys():
    import io
    from contextlib import redirect_stdout

    from keras.src.callbacks.progbar_logger import ProgbarLogger

    def printed(model):
        logger = ProgbarLogger()
        logger.set_model(model)
        logger.set_params({"verbose": 2, "epochs": 1, "steps": 1})
        out = io.StringIO()
        with redirect_stdout(out):
            logger.on_epoch_begin(0)
            logger.on_epoch_end(0, {"count": 0.0, "other": 0.0, "loss": 2.0})
        return out.getvalue()

    marked, other = _tiny_model(), _tiny_model()
    _keras_internals.print_as_integers(marked, ("count",))
    assert "count: 0 - other: 0.0000e+00 - loss: 2.0000" in printed(marked)
    assert "count: 0.0000e+00" in printed(other)
