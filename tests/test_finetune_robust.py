"""Fine-tuning that survives mistakes: the output-folder lock, unreadable images, the evaluation subset
and honest timing, one-line errors for bad options, transformers' remote code refused.

Tiny random-weight timm ViT (local safetensors checkpoint) and tiny generated image folders; no
network (``datasets.load_dataset`` is made to fail loudly where a test must not reach it).
"""

from __future__ import annotations

import builtins
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vit2cbsa.errors import BadImageError, UsageError
from vit2cbsa.train import data as data_mod
from vit2cbsa.train import loop
from vit2cbsa.train.data import TransformedDataset
from vit2cbsa.train.lock import LOCK_NAME, OutputLock, pid_alive
from vit2cbsa.train.metrics import StageClock

from helpers import ROOT, SCRIPT, TINY_KW, image_folder, jsonl, load_script, make_assets, run_cli, subprocess_env

cli = load_script("finetune_cli_robust")


def _jpeg_bytes(rng) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (32, 32, 3)).astype(np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


BAD_KINDS = {
    "zero_bytes": lambda rng: b"",
    "text_named_jpg": lambda rng: b"this is not an image\n",
    "truncated_jpeg": lambda rng: _jpeg_bytes(rng)[:300],
}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """As conftest's, with the tiny ViT's attention as initialised."""
    return make_assets(tmp_path_factory.mktemp("robust_assets"), sharpen=False)


@pytest.fixture
def no_hub(monkeypatch):
    """Make any datasets.load_dataset call (the Hub fall-through) fail the test."""
    import datasets

    def forbidden(*a, **k):
        raise AssertionError(f"datasets.load_dataset{a} was called")

    monkeypatch.setattr(datasets, "load_dataset", forbidden)


def _argv(assets, out, *extra, dataset=None):
    return ["--model", "timm:vit_tiny_patch16_224", "--checkpoint", str(assets / "tiny.safetensors"),
            "--model-kwargs", json.dumps(TINY_KW), "--dataset", str(dataset or assets / "data"), "--out", str(out),
            "--representatives", "4", "--num-workers", "0", "--cpu", "--log-every", "1", "--lr", "3e-3", *extra]


def _run(argv):
    return run_cli(cli, argv)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("error: ")]
    assert len(errors) == 1, err
    return errors[0]


# --------------------------------------------------------------------------- the lock, on its own


def test_lock_is_exclusive_names_its_holder_and_is_released(tmp_path):
    first = OutputLock(tmp_path)
    assert first.acquire(command="first run") is None
    info = json.loads((tmp_path / LOCK_NAME).read_text())
    assert info["host"] == socket.gethostname() and info["pid"] == os.getpid() and info["started"]
    assert info["command"] == "first run"
    with pytest.raises(UsageError) as e:
        OutputLock(tmp_path).acquire()
    msg = str(e.value)
    assert "\n" not in msg and f"host {socket.gethostname()}" in msg and f"pid {os.getpid()}" in msg
    assert str(tmp_path) in msg
    OutputLock(tmp_path).release()  # not ours: leaves it
    assert (tmp_path / LOCK_NAME).exists()
    first.release()
    assert not (tmp_path / LOCK_NAME).exists()
    second = OutputLock(tmp_path)
    assert second.acquire() is None
    second.release()


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    dead = _dead_pid()
    assert not pid_alive(dead)
    (tmp_path / LOCK_NAME).write_text(json.dumps({"host": socket.gethostname(), "pid": dead,
                                                  "started": "yesterday"}))
    lock = OutputLock(tmp_path)
    note = lock.acquire()
    assert note is not None and "taking over the stale lock" in note and f"pid {dead}" in note
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert not list(tmp_path.glob(f"{LOCK_NAME}.stale.*"))
    lock.release()


def test_lock_of_a_run_with_a_live_worker_is_not_stale(tmp_path):
    """The main process died but another process of the run still runs: refuse, naming it."""
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        here = socket.gethostname()
        dead = _dead_pid()
        (tmp_path / LOCK_NAME).write_text(json.dumps({
            "host": here, "pid": dead, "started": "t",
            "processes": [{"host": here, "pid": dead}, {"host": here, "pid": sleeper.pid}]}))
        with pytest.raises(UsageError, match=rf"kill {sleeper.pid}"):
            OutputLock(tmp_path).acquire()
    finally:
        sleeper.kill()
        sleeper.wait()
    assert OutputLock(tmp_path).acquire() is not None  # now every process of it is gone


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
def test_lock_with_a_reused_pid_is_stale(tmp_path):
    """A pid that now belongs to another process (other start time) does not keep a lock alive."""
    (tmp_path / LOCK_NAME).write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                                  "proc_start": "1", "started": "t"}))
    assert "taking over" in OutputLock(tmp_path).acquire()


