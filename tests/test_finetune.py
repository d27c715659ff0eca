"""examples/finetune.py and vit2cbsa.train.run: 2-process launch, kill-and-resume, LoRA, bad input.

A tiny timm ViT saved as a local safetensors checkpoint and 4 classes x (12 train + 4 val)
generated 32x32 PNGs. In-process runs go through the CLI's own parser; the 2-process run
(``accelerate launch --multi_gpu --num_processes 2 examples/finetune.py --cpu``: torchrun, gloo) and the
SIGKILLed run are subprocesses.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import vit2cbsa
from vit2cbsa.train import loop

from helpers import ROOT, SCRIPT, TINY_KW, free_port, jsonl, load_script, run_cli, subprocess_env, tiny_timm

cli = load_script("finetune_cli")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models on a shared 2-core machine run far faster on one thread."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _argv(assets, out, *extra):
    kw = json.dumps({**TINY_KW, "drop_path_rate": 0.1})  # stochastic depth: resume must restore the RNG
    return ["--model", "timm:vit_tiny_patch16_224", "--checkpoint", str(assets / "tiny.safetensors"),
            "--model-kwargs", kw, "--dataset", str(assets / "data"), "--out", str(out), "--representatives", "4",
            "--num-workers", "0", "--cpu", "--log-every", "1", "--align-lr", "1e-2", "--lr", "3e-3", *extra]


def _run(argv):
    return run_cli(cli, argv)


# 48 train images, global batch 8 = 4 per step x 2 accumulation: 6 steps per epoch, so the
# fine-tuning stage crosses an epoch boundary; checkpoints every 2 steps of each stage.
RESUME = ("--align-steps", "3", "--finetune-steps", "12", "--batch-size", "8", "--grad-accum", "2",
          "--checkpoint-every", "2", "--distill-weight", "0.3")


@pytest.fixture(scope="module")
def reference(assets, tmp_path_factory):
    """An uninterrupted run of the RESUME settings: its final weights and metrics."""
    out = tmp_path_factory.mktemp("ref")
    result = _run(_argv(assets, out, *RESUME))
    return out, result, load_file(str(out / "final" / "model.safetensors"))


def _assert_same_weights(a, b):
    assert a.keys() == b.keys()
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst == 0.0, f"weights differ by up to {worst}"


def test_two_process_launch_runs_both_stages(assets, tmp_path):
    out = tmp_path / "out"
    # `accelerate launch --cpu --num_processes 2` starts ONE process (its simple launcher; several CPU
    # processes need mpirun); `--multi_gpu` starts 2 via torchrun, and the script's --cpu keeps them on CPU (gloo)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()), str(SCRIPT),
           *_argv(assets, out, "--align-steps", "3", "--finetune-steps", "3", "--batch-size", "8", "--grad-accum", "2",
                  "--checkpoint-every", "2", "--lora-rank", "4", "--distill-weight", "0.5")]
    proc = subprocess.run(cmd, env=subprocess_env(), cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert ckpts == ["step_5", "step_6"]  # align: 2, 3; finetune: 2 (global 5), 3 (global 6); keep 2
    last = out / "checkpoints" / "step_6"
    assert {"model.safetensors", "optimizer.bin", "random_states_0.pkl", "random_states_1.pkl",
            "progress.json"} <= {p.name for p in last.iterdir()}
    assert json.loads((last / "progress.json").read_text())["stage"] == "finetune"
    metrics = jsonl(out / "metrics.jsonl")
    losses = [(r["stage"], r["step"]) for r in metrics if "loss" in r]
    assert losses == [("align", 1), ("align", 2), ("align", 3), ("finetune", 1), ("finetune", 2), ("finetune", 3)]
    assert all(np.isfinite(r["loss"]) and "lr" in r and "time" in r for r in metrics if "loss" in r)
    assert [r["stage"] for r in metrics if "eval_accuracy" in r] == ["start", "align", "finetune"]
    final = json.loads((out / "final.json").read_text())
    assert final["num_processes"] == 2 and final["eval_images"] == 16
    assert not (out / "run.lock").exists()  # the main process took the lock and released it
    assert 0 <= final["original_accuracy"] <= 1 and 0 <= final["converted_accuracy"] <= 1
    # the merged LoRA weights load into a freshly converted model under the plain names
    student = vit2cbsa.convert(tiny_timm(), "cbsa", 4)
    student.load_state_dict(load_file(str(out / "final" / "model.safetensors")), strict=True)


def test_launch_with_dynamo_backend_compiles_and_saves_the_plain_model(assets, tmp_path):
    """`accelerate launch --dynamo_backend ...` hands prepare() a torch.compile'd model; training matches an
    eager run, and out/final holds the plain model (aot_eager: the same tracing, no C++ compiler needed)."""
    args = ("--align-steps", "2", "--finetune-steps", "3", "--batch-size", "8", "--distill-weight", "0.3")
    eager = tmp_path / "eager"
    _run(_argv(assets, eager, *args))
    out = tmp_path / "compiled"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "aot_eager", str(SCRIPT), *_argv(assets, out, *args)]
    proc = subprocess.run(cmd, env=subprocess_env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert json.loads((out / "final.json").read_text())["final_format"] == "vit2cbsa"
    got, want = (load_file(str(d / "final" / "model.safetensors")) for d in (out, eager))
    assert got.keys() == want.keys()  # no "_orig_mod." prefixes
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5)
    loaded = vit2cbsa.from_pretrained(out / "final")
    assert type(loaded).__name__ == "VisionTransformer" and vit2cbsa.is_converted(loaded)


class _Killed(Exception):
    pass


def test_stop_after_checkpoint_then_resume_gives_identical_weights(assets, reference, tmp_path, monkeypatch):
    _, ref_result, ref_weights = reference
    out = tmp_path / "out"

    def hard_exit(code):
        raise _Killed(code)

    monkeypatch.setattr(loop, "_hard_exit", hard_exit)
    # global step 8 = fine-tuning step 5; the newest checkpoint is then fine-tuning step 4 (mid-epoch)
    with pytest.raises(_Killed):
        _run(_argv(assets, out, *RESUME, "--stop-after-step", "8"))
    assert not (out / "final.json").exists()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_5", "step_7"]
    progress = json.loads((out / "checkpoints" / "step_7" / "progress.json").read_text())
    assert progress == {**progress, "stage": "finetune", "stage_step": 4, "epoch": 0, "step_in_epoch": 4}
    assert max(r["global_step"] for r in jsonl(out / "metrics.jsonl")) == 8

    result = _run(_argv(assets, out, *RESUME))  # the same command again
    _assert_same_weights(ref_weights, load_file(str(out / "final" / "model.safetensors")))
    assert result["converted_accuracy"] == ref_result["converted_accuracy"]
    # the metrics are those of one run: step 8 logged once, with the uninterrupted run's loss
    ref_metrics = jsonl(reference[0] / "metrics.jsonl")
    got = jsonl(out / "metrics.jsonl")
    assert [(r["stage"], r["step"], r.get("loss")) for r in got] == [(r["stage"], r["step"], r.get("loss")) for r in ref_metrics]
    # a finished run is not redone
    assert _run(_argv(assets, out, *RESUME)) == json.loads((out / "final.json").read_text())


def test_sigkill_mid_run_then_resume_gives_identical_weights(assets, reference, tmp_path, capsys):
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, str(SCRIPT), *_argv(assets, out, *RESUME)], env=subprocess_env(), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 180
        while not list((out / "checkpoints").glob("step_*")) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(30)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-3000:]
    assert not (out / "final.json").exists()
    assert json.loads((out / "run.lock").read_text())["pid"] == proc.pid  # left behind by the kill
    capsys.readouterr()
    _run(_argv(assets, out, *RESUME))
    assert f"taking over the stale lock {out / 'run.lock'} (host {socket.gethostname()}, pid {proc.pid}" in \
        capsys.readouterr().out
    assert not (out / "run.lock").exists()
    _assert_same_weights(reference[2], load_file(str(out / "final" / "model.safetensors")))


@pytest.fixture(scope="module")
def killed(assets, tmp_path_factory):
    """A RESUME run stopped after global step 8: its checkpoints are step_5 and step_7."""
    out = tmp_path_factory.mktemp("killed") / "out"

    def hard_exit(code):
        raise _Killed(code)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(loop, "_hard_exit", hard_exit)
        with pytest.raises(_Killed):
            _run(_argv(assets, out, *RESUME, "--stop-after-step", "8"))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_5", "step_7"]
    return out


@pytest.mark.parametrize("damaged,why", [
    ("optimizer.bin", "optimizer.bin is truncated or corrupt"),
    ("progress.json", "progress.json is unreadable"),
    ("model.safetensors", "model.safetensors is truncated"),
    ("random_states_0.pkl", "random_states_0.pkl is truncated or corrupt"),
])
def test_resume_skips_a_truncated_newest_checkpoint(assets, reference, killed, tmp_path, capsys, damaged, why):
    """The newest checkpoint cut short (a kill or a full disk while saving): resume from the one before,
    saying so, and still end with the uninterrupted run's weights and metrics."""
    out = tmp_path / "out"
    shutil.copytree(killed, out)
    path = out / "checkpoints" / "step_7" / damaged
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    capsys.readouterr()
    _run(_argv(assets, out, *RESUME))
    printed = capsys.readouterr().out
    assert f"skipping checkpoint step_7: {why}" in printed, printed
    assert f"(moved to {out / 'checkpoints' / 'invalid_step_7'})" in printed
    assert "resuming from the newest valid checkpoint, step_5" in printed
    assert "resumed finetune at step 2/12" in printed
    assert (out / "checkpoints" / "invalid_step_7" / damaged).stat().st_size == len(data) // 2
    _assert_same_weights(reference[2], load_file(str(out / "final" / "model.safetensors")))
    ref_metrics = jsonl(reference[0] / "metrics.jsonl")
    got = jsonl(out / "metrics.jsonl")
    assert [(r["stage"], r["step"], r.get("loss")) for r in got] == \
        [(r["stage"], r["step"], r.get("loss")) for r in ref_metrics]


