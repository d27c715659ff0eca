"""The safetensors weight files of a saved folder: what they must agree on before a single tensor is allocated.

A folder's ``vit2cbsa_config.json`` says how to rebuild the model and its safetensors files hold
the weights; both are untrusted. :func:`vit2cbsa.from_pretrained` (:mod:`vit2cbsa.hub.load`) checks,
without allocating:

1. **The binding.** At save time every weight file's safetensors metadata gets
   ``vit2cbsa_binding``: the canonical JSON of everything that changes the model's outputs,

       {format_version, conversion, base, dtype, files: {name: sha256 of every other file}}

   (the conversion options, how the base architecture is rebuilt, the dtype, and e.g. the sha256
   of transformers' ``config.json``). The weight files themselves are covered by the sha256 list
   in the config, so a config edited after saving (a different ``broadcast``, representative grid,
   ``model_kwargs``...) no longer matches the binding inside the weights it checksums, and is
   refused naming the first entry that differs.
2. **The header.** Every tensor's name, shape and dtype, against the model rebuilt on the meta
   device: a config that describes a model other than the weights (e.g. ``embed_dim`` 8192 beside
   a 5 MB file) is refused before its architecture is built with real memory. Floating tensors may
   be stored as float16, bfloat16, float32 or float64, each keeping its own dtype (a float16 head
   on a float32 model stays float16); integer and boolean buffers must keep the model's dtype.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from ..errors import CheckpointError, one_line
from .format import FLOAT_DTYPES, dtype_name

BINDING_KEY = "vit2cbsa_binding"
# safetensors' dtype codes -> torch dtypes (the ones a vit2cbsa model can hold)
_CODES: Dict[str, torch.dtype] = {
    "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


def canonical(obj: Any) -> str:
    """The canonical JSON text of ``obj`` (sorted keys, no spaces): what the binding stores."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def bound_files(files: Mapping[str, Any], weights: Sequence[str]) -> List[str]:
    """The files whose sha256 goes into the binding: all but the weights and the shard index."""
    return sorted(n for n in files if n not in weights and not n.endswith(".safetensors.index.json"))


def make_binding(format_version: int, conversion: Mapping[str, Any], base: Mapping[str, Any], dtype: str,
                 file_sha256: Mapping[str, str]) -> Dict[str, Any]:
    """The binding: everything that changes the model's outputs (``file_sha256``: of the bound files)."""
    return {"format_version": format_version, "conversion": dict(conversion), "base": dict(base), "dtype": dtype,
            "files": dict(sorted(file_sha256.items()))}


def binding_of_config(config: Mapping[str, Any]) -> Dict[str, Any]:
    """The binding that a (validated) ``vit2cbsa_config.json`` claims."""
    files = config["files"]
    return make_binding(config["format_version"], config["conversion"], config["base"], config["dtype"],
                        {n: files[n]["sha256"] for n in bound_files(files, config["weights"])})


@dataclass
class Header:
    """The safetensors headers of a folder's weight files: shapes, dtype codes, each file's metadata."""

    shapes: Dict[str, Tuple[int, ...]] = field(default_factory=dict)
    codes: Dict[str, str] = field(default_factory=dict)
    metadata: Dict[str, Dict[str, str]] = field(default_factory=dict)  # file name -> its metadata


def read_headers(folder: Path, weights: Sequence[str]) -> Header:
    """Read (and never load) the headers of ``weights`` in ``folder``."""
    from safetensors import safe_open

    header = Header()
    for name in weights:
        try:
            with safe_open(str(folder / name), "pt") as f:
                header.metadata[name] = dict(f.metadata() or {})
                for key in f.keys():
                    if key in header.shapes:
                        raise CheckpointError(f"{folder}: tensor {key} is stored twice")
                    piece = f.get_slice(key)
                    header.shapes[key], header.codes[key] = tuple(piece.get_shape()), piece.get_dtype()
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"{folder / name} is not a readable safetensors file: {one_line(e)}") from e
    return header


