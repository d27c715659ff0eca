"""Sharded training (FSDP2) of converted models, on CPU processes (gloo).

* In this process: the wrap policy (blocks + converted attention, timm / transformers / PEFT-wrapped), and the
  check of sharded checkpoints (``torch.distributed.checkpoint`` folders cut short are refused).
* 2 processes (``torchrun`` on this file as a worker): every variant, sharded by ``fully_shard`` as
  ``vit2cbsa.train`` shards it (3 heads over 2 processes: uneven shards), gives the unsharded model's loss,
  gradients (gathered), updated parameters and full state dict; the added attention parameters are
  ``Shard(0)`` DTensors whose local pieces are not the full tensors.
* 2 processes (``accelerate launch --config_file examples/accelerate_fsdp_cpu.yaml examples/finetune.py --cpu``):
  alignment + fine-tuning with gradient accumulation, killed after a checkpoint and relaunched, ends with the DDP
  run's weights (same seed) and a ``final/`` that ``vit2cbsa.from_pretrained`` loads; LoRA likewise; bf16 runs.

What a CPU cannot show: NCCL collectives, GPU memory savings, ``cpu_ram_efficient_loading`` / parameter offload,
and several nodes (benchmarks/device_check.py covers the single-GPU kernels).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from helpers import ROOT, SCRIPT, TINY_KW, free_port, subprocess_env, tiny_timm

FSDP_CPU = ROOT / "examples" / "accelerate_fsdp_cpu.yaml"


def _env():
    return subprocess_env(PYTHONWARNINGS="ignore")


# --------------------------------------------------------------------------- in this process


def test_wrap_policy_takes_the_blocks_and_the_converted_attention():
    import vit2cbsa
    from vit2cbsa.train.sharding import block_names, unit_classes

    model = vit2cbsa.convert(tiny_timm(depth=3), "cbsa", 4, layers="1:")
    assert block_names(model) == ["blocks.1", "blocks.2"]
    # by class: the unconverted block 0 is a unit too; a class the model lacks is left out
    assert unit_classes(model, ["Mlp", "NoSuchLayer"]) == ["Block", "Mlp", "TimmConvertedAttention"]

    from transformers import CLIPVisionConfig, CLIPVisionModel, ViTConfig, ViTForImageClassification

    small = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32,
                 patch_size=8)
    hf = vit2cbsa.convert(ViTForImageClassification(ViTConfig(**small, num_labels=4)), "linear", 4)
    blocks = block_names(hf)  # vit.encoder.layer.N (transformers 4) or vit.layers.N (5)
    assert len(blocks) == 2 and {type(hf.get_submodule(b)).__name__ for b in blocks} == {"ViTLayer"}
    attention = {type(m).__name__ for m in hf.modules() if isinstance(m, vit2cbsa.adapters.ConvertedAttention)}
    assert unit_classes(hf) == sorted({"ViTLayer"} | attention)
    clip = vit2cbsa.convert(CLIPVisionModel(CLIPVisionConfig(**small)), "contraction_free", 4)
    assert "CLIPEncoderLayer" in unit_classes(clip)

    from vit2cbsa.train.lora import apply_lora, lora_targets

    peft = apply_lora(model, lora_targets(model), ["head"], 2)
    assert block_names(peft) == ["base_model.model.blocks.1", "base_model.model.blocks.2"]
    assert unit_classes(peft) == ["Block", "TimmConvertedAttention"]


def test_sharded_checkpoint_cut_short_is_refused(tmp_path):
    import torch.distributed.checkpoint as dcp

    from vit2cbsa.train.checkpoints import checkpoint_problem

    d = tmp_path / "step_3"
    (d / "pytorch_model_fsdp_0").mkdir(parents=True)
    dcp.save({"w": torch.randn(64, 64), "b": torch.randn(64)}, checkpoint_id=str(d / "pytorch_model_fsdp_0"),
             no_dist=True)
    (d / "optimizer_0").mkdir()
    dcp.save({"state": torch.randn(32)}, checkpoint_id=str(d / "optimizer_0"), no_dist=True)
    (d / "random_states_0.pkl").write_bytes(b"x")
    (d / "progress.json").write_text(json.dumps(dict(stage="finetune", stage_step=3, stage_steps=4, global_step=3,
                                                     epoch=0, step_in_epoch=3, num_processes=1, sharded=True)))
    assert checkpoint_problem(d) == (json.loads((d / "progress.json").read_text()), None)
    shard = next((d / "pytorch_model_fsdp_0").glob("*.distcp"))
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    progress, why = checkpoint_problem(d)
    assert progress is None and why.startswith(f"pytorch_model_fsdp_0/{shard.name} is truncated"), why
    shard.write_bytes(data)
    (d / "optimizer_0" / ".metadata").unlink()
    assert checkpoint_problem(d)[1] == "optimizer_0/ has no .metadata (a sharded save cut short)"


# --------------------------------------------------------------------------- 2 processes: the mixers under fully_shard

WORKER_VARIANTS = [("cbsa", "query", True), ("cbsa", "key", True), ("cbsa", "transpose", True),
                   ("cbsa", "query", False), ("contraction_free", "query", True), ("linear", "query", True)]


def _worker() -> None:
    """torchrun --nproc_per_node 2 tests/test_fsdp.py OUT.json: sharded vs unsharded, every variant."""
    import copy

    import timm
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor, Shard

    import vit2cbsa
    from vit2cbsa.train.sharding import full_state_dict, quiet_view_warning, unit_classes

    quiet_view_warning()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    report = {}
    for variant, broadcast, recompute in WORKER_VARIANTS:
        name = f"{variant}/{broadcast}" + ("" if recompute else "/keep")
        torch.manual_seed(0)
        base = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=48,
                                 depth=2, num_heads=3, num_classes=4)  # 3 heads on 2 processes: uneven shards
        model = vit2cbsa.convert(base, variant, 4, broadcast=broadcast)
        with torch.no_grad():  # step sizes and temperatures away from their initial values
            for p in vit2cbsa.new_parameters(model):
                p.add_(0.1 * torch.randn_like(p))
        for m in model.modules():
            if hasattr(m, "recompute"):
                m.recompute = recompute
        plain = copy.deepcopy(model)
        classes = set(unit_classes(model))
        for m in list(model.modules())[::-1]:
            if type(m).__name__ in classes:
                fully_shard(m)
        fully_shard(model)
        x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
        y = torch.arange(8) % 4
        mine = slice(rank * 8 // world, (rank + 1) * 8 // world)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)  # linear in the gradient (Adam amplifies noise in ~0 gradients)
        popt = torch.optim.SGD(plain.parameters(), lr=0.1)
        loss = torch.nn.functional.cross_entropy(model(x[mine]), y[mine])
        loss.backward()
        ref = torch.nn.functional.cross_entropy(plain(x), y)
        ref.backward()
        worst_grad = 0.0
        placements = {}
        for (n, p), (_, q) in zip(model.named_parameters(), plain.named_parameters()):
            assert isinstance(p, DTensor) and isinstance(p.grad, DTensor), n
            worst_grad = max(worst_grad, (p.grad.full_tensor() - q.grad).abs().max().item() /
                             max(q.grad.abs().max().item(), 1e-12))
            if ".mixer." in n:
                placements[n] = [repr(p.placements[0]), list(p.to_local().shape), list(p.shape)]
                assert p.placements[0] == Shard(0) and p.to_local().shape != p.shape, n
        opt.step()
        popt.step()
        state = full_state_dict(model)
        worst_param = max((state[k] - v).abs().max().item() for k, v in plain.state_dict().items())
        losses = torch.stack([loss.detach()])
        dist.all_reduce(losses)
        report[name] = dict(loss=losses.item() / world, ref_loss=ref.item(), worst_grad_rel=worst_grad,
                            worst_param=worst_param, placements=placements)
    if rank == 0:
        Path(sys.argv[1]).write_text(json.dumps(report, indent=1))
    dist.destroy_process_group()


def test_every_variant_sharded_matches_unsharded(tmp_path):
    out = tmp_path / "report.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(Path(__file__)), str(out)]
    proc = subprocess.run(cmd, env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert sorted(report) == sorted(f"{v}/{b}" + ("" if r else "/keep") for v, b, r in WORKER_VARIANTS)
    for name, r in report.items():
        assert abs(r["loss"] - r["ref_loss"]) < 1e-5, (name, r)
        assert r["worst_grad_rel"] < 1e-4, (name, r)
        assert r["worst_param"] < 1e-5, (name, r)
        # kappa (3 heads -> 2 + 1 on the 2 processes), temperatures (2 x 3 -> 2 x 2 local), gamma / feature maps
        kappa = r["placements"]["blocks.0.attn.mixer.kappa"]
        assert kappa[0] == "Shard(dim=0)" and kappa[2] == [3] and kappa[1] == [2]
        if name.startswith("linear"):
            assert r["placements"]["blocks.0.attn.mixer.feature_map"][2] == [3, 16, 16]
        else:
            assert r["placements"]["blocks.0.attn.mixer.log_temperature"][1:] == [[1, 3], [2, 3]]


# --------------------------------------------------------------------------- 2 processes: fine-tuning under FSDP


def _args(assets, out, *extra):
    return ["--model", "timm:vit_tiny_patch16_224", "--checkpoint", str(assets / "tiny.safetensors"),
            "--model-kwargs", json.dumps(TINY_KW), "--dataset", str(assets / "data"), "--out", str(out),
            "--representatives", "4", "--num-workers", "0", "--cpu", "--log-every", "1", "--align-lr", "1e-2",
            "--lr", "3e-3", "--batch-size", "8", "--checkpoint-every", "2", *extra]


def _launch(assets, out, *extra, fsdp: bool, mixed="no"):
    launcher = (["--config_file", str(FSDP_CPU)] if fsdp else
                ["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--dynamo_backend", "no"])
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *launcher, "--mixed_precision", mixed,
           "--main_process_port", str(free_port()), str(SCRIPT), *_args(assets, out, *extra)]
    return subprocess.run(cmd, env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=240)


def _ok(proc):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _weights(out):
    from safetensors.torch import load_file

    return load_file(str(out / "final" / "model.safetensors"))


def _close(a, b, atol=2e-5):
    assert a.keys() == b.keys()
    worst = {k: (a[k].float() - b[k].float()).abs().max().item() for k in a}
    name = max(worst, key=worst.get)
    assert worst[name] <= atol, f"{name} differs by {worst[name]}"
    return worst[name]


def _losses(out):
    return [(r["stage"], r["step"], r["loss"]) for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
            if "loss" in r]


STAGES = ("--align-steps", "2", "--finetune-steps", "4", "--grad-accum", "2", "--distill-weight", "0.3")


def test_fsdp_align_and_finetune_killed_and_resumed_matches_ddp(assets, tmp_path):
    import vit2cbsa

    ddp, fsdp = tmp_path / "ddp", tmp_path / "fsdp"
    _ok(_launch(assets, ddp, *STAGES, fsdp=False))
    # stopped after global step 5 (fine-tuning step 3): the newest checkpoint is step 4 (fine-tuning step 2)
    killed = _launch(assets, fsdp, *STAGES, "--stop-after-step", "5", fsdp=True)
    assert killed.returncode != 0 and not (fsdp / "final.json").exists()
    assert "FSDP2 units (align): 2 Block, 2 TimmConvertedAttention + the root" in killed.stdout
    assert "FSDP2 units (finetune): 2 Block, 2 TimmConvertedAttention, 1 LayerNorm + the root" in killed.stdout
    step4 = fsdp / "checkpoints" / "step_4"
    assert {"pytorch_model_fsdp_0", "optimizer_0", "random_states_0.pkl", "random_states_1.pkl"} <= \
        {p.name for p in step4.iterdir()}
    assert sorted(p.name for p in (step4 / "pytorch_model_fsdp_0").iterdir()) == [".metadata", "__0_0.distcp",
                                                                                  "__1_0.distcp"]
    assert json.loads((step4 / "progress.json").read_text())["sharded"] is True
    other = tmp_path / "other"
    shutil.copytree(fsdp, other)
    resumed = _ok(_launch(assets, fsdp, *STAGES, fsdp=True))
    assert "resumed finetune at step 2/4" in resumed.stdout
    final = json.loads((fsdp / "final.json").read_text())
    assert final["final_format"] == "vit2cbsa" and final["num_processes"] == 2
    _close(_weights(fsdp), _weights(ddp))
    for (s1, n1, l1), (s2, n2, l2) in zip(_losses(fsdp), _losses(ddp), strict=True):
        assert (s1, n1) == (s2, n2) and abs(l1 - l2) < 1e-4
    loaded = vit2cbsa.from_pretrained(fsdp / "final")
    for name, tensor in loaded.state_dict().items():
        torch.testing.assert_close(tensor, _weights(fsdp)[name], rtol=0, atol=0)
    # a DDP launch on the FSDP run's checkpoints refuses in one line
    mixed_up = _launch(assets, other, *STAGES, fsdp=False)
    assert mixed_up.returncode != 0 and "it was written with FSDP and this launch runs without it" in mixed_up.stderr


def test_fsdp_lora_matches_ddp(assets, tmp_path):
    import vit2cbsa

    args = ("--finetune-steps", "3", "--lora-rank", "4", "--distill-weight", "0.5")
    ddp, fsdp = tmp_path / "ddp", tmp_path / "fsdp"
    _ok(_launch(assets, ddp, *args, fsdp=False))
    _ok(_launch(assets, fsdp, *args, fsdp=True))
    merged = _weights(fsdp)
    assert not any("lora" in k for k in merged)
    _close(merged, _weights(ddp))
    assert vit2cbsa.conversion_info(vit2cbsa.from_pretrained(fsdp / "final")).variant == "cbsa"


def test_fsdp_bf16_transformers_lora_runs_end_to_end(assets, tmp_path):
    """A transformers ViT, bf16 (parameters all-gathered in bf16, gradients reduced in float32), alignment + LoRA."""
    import vit2cbsa
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    model_dir = tmp_path / "hf_vit"
    torch.manual_seed(0)
    ViTForImageClassification(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                        intermediate_size=64, image_size=32, patch_size=8,
                                        num_labels=4)).save_pretrained(model_dir)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(model_dir)
    out = tmp_path / "bf16"
    args = _args(assets, out, "--align-steps", "1", "--finetune-steps", "2", "--lora-rank", "2", "--distill-weight",
                 "0.5")
    i = args.index("--checkpoint")
    del args[i:i + 2]
    args[args.index("--model") + 1] = f"hf:{model_dir}"
    i = args.index("--model-kwargs")
    del args[i:i + 2]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(FSDP_CPU), "--mixed_precision",
           "bf16", "--main_process_port", str(free_port()), str(SCRIPT), *args]
    proc = _ok(subprocess.run(cmd, env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=240))
    assert "mixed precision bf16" in proc.stdout and "2 ViTLayer" in proc.stdout and "2 HFConvertedAttention" in proc.stdout
    final = json.loads((out / "final.json").read_text())
    assert final["mixed_precision"] == "bf16" and final["final_format"] == "vit2cbsa"
    assert all(np.isfinite(loss) for _, _, loss in _losses(out))
    weights = _weights(out)
    assert {t.dtype for t in weights.values()} == {torch.float32}  # the float32 master weights
    assert not any("lora" in k for k in weights)
    assert next(vit2cbsa.from_pretrained(out / "final").parameters()).dtype == torch.float32


if __name__ == "__main__":
    _worker()
