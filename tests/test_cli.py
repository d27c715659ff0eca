"""The ``vit2cbsa`` command line: convert / inspect / push, help text and one-line errors. No network."""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import pytest
import timm
import torch
import transformers
from vit2cbsa.measure import flop_counter

import vit2cbsa
from vit2cbsa.cli import main
from vit2cbsa.cli.parsing import parse_grid, parse_layers, parse_resolution
from vit2cbsa.hub import CONFIG_NAME, from_pretrained, read_config, save_pretrained


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path_factory):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path_factory.mktemp("hf_cache")))


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one thread, and a busy machine cannot slow them down much."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run(capsys, *argv):
    """Run the command in-process: (exit status, stdout, stderr)."""
    try:
        code = main(list(argv))
    except SystemExit as e:  # argparse: --help, usage errors
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def tiny_timm(**kw):
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32,
                             depth=2, num_heads=2, num_classes=5, **kw).eval()


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A local transformers model folder with an image processor, as `save_pretrained` writes it."""
    folder = tmp_path_factory.mktemp("hf") / "vit"
    torch.manual_seed(0)
    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                    image_size=32, patch_size=8, num_labels=3)
    transformers.ViTForImageClassification(config).save_pretrained(folder)
    transformers.ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def timm_dir(tmp_path_factory):
    """A local timm checkpoint folder (config.json + model.safetensors), as timm's save_for_hf writes it."""
    from timm.models import save_for_hf

    folder = tmp_path_factory.mktemp("timm") / "vit"
    save_for_hf(tiny_timm(), str(folder), safe_serialization=True)
    return folder


# --------------------------------------------------------------------------- parsing and help


def test_option_parsers():
    assert parse_grid("64") == 64 and parse_grid("4x8") == (4, 8)
    assert parse_resolution("224") == (224, 224) and parse_resolution("224x320") == (224, 320)
    assert parse_layers("all") is None and parse_layers("6:") == slice(6, None)
    assert parse_layers("0,2") == [0, 2] and parse_layers("-1") == [-1] and parse_layers("::2") == slice(None, None, 2)


@pytest.mark.parametrize("bad", ["x", "1:2:3:4", "0,,1", "2.5"])
def test_every_command_line_rejects_the_same_bad_layer_spec(bad, capsys):
    """vit2cbsa convert and examples/finetune.py take --layers from the same ConversionConfig field: the same
    one-line usage error for the same bad spec."""
    from vit2cbsa.train.config import add_arguments
    with pytest.raises(argparse.ArgumentTypeError, match="a slice such as 6:"):
        parse_layers(bad)
    with pytest.raises(SystemExit) as e:
        add_arguments(argparse.ArgumentParser(prog="finetune")).parse_args(
            ["--model", "m", "--dataset", "d", "--out", "o", "--layers", bad])
    assert e.value.code == 2 and "argument --layers: expected all, an index" in capsys.readouterr().err


def test_finetune_parses_specs_like_the_cli():
    from vit2cbsa import ConversionConfig
    from vit2cbsa.train import FinetuneConfig
    from vit2cbsa.train.config import add_arguments
    parser = add_arguments(argparse.ArgumentParser(prog="finetune"))
    for spec in ("all", "6:", "0,2", "-1", "::2"):
        ns = parser.parse_args(["--model", "m", "--dataset", "d", "--out", "o", "--layers", spec,
                                "--representatives", "8x4"])
        c = FinetuneConfig.from_arguments(ns).conversion
        assert c == ConversionConfig(num_representatives=(8, 4), layers=parse_layers(spec))
    ns = parser.parse_args(["--model", "m", "--dataset", "d", "--out", "o"])
    assert FinetuneConfig.from_arguments(ns).conversion == ConversionConfig()


def test_help_reads_like_a_man_page(capsys):
    code, out, _ = run(capsys, "--help")
    assert code == 0
    for text in ("usage: vit2cbsa", "Contract-and-Broadcast", "MODEL is one of", "examples:",
                 "vit2cbsa convert vit_base_patch16_224", "exit status", "HF_HUB_OFFLINE"):
        assert text in out
    for command in ("convert", "inspect", "push"):
        code, out, _ = run(capsys, command, "--help")
        assert code == 0 and f"usage: vit2cbsa {command}" in out and "example" in out


