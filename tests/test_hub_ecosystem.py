"""A saved folder among transformers, timm and PEFT: Auto classes and pipeline() after ``import vit2cbsa``,
loud refusals without it, no remote code ever, stale temporary folders cleaned, PEFT wrappers explained."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import timm
import torch
import transformers
from PIL import Image

import vit2cbsa
from vit2cbsa.hub import from_pretrained, save_pretrained
from test_hub import _forge, converted, offline, one_thread

FIXTURES = (offline, one_thread)  # test_hub's fixtures (no network, one thread), found by pytest under these names

ASSETS = os.path.join(os.path.dirname(vit2cbsa.__file__), "assets", "cifar10_test_samples.npz")


def _classifier(num_labels=3, names=("cat", "dog", "ship")):
    cfg = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                 image_size=32, patch_size=8, num_labels=num_labels,
                                 id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)})
    torch.manual_seed(0)
    model = vit2cbsa.convert(transformers.ViTForImageClassification(cfg).eval(), "cbsa", (2, 2))
    with torch.no_grad():
        for p in vit2cbsa.new_parameters(model):
            p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.fixture
def hf_folder(tmp_path):
    model = _classifier()
    processor = transformers.ViTImageProcessor(size={"height": 32, "width": 32})
    return model, save_pretrained(model, tmp_path / "out", image_processor=processor)


def test_plain_transformers_refuses_the_folder_instead_of_loading_softmax(hf_folder):
    _, folder = hf_folder
    code = f"import transformers; transformers.AutoModelForImageClassification.from_pretrained({str(folder)!r})"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert proc.returncode != 0 and "model type `vit2cbsa`" in proc.stderr


def test_auto_classes_load_the_converted_model_after_import(hf_folder):
    model, folder = hf_folder
    x = torch.randn(2, 3, 32, 32)
    loaded = transformers.AutoModelForImageClassification.from_pretrained(str(folder))
    assert isinstance(loaded, transformers.ViTForImageClassification) and loaded.vit2cbsa_info.variant == "cbsa"
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixel_values=x).logits, model(pixel_values=x).logits, rtol=0, atol=0)
    base = transformers.AutoModel.from_pretrained(str(folder))
    assert isinstance(base, transformers.ViTModel) and base.vit2cbsa_info.variant == "cbsa"
    with torch.no_grad():
        torch.testing.assert_close(base(pixel_values=x).last_hidden_state,
                                   model.vit(pixel_values=x).last_hidden_state, rtol=0, atol=0)
    with pytest.raises(TypeError, match="does not take overrides of id2label, label2id"):
        transformers.AutoModelForImageClassification.from_pretrained(str(folder), num_labels=7)


def test_auto_classes_resolve_the_folder_once(hf_folder, monkeypatch):
    import vit2cbsa.hub.load as hub_load
    import vit2cbsa.hub.transformers_auto as auto

    _, folder = hf_folder
    calls = []
    real = hub_load.resolve_folder

    def counted(*args, **kwargs):
        calls.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(hub_load, "resolve_folder", counted)
    monkeypatch.setattr(auto, "resolve_folder", counted)
    transformers.AutoModelForImageClassification.from_pretrained(str(folder))
    assert calls == [str(folder)]


def test_auto_head_class_on_a_headless_folder_says_what_to_use(tmp_path):
    cfg = transformers.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                 image_size=32, patch_size=8)
    folder = save_pretrained(vit2cbsa.convert(transformers.ViTModel(cfg), "linear"), tmp_path / "base")
    with pytest.raises(ValueError, match="without an image classification head; load it with AutoModel"):
        transformers.AutoModelForImageClassification.from_pretrained(str(folder))


def test_pipeline_on_a_real_photo(hf_folder):
    model, folder = hf_folder
    photos = np.load(ASSETS)
    image = Image.fromarray(photos["images"][0])  # a real CIFAR-10 test photo, 32x32
    classify = transformers.pipeline("image-classification", model=str(folder))
    preds = classify(image, top_k=3)
    processor = transformers.ViTImageProcessor(size={"height": 32, "width": 32})
    with torch.no_grad():
        probs = model(**processor(image, return_tensors="pt")).logits.softmax(-1)[0]
    expected = sorted(((float(p), name) for p, name in zip(probs, ("cat", "dog", "ship"))), reverse=True)
    assert [p["label"] for p in preds] == [name for _, name in expected]
    assert np.allclose([p["score"] for p in preds], [p for p, _ in expected], atol=1e-6)


REMOTE_CODE = {
    "model_type": "totally_custom_vit",
    "auto_map": {"AutoConfig": "evil.EvilConfig", "AutoModel": "evil.EvilModel"},
}
EVIL = "import pathlib\npathlib.Path({marker!r}).write_text('code from the checkpoint ran')\n"


@pytest.mark.parametrize("wrapped", [True, False])
def test_a_folder_asking_for_remote_code_is_refused_without_reading_stdin(hf_folder, tmp_path, wrapped):
    """Even with the binding forged (an attacker writes every file), a config.json with custom code is refused
    in one line; stdin holds 'y' in case anything asked, and the folder's Python file never runs."""
    _, folder = hf_folder
    marker = tmp_path / "ran"
    (folder / "evil.py").write_text(EVIL.format(marker=str(marker)))
    config = json.loads((folder / "config.json").read_text())
    if wrapped:
        config["base_config"].update(REMOTE_CODE)
    else:
        config = REMOTE_CODE
    (folder / "config.json").write_text(json.dumps(config))
    _forge(folder, lambda c: c["files"].update({"evil.py": {"size": 0, "sha256": ""}}))
    code = textwrap.dedent(f"""
        import vit2cbsa
        try:
            vit2cbsa.from_pretrained({str(folder)!r})
        except vit2cbsa.CheckpointError as e:
            print("REFUSED", e)
    """)
    proc = subprocess.run([sys.executable, "-c", code], input="y\ny\n", capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    refused = [line for line in proc.stdout.splitlines() if line.startswith("REFUSED")]
    assert len(refused) == 1 and "asks to run the folder's own Python code" in refused[0]
    assert "never runs code from a checkpoint" in refused[0]
    assert not marker.exists()


def test_timm_refuses_a_converted_folder(tmp_path):
    """timm's own loaders do not turn the folder into a softmax model: no config.json for local-dir:, and
    loading the file strictly fails on the CBSA parameters."""
    torch.manual_seed(0)
    model = vit2cbsa.convert(timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8,
                                               embed_dim=32, depth=1, num_heads=2), "cbsa", 4)
    folder = save_pretrained(model, tmp_path / "timm")
    with pytest.raises(FileNotFoundError, match="config.json"):
        timm.create_model(f"local-dir:{folder}")
    with pytest.raises(RuntimeError, match=r"Unexpected key\(s\) in state_dict: .*attn\.mixer"):
        timm.create_model("vit_tiny_patch16_224", pretrained=True, img_size=32, patch_size=8, embed_dim=32, depth=1,
                          num_heads=2, pretrained_cfg_overlay=dict(file=str(folder / "model.safetensors")))


