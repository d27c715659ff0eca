"""The files of a run's output folder that resuming reads: checkpoints, their ``progress.json``, ``run_config.json``.

* Saving (:func:`save_checkpoint`): ``accelerator.save_state`` into ``checkpoints/.tmp_step_N``, then
  ``progress.json`` (stage, step, epoch, position in the epoch, processes, sharded or not), then the rename to
  ``step_N``; the newest ``keep`` complete checkpoints are kept (:func:`rotate`).
* Checking (:func:`checkpoint_problem`): ``progress.json`` parses and matches its folder, the model weights,
  optimizer state and every process's RNG state are there, and no file Accelerate wrote is cut short
  (safetensors headers and sizes, the zip structure of ``torch.save`` files, FSDP's sharded folders:
  :func:`~vit2cbsa.train.sharding.dcp_problem`).
* Choosing (:func:`find_checkpoint`, :func:`latest_checkpoint`, :func:`set_aside`): the newest complete
  checkpoint; newer incomplete ones are moved to ``checkpoints/invalid_step_N``, saying why.
* :func:`finished_result`: the ``final.json`` of a finished run, after checking that ``run_config.json`` (the
  :meth:`~vit2cbsa.train.FinetuneConfig.fingerprint` of the run that made the folder) matches this one.
"""

from __future__ import annotations

import json
import os
import shutil
import zipfile
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

from ..errors import UsageError, one_line
from ..hub.io import honour_umask
from .sharding import dcp_problem

PROGRESS = "progress.json"
RUN_CONFIG = "run_config.json"
PROGRESS_KEYS = ("stage", "stage_step", "stage_steps", "global_step", "epoch", "step_in_epoch")

Checkpoint = Tuple[Path, Dict[str, Any]]  # (folder, its progress.json)


def write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as JSON to ``path`` atomically (a temporary file, then a rename)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)


def step_of(d: Path) -> Optional[int]:
    """``N`` for a folder named ``step_N``, else ``None``."""
    try:
        return int(d.name[len("step_"):])
    except ValueError:
        return None


def file_problem(path: Path) -> Optional[str]:
    """Why ``path`` (a file Accelerate or we wrote) is incomplete, or None. Cheap: headers and sizes."""
    size = path.stat().st_size
    if size == 0:
        return "empty"
    name = path.name
    if name.endswith(".json"):
        try:
            json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError) as e:
            return f"not valid JSON ({one_line(e)})"
        return None
    with path.open("rb") as f:
        head = f.read(8)
        if name.endswith(".safetensors"):
            if len(head) < 8:
                return "truncated (no header)"
            n = int.from_bytes(head, "little")
            if n > size - 8:
                return f"truncated (header of {n} bytes, file of {size})"
            try:
                header = json.loads(f.read(n))
            except (ValueError, UnicodeDecodeError):
                return "truncated (unreadable header)"
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
            return None if 8 + n + end <= size else f"truncated ({size} of {8 + n + end} bytes)"
    if head.startswith(b"PK\x03\x04"):  # torch.save's zip format (optimizer.bin, random_states_0.pkl, ...)
        try:
            with zipfile.ZipFile(path) as z:
                for info in z.infolist():
                    if info.header_offset + info.compress_size > size:
                        return f"truncated ({info.filename} ends past the end of the file)"
        except (zipfile.BadZipFile, OSError) as e:
            return f"truncated or corrupt ({one_line(e)})"
    return None


def checkpoint_problem(d: Path) -> Tuple[Optional[dict], Optional[str]]:
    """``(progress, None)`` for a complete checkpoint folder, ``(None, why)`` for an unusable one.

    Complete: ``progress.json`` parses, has its keys and the folder's step; model weights, optimizer
    state and every process's RNG state are there; no file Accelerate wrote is empty or cut short."""
    try:
        progress = json.loads((d / PROGRESS).read_text())
    except FileNotFoundError:
        return None, f"it has no {PROGRESS}"
    except (ValueError, UnicodeDecodeError) as e:
        return None, f"{PROGRESS} is unreadable ({one_line(e)})"
    if not isinstance(progress, dict) or any(k not in progress for k in PROGRESS_KEYS):
        return None, f"{PROGRESS} lacks some of {', '.join(PROGRESS_KEYS)}"
    if progress["global_step"] != step_of(d):
        return None, f"{PROGRESS} is for step {progress['global_step']}"
    names = {p.name for p in d.iterdir()}
    if not any(n.startswith(("model", "pytorch_model")) for n in names):
        return None, "it has no model weights"
    if not any(n.startswith("optimizer") for n in names):
        return None, "it has no optimizer state"
    missing = [f"random_states_{i}.pkl" for i in range(int(progress.get("num_processes", 1)))
               if f"random_states_{i}.pkl" not in names]
    if missing:
        return None, f"it has no {missing[0]}"
    for f in sorted(p for p in d.rglob("*") if p.is_file()):
        why = file_problem(f)
        if why is not None:
            return None, f"{f.relative_to(d)} is {why}"
    for sub in sorted(p for p in d.iterdir() if p.is_dir()):  # FSDP's sharded model / optimizer states
        if sub.name.startswith(("pytorch_model_fsdp", "optimizer")) or any(sub.glob("*.distcp")):
            why = dcp_problem(sub)
            if why is not None:
                return None, why
    return progress, None


