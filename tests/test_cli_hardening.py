"""One model resolver for every command (vit2cbsa.loading), no code from model folders, explain in the help,
FLOPs on fake tensors, the representative grid actually used. Tiny random-weight models; no network."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import huggingface_hub
import pytest
import timm
import torch
import transformers

import vit2cbsa
from vit2cbsa import loading
from vit2cbsa.hub import from_pretrained, save_pretrained
from vit2cbsa.errors import LoadError
from vit2cbsa.loading import load, resolve
from vit2cbsa.measure import count_flops
from vit2cbsa.modeling import forward_pixels
from vit2cbsa.zoo import TEACHER_DIR, load_cifar10_teacher
from test_cli import run, tiny_timm  # noqa: E402  (shared helpers: the command in-process, a tiny timm ViT)

HAS_TEACHER = (TEACHER_DIR / "model.safetensors").is_file()
needs_teacher = pytest.mark.skipif(not HAS_TEACHER, reason="the embedded CIFAR-10 teacher is not trained yet")


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path_factory):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path_factory.mktemp("hf_cache")))


@pytest.fixture(autouse=True)
def no_stdin(monkeypatch):
    """Nothing may ask the user anything: reading stdin fails the test."""
    class NoStdin:
        def read(self, *a):
            raise AssertionError("stdin was read")
        readline = readlines = read

        def fileno(self):
            raise AssertionError("stdin was read")

        def isatty(self):
            return True

    monkeypatch.setattr(sys, "stdin", NoStdin())
    monkeypatch.setattr("builtins.input", lambda *a: (_ for _ in ()).throw(AssertionError("input() was called")))




@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf") / "vit"
    torch.manual_seed(0)
    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                    image_size=32, patch_size=8, num_labels=3,
                                    id2label={0: "cat", 1: "dog", 2: "fox"}, label2id={"cat": 0, "dog": 1, "fox": 2})
    transformers.ViTForImageClassification(config).save_pretrained(folder)
    transformers.ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.1, 0.2, 0.3],
                                   image_std=[0.4, 0.5, 0.6]).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def timm_dir(tmp_path_factory):
    from timm.models import save_for_hf

    folder = tmp_path_factory.mktemp("timm") / "vit"
    save_for_hf(tiny_timm(), str(folder), safe_serialization=True)
    return folder


EVIL = '''
from pathlib import Path
Path(__file__).with_name("MARKER").write_text("the folder's code ran")
'''


def evil_folder(root: Path, model_type: str = "evil_vit", auto_map: bool = True, processor_auto_map: bool = False):
    """A model folder whose config asks transformers to run its own code: that code would leave a MARKER file."""
    folder = root / f"evil-{model_type}-{auto_map}-{processor_auto_map}"
    folder.mkdir()
    config = {"model_type": model_type, "architectures": ["EvilModel"], "hidden_size": 32}
    if auto_map:
        config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModel": "evil.EvilModel"}
    (folder / "config.json").write_text(json.dumps(config))
    if processor_auto_map:
        (folder / "preprocessor_config.json").write_text(json.dumps(
            {"image_processor_type": "EvilProcessor", "auto_map": {"AutoImageProcessor": "evil.EvilProcessor"}}))
    (folder / "evil.py").write_text(EVIL)
    return folder


# --------------------------------------------------------------------------- help lists explain


def test_help_and_invalid_choice_list_explain(capsys):
    code, out, _ = run(capsys, "--help")
    assert code == 0 and "explain" in out and "save the attention maps of one image as a PNG" in out
    assert "cifar10-teacher" in out
    code, _, err = run(capsys, "no-such-command")
    assert code == 2 and "invalid choice: 'no-such-command' (choose from 'convert', 'inspect', 'push', 'export', 'explain')" in err
    code, out, _ = run(capsys, "explain", "--help")
    assert code == 0 and out.startswith("usage: vit2cbsa explain")
    code, out, _ = run(capsys, "--traceback", "explain", "--help")  # a global option first: still explain's parser
    assert code == 0 and out.startswith("usage: vit2cbsa explain")


# --------------------------------------------------------------------------- one resolver


def test_resolve_every_form(hf_dir, timm_dir, tmp_path):
    saved = save_pretrained(vit2cbsa.convert(tiny_timm(), "cbsa", 4), tmp_path / "saved")
    assert resolve("cifar10-teacher").kind == "teacher"
    assert (resolve(str(saved)).kind, resolve(str(hf_dir)).kind, resolve(str(timm_dir)).kind) == \
        ("vit2cbsa", "transformers", "timm-dir")
    assert resolve("vit_tiny_patch16_224").kind == resolve("timm:vit_tiny_patch16_224").kind == "timm"
    assert resolve("hf-hub:timm/vit_tiny_patch16_224.augreg_in21k").kind == "timm"
    assert resolve(f"hf:{hf_dir}").kind == "transformers"
    with pytest.raises(LoadError, match=r"^hf:.* is not a transformers model folder"):
        resolve(f"hf:{timm_dir}")
    with pytest.raises(LoadError, match=r"^'nope' is not a timm model name"):
        resolve("timm:nope")
    with pytest.raises(LoadError, match="is a file"):
        resolve(str(hf_dir / "config.json"))


def test_load_returns_one_shape(hf_dir, timm_dir):
    hf = load(str(hf_dir))
    assert (hf.library, hf.source.kind, hf.pretrained) == ("transformers", "transformers", True)
    assert type(hf.model).__name__ == "ViTForImageClassification" and not hf.model.training
    assert hf.class_names == ["cat", "dog", "fox"]
    assert hf.data_config == {"input_size": [3, 32, 32], "mean": [0.1, 0.2, 0.3], "std": [0.4, 0.5, 0.6]}
    assert type(hf.image_processor).__name__.startswith("ViTImageProcessor")
    random_hf = load(str(hf_dir), pretrained=False)
    assert not random_hf.pretrained and not torch.equal(random_hf.model.classifier.weight, hf.model.classifier.weight)

    tm = load(str(timm_dir))
    assert (tm.library, tm.source.kind) == ("timm", "timm-dir")
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(tm.model(x), tiny_timm()(x))  # the checkpoint's weights
    assert tm.data_config["input_size"] == [3, 32, 32] and tm.data_config["interpolation"] == "bicubic"

    name = load("vit_tiny_patch16_224", pretrained=False, img_size=(32, 48))
    assert name.data_config["input_size"] == [3, 32, 48] and name.model.patch_embed.grid_size == (2, 3)
    assert name.class_names is not None and len(name.class_names) == 1000 and name.class_names[0] == "tench"
    assert name.base_model is None and not name.pretrained


def test_load_timm_checkpoint_path_and_transformers_task(hf_dir, tmp_path):
    path = tmp_path / "w.pth"
    torch.save(tiny_timm().state_dict(), path)
    got = load("timm:vit_tiny_patch16_224", checkpoint_path=str(path),
               model_kwargs=dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5))
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(got.model(x), tiny_timm()(x)) and got.pretrained
    with pytest.raises(LoadError, match="checkpoint file .* does not exist"):
        load("vit_tiny_patch16_224", checkpoint_path=str(tmp_path / "missing.pth"))
    with pytest.raises(LoadError, match="checkpoint_path is for timm models"):
        load(str(hf_dir), checkpoint_path=str(path))
    relabelled = load(str(hf_dir), task="image-classification",
                      model_kwargs=dict(num_labels=7, ignore_mismatched_sizes=True))
    assert relabelled.model.classifier.out_features == 7


def test_load_as_a_classifier_of_n_classes(hf_dir, timm_dir):
    """What examples/finetune.py needs: a head for the dataset's classes, and which modules are the head."""
    names = [f"c{i}" for i in range(7)]
    hf = load(str(hf_dir), num_classes=7, class_names=names)
    assert hf.head_reset and hf.model.classifier.out_features == 7 and hf.class_names == names
    assert hf.head_names == ["classifier"] and hf.model.config.id2label[6] == "c6"
    same = load(str(hf_dir), num_classes=3)
    assert not same.head_reset and same.class_names == ["cat", "dog", "fox"]
    tm = load(str(timm_dir), num_classes=7)
    assert tm.head_reset and tm.model.head.out_features == 7 and tm.class_names is None and tm.head_names == ["head"]
    assert not load(str(timm_dir), num_classes=5).head_reset
    with pytest.raises(LoadError, match="2 class names for 7 classes"):
        load(str(timm_dir), num_classes=7, class_names=["a", "b"])


