"""The sub-commands ``vit2cbsa convert``, ``inspect``, ``push`` and ``export``: their arguments and what they do.

:func:`add_commands` declares them (:func:`vit2cbsa.cli.options.add_command`); each ``cmd_*`` runs one and
returns its exit status. MODEL is read by :func:`vit2cbsa.cli.models.load_model`, the loader of every command.
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path
from typing import Any, List

from ..attention import variant_uses_representatives
from ..errors import RepresentativesWarning, UsageError
from ..info import conversion_info, representatives_warning
from ..pooling import num_representatives_used
from ..modeling import input_size_of
from .console import warn
from .models import load_model
from .options import add_command, add_conversion_options, asked_options
from .parsing import parse_metric, parse_resolution


def cmd_convert(args: argparse.Namespace) -> int:
    """``vit2cbsa convert``: MODEL with its pretrained weights, converted and saved to ``--out``."""
    from ..hub import save_pretrained

    m = load_model(args.model, asked_options(args))  # a RepresentativesWarning is printed by run_command
    out = save_pretrained(m.model, args.out, image_processor=m.loaded.image_processor,
                          base_model=m.loaded.base_model or None, max_shard_size=args.max_shard_size)
    print(conversion_info(m.model))
    print(f"saved to {out}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """``vit2cbsa export``: MODEL converted (or as saved), written as ONNX or a torch.export program."""
    from .. import export

    fmt = args.format or {".onnx": "onnx", ".pt2": "pt2"}.get(Path(args.out).suffix)
    if fmt is None:
        raise UsageError(f"--out {args.out}: name the file .onnx or .pt2, or pass --format onnx|pt2")
    model = load_model(args.model, asked_options(args)).model
    dynamic = False if args.static_size else None
    example = export.example_input(model, 2, args.resolution)
    print(conversion_info(model))
    if fmt == "onnx":
        report = export.export_onnx(model, args.out, example, dynamic_size=dynamic, check=not args.no_check)
    else:
        report = export.save_program(model, args.out, example, dynamic_size=dynamic, check=not args.no_check)
    checked = ", ".join(f"{b}x{h}x{w}" for b, h, w in report.checked_sizes)
    if fmt == "onnx":
        print(f"saved {report.path} (ONNX; dynamic batch{', height and width' if report.dynamic_size else ''})"
              + (f"; ONNX Runtime vs eager: max |diff| {report.max_abs_diff:.2g} at {checked}" if checked else ""))
    else:
        print(f"saved {report.path} (torch.export program)"
              + (f"; reloaded vs eager: max |diff| {report.max_abs_diff:.2g}" if checked else ""))
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    """``vit2cbsa inspect``: the layers a conversion replaces and its cost, on a random-weight model."""
    from ..hub.costs import attention_table, change, compare_costs, human

    with warnings.catch_warnings():  # said below for the resolution inspected, not the model's own
        warnings.simplefilter("ignore", RepresentativesWarning)
        m = load_model(args.model, asked_options(args), pretrained=False, img_size=args.resolution, keep_base=True)
    base, converted, source = m.base, m.model, m.loaded.source
    info = conversion_info(converted)
    names = [layer.name for layer in info.converted]
    c, h, w = input_size_of(base)
    if args.resolution:
        h, w = args.resolution
    cost = compare_costs(base, converted, (c, h, w))  # on fake tensors: seconds at any resolution
    layers = attention_table(base, converted=names)
    no_reps = not variant_uses_representatives(info.variant)
    notes: List[str] = []
    if info.saves_nothing(cost.patch_grid):
        notes.append(representatives_warning(info, cost.patch_grid, (h, w))
                     + f" (FLOPs {change(cost.flops_before, cost.flops_after)})")
    report = {
        "model": args.model, "source": source.kind, "class": type(base).__name__,
        "conversion": {**info.config.options(), "converted_layers": info.converted_indices},
        "representative_grid_used": None if no_reps else list(info.grid_used(cost.patch_grid)),
        "representatives_per_head": None if no_reps else num_representatives_used(
            tuple(info.num_representatives), *cost.patch_grid, cost.num_prefix_tokens, info.extra_representatives),
        "warnings": notes,
        "attention_layers": layers, **cost.to_dict(),
    }
    for note in notes:
        warn(note)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"{args.model}: {type(base).__name__} ({source.kind}), input {c}x{h}x{w}")
    print(f"tokens per image: {cost.num_tokens} = {cost.num_prefix_tokens} prefix + "
          f"{cost.patch_grid[0]}x{cost.patch_grid[1]} patches")
    if no_reps:
        print(f"conversion: variant {info.variant!r}{info.options_text() or ', no representatives'}")
    else:
        reps = info.representatives_text(cost.num_prefix_tokens, cost.patch_grid) + " per head"
        print(f"conversion: variant {info.variant!r}, {reps}, broadcast {info.broadcast!r}")
    print(f"attention layers: {len(layers)} found, {len(names)} converted")
    for row in layers:
        mark = f"-> {info.variant}" if row["converted"] else "   softmax (kept)"
        print(f"  [{row['index']:>2}] {row['name']:<40} {row['family']:<8} {row['num_heads']:>3} heads x "
              f"{row['head_dim']:<4} {mark}")
    print(f"  {'':<12}{'original':>12}{'converted':>12}{'change':>9}")
    print(f"  {'FLOPs':<12}{human(cost.flops_before):>12}{human(cost.flops_after):>12}"
          f"{change(cost.flops_before, cost.flops_after):>9}")
    print(f"  {'parameters':<12}{human(cost.params_before):>12}{human(cost.params_after):>12}"
          f"{change(cost.params_before, cost.params_after):>9}")
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    """``vit2cbsa push``: a saved folder uploaded to the Hub with a model card."""
    from ..hub import push_to_hub

    folder = Path(args.dir).expanduser()
    if not folder.is_dir():
        raise UsageError(f"{args.dir} is not a folder (save one with `vit2cbsa convert ... --out DIR`)")
    commit = push_to_hub(folder, args.repo_id, metrics=dict(args.metric) or None, dataset=args.dataset,
                         license=args.license, private=args.private or None, token=args.token,
                         revision=args.revision, commit_message=args.commit_message, create_pr=args.create_pr)
    url = getattr(commit, "pr_url", None) or getattr(commit, "commit_url", None) or commit
    print(f"uploaded {folder} to {args.repo_id}: {url}")
    return 0


def add_commands(sub: Any) -> None:
    """Declare ``convert``, ``inspect``, ``push`` and ``export`` on ``sub`` (``add_subparsers()``), in that order."""
    p = add_command(
        sub, "convert", cmd_convert, help="convert a pretrained ViT and save it",
        description="Load MODEL with its pretrained weights, replace its softmax attention and save the result to "
                    "--out (safetensors + vit2cbsa_config.json; an image processor is saved too when the model "
                    "has one). Load it back with vit2cbsa.from_pretrained(DIR).",
        epilog="examples:\n  vit2cbsa convert vit_base_patch16_224 --out vit-b-cbsa\n"
               "  vit2cbsa convert facebook/dinov2-small --variant contraction_free --representatives 8x8 --out dinov2-s-cf\n"
               "  vit2cbsa convert ./timm-checkpoint --layers 6: --out ./hybrid")
    p.add_argument("--out", required=True, metavar="DIR", help="folder to write (replaced atomically)")
    add_conversion_options(p)
    p.add_argument("--max-shard-size", default="5GB", metavar="SIZE", help="shard weights above this size (default: 5GB)")

    p = add_command(
        sub, "inspect", cmd_inspect, help="show what a conversion would change (no weights needed)",
        description="List the attention layers of MODEL that would be converted, and the tokens, FLOPs (torch "
                    "FlopCounterMode on fake tensors, one image: no arithmetic is done, so any resolution takes "
                    "seconds) and parameters before and after, at a given resolution, and the representative "
                    "grid actually used there. Weights are not loaded: timm models are built with "
                    "pretrained=False, transformers models from their config.",
        epilog="examples:\n  vit2cbsa inspect vit_base_patch16_224 --resolution 384\n"
               "  vit2cbsa inspect ./vit-b-cbsa --resolution 224x320 --json")
    p.add_argument("--resolution", type=parse_resolution, default=None, metavar="N|HxW",
                   help="input size, e.g. 224 or 224x320 (height x width; default: the model's own)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    add_conversion_options(p)

    p = add_command(
        sub, "push", cmd_push, model_help=None, help="upload a converted folder to the Hugging Face Hub",
        description="Check that DIR loads, then upload it to the Hub model repo REPO_ID (created if needed) with a "
                    "generated README.md: metadata, conversion options, FLOPs and parameters before and after, "
                    "the metrics given, loading instructions and the CBSA citation. Authentication is "
                    "huggingface_hub's (HF_TOKEN, `hf auth login` or --token).",
        epilog="example:\n  vit2cbsa push vit-b-cbsa user/vit-b-cbsa --metric top1=80.4 --dataset imagenet-1k")
    p.add_argument("dir", metavar="DIR", help="a folder written by vit2cbsa convert / save_pretrained")
    p.add_argument("repo_id", metavar="REPO_ID", help="Hub model repo, e.g. user/vit-b-cbsa")
    p.add_argument("--metric", type=parse_metric, action="append", default=[], metavar="NAME=VALUE",
                   help="a fine-tuning result for the model card (repeatable)")
    p.add_argument("--dataset", help="the dataset the metrics were measured on")
    p.add_argument("--license", help="license identifier for the card, e.g. apache-2.0")
    p.add_argument("--private", action="store_true", help="create the repo as private")
    p.add_argument("--token", help="Hub token (default: huggingface_hub's)")
    p.add_argument("--revision", help="branch to push to")
    p.add_argument("--commit-message", help="commit message")
    p.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing")

    p = add_command(
        sub, "export", cmd_export, help="export a converted model to ONNX or a torch.export program",
        description="Load MODEL (converting it with the options below unless it is a converted folder) and write "
                    "--out: an ONNX file (torch.onnx.export with dynamo=True, then run in ONNX Runtime and "
                    "compared with eager) or a torch.export program (.pt2, reloaded and compared). The batch size "
                    "is dynamic; height and width too for timm models built with dynamic_img_size "
                    "(transformers models export at their own size). ONNX needs pip install \"vit2cbsa[export]\".",
        epilog="examples:\n  vit2cbsa export vit-b-cbsa --out vit-b-cbsa.onnx\n"
               "  vit2cbsa export vit_small_patch16_224 --variant contraction_free --out vit-s-cf.pt2")
    p.add_argument("--out", required=True, metavar="FILE", help="the file to write (.onnx or .pt2)")
    p.add_argument("--format", choices=("onnx", "pt2"), help="default: from the --out suffix")
    p.add_argument("--resolution", type=parse_resolution, default=None, metavar="N|HxW",
                   help="the example input size traced (default: the model's own)")
    p.add_argument("--static-size", action="store_true", help="fix height and width at the traced size")
    p.add_argument("--no-check", action="store_true", help="skip the comparison with eager")
    add_conversion_options(p)
