"""Feature distillation terms between named layers (FitNets hints).

`FeatureDistillation` extends `keras.distillation.FeatureDistillation` with a
weight, `sample_weight` support and a learned projection when the teacher and
student features have different widths (Romero et al., 2015, "FitNets"). The
projection itself is a `Dense` layer (a 1x1 convolution on feature maps) that
the `Distiller` creates and trains with the student; it is not part of the
student, so `distiller.student` saves without it.
"""

import keras
from keras import ops

from keras_stability._checks import check_bool
from keras_stability._checks import check_number
from keras_stability._checks import invalid
from keras_stability.distillation.losses import as_loss

__all__ = ["FeatureDistillation"]


@keras.saving.register_keras_serializable(package="keras_stability")
class FeatureDistillation(keras.distillation.FeatureDistillation):
    """A weighted hint loss between a teacher layer and a student layer.

    The `Distiller` reads the output of `teacher_layer_name` (frozen, inference
    mode) and of `student_layer_name`; if their last dimensions differ and
    `projection` is on, the student features go through a learned
    `Dense(teacher_width, use_bias=False)` first. The term adds
    `weight * loss(teacher_features, student_features)` to the total loss.
    Feature maps of rank above 2 are flattened per sample before the loss.

    Args:
        teacher_layer_name: Name of a layer of the teacher (a functional or
            `Sequential` model).
        student_layer_name: Name of a layer of the student.
        loss: Loss between teacher and (projected) student features: a
            `keras.losses.Loss`, a name such as `"mse"` or `"cosine_similarity"`,
            or a callable `(y_true, y_pred)`. Defaults to `"mse"`.
        weight: Non-negative weight of this term. Defaults to `1.0`.
        projection: Learn a projection when widths differ. With `False`,
            different widths are an error. Defaults to `True`.

    Raises:
        ValueError: If a layer name is not a non-empty string, `loss` is not
            a loss, `weight` is not a finite number >= 0 or `projection` is
            not a bool.

    Example:

    ```python
    term = FeatureDistillation("teacher_hidden", "student_hidden", weight=0.5)
    distiller = Distiller(student, teacher, feature_distillation=[term])
    ```

    Reference:
        Romero et al., 2015, "FitNets: Hints for Thin Deep Nets",
        https://arxiv.org/abs/1412.6550
    """

    def __init__(
        self,
        teacher_layer_name,
        student_layer_name,
        loss="mse",
        weight=1.0,
        projection=True,
    ):
        for arg, value in (
            ("teacher_layer_name", teacher_layer_name),
            ("student_layer_name", student_layer_name),
        ):
            if not isinstance(value, str) or not value:
                raise invalid(arg, value, "the name of a layer (a non-empty string)")
        weight = check_number("weight", weight, low=0.0, what="a non-negative number")
        projection = check_bool("projection", projection)
        loss_fn = as_loss(loss)
        super().__init__(
            loss=loss_fn,
            teacher_layer_name=teacher_layer_name,
            student_layer_name=student_layer_name,
        )
        self._loss_arg = loss
        self.weight = weight
        self.projection = projection

    def compute_loss(self, teacher_outputs, student_outputs, sample_weight=None):
        """Weighted-by-sample loss between the two feature tensors.

        Args:
            teacher_outputs: Teacher features, `(batch, ..., width)`.
            student_outputs: Student features, already projected to the
                teacher's width.
            sample_weight: Optional `(batch,)` weights. Defaults to `None`.

        Returns:
            Scalar loss (not yet multiplied by `weight`).
        """
        teacher_outputs = ops.convert_to_tensor(teacher_outputs)
        student_outputs = ops.convert_to_tensor(student_outputs)
        if len(teacher_outputs.shape) > 2:
            batch = ops.shape(teacher_outputs)[0]
            teacher_outputs = ops.reshape(teacher_outputs, (batch, -1))
            student_outputs = ops.reshape(student_outputs, (batch, -1))
        student_outputs = ops.cast(student_outputs, teacher_outputs.dtype)
        return self.loss(teacher_outputs, student_outputs, sample_weight=sample_weight)

    def get_config(self):
        return {
            "teacher_layer_name": self.teacher_layer_name,
            "student_layer_name": self.student_layer_name,
            "loss": keras.saving.serialize_keras_object(self._loss_arg),
            "weight": self.weight,
            "projection": self.projection,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["loss"] = keras.saving.deserialize_keras_object(config["loss"])
        return cls(**config)