def find_checkpoint(ckpt_dir: Path) -> Tuple[Optional[Checkpoint], List[Tuple[Path, str]]]:
    """The newest complete checkpoint ``(folder, progress)`` (or None), and ``(folder, why)`` for each
    newer one that is not complete."""
    dirs = sorted((d for d in ckpt_dir.glob("step_*") if d.is_dir() and step_of(d) is not None),
                  key=step_of, reverse=True)
    skipped = []
    for d in dirs:
        progress, why = checkpoint_problem(d)
        if progress is not None:
            return (d, progress), skipped
        skipped.append((d, why))
    return None, skipped


def latest_checkpoint(ckpt_dir: Path) -> Optional[Checkpoint]:
    """The newest complete checkpoint (``step_N`` passing :func:`checkpoint_problem`) or ``None``."""
    return find_checkpoint(ckpt_dir)[0]


def set_aside(ckpt_dir: Path, say: Callable[[str], None] = print) -> Optional[Checkpoint]:
    """The newest complete checkpoint of ``ckpt_dir`` (or None); each newer incomplete one is moved to
    ``invalid_step_N``, and ``say`` is told which and why."""
    best, skipped = find_checkpoint(ckpt_dir)
    for d, why in skipped:
        aside = d.with_name(f"invalid_{d.name}")
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(d, aside)
        say(f"skipping checkpoint {d.name}: {why} (moved to {aside})")
    if skipped:
        say(f"resuming from the newest valid checkpoint, {best[0].name}" if best else
            "no valid checkpoint left: starting from the beginning")
    return best


def rotate(ckpt_dir: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` (at least one) ``step_N`` folders, by step number (a damaged
    ``progress.json`` must not stop this)."""
    done = sorted((step_of(d), d) for d in ckpt_dir.glob("step_*") if step_of(d) is not None)
    for _, old in done[: max(0, len(done) - max(1, keep))]:
        shutil.rmtree(old, ignore_errors=True)


def save_checkpoint(accelerator: Any, ckpt_dir: Path, progress: Dict[str, Any], keep: int) -> Path:
    """Save the full training state as ``ckpt_dir/step_N`` (``N = progress["global_step"]``; every process
    calls it): ``.tmp_step_N`` first, ``progress.json`` last, then the rename and :func:`rotate`."""
    acc = accelerator
    final = ckpt_dir / f"step_{progress['global_step']}"
    tmp = ckpt_dir / f".tmp_step_{progress['global_step']}"
    if acc.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    acc.wait_for_everyone()
    acc.save_state(str(tmp))
    acc.wait_for_everyone()
    if acc.is_main_process:
        write_json(tmp / PROGRESS, progress)
        honour_umask(tmp)  # save_state's files come out 0o600: the run's folder is shared like any other
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        rotate(ckpt_dir, keep)
    acc.wait_for_everyone()
    return final


def finished_result(out: Path, fingerprint: Dict[str, Any]) -> Optional[dict]:
    """The ``final.json`` of a finished run in ``out`` (or None). Refuses (:class:`UsageError`) a folder whose
    ``run_config.json`` holds other settings than ``fingerprint``."""
    saved = out / RUN_CONFIG
    if saved.is_file():
        old, new = json.loads(saved.read_text()), fingerprint
        diff = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
        if diff:
            k = diff[0]
            raise UsageError(f"{out} holds a run with other settings ({k}: {old.get(k)!r} -> {new.get(k)!r}); "
                             "relaunch with the same options or use another --output-dir")
    final = out / "final.json"
    return json.loads(final.read_text()) if final.is_file() else None
