"""Pins every private Keras name the library relies on (`keras_stability._keras_internals`)."""

import inspect

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
        "exists", "isdir", "listdir", "makedirs", "remove", "rmtree", "copy",
        "join", "File", "is_remote_path",
    ):
        assert callable(getattr(_keras_internals.file_utils, name)), name
    assert _keras_internals.file_utils.is_remote_path("gs://bucket/backup")
    assert not _keras_internals.file_utils.is_remote_path("/tmp/backup")
