"""vit2cbsa: turn pretrained Vision Transformers into Contract-and-Broadcast Self-Attention models.

    import timm, vit2cbsa
    model = vit2cbsa.convert(timm.create_model("vit_base_patch16_224", pretrained=True))
"""

__version__ = "0.1.0"

from .attention import CBSA, VARIANTS  # noqa: E402
from .convert import ConversionInfo, conversion_info, convert, is_converted, layout_of, new_parameters  # noqa: E402

__all__ = [
    "CBSA",
    "ConversionInfo",
    "VARIANTS",
    "__version__",
    "conversion_info",
    "convert",
    "is_converted",
    "layout_of",
    "new_parameters",
]
