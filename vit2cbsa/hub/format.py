"""The on-disk format of a vit2cbsa folder: its ``vit2cbsa_config.json`` and transformers' ``config.json``.

``vit2cbsa_config.json`` (written last, see :mod:`vit2cbsa.hub.save`)::

    {"format": "vit2cbsa", "format_version": 3, "library_version": "...",
     "conversion": {every ConversionConfig field but layers (variant, num_representatives: [h, w], broadcast,
                    extra_representatives, prefix_broadcast, window, fine_pool, ...),
                    converted_layers, num_attention_layers, layer_names},
     "base": BaseModelSpec.to_json(), "base_model": Hub id or null, "dtype": "float32",
     "weights": [safetensors files], "files": {name: {size, sha256}} (every other file of the folder)}

The ``"conversion"`` entry is written by :func:`conversion_json` and validated by :func:`read_config`; its
:class:`~vit2cbsa.config.ConversionConfig` is :func:`vit2cbsa.info.saved_config` (options newer than a folder
take :data:`vit2cbsa.info.SAVED_DEFAULTS`).
For a transformers model ``config.json`` wraps the base model's config under ``model_type`` ``"vit2cbsa"``
(:func:`hf_config_json`, read back by :func:`read_hf_config`; see :mod:`vit2cbsa.hub.transformers_auto`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Mapping, Optional, Sequence

import torch

from .._version import __version__
from ..attention import VARIANTS
from ..errors import CheckpointError, UsageError, one_line
from ..info import saved_config

if TYPE_CHECKING:
    from ..info import ConversionInfo

CONFIG_NAME = "vit2cbsa_config.json"
# 2: the conversion also records extra_representatives and prefix_broadcast (version 1 folders: "none", "all"),
# so a vit2cbsa that does not know them refuses these folders instead of loading a different network
# 3: the config is bound to the weights (safetensors metadata), transformers' config.json wraps the base config
FORMAT_VERSION = 3
MODEL_TYPE = "vit2cbsa"  # the model_type of a converted transformers model's config.json
FLOAT_DTYPES: Dict[str, torch.dtype] = {
    "float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64}


def parse_dtype(name: Any, where: str) -> torch.dtype:
    """The torch dtype a config's ``"dtype"`` entry names; only the four float types are accepted."""
    if name not in FLOAT_DTYPES:
        raise CheckpointError(f"{where}: dtype {name!r} is not one of {', '.join(FLOAT_DTYPES)}")
    return FLOAT_DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32 -> "float32"``."""
    return str(dtype).replace("torch.", "")


# --------------------------------------------------------------------------- the conversion entry


def conversion_json(info: "ConversionInfo") -> Dict[str, Any]:
    """The ``"conversion"`` entry of ``vit2cbsa_config.json`` for a model converted as ``info`` says."""
    return {
        **info.config.options(),  # every ConversionConfig field
        "converted_layers": info.converted_indices,
        "num_attention_layers": info.num_attention_layers,
        "layer_names": [layer.name for layer in info.converted],
    }


def _check_conversion(conv: Mapping[str, Any], path: Path) -> None:
    """The saved conversion is one :class:`~vit2cbsa.config.ConversionConfig` (validated as such) of a non-empty
    list of converted layers; an unknown variant names this version (a newer vit2cbsa, or a variant registered
    with ``vit2cbsa.attention.register_variant`` before loading)."""
    variant, layers = conv["variant"], conv["converted_layers"]
    if variant not in VARIANTS:
        raise CheckpointError(f"{path} names an unknown attention variant {variant!r}; this vit2cbsa "
                              f"({__version__}) knows {', '.join(sorted(VARIANTS))} (register another with "
                              "vit2cbsa.attention.register_variant before loading)")
    if not (isinstance(layers, list) and layers and all(isinstance(i, int) and not isinstance(i, bool) for i in layers)):
        raise CheckpointError(f"{path}: converted_layers must be a list of layer indices, got {layers!r}")
    try:
        saved_config(conv)
    except (UsageError, TypeError) as e:
        raise CheckpointError(f"{path}: {one_line(e)}") from None


# --------------------------------------------------------------------------- vit2cbsa_config.json


def folder_config(conversion: Mapping[str, Any], base: Mapping[str, Any], base_model: Optional[str], dtype: str,
                  weights: Sequence[str], files: Mapping[str, Mapping[str, Any]]) -> Dict[str, Any]:
    """The contents of ``vit2cbsa_config.json`` (``files``: ``name -> {size, sha256}`` of every other file)."""
    return {
        "format": "vit2cbsa",
        "format_version": FORMAT_VERSION,
        "library_version": __version__,
        "conversion": dict(conversion),
        "base": dict(base),
        "base_model": base_model,
        "dtype": dtype,
        "weights": list(weights),
        "files": dict(files),
    }


def config_text(config: Mapping[str, Any]) -> str:
    """``vit2cbsa_config.json`` as written: indented JSON and a final newline."""
    return json.dumps(config, indent=2) + "\n"


def read_config(folder: "str | Path") -> Dict[str, Any]:
    """Read and validate the ``vit2cbsa_config.json`` of a saved folder.

    Raises:
        CheckpointError: the file is missing (an interrupted save, or not a vit2cbsa folder), not JSON, of a
            newer format version, or names an option, dtype or file list this vit2cbsa does not accept.
    """
    path = Path(folder) / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(
            f"{folder} is not a complete vit2cbsa folder: it has no {CONFIG_NAME} (an interrupted save, or a plain "
            "timm/transformers checkpoint: load that with timm/transformers and call vit2cbsa.convert)")
    try:
        config = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON (truncated or corrupt): {one_line(e)}") from e
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
        conv["variant"], conv["broadcast"], conv["num_representatives"], conv["converted_layers"]
        files, weights = config["files"], config["weights"]
        config["base"]["library"]
        plain = all(isinstance(n, str) and n == Path(n).name and not n.startswith(".") for n in [*files, *weights])
        sized = all(isinstance(m["size"], int) and isinstance(m["sha256"], str) for m in files.values())
    except (KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{path} is malformed: missing or invalid entry {e}") from e
    if not (plain and sized):
        raise CheckpointError(f"{path} is malformed: its file list must hold plain file names with size and sha256")
    _check_conversion(conv, path)
    config.setdefault("dtype", "float32")  # folders of format 1 before the entry existed
    parse_dtype(config["dtype"], str(path))
    return config


# --------------------------------------------------------------------------- transformers' config.json


def hf_config_json(hf_config: Any, task: str, model_class: str) -> Dict[str, Any]:
    """The ``config.json`` of a converted transformers model: the base config wrapped in model_type "vit2cbsa"."""
    import transformers

    base = json.loads(hf_config.to_json_string(use_diff=False))
    base["architectures"] = [model_class]
    wrapper = "Vit2CBSAForImageClassification" if task == "image-classification" else "Vit2CBSAModel"
    return {"model_type": MODEL_TYPE, "architectures": [wrapper], "base_config": base,
            "transformers_version": transformers.__version__,
            "loading": "a model converted to CBSA attention: load it with vit2cbsa.from_pretrained(folder), or "
                       "`import vit2cbsa` first and then transformers' Auto classes or pipeline()"}


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
        raise CheckpointError(f"{path} cannot be read: {one_line(e)}") from e
    if isinstance(data, dict) and data.get("model_type") == MODEL_TYPE:
        data = data.get("base_config")
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} is malformed: expected a JSON object with the base model's config")
    model_type = data.get("model_type")
    if "auto_map" in data:
        raise CheckpointError(f"{path} asks to run the folder's own Python code (auto_map: {sorted(data['auto_map'])}); "
                              "vit2cbsa never runs code from a checkpoint")
    if model_type == MODEL_TYPE or not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        raise CheckpointError(f"{path} names model_type {model_type!r}, which this transformers does not know; "
                              "vit2cbsa only rebuilds transformers' own architectures")
    try:
        return CONFIG_MAPPING[model_type].from_dict(data)
    except Exception as e:
        raise CheckpointError(f"{path} is not a valid {model_type} config: {one_line(e)}") from e


__all__ = ["CONFIG_NAME", "FLOAT_DTYPES", "FORMAT_VERSION", "MODEL_TYPE", "config_text", "conversion_json", "dtype_name", "folder_config", "hf_config_json", "parse_dtype",
           "read_config", "read_hf_config"]
