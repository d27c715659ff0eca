"""One resolver and loader for the MODEL argument of every vit2cbsa command (and of Python callers).

    from vit2cbsa.loading import load
    loaded = load("vit_small_patch16_224")          # a LoadedModel: .model, .data_config, .class_names, ...

* :mod:`.sources` -- :func:`resolve`: what a MODEL string names (the embedded teacher, a vit2cbsa,
  transformers or timm folder, a timm name, a Hub repo id), as a :class:`Source`; code shipped with a
  model is refused there (:func:`check_no_remote_code`).
* :mod:`.loader` -- :func:`load`: the model itself, with its pretrained weights or random ones, as a
  :class:`LoadedModel`.
* :mod:`.metadata` -- how the model expects its input (input size, mean, std), its image processor and
  its class names.

transformers is always called with ``trust_remote_code=False``, and nothing is ever read from stdin.
Errors are :class:`vit2cbsa.errors.LoadError` (a ``ValueError``) with a one-line message saying what was
wrong and what to do.
"""

from .loader import LoadedModel, load
from .metadata import IMAGENET_MEAN, IMAGENET_STD
from .sources import KINDS, TEACHER, Source, check_no_remote_code, resolve

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "KINDS", "LoadedModel", "Source", "TEACHER", "check_no_remote_code",
           "load", "resolve"]
