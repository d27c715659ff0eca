"""Convert a pretrained ViT to CBSA-family attention and train it back: alignment, then fine-tuning.

Runs unchanged on one CPU process, several processes, one or many GPUs and nodes (Accelerate):

    python examples/finetune.py --model cifar10-teacher --dataset /tmp/cifar/cifar10 \\
        --out runs/cifar --finetune-steps 400 --distill-weight 1.0 --batch-size 64
    accelerate launch --multi_gpu --num_processes 2 examples/finetune.py --cpu ...   # 2 CPU processes
    (``accelerate launch --cpu --num_processes 2`` starts only one process: Accelerate's CPU launcher
    needs mpirun for more; ``--multi_gpu`` uses torchrun, and ``--cpu`` keeps it on CPU with gloo)
    accelerate launch --num_processes 8 --mixed_precision bf16 examples/finetune.py \\
        --model timm:vit_base_patch16_224.augreg2_in21k_ft_in1k --dataset imagenet-1k \\
        --out runs/vitb --representatives 64 --layers 6: \\
        --finetune-steps 20000 --lora-rank 16 --distill-weight 0.5 --batch-size 512
    accelerate launch --config_file examples/accelerate_fsdp.yaml examples/finetune.py ...   # FSDP2, 8 GPUs, bf16
    accelerate launch --config_file examples/accelerate_fsdp_cpu.yaml examples/finetune.py --cpu ...  # FSDP2, 2 CPU
    (FSDP: the units are the ViT blocks and the converted attention layers, chosen by vit2cbsa; checkpoints
    are sharded, one file per process; OUT/final is the same vit2cbsa folder as without FSDP)

Models: ``cifar10-teacher`` (the embedded CIFAR-10 ViT), ``timm:NAME`` (``pretrained=True``, or local
weights with ``--checkpoint FILE`` and ``--model-kwargs JSON``), ``hf:ID`` or a local transformers
folder (config.json + preprocessor_config.json). Data: a folder with train/ and val|validation|test/
class folders, or a ``datasets.load_dataset`` name/path. Stages (each optional, in order):
``--align-steps`` (attention alignment to the original layers, no labels; with the default representatives
not worth its cost for cbsa / contraction_free, worth it for linear) and ``--finetune-steps``
(supervised, whole model or ``--lora-rank``; ``--distill-weight`` mixes in KL to the original's logits).

Relaunching the same command resumes from the newest valid checkpoint in OUT/checkpoints (an
incomplete newer one -- a truncated optimizer state or progress.json -- is skipped, with a message,
and moved to OUT/checkpoints/invalid_step_N). Writes OUT/metrics.jsonl, OUT/final.json (accuracy of
the original and the converted model on the whole evaluation split, and per-stage timing) and
OUT/final/model.safetensors (LoRA merged).

One run at a time per OUT: a run holds OUT/run.lock (host, pid, start time) while it runs; a second
run on the same OUT stops with an error naming the holder. A lock left by a run that was killed
(its processes are gone) is taken over with a message. Killing `accelerate launch` with SIGKILL does
NOT stop its worker processes: they keep training and writing OUT and keep the lock, so a relaunch
refuses (naming their pids) until you stop them (`kill PID ...`); it never races them. A lock of a
run on another host cannot be checked: delete it by hand once that run is over.

Unreadable images (empty files, non-images named .jpg, truncated JPEGs) stop the run with an error
naming the file; --skip-bad-images replaces each by the next readable image of its split (training)
or leaves it out (evaluation), counting them (metrics.jsonl "bad_images", final.json
"bad_images_skipped"). Evaluations during training (before it, every --eval-every steps and at the
end of each stage) use a fixed random subset of --eval-subset images; the final evaluation uses the
whole split.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional

from vit2cbsa.train.data import BadImageError, DataError
from vit2cbsa.train.finetune import FinetuneConfig, UsageError, run


def build_parser() -> argparse.ArgumentParser:
    d = FinetuneConfig.__dataclass_fields__
    default = {k: f.default for k, f in d.items()}
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = ap.add_argument_group("model and data")
    g.add_argument("--model", required=True, help="cifar10-teacher | timm:NAME | hf:ID | local transformers folder")
    g.add_argument("--checkpoint", help="local timm weights (.safetensors/.pth) for --model timm:NAME")
    g.add_argument("--model-kwargs", type=json.loads, default={}, help="JSON kwargs for timm.create_model")
    g.add_argument("--dataset", required=True, help="image folder (train/ + val|test/) or datasets.load_dataset name")
    g.add_argument("--train-split")
    g.add_argument("--eval-split")
    g.add_argument("--max-train-samples", type=int)
    g.add_argument("--max-eval-samples", type=int)
    g.add_argument("--eval-subset", type=int, default=default["eval_subset"],
                   help="images (a fixed random subset of the evaluation split) for the evaluations during "
                        "training: before it, every --eval-every steps, at the end of each stage; the final "
                        "evaluation uses the whole split; 0: always the whole split (default %(default)s)")
    g.add_argument("--skip-bad-images", action="store_true",
                   help="replace an unreadable image by the next readable one (training) or leave it out "
                        "(evaluation), counted in metrics.jsonl / final.json; default: stop with an error naming it")
    g.add_argument("--num-workers", type=int, default=default["num_workers"])
    g.add_argument("--out", "--output-dir", dest="output_dir", required=True,
                   help="output folder; locked (OUT/run.lock) while a run uses it, see above")
    g = ap.add_argument_group("conversion (vit2cbsa.convert)")
    g.add_argument("--variant", default=default["variant"], help="cbsa | contraction_free | linear")
    g.add_argument("--representatives", default=str(default["representatives"]), help="count (64) or grid (8x8)")
    g.add_argument("--layers", help="which attention layers: '6:' (slice), '0,2,4', '-1'; default all")
    g.add_argument("--broadcast", default=default["broadcast"], help="key | query | transpose")
    g.add_argument("--extra-representatives", default=default["extra_representatives"],
                   help="prefix (each class/register token its own representative) | global | none")
    g.add_argument("--prefix-broadcast", default=default["prefix_broadcast"],
                   help="own (a prefix token reads only its own representative) | all")
    g = ap.add_argument_group("stage 1: attention alignment")
    g.add_argument("--align-steps", type=int, default=0)
    g.add_argument("--align-lr", type=float, default=default["align_lr"])
    g.add_argument("--align-pretrained-lr", type=float, help="lr of the pretrained q/k/v/o (default align-lr/10)")
    g.add_argument("--align-trainable", default=default["align_trainable"], choices=["attention", "new"])
    g = ap.add_argument_group("stage 2: supervised fine-tuning")
    g.add_argument("--finetune-steps", type=int, default=0)
    g.add_argument("--lr", type=float, default=default["lr"])
    g.add_argument("--weight-decay", type=float, default=default["weight_decay"])
    g.add_argument("--lora-rank", type=int, default=0,
                   help="0: train the whole model; N > 0: rank-N LoRA adapters on the attention projections")
    g.add_argument("--lora-alpha", type=float)
    g.add_argument("--lora-dropout", type=float, default=0.0)
    g.add_argument("--lora-targets", type=lambda s: [t for t in s.split(",") if t],
                   help="comma-separated module names (suffixes); default: the attention projections")
    g.add_argument("--distill-weight", type=float, default=0.0, help="weight of KL to the original's logits")
    g.add_argument("--temperature", type=float, default=default["temperature"])
    g = ap.add_argument_group("training")
    g.add_argument("--batch-size", type=int, default=default["batch_size"], help="global batch per optimizer step")
    g.add_argument("--grad-accum", type=int, default=1)
    g.add_argument("--warmup-ratio", type=float, default=default["warmup_ratio"])
    g.add_argument("--max-grad-norm", type=float, default=default["max_grad_norm"])
    g.add_argument("--eval-batch-size", type=int, help="per process")
    g.add_argument("--mixed-precision", choices=["no", "fp16", "bf16", "fp8"],
                   help="default: from `accelerate config` / `accelerate launch --mixed_precision`")
    g.add_argument("--cpu", action="store_true", help="force CPU")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--checkpoint-every", type=int, default=default["checkpoint_every"])
    g.add_argument("--keep-checkpoints", type=int, default=default["keep_checkpoints"])
    g.add_argument("--log-every", type=int, default=default["log_every"])
    g.add_argument("--eval-every", type=int, default=0)
    g.add_argument("--stop-after-step", type=int, help=argparse.SUPPRESS)  # testing: simulate a kill
    return ap


def main(argv: Optional[List[str]] = None) -> int:
    args = vars(build_parser().parse_args(argv))
    try:
        run(FinetuneConfig(**args))
    except (UsageError, DataError) as e:
        from accelerate import PartialState

        state = PartialState()
        # the same UsageError on every process: the main one says it; an unreadable image is met by one process
        if state.is_main_process or isinstance(e, BadImageError):
            where = f"[process {state.process_index}] " if state.num_processes > 1 and not state.is_main_process else ""
            hint = " (or pass --skip-bad-images)" if isinstance(e, BadImageError) else ""
            print(f"error: {where}{e}{hint}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
