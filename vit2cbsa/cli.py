"""The ``vit2cbsa`` command: convert, inspect and publish CBSA-converted Vision Transformers.

``vit2cbsa convert``  loads a pretrained ViT, converts it and saves it (see :mod:`vit2cbsa.hub`);
``vit2cbsa inspect``  shows which attention layers would be converted and what that changes
                      (tokens, FLOPs, parameters) at a given resolution, without any weights;
``vit2cbsa push``     uploads a saved folder to the Hugging Face Hub with a model card;
``vit2cbsa export``   converts MODEL (if it is not a converted folder already) and writes a ``torch.export``
                      program (.pt2) or an ONNX file checked in ONNX Runtime (:mod:`vit2cbsa.export`);
``vit2cbsa explain``  saves the attention maps of one image as a PNG (:mod:`vit2cbsa.analysis.cli`).

MODEL arguments are resolved by :func:`vit2cbsa.loading.resolve`, the same for every command, in this
order: ``cifar10-teacher`` (the embedded CIFAR-10 teacher), a local folder (a vit2cbsa folder, a
transformers folder with ``config.json``, or a timm checkpoint folder), a timm model name
(``vit_base_patch16_224``, ``hf-hub:timm/...``), then a Hugging Face Hub repo id. transformers never
runs code from a model folder or repo (``trust_remote_code=False``). Errors are reported as one line on
stderr with exit status 1 (``--traceback`` shows the full trace); warnings as ``vit2cbsa: warning: ...``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import sys
import textwrap
import warnings
from pathlib import Path
from typing import Any, List, Optional, Sequence, Tuple

from torch import nn

from . import specs
from ._version import __version__
from .errors import UsageError, one_line
from .attention import BROADCASTS, PREFIX_BROADCASTS, VARIANTS
from .layout import EXTRA_REPRESENTATIVES
from .loading import TEACHER, Source, load, resolve

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


def _warn(text: str) -> None:
    """A warning, as one line on stderr."""
    text = " ".join(str(text).split())
    if text.startswith("vit2cbsa: "):
        text = text[len("vit2cbsa: "):]
    print(f"vit2cbsa: warning: {text}", file=sys.stderr)


# --------------------------------------------------------------------------- argument parsing


def parse_grid(text: str) -> Any:
    """``"64" -> 64``, ``"8x8" -> (8, 8)`` (:func:`vit2cbsa.specs.parse_grid` as an argparse type)."""
    try:
        return specs.parse_grid(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def parse_resolution(text: str) -> Tuple[int, int]:
    """``"224" -> (224, 224)``, ``"224x320" -> (224, 320)`` (height x width)."""
    value = parse_grid(text)
    h, w = (value, value) if isinstance(value, int) else value
    if h <= 0 or w <= 0:
        raise argparse.ArgumentTypeError(f"resolution must be positive, got {text!r}")
    return h, w


def parse_layers(text: str) -> Any:
    """``"all" -> None``, ``"3" -> [3]``, ``"0,1" -> [0, 1]``, ``"6:" -> slice(6, None)``
    (:func:`vit2cbsa.specs.parse_layers` as an argparse type)."""
    try:
        return specs.parse_layers(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def parse_metric(text: str) -> Tuple[str, float]:
    name, sep, value = text.partition("=")
    try:
        if not sep or not name:
            raise ValueError
        return name.strip(), float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE such as top1=80.4, got {text!r}") from None


# --------------------------------------------------------------------------- finding models
# One resolver for every command: vit2cbsa.loading (also what `vit2cbsa explain` uses).


def build_for_inspect(source: Source, resolution: Optional[Tuple[int, int]]) -> Tuple[nn.Module, Optional[nn.Module]]:
    """A random-weight model for MODEL at ``resolution``: ``(base, converted)``; ``converted`` is
    the saved conversion for a vit2cbsa folder, else ``None``."""
    from .convert import convert

    loaded = load(source, pretrained=False, img_size=resolution)
    if loaded.conversion is not None:  # a vit2cbsa folder: its base architecture and the saved options
        return loaded.model, convert(copy.deepcopy(loaded.model), **loaded.conversion)
    return loaded.model, None


# --------------------------------------------------------------------------- commands


def _conversion_options(args: argparse.Namespace) -> dict:
    return {"variant": args.variant or "cbsa",
            "num_representatives": args.representatives if args.representatives is not None else 64,
            "layers": args.layers, "broadcast": args.broadcast or "query",
            "extra_representatives": args.extra_representatives or "prefix",
            "prefix_broadcast": args.prefix_broadcast or "own"}


def _load_converted(args: argparse.Namespace) -> Tuple[Any, nn.Module]:
    """MODEL with its pretrained weights, converted with the options (or as saved, for a converted folder)."""
    from .convert import conversion_info, convert
    from .layout import as_grid

    source = resolve(args.model)
    loaded = load(source, pretrained=True, warn=_warn)
    model = loaded.model
    info = conversion_info(model)
    if info is not None:  # a vit2cbsa folder: re-save it, if the options asked for agree
        asked = {"variant": args.variant, "broadcast": args.broadcast,
                 "num_representatives": as_grid(args.representatives) if args.representatives is not None else None,
                 "extra_representatives": args.extra_representatives, "prefix_broadcast": args.prefix_broadcast}
        saved = {k: v for k, v in info.options().items() if k in asked}
        clash = [f"{k}={asked[k]!r} (saved: {saved[k]!r})" for k in asked if asked[k] is not None and asked[k] != saved[k]]
        if clash or args.layers is not None:
            raise UsageError(f"{args.model} is already converted; cannot change " + (", ".join(clash) or "layers")
                           + " -- convert the original model instead")
    else:
        convert(model, **_conversion_options(args))  # a RepresentativesWarning is printed by main()
    return loaded, model


def cmd_convert(args: argparse.Namespace) -> int:
    from .convert import conversion_info
    from .hub import save_pretrained

    loaded, model = _load_converted(args)
    out = save_pretrained(model, args.out, image_processor=loaded.image_processor,
                          base_model=loaded.base_model or None, max_shard_size=args.max_shard_size)
    print(conversion_info(model))
    print(f"saved to {out}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    import torch

    from . import export
    from .convert import conversion_info

    fmt = args.format or {".onnx": "onnx", ".pt2": "pt2"}.get(Path(args.out).suffix)
    if fmt is None:
        raise UsageError(f"--out {args.out}: name the file .onnx or .pt2, or pass --format onnx|pt2")
    _, model = _load_converted(args)
    model.eval()
    dynamic = False if args.static_size else None
    example = export.example_input(model, 2, args.resolution)
    print(conversion_info(model))
    if fmt == "onnx":
        report = export.export_onnx(model, args.out, example, dynamic_size=dynamic, check=not args.no_check)
        checked = ", ".join(f"{b}x{h}x{w}" for b, h, w in report.checked_sizes)
        print(f"saved {report.path} (ONNX; dynamic batch{', height and width' if report.dynamic_size else ''})"
              + (f"; ONNX Runtime vs eager: max |diff| {report.max_abs_diff:.2g} at {checked}" if checked else ""))
        return 0
    program = export.export_program(model, example, dynamic_size=dynamic)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    torch.export.save(program, args.out)
    if not args.no_check:
        loaded = torch.export.load(args.out).module()
        worst = 0.0
        sizes = export.check_sizes(model, export.exports_other_sizes(model) and dynamic is None, example.shape[-2:])
        for i, (b, h, w) in enumerate(sizes):
            images = export.example_input(model, b, (h, w), seed=i + 1)
            with torch.no_grad():
                worst = max(worst, (loaded(images) - export.ImagesToTensor(model)(images)).abs().max().item())
        if not worst <= 1e-4:
            raise UsageError(f"{args.out}: the exported program differs from eager by {worst:.3g}")
        print(f"saved {args.out} (torch.export program); reloaded vs eager: max |diff| {worst:.2g}")
    else:
        print(f"saved {args.out} (torch.export program)")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from .convert import RepresentativesWarning, conversion_info, convert, representatives_warning
    from .layout import num_representatives_used
    from .model_card import attention_table, change, compare_costs, human, input_size_of

    source = resolve(args.model)
    with warnings.catch_warnings():  # said below for the resolution inspected, not the model's own
        warnings.simplefilter("ignore", RepresentativesWarning)
        base, converted = build_for_inspect(source, args.resolution)
        if converted is None:
            converted = convert(copy.deepcopy(base), **_conversion_options(args))
    info = conversion_info(converted)
    names = [layer.name for layer in info.converted]
    c, h, w = input_size_of(base)
    if args.resolution:
        h, w = args.resolution
    cost = compare_costs(base, converted, (c, h, w))  # on fake tensors: seconds at any resolution
    layers = attention_table(base, converted=names)
    gh, gw = info.num_representatives
    used = info.grid_used(cost.patch_grid)
    notes: List[str] = []
    if info.saves_nothing(cost.patch_grid):
        notes.append(representatives_warning(info, cost.patch_grid, (h, w))
                     + f" (FLOPs {change(cost.flops_before, cost.flops_after)})")
    report = {
        "model": args.model, "source": source.kind, "class": type(base).__name__,
        "conversion": {"variant": info.variant, "num_representatives": [gh, gw], "broadcast": info.broadcast,
                       "extra_representatives": info.extra_representatives,
                       "prefix_broadcast": info.prefix_broadcast, "converted_layers": info.converted_indices},
        "representative_grid_used": None if info.variant == "linear" else list(used),
        "representatives_per_head": None if info.variant == "linear" else num_representatives_used(
            tuple(info.num_representatives), *cost.patch_grid, cost.num_prefix_tokens, info.extra_representatives),
        "warnings": notes,
        "attention_layers": layers, **cost.to_dict(),
    }
    for note in notes:
        _warn(note)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"{args.model}: {type(base).__name__} ({source.kind}), input {c}x{h}x{w}")
    print(f"tokens per image: {cost.num_tokens} = {cost.num_prefix_tokens} prefix + "
          f"{cost.patch_grid[0]}x{cost.patch_grid[1]} patches")
    reps = "no representatives (linear)" if info.variant == "linear" else (
        info.representatives_text(cost.num_prefix_tokens, cost.patch_grid) + " per head")
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
    from .hub import push_to_hub

    folder = Path(args.dir).expanduser()
    if not folder.is_dir():
        raise UsageError(f"{args.dir} is not a folder (save one with `vit2cbsa convert ... --out DIR`)")
    commit = push_to_hub(folder, args.repo_id, metrics=dict(args.metric) or None, dataset=args.dataset,
                         license=args.license, private=args.private or None, token=args.token,
                         revision=args.revision, commit_message=args.commit_message, create_pr=args.create_pr)
    url = getattr(commit, "pr_url", None) or getattr(commit, "commit_url", None) or commit
    print(f"uploaded {folder} to {args.repo_id}: {url}")
    return 0


# --------------------------------------------------------------------------- the parser


def _add_conversion_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("conversion options")
    g.add_argument("--variant", choices=sorted(VARIANTS), default=None,
                   help="attention to convert to (default: cbsa)")
    g.add_argument("--representatives", type=parse_grid, default=None, metavar="N|HxW",
                   help="representatives per head: a square count or a grid (default: 64 = 8x8)")
    g.add_argument("--layers", type=parse_layers, default=None, metavar="SPEC",
                   help="attention layers to convert, in block order: all, 3, 0,1,2 or 6: (default: all)")
    g.add_argument("--broadcast", choices=list(BROADCASTS), default=None,
                   help="how representatives are broadcast back to tokens (default: query)")
    g.add_argument("--extra-representatives", choices=list(EXTRA_REPRESENTATIVES), default=None,
                   help="representatives next to the pooled grid: prefix (each class/register token its own, "
                        "default), global (the mean of the patch queries) or none")
    g.add_argument("--prefix-broadcast", choices=list(PREFIX_BROADCASTS), default=None,
                   help="own (default): a prefix token reads back only its own representative; all: every one")


def _para(text: str) -> str:
    return textwrap.fill(" ".join(text.split()), width=88)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``vit2cbsa`` command."""
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(prog="vit2cbsa", description=DESCRIPTION, epilog=EPILOG, formatter_class=fmt)
    parser.add_argument("--version", action="version", version=f"vit2cbsa {__version__}")
    parser.add_argument("--traceback", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser(
        "convert", formatter_class=fmt, help="convert a pretrained ViT and save it",
        description=_para("Load MODEL with its pretrained weights, replace its softmax attention and save the "
                    "result to --out (safetensors + vit2cbsa_config.json; an image processor is saved too "
                    "when the model has one). Load it back with vit2cbsa.from_pretrained(DIR)."),
        epilog="examples:\n  vit2cbsa convert vit_base_patch16_224 --out vit-b-cbsa\n"
               "  vit2cbsa convert facebook/dinov2-small --variant contraction_free --representatives 8x8 --out dinov2-s-cf\n"
               "  vit2cbsa convert ./timm-checkpoint --layers 6: --out ./hybrid")
    p.add_argument("model", metavar="MODEL", help=f"{TEACHER}, a local folder, a timm model name or a Hub repo id")
    p.add_argument("--out", required=True, metavar="DIR", help="folder to write (replaced atomically)")
    _add_conversion_options(p)
    p.add_argument("--max-shard-size", default="5GB", metavar="SIZE", help="shard weights above this size (default: 5GB)")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser(
        "inspect", formatter_class=fmt, help="show what a conversion would change (no weights needed)",
        description=_para("List the attention layers of MODEL that would be converted, and the tokens, FLOPs "
                    "(torch FlopCounterMode on fake tensors, one image: no arithmetic is done, so any "
                    "resolution takes seconds) and parameters before and after, at a given resolution, and "
                    "the representative grid actually used there. Weights are not loaded: timm models are "
                    "built with pretrained=False, transformers models from their config."),
        epilog="examples:\n  vit2cbsa inspect vit_base_patch16_224 --resolution 384\n"
               "  vit2cbsa inspect ./vit-b-cbsa --resolution 224x320 --json")
    p.add_argument("model", metavar="MODEL", help=f"{TEACHER}, a local folder, a timm model name or a Hub repo id")
    p.add_argument("--resolution", type=parse_resolution, default=None, metavar="N|HxW",
                   help="input size, e.g. 224 or 224x320 (height x width; default: the model's own)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    _add_conversion_options(p)
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser(
        "push", formatter_class=fmt, help="upload a converted folder to the Hugging Face Hub",
        description=_para("Check that DIR loads, then upload it to the Hub model repo REPO_ID (created if needed) "
                    "with a generated README.md: metadata, conversion options, FLOPs and parameters before "
                    "and after, the metrics given, loading instructions and the CBSA citation. "
                    "Authentication is huggingface_hub's (HF_TOKEN, `hf auth login` or --token)."),
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
    p.set_defaults(func=cmd_push)

    p = sub.add_parser(
        "export", formatter_class=fmt, help="export a converted model to ONNX or a torch.export program",
        description=_para("Load MODEL (converting it with the options below unless it is a converted folder) and "
                    "write --out: an ONNX file (torch.onnx.export with dynamo=True, then run in ONNX Runtime and "
                    "compared with eager) or a torch.export program (.pt2, reloaded and compared). The batch "
                    "size is dynamic; height and width too for timm models built with dynamic_img_size "
                    "(transformers models export at their own size). ONNX needs pip install \"vit2cbsa[export]\"."),
        epilog="examples:\n  vit2cbsa export vit-b-cbsa --out vit-b-cbsa.onnx\n"
               "  vit2cbsa export vit_small_patch16_224 --variant contraction_free --out vit-s-cf.pt2")
    p.add_argument("model", metavar="MODEL", help=f"{TEACHER}, a local folder, a timm model name or a Hub repo id")
    p.add_argument("--out", required=True, metavar="FILE", help="the file to write (.onnx or .pt2)")
    p.add_argument("--format", choices=("onnx", "pt2"), help="default: from the --out suffix")
    p.add_argument("--resolution", type=parse_resolution, default=None, metavar="N|HxW",
                   help="the example input size traced (default: the model's own)")
    p.add_argument("--static-size", action="store_true", help="fix height and width at the traced size")
    p.add_argument("--no-check", action="store_true", help="skip the comparison with eager")
    _add_conversion_options(p)
    p.set_defaults(func=cmd_export)

    # `vit2cbsa explain` has its own parser (vit2cbsa.analysis.cli); main() hands it the arguments. Listed here
    # for `vit2cbsa --help` and the "invalid choice" message.
    sub.add_parser("explain", add_help=False, help="save the attention maps of one image as a PNG")
    return parser


@contextlib.contextmanager
def _one_line_warnings():
    """vit2cbsa's own warnings (:class:`vit2cbsa.convert.RepresentativesWarning`) as ``vit2cbsa: warning: ...``
    lines on stderr, each once; other warnings as Python shows them."""
    from .convert import RepresentativesWarning

    caught: list = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", RepresentativesWarning)
            yield
    finally:  # outside catch_warnings: what is re-emitted here is shown, not recorded again
        seen = set()
        for w in caught:
            if not issubclass(w.category, RepresentativesWarning):
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
            elif str(w.message) not in seen:
                seen.add(str(w.message))
                _warn(str(w.message))


def _explain_argv(argv: List[str]) -> Optional[List[str]]:
    """The arguments for ``vit2cbsa explain`` when ``argv`` runs it (``--traceback`` may come first), else ``None``."""
    lead = 0
    while lead < len(argv) and argv[lead] == "--traceback":
        lead += 1
    if argv[lead:lead + 1] != ["explain"]:
        return None
    return argv[lead + 1:] + (["--traceback"] if lead else [])


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the ``vit2cbsa`` command; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    explain_argv = _explain_argv(argv)
    if explain_argv is not None:  # attention maps: its own parser, in vit2cbsa.analysis.cli
        from .analysis.cli import explain_main

        return explain_main(explain_argv)
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # our own errors are the ones to read
    try:
        with _one_line_warnings():
            return args.func(args)
    except KeyboardInterrupt:
        print("vit2cbsa: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if args.traceback:
            raise
        print(f"vit2cbsa: error: {one_line(e, limit=1000)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