def test_timm_name_offline(capsys):
    with pytest.raises(LoadError, match=r"^cannot load the pretrained weights of timm model 'vit_tiny_patch16_224' "
                                        r".*pass a local path instead"):
        load("vit_tiny_patch16_224")
    said = []
    got = load("vit_tiny_patch16_224", fallback_to_random=True, warn=said.append, img_size=32)
    assert not got.pretrained and len(said) == 1 and "using RANDOM weights" in said[0]


@needs_teacher
def test_teacher_loads_everywhere(capsys, tmp_path):
    teacher = load("cifar10-teacher")
    model, config = load_cifar10_teacher()
    assert (teacher.library, teacher.source.kind) == ("timm", "teacher") and teacher.config == config
    assert teacher.class_names[:2] == ["airplane", "automobile"]
    assert teacher.data_config["input_size"] == [3, 32, 32] and teacher.data_config["mean"] == config["mean"]
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(teacher.model(x), model(x))
    three = load("cifar10-teacher", num_classes=3)
    assert three.head_reset and three.model.head.out_features == 3 and three.class_names is None
    with pytest.raises(LoadError, match="the embedded teacher loads as trained"):
        load("cifar10-teacher", img_size=64)

    # inspect: the teacher's architecture (no weights needed), at its own resolution and another one
    code, out, err = run(capsys, "inspect", "cifar10-teacher", "--representatives", "4x4", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert (report["source"], report["class"], report["patch_grid"]) == ("teacher", "VisionTransformer", [8, 8])
    assert len(report["attention_layers"]) == 6 and report["warnings"] == [] and err == ""
    code, out, err = run(capsys, "inspect", "cifar10-teacher", "--resolution", "64", "--json")
    assert code == 0, err
    assert json.loads(out)["patch_grid"] == [16, 16]

    # convert: the trained teacher, saved with its preprocessing; loads back to the same outputs
    code, out, err = run(capsys, "convert", "cifar10-teacher", "--representatives", "4", "--out", str(tmp_path / "t"))
    assert code == 0, err
    assert sorted(os.listdir(tmp_path / "t")) == ["model.safetensors", "preprocessor_config.json",
                                                  "vit2cbsa_config.json"]
    expected = vit2cbsa.convert(load_cifar10_teacher()[0], "cbsa", 4)
    with torch.no_grad():
        torch.testing.assert_close(from_pretrained(tmp_path / "t")(x), expected(x))
    saved = load(str(tmp_path / "t"))
    assert saved.converted and saved.data_config["mean"] == pytest.approx(config["mean"])
    assert saved.data_config["std"] == pytest.approx(config["std"])


# --------------------------------------------------------------------------- never running a folder's code


@pytest.mark.parametrize("argv", [
    ["inspect", "{folder}"],
    ["convert", "{folder}", "--out", "{out}"],
    ["explain", "{folder}", "{image}", "--out", "{out}.png"],
])
def test_a_folder_asking_to_run_its_code_is_refused_in_process(capsys, tmp_path, argv):
    from PIL import Image

    folder = evil_folder(tmp_path)
    image = tmp_path / "img.png"
    Image.new("RGB", (40, 30), (120, 30, 200)).save(image)
    argv = [a.format(folder=folder, out=tmp_path / "out", image=image) for a in argv]
    code, out, err = run(capsys, *argv)
    assert code == 1 and out == ""
    assert err.count("\n") == 1, err
    assert "asks to run its own code (config.json has an auto_map: AutoConfig, AutoModel), which vit2cbsa never " \
           "does (trust_remote_code=False)" in err
    assert not (folder / "MARKER").exists() and not (tmp_path / "out").exists()


def test_a_folder_asking_to_run_its_code_is_refused_by_the_command(tmp_path):
    """The real entry point, in a fresh process, with an answer waiting on stdin: it is never read."""
    folder = evil_folder(tmp_path)
    script = Path(sys.executable).with_name("vit2cbsa")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "vit2cbsa.cli"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "cache"))
    proc = subprocess.run(cmd + ["inspect", str(folder)], input="y\n", env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 1 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0] == (f"vit2cbsa: error: {folder} asks to run its own code (config.json has an auto_map: AutoConfig, "
                        "AutoModel), which vit2cbsa never does (trust_remote_code=False); use a model whose "
                        "architecture is built into transformers, such as ViT, DeiT, DINOv2, CLIP or SigLIP")
    assert not (folder / "MARKER").exists()


