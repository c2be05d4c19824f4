"""The Distiller with XLA and inside a Keras Tuner search over alpha and temperature."""

import keras
import numpy as np
import pytest

from keras_stability.distillation import Distiller
from tests.distillation.test_distiller import make_data
from tests.distillation.test_distiller import make_distiller
from tests.distillation.test_distiller import make_model


def test_jit_compile_gives_the_same_losses():
    x, y = make_data(64)
    histories = []
    for jit in (False, True):
        distiller = make_distiller(jit_compile=jit)
        histories.append(
            distiller.fit(
                x, y, epochs=2, batch_size=32, shuffle=False, verbose=0
            ).history
        )
    np.testing.assert_allclose(histories[1]["loss"], histories[0]["loss"], rtol=1e-4)


@pytest.mark.slow
def test_keras_tuner_search_over_alpha_and_temperature(tmp_path):
    keras_tuner = pytest.importorskip("keras_tuner")
    x, y = make_data(64)
    teacher = make_model(16, "teacher", seed=1)

    def build(hp):
        student = make_model(8, "student", seed=2)
        distiller = Distiller(student, teacher)
        distiller.compile(
            optimizer=keras.optimizers.SGD(0.1),
            metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
            student_loss_fn=keras.losses.SparseCategoricalCrossentropy(
                from_logits=True
            ),
            alpha=hp.Float("alpha", 0.0, 1.0),
            temperature=hp.Choice("temperature", [1.0, 4.0]),
        )
        return distiller

    tuner = keras_tuner.RandomSearch(
        build,
        objective=keras_tuner.Objective("val_student_loss", "min"),
        max_trials=2,
        directory=str(tmp_path),
        project_name="distill",
        seed=0,
    )
    tuner.search(x, y, validation_data=(x, y), epochs=1, batch_size=32, verbose=0)
    trials = tuner.oracle.get_best_trials(2)
    assert len(trials) == 2
    for trial in trials:
        assert np.isfinite(trial.score)
    best_hp = tuner.get_best_hyperparameters(1)[0]
    best = tuner.hypermodel.build(best_hp)
    assert best.alpha == pytest.approx(best_hp.get("alpha"))
    assert best.temperature == pytest.approx(best_hp.get("temperature"))
    # The teacher stays frozen across trials.
    assert not teacher.trainable and not best.teacher.trainable
