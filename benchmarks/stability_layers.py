"""Fine-tuning with L2 / L2-SP / gradual unfreezing, and a depth sweep with `Residual`.

Run: `python -m benchmarks.stability_layers` (about two minutes on 2 CPU cores).

1. Fine-tuning on scikit-learn digits: an MLP backbone + head is pretrained on
   digits 0-4, then a new head is fine-tuned with the backbone on 20 samples
   per class of digits 5-9. Reported: test accuracy on 5-9 (new head) and on
   0-4 (old head on the fine-tuned backbone: how much was forgotten), mean
   over seeds, for no regularization, L2, L2-SP and gradual unfreezing.
2. Depth sweep on the generated 10-class problem: a plain ReLU MLP against the
   same with each layer wrapped in `Residual` (pre-norm, and ReZero), final
   training loss by depth.
"""

import argparse
import time

import numpy as np

from benchmarks.common import environment

FT_METHODS = ("none", "l2", "l2sp", "gradual_unfreezing")


def _split_digits(seed, per_class):
    from keras_stability.datasets import load_digits
    from keras_stability.datasets import train_test_split

    x, y = load_digits()
    (x_tr, y_tr), (x_te, y_te) = train_test_split(x, y, test_fraction=0.3, seed=seed)
    low_tr, low_te = y_tr < 5, y_te < 5
    rng = np.random.default_rng(seed)
    few = np.concatenate(
        [
            rng.choice(np.flatnonzero(y_tr == c), per_class, replace=False)
            for c in range(5, 10)
        ]
    )
    return {
        "pre": (x_tr[low_tr], y_tr[low_tr]),
        "ft": (x_tr[few], y_tr[few] - 5),
        "test_low": (x_te[low_te], y_te[low_te]),
        "test_high": (x_te[~low_te], y_te[~low_te] - 5),
    }