def test_unknown_model_type_and_processor_auto_map_are_refused(tmp_path, hf_dir):
    import shutil

    with pytest.raises(LoadError, match=r"has model_type 'evil_vit', which transformers .* does not know: the folder "
                                        r"asks to run its own code, which vit2cbsa never does"):
        load(str(evil_folder(tmp_path, auto_map=False)))
    folder = tmp_path / "hf-evil-processor"
    shutil.copytree(hf_dir, folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(
        {"image_processor_type": "EvilProcessor", "auto_map": {"AutoImageProcessor": "evil.EvilProcessor"}}))
    (folder / "evil.py").write_text(EVIL)
    with pytest.raises(LoadError, match=r"asks to run its own code \(preprocessor_config.json has an auto_map: "
                                        r"AutoImageProcessor\)"):
        load(str(folder))
    assert not (folder / "MARKER").exists()


def test_a_hub_repo_asking_to_run_its_code_is_refused(tmp_path, monkeypatch):
    folder = evil_folder(tmp_path)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, **kw: str(folder))
    with pytest.raises(LoadError, match=r"^Hub repo 'user/evil' asks to run its own code"):
        load("user/evil", pretrained=False)
    assert not (folder / "MARKER").exists()


def test_every_transformers_call_passes_trust_remote_code_false():
    """A source check of the files this task owns: every from_pretrained / from_config call says
    trust_remote_code=False (the hub and the training code have their own checks)."""
    import ast

    import vit2cbsa.cli

    calls = 0
    files = [f for package in (loading, vit2cbsa.cli) for f in sorted(Path(package.__file__).parent.glob("*.py"))]
    assert len(files) >= 8
    for file in files:
        for node in ast.walk(ast.parse(file.read_text())):
            # X.from_pretrained(...) / X.from_config(...): transformers (vit2cbsa's own from_pretrained is a name)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
                    node.func.attr in ("from_pretrained", "from_config"):
                calls += 1
                kw = {k.arg: ast.unparse(k.value) for k in node.keywords}
                assert kw.get("trust_remote_code") == "False", ast.unparse(node)
    assert calls >= 4


