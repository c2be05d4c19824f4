"""Child side of `tests.helpers.run_in_subprocess`.

Usage: python -m tests.subprocess_main PAYLOAD RESULT

Splits the CPU into logical devices before TensorFlow initialises, imports the
test function by module and name, calls it, and pickles the outcome.
"""

import importlib
import os
import pickle
import sys
import traceback


def _configure_devices(n_cpu_devices):
    import tensorflow as tf

    if n_cpu_devices > 1:
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * n_cpu_devices
        )


def main(payload_path, result_path):
    with open(payload_path, "rb") as f:
        payload = pickle.load(f)
    try:
        os.environ.update(payload["env"])
        _configure_devices(payload["n_cpu_devices"])
        module = importlib.import_module(payload["module"])
        func = getattr(module, payload["name"])
        outcome = {"ok": True, "value": func(*payload["args"], **payload["kwargs"])}
    except BaseException:  # reported to the parent, which raises
        outcome = {"ok": False, "traceback": traceback.format_exc()}
    with open(result_path, "wb") as f:
        pickle.dump(outcome, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
