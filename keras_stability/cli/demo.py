"""`python -m keras_stability demo`: the plain Keras example, fixed.

The example users know trains a `Sequential` of Dense(128, relu),
Dense(64, relu), Dense(10) with `SparseCategoricalCrossentropy` and
Adam(1e-3), then calls `loss, accuracy = model.evaluate(...)`. As usually
written it has two defects, fixed in `keras_stability.models.example`:

1. the last layer outputs logits, so the loss needs `from_logits=True`;
2. `evaluate` returns accuracy only if `metrics=["accuracy"]` is compiled.

The demo is a list of parts (`PARTS`); each later capability adds a part that
shows itself on this example. A part is `fn(context) -> dict` of results.
"""

import sys
import time

from keras_stability._startup import program_name
from keras_stability.cli.arguments import positive_int
from keras_stability.datasets import DATASETS

EXIT_USAGE = 2


class DemoContext:
    """What every demo part gets: the parsed arguments, the data and a printer."""

    def __init__(self, args, train, test):
        self.args = args
        self.x_train, self.y_train = train
        self.x_test, self.y_test = test
        self.verbose = 0 if args.quiet else "auto"
        self.n_features = self.x_train.shape[1]
        self.n_classes = int(max(self.y_train.max(), self.y_test.max())) + 1

    def say(self, message=""):
        print(message, flush=True)


def part_example(ctx):
    """The Keras example, fixed."""
    import keras

    from keras_stability.models import build_example_model
    from keras_stability.models import compile_example_model

    keras.utils.set_random_seed(ctx.args.seed)
    model = compile_example_model(build_example_model(ctx.n_features, ctx.n_classes))
    model.fit(ctx.x_train, ctx.y_train, epochs=ctx.args.epochs, verbose=ctx.verbose)
    loss, accuracy = model.evaluate(ctx.x_test, ctx.y_test, verbose=0)
    ctx.say(f"Test loss: {loss:.4f}  Test accuracy: {accuracy:.4f}")
    return {"loss": float(loss), "accuracy": float(accuracy)}


def part_distillation(ctx):
    """Distils the example model into a student with a 48-unit hidden layer."""
    import keras

    from keras_stability import Distiller
    from keras_stability.models import build_example_model
    from keras_stability.models import compile_example_model

    keras.utils.set_random_seed(ctx.args.seed)
    teacher = compile_example_model(build_example_model(ctx.n_features, ctx.n_classes))
    teacher.fit(ctx.x_train, ctx.y_train, epochs=ctx.args.epochs, verbose=0)
    student = keras.Sequential(
        [
            keras.Input(shape=(ctx.n_features,)),
            keras.layers.Dense(48, activation="relu"),
            keras.layers.Dense(ctx.n_classes),
        ],
        name="student",
    )
    distiller = Distiller(student=student, teacher=teacher)
    distiller.compile(
        optimizer=keras.optimizers.Adam(3e-3),
        metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
        student_loss_fn=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        distillation_loss_fn=keras.losses.KLDivergence(),
        alpha=0.1,
        temperature=4,
    )
    distiller.fit(
        ctx.x_train,
        ctx.y_train,
        epochs=ctx.args.epochs,
        verbose=ctx.verbose,
        cache_teacher_outputs=True,
    )
    logs = distiller.evaluate(ctx.x_test, ctx.y_test, verbose=0, return_dict=True)
    _, teacher_accuracy = teacher.evaluate(ctx.x_test, ctx.y_test, verbose=0)
    ctx.say(
        f"Teacher ({teacher.count_params()} weights) test accuracy: "
        f"{teacher_accuracy:.4f}; distilled student ({student.count_params()} "
        f"weights): {logs['accuracy']:.4f}, top-1 agreement with the teacher "
        f"{logs['teacher_agreement']:.4f}"
    )
    return {
        "teacher_accuracy": float(teacher_accuracy),
        "student_accuracy": float(logs["accuracy"]),
        "teacher_agreement": float(logs["teacher_agreement"]),
    }


def part_stability_layers(ctx):
    """The example made deep with ReZero residual blocks and a z-loss on its logits."""
    import keras

    from keras_stability.layers import Residual
    from keras_stability.layers import ZLoss
    from keras_stability.models import compile_example_model

    keras.utils.set_random_seed(ctx.args.seed)
    inputs = keras.Input(shape=(ctx.n_features,))
    h = keras.layers.Dense(64, activation="relu")(inputs)
    for _ in range(8):
        h = Residual(keras.layers.Dense(64, activation="relu"), scale="rezero")(h)
    logits = ZLoss(1e-4)(keras.layers.Dense(ctx.n_classes)(h))
    model = compile_example_model(keras.Model(inputs, logits, name="deep_rezero"))
    model.fit(ctx.x_train, ctx.y_train, epochs=ctx.args.epochs, verbose=ctx.verbose)
    loss, accuracy = model.evaluate(ctx.x_test, ctx.y_test, verbose=0)
    ctx.say(
        f"10-layer MLP (8 ReZero residual blocks, z-loss 1e-4 on the logits): "
        f"test loss {loss:.4f}, test accuracy {accuracy:.4f}"
    )
    return {"loss": float(loss), "accuracy": float(accuracy)}


