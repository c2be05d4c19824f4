"""`tf.distribute` helpers: strategy from the environment, chief-only writing,
and the Keras 3 fixes that multi-worker `fit` needs."""

from keras_stability.distribute.backup import BackupAndRestore
from keras_stability.distribute.backup import CorruptBackupError
from keras_stability.distribute.keras_fixes import disable_multi_worker_fixes
from keras_stability.distribute.keras_fixes import enable_multi_worker_fixes
from keras_stability.distribute.keras_fixes import multi_worker_fixes_enabled
from keras_stability.distribute.strategy import chief_path
from keras_stability.distribute.strategy import get_strategy
from keras_stability.distribute.strategy import is_chief
from keras_stability.distribute.strategy import parse_tf_config

__all__ = [
    "BackupAndRestore",
    "CorruptBackupError",
    "chief_path",
    "disable_multi_worker_fixes",
    "enable_multi_worker_fixes",
    "get_strategy",
    "is_chief",
    "multi_worker_fixes_enabled",
    "parse_tf_config",
]