# --------------------------------------------------------------------------- FLOPs on fake tensors


def test_fake_tensor_flops_equal_the_real_count(hf_dir):
    from vit2cbsa import pooling

    base = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=(64, 96), patch_size=16,
                             embed_dim=32, depth=2, num_heads=2).eval()  # a 4x6 patch grid
    x = torch.randn(1, 3, 64, 96)
    models = {"softmax": base,
              "cbsa 3x4 (unequal windows)": vit2cbsa.convert(copy.deepcopy(base), "cbsa", (3, 4)),
              "contraction_free 2x3": vit2cbsa.convert(copy.deepcopy(base), "contraction_free", (2, 3)),
              "linear": vit2cbsa.convert(copy.deepcopy(base), "linear")}
    pooling._MATRICES.clear()
    for name, model in models.items():
        with torch.no_grad():
            before = model(x)
        fake, real = count_flops(model, x), count_flops(model, x, fake=False)
        assert fake == real > 0, name
        with torch.no_grad():
            assert torch.equal(model(x), before), name  # counting changed nothing
    # the averaging matrix built on fake tensors was not cached for real ones
    from torch._subclasses.fake_tensor import is_fake
    assert pooling._MATRICES and not any(is_fake(m) for m in pooling._MATRICES.values())

    hf = transformers.ViTForImageClassification.from_pretrained(hf_dir).eval()
    pixels = torch.randn(1, 3, 48, 32)  # interpolated position embeddings
    for model in (hf, vit2cbsa.convert(copy.deepcopy(hf), "cbsa", 4)):
        assert count_flops(forward_pixels, model, pixels) == count_flops(forward_pixels, model, pixels, fake=False)


def test_count_flops_falls_back_to_real_tensors_for_data_dependent_calls():
    w = torch.randn(8, 8)

    def fn(x):
        rows = torch.nonzero(x[:, 0] > 0)[:, 0]  # a data-dependent shape: fake tensors cannot say it
        return x[rows] @ w

    x = torch.tensor([[1.0] * 8, [-1.0] * 8, [2.0] * 8])
    assert count_flops(fn, x) == count_flops(fn, x, fake=False) == 2 * 2 * 8 * 8


def _vit_tiny_flops(num_tokens, grid, depth=12, dim=192, heads=3, classes=1000, patch=16):
    """Softmax ViT-Ti FLOPs by hand: qkv, proj, MLP and attention per block, the patch embedding and the head."""
    n, d = num_tokens, dim // heads
    block = 2 * n * dim * 3 * dim + 2 * n * dim * dim + 2 * 2 * n * dim * 4 * dim + 2 * 2 * heads * n * n * d
    return depth * block + 2 * grid[0] * grid[1] * 3 * patch * patch * dim + 2 * dim * classes


