"""Save, load and publish converted models: safetensors weights plus one small JSON config.

A folder written by :func:`save_pretrained` (and read by :func:`from_pretrained`, locally or
from the Hugging Face Hub)::

    model.safetensors          weights under the pretrained names plus ``mixer.*``; above
                               ``max_shard_size``: model-0000k-of-0000n.safetensors + model.safetensors.index.json
    config.json                transformers models: model_type "vit2cbsa" wrapping the base config
                               (see vit2cbsa.hf_auto: plain transformers refuses it, Auto classes load it
                               after ``import vit2cbsa``)
    preprocessor_config.json   optional: an image processor saved alongside
    vit2cbsa_config.json       written last: conversion options, how to rebuild the base
                               model, and the size and sha256 of every other file

Saving is atomic: everything goes into a temporary folder next to the target, the marker
``vit2cbsa_config.json`` last, and the folder is then renamed into place (temporary folders left
by a killed save are removed by the next save to the same place). Every output-changing entry of
the config is bound to the weights (``vit2cbsa.saved_weights``). Loading never downloads the
original pretrained weights and never runs code from the folder: it checks every file's size and
sha256, the binding, and every tensor's name, shape and dtype against the architecture rebuilt on
the meta device (timm ``create_model(name, pretrained=False, **kwargs)`` or transformers
``Model._from_config``, converted with the saved options); only then is the model built with
real memory and the weights copied in.
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import json
import os
import shutil
import socket
import tempfile
import time
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from ._version import __version__
from .attention import BROADCASTS, PREFIX_BROADCASTS, VARIANTS
from .convert import SAVED_DEFAULTS, ConversionInfo, conversion_info, convert, saved_options
from .modeling import is_hf as _is_hf
from .modeling import uncompiled
from .errors import CheckpointError
from .errors import one_line as _one_line
from .hf_auto import MODEL_TYPE as HF_MODEL_TYPE
from .layout import EXTRA_REPRESENTATIVES
from .saved_weights import (BINDING_KEY, apply_saved_dtypes, bound_files, canonical, check_binding, dtype_name,
                            expected_tensors, make_binding, parse_dtype, read_headers, tensor_problems)

CONFIG_NAME = "vit2cbsa_config.json"
# 2: the conversion also records extra_representatives and prefix_broadcast (version 1 folders: "none", "all"),
# so a vit2cbsa that does not know them refuses these folders instead of loading a different network
# 3: the config is bound to the weights (safetensors metadata), transformers' config.json wraps the base config
FORMAT_VERSION = 3
_BASE_ATTR = "_vit2cbsa_base"  # on a loaded model: its BaseModelSpec, reused when it is saved again
_BASE_MODEL_ATTR = "_vit2cbsa_base_model"  # ... and the Hub id of its original pretrained model
_DROP_KEYS = ("drop_rate", "drop_path_rate", "pos_drop_rate", "patch_drop_rate", "proj_drop_rate", "attn_drop_rate")

PathLike = Union[str, "os.PathLike[str]"]


# --------------------------------------------------------------------------- base model identity


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
        d = {"library": self.library, "class": self.cls, "task": self.task}
        if self.library == "timm":
            d.update(architecture=self.architecture, model_kwargs=self.model_kwargs, pretrained_cfg=self.pretrained_cfg)
        else:
            d.update(config="config.json", attn_implementation=self.attn_implementation)
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any], folder: Optional[Path] = None) -> "BaseModelSpec":
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
        return cls(library, d["class"], d.get("architecture"), dict(d.get("model_kwargs") or {}), cfg,
                   d.get("task", "image-feature-extraction"), hf_config, d.get("attn_implementation"))

    def describe(self) -> str:
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


def read_hf_config(folder: Path) -> Any:
    """The base transformers config of a saved folder, built from transformers' own config classes only.

    ``config.json`` is read as JSON (never through ``AutoConfig``, which could ask on stdin to run
    the folder's code): format 3 wraps the base config under ``base_config``, older folders hold it
    directly. A config naming custom code (``auto_map``) or a ``model_type`` transformers does not
    know is refused.
    """
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    path = folder / "config.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} cannot be read: {_one_line(e)}") from e
    if isinstance(data, dict) and data.get("model_type") == HF_MODEL_TYPE:
        data = data.get("base_config")
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} is malformed: expected a JSON object with the base model's config")
    model_type = data.get("model_type")
    if "auto_map" in data:
        raise CheckpointError(f"{path} asks to run the folder's own Python code (auto_map: {sorted(data['auto_map'])}); "
                              "vit2cbsa never runs code from a checkpoint")
    if model_type == HF_MODEL_TYPE or not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        raise CheckpointError(f"{path} names model_type {model_type!r}, which this transformers does not know; "
                              "vit2cbsa only rebuilds transformers' own architectures")
    try:
        return CONFIG_MAPPING[model_type].from_dict(data)
    except Exception as e:
        raise CheckpointError(f"{path} is not a valid {model_type} config: {_one_line(e)}") from e


def _set_class_names(spec: BaseModelSpec, names: Sequence[str]) -> None:
    """Record ``names`` as the class names of the model ``spec`` describes (validated against its head)."""
    names = list(names)
    if not all(isinstance(n, str) for n in names):
        raise TypeError("vit2cbsa: class_names must be strings")
    if spec.library == "timm":
        expected = spec.model_kwargs.get("num_classes", (spec.pretrained_cfg or {}).get("num_classes"))
    else:
        expected = spec.hf_config.num_labels if spec.task == "image-classification" else None
    if expected is not None and len(names) != expected:
        raise ValueError(f"vit2cbsa: {len(names)} class_names for a model with {expected} classes")
    if spec.library == "timm":
        spec.pretrained_cfg = {**(spec.pretrained_cfg or {}), "label_names": names}
    else:
        spec.hf_config.id2label = dict(enumerate(names))
        spec.hf_config.label2id = {n: i for i, n in enumerate(names)}


def _hf_config_json(spec: BaseModelSpec, model: nn.Module) -> Dict[str, Any]:
    """The ``config.json`` of a converted transformers model: the base config wrapped in model_type "vit2cbsa"."""
    import transformers

    task = spec.task
    base = json.loads(spec.hf_config.to_json_string(use_diff=False))
    base["architectures"] = [type(model).__name__]
    wrapper = "Vit2CBSAForImageClassification" if task == "image-classification" else "Vit2CBSAModel"
    return {"model_type": HF_MODEL_TYPE, "architectures": [wrapper], "base_config": base,
            "transformers_version": transformers.__version__,
            "loading": "a model converted to CBSA attention: load it with vit2cbsa.from_pretrained(folder), or "
                       "`import vit2cbsa` first and then transformers' Auto classes or pipeline()"}


def _import_class(path: str, allowed_prefix: str) -> type:
    module, _, name = path.rpartition(".")
    if not module.startswith(allowed_prefix):
        raise CheckpointError(f"refusing to import {path!r}: only {allowed_prefix}* classes can be rebuilt")
    try:
        obj = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise CheckpointError(f"cannot import {path!r}: {_one_line(e)}") from e
    if not (isinstance(obj, type) and issubclass(obj, nn.Module)):
        raise CheckpointError(f"{path!r} is not a torch.nn.Module class")
    return obj


def _jsonable(value: Any, what: str) -> Any:
    """``value`` with tuples turned into lists; a clear error if it is not JSON-serialisable."""
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError) as e:
        raise ValueError(f"vit2cbsa: {what} is not JSON-serialisable ({e}); pass serialisable "
                         "model_kwargs=... (timm accepts layer names as strings, e.g. norm_layer='rmsnorm')") from e


def _infer_timm_vit_kwargs(model: nn.Module) -> Dict[str, Any]:
    """Constructor arguments of a timm ``VisionTransformer`` read back from its modules."""
    from timm.models.vision_transformer import VisionTransformer

    if not isinstance(model, VisionTransformer):
        raise ValueError(f"vit2cbsa: cannot infer the constructor arguments of timm {type(model).__name__}; "
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
    if _is_hf(model):
        if model_kwargs:
            raise ValueError("vit2cbsa: model_kwargs is for timm models; transformers models are rebuilt from their config")
        task = "image-classification" if "ForImageClassification" in type(model).__name__ else "image-feature-extraction"
        return BaseModelSpec("transformers", type(model).__name__, task=task, hf_config=copy.deepcopy(model.config),
                             attn_implementation=getattr(model.config, "_attn_implementation", None))
    if not type(model).__module__.startswith("timm."):
        raise TypeError(f"vit2cbsa: can save timm and transformers models, not {type(model).__module__}.{type(model).__name__}")
    import timm
    from timm.models import get_model_args

    stored: Optional[BaseModelSpec] = getattr(model, _BASE_ATTR, None)
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


def _shapes(model: nn.Module) -> Dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _convert_like(model: nn.Module, info: ConversionInfo) -> nn.Module:
    return convert(model, **info.options())


def _verify_rebuild(spec: BaseModelSpec, model: nn.Module, info: ConversionInfo) -> None:
    """Rebuild ``spec`` on the meta device, convert it like ``model`` and check it is the same network."""
    hint = ("; pass save_pretrained(..., model_kwargs={...}) with the model's constructor arguments "
            f"(tried: {spec.model_kwargs})" if spec.library == "timm" else "")
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the conversion's own warnings were given when the model was converted
            rebuilt = _convert_like(spec.build(), info)
    except Exception as e:
        raise ValueError(f"vit2cbsa: cannot rebuild this model from {spec.describe()}: {_one_line(e)}{hint}") from e
    problems = tensor_problems(expected_tensors(model), _shapes(rebuilt))
    if not problems:
        for mine, theirs in zip(repr(model).splitlines(), repr(rebuilt).splitlines()):
            if mine != theirs:
                problems = [f"module `{mine.strip()}` would be rebuilt as `{theirs.strip()}`"]
                break
    if problems:
        raise ValueError(f"vit2cbsa: {spec.describe()} does not rebuild this model exactly: "
                         + "; ".join(problems) + hint)


# --------------------------------------------------------------------------- saving


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _model_dtype(model: nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


_HOST = socket.gethostname()


def _tmp_prefix(target: Path, kind: str) -> str:
    return f".{target.name}.{kind}-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_temporaries(target: Path, max_age_s: float = 3600.0) -> None:
    """Remove what killed saves to ``target`` left next to it: ``.NAME.tmp-HOST-PID-*`` folders of a dead
    process on this host, and older-style ``.NAME.tmp-*`` / ``.NAME.old-*`` folders untouched for an hour."""
    if not target.parent.is_dir():
        return
    for kind in ("tmp", "old"):
        prefix = _tmp_prefix(target, kind)
        for entry in target.parent.iterdir():
            if not (entry.name.startswith(prefix) and entry.is_dir() and not entry.is_symlink()):
                continue
            host, _, rest = entry.name[len(prefix):].partition("--")
            pid = rest.partition("--")[0]
            if host == _HOST and pid.isdigit():
                stale = not _pid_alive(int(pid))
            else:
                stale = time.time() - entry.stat().st_mtime > max_age_s
            if stale:
                shutil.rmtree(entry, ignore_errors=True)


def _replace_dir(tmp: Path, target: Path) -> None:
    """Move the finished ``tmp`` folder to ``target``, replacing a previous save there."""
    if not target.exists():
        os.rename(tmp, target)
        return
    old = target.with_name(f"{_tmp_prefix(target, 'old')}{_HOST}--{os.getpid()}--{uuid.uuid4().hex[:8]}")
    os.rename(target, old)
    os.rename(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


def _conversion_json(info: ConversionInfo) -> Dict[str, Any]:
    return {
        "variant": info.variant,
        "num_representatives": list(info.num_representatives),
        "broadcast": info.broadcast,
        "extra_representatives": info.extra_representatives,
        "prefix_broadcast": info.prefix_broadcast,
        "converted_layers": info.converted_indices,
        "num_attention_layers": info.num_attention_layers,
        "layer_names": [layer.name for layer in info.converted],
    }


def save_pretrained(
    model: nn.Module,
    save_directory: PathLike,
    *,
    model_kwargs: Optional[Mapping[str, Any]] = None,
    base_model: Optional[str] = None,
    image_processor: Any = None,
    max_shard_size: Union[int, str] = "5GB",
    class_names: Optional[Sequence[str]] = None,
) -> Path:
    """Save a converted model as safetensors plus ``vit2cbsa_config.json``, atomically.

    Args:
        model: a model returned by :func:`vit2cbsa.convert` (timm or transformers), also under
            ``torch.compile`` (the uncompiled module is saved).
        save_directory: the folder to create. An existing folder is replaced only if it is
            empty or an earlier vit2cbsa save; anything else raises ``FileExistsError``.
        model_kwargs: timm only: constructor kwargs that rebuild the architecture with
            ``timm.create_model(name, pretrained=False, **model_kwargs)`` (or the class itself
            for a model built without the registry). By default they are taken from what timm
            recorded, or read back from the modules; either way they are verified first.
        base_model: the Hub id of the original pretrained model, for the model card
            (default: timm's ``pretrained_cfg["hf_hub_id"]`` or the transformers name, if any).
        image_processor: optional (transformers) image processor saved next to the model.
        max_shard_size: weights above this size are split into shards plus an index file.
        class_names: the name of each output class, kept through loading (timm:
            ``pretrained_cfg["label_names"]``, transformers: ``config.id2label``). Default: the
            model's own (``pretrained_cfg["label_names"]`` or ``id2label``).

    Returns:
        The path of the saved folder.

    Raises:
        ValueError if the model is not converted or its architecture cannot be rebuilt exactly
        from what would be saved (nothing is written then).
    """
    model = uncompiled(model)
    if hasattr(model, "peft_config") and hasattr(model, "merge_and_unload"):
        raise TypeError(f"vit2cbsa: this is a PEFT {type(model).__name__} (LoRA adapters on top of the model): "
                        "save the merged model with save_pretrained(model.merge_and_unload(), ...), or only the "
                        "adapters with PEFT's model.save_pretrained(folder)")
    info = conversion_info(model)
    if info is None:
        raise ValueError("vit2cbsa: this model is not converted; call vit2cbsa.convert(model, ...) first")
    spec = base_spec(model, model_kwargs)
    if class_names is not None:
        _set_class_names(spec, class_names)
    _verify_rebuild(spec, model, info)
    base_model = base_model or getattr(model, _BASE_MODEL_ATTR, None)
    if base_model is None:
        if spec.library == "timm":
            base_model = (spec.pretrained_cfg or {}).get("hf_hub_id")
        else:
            name = getattr(model.config, "_name_or_path", "") or ""
            base_model = name if name.count("/") == 1 and not os.path.exists(name) else None

    target = Path(save_directory).expanduser().absolute()
    if target.exists() and not (target.is_dir() and (not any(target.iterdir()) or (target / CONFIG_NAME).is_file())):
        raise FileExistsError(f"vit2cbsa: {target} exists and is not a vit2cbsa folder; refusing to overwrite it")
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(target)
    tmp = Path(tempfile.mkdtemp(prefix=f"{_tmp_prefix(target, 'tmp')}{_HOST}--{os.getpid()}--", dir=target.parent))
    try:
        from huggingface_hub import split_torch_state_dict_into_shards
        from safetensors.torch import save_file

        if spec.library == "transformers":
            (tmp / "config.json").write_text(json.dumps(_hf_config_json(spec, model), indent=2) + "\n")
        if image_processor is not None:
            image_processor.save_pretrained(str(tmp))
        conversion = _conversion_json(info)
        dtype = dtype_name(_model_dtype(model))
        binding = make_binding(FORMAT_VERSION, conversion, spec.to_json(), dtype,
                               {p.name: _sha256(p) for p in sorted(tmp.iterdir()) if p.is_file()})
        state = {k: v.detach() for k, v in model.state_dict().items()}
        pointers: Dict[Any, List[str]] = {}
        for k, v in state.items():
            if v.numel():
                pointers.setdefault((v.untyped_storage().data_ptr(), v.device), []).append(k)
        shared = sorted(k for names in pointers.values() if len(names) > 1 for k in names)
        if shared:
            raise ValueError("vit2cbsa: tensors sharing memory cannot be saved: " + ", ".join(shared))
        # every shard carries the binding (huggingface_hub's writer puts metadata in the index only when sharded)
        split = split_torch_state_dict_into_shards(state, max_shard_size=max_shard_size)
        for filename, names in split.filename_to_tensors.items():
            save_file({k: state[k].contiguous() for k in names}, str(tmp / filename),
                      metadata={"format": "pt", BINDING_KEY: canonical(binding)})
        if split.is_sharded:
            index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        weights = sorted(split.filename_to_tensors)
        files = sorted(p.name for p in tmp.iterdir() if p.is_file())
        config = {
            "format": "vit2cbsa",
            "format_version": FORMAT_VERSION,
            "library_version": __version__,
            "conversion": conversion,
            "base": spec.to_json(),
            "base_model": base_model,
            "dtype": dtype,
            "weights": weights,
            "files": {name: {"size": (tmp / name).stat().st_size, "sha256": _sha256(tmp / name)} for name in files},
        }
        with open(tmp / CONFIG_NAME, "w") as f:  # the marker: written last
            json.dump(config, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        _replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


# --------------------------------------------------------------------------- loading


def _resolve_folder(path_or_repo_id: PathLike, revision: Optional[str], cache_dir: Optional[PathLike],
                    token: Optional[str], local_files_only: bool) -> Path:
    path = Path(path_or_repo_id).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{path} is a file; expected a folder written by vit2cbsa.save_pretrained")
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    repo_id = str(path_or_repo_id)
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise FileNotFoundError(f"vit2cbsa: {repo_id} is neither a local folder nor a Hugging Face Hub repo id") from None
    try:
        return Path(snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, token=token,
                                      local_files_only=local_files_only, allow_patterns=["*.json", "*.safetensors"]))
    except Exception as e:
        raise FileNotFoundError(f"vit2cbsa: cannot get {repo_id!r} from the Hugging Face Hub "
                                f"(not a local folder either): {_one_line(e)}") from e


def read_config(folder: PathLike) -> Dict[str, Any]:
    """Read and validate the ``vit2cbsa_config.json`` of a saved folder."""
    path = Path(folder) / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(
            f"{folder} is not a complete vit2cbsa folder: it has no {CONFIG_NAME} (an interrupted save, or a plain "
            "timm/transformers checkpoint: load that with timm/transformers and call vit2cbsa.convert)")
    try:
        config = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON (truncated or corrupt): {_one_line(e)}") from e
    if not isinstance(config, dict) or config.get("format") != "vit2cbsa":
        raise CheckpointError(f"{path} is not a vit2cbsa config")
    version = config.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise CheckpointError(f"{path} is malformed: format_version must be a positive integer, got {version!r}")
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{path} has format version {version} (written by vit2cbsa "
                              f"{config.get('library_version', '?')}); this vit2cbsa ({__version__}) reads format "
                              f"versions up to {FORMAT_VERSION}: upgrade vit2cbsa")
    try:
        conv = config["conversion"]
        variant, broadcast, grid = conv["variant"], conv["broadcast"], conv["num_representatives"]
        layers = conv["converted_layers"]
        files, weights = config["files"], config["weights"]
        config["base"]["library"]
        plain = all(isinstance(n, str) and n == Path(n).name and not n.startswith(".") for n in [*files, *weights])
        sized = all(isinstance(m["size"], int) and isinstance(m["sha256"], str) for m in files.values())
    except (KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{path} is malformed: missing or invalid entry {e}") from e
    if not (plain and sized):
        raise CheckpointError(f"{path} is malformed: its file list must hold plain file names with size and sha256")
    if variant not in VARIANTS:
        raise CheckpointError(f"{path} names an unknown attention variant {variant!r}; this vit2cbsa "
                              f"({__version__}) knows {', '.join(sorted(VARIANTS))}")
    if broadcast not in BROADCASTS:
        raise CheckpointError(f"{path} names an unknown broadcast {broadcast!r}; known: {', '.join(BROADCASTS)}")
    for key, known in (("extra_representatives", EXTRA_REPRESENTATIVES), ("prefix_broadcast", PREFIX_BROADCASTS)):
        if conv.get(key, SAVED_DEFAULTS[key]) not in known:
            raise CheckpointError(f"{path} names an unknown {key} {conv[key]!r}; known: {', '.join(known)}")
    if not (isinstance(grid, list) and len(grid) == 2 and all(isinstance(v, int) and v > 0 for v in grid)):
        raise CheckpointError(f"{path}: num_representatives must be [h, w], got {grid!r}")
    if not (isinstance(layers, list) and layers and all(isinstance(i, int) for i in layers)):
        raise CheckpointError(f"{path}: converted_layers must be a list of layer indices, got {layers!r}")
    config.setdefault("dtype", "float32")  # folders of format 1 before the entry existed
    parse_dtype(config["dtype"], str(path))
    return config


def _check_files(folder: Path, config: Mapping[str, Any]) -> None:
    for name, meta in config["files"].items():
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"{folder} is incomplete: {name} is missing")
        size = path.stat().st_size
        if size != meta["size"]:
            raise CheckpointError(f"{path} is truncated or corrupt: {size} bytes, expected {meta['size']}")
        if _sha256(path) != meta["sha256"]:
            raise CheckpointError(f"{path} is corrupt or was modified after saving (sha256 mismatch)")
    unlisted = [w for w in config["weights"] if w not in config["files"]]
    if unlisted or not config["weights"]:
        raise CheckpointError(f"{folder / CONFIG_NAME} lists no checksummed weight files")


def _build(spec: BaseModelSpec, config: Mapping[str, Any], folder: Path) -> nn.Module:
    """The base architecture of ``spec`` in the config's dtype, converted with its saved options."""
    try:
        model = spec.build()
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"{folder}: cannot rebuild the base model {spec.describe()}: {_one_line(e)}") from e
    model.to(parse_dtype(config["dtype"], str(folder / CONFIG_NAME)))
    try:
        return convert(model, **saved_options(config["conversion"]))
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{folder}: the saved conversion does not apply to {spec.describe()}: {_one_line(e)}") from e


def from_pretrained(
    path_or_repo_id: PathLike,
    *,
    revision: Optional[str] = None,
    cache_dir: Optional[PathLike] = None,
    token: Optional[str] = None,
    local_files_only: bool = False,
    device: Union[str, torch.device] = "cpu",
) -> nn.Module:
    """Load a converted model saved by :func:`save_pretrained`, from a folder or a Hub repo.

    Nothing from the folder is executed and nothing is allocated before it is checked: every file
    against its recorded size and sha256, the config against the binding stored in the weights
    (an edited config is refused), and every tensor's name, shape and dtype against the base
    architecture rebuilt and converted on the meta device. Only then is the model built for real
    (without downloading its original weights) and the weights copied in; each floating tensor
    keeps the dtype it was saved in. Hub repos go through ``huggingface_hub.snapshot_download``
    (so the Hub cache, ``HF_HUB_OFFLINE`` and tokens work as usual).

    Args:
        path_or_repo_id: a local folder, or a Hub model repo id such as ``"user/vit-cbsa"``.
        revision, cache_dir, token, local_files_only: passed to ``snapshot_download``.
        device: where to put the model.

    Returns:
        The converted model in eval mode, with ``model.vit2cbsa_info``.

    Raises:
        CheckpointError (a ``ValueError``) for a missing, truncated or corrupt file, an unknown
        variant, or weights that do not match; FileNotFoundError if the folder or repo cannot be found.
    """
    from safetensors.torch import load_file

    folder = _resolve_folder(path_or_repo_id, revision, cache_dir, token, local_files_only)
    config = read_config(folder)
    _check_files(folder, config)
    header = read_headers(folder, config["weights"])
    if config["format_version"] >= 3:
        check_binding(header, config, folder)
    else:
        warnings.warn(f"{folder} was saved by an older vit2cbsa (format {config['format_version']}): its config is not "
                      "bound to its weights; save it again to protect it against edits", stacklevel=2)
    spec = BaseModelSpec.from_json(config["base"], folder)
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # given once, by the real build below
        problems = tensor_problems(expected_tensors(_build(spec, config, folder)), header.shapes, header.codes)
    if problems:
        raise CheckpointError(f"{folder}: the weights do not match the model described by {CONFIG_NAME} "
                              f"(a checkpoint of another architecture?): " + "; ".join(problems))
    model = _build(spec, config, folder)
    apply_saved_dtypes(model, header)
    state: Dict[str, torch.Tensor] = {}
    for name in config["weights"]:
        try:
            state.update(load_file(str(folder / name)))
        except Exception as e:
            raise CheckpointError(f"{folder / name} cannot be read: {_one_line(e)}") from e
    model.load_state_dict(state, strict=True)
    object.__setattr__(model, _BASE_ATTR, spec)
    object.__setattr__(model, _BASE_MODEL_ATTR, config.get("base_model"))
    return model.to(device).eval()


# --------------------------------------------------------------------------- publishing


def push_to_hub(
    model: Union[nn.Module, PathLike],
    repo_id: str,
    *,
    metrics: Optional[Mapping[str, float]] = None,
    dataset: Optional[str] = None,
    license: Optional[str] = None,
    private: Optional[bool] = None,
    token: Optional[str] = None,
    revision: Optional[str] = None,
    commit_message: Optional[str] = None,
    create_pr: bool = False,
    base_model: Optional[str] = None,
    model_kwargs: Optional[Mapping[str, Any]] = None,
    image_processor: Any = None,
    max_shard_size: Union[int, str] = "5GB",
    class_names: Optional[Sequence[str]] = None,
) -> Any:
    """Upload a converted model (or a folder saved by :func:`save_pretrained`) with a model card.

    The folder is staged in a temporary directory with a generated ``README.md`` (Hub metadata,
    conversion options, FLOPs and parameters before/after at the model's input size, ``metrics``
    when given, how to load it, the CBSA citation) and uploaded with
    ``HfApi.create_repo(exist_ok=True)`` and ``HfApi.upload_folder``.

    Args:
        model: a converted model (also under ``torch.compile``), or the path of a saved folder (it is
            loaded first, as a check).
        repo_id: the Hub model repo, e.g. ``"user/vit-base-cbsa"``.
        metrics: fine-tuning results for the card, e.g. ``{"top1": 80.1}``.
        dataset: the dataset ``metrics`` were measured on (also puts them in ``model-index``).
        license: license identifier for the card metadata.
        private, token, revision, commit_message, create_pr: passed to ``huggingface_hub``.
        base_model, model_kwargs, image_processor, max_shard_size, class_names: as in :func:`save_pretrained`.

    Returns:
        The ``huggingface_hub.CommitInfo`` of the upload.
    """
    from huggingface_hub import HfApi

    from .model_card import compare_costs, render_model_card

    with tempfile.TemporaryDirectory(prefix="vit2cbsa-push-") as tmp:
        stage = Path(tmp) / "repo"
        if isinstance(model, nn.Module):
            model = uncompiled(model)
            save_pretrained(model, stage, model_kwargs=model_kwargs, base_model=base_model, class_names=class_names,
                            image_processor=image_processor, max_shard_size=max_shard_size)
        else:
            folder = Path(model)
            model = from_pretrained(folder, local_files_only=True)
            shutil.copytree(folder, stage, ignore=shutil.ignore_patterns(".*"))
        config = read_config(stage)
        base = BaseModelSpec.from_json(config["base"], stage).build()
        cost = compare_costs(base, model)
        card = render_model_card(config, cost, repo_id=repo_id, metrics=metrics, dataset=dataset, license=license)
        (stage / "README.md").write_text(card)
        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        return api.upload_folder(
            repo_id=repo_id,
            folder_path=str(stage),
            repo_type="model",
            revision=revision,
            create_pr=create_pr,
            commit_message=commit_message or f"Upload {config['conversion']['variant']} model converted with vit2cbsa",
        )


__all__ = ["CONFIG_NAME", "BaseModelSpec", "CheckpointError", "base_spec", "from_pretrained", "push_to_hub",
           "read_config", "save_pretrained"]
