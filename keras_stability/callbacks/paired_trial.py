"""A paired comparison before a rollback: the snapshot and the current weights on the same batches.

A rise of the loss is no proof that the weights broke: the loss of an
unshuffled time series rises as the data moves (keras.io's weather
forecaster), with the gradient, smoothly, as an explosion's does. Before
`GradientExplosionDetector` rolls back for a rise or a stall, it measures
both states on the same batches: `ShadowWeights` holds the snapshot's values
on the device, and while its flag is up the compiled step also computes the
loss of the batch at the snapshot's weights (a stateless forward pass, as
`train_step`'s: nothing of the model, its metrics or its optimizer changes)
before `train_step` trains on it as usual and records the current weights'
loss. Training goes on meanwhile, so when the data explains the rise no
batch is lost.

The step computes nothing more until the first comparison: the evaluation
is traced into the step then (one retrace), and stays there behind a `cond`
on the flag.
"""

import math
import weakref

import keras
import numpy as np
from keras import ops

from keras_stability import _keras_internals

__all__ = ["ShadowWeights", "can_compare", "paired_ratio"]


def can_compare(model):
    """Whether the step can compute the model's loss on its own.

    A compiled loss is needed (`model.compute_loss`): a custom `train_step`
    with its own loss (keras.io's VAE, a GAN) has none.
    """
    return getattr(model, "_compile_loss", None) is not None


class ShadowWeights:
    """Device copies of a snapshot's model weights and the step's comparison.

    Created in the model's strategy scope, one variable per weight of the
    model (as `model.weights` lists them), plus the flag the step reads.
    Not saved: state of a `fit`, loaded from a host `Snapshot` by `load`.
    """

    def __init__(self, model):
        # Weak: the detector keeps shadows in a dict keyed weakly by model.
        self._model = weakref.ref(model)
        self.variables = {}
        with model.distribute_strategy.scope():
            for i, v in enumerate(model.weights):
                self.variables[id(v)] = keras.Variable(
                    initializer=ops.zeros(v.shape, v.dtype),
                    dtype=v.dtype,
                    trainable=False,
                    name=f"shadow_{i}",
                )
            self.active = keras.Variable(
                initializer=0, dtype="int32", trainable=False, name="shadow_active"
            )
        self.failed = None  # why the step could not score the snapshot, if so

    def covers(self, model):
        return all(id(v) in self.variables for v in model.weights)

    @property
    def model(self):
        return self._model()

    def load(self, snapshot):
        """Copies a `Snapshot`'s model weights to the device and raises the flag."""
        for v, value in zip(self.model.weights, snapshot.weights, strict=True):
            self.variables[id(v)].assign(value)
        self.active.assign(1)

    def stop(self):
        if self.active is not None:
            self.active.assign(0)

    def release(self):
        """Drops the device copies (at the end of `fit`); `failed` is kept.

        The step must then be traced again without them (it no longer
        `covers` the model) for their memory to be freed.
        """
        self.variables = {}
        self.active = None

    def evaluate(self, data):
        """In the step, before `train_step`: `[current loss, snapshot loss]`.

        The batch's loss at the current and at the snapshot's weights, both
        computed here the same way, with `training=True` as the step's own
        loss (dropout on, batch statistics). Under a strategy of several
        replicas each scores its share, and the shares are summed in a merge
        call (Keras divides each replica's loss by their number): the global
        batch's loss, as on one replica, with no collective. Under a
        strategy without merge calls (the guard's loss there is each
        replica's too), this replica's share. Both NaN while the flag is
        down (a `cond`: nothing else runs).
        """
        model = self.model
        nan = ops.convert_to_tensor(np.full((2,), np.nan, np.float32))
        trainable = list(model.trainable_variables)
        non_trainable = list(model.non_trainable_variables)
        if not self.covers(model):
            return nan  # weights added since: no comparison (the host falls back)
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)

        def at_snapshot(v):
            # A variable that is no weight (a `SeedGenerator`'s state, as in
            # `LSTM` and `Dropout`) is not in a snapshot: its current value.
            return self.variables.get(id(v), v).value

        def loss_at(t_values, nt_values):
            y_pred, _ = model.stateless_call(t_values, nt_values, x, training=True)
            metrics = [v.value for v in model.metrics_variables]
            loss, _ = model.stateless_compute_loss(
                t_values,
                nt_values,
                metrics,
                x=x,
                y=y,
                y_pred=y_pred,
                sample_weight=sample_weight,
                training=True,
            )
            return ops.cast(ops.mean(loss), "float32")

        def compare():
            current = loss_at(
                [v.value for v in trainable], [v.value for v in non_trainable]
            )
            snapshot = loss_at(
                [at_snapshot(v) for v in trainable],
                [at_snapshot(v) for v in non_trainable],
            )
            return ops.stack([current, snapshot])

        active = ops.greater(_keras_internals.read(self.active), 0)
        try:
            loss = ops.cond(active, compare, lambda: nan)
        except Exception as error:  # noqa: BLE001 - a model the step cannot score
            # Traced in the middle of a user's `fit`: a model whose loss
            # cannot be computed apart from its `train_step` gets no
            # comparison (the detector then rolls back at once), not an error.
            self.failed = f"{type(error).__name__}: {error}"
            return nan
        return _over_replicas(loss)


def _over_replicas(value):
    """`value` (a replica's share of a loss) summed over the replicas."""
    if keras.backend.backend() != "tensorflow":
        return value
    import tensorflow as tf

    replicas = tf.distribute.get_strategy().num_replicas_in_sync
    context = tf.distribute.get_replica_context()
    if replicas == 1 or context is None:
        return value
    if tf.__internal__.distribute.strategy_supports_no_merge_call():
        return value * float(replicas)  # this replica's share, unscaled

    def total(distribution, value):
        parts = distribution.experimental_local_results(value)
        # The local replicas' shares: with one worker, all of them.
        return ops.sum(ops.stack(list(parts)), axis=0) * (replicas / len(parts))

    return context.merge_call(total, args=(value,))


def paired_ratio(pairs):
    """The median over batches of snapshot loss / current loss.

    `pairs`: `(current, snapshot)` losses of the same batches. A batch the
    current weights score non-finite counts for the snapshot (ratio 0), one
    the snapshot scores non-finite for the current weights (inf). `None`
    without a usable pair.
    """
    ratios = []
    for current, snapshot in pairs:
        if math.isnan(current) and math.isnan(snapshot):
            continue
        if not math.isfinite(current):
            ratios.append(0.0)
        elif not math.isfinite(snapshot):
            ratios.append(math.inf)
        elif current <= 0:
            ratios.append(1.0 if snapshot <= 0 else math.inf)
        else:
            ratios.append(snapshot / current)
    if not ratios:
        return None
    return float(np.median(ratios))