def test_lora_leaves_frozen_weights_unchanged(assets, tmp_path):
    out = tmp_path / "out"
    _run(_argv(assets, out, "--finetune-steps", "4", "--batch-size", "8", "--lora-rank", "4", "--lr", "3e-2",
               "--checkpoint-every", "4"))
    original = load_file(str(assets / "tiny.safetensors"))
    state = load_file(str(out / "checkpoints" / "step_4" / "model.safetensors"))  # the PEFT model's state
    prefix = "base_model.model."
    checked = 0
    for key, value in state.items():
        name = key[len(prefix):]
        if "lora_" in name or "modules_to_save" in name:
            continue
        name = name.replace(".base_layer.", ".").replace(".original_module.", ".")
        if name in original:
            assert torch.equal(value, original[name]), name
            checked += 1
    assert checked == len(original)  # every pretrained tensor is there, frozen
    lora_b = [v for k, v in state.items() if "lora_B" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b)  # the adapters did train
    merged = load_file(str(out / "final" / "model.safetensors"))
    for name, value in original.items():
        if name.endswith(("attn.qkv.weight", "attn.proj.weight")) or name.startswith("head."):
            assert not torch.equal(merged[name], value), name  # adapted (merged) or trained in full
        elif not name.endswith(("attn.qkv.bias", "attn.proj.bias")):
            assert torch.equal(merged[name], value), name
    assert any(not torch.equal(merged[k], state[prefix + k.replace(".mixer.", ".mixer.original_module.")])
               for k in merged if ".mixer." in k)  # the added mixer parameters trained in full


