"""Fine-tuning a pretrained char LM without forgetting: which recipe keeps what it knew.

The character LM (`keras_stability.models.build_char_transformer`, pre-norm
with QK-norm and LayerScale) is pretrained on standard-library docstrings
(English prose) with the stabilized recipe (`GuardedOptimizer(Adam, ZClip())`
and a `GradientExplosionDetector`), once per seed, and its weights are cached
in a temporary directory for the run. Then it is fine-tuned on Python source
code (`keras_stability.datasets.load_fine_tuning_corpora`, one shared
character vocabulary) with each recipe at the same step budget, batches and
batch order, each with the guard and the detector on at a fine-tuning
learning rate. Per recipe: held-out perplexity on the new corpus (code), on
the old one (docstrings) and its rise over the pretrained model (the
forgetting), trainable parameters, time per step.

The issue's goal (#18): a recipe within 2% of full fine-tuning's new-corpus
perplexity with an old-corpus rise of at most 5%.

Usage: python -m benchmarks.fine_tuning [--seeds 3] [--explore] [--quick]

`--explore` adds the variants tried in search of the goal (`EXPLORE`):
L2SP at alpha=1, LoRA rank 16 at a higher rate, full fine-tuning with
25% of every batch replayed from the pretraining corpus, and LoRA at <= 5%
of the parameters. `--only LABEL ...` keeps the rows with those labels
(recipes or variants).
"""

import argparse
import math
import os
import sys
import tempfile
import time

import numpy as np

from benchmarks.common import environment

FIGURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "figures")

# Recipe name -> one-line description (the table's second column).
RECIPES = {
    "full": "full fine-tuning (all weights), Adam 1e-3",
    "head": "frozen backbone, head (final norm + logits) trained, Adam 1e-3",
    "top_block": "frozen but the last block and the head, Adam 1e-3",
    "l2sp": "full + `L2SP(alpha)` toward the pretrained weights, Adam 1e-3",
    "gradual": "`GradualUnfreezing(1)`: head, then one block per epoch "
    "from the top, Adam 1e-3",
    "ulmfit": "`GradualUnfreezing(1, discriminative_factor=2.6)`: as `gradual`, "
    "block_1 at 1e-3/2.6, block_0 at 1e-3/2.6^2, embedding at 1e-3/2.6^3 "
    "(ULMFiT's discriminative rates), Adam 1e-3",
    "lora": "LoRA rank 8 on query/value/FFN (Keras `enable_lora`), Adam 3e-3",
    "wd_schedule": "AdamW 1e-3, `WeightDecayScheduler` cosine 0.1 -> 0",
}


# Variants tried in search of the goal (`--explore`): label, recipe,
# options. `replay` mixes that share of pretraining windows into every
# fine-tuning batch (rehearsal: `keras_stability.datasets.mix_replay`).
EXPLORE = [
    ("l2sp alpha=1", "l2sp", {"alpha": 1.0}),
    ("lora r16 lr=1e-2", "lora", {"rank": 16, "lr": 1e-2}),
    ("full + 25% replay", "full", {"replay": 0.25}),
    ("ulmfit lr=3e-3", "ulmfit", {"lr": 3e-3}),
    # LoRA at <= 5% of the parameters (the budget): rank 2 on
    # query/value/FFN (3.8%), rank 4 on query/value only (3.5%).
    ("lora r2", "lora", {"rank": 2}),
    ("lora r2 lr=1e-2", "lora", {"rank": 2, "lr": 1e-2}),
    (
        "lora r4 q,v lr=1e-2",
        "lora",
        {"rank": 4, "lr": 1e-2, "targets": ("query", "value")},
    ),
]


class _StepTimer:
    """Wall time of every train batch after the first `skip` of a fit."""

    def __new__(cls, skip=5):
        import keras

        class Timer(keras.callbacks.Callback):
            def on_train_begin(self, logs=None):
                self.times, self._seen = [], 0

            def on_train_batch_begin(self, batch, logs=None):
                self._start = time.perf_counter()

            def on_train_batch_end(self, batch, logs=None):
                self._seen += 1
                if self._seen > skip:
                    self.times.append(time.perf_counter() - self._start)

        return Timer()


