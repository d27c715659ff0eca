"""Writing a folder atomically: temporaries next to the target, stale ones cleaned up, then one rename.

:func:`atomic_folder` gives a temporary folder ``.NAME.tmp-HOST--PID--XXXX`` next to the target; when the
block finishes the previous folder (if any) is renamed to ``.NAME.old-HOST--PID--XXXX``, the temporary one
renamed into place (with the modes the umask gives, :func:`honour_umask`) and the old one removed. An error or
interrupt removes the temporary folder; a killed process leaves it behind, and the next save to the same place removes it (:func:`remove_stale_temporaries`).
Also here: the sha256 and size of files (:func:`sha256`, :func:`file_table`), the safetensors shards
(:func:`write_weights`) and the marker written last with ``fsync`` (:func:`write_synced`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import tempfile
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Union

import torch

from ..errors import UsageError

HOST = socket.gethostname()
INDEX_NAME = "model.safetensors.index.json"


def sha256(path: Path) -> str:
    """The hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_hashes(folder: Path) -> Dict[str, str]:
    """``name -> sha256`` of every file in ``folder``."""
    return {p.name: sha256(p) for p in sorted(folder.iterdir()) if p.is_file()}


def file_table(folder: Path) -> Dict[str, Dict[str, Any]]:
    """``name -> {"size", "sha256"}`` of every file in ``folder``, sorted by name."""
    files = sorted(p.name for p in folder.iterdir() if p.is_file())
    return {name: {"size": (folder / name).stat().st_size, "sha256": sha256(folder / name)} for name in files}


def write_synced(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` and ``fsync`` it (the marker of a complete folder)."""
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def write_weights(state: Mapping[str, torch.Tensor], folder: Path, max_shard_size: Union[int, str],
                  metadata: Mapping[str, str]) -> List[str]:
    """Save ``state`` as ``model.safetensors``, or above ``max_shard_size`` as shards plus an index file.

    Every shard carries ``metadata`` (huggingface_hub's writer would put it in the index only). Returns the
    names of the weight files, sorted.

    Raises:
        UsageError: tensors of ``state`` share memory (safetensors cannot store them).
    """
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    pointers: Dict[Any, List[str]] = {}
    for k, v in state.items():
        if v.numel():
            pointers.setdefault((v.untyped_storage().data_ptr(), v.device), []).append(k)
    shared = sorted(k for names in pointers.values() if len(names) > 1 for k in names)
    if shared:
        raise UsageError("tensors sharing memory cannot be saved: " + ", ".join(shared))
    split = split_torch_state_dict_into_shards(dict(state), max_shard_size=max_shard_size)
    for filename, names in split.filename_to_tensors.items():
        save_file({k: state[k].contiguous() for k in names}, str(folder / filename), metadata=dict(metadata))
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (folder / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return sorted(split.filename_to_tensors)


# --------------------------------------------------------------------------- the temporary folder


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


def remove_stale_temporaries(target: Path, max_age_s: float = 3600.0) -> None:
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
            if host == HOST and pid.isdigit():
                stale = not _pid_alive(int(pid))
            else:
                stale = time.time() - entry.stat().st_mtime > max_age_s
            if stale:
                shutil.rmtree(entry, ignore_errors=True)


def current_umask() -> int:
    """The process's file-mode creation mask (read by setting it and putting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def honour_umask(folder: Path) -> None:
    """Give ``folder`` and everything in it the modes a plain ``mkdir`` / ``open`` would under the current umask
    (``0o777 & ~umask`` for folders, ``0o666 & ~umask`` for files): ``mkdtemp`` makes its folder ``0o700`` and some
    writers (safetensors) their files ``0o600``, which would otherwise survive the rename into place and keep the
    folder from colleagues and other jobs on shared storage."""
    mask = current_umask()
    os.chmod(folder, 0o777 & ~mask)
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o777 & ~mask)
        for name in files:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                os.chmod(path, 0o666 & ~mask)


def replace_dir(tmp: Path, target: Path) -> None:
    """Move the finished ``tmp`` folder to ``target``, replacing a previous save there."""
    if not target.exists():
        os.rename(tmp, target)
        return
    old = target.with_name(f"{_tmp_prefix(target, 'old')}{HOST}--{os.getpid()}--{uuid.uuid4().hex[:8]}")
    os.rename(target, old)
    os.rename(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def atomic_folder(target: Path, marker: str) -> Iterator[Path]:
    """A temporary folder that becomes ``target`` when the block finishes, and vanishes if it fails.

    ``target`` may already exist only as an empty folder or an earlier save (it holds ``marker``).

    Raises:
        FileExistsError: ``target`` exists and is something else (nothing is written then).
    """
    if target.exists() and not (target.is_dir() and (not any(target.iterdir()) or (target / marker).is_file())):
        raise FileExistsError(f"{target} exists and is not a vit2cbsa folder; refusing to overwrite it")
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target)
    tmp = Path(tempfile.mkdtemp(prefix=f"{_tmp_prefix(target, 'tmp')}{HOST}--{os.getpid()}--", dir=target.parent))
    try:
        yield tmp
        honour_umask(tmp)
        replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


__all__ = ["HOST", "INDEX_NAME", "atomic_folder", "current_umask", "file_hashes", "file_table", "honour_umask",
           "remove_stale_temporaries",
           "replace_dir", "sha256", "write_synced", "write_weights"]
