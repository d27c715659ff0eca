"""The identity of a converted model's base: how to rebuild its unconverted architecture without weights.

A :class:`BaseModelSpec` is saved as the ``"base"`` entry of ``vit2cbsa_config.json``: a timm model by its
registered name and constructor kwargs (``timm.create_model(name, pretrained=False, **model_kwargs)``, or its
class for one built without the registry), a transformers model by its class and config
(``Model._from_config(config)``). :func:`base_spec` describes a model, :func:`verify_rebuild` proves the
description rebuilds exactly that network (on the meta device), :func:`set_class_names` records the
output classes, and :func:`base_model_id` is the Hub id of the original pretrained model (for the card).
"""

from __future__ import annotations

import copy
import importlib
import inspect
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence

import torch
from torch import nn

from ..convert import convert
from ..errors import CheckpointError, UnsupportedModelError, UsageError, one_line
from ..info import ConversionInfo
from ..modeling import is_hf
from .format import read_hf_config
from .weights import expected_tensors, tensor_problems

BASE_ATTR = "_vit2cbsa_base"  # on a loaded model: its BaseModelSpec, reused when it is saved again
BASE_MODEL_ATTR = "_vit2cbsa_base_model"  # ... and the Hub id of its original pretrained model
_DROP_KEYS = ("drop_rate", "drop_path_rate", "pos_drop_rate", "patch_drop_rate", "proj_drop_rate", "attn_drop_rate")


@dataclass
class BaseModelSpec:
    """How to rebuild the unconverted architecture of a model, without its pretrained weights.

    ``library`` is ``"timm"`` (rebuilt with ``timm.create_model(architecture, pretrained=False,
    **model_kwargs)``, or ``cls(**model_kwargs)`` for a class built directly) or
    ``"transformers"`` (rebuilt with ``getattr(transformers, cls)._from_config(hf_config)``).
    """

    library: str
    cls: str
    architecture: Optional[str] = None
    model_kwargs: Dict[str, Any] = field(default_factory=dict)
    pretrained_cfg: Optional[Dict[str, Any]] = None
    task: str = "image-feature-extraction"
    hf_config: Any = None  # a transformers PretrainedConfig, stored as config.json
    attn_implementation: Optional[str] = None  # transformers: of the layers left as softmax

    def to_json(self) -> Dict[str, Any]:
        """The ``"base"`` entry of ``vit2cbsa_config.json``."""
        d = {"library": self.library, "class": self.cls, "task": self.task}
        if self.library == "timm":
            d.update(architecture=self.architecture, model_kwargs=self.model_kwargs, pretrained_cfg=self.pretrained_cfg)
        else:
            d.update(config="config.json", attn_implementation=self.attn_implementation)
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any], folder: Optional[Path] = None) -> "BaseModelSpec":
        """The spec a ``"base"`` entry describes (a transformers base reads ``folder``'s ``config.json``)."""
        library = d.get("library")
        if library not in ("timm", "transformers") or not isinstance(d.get("class"), str):
            raise CheckpointError(f"unknown base model library {library!r} (expected 'timm' or 'transformers')")
        hf_config = None
        if library == "transformers":
            if folder is None:
                raise CheckpointError("a transformers base model needs its config.json")
            hf_config = read_hf_config(folder)
        cfg = d.get("pretrained_cfg")
        if cfg is not None:
            cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()}
        model_kwargs = d.get("model_kwargs") or {}
        if not isinstance(model_kwargs, Mapping):
            raise CheckpointError(f"model_kwargs must be a JSON object, got {type(model_kwargs).__name__}")
        if library == "timm":
            check_timm_kwargs(d["class"], model_kwargs)
        return cls(library, d["class"], d.get("architecture"), dict(model_kwargs), cfg,
                   d.get("task", "image-feature-extraction"), hf_config, d.get("attn_implementation"))

    def describe(self) -> str:
        """``"timm vit_base_patch16_224"``, ``"transformers ViTModel"``."""
        return f"{self.library} {self.architecture or self.cls}"

    def build(self) -> nn.Module:
        """A freshly initialised (random-weight) instance of the base architecture."""
        if self.library == "timm":
            import timm

            if self.architecture:
                return timm.create_model(self.architecture, pretrained=False, pretrained_cfg=self.pretrained_cfg,
                                         **self.model_kwargs)
            return _import_class(self.cls, "timm.")(**self.model_kwargs)
        import transformers

        model_cls = getattr(transformers, self.cls, None)
        if not (isinstance(model_cls, type) and issubclass(model_cls, transformers.PreTrainedModel)):
            raise CheckpointError(f"transformers has no model class {self.cls!r} (this transformers is {transformers.__version__})")
        kwargs = {"attn_implementation": self.attn_implementation} if self.attn_implementation else {}
        return model_cls._from_config(copy.deepcopy(self.hf_config), **kwargs)