def perplexity(model, x, y, batch_size=128):
    """Held-out perplexity from the logits alone (no regularization terms)."""
    total, count = 0.0, 0
    for start in range(0, len(x), batch_size):
        logits = np.asarray(
            model(x[start : start + batch_size], training=False), dtype="float64"
        )
        logits -= logits.max(axis=-1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
        target = y[start : start + batch_size]
        total -= np.take_along_axis(logp, target[..., None], axis=-1).sum()
        count += target.size
    return float(math.exp(total / count))


def _dataset(data, steps, batch_size, seed):
    import tensorflow as tf

    rng = np.random.default_rng(seed)
    n = len(data["x_train"])
    idx = np.concatenate(
        [rng.permutation(n) for _ in range(-(-steps * batch_size // n))]
    )[: steps * batch_size]
    return (
        tf.data.Dataset.from_tensor_slices((data["x_train"][idx], data["y_train"][idx]))
        .batch(batch_size)
        .repeat()
    )


def _guarded(inner):
    from keras_stability.clipping import ZClip
    from keras_stability.optimizers import GuardedOptimizer

    return GuardedOptimizer(inner, clipping=ZClip())


def _detector():
    from keras_stability.callbacks import GradientExplosionDetector

    return GradientExplosionDetector(action="rollback", snapshot_freq=20, verbose=0)


def build(config, seed):
    import keras

    from keras_stability.models import build_char_transformer

    keras.utils.set_random_seed(seed)
    return build_char_transformer(
        config["vocab_size"],
        config["seq_len"],
        num_blocks=config["blocks"],
        hidden_dim=config["hidden"],
        num_heads=config["heads"],
        norm="pre",
        qk_norm=True,
        layerscale_init=1e-2,
        name="char_lm",
    )


def pretrain(corpora, config, seed, path):
    """Pretrains on the docstrings with the stabilized recipe; saves the weights."""
    import keras

    model = build(config, seed)
    model.compile(
        optimizer=_guarded(keras.optimizers.Adam(config["pretrain_lr"])),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    steps = config["pretrain_steps"]
    model.fit(
        _dataset(corpora["pretrain"], steps, config["batch"], seed),
        epochs=1,
        steps_per_epoch=steps,
        callbacks=[_detector()],
        verbose=0,
    )
    model.save_weights(path)
    return model


def fine_tune(recipe, corpora, config, seed, weights, options=None):
    """Fine-tunes the pretrained weights with one recipe; returns its numbers."""
    import keras

    from keras_stability.callbacks import GradualUnfreezing
    from keras_stability.callbacks import WeightDecayScheduler
    from keras_stability.regularizers import L2SP

    options = dict(options or {})
    model = build(config, seed)
    model.load_weights(weights)
    lr = options.get("lr", config["finetune_lr"])
    detector = _detector()
    callbacks = [detector]
    blocks = [f"block_{i}" for i in range(config["blocks"])]
    head = ("final_norm", "logits")
    inner = keras.optimizers.Adam(lr)
    if recipe == "ulmfit":
        recipe, options["factor"] = "gradual", options.get("factor", 2.6)
    if recipe in ("head", "top_block", "gradual"):
        keep = set(head) | ({blocks[-1]} if recipe == "top_block" else set())
        for layer in model.layers:
            layer.trainable = layer.name in keep
        if recipe == "gradual":
            names = ["embedding", *blocks]
            callbacks.append(
                GradualUnfreezing(
                    1,
                    layers=[model.get_layer(n) for n in names],
                    discriminative_factor=options.get("factor", 1.0),
                )
            )
    elif recipe == "l2sp":
        L2SP(alpha=options.get("alpha", 1e-2), beta=0.0).attach(
            model, include_biases=True
        )
    elif recipe == "lora":
        targets = options.get("targets", ("query", "value", "mlp_in", "mlp_out"))
        for layer in model._flatten_layers():
            if layer.name in targets and layer.path.startswith("block_"):
                layer.enable_lora(options.get("rank", 8))
        for variable in model.weights:
            variable.trainable = "lora_" in variable.name
        inner = keras.optimizers.Adam(options.get("lr", config["lora_lr"]))
    elif recipe == "wd_schedule":
        start = options.get("weight_decay", 0.1)
        inner = keras.optimizers.AdamW(lr, weight_decay=start)
        epochs = config["epochs"]
        callbacks.append(
            WeightDecayScheduler(
                lambda epoch, wd: start * 0.5 * (1 + math.cos(math.pi * epoch / epochs))
            )
        )
    elif recipe != "full":
        raise ValueError(f"unknown recipe {recipe!r}")
    model.compile(
        optimizer=_guarded(inner),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    timer = _StepTimer()
    steps = config["finetune_steps"]
    if options.get("replay"):
        from keras_stability.datasets import mix_replay

        new, old = corpora["finetune"], corpora["pretrain"]
        data = mix_replay(
            (new["x_train"], new["y_train"]),
            (old["x_train"], old["y_train"]),
            steps,
            replay_fraction=options["replay"],
            batch_size=config["batch"],
            seed=seed + 1000,
        )
    else:
        data = _dataset(corpora["finetune"], steps, config["batch"], seed + 1000)
    model.fit(
        data,
        epochs=config["epochs"],
        steps_per_epoch=steps // config["epochs"],
        callbacks=[*callbacks, timer],
        verbose=0,
    )
    trainable = sum(int(np.prod(v.shape)) for v in model.trainable_weights)
    total = sum(int(np.prod(v.shape)) for v in model.weights if "lora_" not in v.name)
    return {
        "new_ppl": perplexity(model, *config["new_test"]),
        "old_ppl": perplexity(model, *config["old_test"]),
        "trainable": trainable,
        "total": total,
        "step_ms": 1e3 * float(np.median(timer.times)),
        "events": len(detector.events) if detector in callbacks else None,
        "model": model,
    }


def _stat(values):
    return float(np.mean(values)), float(np.min(values)), float(np.max(values))


def _cell(values, digits=2, unit=""):
    mean, low, high = _stat(values)
    return f"{mean:.{digits}f}{unit} ({low:.{digits}f}..{high:.{digits}f})"


def run(
    seeds,
    quick=False,
    recipes=None,
    extra=None,
    figure=True,
    out=sys.stdout,
    explore=False,
    partial=None,
    only=None,
):
    """Runs the benchmark; returns `{label: [per-seed result dict]}`."""
    import keras

    from keras_stability.datasets import load_fine_tuning_corpora

    seq_len = 32 if quick else 64
    corpora = load_fine_tuning_corpora(
        seq_len=seq_len, max_chars=20_000 if quick else None
    )
    n_eval = 64 if quick else 512
    config = {
        "vocab_size": len(corpora["vocab"]),
        "seq_len": seq_len,
        "blocks": 2,
        "hidden": 32 if quick else 64,
        "heads": 4,
        "batch": 16 if quick else 32,
        "pretrain_steps": 40 if quick else 800,
        "pretrain_lr": 3e-3,
        "finetune_steps": 20 if quick else 300,
        "finetune_lr": 1e-3,
        "lora_lr": 3e-3,
        "epochs": 4,
        "old_test": (
            corpora["pretrain"]["x_test"][:n_eval],
            corpora["pretrain"]["y_test"][:n_eval],
        ),
        "new_test": (
            corpora["finetune"]["x_test"][:n_eval],
            corpora["finetune"]["y_test"][:n_eval],
        ),
    }
    runs = [(name, name, None) for name in (recipes or RECIPES)]
    runs += list(extra or [])
    if only:
        unknown = set(only) - {label for label, _, _ in runs}
        if unknown:
            raise ValueError(f"unknown labels {sorted(unknown)}")
        runs = [run for run in runs if run[0] in only]
    results = {label: [] for label, _, _ in runs}
    pretrained = {"old_ppl": [], "new_ppl": [], "total": 0}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(seeds):
            path = os.path.join(tmp, f"pretrained_{seed}.weights.h5")
            model = pretrain(corpora, config, seed, path)
            pretrained["old_ppl"].append(perplexity(model, *config["old_test"]))
            pretrained["new_ppl"].append(perplexity(model, *config["new_test"]))
            pretrained["total"] = model.count_params()
            for label, recipe, options in runs:
                result = fine_tune(recipe, corpora, config, seed, path, options)
                result["old_rise"] = 100 * (
                    result["old_ppl"] / pretrained["old_ppl"][-1] - 1
                )
                result.pop("model")
                results[label].append(result)
                print(
                    f"seed {seed} {label}: new {result['new_ppl']:.3f} old "
                    f"{result['old_ppl']:.3f} ({result['old_rise']:+.1f}%) "
                    f"[{time.perf_counter() - start:.0f}s]",
                    file=sys.stderr,
                    flush=True,
                )
                keras.backend.clear_session()
            if partial:
                with open(partial, "w") as f:
                    _report(
                        results,
                        pretrained,
                        config,
                        seed + 1,
                        quick,
                        time.perf_counter() - start,
                        f,
                        explore,
                        only,
                        recipes,
                    )
    elapsed = time.perf_counter() - start
    _report(
        results, pretrained, config, seeds, quick, elapsed, out, explore, only, recipes
    )
    if figure and not quick:
        _figure(results, pretrained)
    return results, pretrained


def _events(runs):
    if any(r["events"] is None for r in runs):
        return "(no detector)"
    return str(sum(r["events"] for r in runs))


def _report(
    results,
    pretrained,
    config,
    seeds,
    quick,
    elapsed,
    out,
    explore,
    only=None,
    recipes=None,
):
    full_new = float(np.mean([r["new_ppl"] for r in results.get("full", [])] or [0]))
    print("## Fine-tuning without forgetting: docstrings -> code (char LM)", file=out)
    print(file=out)
    print(
        f"Char LM ({config['blocks']} pre-norm blocks, width {config['hidden']}, "
        f"QK-norm, LayerScale; {pretrained['total']:,} parameters, "
        f"{config['vocab_size']} characters, windows of {config['seq_len']}) "
        f"pretrained {config['pretrain_steps']} steps on standard-library "
        f"docstrings, then fine-tuned {config['finetune_steps']} steps "
        f"(batch {config['batch']}, {config['epochs']} epochs) on "
        "standard-library code with each recipe, every one with "
        "`GuardedOptimizer(ZClip())` and `GradientExplosionDetector(rollback)`. "
        f"Held-out perplexity on {len(config['new_test'][0])} windows of each "
        f"corpus; mean (min..max) over {seeds} seed(s). Pretrained model: "
        f"docstrings {_cell(pretrained['old_ppl'])}, code "
        f'{_cell(pretrained["new_ppl"])}. "vs full" is the recipe\'s mean '
        "code perplexity over full fine-tuning's.",
        file=out,
    )
    print(file=out)
    print(
        "| recipe | code ppl (new) | vs full | docstrings ppl (old) | old rise "
        "| trainable params | ms/step | detector events |",
        file=out,
    )
    print("|---|---|---|---|---|---|---|---|", file=out)
    for label, runs in results.items():
        new = [r["new_ppl"] for r in runs]
        ratio = 100 * (np.mean(new) / full_new - 1) if full_new else float("nan")
        trainable = runs[0]["trainable"]
        print(
            f"| {label} | {_cell(new)} | {ratio:+.1f}% "
            f"| {_cell([r['old_ppl'] for r in runs])} "
            f"| {_cell([r['old_rise'] for r in runs], 1, '%')} "
            f"| {trainable:,} ({100 * trainable / runs[0]['total']:.1f}%) "
            f"| {_cell([r['step_ms'] for r in runs], 1)} "
            f"| {_events(runs)} |",
            file=out,
        )
    print(file=out)
    met = [
        label
        for label, runs in results.items()
        if label != "full"
        and full_new
        and np.mean([r["new_ppl"] for r in runs]) <= 1.02 * full_new
        and np.mean([r["old_rise"] for r in runs]) <= 5.0
    ]
    print(
        "Goal (within 2% of full fine-tuning's code perplexity and old rise "
        f"<= 5%, on the means): {'met by ' + ', '.join(met) if met else 'not met'}.",
        file=out,
    )
    print(file=out)
    for label, desc in RECIPES.items():
        if label in results:
            print(f"- `{label}`: {desc}", file=out)
    print(file=out)
    print(f"Total time {elapsed / 60:.1f} min. {environment()}.", file=out)
    print(file=out)
    print(
        "Command: `nice -n 10 python -m benchmarks.fine_tuning --seeds "
        f"{seeds}{' --quick' if quick else ''}{' --explore' if explore else ''}"
        + ("" if not recipes else " --recipes " + " ".join(recipes))
        + ("" if not only else " --only " + " ".join(f"'{o}'" for o in only))
        + "`",
        file=out,
    )
    if not quick:
        print(file=out)
        print(
            "Figure: `benchmarks/figures/fine_tuning_forgetting.png` "
            "(old-corpus perplexity rise against new-corpus perplexity).",
            file=out,
        )


def _figure(results, pretrained):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5, 4.5))
    ax = fig.add_subplot()
    for label, runs in results.items():
        new = np.array([r["new_ppl"] for r in runs])
        rise = np.array([r["old_rise"] for r in runs])
        ax.errorbar(
            new.mean(),
            rise.mean(),
            xerr=[[new.mean() - new.min()], [new.max() - new.mean()]],
            yerr=[[rise.mean() - rise.min()], [rise.max() - rise.mean()]],
            fmt="o",
            capsize=3,
            label=label,
        )
    ax.axhline(5.0, color="grey", linestyle=":", label="5% rise (goal)")
    if "full" in results:
        full = np.mean([r["new_ppl"] for r in results["full"]])
        ax.axvline(1.02 * full, color="grey", linestyle="--", label="full FT + 2%")
    ax.set_xlabel("code (new corpus) held-out perplexity")
    ax.set_ylabel("docstrings (old corpus) perplexity rise, %")
    ax.set_title("Fine-tuning the char LM: learning vs forgetting")
    ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(FIGURES, exist_ok=True)
    fig.savefig(os.path.join(FIGURES, "fine_tuning_forgetting.png"), dpi=120)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="a tiny smoke run")
    parser.add_argument(
        "--recipes", nargs="*", default=None, help=f"subset of {list(RECIPES)}"
    )
    parser.add_argument(
        "--explore", action="store_true", help="add the EXPLORE variants"
    )
    parser.add_argument(
        "--partial", default=None, help="file rewritten with the table after each seed"
    )
    parser.add_argument(
        "--only", nargs="*", default=None, help="keep only these row labels"
    )
    args = parser.parse_args(argv)
    run(
        args.seeds,
        quick=args.quick,
        recipes=args.recipes,
        extra=EXPLORE if args.explore else None,
        explore=args.explore,
        partial=args.partial,
        only=args.only,
    )


if __name__ == "__main__":
    main()
