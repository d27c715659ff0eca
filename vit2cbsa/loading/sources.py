"""Resolving a MODEL string to a :class:`Source`: what it names, checked before anything is built.

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

A ``config.json`` or ``preprocessor_config.json`` with an ``auto_map``, or a ``model_type`` transformers does
not know, is refused here (:func:`check_no_remote_code`, :class:`~vit2cbsa.errors.LoadError`) before
transformers is asked anything: vit2cbsa never runs code from a model folder or repo.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from ..errors import LoadError, one_line

TEACHER = "cifar10-teacher"

#: the source kinds :func:`resolve` returns
KINDS = ("teacher", "vit2cbsa", "transformers", "timm-dir", "timm", "hub-timm")


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
        """Whether MODEL is a Hub repo (``folder`` is then the snapshot of its config files)."""
        return self.folder is not None and not Path(self.location).expanduser().is_dir() and self.kind != "teacher"

    def timm_name(self) -> str:
        """The name ``timm.create_model`` takes for a timm source."""
        return {"timm": self.location, "timm-dir": "local-dir:" + self.location,
                "hub-timm": "hf-hub:" + self.location}[self.kind]


def read_json(path: Path) -> Any:
    """The JSON in ``path``; :class:`LoadError` when it cannot be read."""
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
        cfg = read_json(path)
        if isinstance(cfg, dict) and cfg.get("auto_map"):
            classes = ", ".join(sorted(map(str, cfg["auto_map"]))) if isinstance(cfg["auto_map"], dict) else "..."
            raise LoadError(f"{what} asks to run its own code ({name} has an auto_map: {classes}), which vit2cbsa "
                            "never does (trust_remote_code=False); use a model whose architecture is built into "
                            "transformers, such as ViT, DeiT, DINOv2, CLIP or SigLIP")
    cfg = read_json(folder / "config.json") if "config.json" in files and (folder / "config.json").is_file() else {}
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
    from ..hub import CONFIG_NAME

    what = what or str(folder)
    if (folder / CONFIG_NAME).is_file():  # vit2cbsa.hub checks its own folders (it never runs their code either)
        return "vit2cbsa"
    if (folder / "config.json").is_file():
        cfg = read_json(folder / "config.json")
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
        from ..zoo import TEACHER_DIR

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
