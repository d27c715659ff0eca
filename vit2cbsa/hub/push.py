"""Publishing a converted model on the Hugging Face Hub: the saved folder plus a generated model card.

:func:`push_to_hub` uploads a saved folder where it is (a model is first saved by :func:`vit2cbsa.save_pretrained`
into a temporary folder; a folder given is loaded first, as a check, and never copied) together with a ``README.md``
from :mod:`vit2cbsa.hub.card` (FLOPs and parameters measured against the rebuilt base architecture,
:mod:`vit2cbsa.hub.costs`), as one commit: ``HfApi.create_repo(exist_ok=True)``, then ``HfApi.create_commit``
with a ``CommitOperationAdd`` per file (huggingface_hub uploads the large files, and skips those the Hub has).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, List, Mapping, Optional, Sequence, Union

from torch import nn

from ..modeling import uncompiled
from .card import render_model_card
from .costs import compare_costs
from .format import read_config
from .identity import BaseModelSpec
from .load import from_pretrained
from .save import save_pretrained

PathLike = Union[str, "os.PathLike[str]"]


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
    """Upload a converted model (or a folder saved by :func:`vit2cbsa.save_pretrained`) with a model card.

    The folder's files are uploaded where they are, with a generated ``README.md`` (Hub metadata,
    conversion options, FLOPs and parameters before/after at the model's input size, ``metrics``
    when given, how to load it, the CBSA citation), as one commit: ``HfApi.create_repo(exist_ok=True)``
    and ``HfApi.create_commit``.

    Args:
        model: a converted model (also under ``torch.compile``), or the path of a saved folder (it is
            loaded first, as a check).
        repo_id: the Hub model repo, e.g. ``"user/vit-base-cbsa"``.
        metrics: fine-tuning results for the card, e.g. ``{"top1": 80.1}``.
        dataset: the dataset ``metrics`` were measured on (also puts them in ``model-index``).
        license: license identifier for the card metadata.
        private, token, revision, commit_message, create_pr: passed to ``huggingface_hub``.
        base_model, model_kwargs, image_processor, max_shard_size, class_names: as in
            :func:`vit2cbsa.save_pretrained`.

    Returns:
        The ``huggingface_hub.CommitInfo`` of the upload.
    """
    from huggingface_hub import HfApi

    with tempfile.TemporaryDirectory(prefix="vit2cbsa-push-") as tmp:
        if isinstance(model, nn.Module):
            model = uncompiled(model)
            folder = Path(tmp) / "repo"
            save_pretrained(model, folder, model_kwargs=model_kwargs, base_model=base_model, class_names=class_names,
                            image_processor=image_processor, max_shard_size=max_shard_size)
        else:
            folder = Path(model)
            model = from_pretrained(folder, local_files_only=True)
        config = read_config(folder)
        base = BaseModelSpec.from_json(config["base"], folder).build()
        cost = compare_costs(base, model)
        card = render_model_card(config, cost, repo_id=repo_id, metrics=metrics, dataset=dataset, license=license)
        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        return api.create_commit(
            repo_id=repo_id,
            operations=upload_operations(folder, card),
            repo_type="model",
            revision=revision,
            create_pr=create_pr,
            commit_message=commit_message or f"Upload {config['conversion']['variant']} model converted with vit2cbsa",
        )


def upload_operations(folder: Path, card: str) -> List[Any]:
    """One ``CommitOperationAdd`` per file of ``folder`` (read from where it is; hidden files and a ``README.md`` of
    the folder left out) and one for the generated ``card`` as ``README.md``."""
    from huggingface_hub import CommitOperationAdd

    files = [p for p in sorted(folder.rglob("*")) if p.is_file()
             and not any(part.startswith(".") for part in p.relative_to(folder).parts)]
    ops = [CommitOperationAdd(path_in_repo=p.relative_to(folder).as_posix(), path_or_fileobj=str(p))
           for p in files if p.relative_to(folder).as_posix() != "README.md"]
    return ops + [CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card.encode())]


__all__ = ["push_to_hub", "upload_operations"]
