"""Helpers of the fine-tuning tests (test_finetune*, test_fsdp): a tiny timm ViT saved as a local checkpoint, tiny
generated image folders, ``examples/finetune.py`` loaded as a module, and what its subprocesses need."""

from __future__ import annotations

import importlib.util
import json
import os
import socket
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "finetune.py"
#: the tiny timm ViT of the fine-tuning tests (4 classes, 32x32 images, 4x4 patches of 8 pixels)
TINY_KW = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=4)
COLOURS = [(220, 40, 40), (40, 200, 40), (40, 40, 220), (220, 220, 40)]


def tiny_timm(**kw) -> torch.nn.Module:
    """The tiny timm ViT (``TINY_KW``, overridden by ``kw``), random weights."""
    import timm

    return timm.create_model("vit_tiny_patch16_224", pretrained=False, **{**TINY_KW, **kw})


def png(path: Path, colour, rng) -> None:
    """A 32x32 PNG of ``colour`` with Gaussian noise."""
    img = np.clip(np.array(colour)[None, None] + rng.normal(0, 50, (32, 32, 3)), 0, 255)
    Image.fromarray(img.astype(np.uint8)).save(path)


def image_folder(root: Path, n_train: int, n_val: int, classes: int = 4, seed: int = 0) -> Path:
    """``root/train/classC/I.png`` and ``root/val/...``: ``n_train`` / ``n_val`` noisy images of class C's colour."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("val", n_val)):
        for c in range(classes):
            d = root / split / f"class{c}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                png(d / f"{i}.png", COLOURS[c], rng)
    return root


def make_assets(root: Path, sharpen: bool = True) -> Path:
    """``root/data`` (4 classes x (12 train + 4 val) images) and ``root/tiny.safetensors`` (the tiny ViT, seed 0;
    ``sharpen``: its q/k weights x6, sharper attention than random init, so alignment has something to fit)."""
    from safetensors.torch import save_file

    image_folder(root / "data", 12, 4)
    torch.manual_seed(0)
    model = tiny_timm()
    if sharpen:
        with torch.no_grad():
            for blk in model.blocks:
                blk.attn.qkv.weight.mul_(6.0)
    save_file(model.state_dict(), str(root / "tiny.safetensors"))
    return root


def load_script(name: str = "finetune_cli", path: Path = SCRIPT) -> ModuleType:
    """``examples/finetune.py`` (or the script at ``path``) as a module named ``name``, registered in
    ``sys.modules`` (dataclasses of the script resolve their module)."""
    import sys

    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def load_benchmark(name: str) -> ModuleType:
    """``benchmarks/<name>.py`` as the module ``<name>_bench``."""
    return load_script(f"{name}_bench", Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py")


def run_cli(cli: ModuleType, argv) -> dict:
    """``vit2cbsa.train.run`` on the config the script's parser makes of ``argv`` (exceptions propagate)."""
    from vit2cbsa.train import FinetuneConfig, run

    return run(FinetuneConfig.from_arguments(cli.build_parser().parse_args(argv)))


def subprocess_env(**extra: str) -> dict:
    """The environment of a launched run: one thread, offline, this checkout importable."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(ROOT), **extra}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def jsonl(path) -> list:
    """The records of a JSON-lines file (``metrics.jsonl``)."""
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def committed_files(operations) -> dict:
    """``{path in repo: bytes}`` of the ``CommitOperationAdd``s an ``HfApi.create_commit`` stand-in receives."""
    files = {}
    for op in operations:
        with op.as_file() as f:
            files[op.path_in_repo] = f.read()
    return files

