"""Saved folders and fine-tuning checkpoints get the modes the umask gives, not mkdtemp's 0o700 or safetensors' 0o600."""

from __future__ import annotations

import os
import stat

import pytest
import torch

import vit2cbsa
from vit2cbsa.hub.io import current_umask

from conftest import FAMILIES

FAMILY = {f.name: f for f in FAMILIES}


@pytest.fixture(params=[0o022, 0o077, 0o002], ids=lambda m: f"umask{m:03o}")
def umask(request):
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def modes(folder):
    """``{relative path: permission bits}`` of ``folder`` and everything in it."""
    out = {".": stat.S_IMODE(os.stat(folder).st_mode)}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = os.path.join(root, name)
            out[os.path.relpath(path, folder)] = stat.S_IMODE(os.stat(path).st_mode)
    return out


def expected(folder, mask):
    return {k: (0o777 if os.path.isdir(os.path.join(folder, k)) else 0o666) & ~mask for k in modes(folder)}


def test_current_umask_reads_without_changing_it(umask):
    assert current_umask() == umask and current_umask() == umask


def test_saved_folder_has_the_umask_modes(tmp_path, umask):
    model = vit2cbsa.convert(FAMILY["timm_vit"].build(), "cbsa", 4)
    folder = vit2cbsa.save_pretrained(model, tmp_path / "saved", max_shard_size="50KB")  # shards and an index
    got = modes(folder)
    assert any(k.endswith(".safetensors") for k in got) and len(got) >= 4
    assert got == expected(folder, umask)
    folder = vit2cbsa.save_pretrained(model, tmp_path / "saved")  # a replaced save too
    assert modes(folder) == expected(folder, umask)


def test_checkpoint_has_the_umask_modes(tmp_path, umask):
    from accelerate import Accelerator

    from vit2cbsa.train.checkpoints import save_checkpoint

    acc = Accelerator(cpu=True)
    model = acc.prepare(torch.nn.Linear(3, 2))
    acc.register_for_checkpointing(model)
    folder = save_checkpoint(acc, tmp_path / "checkpoints", {"global_step": 3, "stage": "finetune"}, keep=2)
    got = modes(folder)
    assert any(k.endswith((".safetensors", ".bin", ".pkl", ".json")) for k in got) and len(got) >= 3
    assert got == expected(folder, umask)
