"""Training helpers: attention alignment (layer-wise distillation) and model calling conventions."""

from .align import AttentionAligner, align_attention, call_model

__all__ = ["AttentionAligner", "align_attention", "call_model"]