def _first_difference(a: Any, b: Any, path: str = "") -> Optional[str]:
    """Where two JSON values first differ, as ``"path: a vs b"``; None if they are equal."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b), key=str):
            sub = f"{path}.{key}" if path else str(key)
            if key not in a or key not in b:
                return f"{sub} is {'missing' if key not in a else json.dumps(a[key])[:80]} in the config but " \
                       f"{'missing' if key not in b else json.dumps(b[key])[:80]} in the weights"
            found = _first_difference(a[key], b[key], sub)
            if found:
                return found
        return None
    if a != b:
        return f"{path or 'the config'} is {json.dumps(a)[:80]} in the config but {json.dumps(b)[:80]} in the weights"
    return None


def check_binding(header: Header, config: Mapping[str, Any], folder: Path) -> None:
    """Refuse a config that differs from what its weight files were saved with."""
    claimed = binding_of_config(config)
    for name, metadata in header.metadata.items():
        text = metadata.get(BINDING_KEY)
        if text is None:
            raise CheckpointError(f"{folder / name} has no {BINDING_KEY} in its metadata although the config is format "
                                  f"{config['format_version']}: the weights were replaced after saving; save the model again")
        try:
            saved = json.loads(text)
        except ValueError as e:
            raise CheckpointError(f"{folder / name}: its {BINDING_KEY} metadata is not JSON: {one_line(e)}") from e
        where = _first_difference(claimed, saved)
        if where:
            raise CheckpointError(
                f"{folder}: vit2cbsa_config.json does not match the weights it was saved with ({where}); "
                "it was edited after saving: restore it, or convert and save the model again")


def tensor_problems(expected: Mapping[str, Tuple[Tuple[int, ...], torch.dtype]], found: Mapping[str, Tuple[int, ...]],
                    codes: Optional[Mapping[str, str]] = None, limit: int = 5) -> List[str]:
    """Human-readable differences between a model (``name -> (shape, dtype)``) and saved (or rebuilt)
    tensors (``name -> shape``, plus safetensors dtype ``codes`` when known); empty if they agree."""
    def names(keys: List[str]) -> str:
        keys = sorted(keys)
        return ", ".join(keys[:limit]) + (f", ... (+{len(keys) - limit} more)" if len(keys) > limit else "")

    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    wrong = [k for k in expected if k in found and tuple(found[k]) != tuple(expected[k][0])]
    out = []
    if missing:
        out.append(f"{len(missing)} missing tensor(s): {names(missing)}")
    if unexpected:
        out.append(f"{len(unexpected)} unexpected tensor(s): {names(unexpected)}")
    if wrong:
        out.append(f"{len(wrong)} tensor(s) with the wrong shape: " + ", ".join(
            f"{k} (saved {tuple(found[k])}, model {tuple(expected[k][0])})" for k in sorted(wrong)[:limit]))
    bad = []
    for k, (_, dtype) in expected.items():
        code = (codes or {}).get(k)
        if code is None:
            continue
        saved = _CODES.get(code)
        if dtype.is_floating_point:
            ok = saved is not None and saved in FLOAT_DTYPES.values()
        else:
            ok = saved == dtype
        if not ok:
            want = "float16/bfloat16/float32/float64" if dtype.is_floating_point else dtype_name(dtype)
            bad.append(f"{k} (saved {code}, expected {want})")
    if bad:
        out.append(f"{len(bad)} tensor(s) with an unsupported dtype: " + ", ".join(sorted(bad)[:limit]))
    return out


def expected_tensors(model: nn.Module) -> Dict[str, Tuple[Tuple[int, ...], torch.dtype]]:
    """``name -> (shape, dtype)`` of a model's state dict (works on the meta device)."""
    return {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}


def apply_saved_dtypes(model: nn.Module, header: Header) -> None:
    """Give every floating parameter and buffer the dtype it was saved in (mixed-dtype models stay mixed)."""
    for named in (model.named_parameters(remove_duplicate=False), model.named_buffers(remove_duplicate=False)):
        for name, tensor in named:
            dtype = _CODES.get(header.codes.get(name, ""))
            if dtype is not None and tensor.is_floating_point() and dtype.is_floating_point and tensor.dtype != dtype:
                tensor.data = tensor.data.to(dtype)


__all__ = ["BINDING_KEY", "Header", "apply_saved_dtypes", "binding_of_config", "bound_files", "canonical",
           "check_binding", "expected_tensors", "make_binding", "read_headers", "tensor_problems"]