def _pretrain(data, seed, epochs):
    import keras

    keras.utils.set_random_seed(seed)
    backbone = keras.Sequential(
        [
            keras.Input((64,)),
            keras.layers.Dense(64, activation="relu", name="b0"),
            keras.layers.Dense(64, activation="relu", name="b1"),
        ],
        name="backbone",
    )
    old_head = keras.layers.Dense(5, name="old_head")
    model = keras.Sequential([backbone, old_head])
    model.compile(
        keras.optimizers.Adam(1e-3),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    model.fit(*data["pre"], epochs=epochs, batch_size=32, verbose=0)
    return backbone.get_weights(), old_head.get_weights()


def _accuracy(model, x, y):
    return float(np.mean(np.argmax(model.predict(x, verbose=0), -1) == y))


def _fine_tune(method, data, pretrained, seed, epochs, strength):
    import keras

    from keras_stability.callbacks import GradualUnfreezing
    from keras_stability.regularizers import L2SP

    keras.utils.set_random_seed(seed + 1000)
    backbone = keras.Sequential(
        [
            keras.Input((64,)),
            keras.layers.Dense(64, activation="relu", name="b0"),
            keras.layers.Dense(64, activation="relu", name="b1"),
        ],
        name="backbone",
    )
    backbone.set_weights(pretrained[0])
    old_head = keras.layers.Dense(5, name="old_head")
    old_model = keras.Sequential([backbone, old_head])
    old_head.set_weights(pretrained[1])
    new_head = keras.layers.Dense(5, name="new_head")
    model = keras.Sequential([backbone, new_head])
    model.build((None, 64))
    callbacks = []
    if method == "l2":
        for layer in [*backbone.layers, new_head]:
            layer.kernel.regularizer = keras.regularizers.L2(strength)
    elif method == "l2sp":
        L2SP(alpha=strength, beta=strength).attach(model, backbone=backbone)
    elif method == "gradual_unfreezing":
        for layer in backbone.layers:
            layer.trainable = False
        callbacks.append(GradualUnfreezing(epochs // 3, layers=backbone.layers))
    model.compile(
        keras.optimizers.Adam(1e-3),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    model.fit(*data["ft"], epochs=epochs, batch_size=16, verbose=0, callbacks=callbacks)
    return _accuracy(model, *data["test_high"]), _accuracy(old_model, *data["test_low"])


def fine_tuning(seeds, per_class, pre_epochs, ft_epochs, strength):
    results = {m: [] for m in FT_METHODS}
    pretrained_low = []
    for seed in seeds:
        data = _split_digits(seed, per_class)
        pretrained = _pretrain(data, seed, pre_epochs)
        for method in FT_METHODS:
            results[method].append(
                _fine_tune(method, data, pretrained, seed, ft_epochs, strength)
            )
        import keras

        keras.utils.set_random_seed(seed)
        probe = keras.Sequential(
            [
                keras.Input((64,)),
                keras.layers.Dense(64, activation="relu"),
                keras.layers.Dense(64, activation="relu"),
                keras.layers.Dense(5),
            ]
        )
        probe.set_weights(pretrained[0] + pretrained[1])
        pretrained_low.append(_accuracy(probe, *data["test_low"]))
    return results, pretrained_low


def _deep_model(kind, depth, width):
    import keras

    from keras_stability.layers import Residual

    inputs = keras.Input((10,))
    h = keras.layers.Dense(width)(inputs)
    for _ in range(depth):
        if kind == "plain":
            h = keras.layers.Dense(width, activation="relu")(h)
        elif kind == "residual_prenorm":
            h = Residual(keras.layers.Dense(width, activation="relu"), norm="pre")(h)
        else:
            h = Residual(
                keras.layers.Dense(width, activation="relu"), norm=None, scale="rezero"
            )(h)
    return keras.Model(inputs, keras.layers.Dense(10)(h))


def depth_sweep(depths, seeds, epochs, width):
    import keras

    from keras_stability.datasets import make_classification

    x, y = make_classification(n_samples=1000, seed=0)
    kinds = ("plain", "residual_prenorm", "residual_rezero")
    results = {(k, d): [] for k in kinds for d in depths}
    for seed in seeds:
        for depth in depths:
            for kind in kinds:
                keras.utils.set_random_seed(seed)
                model = _deep_model(kind, depth, width)
                model.compile(
                    keras.optimizers.SGD(0.05, momentum=0.9),
                    keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                )
                history = model.fit(x, y, epochs=epochs, batch_size=64, verbose=0)
                results[(kind, depth)].append(history.history["loss"][-1])
    return kinds, results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--per-class", type=int, default=20)
    parser.add_argument("--strength", type=float, default=1e-2)
    parser.add_argument("--depths", default="2,8,32")
    args = parser.parse_args(argv)

    import keras_stability  # noqa: F401  (quiet start-up, registrations)

    start = time.perf_counter()
    seeds = list(range(args.seeds))
    ft, pretrained_low = fine_tuning(seeds, args.per_class, 30, 30, args.strength)
    depths = [int(d) for d in args.depths.split(",")]
    kinds, sweep = depth_sweep(depths, seeds[:2], 6, 32)
    elapsed = time.perf_counter() - start

    lines = [
        "## Stability layers: fine-tuning regularizers and residual depth sweep",
        "",
    ]
    lines.append(f"Machine: {environment()}.")
    lines.append("")
    lines.append(
        f"Fine-tuning on scikit-learn digits: MLP 64-64 pretrained on digits 0-4 (30 "
        f"epochs), new head fine-tuned with the backbone on {args.per_class} samples per "
        f"class of 5-9 (30 epochs, Adam 1e-3); strength {args.strength:g} for L2 and "
        "L2-SP (alpha = beta); gradual unfreezing: one backbone layer every 10 epochs, "
        f"top first. Test accuracy, mean (min..max) over {len(seeds)} seeds. The old "
        "head on the pretrained backbone scores "
        f"{np.mean(pretrained_low):.3f} on 0-4 before fine-tuning."
    )
    lines.append("")
    lines.append(
        "| method | accuracy 5-9 (new task) | accuracy 0-4 (old head, forgetting) |"
    )
    lines.append("|---|---|---|")
    for method in FT_METHODS:
        new = np.array([r[0] for r in ft[method]])
        old = np.array([r[1] for r in ft[method]])
        lines.append(
            f"| {method} | {new.mean():.3f} ({new.min():.3f}..{new.max():.3f}) | "
            f"{old.mean():.3f} ({old.min():.3f}..{old.max():.3f}) |"
        )
    lines.append("")
    lines.append(
        "Depth sweep: generated 10-class data (1000 samples), width 32, SGD 0.05 "
        "momentum 0.9, 6 epochs; final training loss, mean over "
        f"{len(seeds[:2])} seeds (nan = diverged)."
    )
    lines.append("")
    lines.append("| depth | " + " | ".join(kinds) + " |")
    lines.append("|---|" + "---|" * len(kinds))
    for depth in depths:
        cells = [f"{np.mean(sweep[(k, depth)]):.3f}" for k in kinds]
        lines.append(f"| {depth} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"Command: `python -m benchmarks.stability_layers` ({elapsed:.0f} s).")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
