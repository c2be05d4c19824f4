"""`Distiller`: a `keras.Model` that trains a student against a frozen teacher.

The keras.io example's API (`Distiller(student, teacher)` and
`compile(optimizer, metrics, student_loss_fn, distillation_loss_fn, alpha,
temperature)`) with what `keras.distillation.Distiller` lacks: `sample_weight`
in every term, Hinton's `T**2` factor as a switch, temperature/alpha held in
variables (schedulable, saved, logged per epoch), FitNets hints with learned
projections, top-1 agreement with the teacher as a metric, and cached teacher
outputs for in-memory data.

The loss of a batch is

    alpha * student_loss_fn(y, s)
    + (1 - alpha) * T**2 * distillation_loss_fn(softmax(t / T), softmax(s / T))
    + sum_i weight_i * hint_loss_i(teacher_feature_i, projection_i(student_feature_i))

with `s`, `t` the student and teacher logits; the maths is in `losses.py`.
Unlabeled data (`y=None`, or labels equal to `compile(ignore_class=...)`)
trains on the soft-target term alone: alpha is 0 for those samples.
"""

import copy
import functools
import warnings

import keras
from keras import ops

from keras_stability import _keras_internals
from keras_stability._checks import check_bool
from keras_stability._checks import check_int
from keras_stability._checks import check_positive_int
from keras_stability._checks import check_str
from keras_stability._checks import invalid
from keras_stability.distillation import cache as cache_lib
from keras_stability.distillation.features import FeatureDistillation
from keras_stability.distillation.losses import as_loss
from keras_stability.distillation.losses import combine_losses
from keras_stability.distillation.losses import soft_target_loss
from keras_stability.distillation.losses import top1_agreement
from keras_stability.distillation.schedules import DistillationScheduler
from keras_stability.distillation.schedules import check_alpha
from keras_stability.distillation.schedules import check_schedule_values
from keras_stability.distillation.schedules import check_temperature

__all__ = ["Distiller"]

_LOGITS = "logits"


def _feature_key(layer_name):
    return f"layer/{layer_name}"


def _num_replicas():
    """Replicas of the current tf.distribute strategy (1 outside one)."""
    if keras.backend.backend() != "tensorflow":
        return 1
    import tensorflow as tf

    return tf.distribute.get_strategy().num_replicas_in_sync


class _Untracked:
    """Holds helper models out of Keras' attribute tracking and saving.

    The feature extractors share the teacher's and student's layers; tracking
    them would list those weights twice in the saved file.
    """

    def __init__(self, **kwargs):
        self.__dict__.update(kwargs)


def _check_optimizer(optimizer):
    """Resolves `optimizer` as `compile` would, naming it if it cannot be."""
    what = "an optimizer instance or name such as 'adam'"
    if optimizer is None:
        raise invalid("optimizer", optimizer, what)
    try:
        return keras.optimizers.get(optimizer)
    except (ValueError, TypeError):
        raise invalid("optimizer", optimizer, what) from None


def _check_metrics(metrics):
    """`None`, or a list/tuple/dict of metric names, `Metric`s or functions."""
    values = metrics
    if isinstance(metrics, dict):
        values = list(metrics.values())
    if values is None:
        return
    if isinstance(values, (list, tuple)) and all(
        (isinstance(m, str) and m) or callable(m) for m in values
    ):
        return
    raise invalid(
        "metrics",
        metrics,
        "None or a list of metric names, `keras.metrics.Metric`s or functions",
    )


def _check_model(arg, model):
    if not isinstance(model, keras.Model):
        raise ValueError(
            f"Invalid value for argument `{arg}`. Expected a `keras.Model`. "
            f"Received: {arg}={model!r} of type {type(model).__name__}"
        )
    if not model.built:
        raise ValueError(
            f"Invalid value for argument `{arg}`. Expected a built model: give "
            f"'{model.name}' an `keras.Input` or call it once on a batch before "
            f"passing it. Received: {arg}='{model.name}' (not built)"
        )


def _warn_on_positional_swap(init):
    """Wraps `Distiller.__init__`: warns when both models came positionally
    and the teacher is the smaller one (Keras' own `keras.distillation.Distiller`
    takes `(teacher, student)`). `__init__` itself cannot tell keywords from
    positions; `functools.wraps` keeps its signature for `inspect` and Keras."""

    @functools.wraps(init)
    def wrapper(self, *args, **kwargs):
        init(self, *args, **kwargs)
        if len(args) >= 2:
            _warn_if_swapped(self.student, self.teacher)

    return wrapper


