"""Loading a folder written by :func:`vit2cbsa.save_pretrained`, from disk or the Hugging Face Hub.

Loading never downloads the original pretrained weights and never runs code from the folder. In order:
:func:`resolve_folder` (a local folder, or ``huggingface_hub.snapshot_download`` of a Hub repo), then
:func:`load_folder`: the config (:func:`vit2cbsa.hub.format.read_config`), every file's size and sha256,
the binding of the config to the weights and every tensor's name, shape and dtype against the architecture
rebuilt on the meta device (timm ``create_model(name, pretrained=False, **kwargs)`` or transformers
``Model._from_config``, converted with the saved options; :mod:`vit2cbsa.hub.weights`). Only then is the
model built with real memory and the weights copied in.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Union

import torch
from torch import nn

from ..convert import convert
from ..errors import CheckpointError, one_line
from ..info import saved_config
from .format import CONFIG_NAME, parse_dtype, read_config
from .identity import BaseModelSpec, remember_base
from .io import sha256
from .weights import apply_saved_dtypes, check_binding, expected_tensors, read_headers, tensor_problems

PathLike = Union[str, "os.PathLike[str]"]


def resolve_folder(path_or_repo_id: PathLike, revision: Optional[str] = None, cache_dir: Optional[PathLike] = None,
                   token: Optional[str] = None, local_files_only: bool = False) -> Path:
    """The local folder of ``path_or_repo_id``: itself if it is a folder, else a Hub snapshot of the repo
    (only its ``*.json`` and ``*.safetensors`` files).

    Raises:
        CheckpointError: it is a file. FileNotFoundError: neither a folder nor a Hub repo that can be fetched.
    """
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
        raise FileNotFoundError(f"{repo_id} is neither a local folder nor a Hugging Face Hub repo id") from None
    try:
        return Path(snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, token=token,
                                      local_files_only=local_files_only, allow_patterns=["*.json", "*.safetensors"]))
    except Exception as e:
        raise FileNotFoundError(f"cannot get {repo_id!r} from the Hugging Face Hub "
                                f"(not a local folder either): {one_line(e)}") from e


def _check_files(folder: Path, config: Mapping[str, Any]) -> None:
    for name, meta in config["files"].items():
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"{folder} is incomplete: {name} is missing")
        size = path.stat().st_size
        if size != meta["size"]:
            raise CheckpointError(f"{path} is truncated or corrupt: {size} bytes, expected {meta['size']}")
        if sha256(path) != meta["sha256"]:
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
        raise CheckpointError(f"{folder}: cannot rebuild the base model {spec.describe()}: {one_line(e)}") from e
    model.to(parse_dtype(config["dtype"], str(folder / CONFIG_NAME)))
    try:
        return convert(model, saved_config(config["conversion"]))
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{folder}: the saved conversion does not apply to {spec.describe()}: {one_line(e)}") from e


def load_folder(folder: Path, device: Union[str, torch.device] = "cpu") -> nn.Module:
    """Check and load the local vit2cbsa ``folder`` (see :func:`from_pretrained`, which resolves it first)."""
    from safetensors.torch import load_file

    config = read_config(folder)
    _check_files(folder, config)
    header = read_headers(folder, config["weights"])
    if config["format_version"] >= 3:
        check_binding(header, config, folder)
    else:
        warnings.warn(f"{folder} was saved by an older vit2cbsa (format {config['format_version']}): its config is not "
                      "bound to its weights; save it again to protect it against edits", stacklevel=3)
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
            raise CheckpointError(f"{folder / name} cannot be read: {one_line(e)}") from e
    model.load_state_dict(state, strict=True)
    remember_base(model, spec, config.get("base_model"))
    return model.to(device).eval()


def from_pretrained(
    path_or_repo_id: PathLike,
    *,
    revision: Optional[str] = None,
    cache_dir: Optional[PathLike] = None,
    token: Optional[str] = None,
    local_files_only: bool = False,
    device: Union[str, torch.device] = "cpu",
) -> nn.Module:
    """Load a converted model saved by :func:`vit2cbsa.save_pretrained`, from a folder or a Hub repo.

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
    return load_folder(resolve_folder(path_or_repo_id, revision, cache_dir, token, local_files_only), device)


__all__ = ["from_pretrained", "load_folder", "resolve_folder"]
