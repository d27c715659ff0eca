"""vit2cbsa: turn pretrained Vision Transformers into Contract-and-Broadcast Self-Attention models.

    import timm, vit2cbsa
    model = vit2cbsa.convert(timm.create_model("vit_base_patch16_224", pretrained=True))
"""

from ._version import __version__
from .attention import CBSA, VARIANTS  # noqa: E402
from .config import ConversionConfig  # noqa: E402
from .convert import convert  # noqa: E402
from .info import ConversionInfo, conversion_info, is_converted, layout_of, new_parameters  # noqa: E402
from .errors import CheckpointError, RepresentativesWarning, Vit2CBSAError
from .hub import from_pretrained, push_to_hub, save_pretrained  # noqa: E402
from .hub.transformers_auto import register as _register_with_transformers  # noqa: E402

_register_with_transformers()  # transformers' Auto classes and pipeline() load vit2cbsa folders

__all__ = [
    "CBSA",
    "CheckpointError",
    "ConversionConfig",
    "ConversionInfo",
    "RepresentativesWarning",
    "VARIANTS",
    "Vit2CBSAError",
    "__version__",
    "conversion_info",
    "convert",
    "from_pretrained",
    "is_converted",
    "layout_of",
    "new_parameters",
    "push_to_hub",
    "save_pretrained",
]
