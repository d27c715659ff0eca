"""One resolver and loader for the MODEL argument of every vit2cbsa command (and of Python callers).

MODEL is resolved, in this order, by :func:`resolve`:

``cifar10-teacher``
    the embedded CIFAR-10 teacher (``vit2cbsa/assets/cifar10_vit``, :func:`vit2cbsa.zoo.load_cifar10_teacher`);
``timm:NAME`` / ``hf:ID_OR_FOLDER``
    force the library (the prefixes ``examples/finetune.py`` accepts);
a local folder
    a vit2cbsa folder (``vit2cbsa_config.json``), a transformers model folder (``config.json`` with
    ``model_type``) or a timm checkpoint folder (``config.json`` with ``architecture``);
a timm name
    ``vit_base_patch16_224``, with a pretrained tag (``.augreg_in21k``), ``hf-hub:timm/...``, ``local-dir:PATH``;
a Hugging Face Hub repo id
    ``user/name``, classified from its config files alone (downloaded, or read from the cache).

:func:`load` then builds the model -- with its pretrained weights, or, with ``pretrained=False``, the same
architecture with random weights (what ``vit2cbsa inspect`` needs) -- and returns a :class:`LoadedModel`:
the model, its library, where it came from, how it expects its input (``data_config``: input size, mean,
std), its image processor (transformers) and its class names where known.

transformers is always called with ``trust_remote_code=False``: a ``config.json`` or
``preprocessor_config.json`` with an ``auto_map``, or a ``model_type`` transformers does not know, is refused
with one line (:class:`LoadError`) before transformers is asked anything, so no code from a model folder
or repo is ever run and nothing is ever read from stdin. Errors are :class:`LoadError` (a ``ValueError``)
with a one-line message saying what was wrong and what to do.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

from torch import nn

from .errors import LoadError, one_line

TEACHER = "cifar10-teacher"

#: the source kinds :func:`resolve` returns
KINDS = ("teacher", "vit2cbsa", "transformers", "timm-dir", "timm", "hub-timm")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Size = Union[int, Tuple[int, int], Sequence[int]]


# --------------------------------------------------------------------------- resolving


@dataclass
class Source:
    """What MODEL names.

    ``kind``: ``teacher`` (the embedded CIFAR-10 teacher), ``vit2cbsa`` (a converted folder, local or on the
    Hub), ``transformers`` (a local folder or a Hub repo id), ``timm-dir`` (a local timm checkpoint folder),
    ``timm`` (a timm name, ``hf-hub:``/``local-dir:`` included) or ``hub-timm`` (a Hub repo holding a timm
    checkpoint). ``location`` is the folder, name or repo id; ``folder`` a local folder with the config files
    (the folder itself, or the Hub snapshot of a repo's config files), where there is one.
    """

    kind: str
    location: str
    folder: Optional[Path] = None

    @property
    def library(self) -> str:
        """``"timm"`` or ``"transformers"`` for unconverted sources, ``"vit2cbsa"`` for a converted folder."""
        return {"teacher": "timm", "timm-dir": "timm", "timm": "timm", "hub-timm": "timm"}.get(self.kind, self.kind)

    @property
    def is_hub(self) -> bool:
        return self.folder is not None and not Path(self.location).expanduser().is_dir() and self.kind != "teacher"

    def timm_name(self) -> str:
        """The name ``timm.create_model`` takes for a timm source."""
        return {"timm": self.location, "timm-dir": "local-dir:" + self.location,
                "hub-timm": "hf-hub:" + self.location}[self.kind]


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise LoadError(f"{path} cannot be read as JSON: {one_line(e)}") from e


def check_no_remote_code(folder: Union[str, Path], what: Optional[str] = None,
                         files: Sequence[str] = ("config.json", "preprocessor_config.json")) -> None:
    """Refuse (:class:`LoadError`) a model folder whose configs ask transformers to run code from the folder or
    repo: an ``auto_map`` in ``config.json`` / ``preprocessor_config.json``, or a ``model_type`` that is not
    built into the installed transformers. vit2cbsa never runs such code (``trust_remote_code=False``).
    ``files``: the config files to check (those present)."""
    folder = Path(folder)
    what = what or str(folder)
    for name in files:
        path = folder / name
        if not path.is_file():
            continue
        cfg = _read_json(path)
        if isinstance(cfg, dict) and cfg.get("auto_map"):
            classes = ", ".join(sorted(map(str, cfg["auto_map"]))) if isinstance(cfg["auto_map"], dict) else "..."
            raise LoadError(f"{what} asks to run its own code ({name} has an auto_map: {classes}), which vit2cbsa "
                            "never does (trust_remote_code=False); use a model whose architecture is built into "
                            "transformers, such as ViT, DeiT, DINOv2, CLIP or SigLIP")
    cfg = _read_json(folder / "config.json") if "config.json" in files and (folder / "config.json").is_file() else {}
    model_type = cfg.get("model_type") if isinstance(cfg, dict) else None
    if model_type is not None:
        import transformers
        from transformers import CONFIG_MAPPING

        if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
            raise LoadError(f"{what} has model_type {model_type!r}, which transformers {transformers.__version__} "
                            "does not know: the folder asks to run its own code, which vit2cbsa never does "
                            "(trust_remote_code=False); use a model built into transformers (or a newer "
                            "transformers if the type is new)")


def _folder_kind(folder: Path, what: Optional[str] = None) -> str:
    from .hub import CONFIG_NAME

    what = what or str(folder)
    if (folder / CONFIG_NAME).is_file():  # vit2cbsa.hub checks its own folders (it never runs their code either)
        return "vit2cbsa"
    if (folder / "config.json").is_file():
        cfg = _read_json(folder / "config.json")
        if isinstance(cfg, dict) and ("model_type" in cfg or "auto_map" in cfg):
            check_no_remote_code(folder, what)
            return "transformers"
        if isinstance(cfg, dict) and "architecture" in cfg:
            return "timm-dir"
    raise LoadError(f"{what} holds neither a vit2cbsa folder, a transformers model (config.json with "
                    "model_type) nor a timm checkpoint (config.json with architecture)")


def _is_timm_name(name: str) -> bool:
    import timm

    return name.startswith(("hf-hub:", "local-dir:")) or timm.is_model(name)


def resolve(model: Union[str, Path, Source]) -> Source:
    """Work out what MODEL is (module docstring); Hub repos are classified from their config files only."""
    if isinstance(model, Source):
        return model
    model = str(model)
    if model == TEACHER:
        from .zoo import TEACHER_DIR

        return Source("teacher", TEACHER, TEACHER_DIR)
    if model.startswith("timm:"):
        name = model[len("timm:"):]
        if not _is_timm_name(name):
            raise LoadError(f"{name!r} is not a timm model name (see timm.list_models())")
        return Source("timm", name)
    forced_hf = model.startswith("hf:")
    if forced_hf:
        model = model[len("hf:"):]
    path = Path(model).expanduser()
    if path.is_dir():
        kind = _folder_kind(path)
        if forced_hf and kind != "transformers":
            raise LoadError(f"hf:{model} is not a transformers model folder (config.json with model_type)")
        return Source(kind, str(path), path)
    if path.exists():
        raise LoadError(f"{model} is a file; expected a model folder, a timm model name or a Hub repo id")
    if not forced_hf and _is_timm_name(model):
        return Source("timm", model)
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(model)
    except HFValidationError:
        raise LoadError(f"{model} is not a local folder, a timm model name or a Hugging Face Hub repo id "
                        f"(nor {TEACHER}, the embedded teacher)") from None
    if "/" not in model:
        raise LoadError(f"{model} is not a local folder or a timm model name (see `timm.list_models()`), nor "
                        f"{TEACHER}, the embedded teacher; a Hub repo id is user/name")
    try:
        folder = Path(snapshot_download(model, allow_patterns=["config.json", "preprocessor_config.json",
                                                               "vit2cbsa_config.json"]))
    except Exception as e:
        raise LoadError(f"cannot reach Hub repo {model!r} ({one_line(e)}); pass a local folder instead") from e
    kind = _folder_kind(folder, f"Hub repo {model!r}")
    if forced_hf and kind != "transformers":
        raise LoadError(f"hf:{model} is not a transformers model repo (config.json with model_type)")
    return Source("hub-timm" if kind == "timm-dir" else kind, model, folder)


# --------------------------------------------------------------------------- loading


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
    the saved :func:`vit2cbsa.convert` options (with ``pretrained=False`` the model is then the unconverted
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
    conversion: Optional[Dict[str, Any]] = None
    config: Optional[Dict[str, Any]] = None
    head_reset: bool = False

    @property
    def converted(self) -> bool:
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
    from .zoo import TEACHER_DIR, load_cifar10_teacher

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

        config = _read_json(cfg_path)
        mk = {**config["model_kwargs"], "dynamic_img_size": True, **kwargs}
        if size is not None:
            mk["img_size"] = size
        model = VisionTransformer(**mk).eval()
    data = {"input_size": [3, *(size or tuple(config.get("input_size", [3, 32, 32])[-2:]))],
            "mean": list(config["mean"]), "std": list(config["std"]), "interpolation": "bilinear", "crop_pct": 1.0}
    return LoadedModel(model, "timm", source, data, _teacher_processor(config), config.get("class_names"),
                       None, pretrained, None, config)


def _teacher_processor(config: dict) -> Any:
    """A transformers image processor with the teacher's input size and mean/std, saved next to a converted
    teacher so that its folder says how to preprocess images (``vit2cbsa explain`` reads it)."""
    try:
        from transformers import ViTImageProcessor
    except ImportError:  # pragma: no cover - transformers is a dependency
        return None
    h, w = config.get("input_size", [3, 32, 32])[-2:]
    return ViTImageProcessor(do_resize=True, size={"height": int(h), "width": int(w)}, resample=2,
                             image_mean=list(config["mean"]), image_std=list(config["std"]))


# ---- vit2cbsa folders


def _load_vit2cbsa(source: Source, pretrained: bool, size: Optional[Tuple[int, int]]) -> LoadedModel:
    from .convert import saved_options
    from .hub import BaseModelSpec, from_pretrained, read_config

    folder = source.folder
    config = read_config(folder)
    conversion = saved_options(config["conversion"])
    spec_json = config["base"]
    library = spec_json.get("library", "timm")
    if pretrained:
        model = from_pretrained(source.location)
    else:
        spec = BaseModelSpec.from_json(spec_json, folder)
        if spec.library == "timm" and size is not None:
            spec.model_kwargs.update({"img_size": list(size)})
        model = spec.build().eval()
    processor = _image_processor(folder)
    data = _data_config(model, processor)
    return LoadedModel(model, library, source, data, processor, _class_names(model), config.get("base_model"),
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
    return LoadedModel(model, "timm", source, _data_config(model, None), None, _class_names(model), base_model,
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
    processor = _image_processor(source.folder) if source.folder is not None else None
    base_model = location if source.is_hub and pretrained else None
    names = _class_names(model)
    if reset and class_names is None:
        names = None
    return LoadedModel(model, "transformers", source, _data_config(model, processor), processor,
                       names, base_model, pretrained, head_reset=reset)


def _image_processor(folder: Optional[Path]) -> Any:
    """The image processor saved in ``folder`` (``preprocessor_config.json``), or ``None`` when there is none."""
    if folder is None or not (Path(folder) / "preprocessor_config.json").is_file():
        return None
    check_no_remote_code(folder, files=("preprocessor_config.json",))
    from transformers import AutoImageProcessor

    try:
        return AutoImageProcessor.from_pretrained(str(folder), trust_remote_code=False)
    except Exception as e:
        raise LoadError(f"{Path(folder) / 'preprocessor_config.json'} cannot be loaded: {one_line(e)}") from e


# ---- input configuration and class names


def _data_config(model: nn.Module, processor: Any) -> Dict[str, Any]:
    """Input size and normalisation of a timm or transformers model (what the analysis and training read)."""
    hf = getattr(model, "config", None)
    if hf is not None and type(model).__module__.startswith("transformers."):
        vision = getattr(hf, "vision_config", None) or hf
        size = getattr(vision, "image_size", 224)
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        return {"input_size": [int(getattr(vision, "num_channels", 3)), int(h), int(w)],
                "mean": list(getattr(processor, "image_mean", None) or IMAGENET_MEAN),
                "std": list(getattr(processor, "image_std", None) or IMAGENET_STD)}
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    patch = getattr(model, "patch_embed", None)
    size = getattr(patch, "img_size", None) or tuple(cfg.get("input_size", (3, 224, 224)))[-2:]
    proj = getattr(patch, "proj", None)
    chans = getattr(proj, "in_channels", None) or getattr(model, "in_chans", 3)
    mean = getattr(processor, "image_mean", None) or cfg.get("mean") or IMAGENET_MEAN
    std = getattr(processor, "image_std", None) or cfg.get("std") or IMAGENET_STD
    data = {"input_size": [int(chans), int(size[0]), int(size[1])], "mean": list(mean), "std": list(std)}
    for key in ("interpolation", "crop_pct", "crop_mode"):
        if key in cfg:
            data[key] = cfg[key]
    return data


def _class_names(model: nn.Module) -> Optional[List[str]]:
    """Class names of a classifier: a timm ``pretrained_cfg["label_names"]`` (vit2cbsa folders keep them), a
    transformers ``id2label`` (unless generic ``LABEL_i``), or ImageNet's for a timm model with ImageNet's classes."""
    names = (getattr(model, "pretrained_cfg", None) or {}).get("label_names")
    if names and len(names) == getattr(model, "num_classes", None):
        return [str(n) for n in names]
    id2label = getattr(getattr(model, "config", None), "id2label", None)
    if id2label:
        if all(str(v).startswith("LABEL_") for v in id2label.values()):
            return None
        return [str(id2label[i]) for i in sorted(id2label)]
    num_classes = getattr(model, "num_classes", None)
    if not isinstance(num_classes, int) or num_classes <= 0:
        return None
    try:
        from timm.data import ImageNetInfo, infer_imagenet_subset

        subset = infer_imagenet_subset(model)
        if not subset:
            return None
        info = ImageNetInfo(subset)
        if info.num_classes() != num_classes:
            return None
        return [info.index_to_description(i).split(",")[0] for i in range(num_classes)]
    except Exception:  # older timm, or no label names for this subset
        return None
