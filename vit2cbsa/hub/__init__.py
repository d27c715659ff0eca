"""Save, load and publish converted models: safetensors weights plus one small JSON config.

One file per seam (each imports only the ones above it in this list, and never this ``__init__``):

- :mod:`~vit2cbsa.hub.format`: the on-disk format: ``vit2cbsa_config.json`` (``CONFIG_NAME``,
  ``FORMAT_VERSION``, the conversion entry, :func:`read_config`) and transformers' ``config.json``;
- :mod:`~vit2cbsa.hub.weights`: the safetensors files: the binding of the config to the weights, header checks;
- :mod:`~vit2cbsa.hub.io`: atomic folder writes, sha256, shard writing;
- :mod:`~vit2cbsa.hub.identity`: :class:`BaseModelSpec`, how to rebuild the base architecture (:func:`base_spec`);
- :mod:`~vit2cbsa.hub.costs` and :mod:`~vit2cbsa.hub.card`: FLOPs/parameters before and after, the model card;
- :mod:`~vit2cbsa.hub.save`, :mod:`~vit2cbsa.hub.load`, :mod:`~vit2cbsa.hub.push`: :func:`save_pretrained`,
  :func:`from_pretrained`, :func:`push_to_hub`;
- :mod:`~vit2cbsa.hub.transformers_auto`: model_type ``"vit2cbsa"`` for transformers' Auto classes and ``pipeline()``.

This ``__init__`` only re-exports the public API.
"""

from ..errors import CheckpointError
from .card import render_model_card
from .costs import CostReport, compare_costs
from .format import CONFIG_NAME, FORMAT_VERSION, read_config
from .identity import BaseModelSpec, base_spec
from .load import from_pretrained
from .push import push_to_hub
from .save import save_pretrained

__all__ = ["CONFIG_NAME", "FORMAT_VERSION", "BaseModelSpec", "CheckpointError", "CostReport", "base_spec",
           "compare_costs", "from_pretrained", "push_to_hub", "read_config", "render_model_card", "save_pretrained"]