def test_lock_of_another_host_is_never_taken_over(tmp_path):
    (tmp_path / LOCK_NAME).write_text(json.dumps({"host": "some-other-node", "pid": _dead_pid(), "started": "t"}))
    with pytest.raises(UsageError, match="some-other-node, which cannot be checked from here; if that run is over, "
                                         "delete"):
        OutputLock(tmp_path).acquire()


def test_unreadable_lock_waits_while_young_and_is_taken_over_when_old(tmp_path):
    path = tmp_path / LOCK_NAME
    path.write_text('{"host": "x", "pi')  # cut short by a kill while being written
    with pytest.raises(UsageError, match="being written by another run"):
        OutputLock(tmp_path).acquire(attempts=2)
    old = time.time() - 3600
    os.utime(path, (old, old))
    assert "unreadable" in OutputLock(tmp_path).acquire()


# --------------------------------------------------------------------------- the lock in a run


def test_run_takes_the_lock_releases_it_and_takes_over_a_stale_one(assets, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    dead = _dead_pid()
    (out / LOCK_NAME).write_text(json.dumps({"host": socket.gethostname(), "pid": dead, "started": "t"}))
    _run(_argv(assets, out, "--finetune-steps", "1", "--batch-size", "8"))
    assert f"taking over the stale lock {out / LOCK_NAME} (host {socket.gethostname()}, pid {dead}" in \
        capsys.readouterr().out
    assert not (out / LOCK_NAME).exists()
    assert [r["stage"] for r in jsonl(out / "metrics.jsonl")].count("start") == 1


def test_second_run_on_a_busy_folder_refuses_and_a_sigkilled_launcher_leaves_its_worker_holding_it(
        assets, tmp_path, capsys):
    """Run A via `accelerate launch` (whose worker is a child process); run B on the same folder refuses,
    naming A's worker; SIGKILL of the launcher leaves the worker running and B still refuses; once the
    worker is gone the lock is stale. A's metrics are never interleaved with B's."""
    out = tmp_path / "out"
    args = _argv(assets, out, "--finetune-steps", "100000", "--batch-size", "8", "--checkpoint-every", "100000",
                 "--log-every", "1000")
    log = (tmp_path / "a.log").open("w")
    launcher = subprocess.Popen([sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1",
                                 "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                                 str(SCRIPT), *args], env=subprocess_env(), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    worker = None
    try:
        deadline = time.time() + 180
        while not (out / "metrics.jsonl").exists() and launcher.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        assert (out / LOCK_NAME).exists(), (tmp_path / "a.log").read_text()[-3000:]
        worker = json.loads((out / LOCK_NAME).read_text())["pid"]
        assert worker != launcher.pid and pid_alive(worker)

        assert cli.main(args) == 2
        err = _one_line_error(capsys)
        assert f"{out} is in use by another run (host {socket.gethostname()}, pid {worker}" in err, err

        launcher.kill()  # SIGKILL: the launcher cannot pass it on
        launcher.wait(30)
        time.sleep(0.5)
        assert pid_alive(worker), "the worker died with its launcher"
        assert cli.main(args) == 2
        err = _one_line_error(capsys)
        assert f"pid {worker}" in err and f"kill {worker}" in err and "SIGKILLed `accelerate launch`" in err
        starts = [r for r in jsonl(out / "metrics.jsonl") if r["stage"] == "start"]
        assert len(starts) == 1  # only A wrote
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait(30)
        if worker is not None and pid_alive(worker):
            os.kill(worker, signal.SIGKILL)
        log.close()
    deadline = time.time() + 30
    while pid_alive(worker) and time.time() < deadline:
        time.sleep(0.1)
    lock = OutputLock(out)
    assert "taking over the stale lock" in lock.acquire()
    lock.release()


# --------------------------------------------------------------------------- unreadable images


def _bad_folder(root: Path, kind: str, where: str = "val") -> Path:
    image_folder(root, 2, 1, classes=2)
    bad = root / where / "class1" / "broken.jpg"
    bad.write_bytes(BAD_KINDS[kind](np.random.default_rng(1)))
    return bad


@pytest.mark.parametrize("kind", sorted(BAD_KINDS))
def test_unreadable_image_is_a_one_line_error_naming_the_file(assets, tmp_path, capsys, kind):
    bad = _bad_folder(tmp_path / "data", kind)
    out = tmp_path / "out"
    # --num-workers 1: the error comes from a data-loader worker process
    argv = _argv(assets, out, "--finetune-steps", "1", "--batch-size", "4", "--num-workers", "1",
                 dataset=tmp_path / "data")
    assert cli.main(argv) == 2
    err = _one_line_error(capsys)
    assert err.startswith(f"error: cannot read image {bad}: ") and err.endswith("(or pass --skip-bad-images)"), err
    assert "Traceback" not in err and "worker" not in err
    assert not (out / LOCK_NAME).exists()  # released on the error
    reason = {"zero_bytes": "empty file (0 bytes)", "text_named_jpg": "not an image file PIL can read"}.get(kind)
    if reason:
        assert reason in err


def test_worker_reraise_keeps_the_one_line_message():
    wrapped = ("Caught BadImageError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
               "  File \"x.py\", line 1, in f\n    raise BadImageError(...)\n"
               "vit2cbsa.train.data.BadImageError: cannot read image /d/a.jpg: empty file (0 bytes)\n")
    assert str(BadImageError(wrapped)) == "cannot read image /d/a.jpg: empty file (0 bytes)"


def test_skipped_image_is_replaced_deterministically(tmp_path):
    from torchvision.datasets import ImageFolder
    from torchvision.transforms import ToTensor

    bad = _bad_folder(tmp_path / "data", "truncated_jpeg", where="train")
    base = ImageFolder(str(tmp_path / "data" / "train"))
    j = next(k for k, (p, _) in enumerate(base.samples) if p == str(bad))
    strict = TransformedDataset(base, ToTensor())
    with pytest.raises(BadImageError, match=f"cannot read image {bad}"):
        strict[j]
    skip = TransformedDataset(base, ToTensor(), skip_bad=True)
    x, y, replaced = skip[j]
    nxt = (j + 1) % len(base)
    assert replaced == 1 and y == base.samples[nxt][1]
    assert torch.equal(x, ToTensor()(base[nxt][0]))
    assert all(skip[k][2] == 0 for k in range(len(base)) if k != j)
    assert torch.equal(skip[j][0], x)  # the same replacement every time


def test_skip_bad_images_trains_counts_and_leaves_them_out_of_evaluation(assets, tmp_path, capsys):
    root = tmp_path / "data"
    image_folder(root, 4, 2, classes=2)  # 8 train, 4 val images
    (root / "train" / "class0" / "0.png").write_bytes(b"")
    (root / "train" / "class1" / "1.png").write_text("not a png")
    (root / "val" / "class1" / "0.png").write_bytes(b"")
    out = tmp_path / "out"
    # batch 8 = the whole training split each step: both bad ones in every step
    argv = _argv(assets, out, "--finetune-steps", "2", "--batch-size", "8", dataset=root)
    assert cli.main(argv) == 2  # without the flag: the first evaluation stops at the bad val image
    assert "cannot read image" in _one_line_error(capsys)
    result = _run([*argv, "--skip-bad-images"])  # the same command, now skipping: not refused as other settings
    assert result["bad_images_skipped"] == {"train": 4, "final_eval": 1}
    assert result["eval_images"] == 3 and result["intermediate_eval_images"] == 4
    metrics = jsonl(out / "metrics.jsonl")
    assert [r["bad_images"] for r in metrics if "loss" in r] == [2, 2]
    assert all(r["bad_images"] == 1 and r["eval_images"] == 3 for r in metrics if "eval_accuracy" in r)
    err = capsys.readouterr().err
    assert f"warning: skipping unreadable image (cannot read image {root / 'train' / 'class0' / '0.png'}: " \
           "empty file (0 bytes))" in err


# --------------------------------------------------------------------------- evaluation: subset, bar, timing


def test_intermediate_evaluations_use_a_subset_and_the_final_one_the_whole_split(assets, tmp_path, capsys):
    out = tmp_path / "out"
    result = _run(_argv(assets, out, "--align-steps", "2", "--finetune-steps", "2", "--batch-size", "8",
                        "--eval-every", "1", "--eval-subset", "5"))
    evals = [r for r in jsonl(out / "metrics.jsonl") if "eval_accuracy" in r]
    assert [(r["stage"], r["step"]) for r in evals] == [("start", 0), ("align", 1), ("align", 2),
                                                        ("finetune", 1), ("finetune", 2)]
    assert all(r["eval_images"] == 5 and r["eval_s"] >= 0 for r in evals)
    assert result["eval_images"] == 16 and result["intermediate_eval_images"] == 5
    err = capsys.readouterr().err
    assert "start eval (5 of 16 images)" in err and "finetune eval (5 of 16 images)" in err  # the eval bars
    assert "final eval, converted (16 images)" in err
    # timing: per stage, training steps apart from evaluations and checkpoints
    for stage in ("align", "finetune"):
        t = result["timing"][stage]
        assert t["steps"] == 2 and t["evals"] == 2 and t["checkpoints"] >= 1
        assert t["train_s"] > 0 and t["eval_s"] > 0 and t["s_per_step"] == pytest.approx(t["train_s"] / 2, abs=1e-3)
    # the default subset (1000) is more than this split: every evaluation on all 16
    out2 = tmp_path / "out2"
    _run(_argv(assets, out2, "--finetune-steps", "1", "--batch-size", "8"))
    assert all(r["eval_images"] == 16 for r in jsonl(out2 / "metrics.jsonl") if "eval_accuracy" in r)


def test_stage_clock_keeps_pauses_out_of_the_bar_and_the_training_time():
    from tqdm import tqdm

    bar = tqdm(total=4, file=io.StringIO(), mininterval=0)
    clock = StageClock(bar)
    bar.update(1)
    with clock.pause("eval"):
        time.sleep(0.4)
    bar.update(1)
    with clock.pause("checkpoint"):
        time.sleep(0.2)
    bar.update(1)
    assert bar.format_dict["elapsed"] < 0.3  # tqdm's own clock: the 0.6 s of pauses are not training
    s = clock.summary(3)
    assert s["eval_s"] >= 0.4 and s["checkpoint_s"] >= 0.2 and s["train_s"] < 0.3
    assert s["evals"] == 1 and s["checkpoints"] == 1
    bar.close()


def test_evaluation_timing_is_not_reported_as_training(assets, tmp_path, monkeypatch):
    """A slow evaluation (a real one, then 0.5 s more) lands in the stage's eval_s, not in train_s."""
    real = loop.FinetuneRun.evaluate

    def slow(self, *a, **k):
        value = real(self, *a, **k)
        time.sleep(0.5)
        return value

    monkeypatch.setattr(loop.FinetuneRun, "evaluate", slow)
    result = _run(_argv(assets, tmp_path / "out", "--finetune-steps", "2", "--batch-size", "8", "--eval-every", "1"))
    t = result["timing"]["finetune"]
    assert t["evals"] == 2 and t["eval_s"] >= 1.0 and t["train_s"] < t["eval_s"]
    train_s = [r["train_s"] for r in jsonl(tmp_path / "out" / "metrics.jsonl") if "loss" in r]
    assert train_s[1] - train_s[0] < 0.5  # the step after an evaluation is not charged with it


# --------------------------------------------------------------------------- bad options: one line, nothing written


@pytest.mark.parametrize("extra,message", [
    (("--lora-rank", "-3"), "--lora-rank must be 0 (train the whole model) or a positive rank for LoRA adapters, "
                            "got -3"),
    (("--lr", "nan"), "--lr must be a finite number in (0, inf) (a learning rate), got nan"),
    (("--lr", "inf"), "--lr must be a finite number in (0, inf) (a learning rate), got inf"),
    (("--lr", "0"), "--lr must be a finite number in (0, inf) (a learning rate), got 0.0"),
    (("--lr=-1e-3",), "--lr must be a finite number in (0, inf)"),
    (("--align-lr", "nan"), "--align-lr must be a finite number"),
    (("--warmup-ratio", "1.5"), "--warmup-ratio must be a finite number in [0, 1]"),
    (("--eval-subset", "-1"), "--eval-subset must be >= 0 (0: evaluate on the whole split)"),
    (("--mixed-precision", "fp8"), "--mixed-precision fp8 needs an NVIDIA GPU with FP8 (compute capability 8.9+); "
                                   "this run is on cpu: use --mixed-precision bf16 or no"),
])
def test_bad_option_is_one_line_and_writes_nothing(assets, tmp_path, capsys, no_hub, extra, message):
    out = tmp_path / "out"
    assert cli.main(_argv(assets, out, "--finetune-steps", "1", "--batch-size", "8", *extra)) == 2
    err = _one_line_error(capsys)
    assert err == f"error: {message}" or err.startswith(f"error: {message}"), err
    assert not out.exists()


def test_accelerate_still_works_after_a_refused_mixed_precision(assets, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(_argv(assets, out, "--finetune-steps", "1", "--batch-size", "8", "--mixed-precision", "fp8")) == 2
    assert _run(_argv(assets, out, "--finetune-steps", "1", "--batch-size", "8"))["converted_accuracy"] >= 0


def test_out_naming_an_existing_file(assets, tmp_path, capsys):
    out = tmp_path / "results.json"
    out.write_text("{}")
    assert cli.main(_argv(assets, out, "--finetune-steps", "1", "--batch-size", "8")) == 2
    assert _one_line_error(capsys) == f"error: --out {str(out)!r}: {str(out)!r} is an existing file, not a folder"
    assert out.read_text() == "{}"
    below = out / "run"
    assert cli.main(_argv(assets, below, "--finetune-steps", "1", "--batch-size", "8")) == 2
    assert f"{str(out)!r} is an existing file" in _one_line_error(capsys)


@pytest.mark.parametrize("spec,message", [
    ("data/trian", "dataset path 'data/trian' does not exist: no such folder 'trian' in 'data' "
                   "(did you mean 'data/train'?)"),
    ("./imagenet", "dataset path './imagenet' does not exist: no such folder 'imagenet' in the current folder"),
    ("datta/imagenet/train", "dataset path 'datta/imagenet/train' does not exist: no such folder 'datta' in the "
                             "current folder"),
])
def test_dataset_path_typo_is_no_such_folder_not_a_hub_lookup(assets, tmp_path, capsys, monkeypatch, no_hub,
                                                               spec, message):
    monkeypatch.chdir(assets)  # assets/data exists, with train/ and val/
    out = tmp_path / "out"
    argv = _argv(assets, out, "--finetune-steps", "1", "--batch-size", "8", dataset=spec)
    assert cli.main(argv) == 2
    err = _one_line_error(capsys)
    assert err.startswith(f"error: {message}"), err
    assert not out.exists()


def test_hub_style_ids_still_go_to_datasets():
    assert not data_mod._looks_like_path("uoft-cs/cifar10") and not data_mod._looks_like_path("cifar10")
    assert data_mod._looks_like_path("a/b/c") and data_mod._looks_like_path("~/data")


def test_transformers_folder_asking_for_remote_code_is_refused_without_a_prompt(assets, tmp_path, capsys,
                                                                                  monkeypatch):
    model_dir = tmp_path / "custom"
    model_dir.mkdir()
    marker = tmp_path / "code_ran"
    (model_dir / "config.json").write_text(json.dumps({
        "model_type": "vit2cbsa_test_custom_vit",
        "auto_map": {"AutoConfig": "configuration_custom.CustomConfig",
                     "AutoModelForImageClassification": "modeling_custom.CustomModel",
                     "AutoImageProcessor": "processing_custom.CustomProcessor"}}))
    for name in ("configuration_custom.py", "modeling_custom.py", "processing_custom.py"):
        (model_dir / name).write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    asked = []
    monkeypatch.setattr(builtins, "input", lambda *a: asked.append(a) or "y")
    out = tmp_path / "out"
    argv = ["--model", f"hf:{model_dir}", "--dataset", str(assets / "data"), "--out", str(out), "--num-workers",
            "0", "--cpu", "--finetune-steps", "1", "--batch-size", "8"]
    assert cli.main(argv) == 2
    err = _one_line_error(capsys)
    assert err.startswith(f"error: {model_dir} asks to run its own code (config.json has an auto_map")
    assert "which vit2cbsa never does (trust_remote_code=False)" in err
    assert not asked, "transformers prompted on stdin"
    assert not marker.exists() and not out.exists()