def check_timm_kwargs(path: str, kwargs: Mapping[str, Any]) -> None:
    """Refuse (:class:`~vit2cbsa.errors.CheckpointError`) saved ``model_kwargs`` that are not named parameters of the
    timm class ``path``'s constructor: an allow-list of architecture options, so that ``checkpoint_path``,
    ``pretrained``, ``pretrained_cfg_overlay``, ``cache_dir`` and whatever else makes ``timm.create_model`` read
    files or download never reach it from an untrusted folder."""
    cls = _import_class(path, "timm.")
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    allowed = set()
    for klass in cls.__mro__:  # a subclass passing **kwargs on (VisionTransformerDistilled) takes its parent's too
        if klass is nn.Module or not issubclass(klass, nn.Module) or "__init__" not in vars(klass):
            continue
        params = inspect.signature(klass.__init__).parameters
        allowed |= {n for n, p in params.items() if n != "self" and p.kind in kinds}
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            break
    bad = sorted(set(kwargs) - allowed)
    if bad:
        raise CheckpointError(f"model_kwargs {', '.join(map(repr, bad))} are not constructor arguments of timm's "
                              f"{cls.__name__}: refusing them (a saved folder may name architecture options only, "
                              "never files, downloads or pretrained configs)")


def _import_class(path: str, allowed_prefix: str) -> type:
    module, _, name = path.rpartition(".")
    if not module.startswith(allowed_prefix):
        raise CheckpointError(f"refusing to import {path!r}: only {allowed_prefix}* classes can be rebuilt")
    try:
        obj = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise CheckpointError(f"cannot import {path!r}: {one_line(e)}") from e
    if not (isinstance(obj, type) and issubclass(obj, nn.Module)):
        raise CheckpointError(f"{path!r} is not a torch.nn.Module class")
    return obj


def _jsonable(value: Any, what: str) -> Any:
    """``value`` with tuples turned into lists; a clear error if it is not JSON-serialisable."""
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError) as e:
        raise UsageError(f"{what} is not JSON-serialisable ({e}); pass serialisable model_kwargs=... "
                         "(timm accepts layer names as strings, e.g. norm_layer='rmsnorm')") from e


def _infer_timm_vit_kwargs(model: nn.Module) -> Dict[str, Any]:
    """Constructor arguments of a timm ``VisionTransformer`` read back from its modules."""
    from timm.models.vision_transformer import VisionTransformer

    if not isinstance(model, VisionTransformer):
        raise UsageError(f"cannot infer the constructor arguments of timm {type(model).__name__}; "
                         "pass save_pretrained(..., model_kwargs={...})")
    ident = nn.Identity
    blk, pe = model.blocks[0], model.patch_embed
    attn = blk.attn
    return dict(
        img_size=list(pe.img_size) if pe.img_size is not None else None,
        patch_size=list(pe.patch_size),
        in_chans=pe.proj.in_channels,
        num_classes=model.num_classes,
        global_pool=model.global_pool,
        embed_dim=model.embed_dim,
        depth=len(model.blocks),
        num_heads=attn.num_heads,
        mlp_ratio=blk.mlp.fc1.out_features / model.embed_dim,
        qkv_bias=attn.qkv.bias is not None,
        qk_norm=not isinstance(attn.q_norm, ident),
        scale_attn_norm=not isinstance(getattr(attn, "norm", ident()), ident),
        scale_mlp_norm=not isinstance(getattr(blk.mlp, "norm", ident()), ident),
        proj_bias=attn.proj.bias is not None,
        init_values=None if isinstance(blk.ls1, ident) else 1e-5,  # the value itself is a weight
        class_token=model.cls_token is not None,
        pos_embed="learn" if model.pos_embed is not None else "none",
        no_embed_class=model.no_embed_class,
        reg_tokens=model.num_reg_tokens,
        pre_norm=not isinstance(model.norm_pre, ident),
        final_norm=not (isinstance(model.norm, ident) and isinstance(model.fc_norm, ident)),
        fc_norm=not isinstance(model.fc_norm, ident),
        pool_include_prefix=model.pool_include_prefix,
        dynamic_img_size=model.dynamic_img_size,
        dynamic_img_pad=pe.dynamic_img_pad,
        drop_rate=model.head_drop.p,
        pos_drop_rate=model.pos_drop.p,
        patch_drop_rate=float(getattr(model.patch_drop, "prob", 0.0)),
        proj_drop_rate=attn.proj_drop.p,
        drop_path_rate=float(getattr(model.blocks[-1].drop_path1, "drop_prob", 0.0)),
    )


