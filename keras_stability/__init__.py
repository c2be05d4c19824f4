"""keras_stability: stable training and smaller models for Keras 3.

Parts you add to `model.fit`: gradient statistics and clipping inside the
compiled step, detectors that skip or roll back bad steps, layers and
regularizers for deep and transformer models, pruning and distillation.
"""

from keras_stability import _startup

if _startup.launched_as_cli():
    # `python -m keras_stability ...` or the `keras-stability` script: silence
    # TensorFlow's start-up lines before anything below imports it. A plain
    # `import keras_stability` is left alone.
    _startup.quiet_tensorflow_startup()

from keras_stability import callbacks  # noqa: E402
from keras_stability import clipping  # noqa: E402
from keras_stability import datasets  # noqa: E402
from keras_stability import diagnostics  # noqa: E402
from keras_stability import distillation  # noqa: E402
from keras_stability import distribute  # noqa: E402
from keras_stability import layers  # noqa: E402
from keras_stability import models  # noqa: E402
from keras_stability import optimizers  # noqa: E402
from keras_stability import pruning  # noqa: E402
from keras_stability import regularizers  # noqa: E402
from keras_stability import tuning  # noqa: E402
from keras_stability.callbacks import AdaptiveClipping  # noqa: E402
from keras_stability.callbacks import GradientExplosionDetector  # noqa: E402
from keras_stability.callbacks import GradientMonitor  # noqa: E402
from keras_stability.distillation import Distiller  # noqa: E402
from keras_stability.optimizers import GuardedOptimizer  # noqa: E402
from keras_stability.version import __version__  # noqa: E402

__all__ = [
    "__version__",
    "callbacks",
    "clipping",
    "datasets",
    "diagnostics",
    "distillation",
    "distribute",
    "layers",
    "models",
    "optimizers",
    "pruning",
    "regularizers",
    "tuning",
    "AdaptiveClipping",
    "Distiller",
    "GradientExplosionDetector",
    "GradientMonitor",
    "GuardedOptimizer",
]
