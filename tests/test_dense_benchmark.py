"""benchmarks/dense.py: the mosaic builder and tiled position code, mIoU and patch labels, and a whole run on a
tiny local images/ + masks/ folder with a tiny random-weight timm ViT (saved as a local timm folder)."""

import copy
import json

import numpy as np
import pytest

from helpers import load_benchmark
import torch
from PIL import Image

TINY = dict(img_size=64, patch_size=8, embed_dim=32, depth=2, num_heads=2)


@pytest.fixture(scope="module")
def dense():
    return load_benchmark("dense")


def tiny_vit():
    import timm

    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, dynamic_img_size=True, **TINY).eval()


def coded_pool(n=20, t=32, period=8):
    """Pool images whose pixels say where they come from: channel 0 = pool index, 1 / 2 = the in-tile patch
    row / column; labels = index % 10."""
    patch = t // period
    rows = (torch.arange(t) // patch)[:, None].expand(t, t)
    pool = torch.stack([torch.stack([torch.full((t, t), i), rows, rows.T]) for i in range(n)]).to(torch.uint8)
    return pool, torch.arange(n) % 10


def test_mosaics_label_patches_by_tile_and_shift_off_the_window_grid(dense):
    pool, labels = coded_pool()
    s = dense.make_mosaics(pool, labels, 40, 2, 8, np.random.default_rng(0))
    assert s.images.shape == (40, 3, 64, 64) and s.labels.shape == (40, 16, 16) and s.phases.shape == (40, 2)
    assert set(s.phases.flatten().tolist()) <= {1, 2, 3, 5, 6, 7} == set(dense.mosaic_offsets(8))
    assert len(set(s.phases.flatten().tolist())) > 3  # random per image
    cells = s.images.view(40, 3, 16, 4, 16, 4)
    assert (cells == cells[:, :, :, :1, :, :1]).all()  # whole patches: every patch lies in one tile
    src = cells[:, :, :, 0, :, 0].long()  # 40 x 3 x 16 x 16
    assert torch.equal(labels[src[:, 0]], s.labels)  # a patch's label is its tile's class
    # the patch's position inside its tile is the phase of the tiled position code
    grid_code = torch.stack(torch.meshgrid(torch.arange(8), torch.arange(8), indexing="ij"), -1)  # 8 x 8 x 2
    code = dense.PositionTiler.code(grid_code, 16, 16, s.phases).view(40, 16, 16, 2)
    assert torch.equal(code.permute(0, 3, 1, 2), src[:, 1:])
    # a tile border never falls on a multiple of 4 patches
    border = s.labels[:, :, 1:] != s.labels[:, :, :-1]
    assert not border[:, :, 3::4].any()


def test_tiled_position_code_at_phase_0_is_the_models_own(dense):
    model, x = tiny_vit(), torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = model.forward_features(x)
        tiler = dense.PositionTiler()
        tiler.install(model)
        tiler.phases = torch.zeros(2, 2, dtype=torch.long)
        assert torch.allclose(model.forward_features(x), ref, atol=1e-6)
        copied = copy.deepcopy(model)  # the copy's tiling uses the copy's own embedding
        assert copied._pos_embed.__self__ is copied
        copied.pos_embed.add_(torch.randn_like(copied.pos_embed))
        assert not torch.allclose(copied.forward_features(x), ref, atol=1e-3)
        tiler.phases = torch.tensor([[3, 5], [1, 2]])
        big = torch.randn(2, 3, 128, 128)
        assert model.forward_features(big).shape == (2, 257, 32)


def test_miou_against_a_hand_computed_example(dense):
    target = torch.tensor([0, 0, 1, 1, 2, 255, 7])
    pred = torch.tensor([0, 1, 1, 1, 0, 2, 3])
    r = dense.miou(pred, target, num_classes=4)  # 255 and 7 (>= 4 classes) ignored
    # class 0: TP 1, FP 1, FN 1 -> 1/3; class 1: TP 2, FP 1 -> 2/3; class 2: FN 1 -> 0; class 3 absent
    assert r["iou"] == pytest.approx([1 / 3, 2 / 3, 0.0, None])
    assert r["miou"] == pytest.approx(1 / 3)
    assert r["pixel_accuracy"] == pytest.approx(3 / 5)


def test_patch_labels_take_the_majority_and_ignore_255(dense):
    mask = torch.tensor([[1, 1, 2, 255],
                         [1, 2, 255, 255],
                         [0, 0, 9, 9],
                         [0, 3, 9, 9]], dtype=torch.uint8)
    assert dense.patch_labels(mask, 2, num_classes=4).tolist() == [[1, 2], [0, 255]]


def test_window_global_blocks_as_vitdet(dense):
    assert dense.global_blocks(12, 4) == [2, 5, 8, 11]
    assert dense.global_blocks(6, 2) == [2, 5]


@pytest.fixture(scope="module")
def tiny_run(dense, tmp_path_factory):
    from timm.models import save_for_hf

    root = tmp_path_factory.mktemp("dense")
    save_for_hf(tiny_vit(), root / "model", model_args=TINY, safe_serialization=True)
    rng = np.random.default_rng(0)
    for d in ("images", "masks"):
        (root / "data" / d).mkdir(parents=True)
    for i in range(6):
        blocks = rng.integers(0, 4, (4, 4))
        blocks[0, 0] = 255
        mask = np.kron(blocks, np.ones((16, 16), dtype=np.int64)).astype(np.uint8)
        img = rng.integers(0, 256, (64, 64, 3)).astype(np.uint8)
        img[..., 0] = np.where(mask == 255, 0, mask * 60)  # the class shows in the red channel
        Image.fromarray(img).save(root / "data" / "images" / f"{i:02d}.jpg")
        Image.fromarray(mask).save(root / "data" / "masks" / f"{i:02d}.png")
    out = root / "out"
    result = dense.main(["--model", str(root / "model"), "--dataset", str(root / "data"), "--resolution", "64,128",
                         "--num-classes", "4", "--methods", "original,cbsa,hybrid,window", "--no-vit-s",
                         "--repeats", "1", "--probe-epochs", "3", "--train-images", "4", "--test-images", "2",
                         "--threads", "1", "--out", str(out)])
    return result, out


def test_run_on_a_local_folder_writes_sane_metrics(tiny_run, dense):
    result, out = tiny_run
    saved = json.loads((out / "dense.json").read_text())
    assert saved["token_counts"] == result["token_counts"] == [65, 257]
    assert set(saved["code"]) == {"commit", "vit2cbsa_dirty"}
    assert (out / "dense.md").is_file() and (out / "dense.png").stat().st_size > 0
    res = saved["results"]
    for name in ("original", "cbsa", "hybrid"):
        for t in ("65", "257"):
            r = res[name][t]
            for key in ("miou", "pixel_accuracy", "miou_original_probe"):
                assert 0.0 <= r[key] <= 1.0
            assert -1.0 <= r["patch_cosine"] <= 1.0 + 1e-6 and len(r["patch_cosine_layers"]) == 2
            assert r["flops"] > 0 and r["speedup"] > 0
    for t in ("65", "257"):
        orig = res["original"][t]
        assert orig["patch_cosine"] == pytest.approx(1.0, abs=1e-5)
        assert orig["class_cosine"] == pytest.approx(1.0, abs=1e-5)
        assert orig["patch_cosine_layers"] == pytest.approx([1.0, 1.0], abs=1e-5)
        assert orig["miou"] == orig["miou_original_probe"]
        assert res["cbsa"][t]["patch_cosine"] < 1.0
    assert res["cbsa"]["257"]["flops"] < res["original"]["257"]["flops"]
    assert saved["methods"]["hybrid"]["by_tokens"]["257"]["config"]["layers"] == "1:"
    window = res["window"]["257"]
    assert "error" in window or 0.0 <= window["miou"] <= 1.0  # skipped where vit2cbsa has no window variant
    # re-rendering from the JSON gives the same tables
    md = (out / "dense.md").read_text()
    dense.main(["--from-json", str(out / "dense.json")])
    assert (out / "dense.md").read_text() == md


def test_run_on_a_transformers_folder(tiny_run, dense, tmp_path):
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    config = ViTConfig(image_size=64, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=64, num_labels=3)
    ViTForImageClassification(config).save_pretrained(tmp_path / "hf")
    data = tiny_run[1].parent / "data"
    result = dense.main(["--model", str(tmp_path / "hf"), "--dataset", str(data), "--resolution", "128",
                         "--num-classes", "4", "--methods", "original,cbsa", "--no-vit-s", "--repeats", "1",
                         "--probe-epochs", "2", "--threads", "1", "--out", str(tmp_path / "out")])
    assert result["prefix_tokens"] == 1 and result["blocks"] == 2 and result["token_counts"] == [257]
    orig, cbsa = result["results"]["original"]["257"], result["results"]["cbsa"]["257"]
    assert orig["patch_cosine"] == pytest.approx(1.0, abs=1e-5) and 0.0 <= cbsa["miou"] <= 1.0
    assert cbsa["flops"] < orig["flops"]
