"""``vit2cbsa explain MODEL IMAGE``: attention maps of one image, saved as a PNG.

:func:`add_explain_command` declares the sub-command and :func:`cmd_explain` runs it
(:func:`vit2cbsa.cli.main.explain_main` runs it alone). MODEL is read by
:func:`vit2cbsa.cli.models.load_model`, as every ``vit2cbsa`` command reads it -- the embedded
``cifar10-teacher``, a timm model name, a local transformers, timm or vit2cbsa folder, or a Hub repo id --
except that when the pretrained weights of a timm name or Hub repo cannot be loaded (no network), the model
is built with random weights and a warning is printed (and written on the figure). MODEL may be followed by
``:VARIANT`` (``cifar10-teacher:cbsa``, ``vit_small_patch16_224:contraction_free``) to convert it on the fly;
the original model's class-token attention is then shown side by side. The maps and the figure are
:mod:`vit2cbsa.analysis.maps` and :mod:`vit2cbsa.analysis.figures`.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Optional, Tuple

import torch

from ..attention import VARIANTS
from ..errors import UsageError
from .models import load_model
from .options import add_command, add_conversion_options, asked_options
from .parsing import parse_layers

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

#: the conversion options ``MODEL:VARIANT`` takes on the command line (the variant is the suffix)
ON_THE_FLY = ("num_representatives", "broadcast")


def add_explain_command(sub: Any) -> argparse.ArgumentParser:
    """Declare ``explain`` on ``sub`` (``add_subparsers()``); returns its parser."""
    p = add_command(sub, "explain", cmd_explain, help="save the attention maps of one image as a PNG",
                    description=DESCRIPTION, epilog=EPILOG, wrap=False,
                    model_help="cifar10-teacher, a timm model name or a local folder, optionally with :VARIANT "
                               "to convert on the fly")
    p.add_argument("image", metavar="IMAGE", help="an image file (any size and aspect ratio; resized and "
                                                  "centre-cropped to the model's input size)")
    p.add_argument("--layer", "--layers", dest="layers", type=parse_layers, default=[-1], metavar="SPEC",
                   help="attention layers to show: all, -1 (default: the last), 0,3 or 6:")
    p.add_argument("--heads", type=parse_layers, default=None, metavar="SPEC",
                   help="heads to show (default: all)")
    p.add_argument("--out", default="maps.png", metavar="PNG", help="figure to write (default: maps.png)")
    g = add_conversion_options(p, "on-the-fly conversion (MODEL:VARIANT)", only=ON_THE_FLY)
    g.add_argument("--no-reference", action="store_true", help="do not show the original model's maps")
    p.add_argument("--num-reps", type=int, default=3, metavar="K",
                   help="gather maps shown per head: the K representatives the class token uses most (default: 3)")
    p.add_argument("--interpolation", choices=("bilinear", "nearest", "bicubic"), default="bilinear",
                   help="how maps are upsampled onto the image (default: bilinear)")
    p.add_argument("--seed", type=int, default=0, help="seed for random-weight models (default: 0)")
    return p


def split_variant(spec: str) -> Tuple[str, Optional[str]]:
    """``"MODEL:VARIANT" -> ("MODEL", "VARIANT")``, ``"MODEL" -> ("MODEL", None)``; a colon in a path, a
    ``hf-hub:`` or ``local-dir:`` name is kept."""
    base, sep, suffix = spec.rpartition(":")
    if sep and base and suffix in VARIANTS:
        return base, suffix
    if sep and base and not Path(spec).expanduser().exists() and not spec.startswith(("hf-hub:", "local-dir:")):
        raise UsageError(f"unknown variant {suffix!r} in {spec!r}; choose one of {sorted(VARIANTS)}")
    return spec, None


def _heads(heads: Any, num_heads: int) -> Optional[list]:
    """The head indices ``--heads`` selects (``None``: all)."""
    if isinstance(heads, slice):
        heads = list(range(num_heads))[heads]
    if heads is None:
        return None
    bad = [h for h in heads if not -num_heads <= h < num_heads]
    if bad:
        raise UsageError(f"head {bad[0]} does not exist: the layers have {num_heads} heads")
    return sorted({h % num_heads for h in heads})


def cmd_explain(args: argparse.Namespace) -> int:
    """``vit2cbsa explain``: the attention maps of IMAGE in MODEL, saved to ``--out``."""
    from ..analysis import figures  # figures.plot_explanation looked up when run (a test replaces it)
    from ..analysis.images import input_config, load_image, preprocess
    from ..analysis.maps import explain, mark_random_weights
    from ..modeling import attention_layers, select_layers

    image = load_image(args.image)  # fail fast, before loading a model
    if args.num_reps < 1:
        raise UsageError("--num-reps must be at least 1")
    torch.manual_seed(args.seed)
    name, variant = split_variant(args.model)
    asked = {**asked_options(args, ON_THE_FLY), "variant": variant} if variant else None
    m = load_model(name, asked, fallback_to_random=True, keep_base=True)
    random = not m.loaded.pretrained
    model = mark_random_weights(m.model, random)  # written on the figure
    reference = mark_random_weights(m.base, random) if m.base is not None else None
    all_layers = attention_layers(model)
    layers = select_layers(args.layers, all_layers)
    cfg = input_config(reference or model, m.loaded.data_config, m.loaded.image_processor)
    pixel_values, pixels = preprocess(image, cfg)
    maps, output = explain(model, pixel_values, layers)
    ref_maps = None
    if reference is not None and not args.no_reference:
        ref_maps, _ = explain(reference, pixel_values, layers)
    heads = _heads(args.heads, maps[0].num_heads)
    pred = ""
    if torch.is_tensor(output) and output.dim() == 2:
        top = int(output[0].argmax())
        classes = m.loaded.class_names
        label = classes[top] if classes and top < len(classes) else f"class {top}"
        pred = f"prediction: {label} (p={torch.softmax(output[0].float(), -1)[top]:.2f})"
    title = f"{args.model} | {Path(args.image).name} | {cfg.size[0]}x{cfg.size[1]}" + (f" | {pred}" if pred else "")
    out = figures.plot_explanation(pixels, maps, args.out, reference=ref_maps, heads=heads, num_reps=args.num_reps,
                                   title=title, mode=args.interpolation)
    kinds = ", ".join(f"{lm.index}:{lm.kind}" for lm in maps)
    print(f"{args.model}: {len(all_layers)} attention layers; shown {kinds}; grid {maps[0].grid[0]}x{maps[0].grid[1]}"
          + (f"; {pred}" if pred else ""))
    print(f"saved {out}")
    return 0
