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
import sys
from typing import List, Optional

from vit2cbsa.errors import BadImageError, DataError, UsageError
from vit2cbsa.train import FinetuneConfig, run
from vit2cbsa.train.config import add_arguments


def build_parser() -> argparse.ArgumentParser:
    """One option per :class:`~vit2cbsa.train.FinetuneConfig` field, with the field's help."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    return add_arguments(ap)


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(FinetuneConfig.from_arguments(args))
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