def test_inspect_at_4096_takes_seconds(capsys):
    start = time.perf_counter()
    code, out, err = run(capsys, "inspect", "vit_tiny_patch16_224", "--resolution", "4096x4096", "--json")
    elapsed = time.perf_counter() - start
    assert code == 0, err
    report = json.loads(out)
    assert report["patch_grid"] == [256, 256] and report["num_tokens"] == 65537
    assert report["flops_before"] == _vit_tiny_flops(65537, (256, 256)) == 40_298_749_624_320
    assert report["flops_after"] < report["flops_before"] / 40
    assert elapsed < 60, f"inspect at 4096x4096 took {elapsed:.0f} s"  # a real forward pass takes ~9 minutes


def test_inspect_flops_match_the_formula_and_a_real_count(capsys):
    code, out, err = run(capsys, "inspect", "vit_tiny_patch16_224", "--resolution", "64x96", "--json",
                         "--representatives", "3x4")
    assert code == 0, err
    report = json.loads(out)
    assert report["flops_before"] == _vit_tiny_flops(1 + 4 * 6, (4, 6))
    base = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=(64, 96)).eval()
    converted = vit2cbsa.convert(copy.deepcopy(base), "cbsa", (3, 4))
    assert report["flops_after"] == count_flops(converted, torch.zeros(1, 3, 64, 96), fake=False)


# --------------------------------------------------------------------------- the representative grid used


def test_inspect_says_which_grid_is_used_and_warns_when_nothing_is_saved(capsys):
    code, out, err = run(capsys, "inspect", "vit_tiny_patch16_224", "--representatives", "10000")
    assert code == 0
    assert "conversion: variant 'cbsa', 14x14=196 pooled (100x100 asked, clamped to the 14x14 patch grid) + 1 prefix " \
           "(read back by that token alone) representatives per head" in out
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "vit2cbsa: warning: 100x100 representatives are not fewer than the 14x14=196 patches of a 224x224 input: "
        "every patch is its own representative (14x14 used), so the converted layers save nothing there and cost "
        "more than softmax; use fewer than 14x14, e.g. 7x7 (FLOPs +")
    code, out, err = run(capsys, "inspect", "vit_tiny_patch16_224", "--representatives", "10000", "--json")
    report = json.loads(out)
    assert report["representative_grid_used"] == [14, 14] and report["representatives_per_head"] == 197
    assert report["conversion"]["num_representatives"] == [100, 100]
    assert len(report["warnings"]) == 1 and report["flops_after"] > report["flops_before"]
    # the same grid at a resolution where it is smaller than the patch grid: no warning
    code, out, err = run(capsys, "inspect", "vit_tiny_patch16_224", "--representatives", "8x8", "--resolution", "448",
                         "--json")
    report = json.loads(out)
    assert err == "" and report["warnings"] == [] and report["representative_grid_used"] == [8, 8]
    assert report["representatives_per_head"] == 65 and report["flops_after"] < report["flops_before"]


def test_convert_warns_once_in_one_line(capsys, timm_dir, tmp_path):
    code, out, err = run(capsys, "convert", str(timm_dir), "--representatives", "4x4", "--out", str(tmp_path / "o"))
    assert code == 0
    assert err == ("vit2cbsa: warning: 4x4 representatives are not fewer than the 4x4=16 patches of the model's own "
                   "input size: every patch is its own representative (4x4 used), so the converted layers save "
                   "nothing there and cost more than softmax; use fewer than 4x4, e.g. 2x2\n")
    assert "4x4=16 pooled + one per prefix token" in out


# --------------------------------------------------------------------------- explain uses the same resolver


def test_explain_reads_every_form_convert_reads(capsys, tmp_path, timm_dir):
    from PIL import Image

    from vit2cbsa.cli import explain_main

    image = tmp_path / "img.png"
    Image.new("RGB", (50, 40), (10, 200, 30)).save(image)
    assert explain_main([str(timm_dir) + ":cbsa", str(image), "--representatives", "4", "--out",
                         str(tmp_path / "a.png")]) == 0
    assert "1:cbsa" in capsys.readouterr().out
    assert explain_main(["user/not-cached", str(image)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot reach Hub repo 'user/not-cached'" in err