def test_hf_model_and_dataset(assets, tmp_path, monkeypatch):
    import datasets
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    model_dir = tmp_path / "hf_vit"
    torch.manual_seed(0)
    config = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                       image_size=32, patch_size=8, num_labels=4)
    ViTForImageClassification(config).save_pretrained(model_dir)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(model_dir)
    out = tmp_path / "out"
    result = _run(["--model", f"hf:{model_dir}", "--dataset", f"hf:{assets / 'data'}", "--out", str(out),
                   "--representatives", "4", "--layers", "1:", "--num-workers", "0", "--cpu", "--batch-size", "8",
                   "--align-steps", "2", "--finetune-steps", "2", "--lora-rank", "2", "--distill-weight", "0.5"])
    assert result["conversion"]["converted"][0]["index"] == 1 and len(result["conversion"]["converted"]) == 1
    assert result["head_reset"] is False and result["eval_images"] == 16
    merged = load_file(str(out / "final" / "model.safetensors"))
    assert any(".mixer." in k for k in merged) and not any("lora" in k for k in merged)
    assert result["final_format"] == "vit2cbsa" and (out / "final" / "vit2cbsa_config.json").is_file()


@pytest.mark.parametrize("extra,message", [
    (("--dataset", "/nonexistent/images"), "dataset path '/nonexistent/images' does not exist"),
    (("--model", "timm:no_such_model_x"), "'no_such_model_x' is not a timm model name"),
    (("--model", "hf:/nonexistent/model"), "/nonexistent/model is not a local folder, a timm model name or a Hugging Face Hub repo id"),
    (("--batch-size", "6", "--grad-accum", "4"), "--batch-size 6 does not divide into 1 process(es) x 4"),
    (("--lora-rank", "2", "--lora-targets", "qkv,nope"), "LoRA target 'nope' matches no Linear/Conv layer"),
])
def test_bad_input_is_one_line_and_writes_nothing(assets, tmp_path, capsys, extra, message):
    out = tmp_path / "out"
    argv = _argv(assets, out, "--align-steps", "1", "--finetune-steps", "1", "--batch-size", "8")
    for flag, value in zip(extra[::2], extra[1::2]):
        if flag in argv:
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag, value]
    if extra[1].startswith(("timm:no", "hf:")):  # --checkpoint is for the tiny timm model
        i = argv.index("--checkpoint")
        del argv[i:i + 2]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err, err
    assert not out.exists()


