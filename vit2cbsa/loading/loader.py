"""Building the model MODEL names: :func:`load` returns a :class:`LoadedModel`.

One builder per kind of :class:`~vit2cbsa.loading.sources.Source`: the embedded teacher, a vit2cbsa folder
(through :func:`vit2cbsa.hub.from_pretrained`, or its base architecture with random weights), a timm model
(``timm.create_model``) and a transformers model (its ``config.architectures`` class or an Auto class, always
with ``trust_remote_code=False``). With ``pretrained=False`` the same architecture is built with random
weights and no weights are downloaded (what ``vit2cbsa inspect`` needs); ``fallback_to_random`` builds it so
when the pretrained weights cannot be had, with a warning. ``num_classes`` replaces a classifier head with
another class count. Errors are :class:`~vit2cbsa.errors.LoadError` with a one-line message.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

from torch import nn

from ..config import ConversionConfig
from ..errors import LoadError, one_line
from .metadata import class_names_of, data_config, image_processor, teacher_processor
from .sources import Source, check_no_remote_code, read_json, resolve

Size = Union[int, Tuple[int, int], Sequence[int]]


@dataclass
class LoadedModel:
    """What :func:`load` returns.

    ``library``: ``"timm"`` (timm models and the teacher) or ``"transformers"`` -- of the base model, for a
    vit2cbsa folder too. ``data_config``: ``{"input_size": [C, H, W], "mean": [...], "std": [...]}`` plus, for
    timm, its ``interpolation`` / ``crop_pct`` (timm's data-config keys; what
    :func:`vit2cbsa.analysis.images.input_config` reads). ``image_processor``: a transformers image processor
    saved with the model, if any (for the teacher, one made from its mean/std, to save next to a converted
    teacher). ``class_names``: index -> name where known. ``base_model``: the Hub id of the original weights,
    for a model card. ``pretrained``: False when the weights are random. ``conversion``: for a vit2cbsa folder,
    the saved :class:`~vit2cbsa.config.ConversionConfig` (with ``pretrained=False`` the model is then the unconverted
    base architecture, to convert with them). ``config``: the teacher's ``config.json``. ``head_reset``: the
    classifier was replaced (``num_classes``); ``head_names``: the classifier modules.
    """

    model: nn.Module
    library: str
    source: Source
    data_config: Dict[str, Any] = field(default_factory=dict)
    image_processor: Any = None
    class_names: Optional[List[str]] = None
    base_model: Optional[str] = None
    pretrained: bool = True
    conversion: Optional[ConversionConfig] = None
    config: Optional[Dict[str, Any]] = None
    head_reset: bool = False

    @property
    def converted(self) -> bool:
        """Whether MODEL is a vit2cbsa folder (already converted)."""
        return self.source.kind == "vit2cbsa"

    @property
    def head_names(self) -> List[str]:
        """The classifier modules (timm ``pretrained_cfg["classifier"]``, transformers ``*classifier*`` children)."""
        if self.library == "transformers":
            return [n for n, _ in self.model.named_children() if "classifier" in n]
        heads = (getattr(self.model, "pretrained_cfg", None) or {}).get("classifier", "head")
        return [heads] if isinstance(heads, str) else list(heads)


def _size(img_size: Optional[Size]) -> Optional[Tuple[int, int]]:
    if img_size is None:
        return None
    if isinstance(img_size, int):
        return img_size, img_size
    h, w = tuple(img_size)[-2:]
    return int(h), int(w)


def load(model: Union[str, Path, Source], *, pretrained: bool = True, fallback_to_random: bool = False,
         img_size: Optional[Size] = None, model_kwargs: Optional[Dict[str, Any]] = None,
         checkpoint_path: Optional[str] = None, task: Optional[str] = None,
         num_classes: Optional[int] = None, class_names: Optional[Sequence[str]] = None,
         warn: Optional[Callable[[str], None]] = None) -> LoadedModel:
    """Resolve and load MODEL (module docstring).

    Args:
        model: a MODEL string (or a :class:`Source` from :func:`resolve`).
        pretrained: load the pretrained weights (default); ``False`` builds the same architecture with random
            weights and downloads no weights (a Hub repo's config files only).
        fallback_to_random: when the pretrained weights of a timm name or transformers repo cannot be loaded
            (offline, not cached), build it with random weights instead and call ``warn`` with why.
        img_size: timm models: build for this input size (timm resamples the pretrained position embedding);
            the teacher and a vit2cbsa folder of a timm model with ``pretrained=False`` only (the trained teacher
            runs at any size as it is). transformers models keep their configured size (they interpolate at
            run time).
        model_kwargs: extra arguments of ``timm.create_model`` (timm), of ``from_pretrained`` (transformers, e.g.
            ``num_labels=10, ignore_mismatched_sizes=True``) or of the teacher's ``VisionTransformer``.
        checkpoint_path: timm only: weights from this local file (``pretrained=False, checkpoint_path=...``).
        task: ``"image-classification"`` loads transformers models with ``AutoModelForImageClassification``
            (a classifier head, new if the checkpoint has none); default: the class in ``config.architectures``.
        num_classes: a classifier with this many classes: a head with another count is replaced by a new one
            (timm ``reset_classifier``; transformers ``num_labels=..., ignore_mismatched_sizes=True`` and
            ``task="image-classification"``), and ``head_reset`` says so. Not for vit2cbsa folders.
        class_names: the names of the new head's classes (transformers ``id2label``; ``class_names``).
        warn: called with one-line warnings (default: printed to stderr).

    Raises:
        LoadError (a ``ValueError``) with a one-line message.
    """
    source = resolve(model)
    warn = warn or (lambda text: print(f"vit2cbsa: warning: {text}", file=sys.stderr))
    size = _size(img_size)
    kwargs = dict(model_kwargs or {})
    if checkpoint_path is not None and source.library != "timm":
        raise LoadError(f"checkpoint_path is for timm models; {source.location} is a {source.library} model "
                        "that loads from its folder")
    if class_names is not None and num_classes is not None and len(class_names) != num_classes:
        raise LoadError(f"{len(class_names)} class names for {num_classes} classes")
    if source.kind == "teacher":
        loaded = _load_teacher(source, pretrained, size, kwargs)
    elif source.kind == "vit2cbsa":
        loaded = _load_vit2cbsa(source, pretrained, size)
    elif source.library == "timm":
        loaded = _load_timm(source, pretrained, fallback_to_random, size, kwargs, checkpoint_path, warn)
    else:
        if num_classes is not None:
            task = task or "image-classification"
        loaded = _load_transformers(source, pretrained, fallback_to_random, kwargs, task, warn, num_classes,
                                    class_names)
    if num_classes is not None and loaded.library == "timm" and getattr(loaded.model, "num_classes", None) != num_classes:
        if loaded.converted:
            raise LoadError(f"{source.location} is a converted folder with {loaded.model.num_classes} classes; "
                            f"its head cannot be replaced here -- start from the original model for {num_classes}")
        loaded.model.reset_classifier(num_classes)
        loaded.head_reset = True
        loaded.class_names = list(class_names) if class_names is not None else None
    return loaded


# ---- the teacher


def _load_teacher(source: Source, pretrained: bool, size: Optional[Tuple[int, int]], kwargs: dict) -> LoadedModel:
    from ..zoo import TEACHER_DIR, load_cifar10_teacher

    cfg_path = TEACHER_DIR / "config.json"
    if pretrained:
        unknown = sorted(set(kwargs) - {"dynamic_img_size"})
        if unknown or size is not None:
            raise LoadError(f"the embedded teacher loads as trained (it runs at any input size); "
                            f"{', '.join(unknown or ['img_size'])} cannot be changed -- only dynamic_img_size")
        try:
            model, config = load_cifar10_teacher(**kwargs)
        except FileNotFoundError as e:
            raise LoadError(one_line(e)) from e
    else:
        if not cfg_path.is_file():
            raise LoadError(f"the embedded teacher's config is missing from {TEACHER_DIR}; train it with "
                            "`python benchmarks/train_teacher.py`")
        from timm.models.vision_transformer import VisionTransformer

        config = read_json(cfg_path)
        mk = {**config["model_kwargs"], "dynamic_img_size": True, **kwargs}
        if size is not None:
            mk["img_size"] = size
        model = VisionTransformer(**mk).eval()
    data = {"input_size": [3, *(size or tuple(config.get("input_size", [3, 32, 32])[-2:]))],
            "mean": list(config["mean"]), "std": list(config["std"]), "interpolation": "bilinear", "crop_pct": 1.0}
    return LoadedModel(model, "timm", source, data, teacher_processor(config), config.get("class_names"),
                       None, pretrained, None, config)



# ---- vit2cbsa folders


def _load_vit2cbsa(source: Source, pretrained: bool, size: Optional[Tuple[int, int]]) -> LoadedModel:
    from ..info import saved_config
    from ..hub import BaseModelSpec, from_pretrained, read_config

    folder = source.folder
    config = read_config(folder)
    conversion = saved_config(config["conversion"])
    spec_json = config["base"]
    library = spec_json.get("library", "timm")
    if pretrained:
        model = from_pretrained(source.location)
    else:
        spec = BaseModelSpec.from_json(spec_json, folder)
        if spec.library == "timm" and size is not None:
            spec.model_kwargs.update({"img_size": list(size)})
        model = spec.build().eval()
    processor = image_processor(folder)
    data = data_config(model, processor)
    return LoadedModel(model, library, source, data, processor, class_names_of(model), config.get("base_model"),
                       pretrained, conversion)


# ---- timm


def _load_timm(source: Source, pretrained: bool, fallback: bool, size: Optional[Tuple[int, int]], kwargs: dict,
               checkpoint_path: Optional[str], warn: Callable[[str], None]) -> LoadedModel:
    import timm

    name = source.timm_name()
    if size is not None:
        kwargs["img_size"] = size
    if checkpoint_path is not None:
        if not Path(checkpoint_path).expanduser().is_file():
            raise LoadError(f"checkpoint file {checkpoint_path!r} does not exist")
        kwargs["checkpoint_path"] = str(Path(checkpoint_path).expanduser())
    loaded_weights = pretrained or checkpoint_path is not None
    try:
        model = timm.create_model(name, pretrained=pretrained and checkpoint_path is None, **kwargs)
    except Exception as e:
        if not pretrained or checkpoint_path is not None:
            where = f" from {checkpoint_path}" if checkpoint_path else ""
            raise LoadError(f"cannot build timm model {name!r}{where}: {one_line(e)}") from e
        if not fallback:
            raise LoadError(f"cannot load the pretrained weights of timm model {name!r} ({one_line(e)}); without "
                            "network access, pass a local path instead: a timm checkpoint folder, a transformers "
                            "model folder or a vit2cbsa folder") from e
        warn(f"cannot load the pretrained weights of {name!r} ({one_line(e, 160)}); using RANDOM weights "
             "(pretrained=False) -- the model is untrained")
        try:
            model = timm.create_model(name, pretrained=False, **kwargs)
        except Exception as e2:
            raise LoadError(f"cannot build timm model {name!r}: {one_line(e2)}") from e2
        loaded_weights = False
    model.eval()
    base_model = (getattr(model, "pretrained_cfg", None) or {}).get("hf_hub_id") if loaded_weights else None
    return LoadedModel(model, "timm", source, data_config(model, None), None, class_names_of(model), base_model,
                       loaded_weights)


# ---- transformers


def _hf_class(config: Any, task: Optional[str]) -> type:
    import transformers

    if task == "image-classification":
        return transformers.AutoModelForImageClassification
    if task is not None:
        raise LoadError(f"unknown task {task!r}; the one vit2cbsa knows is 'image-classification'")
    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, name, None)
        if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel):
            return cls
    return transformers.AutoModel


def _load_transformers(source: Source, pretrained: bool, fallback: bool, kwargs: dict, task: Optional[str],
                       warn: Callable[[str], None], num_classes: Optional[int] = None,
                       class_names: Optional[Sequence[str]] = None) -> LoadedModel:
    from transformers import AutoConfig

    location = source.location
    if source.folder is not None:  # a local folder, or the Hub snapshot of the repo's config files
        check_no_remote_code(source.folder, location if source.is_hub else None)
    try:
        config = AutoConfig.from_pretrained(str(source.folder or location), trust_remote_code=False)
    except Exception as e:
        raise LoadError(f"cannot read the config of transformers model {location!r}: {one_line(e)}") from e
    cls = _hf_class(config, task)
    reset = num_classes is not None and config.num_labels != num_classes
    if reset:
        kwargs = {**kwargs, "num_labels": num_classes, "ignore_mismatched_sizes": True}
        if class_names is not None:
            kwargs.update(id2label=dict(enumerate(map(str, class_names))),
                          label2id={str(c): i for i, c in enumerate(class_names)})
    model = None
    if pretrained:
        try:
            model = cls.from_pretrained(location, trust_remote_code=False, **kwargs)
        except Exception as e:
            if not fallback:
                raise LoadError(f"cannot load transformers model {location!r}: {one_line(e)}") from e
            warn(f"cannot load the pretrained weights of {location!r} ({one_line(e, 160)}); using RANDOM weights "
                 "(built from its config) -- the model is untrained")
    if model is None:
        for key in ("num_labels", "id2label", "label2id"):
            if key in kwargs:
                setattr(config, key, kwargs[key])
        try:
            if cls.__name__.startswith("Auto"):
                model = cls.from_config(config, trust_remote_code=False)
            else:
                model = cls._from_config(config)
        except Exception as e:
            raise LoadError(f"cannot build transformers model {location!r} from its config: {one_line(e)}") from e
        pretrained = False
    model.eval()
    processor = image_processor(source.folder) if source.folder is not None else None
    base_model = location if source.is_hub and pretrained else None
    names = class_names_of(model)
    if reset and class_names is None:
        names = None
    return LoadedModel(model, "transformers", source, data_config(model, processor), processor,
                       names, base_model, pretrained, head_reset=reset)