def test_usage_errors_exit_2(capsys):
    code, _, err = run(capsys, "inspect", "vit_tiny_patch16_224", "--representatives", "lots")
    assert code == 2 and "expected a count such as 64 or a grid such as 8x8" in err
    code, _, err = run(capsys, "convert", "vit_tiny_patch16_224")
    assert code == 2 and "--out" in err


# --------------------------------------------------------------------------- inspect


def test_inspect_timm_name_at_a_resolution(capsys):
    code, out, err = run(capsys, "inspect", "vit_tiny_patch16_224", "--resolution", "32x48", "--layers", "6:",
                         "--representatives", "2x2", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["input_size"] == [3, 32, 48] and report["patch_grid"] == [2, 3]
    assert report["num_tokens"] == 7 and report["num_prefix_tokens"] == 1
    assert report["conversion"] == {"variant": "cbsa", "num_representatives": [2, 2], "broadcast": "query",
                                    "extra_representatives": "prefix", "prefix_broadcast": "own", "window": 8,
                                    "fine_pool": 2, "converted_layers": [6, 7, 8, 9, 10, 11]}
    layers = report["attention_layers"]
    assert len(layers) == 12 and [row["converted"] for row in layers] == [False] * 6 + [True] * 6
    assert layers[0] == {"index": 0, "name": "blocks.0.attn", "family": "timm", "num_heads": 3, "head_dim": 64,
                         "converted": False}
    # independent count, on the model built at that resolution
    base = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=(32, 48)).eval()
    with torch.no_grad(), flop_counter() as before:
        copy.deepcopy(base)(torch.zeros(1, 3, 32, 48))
    assert report["flops_before"] == before.get_total_flops()
    assert report["params_before"] == sum(p.numel() for p in base.parameters())
    converted = vit2cbsa.convert(base, "cbsa", (2, 2), layers=slice(6, None))
    assert report["params_after"] == sum(p.numel() for p in converted.parameters())
    assert report["params_after"] - report["params_before"] == sum(p.numel() for p in vit2cbsa.new_parameters(converted))


def test_inspect_text_for_hf_folder(capsys, hf_dir):
    code, out, err = run(capsys, "inspect", str(hf_dir), "--variant", "linear", "--resolution", "48x32")
    assert code == 0, err
    assert "ViTForImageClassification (transformers), input 3x48x32" in out
    assert "tokens per image: 25 = 1 prefix + 6x4 patches" in out
    assert "vit.layers.0.attention" in out and "-> linear" in out
    assert "FLOPs" in out and "parameters" in out


