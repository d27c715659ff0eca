"""``vit2cbsa explain MODEL IMAGE``: attention maps of one image, saved as a PNG.

:func:`explain_main` is the whole command (its own argparse parser); the ``vit2cbsa`` CLI wires
it in as the ``explain`` sub-command. MODEL is one of

* ``cifar10-teacher``            the embedded CIFAR-10 teacher (:func:`vit2cbsa.zoo.load_cifar10_teacher`);
* a timm model name             e.g. ``vit_small_patch16_224``; the pretrained weights are tried first,
                                and if they cannot be loaded (no network) the model is built with
                                random weights (``pretrained=False``) and a warning is printed;
* a local folder or Hub repo    a transformers model (``config.json`` with ``model_type``), a timm
                                checkpoint folder, or a folder saved by :func:`vit2cbsa.hub.save_pretrained`
                                (already converted);

read by :func:`vit2cbsa.loading.load`, as every ``vit2cbsa`` command reads MODEL,

optionally followed by ``:VARIANT`` (``cifar10-teacher:cbsa``, ``vit_small_patch16_224:contraction_free``)
to convert it on the fly; the original model's class-token attention is then shown side by side.
Errors are one line on stderr with exit status 1 (``--traceback`` for the full trace); usage
errors exit with 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, List, Optional, Tuple

import torch

from ..cli import parse_grid, parse_layers
from ..errors import UsageError
from ..loading import TEACHER
from .maps import mark_random_weights

DESCRIPTION = """\
Show which image patches the attention of MODEL uses for IMAGE, per layer and head, as a PNG:
the class-token attention of softmax layers and, for converted CBSA layers, the class-token row of
the layer's token-to-token operator, the gather maps A of the representatives most used by the
class token (representative <- patches), a broadcast map B (patches <- representative) and the
assignment of every patch to the representative it receives most from.

MODEL: cifar10-teacher | a timm model name | a local transformers, timm or vit2cbsa folder | a Hub repo id,
optionally with :VARIANT (cbsa, contraction_free, linear) to convert it on the fly and compare
with the original side by side."""

EPILOG = """\
examples:
  vit2cbsa explain cifar10-teacher:cbsa cat.png --layer -1 --out maps.png
  vit2cbsa explain cifar10-teacher:cbsa cat.png --layer 2,5 --representatives 16 --out maps.png
  vit2cbsa explain vit_small_patch16_224 photo.jpg --layer all --heads 0,1 --out maps.png
  vit2cbsa explain ./my-converted-model photo.jpg --out maps.png

