"""Multi-worker throughput on loopback: 2 workers against 1, with and without callbacks.

Each configuration trains the Keras example (global batch 64) and the small
character transformer (global batch 32) for a fixed number of steps under
`MultiWorkerMirroredStrategy` (`keras_stability.distribute.get_strategy`),
with worker processes on this machine talking over loopback gRPC. Throughput
is global samples per second over the timed steps (after one warm-up epoch),
measured on the chief. "with callbacks" adds `AdaptiveClipping(ZClip())`,
`GradientMonitor(check_freq=10)` and `GradientExplosionDetector()`.

Both workers share the same 2 cores here, so this measures the cost of the
collectives and of our callbacks under multi-worker training, not a speed-up.

Usage: python -m benchmarks.multi_worker [--steps 40] [--repeats 3]
"""

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np

from benchmarks.common import environment
from benchmarks.common import summarize

MODELS = ("keras_example", "char_transformer")


def _free_ports(n):
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("localhost", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def worker(model_name, callbacks_on, steps, out_path):
    """One worker's run; the chief writes its throughput to `out_path`."""
    import keras
    import tensorflow as tf

    import keras_stability.distribute as ksd
    from keras_stability.callbacks import AdaptiveClipping
    from keras_stability.callbacks import GradientExplosionDetector
    from keras_stability.callbacks import GradientMonitor
    from keras_stability.clipping import ZClip
    from keras_stability.models import build_char_transformer
    from keras_stability.models import build_example_model
    from keras_stability.models import compile_example_model

    strategy = ksd.get_strategy(timeout_seconds=120)
    rng = np.random.default_rng(0)
    keras.utils.set_random_seed(0)
    with strategy.scope():
        if model_name == "keras_example":
            batch = 64
            x = rng.normal(size=(batch * steps, 10)).astype("float32")
            y = rng.integers(0, 10, size=batch * steps).astype("int32")
            model = compile_example_model(build_example_model())
        else:
            batch = 32
            x = rng.integers(0, 64, size=(batch * steps, 64)).astype("int32")
            y = np.roll(x, -1, axis=1)
            model = build_char_transformer(64, 64)
            model.compile(
                keras.optimizers.Adam(1e-3),
                keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            )
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = (
        tf.data.experimental.AutoShardPolicy.DATA
    )
    dataset = (
        tf.data.Dataset.from_tensor_slices((x, y)).batch(batch).with_options(options)
    )
    callbacks = []
    if callbacks_on:
        callbacks = [
            AdaptiveClipping(ZClip(), verbose=0),
            GradientMonitor(check_freq=10, verbose=0),
            GradientExplosionDetector(verbose=0),
        ]
    model.fit(dataset, epochs=1, verbose=0, callbacks=callbacks)  # warm-up: tracing
    start = time.perf_counter()
    model.fit(dataset, epochs=1, verbose=0, callbacks=callbacks)
    seconds = time.perf_counter() - start
    if ksd.is_chief(strategy):
        with open(out_path, "w") as f:
            json.dump({"samples_per_second": batch * steps / seconds}, f)


def run_config(model_name, n_workers, callbacks_on, steps):
    ports = _free_ports(n_workers)
    with tempfile.TemporaryDirectory() as tmp:
        out_path = os.path.join(tmp, "result.json")
        procs = []
        for index in range(n_workers):
            env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
            if n_workers > 1:
                env["TF_CONFIG"] = json.dumps(
                    {
                        "cluster": {"worker": [f"localhost:{p}" for p in ports]},
                        "task": {"type": "worker", "index": index},
                    }
                )
            else:
                env.pop("TF_CONFIG", None)
            procs.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "benchmarks.multi_worker",
                        "--worker",
                        model_name,
                        str(int(callbacks_on)),
                        str(steps),
                        out_path,
                    ],
                    env=env,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                    text=True,
                )
            )
        for proc in procs:
            _, err = proc.communicate(timeout=900)
            if proc.returncode != 0:
                raise RuntimeError(f"worker failed:\n{err[-3000:]}")
        with open(out_path) as f:
            return json.load(f)["samples_per_second"]


def main(argv=None):
    if argv is None:
        argv = sys.argv[1:]
    if argv and argv[0] == "--worker":
        worker(argv[1], bool(int(argv[2])), int(argv[3]), argv[4])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    rows = []
    for model_name in MODELS:
        for callbacks_on in (False, True):
            stats = {}
            for n_workers in (1, 2):
                values = []
                for r in range(args.repeats):
                    values.append(
                        run_config(model_name, n_workers, callbacks_on, args.steps)
                    )
                    print(
                        f"  {model_name} callbacks={callbacks_on} workers={n_workers} "
                        f"repeat {r}: {values[-1]:.0f} samples/s",
                        file=sys.stderr,
                        flush=True,
                    )
                stats[n_workers] = summarize(values)
            rows.append((model_name, callbacks_on, stats))

    lines = [
        "## Multi-worker throughput on loopback (MultiWorkerMirroredStrategy)",
        "",
        f"Global samples per second over {args.steps} timed steps after a warm-up "
        f"epoch, median (min..max) over {args.repeats} runs; 2 worker processes share "
        "the machine's cores and talk over loopback gRPC, so the ratio is the cost "
        "of the collectives (and of our callbacks), not a speed-up.",
        "",
        "| model | callbacks | 1 worker | 2 workers | 2 / 1 |",
        "| --- | --- | --- | --- | --- |",
    ]
    for model_name, callbacks_on, stats in rows:
        one, two = stats[1], stats[2]
        lines.append(
            f"| {model_name} | {'ZClip + monitor + detector' if callbacks_on else 'none'} | "
            f"{one['median']:.0f} ({one['min']:.0f}..{one['max']:.0f}) | "
            f"{two['median']:.0f} ({two['min']:.0f}..{two['max']:.0f}) | "
            f"{two['median'] / one['median']:.2f} |"
        )
    lines += [
        "",
        f"Command: `python -m benchmarks.multi_worker --steps {args.steps} "
        f"--repeats {args.repeats}`. Machine: {environment()}.",
    ]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
