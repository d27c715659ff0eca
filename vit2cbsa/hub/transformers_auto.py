"""transformers' Auto classes and ``pipeline()`` on folders saved by vit2cbsa.

A converted transformers model is saved with a ``config.json`` of ``model_type`` ``"vit2cbsa"``
that wraps the base model's config (``base_config``). So:

- plain transformers (vit2cbsa not imported) refuses the folder loudly — "model type `vit2cbsa`
  ... does not recognize this architecture" — instead of silently loading the original softmax
  model and dropping the CBSA weights;
- after ``import vit2cbsa`` the type is registered: ``AutoConfig`` reads it as
  :class:`Vit2CBSAConfig`, and ``AutoModelForImageClassification.from_pretrained(folder)``,
  ``AutoModel.from_pretrained(folder)`` and ``pipeline("image-classification", model=folder)``
  return the converted model, loaded by :func:`vit2cbsa.from_pretrained` with all its checks (the
  folder or Hub repo is resolved once, here, then loaded by :func:`vit2cbsa.hub.load.load_folder`).
"""

from __future__ import annotations

import json
from typing import Any, Dict, List, Optional

from transformers import AutoConfig, AutoModel, AutoModelForImageClassification, PretrainedConfig

from ..errors import UsageError
from .format import MODEL_TYPE
from .load import load_folder, resolve_folder

_HUB_KWARGS = ("revision", "cache_dir", "token", "local_files_only")
# what the Auto classes and pipeline() pass on their own; none of them changes a vit2cbsa folder's model
_IGNORED_KWARGS = ("trust_remote_code", "subfolder", "code_revision", "force_download", "proxies",
                   "use_safetensors", "adapter_kwargs", "attn_implementation")


class Vit2CBSAConfig(PretrainedConfig):
    """The ``config.json`` of a converted transformers model: the base config under ``base_config``."""

    model_type = MODEL_TYPE

    def __init__(self, base_config: Optional[Dict[str, Any]] = None, **kwargs: Any) -> None:
        self.base_config = dict(base_config or {})
        super().__init__(**kwargs)


class _Vit2CBSALoader:
    """Never instantiated: ``from_pretrained`` hands over to :func:`vit2cbsa.from_pretrained` and returns the
    converted transformers model (not importing ``PreTrainedModel`` keeps ``import vit2cbsa`` light)."""

    config_class = Vit2CBSAConfig
    _wants_head: bool = False

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, *model_args: Any, **kwargs: Any) -> Any:
        """The converted model of a vit2cbsa folder or Hub repo (``AutoModel``: without its classification head)."""
        if model_args:
            raise TypeError("vit2cbsa folders are rebuilt from their saved options; from_pretrained takes no "
                            "positional model arguments")
        hub_kwargs = {k: kwargs.pop(k) for k in _HUB_KWARGS if k in kwargs}
        passed = kwargs.pop("config", None)
        dtype = kwargs.pop("dtype", kwargs.pop("torch_dtype", None))
        device = kwargs.pop("device_map", None)
        unknown = sorted(k for k in kwargs if k not in _IGNORED_KWARGS and not k.startswith("_"))
        if unknown:
            raise TypeError(f"vit2cbsa folders load with the options they were saved with; "
                            f"from_pretrained does not take {', '.join(unknown)}")
        if device is not None and not isinstance(device, str):
            raise TypeError(f"device_map={device!r}: a vit2cbsa model loads onto one device; pass device_map='cpu' or 'cuda'")
        folder = resolve_folder(pretrained_model_name_or_path, hub_kwargs.get("revision"), hub_kwargs.get("cache_dir"),
                                hub_kwargs.get("token"), hub_kwargs.get("local_files_only", False))
        changed = _overridden(passed, folder / "config.json") if isinstance(passed, Vit2CBSAConfig) else []
        if changed:
            raise TypeError(f"vit2cbsa folders load with the options they were saved with; from_pretrained does not "
                            f"take overrides of {', '.join(changed)} (convert and save the model again instead)")
        model = load_folder(folder, device="cpu" if device in (None, "auto") else device)
        if dtype not in (None, "auto"):
            model.to(dtype)
        has_head = "ForImageClassification" in type(model).__name__
        if cls._wants_head and not has_head:
            raise UsageError(f"{pretrained_model_name_or_path} holds a {type(model).__name__} without an image "
                             "classification head; load it with AutoModel (or vit2cbsa.from_pretrained)")
        if not cls._wants_head and has_head:
            inner = model.base_model  # what AutoModel gives for a classification checkpoint: the model without its head
            object.__setattr__(inner, "vit2cbsa_info", model.vit2cbsa_info)
            return inner
        return model


def _overridden(passed: Vit2CBSAConfig, path: Any) -> List[str]:
    """The config entries the caller changed (e.g. ``num_labels=7`` given to an Auto class), which a saved
    converted model cannot honour."""
    try:
        saved = Vit2CBSAConfig.from_dict(json.loads(path.read_text())).to_dict()
    except (OSError, ValueError):
        return []  # vit2cbsa.from_pretrained reports the broken file
    mine = passed.to_dict()
    skip = {"_name_or_path", "transformers_version", "_commit_hash", "dtype"}
    return sorted(k for k in set(saved) | set(mine) if k not in skip and saved.get(k) != mine.get(k))


class Vit2CBSAModel(_Vit2CBSALoader):
    """``AutoModel`` entry: the converted model without a classification head."""


class Vit2CBSAForImageClassification(_Vit2CBSALoader):
    """``AutoModelForImageClassification`` entry: the converted classifier."""

    _wants_head = True


def register() -> None:
    """Register the ``vit2cbsa`` model type with transformers' Auto classes (done on ``import vit2cbsa``)."""
    AutoConfig.register(MODEL_TYPE, Vit2CBSAConfig, exist_ok=True)
    AutoModel.register(Vit2CBSAConfig, Vit2CBSAModel, exist_ok=True)
    AutoModelForImageClassification.register(Vit2CBSAConfig, Vit2CBSAForImageClassification, exist_ok=True)


__all__ = ["MODEL_TYPE", "Vit2CBSAConfig", "Vit2CBSAForImageClassification", "Vit2CBSAModel", "register"]
