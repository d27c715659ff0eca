"""The ``vit2cbsa`` parser and its dispatch: :func:`build_parser`, :func:`main` and :func:`explain_main`.

Every sub-command is declared on the one parser (:mod:`.commands`: convert, inspect, push, export;
:mod:`.explain`: explain), so ``vit2cbsa --help`` lists them all; :func:`main` parses the arguments and runs
the command with :func:`vit2cbsa.cli.console.run_command` (errors as one line, exit status 1; usage errors
exit with 2).
"""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional, Sequence

from .._version import __version__
from .commands import add_commands
from .console import PROG, run_command
from .explain import add_explain_command
from .options import add_traceback_option

DESCRIPTION = """\
Convert pretrained Vision Transformers (timm or Hugging Face transformers) from softmax
self-attention to Contract-and-Broadcast Self-Attention (CBSA) and its relatives, inspect
what a conversion costs, and publish converted models on the Hugging Face Hub.

MODEL is one of:
  cifar10-teacher  the embedded CIFAR-10 ViT teacher (patch 4 on 32x32 images)
  a local folder   a folder written by vit2cbsa, a transformers model folder (config.json with
                   "model_type"), or a timm checkpoint folder (config.json with "architecture")
  a timm name      e.g. vit_base_patch16_224, deit_small_distilled_patch16_224.fb_in1k,
                   hf-hub:timm/vit_small_patch14_dinov2.lvd142m
  a Hub repo id    e.g. google/vit-base-patch16-224, facebook/dinov2-small, user/my-cbsa-model
Code shipped with a model (a config.json with "auto_map") is never run: such models are refused.
"""

EPILOG = """\
examples:
  vit2cbsa inspect vit_base_patch16_224
  vit2cbsa inspect facebook/dinov2-small --resolution 448 --representatives 8x8
  vit2cbsa inspect vit_base_patch16_224 --resolution 224x320 --variant linear --json
  vit2cbsa convert vit_base_patch16_224 --variant cbsa --representatives 64 --layers 6: --out vit-b-cbsa
  vit2cbsa convert ./my-hf-vit --variant contraction_free --out ./my-hf-vit-cbsa
  vit2cbsa push vit-b-cbsa user/vit-b-cbsa --metric top1=80.4 --dataset imagenet-1k --license apache-2.0
  vit2cbsa export vit-b-cbsa --out vit-b-cbsa.onnx
  vit2cbsa explain cifar10-teacher:cbsa cat.png --layer -1 --out maps.png

layers:   all (default), one index (-1), a list (0,1,2) or a slice (6: keeps layers 0-5 softmax)
representatives: per head, a square count (64 = 8x8) or a grid HxW (4x16)

environment:
  HF_TOKEN, HF_HUB_CACHE, HF_HUB_OFFLINE=1   used by huggingface_hub for downloads and uploads

exit status: 0 on success, 1 on error (one line on stderr), 2 on a usage error.
Python API: vit2cbsa.convert, vit2cbsa.save_pretrained, vit2cbsa.from_pretrained, vit2cbsa.push_to_hub.
"""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``vit2cbsa`` command, with every sub-command."""
    parser = argparse.ArgumentParser(prog=PROG, description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    add_traceback_option(parser)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    add_commands(sub)
    add_explain_command(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the ``vit2cbsa`` command with ``argv`` (default ``sys.argv[1:]``); returns the exit status
    (``--help`` and usage errors exit through argparse's ``SystemExit``, status 0 and 2)."""
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    return run_command(args.func, args)


def explain_main(argv: Optional[List[str]] = None) -> int:
    """Run ``vit2cbsa explain`` with ``argv`` (default ``sys.argv[1:]``); returns the exit status, usage errors
    and ``--help`` included."""
    try:
        return main(["explain", *(sys.argv[1:] if argv is None else argv)])
    except SystemExit as e:  # --help (0) or a usage error (2)
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