def test_embedded_teacher_keyword(assets, tmp_path, monkeypatch):
    """``--model cifar10-teacher`` (here a tiny stand-in in the zoo's layout): its mean/std, a new head for 4 classes."""
    from timm.models.vision_transformer import VisionTransformer

    from vit2cbsa import zoo

    kwargs = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=10)
    teacher_dir = tmp_path / "cifar10_vit"
    teacher_dir.mkdir()
    save_file(VisionTransformer(**kwargs).state_dict(), str(teacher_dir / "model.safetensors"))
    (teacher_dir / "config.json").write_text(json.dumps(
        {"model_kwargs": kwargs, "mean": [0.49, 0.48, 0.45], "std": [0.25, 0.24, 0.26], "input_size": [3, 32, 32],
         "class_names": [f"c{i}" for i in range(10)]}))
    monkeypatch.setattr(zoo, "TEACHER_DIR", teacher_dir)
    argv = ["--model", "cifar10-teacher", "--dataset", str(assets / "data"), "--out", str(tmp_path / "out"),
            "--representatives", "4", "--num-workers", "0", "--cpu", "--batch-size", "8"]
    assert cli.main([*argv, "--finetune-steps", "1", "--distill-weight", "0.5"]) == 2  # no 4-class head to distil
    result = _run([*argv, "--align-steps", "2", "--finetune-steps", "2"])
    assert result["head_reset"] is True and result["eval_images"] == 16
    assert load_file(str(tmp_path / "out" / "final" / "model.safetensors"))["head.weight"].shape == (4, 32)


def test_final_folder_loads_with_from_pretrained(assets, tmp_path):
    """out/final is a vit2cbsa folder: from_pretrained rebuilds the fine-tuned model with its weights."""
    import vit2cbsa

    out = tmp_path / "out"
    result = _run(_argv(assets, out, "--align-steps", "2", "--finetune-steps", "2", "--batch-size", "8"))
    assert result["final_format"] == "vit2cbsa"
    loaded = vit2cbsa.from_pretrained(out / "final")
    weights = load_file(str(out / "final" / "model.safetensors"))
    state = loaded.state_dict()
    assert set(state) == set(weights)
    for name, tensor in state.items():
        torch.testing.assert_close(tensor, weights[name])
    assert vit2cbsa.conversion_info(loaded).variant == "cbsa"
    assert vit2cbsa.conversion_info(loaded).num_representatives == (2, 2)
    # the dataset's class names travel with the weights
    assert list(loaded.pretrained_cfg["label_names"]) == ["class0", "class1", "class2", "class3"]
    x = torch.randn(2, 3, 32, 32)
    reference = tiny_timm(drop_path_rate=0.1)
    vit2cbsa.convert(reference, "cbsa", 4)
    reference.load_state_dict(weights)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), reference.eval()(x))
