"""The files of a `BackupAndRestore` folder: names, metadata, atomic commit.

A backup is two files:

- `backup-NNNNNNNN.weights.h5`: the model's weights and optimizer state,
  numbered by save, written first as `backup-NNNNNNNN.partial.weights.h5`;
- `training_metadata.json`: where training was (`epoch`, `batches_done` in
  that epoch) and the name and size of its weights file, written to
  `training_metadata.json.tmp` and renamed into place. That rename is the
  commit: a process killed at any moment leaves either the previous backup
  or the new one, each complete. The weights are renamed from their partial
  name after the commit; a reader finds them under either name.

With a `GradientExplosionDetector` in the `fit`, the metadata also names
`backup-NNNNNNNN.snapshots.npz`, the detector's snapshots (`write_arrays`),
written and renamed into place before the commit that names it, and kept
from one backup to the next while they do not change.

With `double_checkpoint`, the previous metadata is kept as
`training_metadata.json.bkp` (copied atomically too) with its weights file.
Everything else in the folder belongs to someone else and is never touched.
"""

import io
import json
import os
import re

import numpy as np
import tensorflow as tf

from keras_stability import _checks
from keras_stability._keras_internals import file_utils

METADATA = "training_metadata.json"
PREVIOUS_METADATA = METADATA + ".bkp"
FORMAT = "keras_stability.BackupAndRestore"
_WEIGHTS = re.compile(r"^backup-(\d{8})(\.partial)?\.weights\.h5$")
# A detector's snapshots beside a backup (`write_arrays`).
_ARRAYS = re.compile(r"^backup-(\d{8})(\.partial)?\.snapshots\.npz$")
_METADATA_FILES = (
    METADATA,
    PREVIOUS_METADATA,
    METADATA + ".tmp",
    PREVIOUS_METADATA + ".tmp",
)
# What Keras' callback and earlier versions of this one wrote.
LEGACY_WEIGHTS = "latest.weights.h5"
_LEGACY_FILES = (
    LEGACY_WEIGHTS,
    LEGACY_WEIGHTS + ".bkp",
    "partial.weights.h5",
    METADATA + ".partial",
)


class CorruptBackupError(RuntimeError):
    """A backup folder holds a backup that cannot be resumed from."""


def weights_name(index):
    """The weights file of the `index`-th save."""
    return f"backup-{index:08d}.weights.h5"


def weights_index(name):
    """The save number in a weights file name."""
    return int(_WEIGHTS.match(name).group(1))


def partial(path):
    """The temporary name a weights file is written under."""
    return path[: -len(".weights.h5")] + ".partial.weights.h5"


def own_files(directory):
    """Names of the files in `directory` that backups write, sorted."""
    if not file_utils.isdir(directory):
        return []
    return sorted(
        name
        for name in file_utils.listdir(directory)
        if name in _METADATA_FILES
        or name in _LEGACY_FILES
        or _WEIGHTS.match(name)
        or _ARRAYS.match(name)
    )


def arrays_name(index):
    """The file of our callbacks' arrays (a detector's snapshots) of the
    `index`-th save."""
    return f"backup-{index:08d}.snapshots.npz"


def arrays_files(directory):
    """Names of the arrays files in `directory` (`arrays_name`)."""
    return [name for name in own_files(directory) if _ARRAYS.match(name)]


def write_arrays(directory, name, arrays):
    """Writes `{key: {name: array}}` to `directory/name` (a temporary name
    first, then renamed: a reader never sees part of it)."""
    flat, index = {}, []
    for key, values in arrays.items():
        for array_name, value in values.items():
            index.append([key, array_name])
            flat[f"a{len(index) - 1}"] = np.asarray(value)
    flat["index"] = np.asarray(json.dumps(index))
    path = file_utils.join(directory, name)
    temporary = path[: -len(".snapshots.npz")] + ".partial.snapshots.npz"
    buffer = io.BytesIO()
    np.savez(buffer, **flat)
    with file_utils.File(temporary, "wb") as f:
        f.write(buffer.getvalue())
    _replace(temporary, path)


def read_arrays(directory, name):
    """`{key: {name: array}}` from `write_arrays`, or `None` when `name` is
    `None`, missing or unreadable (the backup is then resumed without it)."""
    if not isinstance(name, str) or not _ARRAYS.match(name):
        return None
    path = file_utils.join(directory, name)
    try:
        with file_utils.File(path, "rb") as f:
            data = np.load(io.BytesIO(f.read()), allow_pickle=False)
            index = json.loads(str(data["index"]))
            arrays = {}
            for i, (key, array_name) in enumerate(index):
                arrays.setdefault(key, {})[array_name] = data[f"a{i}"]
    except Exception:  # any unreadable file: resumed without the snapshots
        return None
    return arrays