def test_inspect_a_converted_folder_shows_saved_conversion(capsys, tmp_path):
    folder = save_pretrained(vit2cbsa.convert(tiny_timm(), "contraction_free", (2, 2), layers=[1]), tmp_path / "cf")
    code, out, err = run(capsys, "inspect", str(folder), "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["source"] == "vit2cbsa"
    assert report["conversion"]["variant"] == "contraction_free" and report["conversion"]["converted_layers"] == [1]
    assert [row["converted"] for row in report["attention_layers"]] == [False, True]


# --------------------------------------------------------------------------- convert


def test_convert_hf_folder(capsys, hf_dir, tmp_path):
    out_dir = tmp_path / "out"
    code, out, err = run(capsys, "convert", str(hf_dir), "--variant", "cbsa", "--representatives", "4",
                         "--layers", "1", "--broadcast", "query", "--out", str(out_dir))
    assert code == 0, err
    assert f"saved to {out_dir}" in out and "converted 1/2 attention layers" in out
    assert sorted(os.listdir(out_dir)) == ["config.json", "model.safetensors", "preprocessor_config.json", CONFIG_NAME]
    conv = read_config(out_dir)["conversion"]
    assert (conv["variant"], conv["num_representatives"], conv["converted_layers"], conv["broadcast"]) == \
        ("cbsa", [2, 2], [1], "query")
    # the same as converting the pretrained model by hand
    expected = vit2cbsa.convert(transformers.ViTForImageClassification.from_pretrained(hf_dir).eval(), "cbsa", 4,
                                layers=[1], broadcast="query")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(from_pretrained(out_dir)(pixel_values=x).logits, expected(pixel_values=x).logits)
    # re-saving the converted folder keeps its image processor
    code, out, err = run(capsys, "convert", str(out_dir), "--out", str(tmp_path / "again"))
    assert code == 0, err
    assert sorted(os.listdir(tmp_path / "again")) == sorted(os.listdir(out_dir))


def _safetensors(path):
    """A safetensors file's metadata and tensors (as bytes): equal for equal files, whatever the order in which
    safetensors wrote the metadata keys (a Rust HashMap: it differs between writes)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return f.metadata(), {k: f.get_tensor(k).numpy().tobytes() for k in f.keys()}


def test_convert_timm_folder_and_reconvert_saved_folder(capsys, timm_dir, tmp_path):
    code, out, err = run(capsys, "convert", str(timm_dir), "--variant", "linear", "--out", str(tmp_path / "a"))
    assert code == 0, err
    expected = vit2cbsa.convert(timm.create_model(f"local-dir:{timm_dir}", pretrained=True).eval(), "linear")
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(from_pretrained(tmp_path / "a")(x), expected(x))
    # a vit2cbsa folder is re-saved (checked) when the options agree ...
    code, out, err = run(capsys, "convert", str(tmp_path / "a"), "--variant", "linear", "--out", str(tmp_path / "b"))
    assert code == 0, err
    assert _safetensors(tmp_path / "b" / "model.safetensors") == _safetensors(tmp_path / "a" / "model.safetensors")
    # ... and refused when they do not
    code, out, err = run(capsys, "convert", str(tmp_path / "a"), "--variant", "cbsa", "--out", str(tmp_path / "c"))
    assert code == 1 and not (tmp_path / "c").exists()
    assert err.count("\n") == 1 and err.startswith("vit2cbsa: error: ") and "already converted" in err


@pytest.mark.parametrize("argv, message", [
    (["inspect", "no_such_model_name"], "not a local folder or a timm model name"),
    (["inspect", "./no/such/dir"], "not a local folder, a timm model name or a Hugging Face Hub repo id"),
    (["convert", "user/not-cached", "--out", "x"], "cannot reach Hub repo 'user/not-cached'"),
    (["push", "./no/such/dir", "user/x"], "is not a folder"),
])
def test_errors_are_one_line(capsys, argv, message):
    code, out, err = run(capsys, *argv)
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and err.startswith("vit2cbsa: error: ") and message in err


def test_convert_timm_name_offline_fails_with_one_clear_line(tmp_path):
    """The real entry point in a fresh process: pretrained download fails, no traceback, nothing written."""
    script = Path(sys.executable).with_name("vit2cbsa")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "vit2cbsa.cli"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "cache"))
    proc = subprocess.run(cmd + ["convert", "vit_tiny_patch16_224", "--out", str(tmp_path / "out")],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith("vit2cbsa: error: cannot load the pretrained weights of timm model 'vit_tiny_patch16_224'")
    assert "pass a local path instead" in lines[0]
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- push


def test_push_uploads_with_card(capsys, monkeypatch, tmp_path):
    calls = {}

    def create_repo(self, repo_id, **kwargs):
        calls["create_repo"] = dict(repo_id=repo_id, **kwargs)

    def create_commit(self, **kwargs):
        from helpers import committed_files

        files = committed_files(kwargs["operations"])
        calls["create_commit"] = kwargs
        calls["files"] = sorted(files)
        calls["card"] = files["README.md"].decode()
        return huggingface_hub.CommitInfo(commit_url="https://huggingface.co/user/x/commit/abc", commit_message="m",
                                          commit_description="", oid="abc")

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "create_commit", create_commit)
    folder = save_pretrained(vit2cbsa.convert(tiny_timm(), "cbsa", 4), tmp_path / "m")
    code, out, err = run(capsys, "push", str(folder), "user/x", "--metric", "top1=55.5", "--dataset", "imagenet-1k",
                         "--private", "--license", "mit")
    assert code == 0, err
    assert "uploaded" in out and "https://huggingface.co/user/x/commit/abc" in out
    assert calls["create_repo"] == {"repo_id": "user/x", "private": True, "exist_ok": True, "repo_type": "model"}
    assert calls["create_commit"]["repo_id"] == "user/x"
    assert calls["files"] == ["README.md", "model.safetensors", CONFIG_NAME]
    meta = huggingface_hub.ModelCard(calls["card"]).data.to_dict()
    assert meta["license"] == "mit" and meta["model-index"][0]["results"][0]["metrics"][0]["value"] == 55.5
