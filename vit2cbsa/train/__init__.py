"""Training: attention alignment (layer-wise distillation) and Accelerate fine-tuning (``run``)."""

from .align import AttentionAligner, align_attention, call_model
from .finetune import FinetuneConfig, run

__all__ = ["AttentionAligner", "FinetuneConfig", "align_attention", "call_model", "run"]
