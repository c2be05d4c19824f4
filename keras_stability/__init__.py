"""keras_stability: stable training and smaller models for Keras 3.

Parts you add to `model.fit`: gradient statistics and clipping inside the
compiled step, detectors that skip or roll back bad steps, layers and
regularizers for deep and transformer models, pruning and distillation.
"""

from keras_stability import _startup
from keras_stability.version import __version__

if _startup.launched_as_cli():
    # `python -m keras_stability ...` or the `keras-stability` script: the
    # command line parses its arguments before anything imports TensorFlow
    # (`--help` and usage errors answer at once), then imports TensorFlow
    # with its start-up lines silenced and the parts below
    # (`keras_stability.cli.main`). A plain `import keras_stability` imports
    # them now and keeps TensorFlow's own behaviour.
    pass
else:
    from keras_stability import callbacks
    from keras_stability import clipping
    from keras_stability import datasets
    from keras_stability import diagnostics
    from keras_stability import distillation
    from keras_stability import distribute
    from keras_stability import layers
    from keras_stability import models
    from keras_stability import optimizers
    from keras_stability import pruning
    from keras_stability import regularizers
    from keras_stability import tuning
    from keras_stability.callbacks import AdaptiveClipping
    from keras_stability.callbacks import GradientExplosionDetector
    from keras_stability.callbacks import GradientMonitor
    from keras_stability.distillation import Distiller
    from keras_stability.optimizers import GuardedOptimizer

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

# The names above by the module that defines them: the command line imports
# them after parsing its arguments (`_import_parts`), and `keras_stability.X`
# finds them there meanwhile.
_HOMES = {
    "AdaptiveClipping": "keras_stability.callbacks",
    "GradientExplosionDetector": "keras_stability.callbacks",
    "GradientMonitor": "keras_stability.callbacks",
    "Distiller": "keras_stability.distillation",
    "GuardedOptimizer": "keras_stability.optimizers",
}


def _import_parts():
    """Imports every part of the package (registers its Keras serializables).

    `import keras_stability` does this itself, except when it is the command
    line, which calls it once its arguments are parsed.
    """
    import importlib

    for name in __all__:
        if name != "__version__":
            getattr(importlib.import_module(__name__), name)


def __getattr__(name):
    import importlib

    if name in _HOMES:
        return getattr(importlib.import_module(_HOMES[name]), name)
    if name in __all__ and name != "__version__":
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
