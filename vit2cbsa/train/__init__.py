"""Training: attention alignment (layer-wise distillation) and Accelerate fine-tuning (``run``)."""

from .align import AttentionAligner, align_attention
from .data import BadImageError, DataError
from .finetune import FinetuneConfig, UsageError, run

__all__ = ["AttentionAligner", "BadImageError", "DataError", "FinetuneConfig", "UsageError", "align_attention",
           "run"]
