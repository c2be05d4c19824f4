"""The batches a run found bad, kept in a file so that a resumed run skips them.

What LLM trainers do after a loss spike (Megatron's `--iterations-to-skip`,
Lightning's `SpikeDetection(exclude_batches_path=...)`): the batches of the
spike are recorded by their position in the data, `(epoch, batch)` as Keras
counts them, and a run resumed on the same data order (a backup restored
after a crash or a stop) draws them without training on them.
`GradientExplosionDetector(exclude_batches_path=...)` writes and reads it.

The file is JSON: `{"format": FORMAT, "batches": [[epoch, batch], ...]}`.
"""

import json
import os

__all__ = ["ExcludeList", "FORMAT"]

FORMAT = "keras_stability.exclude_batches/1"


class ExcludeList:
    """A set of `(epoch, batch)` pairs, read from and written to a JSON file.

    Args:
        path: The JSON file, or `None` for a list kept in memory only.

    Raises:
        ValueError: From `load`, if the file exists but is not such a list.
    """

    def __init__(self, path=None):
        self.path = path
        self.batches = set()
        self._saved = set()

    def load(self):
        """Adds the pairs of the file at `path`, if it exists; returns how many."""
        if self.path is None or not os.path.exists(self.path):
            return 0
        try:
            with open(self.path) as f:
                content = json.load(f)
            pairs = content["batches"] if content.get("format") == FORMAT else None
            loaded = {
                (int(epoch), int(batch))
                for epoch, batch in pairs
                if int(epoch) >= 0 and int(batch) >= 0
            }
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
            raise ValueError(
                f"Invalid exclude_batches_path={self.path!r}: expected a JSON file "
                f'{{"format": "{FORMAT}", "batches": [[epoch, batch], ...]}} '
                f"(as GradientExplosionDetector writes), which could not be read "
                f"({type(e).__name__}: {e})."
            ) from None
        self.batches |= loaded
        self._saved |= loaded
        return len(loaded)

    def add(self, epoch, batches):
        """Adds `(epoch, b)` for each `b` in `batches`; returns the new pairs."""
        new = {(int(epoch), int(b)) for b in batches} - self.batches
        self.batches |= new
        return sorted(new)

    def remove(self, pairs):
        """Takes `(epoch, batch)` pairs back out (those not listed are ignored)."""
        self.batches -= {(int(e), int(b)) for e, b in pairs}

    def hits(self, epoch, first, count=1):
        """Whether any of batches `first .. first + count - 1` of `epoch` is listed."""
        return any((epoch, b) in self.batches for b in range(first, first + count))

    @property
    def unsaved(self):
        """Whether pairs were added since the file was last read or written."""
        return self.batches != self._saved

    def save(self, path=None):
        """Writes the list to `path` (default: `self.path`), atomically.

        Returns:
            `None`, or the `OSError` that stopped the write (the caller warns:
            a run must not fail for its side file).
        """
        path = path or self.path
        if path is None:
            return None
        content = {"format": FORMAT, "batches": [list(p) for p in sorted(self.batches)]}
        temporary = f"{path}.tmp"
        try:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            with open(temporary, "w") as f:
                json.dump(content, f)
            os.replace(temporary, path)
        except OSError as e:
            return e
        self._saved = set(self.batches)
        return None