def test_killed_saves_leave_no_temporary_folders_behind_the_next_save(tmp_path):
    from vit2cbsa.hub.io import HOST

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    stale = [tmp_path / f".out.tmp-{HOST}--{dead_pid}--abc", tmp_path / f".out.old-{HOST}--{dead_pid}--abc",
             tmp_path / ".out.tmp-k2j4h5g6"]  # the last: written by an older vit2cbsa, untouched for two hours
    live = [tmp_path / f".out.tmp-{HOST}--{os.getpid()}--def",  # a save in progress in a live process
            tmp_path / ".out.tmp-recent1", tmp_path / ".other.tmp-x"]
    for d in stale + live:
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"\0" * 1000)
    old = time.time() - 7200
    os.utime(stale[2], (old, old))
    save_pretrained(converted("timm_vit"), tmp_path / "out")
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted(["out"] + [d.name for d in live])


def test_saving_a_peft_wrapper_says_how(tmp_path):
    import peft

    model = converted("timm_vit")
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["qkv"]))
    with pytest.raises(TypeError, match=r"PEFT PeftModel .*save_pretrained\(model\.merge_and_unload\(\), \.\.\.\)"):
        save_pretrained(wrapped, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("library", ["timm", "transformers"])
def test_class_names_are_kept_through_save_and_load(tmp_path, library):
    names = ["airplane", "automobile", "bird"]
    if library == "timm":
        torch.manual_seed(0)
        model = vit2cbsa.convert(timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8,
                                                   embed_dim=32, depth=1, num_heads=2, num_classes=3), "cbsa", 4)
    else:
        model = _classifier()
    with pytest.raises(ValueError, match="2 class_names for a model with 3 classes"):
        save_pretrained(model, tmp_path / "bad", class_names=names[:2])
    loaded = from_pretrained(save_pretrained(model, tmp_path / "out", class_names=names))
    if library == "timm":
        assert list(loaded.pretrained_cfg["label_names"]) == names
        # ... and a model that carries its names keeps them without being told again
        again = from_pretrained(save_pretrained(loaded, tmp_path / "again"))
        assert list(again.pretrained_cfg["label_names"]) == names
    else:
        assert [loaded.config.id2label[i] for i in range(3)] == names
        assert model.config.id2label[0] == "cat"  # the saved model itself is not changed
