"""Knowledge distillation: a `Distiller` model, its loss maths, hint terms,
temperature/alpha schedules, cached teacher outputs and `prune_and_distill`
(Minitron's recipe for transformer LMs)."""

from keras_stability.distillation.cache import compute_teacher_outputs
from keras_stability.distillation.distiller import Distiller
from keras_stability.distillation.features import FeatureDistillation
from keras_stability.distillation.losses import combine_losses
from keras_stability.distillation.losses import soft_target_loss
from keras_stability.distillation.losses import soften
from keras_stability.distillation.losses import top1_agreement
from keras_stability.distillation.minitron import prune_and_distill
from keras_stability.distillation.schedules import DistillationScheduler
from keras_stability.distillation.schedules import LinearSchedule

__all__ = [
    "Distiller",
    "DistillationScheduler",
    "FeatureDistillation",
    "LinearSchedule",
    "combine_losses",
    "compute_teacher_outputs",
    "prune_and_distill",
    "soft_target_loss",
    "soften",
    "top1_agreement",
]