def _warn_if_swapped(student, teacher):
    """Warns when the teacher is smaller than the student (Keras' order?)."""
    student_params, teacher_params = student.count_params(), teacher.count_params()
    if teacher_params >= student_params:
        return
    warnings.warn(
        f"The teacher '{teacher.name}' has fewer parameters ({teacher_params:,}) "
        f"than the student '{student.name}' ({student_params:,}). "
        "`keras_stability.Distiller` takes the student first, "
        "`Distiller(student, teacher)` (the keras.io example's order), while "
        "Keras' own `keras.distillation.Distiller(teacher, student, ...)` takes "
        "the teacher first: if you passed Keras' order, swap the models, or "
        f"'{student.name}' is trained toward '{teacher.name}' while "
        f"'{teacher.name}' stays frozen. If a larger student is intended (e.g. "
        "self-distillation or born-again networks), pass the models by keyword, "
        "`Distiller(student=..., teacher=...)`, which never warns.",
        UserWarning,
        stacklevel=3,
    )


def _symbolic(model):
    """The model's single symbolic output, or None for subclassed models."""
    try:
        outputs = model.outputs
    except (AttributeError, ValueError):
        return None
    return outputs


def _feature_view(model, layer_names):
    """`(inputs, logits, {layer name: output})`, symbolic, for an extractor.

    A `Sequential` model has no `input` of its own (its inner functional graph
    is private), so its layers are called again, in order, on its input
    tensor: the view shares the layers (and weights) and does not depend on
    which of their earlier calls built the model.
    """
    if isinstance(model, keras.Sequential):
        inputs = model.inputs[0]
        features = {}
        outputs = inputs
        for layer in model.layers:
            outputs = layer(outputs)
            if layer.name in layer_names:
                features[layer.name] = outputs
        return inputs, outputs, features
    features = {name: model.get_layer(name).output for name in layer_names}
    return model.input, _symbolic(model)[0], features


def _extractor(model, logits, features, inputs):
    """A functional model of `model`'s logits and hint features."""
    outputs = {_LOGITS: logits}
    outputs.update({_feature_key(name): tensor for name, tensor in features.items()})
    return keras.Model(inputs, outputs, name=f"{model.name}_hints")


def _expand_to(weight, target):
    """Appends axes to `weight` (e.g. per-sequence weights for per-token labels)."""
    for _ in range(len(target.shape) - len(weight.shape)):
        weight = ops.expand_dims(weight, -1)
    return weight


def _full_weight(sample_weight, like):
    """`sample_weight` broadcast to the shape of `like` (ones if `None`)."""
    if sample_weight is None:
        return ops.ones_like(like)
    return ops.ones_like(like) * _expand_to(ops.cast(sample_weight, like.dtype), like)