def part_pruning(ctx):
    """The example pruned to 80% with TF-MOT's PolynomialDecay, then stripped."""
    import keras

    from keras_stability import pruning
    from keras_stability.models import build_example_model
    from keras_stability.models import compile_example_model

    keras.utils.set_random_seed(ctx.args.seed)
    model = build_example_model(ctx.n_features, ctx.n_classes)
    steps = ctx.args.epochs * -(-len(ctx.x_train) // 32)
    schedule = pruning.PolynomialDecay(
        0.0, 0.8, begin_step=0, end_step=max(int(0.7 * steps), 1), frequency=10
    )
    pruning.prune_low_magnitude(model, schedule)
    compile_example_model(model)
    model.fit(ctx.x_train, ctx.y_train, epochs=ctx.args.epochs, verbose=ctx.verbose)
    model = pruning.strip_pruning(model)
    loss, accuracy = model.evaluate(ctx.x_test, ctx.y_test, verbose=0)
    sparsity = pruning.sparsity_report(model)["total"]
    ctx.say(f"Kernel sparsity: {sparsity:.1%}  Test accuracy: {accuracy:.4f}")
    return {"loss": float(loss), "accuracy": float(accuracy), "sparsity": sparsity}


def part_gradient_health(ctx):
    """Vanishing gradients diagnosed; a far too high learning rate rescued."""
    import warnings

    import keras
    import numpy as np

    from keras_stability.callbacks import GradientExplosionDetector
    from keras_stability.callbacks import GradientMonitor
    from keras_stability.models import build_example_model
    from keras_stability.models import compile_example_model

    x, y = ctx.x_train[:640], ctx.y_train[:640]  # 20 steps of 32
    keras.utils.set_random_seed(ctx.args.seed)
    deep = keras.Sequential(
        [keras.Input((ctx.n_features,))]
        + [keras.layers.Dense(64, activation="sigmoid") for _ in range(12)]
        + [keras.layers.Dense(ctx.n_classes)],
        name="deep_sigmoid",
    )
    compile_example_model(deep)
    monitor = GradientMonitor(verbose=0)
    deep.fit(x, y, epochs=1, verbose=0, callbacks=[monitor])
    vanishing = monitor.unhealthy_layers("vanishing")
    ctx.say(
        f"The example made deep (12 sigmoid layers): {len(vanishing)} of "
        f"{len(monitor.layer_names)} layers flagged vanishing "
        f"({', '.join(vanishing[:3])}{', ...' if len(vanishing) > 3 else ''})."
    )
    first = monitor.layer_names[0]
    ctx.say(
        f"  gradient norm of {first}: {monitor.history['grad_norm'][first][-1]:.2g}, "
        f"of the output layer: {monitor.history['grad_norm'][monitor.layer_names[-1]][-1]:.2g}"
    )
    ctx.say("  remedy: " + monitor.findings[0].remedy if vanishing else "")

    def too_fast(callbacks):
        keras.utils.set_random_seed(ctx.args.seed)
        model = build_example_model(ctx.n_features, ctx.n_classes)
        compile_example_model(model, keras.optimizers.SGD(learning_rate=20.0))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.fit(x, y, epochs=3, verbose=0, callbacks=callbacks)
        finite = all(np.all(np.isfinite(w)) for w in model.get_weights())
        loss, accuracy = model.evaluate(ctx.x_test, ctx.y_test, verbose=0)
        return finite, loss, accuracy, model

    finite, loss, accuracy, _ = too_fast([])
    ctx.say(
        f"SGD(learning_rate=20), plain fit: weights finite={finite}, test loss {loss:.4g}."
    )
    detector = GradientExplosionDetector()  # default arguments
    finite2, loss2, accuracy2, model = too_fast([detector])
    lr = float(np.asarray(model.optimizer.learning_rate))
    ctx.say(
        f"Same with GradientExplosionDetector: {detector.rollbacks} rollback(s), "
        f"{detector.skipped_nonfinite} NaN step(s) skipped, learning rate -> {lr:.3g}; "
        f"weights finite={finite2}, test loss {loss2:.4f}, accuracy {accuracy2:.4f}."
    )
    return {
        "vanishing_layers": vanishing,
        "plain_finite": finite,
        "rescued_finite": finite2,
        "rescued_loss": float(loss2),
        "rollbacks": detector.rollbacks,
    }


def part_clipping(ctx):
    """The example with ZClip and non-finite skipping added by a callback."""
    import keras
    import numpy as np

    from keras_stability.callbacks import AdaptiveClipping
    from keras_stability.clipping import ZClip
    from keras_stability.models import build_example_model
    from keras_stability.models import compile_example_model

    keras.utils.set_random_seed(ctx.args.seed)
    x_train = np.array(ctx.x_train, dtype="float32", copy=True)
    x_train[5] = np.nan  # one poisoned sample: its batch is skipped every epoch
    model = compile_example_model(build_example_model(ctx.n_features, ctx.n_classes))
    callback = AdaptiveClipping(ZClip(), verbose=1)
    history = model.fit(
        x_train,
        ctx.y_train,
        epochs=min(ctx.args.epochs, 3),
        verbose=ctx.verbose,
        callbacks=[callback],
    )
    loss, accuracy = model.evaluate(ctx.x_test, ctx.y_test, verbose=0)
    stats = callback.guard.statistics()
    ctx.say(
        f"Test loss: {loss:.4f}  Test accuracy: {accuracy:.4f}  "
        f"steps: {stats['step']}, clipped: {stats['steps_clipped']}, "
        f"skipped (non-finite): {stats['steps_skipped_nonfinite']}, "
        f"last grad norm {history.history['grad_norm'][-1]:.3f} "
        f"(threshold {history.history['clip_threshold'][-1]:.3f})"
    )
    return {"loss": float(loss), "accuracy": float(accuracy), **stats}


# name -> (function, title). Run in this order.
PARTS = {
    "example": (part_example, "The Keras example, fixed"),
    "clipping": (
        part_clipping,
        "Adaptive clipping and step skipping (AdaptiveClipping)",
    ),
    "gradient_health": (
        part_gradient_health,
        "Gradient health: vanishing diagnosed, explosion rescued",
    ),
    "stability_layers": (
        part_stability_layers,
        "Deep residual blocks (ReZero) and z-loss",
    ),
    "distillation": (part_distillation, "Distillation into a 10x smaller student"),
    "pruning": (part_pruning, "Pruned to 80% sparsity (keras_stability.pruning)"),
}


def add_arguments(parser):
    parser.add_argument(
        "--dataset",
        choices=DATASETS,
        default="synthetic",
        help="synthetic: generated, 10 features, 10 classes (default); "
        "digits: scikit-learn's bundled 8x8 digits, 64 features.",
    )
    parser.add_argument(
        "--epochs", type=positive_int, default=10, help="Epochs per fit (default 10)."
    )
    parser.add_argument("--seed", type=int, default=0, help="Random seed (default 0).")
    parser.add_argument(
        "--parts",
        type=_parts,
        default=list(PARTS),
        metavar="PART[,PART...]",
        help=f"Demo parts to run, in order (default all: {','.join(PARTS)}).",
    )
    parser.add_argument(
        "--quiet", action="store_true", help="Turn off Keras' progress bars."
    )


def run(args):
    from keras_stability.datasets import load_dataset

    start = time.perf_counter()
    missing = _missing_requirement(args.dataset)
    if missing:
        print(f"{program_name()} demo: error: {missing}", file=sys.stderr)
        return EXIT_USAGE
    train, test = load_dataset(args.dataset, seed=args.seed)
    ctx = DemoContext(args, train, test)
    ctx.say(
        f"Data: {args.dataset}, {len(ctx.x_train)} train / {len(ctx.x_test)} test "
        f"samples, {ctx.n_features} features, {ctx.n_classes} classes "
        f"(chance {1 / ctx.n_classes:.0%})."
    )
    for name in args.parts:
        fn, title = PARTS[name]
        ctx.say(f"\n== {title} ==")
        fn(ctx)
    ctx.say(f"\nDemo finished in {time.perf_counter() - start:.1f} s.")
    return 0


def _missing_requirement(dataset):
    """One line saying how to install what `dataset` needs, or `None`."""
    if dataset != "digits":
        return None
    try:
        import sklearn.datasets  # noqa: F401
    except ImportError as e:
        return (
            f"--dataset digits needs scikit-learn, which cannot be imported ({e}); "
            "install it with: pip install scikit-learn"
        )
    return None


def _parts(text):
    import argparse

    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in PARTS]
    if not names or unknown:
        raise argparse.ArgumentTypeError(
            f"unknown part(s) {', '.join(map(repr, unknown or [text]))}; "
            f"choose from {', '.join(PARTS)}"
        )
    return names