def base_spec(model: nn.Module, model_kwargs: Optional[Mapping[str, Any]] = None) -> BaseModelSpec:
    """Describe how to rebuild ``model``'s architecture (see :class:`BaseModelSpec`); not verified here.

    transformers models are described by their config. timm models by their registered name
    (``model.pretrained_cfg["architecture"]``) and constructor kwargs: ``model_kwargs`` if given,
    else the ones timm recorded at ``create_model`` time, else read back from the modules of a
    ``VisionTransformer``; a class built directly is rebuilt from its import path.
    """
    if is_hf(model):
        if model_kwargs:
            raise UsageError("model_kwargs is for timm models; transformers models are rebuilt from their config")
        task = "image-classification" if "ForImageClassification" in type(model).__name__ else "image-feature-extraction"
        return BaseModelSpec("transformers", type(model).__name__, task=task, hf_config=copy.deepcopy(model.config),
                             attn_implementation=getattr(model.config, "_attn_implementation", None))
    if not type(model).__module__.startswith("timm."):
        raise UnsupportedModelError(f"can save timm and transformers models, not "
                                    f"{type(model).__module__}.{type(model).__name__}")
    import timm
    from timm.models import get_model_args

    stored: Optional[BaseModelSpec] = getattr(model, BASE_ATTR, None)
    cfg = {k: v for k, v in (getattr(model, "pretrained_cfg", None) or {}).items() if k != "state_dict"}
    arch = cfg.get("architecture")
    arch = arch if isinstance(arch, str) and timm.is_model(arch) else None
    if model_kwargs is not None:
        kwargs = dict(model_kwargs)
    elif stored is not None and stored.library == "timm":
        kwargs = dict(stored.model_kwargs)
    elif arch and getattr(model, "_model_args", None) is not None:
        kwargs = get_model_args(model)  # what timm recorded at create_model, kept in sync on resizes
        kwargs.update({k: v for k, v in model._model_args.items() if k in _DROP_KEYS})
    else:
        kwargs = _infer_timm_vit_kwargs(model)
    task = "image-classification" if getattr(model, "num_classes", 0) else "image-feature-extraction"
    return BaseModelSpec("timm", f"{type(model).__module__}.{type(model).__qualname__}", arch,
                         _jsonable(kwargs, "model_kwargs"), _jsonable(cfg, "pretrained_cfg") if cfg else None, task)


def set_class_names(spec: BaseModelSpec, names: Sequence[str]) -> None:
    """Record ``names`` as the class names of the model ``spec`` describes (validated against its head)."""
    names = list(names)
    if not all(isinstance(n, str) for n in names):
        raise UsageError("class_names must be strings")
    if spec.library == "timm":
        expected = spec.model_kwargs.get("num_classes", (spec.pretrained_cfg or {}).get("num_classes"))
    else:
        expected = spec.hf_config.num_labels if spec.task == "image-classification" else None
    if expected is not None and len(names) != expected:
        raise UsageError(f"{len(names)} class_names for a model with {expected} classes")
    if spec.library == "timm":
        spec.pretrained_cfg = {**(spec.pretrained_cfg or {}), "label_names": names}
    else:
        spec.hf_config.id2label = dict(enumerate(names))
        spec.hf_config.label2id = {n: i for i, n in enumerate(names)}


def verify_rebuild(spec: BaseModelSpec, model: nn.Module, info: ConversionInfo) -> None:
    """Rebuild ``spec`` on the meta device, convert it like ``model`` and check it is the same network.

    Raises:
        UsageError: it cannot be rebuilt, or not exactly (other tensors, shapes or modules).
    """
    hint = ("; pass save_pretrained(..., model_kwargs={...}) with the model's constructor arguments "
            f"(tried: {spec.model_kwargs})" if spec.library == "timm" else "")
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the conversion's own warnings were given when the model was converted
            rebuilt = convert(spec.build(), info.config)
    except Exception as e:
        raise UsageError(f"cannot rebuild this model from {spec.describe()}: {one_line(e)}{hint}") from e
    problems = tensor_problems(expected_tensors(model), {k: shape for k, (shape, _) in expected_tensors(rebuilt).items()})
    if not problems:
        for mine, theirs in zip(repr(model).splitlines(), repr(rebuilt).splitlines()):
            if mine != theirs:
                problems = [f"module `{mine.strip()}` would be rebuilt as `{theirs.strip()}`"]
                break
    if problems:
        raise UsageError(f"{spec.describe()} does not rebuild this model exactly: " + "; ".join(problems) + hint)


def base_model_id(model: nn.Module, spec: BaseModelSpec) -> Optional[str]:
    """The Hub id of ``model``'s original pretrained model, if known: the one its folder was loaded with,
    timm's ``pretrained_cfg["hf_hub_id"]`` or a transformers ``name_or_path`` of the form ``org/name``."""
    base_model = getattr(model, BASE_MODEL_ATTR, None)
    if base_model is not None:
        return base_model
    if spec.library == "timm":
        return (spec.pretrained_cfg or {}).get("hf_hub_id")
    name = getattr(model.config, "_name_or_path", "") or ""
    return name if name.count("/") == 1 and not os.path.exists(name) else None


def remember_base(model: nn.Module, spec: BaseModelSpec, base_model: Optional[str]) -> None:
    """Keep a loaded model's spec and base model id on it, so that saving it again reuses them."""
    object.__setattr__(model, BASE_ATTR, spec)
    object.__setattr__(model, BASE_MODEL_ATTR, base_model)


__all__ = ["BaseModelSpec", "base_model_id", "base_spec", "check_timm_kwargs", "remember_base", "set_class_names", "verify_rebuild"]