layers: all, one index (-1 = last, the default), a list (0,3) or a slice (6:)
exit status: 0 on success, 1 on error (one line on stderr), 2 on a usage error."""

def _parse_grid(text: str) -> Any:
    """``vit2cbsa.cli.parse_grid`` (``"64"``, ``"8x8"``), and every side must be positive."""
    value = parse_grid(text)
    if min((value,) if isinstance(value, int) else value) <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive count such as 64 or a grid such as 8x8, got {text!r}")
    return value


def build_explain_parser(prog: str = "vit2cbsa explain") -> argparse.ArgumentParser:
    """The argument parser of ``vit2cbsa explain``."""
    from ..attention import BROADCASTS

    p = argparse.ArgumentParser(prog=prog, description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", metavar="MODEL", help="cifar10-teacher, a timm model name or a local folder, "
                                                  "optionally with :VARIANT to convert on the fly")
    p.add_argument("image", metavar="IMAGE", help="an image file (any size and aspect ratio; resized and "
                                                  "centre-cropped to the model's input size)")
    p.add_argument("--layer", "--layers", dest="layers", type=parse_layers, default=[-1], metavar="SPEC",
                   help="attention layers to show: all, -1 (default: the last), 0,3 or 6:")
    p.add_argument("--heads", type=parse_layers, default=None, metavar="SPEC",
                   help="heads to show (default: all)")
    p.add_argument("--out", default="maps.png", metavar="PNG", help="figure to write (default: maps.png)")
    g = p.add_argument_group("on-the-fly conversion (MODEL:VARIANT)")
    g.add_argument("--representatives", type=_parse_grid, default=64, metavar="N|HxW",
                   help="representatives per head (default: 64 = 8x8)")
    g.add_argument("--broadcast", choices=list(BROADCASTS), default="query", help="broadcast (default: query)")
    g.add_argument("--no-reference", action="store_true", help="do not show the original model's maps")
    p.add_argument("--num-reps", type=int, default=3, metavar="K",
                   help="gather maps shown per head: the K representatives the class token uses most (default: 3)")
    p.add_argument("--interpolation", choices=("bilinear", "nearest", "bicubic"), default="bilinear",
                   help="how maps are upsampled onto the image (default: bilinear)")
    p.add_argument("--seed", type=int, default=0, help="seed for random-weight models (default: 0)")
    p.add_argument("--traceback", action="store_true", help="show the full traceback of an error")
    return p


# --------------------------------------------------------------------------- models


def _split_variant(spec: str) -> Tuple[str, Optional[str]]:
    from ..attention import VARIANTS

    base, sep, suffix = spec.rpartition(":")
    if sep and base and suffix in VARIANTS:
        return base, suffix
    if sep and base and not Path(spec).expanduser().exists() and not spec.startswith(("hf-hub:", "local-dir:")):
        raise UsageError(f"unknown variant {suffix!r} in {spec!r}; choose one of {sorted(VARIANTS)}")
    return spec, None


def load_model(spec: str, representatives: Any = 64, broadcast: str = "query") -> dict:
    """Resolve MODEL with :func:`vit2cbsa.loading.load` (the resolver of every command; pretrained weights, or
    random ones with a warning when a timm name's or Hub repo's weights cannot be had):
    ``{"model", "reference" (original, or None), "config", "processor", "classes"}``."""
    from ..convert import convert, is_converted
    from ..loading import LoadError, load

    name, variant = _split_variant(spec)
    if Path(name).expanduser().is_file():
        raise UsageError(f"{name} is a file; MODEL must be {TEACHER}, a timm model name, a Hub repo id or a "
                           "model folder")

    def warn(text: str) -> None:
        print(f"vit2cbsa explain: warning: {text}", file=sys.stderr)

    try:
        loaded = load(name, pretrained=True, fallback_to_random=True, warn=warn)
    except LoadError as e:
        raise UsageError(str(e)) from e
    model = mark_random_weights(loaded.model.eval(), not loaded.pretrained)  # written on the figure
    reference = None
    if variant is not None:
        if is_converted(model):
            raise UsageError(f"{name} is already converted; drop the :{variant} suffix")
        reference = model
        try:
            model = convert(model, variant, representatives, broadcast=broadcast, inplace=False)
        except (ValueError, TypeError) as e:
            raise UsageError(str(e)) from e
        model.eval()
    return {"model": model, "reference": reference, "config": loaded.data_config,
            "processor": loaded.image_processor, "classes": loaded.class_names}


def _run(args: argparse.Namespace) -> int:
    from ..modeling import attention_layers, select_layers
    from .images import input_config, load_image, preprocess
    from .maps import explain, plot_explanation

    image = load_image(args.image)  # fail fast, before loading a model
    if args.num_reps < 1:
        raise UsageError("--num-reps must be at least 1")
    torch.manual_seed(args.seed)
    loaded = load_model(args.model, args.representatives, args.broadcast)
    model, reference = loaded["model"], loaded["reference"]
    all_layers = attention_layers(model)
    num_layers = len(all_layers)
    layers = select_layers(args.layers, all_layers)
    cfg = input_config(reference or model, loaded["config"], loaded["processor"])
    pixel_values, pixels = preprocess(image, cfg)
    maps, output = explain(model, pixel_values, layers)
    ref_maps = None
    if reference is not None and not args.no_reference:
        ref_maps, _ = explain(reference, pixel_values, layers)
    heads = args.heads
    if isinstance(heads, slice):
        heads = list(range(maps[0].num_heads))[heads]
    if heads is not None:
        bad = [h for h in heads if not -maps[0].num_heads <= h < maps[0].num_heads]
        if bad:
            raise UsageError(f"head {bad[0]} does not exist: the layers have {maps[0].num_heads} heads")
        heads = sorted({h % maps[0].num_heads for h in heads})
    pred = ""
    if torch.is_tensor(output) and output.dim() == 2:
        top = int(output[0].argmax())
        classes = loaded["classes"]
        label = classes[top] if classes and top < len(classes) else f"class {top}"
        pred = f"prediction: {label} (p={torch.softmax(output[0].float(), -1)[top]:.2f})"
    title = f"{args.model} | {Path(args.image).name} | {cfg.size[0]}x{cfg.size[1]}" + (f" | {pred}" if pred else "")
    out = plot_explanation(pixels, maps, args.out, reference=ref_maps, heads=heads, num_reps=args.num_reps,
                           title=title, mode=args.interpolation)
    kinds = ", ".join(f"{m.index}:{m.kind}" for m in maps)
    print(f"{args.model}: {num_layers} attention layers; shown {kinds}; grid {maps[0].grid[0]}x{maps[0].grid[1]}"
          + (f"; {pred}" if pred else ""))
    print(f"saved {out}")
    return 0


def explain_main(argv: Optional[List[str]] = None) -> int:
    """Run ``vit2cbsa explain`` with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    parser = build_explain_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (2)
        return int(e.code or 0) if not isinstance(e.code, str) else 2
    try:
        return _run(args)
    except KeyboardInterrupt:
        return 130
    except Exception as e:
        if args.traceback:
            raise
        text = " ".join(str(e).split()) or type(e).__name__
        print(f"vit2cbsa explain: error: {text}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(explain_main())