def committed_weights(directory):
    """Weights files under their final name (a commit wrote metadata naming them)."""
    return [
        name
        for name in own_files(directory)
        if (_WEIGHTS.match(name) and ".partial" not in name)
        or name in (LEGACY_WEIGHTS, LEGACY_WEIGHTS + ".bkp")
    ]


def read_metadata(directory, name):
    """Reads and validates a metadata file.

    Returns:
        The metadata dict, with `epoch`, `batches_done` and `weights` always
        present (metadata of Keras' callback resumes at its epoch's start).

    Raises:
        CorruptBackupError: Saying what is wrong with the file.
    """
    try:
        with file_utils.File(file_utils.join(directory, name), "r") as f:
            metadata = json.loads(f.read())
    except (ValueError, UnicodeDecodeError) as e:
        raise CorruptBackupError(f"{name} is not valid JSON ({e})") from None
    if not isinstance(metadata, dict):
        raise CorruptBackupError(f"{name} does not hold a JSON object")
    if "format" not in metadata and "weights" not in metadata:
        metadata = {
            "epoch": metadata.get("epoch"),
            "batches_done": 0,
            "weights": LEGACY_WEIGHTS,
        }
    for key in ("epoch", "batches_done", "save_index"):
        value = metadata.get(key, 0)
        if not _checks.is_integer(value) or value < 0:
            raise CorruptBackupError(
                f"{name} has no valid `{key}` (a non-negative integer). "
                f"Received: {key}={value!r}"
            )
    if not isinstance(metadata.get("created_backup_dir", False), bool):
        raise CorruptBackupError(f"{name} has no valid `created_backup_dir`")
    weights = metadata.get("weights")
    if not isinstance(weights, str) or not (
        _WEIGHTS.match(weights) or weights == LEGACY_WEIGHTS
    ):
        raise CorruptBackupError(
            f"{name} has no valid `weights` file name. Received: weights={weights!r}"
        )
    return metadata


def weights_path(directory, metadata):
    """The path of the weights a metadata names, checked to be whole.

    Raises:
        CorruptBackupError: If the file is missing or not the size written.
    """
    weights = metadata["weights"]
    path = file_utils.join(directory, weights)
    if not file_utils.exists(path):
        # Killed between the commit and the rename: whole, under the temporary name.
        path = partial(path)
        if not file_utils.exists(path):
            raise CorruptBackupError(f"the weights file {weights} it names is missing")
    expected = metadata.get("weights_bytes")
    if expected is not None and size(path) != expected:
        raise CorruptBackupError(
            f"the weights file {weights} is truncated or altered "
            f"({size(path)} bytes, {expected} written)"
        )
    return path


def commit(directory, metadata, keep_previous):
    """Writes `metadata` as the latest backup (optionally keeping the previous one)."""
    path = file_utils.join(directory, METADATA)
    if keep_previous and file_utils.exists(path):
        previous = file_utils.join(directory, PREVIOUS_METADATA)
        file_utils.copy(path, previous + ".tmp")
        _replace(previous + ".tmp", previous)
    with file_utils.File(path + ".tmp", "w") as f:
        f.write(json.dumps({"format": FORMAT, **metadata}))
    _replace(path + ".tmp", path)


def finish_weights(directory, name):
    """Renames weights from their temporary name to `name`, if not done yet."""
    path = file_utils.join(directory, name)
    if not file_utils.exists(path) and file_utils.exists(partial(path)):
        _replace(partial(path), path)


def remove(directory, name):
    """Removes `directory/name` if it exists."""
    path = file_utils.join(directory, name)
    if file_utils.exists(path):
        file_utils.remove(path)


def remove_dir_if_empty(directory):
    if file_utils.listdir(directory):
        return
    if file_utils.is_remote_path(directory):
        file_utils.rmtree(directory)
    else:
        os.rmdir(directory)  # refuses, rather than deletes, a file added since


def size(path):
    if file_utils.is_remote_path(path):
        return tf.io.gfile.stat(path).length
    return os.path.getsize(path)


def _replace(src, dst):
    if file_utils.is_remote_path(dst):
        # Buckets have no atomic rename; a copy is the best they offer.
        file_utils.copy(src, dst)
        file_utils.remove(src)
    else:
        os.replace(src, dst)