@keras.saving.register_keras_serializable(package="keras_stability")
class Distiller(keras.Model):
    """Knowledge distillation from a frozen teacher: `Distiller(student, teacher)`.

    The student comes first, as in the keras.io example, the opposite of
    Keras' own `keras.distillation.Distiller(teacher, student, ...)`; pass
    the models by keyword (`Distiller(student=..., teacher=...)`) to be
    explicit. Given positionally, a teacher with fewer parameters than the
    student raises a `UserWarning` (the models are probably swapped); by
    keyword it never warns (a larger student, as in self-distillation or
    born-again networks, is allowed).

    Both models take the same inputs and output logits of the same shape. The
    teacher is frozen (`trainable = False`) and always runs in inference mode;
    only the student (and the projections of hint terms) train. `predict` and
    `__call__` return the student's outputs; `distiller.student` can be saved
    and used on its own. `fit`/`evaluate` log `loss`, the compiled metrics of
    the student, `student_loss`, `distillation_loss` (the soft-target term,
    with `T**2`), `feature_loss` (when hint terms are set),
    `teacher_agreement` (top-1 agreement with the teacher); `fit` also logs
    `temperature` and `alpha` (the weight the hard-label term had in the last
    batch: 0 on unlabeled data, see below). `evaluate` returns one value per
    `metrics_names`, as Keras models do (`return_dict=True` names them).

    Language models: logits of shape `(batch, sequence, vocab)` work as
    they are (the char LM of `keras_stability.models`, keras-hub's
    `CausalLM`s with `preprocessor=None`). Pass the padding mask as
    `sample_weight` (as keras-hub's preprocessors do), shape
    `(batch, sequence)`: a padded token then counts in neither the hard-label
    nor the soft term. The losses keep their own reduction: with Keras'
    default `"sum_over_batch_size"` the sum over tokens is divided by
    `batch * sequence` (as for keras-hub's own `CausalLM.fit`); give both
    losses `reduction="mean_with_sample_weight"` for the mean over unpadded
    tokens.

    Unlabeled data: `fit(x)` (or a dataset of inputs only, or `y=None`)
    trains on the distillation term alone, with alpha taken as 0 (not
    `(1 - alpha)` times the soft term; the logged `alpha` is 0). For a mix,
    pass every input with its label where known and `ignore_class` (e.g.
    `-1`, scikit-learn's convention) where not, and compile with
    `ignore_class=-1`: a labeled sample (or token) adds
    `alpha * hard + (1 - alpha) * soft`, an unlabeled one `soft` alone, and
    the compiled metrics count labeled ones only.
    Labels must be integers (sparse) for `ignore_class`.

    The training step is the standard one: gradients of the total loss with
    respect to `trainable_variables`, then `optimizer.apply(grads, vars)`, so
    optimizer wrappers (`LossScaleOptimizer`, gradient clipping wrappers) and
    `tf.distribute` strategies compose with it.

    Args:
        student: A built `keras.Model` that outputs logits (the first
            positional argument).
        teacher: A built, trained `keras.Model` with the same output shape
            (the second positional argument).
        feature_distillation: Optional `FeatureDistillation` term or list of
            them (hints between named layers of functional or `Sequential`
            models); a projection is learned where widths differ. Defaults
            to `None`.
        name: Model name. Defaults to `"distiller"`.
        **kwargs: Passed to `keras.Model` (e.g. `dtype`).

    Raises:
        ValueError: If a model is not a built `keras.Model`, the output shapes
            differ, a hint names a layer that does not exist, or widths differ
            for a term with `projection=False`.

    Example:

    ```python
    distiller = Distiller(student=student, teacher=teacher)
    distiller.compile(
        optimizer=keras.optimizers.Adam(),
        metrics=[keras.metrics.SparseCategoricalAccuracy()],
        student_loss_fn=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        distillation_loss_fn=keras.losses.KLDivergence(),
        alpha=0.1,
        temperature=10,
    )
    distiller.fit(x_train, y_train, epochs=3, cache_teacher_outputs=True)
    distiller.evaluate(x_test, y_test)
    distiller.student.save("student.keras")

    # Semi-supervised: every input, labels only where known (-1 elsewhere).
    distiller.compile(
        optimizer="adam",
        student_loss_fn=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        alpha=0.5,
        ignore_class=-1,
    )
    distiller.fit(x_all, y_partial, epochs=3)
    ```

    Reference:
        Hinton, Vinyals and Dean, 2015, "Distilling the Knowledge in a Neural
        Network", https://arxiv.org/abs/1503.02531
    """

    @_warn_on_positional_swap
    def __init__(
        self, student, teacher, feature_distillation=None, name="distiller", **kwargs
    ):
        name = check_str("name", name)
        super().__init__(name=name, **kwargs)
        _check_model("student", student)
        _check_model("teacher", teacher)
        self._check_outputs(student, teacher)
        terms = self._check_terms(feature_distillation, student, teacher)

        self.student = student
        self.teacher = teacher
        self.teacher.trainable = False

        self.projections = []
        teacher_extractor = student_extractor = None
        if terms:
            t_in, t_logits, t_feats = _feature_view(
                teacher, {term.teacher_layer_name for term in terms}
            )
            s_in, s_logits, s_feats = _feature_view(
                student, {term.student_layer_name for term in terms}
            )
            for i, term in enumerate(terms):
                self.projections.append(
                    self._make_projection(
                        i,
                        term,
                        t_feats[term.teacher_layer_name],
                        s_feats[term.student_layer_name],
                    )
                )
            teacher_extractor = _extractor(teacher, t_logits, t_feats, t_in)
            student_extractor = _extractor(student, s_logits, s_feats, s_in)
        self._helpers = _Untracked(
            terms=terms,
            teacher_extractor=teacher_extractor,
            student_extractor=student_extractor,
            compile_args=None,
            schedules={},
        )

        self._temperature = self.add_weight(
            shape=(),
            initializer=keras.initializers.Constant(3.0),
            trainable=False,
            name="temperature",
        )
        self._alpha = self.add_weight(
            shape=(),
            initializer=keras.initializers.Constant(0.1),
            trainable=False,
            name="alpha",
        )
        self.student_loss_tracker = keras.metrics.Mean(name="student_loss")
        self.distillation_loss_tracker = keras.metrics.Mean(name="distillation_loss")
        self.feature_loss_tracker = (
            keras.metrics.Mean(name="feature_loss") if terms else None
        )
        self.agreement_tracker = keras.metrics.Mean(name="teacher_agreement")
        self._student_loss_fn = None
        self._distillation_loss_fn = None
        self._scale_by_temperature_squared = True
        self._ignore_class = None
        self.built = True

    # ----------------------------------------------------------- validation
    @staticmethod
    def _check_outputs(student, teacher):
        shapes = {}
        for arg, model in (("student", student), ("teacher", teacher)):
            outputs = _symbolic(model)
            if outputs is None:
                continue
            if len(outputs) != 1:
                raise ValueError(
                    f"Invalid value for argument `{arg}`. Expected a model with a "
                    f"single logits output; give '{model.name}' one output head. "
                    f"Received: {arg}='{model.name}' with {len(outputs)} outputs"
                )
            shapes[arg] = tuple(outputs[0].shape[1:])
        if len(shapes) == 2 and shapes["student"] != shapes["teacher"]:
            raise ValueError(
                "Invalid value for argument `student`. Expected the output shape "
                f"of the teacher '{teacher.name}', (None, "
                f"{', '.join(map(str, shapes['teacher']))}): give the student a "
                "final layer with as many logits as the teacher. Received: "
                f"student='{student.name}' with output shape (None, "
                f"{', '.join(map(str, shapes['student']))})"
            )

    @staticmethod
    def _check_terms(feature_distillation, student, teacher):
        if feature_distillation is None:
            return []
        terms = (
            list(feature_distillation)
            if isinstance(feature_distillation, (list, tuple))
            else [feature_distillation]
        )
        for term in terms:
            if not isinstance(term, FeatureDistillation):
                raise ValueError(
                    "Invalid value for argument `feature_distillation`. Expected "
                    "`keras_stability.distillation.FeatureDistillation` terms. "
                    f"Received: feature_distillation={feature_distillation!r}"
                )
            for role, model, layer_name in (
                ("teacher", teacher, term.teacher_layer_name),
                ("student", student, term.student_layer_name),
            ):
                if _symbolic(model) is None:
                    raise ValueError(
                        f"Invalid value for argument `{role}`. Expected a "
                        "functional or Sequential model for feature distillation "
                        f"between named layers. Received: {role}='{model.name}' "
                        "(a subclassed model without symbolic outputs)"
                    )
                names = [layer.name for layer in model.layers]
                if layer_name not in names:
                    shown = ", ".join(repr(n) for n in names[:20])
                    raise ValueError(
                        f"Invalid value for argument `{role}_layer_name`. Expected "
                        f"the name of a layer of the {role} '{model.name}' (one of "
                        f"{shown}). Received: {role}_layer_name={layer_name!r}"
                    )
        return terms

    def _make_projection(self, index, term, t_feat, s_feat):
        t_width, s_width = t_feat.shape[-1], s_feat.shape[-1]
        if t_feat.shape[1:-1] != s_feat.shape[1:-1]:
            raise ValueError(
                "Invalid value for argument `feature_distillation`. Expected the "
                f"teacher layer '{term.teacher_layer_name}' and the student layer "
                f"'{term.student_layer_name}' to have the same shape except the "
                f"last axis (pool or reshape one of them). Received: shapes "
                f"{tuple(t_feat.shape)} and {tuple(s_feat.shape)}"
            )
        name = f"projection_{index}_{term.student_layer_name}"
        if t_width == s_width:
            return keras.layers.Identity(name=name)
        if not term.projection:
            raise ValueError(
                "Invalid value for argument `projection`. Expected True when the "
                f"teacher layer '{term.teacher_layer_name}' (width {t_width}) and "
                f"the student layer '{term.student_layer_name}' (width {s_width}) "
                "differ. Received: projection=False"
            )
        projection = keras.layers.Dense(t_width, use_bias=False, name=name)
        projection.build(tuple(s_feat.shape))
        return projection

    # ------------------------------------------------------------ properties
    @property
    def feature_distillation(self):
        """The `FeatureDistillation` terms, as a list."""
        return list(self._helpers.terms)

    @property
    def temperature(self):
        """Current temperature (a Python float)."""
        return float(_keras_internals.to_numpy(self._temperature.value))

    @property
    def alpha(self):
        """Current weight of the hard-label loss (a Python float)."""
        return float(_keras_internals.to_numpy(self._alpha.value))

    def set_distillation_params(self, temperature=None, alpha=None):
        """Assigns a new temperature and/or alpha (validated); `None` keeps it.

        Args:
            temperature: Finite positive number or `None`. Defaults to `None`.
            alpha: Number in `[0, 1]` or `None`. Defaults to `None`.

        Raises:
            ValueError: If a value is out of range.
        """
        if temperature is not None:
            self._temperature.assign(check_temperature(temperature))
        if alpha is not None:
            self._alpha.assign(check_alpha(alpha))

    # --------------------------------------------------------------- compile
    def compile(
        self,
        optimizer="adam",
        metrics=None,
        student_loss_fn=None,
        distillation_loss_fn=None,
        alpha=0.1,
        temperature=3.0,
        scale_by_temperature_squared=True,
        ignore_class=None,
        **kwargs,
    ):
        """Configures the distiller, with the keras.io example's signature.

        Args:
            optimizer: Optimizer (instance or name) for the student.
                Defaults to `"adam"`.
            metrics: Metrics of the student's predictions against `y`.
                Defaults to `None`.
            student_loss_fn: Hard-label loss `(y, student_logits)`, e.g.
                `SparseCategoricalCrossentropy(from_logits=True)`. Required.
            distillation_loss_fn: Loss between softened distributions
                `(softmax(t/T), softmax(s/T))`. Defaults to
                `keras.losses.KLDivergence()`.
            alpha: Weight of the hard-label loss in `[0, 1]`, or a schedule
                `epoch -> alpha` (e.g. `LinearSchedule`). Defaults to `0.1`.
            temperature: Positive (finite) softmax temperature, or a
                schedule `epoch -> temperature`. Defaults to `3.0`.
            scale_by_temperature_squared: Multiply the soft-target term by
                `T**2` (Hinton et al.). Defaults to `True`.
            ignore_class: An integer label that means "unknown", as in
                `keras.losses.SparseCategoricalCrossentropy(ignore_class=...)`
                (scikit-learn's semi-supervised estimators use `-1`), or
                `None`. Samples (or tokens) with this label train on the
                distillation term alone and count in no compiled metric;
                the others on the mix set by `alpha`. Needs integer
                (sparse) labels. Defaults to `None`.
            **kwargs: Passed to `keras.Model.compile` (`steps_per_execution`,
                `jit_compile`, `run_eagerly`, ...); `loss` is not accepted.

        Raises:
            ValueError: If `optimizer` or `metrics` cannot be interpreted,
                `student_loss_fn` is missing or not a loss, `alpha` is outside
                `[0, 1]`, `temperature` is not a finite positive number (nor a
                schedule of them), `scale_by_temperature_squared` is not a
                bool or `ignore_class` is not an integer or `None`.
        """
        if "loss" in kwargs:
            raise ValueError(
                "Invalid value for argument `loss`. Expected `student_loss_fn=` "
                "(and optionally `distillation_loss_fn=`) instead of `loss=` for "
                f"a Distiller. Received: loss={kwargs['loss']!r}"
            )
        if student_loss_fn is None:
            raise ValueError(
                "Invalid value for argument `student_loss_fn`. Expected a loss "
                "of the student's logits against the labels, e.g. "
                "`keras.losses.SparseCategoricalCrossentropy(from_logits=True)`. "
                "Received: student_loss_fn=None"
            )
        resolved_optimizer = _check_optimizer(optimizer)
        _check_metrics(metrics)
        schedules = {}
        for arg, value, check in (
            ("alpha", alpha, check_alpha),
            ("temperature", temperature, check_temperature),
        ):
            if callable(value):
                check_schedule_values(arg, value, check)
                schedules[arg] = value
            else:
                check(value)
        scale_by_temperature_squared = check_bool(
            "scale_by_temperature_squared", scale_by_temperature_squared
        )
        ignore_class = check_int("ignore_class", ignore_class, allow_none=True)
        self._student_loss_fn = as_loss(student_loss_fn, "student_loss_fn")
        self._distillation_loss_fn = (
            keras.losses.KLDivergence()
            if distillation_loss_fn is None
            else as_loss(distillation_loss_fn, "distillation_loss_fn")
        )
        self._scale_by_temperature_squared = scale_by_temperature_squared
        self._ignore_class = ignore_class
        self.set_distillation_params(
            temperature=temperature(0) if callable(temperature) else temperature,
            alpha=alpha(0) if callable(alpha) else alpha,
        )
        self._helpers.schedules = schedules
        self._helpers.compile_args = dict(
            metrics=metrics,
            student_loss_fn=student_loss_fn,
            distillation_loss_fn=distillation_loss_fn,
            alpha=alpha,
            temperature=temperature,
            scale_by_temperature_squared=scale_by_temperature_squared,
            ignore_class=ignore_class,
        )
        super().compile(optimizer=resolved_optimizer, metrics=metrics, **kwargs)

    def get_compile_config(self):
        if not self.compiled or self._helpers.compile_args is None:
            return {}
        config = {"optimizer": self.optimizer}
        config.update(self._helpers.compile_args)
        return {
            key: keras.saving.serialize_keras_object(value)
            for key, value in config.items()
        }

    def compile_from_config(self, config):
        config = {
            key: keras.saving.deserialize_keras_object(value)
            for key, value in config.items()
        }
        self.compile(**config)
        if self.optimizer is not None and self.built:
            self.optimizer.build(self.trainable_variables)

    # --------------------------------------------------------------- forward
    def call(self, inputs, training=None):
        """Returns the student's outputs (inputs may carry cached outputs)."""
        inputs, _ = cache_lib.split_cached(inputs)
        return self.student(inputs, training=training)

    def teacher_outputs(self, inputs):
        """Teacher logits and hint features, `{"logits": ..., "layer/<name>": ...}`."""
        if self._helpers.teacher_extractor is not None:
            return self._helpers.teacher_extractor(inputs, training=False)
        return {_LOGITS: self.teacher(inputs, training=False)}

    def _student_forward(self, inputs, training):
        if self._helpers.student_extractor is not None:
            outputs = self._helpers.student_extractor(inputs, training=training)
            return outputs[_LOGITS], outputs
        return self.student(inputs, training=training), None

    def compute_loss(
        self,
        x=None,
        y=None,
        y_pred=None,
        sample_weight=None,
        training=True,
        student_features=None,
    ):
        """Total distillation loss of a batch; updates the loss trackers.

        Args:
            x: Inputs, possibly packed with cached teacher outputs.
            y: Labels for `student_loss_fn`; with `y=None` only the
                distillation terms count.
            y_pred: Student logits (computed if `None`).
            sample_weight: Optional per-sample weights, applied to every term.
            training: Whether the student runs in training mode.
            student_features: Student outputs of the hint extractor, if the
                caller already ran it. Defaults to `None`.

        Returns:
            Scalar loss, scaled for `tf.distribute` like Keras' own losses.
        """
        if self._student_loss_fn is None:
            raise ValueError(
                f"Invalid value for `Distiller` '{self.name}'. Expected a compiled "
                "distiller: call `compile(optimizer, metrics, student_loss_fn, "
                "...)` before `fit`/`evaluate`. Received: not compiled"
            )
        inputs, cached = cache_lib.split_cached(x)
        teacher_out = cached if cached is not None else self.teacher_outputs(inputs)
        teacher_logits = ops.stop_gradient(teacher_out[_LOGITS])
        if y_pred is None or (self._helpers.terms and student_features is None):
            y_pred, student_features = self._student_forward(inputs, training)
        if tuple(teacher_logits.shape[1:]) != tuple(y_pred.shape[1:]) and None not in (
            tuple(teacher_logits.shape[1:]) + tuple(y_pred.shape[1:])
        ):
            # Static shapes only (subclassed models are not checked in __init__).
            raise ValueError(
                "Invalid value for argument `student`. Expected outputs shaped like "
                f"the teacher '{self.teacher.name}' logits {tuple(teacher_logits.shape)}: "
                "give the student a final layer with as many logits as the teacher. "
                f"Received: student='{self.student.name}' with outputs shaped "
                f"{tuple(y_pred.shape)}"
            )

        def soft(weight):
            return soft_target_loss(
                teacher_logits,
                y_pred,
                self._temperature,
                loss_fn=self._distillation_loss_fn,
                scale_by_temperature_squared=self._scale_by_temperature_squared,
                sample_weight=weight,
            )

        soft_loss = soft(sample_weight)
        if y is None:
            # Unlabeled batch: the distillation term alone (alpha is 0 here).
            student_loss = ops.zeros((), dtype=y_pred.dtype)
            total = ops.cast(soft_loss, y_pred.dtype)
        elif self._ignore_class is None:
            student_loss = self._student_loss_fn(y, y_pred, sample_weight=sample_weight)
            total = combine_losses(student_loss, soft_loss, self._alpha)
        else:
            # Per-sample alpha: alpha where the label is known, 0 where not.
            # With the losses' own (linear) reduction this is
            # sum_i w_i * (a_i * hard_i + (1 - a_i) * soft_i) / n.
            y, labeled = self._known_labels(y, sample_weight, y_pred.dtype)
            student_loss = self._student_loss_fn(y, y_pred, sample_weight=labeled)
            alpha = ops.cast(self._alpha, y_pred.dtype)
            soft_weight = _full_weight(sample_weight, labeled) - alpha * labeled
            total = alpha * ops.cast(student_loss, y_pred.dtype) + ops.cast(
                soft(soft_weight), y_pred.dtype
            )

        replicas = float(_num_replicas())
        if self._helpers.terms:
            feature_loss = ops.zeros((), dtype=total.dtype)
            for term, projection in zip(
                self._helpers.terms, self.projections, strict=True
            ):
                t_feat = ops.stop_gradient(
                    teacher_out[_feature_key(term.teacher_layer_name)]
                )
                s_feat = projection(
                    student_features[_feature_key(term.student_layer_name)]
                )
                value = term.compute_loss(t_feat, s_feat, sample_weight=sample_weight)
                feature_loss = feature_loss + term.weight * ops.cast(value, total.dtype)
            total = total + feature_loss
            self.feature_loss_tracker.update_state(feature_loss * replicas)

        regularization = self.student.losses + [
            loss for projection in self.projections for loss in projection.losses
        ]
        if regularization:
            total = total + ops.sum(ops.stack(regularization)) / replicas

        self.student_loss_tracker.update_state(student_loss * replicas)
        self.distillation_loss_tracker.update_state(soft_loss * replicas)
        self.agreement_tracker.update_state(
            top1_agreement(teacher_logits, y_pred), sample_weight=sample_weight
        )
        return total

    def _known_labels(self, y, sample_weight, dtype):
        """`(y, weight)` with unknown labels (`ignore_class`) set to 0 and
        weighted 0; `weight` is `sample_weight` (or ones) on known labels."""
        known = ops.not_equal(y, ops.cast(self._ignore_class, y.dtype))
        y = ops.where(known, y, ops.zeros_like(y))
        known = ops.cast(known, dtype)
        if sample_weight is not None:
            known = known * _expand_to(ops.cast(sample_weight, dtype), known)
        return y, known

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        """Compiled metrics on known labels only; none for unlabeled batches."""
        if y is None:
            # Not even after a labeled `fit` built them: they would read 0
            # (e.g. accuracy 0.0 for `evaluate(x)` without labels).
            return self._metrics_result(compiled=False)
        if self._ignore_class is not None:
            import tensorflow as tf

            # Keep the known rows (tokens) only: unweighted metrics ignore
            # sample weights, so a zero weight would not hide a row from them.
            if len(y.shape) == len(y_pred.shape) and y.shape[-1] == 1:
                y = ops.squeeze(y, axis=-1)  # sparse labels as a column, (batch, 1)
            known = ops.not_equal(y, ops.cast(self._ignore_class, y.dtype))
            y = tf.boolean_mask(y, known)
            y_pred = tf.boolean_mask(y_pred, known)
            if sample_weight is not None:
                weight = _full_weight(sample_weight, ops.cast(known, y_pred.dtype))
                sample_weight = tf.boolean_mask(weight, known)
        return super().compute_metrics(x, y, y_pred, sample_weight=sample_weight)

    # ----------------------------------------------------------------- steps
    def _track_total(self, inputs, loss):
        batch = ops.shape(keras.tree.flatten(inputs)[0])[0]
        self._loss_tracker.update_state(
            loss * float(_num_replicas()), sample_weight=batch
        )

    def train_step(self, data):
        import tensorflow as tf

        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        inputs, _ = cache_lib.split_cached(x)
        with tf.GradientTape() as tape:
            y_pred, student_features = self._student_forward(inputs, training=True)
            loss = self.compute_loss(
                x,
                y,
                y_pred,
                sample_weight,
                training=True,
                student_features=student_features,
            )
            self._track_total(inputs, loss)
            scaled_loss = self.optimizer.scale_loss(loss)
        trainable_variables = self.trainable_variables
        grads = tape.gradient(scaled_loss, trainable_variables)
        self.optimizer.apply(grads, trainable_variables)
        logs = self.compute_metrics(inputs, y, y_pred, sample_weight=sample_weight)
        # The schedulable hyperparameters, logged in training only: they are
        # not metrics, and `evaluate` returns one value per `metrics_names`.
        logs["temperature"] = ops.convert_to_tensor(self._temperature.value)
        # The alpha this batch used: 0 without labels (the soft term alone).
        alpha = ops.convert_to_tensor(self._alpha.value)
        logs["alpha"] = ops.zeros_like(alpha) if y is None else alpha
        return logs

    def test_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        inputs, _ = cache_lib.split_cached(x)
        y_pred, student_features = self._student_forward(inputs, training=False)
        loss = self.compute_loss(
            x,
            y,
            y_pred,
            sample_weight,
            training=False,
            student_features=student_features,
        )
        self._track_total(inputs, loss)
        return self.compute_metrics(inputs, y, y_pred, sample_weight=sample_weight)

    def get_metrics_result(self):
        return self._metrics_result(compiled=True)

    def _metrics_result(self, compiled):
        results = {}
        for metric in self.metrics:
            if not getattr(metric, "built", True):
                # Compiled metrics that never saw a label (unlabeled data).
                continue
            result = metric.result()
            if isinstance(result, dict):
                # The compiled metrics (Keras' `CompileMetrics`).
                if compiled:
                    results.update(result)
            else:
                results[metric.name] = result
        return results

    # ------------------------------------------------------------------- fit
    def cache_teacher_outputs(self, x, batch_size=256):
        """Computes the teacher outputs for in-memory `x` once.

        Args:
            x: In-memory inputs (NumPy arrays), samples first.
            batch_size: Batch size of the teacher pass. Defaults to `256`.

        Returns:
            `x` packed with the teacher's logits and hint features; pass it to
            `fit`/`evaluate` in place of `x` (shuffling keeps rows together).

        Raises:
            ValueError: If `x` is not in-memory array data or `batch_size` is
                not a positive integer.
        """
        batch_size = check_positive_int("batch_size", batch_size)
        if cache_lib.is_cached_batch(x):
            return x
        if self._helpers.teacher_extractor is not None:
            outputs = cache_lib.compute_teacher_outputs(
                self._helpers.teacher_extractor, x, batch_size=batch_size
            )
        else:
            logits = cache_lib.compute_teacher_outputs(
                self.teacher, x, batch_size=batch_size
            )
            outputs = {_LOGITS: logits}
        return cache_lib.pack_cached(x, outputs)

    def fit(
        self,
        x=None,
        y=None,
        batch_size=None,
        epochs=1,
        verbose="auto",
        callbacks=None,
        *args,
        cache_teacher_outputs=False,
        **kwargs,
    ):
        """`keras.Model.fit` with cached teacher outputs and compiled schedules.

        Args:
            x, y, batch_size, epochs, verbose, callbacks, *args, **kwargs: As
                for `keras.Model.fit`.
            cache_teacher_outputs: Run the teacher once over in-memory `x`
                and reuse its outputs every epoch. Defaults to `False`.

        Returns:
            The `History` of `keras.Model.fit`.
        """
        cache_teacher_outputs = check_bool(
            "cache_teacher_outputs", cache_teacher_outputs
        )
        if cache_teacher_outputs:
            x = self.cache_teacher_outputs(x, batch_size=max(batch_size or 32, 256))
        schedules = self._helpers.schedules
        if schedules:
            callbacks = list(callbacks or [])
            if any(isinstance(c, DistillationScheduler) for c in callbacks):
                warnings.warn(
                    "Both compiled schedules and a DistillationScheduler "
                    "callback were given; the callback runs after the compiled "
                    "schedules and wins.",
                    stacklevel=2,
                )
            callbacks.insert(0, DistillationScheduler(**schedules))
        return super().fit(
            x, y, batch_size, epochs, verbose, callbacks, *args, **kwargs
        )

    # --------------------------------------------------------- serialization
    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "student": keras.saving.serialize_keras_object(self.student),
                "teacher": keras.saving.serialize_keras_object(self.teacher),
                "feature_distillation": [
                    keras.saving.serialize_keras_object(term)
                    for term in self._helpers.terms
                ]
                or None,
            }
        )
        return config

    @classmethod
    def from_config(cls, config):
        # Deserializing a functional model consumes its nested config dict.
        config = copy.deepcopy(config)
        for key in ("student", "teacher"):
            config[key] = keras.saving.deserialize_keras_object(config[key])
        if config.get("feature_distillation"):
            config["feature_distillation"] = [
                keras.saving.deserialize_keras_object(term)
                for term in config["feature_distillation"]
            ]
        return cls(**config)
