"""Dense features: semantic segmentation with a frozen backbone and a linear probe, at growing token counts.

How well does a converted model keep its PATCH tokens (not just the class token) as the token count grows?
For each method (a named conversion of the model, or the original itself, :data:`METHODS`) and each token
count this measures

* (a) mIoU and pixel accuracy (per patch) of a linear probe ``D -> classes`` trained on the method's own frozen
  final-norm patch tokens (AdamW on cached features, the same budget for every method);
* (b) mIoU of the ORIGINAL's probe on the method's features (the drop-in case);
* (c) cosine similarity to the original's tokens, patch tokens and class token, at the output of every block
  (forward hooks) and at the final norm (``forward_features`` / ``last_hidden_state``), on the test split;
* (d) forward FLOPs of one image (``vit2cbsa.measure.count_flops``, fake tensors), on the model measured and on
  ViT-S/16 (timm, random weights) at 256, 512, 1024 and 2048 pixels (257 to 16,385 tokens), with the log-log
  slope of FLOPs in the token count ("FLOPs exponent");
* (e) CPU speed-up over the original, timed side by side in one process (median of repeats, batch 1,
  ``torch.inference_mode``) on the model at each token count and on ViT-S/16 at 1024x1024 (4,097 tokens).

Default data, offline: mosaics of k x k CIFAR-10 test/train images on the embedded CIFAR-10 teacher
(``cifar10-teacher``: 32x32 input, patch 4, an 8x8 grid + class token). A mosaic of 2x2, 4x4, 8x8 tiles is
64, 128, 256 pixels: 16x16, 32x32, 64x64 patches, i.e. 257, 1,025, 4,097 tokens (``--tokens``; 16,385 too).
The label of a patch is the class of the tile it lies in (10 classes). The teacher's 8x8 position embedding is
TILED (period 8 patches) so every tile sees the position code it was trained with (:class:`PositionTiler`
replaces the model's ``_pos_embed``; nothing is resampled).

Fairness: tile borders must not line up with attention windows or representative pooling cells (which start at
patch 0 and have sides that are powers of two). Each mosaic is therefore cut out of a (k+1) x (k+1) mosaic at
a random offset of whole patches, per image and per axis in {1, 2, 3, 5, 6, 7} (never 0 or 4 mod 8), and the
tiled position code is shifted by the same phase, so every tile still sees its own code: a tile border never
falls on the border of a 4- or 8-patch window or cell. Seeds are fixed: train-split mosaics train the probes,
test-split mosaics evaluate them. ``--train-images`` / ``--test-images`` count CIFAR-10 images' worth of area
(N / k^2 mosaics at each token count), so every token count sees the same number of labelled patches.

Methods (``--methods``, a comma list of :data:`METHODS`): ``original``; ``cbsa`` (``ConversionConfig()``, 8x8
representatives) and ``cbsa16`` (16x16); ``dense`` (``ConversionConfig.preset("dense")``); ``hybrid`` (cbsa with
the first half of the blocks kept softmax); ``window`` (windowed attention in most blocks, a few global blocks
evenly spaced, as ViTDet/SAM adapt a plain ViT: at each token count the window side W and the number of global
blocks are chosen so the FLOPs are closest to ``dense``'s -- to ``cbsa``'s when ``dense`` does not exist). A
method whose conversion raises (a variant or preset this vit2cbsa lacks) is skipped, and its reason is recorded
as ``"error"`` in the JSON.

Other models and data (for users with the network): ``--model`` takes any MODEL string of
``vit2cbsa.loading.load`` (a timm name, a Hub repo id, a local timm or transformers folder); ``--dataset`` a
``datasets`` name such as ``scene_parse_150`` (an image column and a mask column, auto-detected or named with
``--image-column`` / ``--mask-column``) or a local folder with ``images/`` and ``masks/`` (same file stems; masks
single-channel PNGs of class ids; 255 = ignore; optionally under ``train/`` and ``test/``/``val/``, else one
folder is split). Images are resized (short side) and centre-cropped to each ``--resolution``, normalised with the
model's mean/std; a patch's label is the majority class of its pixels (labels >= ``--num-classes`` and 255
ignored).

    .venv/bin/python benchmarks/dense.py                      # the default, ~15-25 min on 2 threads
    .venv/bin/python benchmarks/dense.py --quick --out /tmp/dense   # a minute
    .venv/bin/python benchmarks/dense.py --from-json benchmarks/results/dense/dense.json   # re-render md/png

Writes ``OUT/dense.json``, ``dense.md`` (tables) and ``dense.png`` (patch cosine and mIoU against tokens).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import tarfile
import time
import types
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

import vit2cbsa
from vit2cbsa import ConversionConfig
from vit2cbsa.errors import RepresentativesWarning
from vit2cbsa.measure import count_flops, time_repeats
from vit2cbsa.modeling import PatchGridWatch, attention_layers, forward_pixels, is_hf

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "benchmarks" / "results" / "dense"
DEFAULT_DATA = REPO.parent / "shared" / "data"
CACHE = Path("~/.cache/vit2cbsa").expanduser()
IGNORE = 255
MOSAIC = "cifar10-mosaic"


def log(msg: str) -> None:
    print(f"[dense {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --------------------------------------------------------------------------- methods


def _window_probe(blocks: int) -> ConversionConfig:
    """The window variant at its smallest window: raises where this vit2cbsa has no window variant (the window
    side and the global blocks used are chosen per token count by :func:`window_plan`)."""
    return ConversionConfig(variant="window", window=2)


#: name -> (description, config of the model with ``blocks`` blocks); None: the unconverted original
METHODS: Dict[str, Tuple[str, Optional[Callable[[int], ConversionConfig]]]] = {
    "original": ("the unconverted model (softmax attention)", None),
    "cbsa": ("ConversionConfig(): cbsa, 8x8 pooled representatives + prefix", lambda n: ConversionConfig()),
    "cbsa16": ("cbsa, 16x16 pooled representatives + prefix", lambda n: ConversionConfig(num_representatives=(16, 16))),
    "dense": ('ConversionConfig.preset("dense")', lambda n: ConversionConfig.preset("dense")),
    "dense-fast": ('ConversionConfig.preset("dense-fast")', lambda n: ConversionConfig.preset("dense-fast")),
    "hybrid": ("cbsa in the second half of the blocks, the first half kept softmax",
               lambda n: ConversionConfig(layers=f"{n // 2}:")),
    "window": ("windowed attention (prefix tokens global) in all but a few evenly spaced global blocks, window "
               "side and global count chosen per token count for FLOPs closest to dense's", _window_probe),
}


def global_blocks(n: int, g: int) -> List[int]:
    """``g`` of ``n`` blocks kept global, evenly spaced and ending at the last (ViTDet: 2, 5, 8, 11 of 12)."""
    return [(i + 1) * n // g - 1 for i in range(g)]


def window_config(w: int, n: int, g: int) -> ConversionConfig:
    keep = set(global_blocks(n, g)) if g else set()
    return ConversionConfig(variant="window", window=w, layers=[i for i in range(n) if i not in keep])


def window_plan(base: nn.Module, flops_of: Callable[[nn.Module], int], side: int, target: int) -> dict:
    """The window side W (a divisor of the patch grid's ``side``, below it) and number of global blocks whose
    model has FLOPs closest to ``target``. Blocks are alike, so the FLOPs of g global blocks are interpolated from
    all-window and all-global; the chosen plan is then counted exactly."""
    n, full = len(attention_layers(base)), flops_of(base)
    best = None
    for w in (w for w in range(2, side) if side % w == 0):
        windowed = flops_of(vit2cbsa.convert(copy.deepcopy(base), window_config(w, n, 0)))
        for g in range(n):
            est = windowed + g * (full - windowed) / n
            if best is None or abs(est - target) < best[0]:
                best = (abs(est - target), w, g)
    if best is None:
        raise ValueError(f"no window side below the {side}-patch grid divides it")
    _, w, g = best
    config = window_config(w, n, g)
    return {"window": w, "global_blocks": global_blocks(n, g) if g else [], "config": config,
            "flops": flops_of(vit2cbsa.convert(copy.deepcopy(base), config)), "target_flops": int(target)}


def matched_model(base: nn.Module, models: Dict[str, nn.Module], n: int) -> str:
    """The method whose FLOPs ``window`` matches: ``dense`` where it can be built, else ``cbsa`` (built into
    ``models`` if not there yet; :func:`build_methods` returns only the methods asked for)."""
    for target in ("dense", "cbsa"):
        if target in models:
            return target
        try:
            models[target] = vit2cbsa.convert(copy.deepcopy(base), METHODS[target][1](n))
            return target
        except Exception:
            continue
    raise ValueError("neither dense nor cbsa can be built to match the window's FLOPs to")


def build_methods(names: Sequence[str], base: nn.Module, flops_of: Callable[[nn.Module], int],
                  side: int) -> Tuple[Dict[str, nn.Module], Dict[str, dict]]:
    """The models of ``names`` (converted copies of ``base``) and what each is (``config``, ``window`` plan, or
    ``error`` when its conversion raised: then it has no model)."""
    n = len(attention_layers(base))
    models, info = {}, {}
    for name in names:
        description, make = METHODS[name]
        info[name] = {"description": description}
        try:
            if make is None:
                models[name] = base
                continue
            config = make(n)
            if name == "window":
                target = matched_model(base, models, n)
                plan = window_plan(base, flops_of, side, flops_of(models[target]))
                config = plan.pop("config")
                info[name]["window"] = {**plan, "matched_to": target}
            models[name] = vit2cbsa.convert(copy.deepcopy(base), config)
            info[name]["config"] = config.to_dict()
        except Exception as e:  # a variant or preset this vit2cbsa does not have (yet)
            info[name]["error"] = f"{type(e).__name__}: {e}"
            models.pop(name, None)
    return {k: models[k] for k in names if k in models}, info


# --------------------------------------------------------------------------- the model's tokens


class PositionTiler:
    """Tiles a timm ViT's position embedding with the period of its own patch grid, at a per-image phase.

    Installed on a model (:meth:`install` replaces its ``_pos_embed``), the patch at row ``i``, column ``j`` of
    image ``b`` gets the code of grid position ``((i + phases[b, 0]) % g, (j + phases[b, 1]) % g)`` of the
    model's own ``g x g`` embedding; prefix tokens keep theirs. Set :attr:`phases` (``B x 2``, patches) before
    each forward pass; one tiler can serve several models."""

    def __init__(self) -> None:
        self.phases: Optional[torch.Tensor] = None

    def install(self, model: nn.Module) -> nn.Module:
        if getattr(model, "pos_embed", None) is None or not hasattr(model, "_pos_embed"):
            raise ValueError("position tiling needs a timm VisionTransformer with an absolute pos_embed")
        # a method bound to the model shadows the class's; deep copies of the model rebind it to the copy
        model._pos_embed = types.MethodType(self.embed, model)
        return model

    @staticmethod
    def code(grid_code: torch.Tensor, h: int, w: int, phases: torch.Tensor) -> torch.Tensor:
        """``B x h*w x D`` patch codes from the ``g x g x D`` grid code tiled at ``phases`` (``B x 2``)."""
        g = grid_code.shape[0]
        rows = (torch.arange(h, device=phases.device)[None] + phases[:, :1]) % g  # B x h
        cols = (torch.arange(w, device=phases.device)[None] + phases[:, 1:]) % g  # B x w
        return grid_code[rows[:, :, None], cols[:, None, :]].flatten(1, 2)

    def embed(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 4:  # dynamic_img_size: B x H x W x C
            b, h, w, c = x.shape
        else:
            b, n, c = x.shape
            h = w = math.isqrt(n)
        x = x.reshape(b, h * w, c)
        n_pre = 0 if model.no_embed_class else model.num_prefix_tokens
        g = model.patch_embed.grid_size
        grid_code = model.pos_embed[0, n_pre:].reshape(g[0], g[1], c)
        phases = self.phases if self.phases is not None else torch.zeros(b, 2, dtype=torch.long)
        x = x + self.code(grid_code, h, w, phases.to(x.device))
        prefix = [t.expand(b, -1, -1) for t in (model.cls_token, model.reg_token) if t is not None]
        if prefix:
            pre = torch.cat(prefix, dim=1)
            if n_pre:
                pre = pre + model.pos_embed[:, :n_pre]
            x = torch.cat([pre, x], dim=1)
        return model.pos_drop(x)


def backbone(model: nn.Module) -> nn.Module:
    """The module whose output holds the patch tokens: the model for timm, the HF base model (``ViTModel`` of
    ``ViTForImageClassification``, a CLIP model's ``vision_model``)."""
    if not is_hf(model):
        return model
    return getattr(model, "vision_model", None) or model.base_model


def final_tokens(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``B x N x D`` final-norm tokens: timm ``forward_features``, transformers ``last_hidden_state``."""
    if not is_hf(model):
        return model.forward_features(x)
    return forward_pixels(backbone(model), x).last_hidden_state


def blocks_of(model: nn.Module) -> List[nn.Module]:
    """The transformer blocks, one per attention layer (the module at the block index of its name)."""
    names = []
    for name, _ in attention_layers(model):
        parts = name.split(".")
        i = next(i for i, p in enumerate(parts) if p.isdigit())
        names.append(".".join(parts[:i + 1]))
    return [model.get_submodule(n) for n in dict.fromkeys(names)]


@torch.inference_mode()
def run_with_blocks(model: nn.Module, x: torch.Tensor) -> Tuple[torch.Tensor, List[torch.Tensor]]:
    """Final tokens and every block's output tokens."""
    outs: List[torch.Tensor] = []

    def hook(_m, _i, out):
        outs.append(out[0] if isinstance(out, (tuple, list)) else out)

    handles = [b.register_forward_hook(hook) for b in blocks_of(model)]
    try:
        final = final_tokens(model, x)
    finally:
        for h in handles:
            h.remove()
    return final, outs


# --------------------------------------------------------------------------- data


@dataclass
class Split:
    """Images (uint8, ``M x 3 x R x R``), patch labels (``M x G x G``, 255 = ignore) and, for mosaics, the phase
    of the tiled position code (``M x 2``)."""

    images: torch.Tensor
    labels: torch.Tensor
    phases: Optional[torch.Tensor] = None


def mosaic_offsets(period: int) -> List[int]:
    """Offsets (in patches) a mosaic may be shifted by: never 0 or ``period / 2`` (mod ``period``)."""
    return [o for o in range(1, period) if 2 * o != period]


def make_mosaics(pool: torch.Tensor, pool_labels: torch.Tensor, count: int, k: int, period: int,
                 rng: np.random.Generator) -> Split:
    """``count`` mosaics of ``k x k`` tiles (the ``T x T`` images of ``pool``, ``period`` patches a side), each cut
    out of a ``(k+1) x (k+1)`` mosaic at a random offset of whole patches (:func:`mosaic_offsets`) per axis.
    The phase of patch ``(i, j)`` in its tile is ``(i + oy, j + ox) mod period``: :attr:`Split.phases` = (oy, ox)."""
    t = pool.shape[-1]
    patch = t // period
    n_tiles = (k + 1) ** 2
    order = np.resize(rng.permutation(len(pool)), count * n_tiles).reshape(count, k + 1, k + 1)
    offsets = rng.choice(mosaic_offsets(period), size=(count, 2))
    images = torch.empty(count, pool.shape[1], k * t, k * t, dtype=pool.dtype)
    labels = torch.empty(count, k * period, k * period, dtype=torch.long)
    idx = torch.arange(k * period)
    for m in range(count):
        tiles = pool[torch.from_numpy(order[m]).flatten()].reshape(k + 1, k + 1, pool.shape[1], t, t)
        big = tiles.permute(2, 0, 3, 1, 4).reshape(pool.shape[1], (k + 1) * t, (k + 1) * t)
        oy, ox = (int(v) for v in offsets[m])
        images[m] = big[:, oy * patch: oy * patch + k * t, ox * patch: ox * patch + k * t]
        tile_labels = pool_labels[torch.from_numpy(order[m])]  # (k+1) x (k+1)
        labels[m] = tile_labels[((idx + oy) // period)[:, None], ((idx + ox) // period)[None, :]]
    return Split(images, labels, torch.from_numpy(offsets).long())


def cifar_folder(data: Path, cache: Path) -> Path:
    """The CIFAR-10 image folder (``train/``, ``test/``): ``data`` itself, its ``cifar10/``, or
    ``cifar10-jpeg.tar.gz`` (in ``data`` or ``data`` itself) unpacked into ``cache``."""
    for folder in (data, data / "cifar10", cache / "cifar10"):
        if (folder / "train").is_dir() and (folder / "test").is_dir():
            return folder
    archive = data if data.is_file() else data / "cifar10-jpeg.tar.gz"
    if not archive.is_file():
        raise SystemExit(f"no CIFAR-10 images: {data} is neither a cifar10 folder (train/, test/) nor holds "
                         "cifar10-jpeg.tar.gz; pass --data")
    log(f"unpacking {archive} into {cache}")
    cache.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive) as tar:
        tar.extractall(cache, filter="data")
    return cache / "cifar10"


def load_cifar_pool(folder: Path, split: str, count: int, size: int, seed: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``count`` seeded-random images of ``folder/split`` (uint8, resized to ``size``) and their class ids."""
    from PIL import Image

    classes = sorted(p.name for p in (folder / split).iterdir() if p.is_dir())
    files = [(c, f) for c, name in enumerate(classes) for f in sorted((folder / split / name).glob("*.jpg"))]
    pick = np.random.default_rng(seed).permutation(len(files))[:count]
    images = []
    for i in pick:
        img = Image.open(files[i][1]).convert("RGB")
        if img.size != (size, size):
            img = img.resize((size, size), Image.BILINEAR)
        images.append(torch.from_numpy(np.array(img)).permute(2, 0, 1))
    return torch.stack(images), torch.tensor([files[i][0] for i in pick])


def patch_labels(mask: torch.Tensor, patch: int, num_classes: int) -> torch.Tensor:
    """Majority class of each ``patch x patch`` cell of an ``H x W`` mask (labels >= ``num_classes`` and 255
    ignored; a cell with no labelled pixel is 255)."""
    h, w = mask.shape[0] // patch, mask.shape[1] // patch
    m = mask[:h * patch, :w * patch].long()
    m = torch.where(m >= num_classes, num_classes, m)  # 255 and out-of-range: an extra "ignore" bin
    cell = (torch.arange(h)[:, None] * w + torch.arange(w)[None]).repeat_interleave(patch, 0).repeat_interleave(patch, 1)
    counts = torch.bincount((cell * (num_classes + 1) + m).flatten(), minlength=h * w * (num_classes + 1))
    counts = counts.view(h * w, num_classes + 1)[:, :num_classes]
    return torch.where(counts.sum(1) > 0, counts.argmax(1), IGNORE).view(h, w)


def _fit(img, size: int, resample):
    w, h = img.size
    s = size / min(w, h)
    img = img.resize((max(size, round(w * s)), max(size, round(h * s))), resample)
    left, top = (img.size[0] - size) // 2, (img.size[1] - size) // 2
    return img.crop((left, top, left + size, top + size))


def pairs_to_split(pairs, size: int, patch: int, num_classes: int) -> Split:
    """(PIL image, PIL mask) pairs resized (short side) and centre-cropped to ``size``, with patch labels."""
    from PIL import Image

    images, labels = [], []
    for img, mask in pairs:
        images.append(torch.from_numpy(np.array(_fit(img.convert("RGB"), size, Image.BILINEAR))).permute(2, 0, 1))
        m = torch.from_numpy(np.array(_fit(mask, size, Image.NEAREST)))
        labels.append(patch_labels(m if m.ndim == 2 else m[..., 0], patch, num_classes))
    return Split(torch.stack(images), torch.stack(labels))


def folder_pairs(root: Path, train: int, test: int, seed: int):
    """(train, test) lists of (image, mask) PIL pairs from ``root/[split/]images|masks``."""
    from PIL import Image

    def pairs(folder: Path):
        masks = {p.stem: p for p in (folder / "masks").iterdir()}
        return [(Image.open(p), Image.open(masks[p.stem])) for p in sorted((folder / "images").iterdir())
                if p.stem in masks]

    evals = [root / s for s in ("test", "val", "validation") if (root / s / "images").is_dir()]
    if (root / "train" / "images").is_dir() and evals:
        return pairs(root / "train")[:train], pairs(evals[0])[:test]
    if not (root / "images").is_dir():
        raise SystemExit(f"{root} has no images/ + masks/ (nor train/ and test/ with them)")
    every = pairs(root)
    order = np.random.default_rng(seed).permutation(len(every))
    n_test = min(test, len(every) // 2)
    return [every[i] for i in order[n_test:][:train]], [every[i] for i in order[:n_test]]


def hub_pairs(name: str, args):
    """(train, test) lists of (image, mask) pairs of a ``datasets`` dataset."""
    import datasets

    out = []
    for split, n in ((args.train_split, args.train_images), (args.test_split, args.test_images)):
        ds = datasets.load_dataset(name, split=split)
        ds = ds.shuffle(seed=args.seed).select(range(min(n, len(ds))))
        cols = ds.column_names
        image_col = args.image_column or next(c for c in ("image", "img", "pixel_values") if c in cols)
        mask_col = args.mask_column or next(c for c in ("annotation", "label", "mask", "segmentation",
                                                        "semantic_map", "gtFine") if c in cols)
        out.append([(row[image_col], row[mask_col]) for row in ds])
    return out


# --------------------------------------------------------------------------- probe and metrics


def miou(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> dict:
    """mIoU over the classes present in prediction or target (IoU = TP / (TP + FP + FN)), pixel accuracy and
    per-class IoU (None where absent), ignoring targets of 255 or >= ``num_classes``."""
    keep = (target != IGNORE) & (target < num_classes)
    t, p = target[keep].long(), pred[keep].long()
    conf = torch.bincount(t * num_classes + p, minlength=num_classes ** 2).view(num_classes, num_classes).double()
    tp = conf.diag()
    union = conf.sum(0) + conf.sum(1) - tp
    iou = [(tp[c] / union[c]).item() if union[c] > 0 else None for c in range(num_classes)]
    present = [v for v in iou if v is not None]
    return {"miou": sum(present) / len(present) if present else 0.0,
            "pixel_accuracy": (tp.sum() / conf.sum()).item() if conf.sum() > 0 else 0.0, "iou": iou}


def train_probe(features: torch.Tensor, labels: torch.Tensor, num_classes: int, epochs: int, lr: float,
                seed: int, batch: int = 1024) -> nn.Linear:
    """A linear probe ``D -> num_classes`` on ``features`` (``P x D``; labels 255 ignored), AdamW, cosine lr."""
    keep = (labels != IGNORE) & (labels < num_classes)
    x, y = features[keep].float(), labels[keep]
    gen = torch.Generator().manual_seed(seed)
    probe = nn.Linear(x.shape[1], num_classes)
    with torch.no_grad():
        probe.weight.normal_(0, 0.01, generator=gen)
        probe.bias.zero_()
    steps = epochs * max(1, math.ceil(len(x) / batch))
    opt = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), batch):
            j = order[i:i + batch]
            loss = nn.functional.cross_entropy(probe(x[j]), y[j])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return probe.eval()


@torch.no_grad()
def predict(probe: nn.Linear, features: torch.Tensor, batch: int = 65536) -> torch.Tensor:
    return torch.cat([probe(features[i:i + batch].float()).argmax(-1) for i in range(0, len(features), batch)])


def cos_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return nn.functional.cosine_similarity(a.double(), b.double(), dim=-1)


# --------------------------------------------------------------------------- one token count


@dataclass
class Inputs:
    """How to feed a split to a model: normalisation and, for mosaics, the position tiler."""

    mean: torch.Tensor
    std: torch.Tensor
    tiler: Optional[PositionTiler]
    prefix: int

    def batch(self, split: Split, i: int, j: int) -> torch.Tensor:
        if self.tiler is not None:
            self.tiler.phases = split.phases[i:j]
        return (split.images[i:j].float() / 255 - self.mean) / self.std


def features_and_cosines(models: Dict[str, nn.Module], split: Split, inputs: Inputs, batch: int,
                         cosines: bool) -> Tuple[Dict[str, torch.Tensor], Dict[str, dict]]:
    """Every model's final patch tokens on ``split`` (``P x D``, float16) and, with ``cosines``, the mean cosine
    of its patch and class tokens to the original's at every block and at the final norm."""
    feats: Dict[str, List[torch.Tensor]] = {name: [] for name in models}
    sums: Dict[str, dict] = {name: {} for name in models}
    n_img = len(split.images)
    for i in range(0, n_img, batch):
        x = inputs.batch(split, i, min(i + batch, n_img))
        ref = run_with_blocks(models["original"], x) if cosines else None
        for name, model in models.items():
            out = ref if (name == "original" and ref is not None) else run_with_blocks(model, x)
            final, blocks = out
            feats[name].append(final[:, inputs.prefix:].reshape(-1, final.shape[-1]).half())
            if not cosines:
                continue
            s = sums[name]
            for key, a, b in [("final", final, ref[0])] + [(f"block{l}", a, b) for l, (a, b) in
                                                            enumerate(zip(blocks, ref[1]))]:
                patch = cos_rows(a[:, inputs.prefix:], b[:, inputs.prefix:])
                s.setdefault(key + "_patch", []).append(patch.sum().item())
                s.setdefault(key + "_patch_n", []).append(patch.numel())
                if inputs.prefix:
                    s.setdefault(key + "_class", []).append(cos_rows(a[:, 0], b[:, 0]).sum().item())
    out_cos = {}
    for name, s in sums.items():
        if not cosines:
            continue
        n_layers = sum(1 for k in s if k.startswith("block") and k.endswith("_patch"))

        def mean(key, n):
            return sum(s[key]) / n if key in s else None

        n_patch, n_cls = sum(s["final_patch_n"]), n_img
        out_cos[name] = {
            "patch_cosine": mean("final_patch", n_patch), "class_cosine": mean("final_class", n_cls),
            "patch_cosine_layers": [mean(f"block{l}_patch", n_patch) for l in range(n_layers)],
            "class_cosine_layers": [mean(f"block{l}_class", n_cls) for l in range(n_layers)] if inputs.prefix else None}
    return {name: torch.cat(f) for name, f in feats.items()}, out_cos


def measure_count(models: Dict[str, nn.Module], train: Split, test: Split, inputs: Inputs, args,
                  num_classes: int) -> Dict[str, dict]:
    """Probes, mIoU, cosines, FLOPs and speed of every model at one token count."""
    batch = max(1, args.batch_tokens // (train.labels[0].numel() + inputs.prefix))
    t0 = time.time()
    train_feats, _ = features_and_cosines(models, train, inputs, batch, cosines=False)
    test_feats, cos = features_and_cosines(models, test, inputs, batch, cosines=True)
    log(f"  features of {len(train.images)} + {len(test.images)} images in {time.time() - t0:.0f}s")
    y_train, y_test = train.labels.flatten(), test.labels.flatten()
    probes = {name: train_probe(f, y_train, num_classes, args.probe_epochs, args.probe_lr, args.seed)
              for name, f in train_feats.items()}
    x1 = inputs.batch(test, 0, 1)
    fns = {name: (lambda m=m: final_tokens(m, x1)) for name, m in models.items()}
    with torch.inference_mode():
        times = time_repeats(fns, repeats=args.repeats, warmup=1)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    out = {}
    for name, model in models.items():
        own = miou(predict(probes[name], test_feats[name]), y_test, num_classes)
        drop_in = miou(predict(probes["original"], test_feats[name]), y_test, num_classes)
        out[name] = {"miou": own["miou"], "pixel_accuracy": own["pixel_accuracy"], "iou": own["iou"],
                     "miou_original_probe": drop_in["miou"], "pixel_accuracy_original_probe": drop_in["pixel_accuracy"],
                     **cos[name], "flops": count_flops(lambda x, m=model: final_tokens(m, x), x1),
                     "seconds": med[name], "speedup": med["original"] / med[name]}
    return out


# --------------------------------------------------------------------------- ViT-S/16


def vit_s(args, names: Sequence[str]) -> dict:
    """ViT-S/16 (random weights): FLOPs of every method at 257..16,385 tokens, the FLOPs exponents, and the
    speed-up at 1024x1024 (4,097 tokens)."""
    import timm

    base = timm.create_model("vit_small_patch16_224", pretrained=False, dynamic_img_size=True).eval()
    names = list(dict.fromkeys(["original", *names]))
    flops: Dict[str, Dict[str, int]] = {n: {} for n in names}
    info: Dict[str, dict] = {}
    models_1024 = None
    for res in (256, 512, 1024, 2048):
        x = torch.randn(1, 3, res, res)
        tokens = str((res // 16) ** 2 + 1)
        models, info_res = build_methods(names, base, lambda m: count_flops(m, x), res // 16)
        for name in names:
            info.setdefault(name, {}).setdefault("by_tokens", {})[tokens] = info_res[name]
            if name in models:
                flops[name][tokens] = count_flops(models[name], x)
        if res == 1024:
            models_1024 = models
        log(f"  ViT-S/16 at {res}: " + ", ".join(f"{n} {f[tokens] / 1e9:.1f}" for n, f in flops.items() if tokens in f)
            + " GFLOPs")
    exponents = {}
    for name, f in flops.items():
        if len(f) >= 2:
            t = np.log([int(k) for k in f]); v = np.log(list(f.values()))
            exponents[name] = float(np.polyfit(t, v, 1)[0])
    out = {"flops": flops, "flops_exponent": exponents, "dense_flops_exponent": exponents.get("dense"),
           "methods": info}
    if args.vit_s_repeats > 0:
        x = torch.randn(1, 3, 1024, 1024)
        fns = {n: (lambda m=m: m(x)) for n, m in models_1024.items()}
        log(f"  timing ViT-S/16 at 1024 ({args.vit_s_repeats} repeats, {len(fns)} models)")
        with torch.inference_mode():
            times = time_repeats(fns, repeats=args.vit_s_repeats, warmup=1)
        med = {n: statistics.median(ts) for n, ts in times.items()}
        out["seconds_1024"] = med
        out["speedup_1024"] = {n: med["original"] / s for n, s in med.items()}
    return out


# --------------------------------------------------------------------------- main


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="cifar10-teacher", help="MODEL as vit2cbsa.loading.load takes it (a timm "
                    "name, a Hub repo id, a local timm or transformers folder; default: the embedded teacher)")
    ap.add_argument("--dataset", default=MOSAIC, help=f"{MOSAIC} (default), a datasets name (scene_parse_150) or a "
                    "folder with images/ and masks/")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="for cifar10-mosaic: a folder holding "
                    "cifar10-jpeg.tar.gz (default: ../shared/data next to the repository), the archive itself, or "
                    "an unpacked cifar10 folder (train/, test/)")
    ap.add_argument("--data-dir", type=Path, default=CACHE, help="where the archive is unpacked (default: %(default)s)")
    ap.add_argument("--methods", default="original,cbsa,cbsa16,dense,hybrid,window",
                    help=f"comma list of: {', '.join(METHODS)}")
    ap.add_argument("--tokens", default="257,1025,4097", help="cifar10-mosaic: token counts (prefix + (8k)^2)")
    ap.add_argument("--resolution", default=None, help="other datasets: image sides in pixels, comma list "
                    "(default: the model's input size)")
    ap.add_argument("--num-classes", type=int, default=None, help="classes (default: 10 for the mosaics; else the "
                    "largest label in the training masks + 1, 255 excluded)")
    ap.add_argument("--reduce-labels", action="store_true", help="label 0 is ignore and the others move down by "
                    "one (ADE20K's scene_parse_150)")
    ap.add_argument("--image-column", default=None)
    ap.add_argument("--mask-column", default=None)
    ap.add_argument("--train-split", default="train")
    ap.add_argument("--test-split", default="validation")
    ap.add_argument("--train-images", type=int, default=2048, help="probe training images (mosaics: CIFAR-10 "
                    "images' worth of area, N/k^2 mosaics per token count)")
    ap.add_argument("--test-images", type=int, default=1024, help="evaluation images (as --train-images)")
    ap.add_argument("--probe-epochs", type=int, default=10)
    ap.add_argument("--probe-lr", type=float, default=3e-3)
    ap.add_argument("--batch-tokens", type=int, default=16384, help="tokens per forward batch")
    ap.add_argument("--repeats", type=int, default=5, help="timing repeats on the model, batch 1")
    ap.add_argument("--vit-s-repeats", type=int, default=3, help="timing repeats of ViT-S/16 at 1024 (0: none)")
    ap.add_argument("--no-vit-s", action="store_true", help="skip ViT-S/16 (FLOPs and timing)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="a small run: 256 / 128 images, 257,1025 tokens, "
                    "5 probe epochs, 1 timing repeat, no ViT-S timing (its FLOPs are counted)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--from-json", type=Path, default=None, help="only re-render the .md and .png of this result")
    args = ap.parse_args(argv)
    if args.quick:
        args.train_images, args.test_images, args.probe_epochs, args.repeats = 256, 128, 5, 1
        args.vit_s_repeats = 0
        if args.tokens == ap.get_default("tokens"):
            args.tokens = "257,1025"
    unknown = [m for m in args.methods.split(",") if m not in METHODS]
    if unknown:
        ap.error(f"unknown method {unknown[0]!r}; choose from {', '.join(METHODS)}")
    return args


def load_model(spec, args):
    """The model (eval) and its data config; a timm model runs at any size (``dynamic_img_size``)."""
    if isinstance(spec, nn.Module):
        from vit2cbsa.loading.metadata import data_config

        return spec.eval(), data_config(spec, None)
    from vit2cbsa.loading import load, resolve

    source = resolve(spec)
    if source.kind == "vit2cbsa":
        raise SystemExit(f"{spec} is already converted; pass the original model")
    loaded = load(source, model_kwargs={"dynamic_img_size": True} if source.library == "timm" else None)
    return loaded.model.eval(), loaded.data_config


def run(args, model: Optional[nn.Module] = None) -> dict:
    """The benchmark on ``args`` (:func:`parse_args`); ``model`` replaces ``--model``. Returns the result."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    # "not fewer representatives than the patches of the model's own input size": true of the teacher's 8x8
    # grid, not of the larger grids measured here
    warnings.filterwarnings("ignore", category=RepresentativesWarning)
    t_start = time.time()
    base, data_cfg = load_model(model if model is not None else args.model, args)
    names = [m for m in args.methods.split(",") if m]
    if "original" not in names:
        names.insert(0, "original")
    names = sorted(set(names), key=list(METHODS).index)
    native = data_cfg["input_size"][-1]
    patch = native // patch_grid(base, native)[1]
    inputs = Inputs(torch.tensor(data_cfg["mean"]).view(1, 3, 1, 1), torch.tensor(data_cfg["std"]).view(1, 3, 1, 1),
                    None, prefix_tokens(base, native))
    mosaic = args.dataset == MOSAIC
    if mosaic:
        period = native // patch
        counts = [int(t) for t in args.tokens.split(",")]
        sides = []
        for t in counts:
            g = math.isqrt(t - inputs.prefix)
            if g * g != t - inputs.prefix or g % period:
                raise SystemExit(f"--tokens {t}: a mosaic has {inputs.prefix} + (k*{period})^2 tokens here, "
                                 f"e.g. {', '.join(str(inputs.prefix + (k * period) ** 2) for k in (2, 4, 8, 16))}")
            sides.append(g * patch)
        num_classes = args.num_classes or 10
        folder = cifar_folder(args.data, args.data_dir)
        # each split's pool: enough images for the largest number of tiles any token count needs
        pool = {split: load_cifar_pool(folder, split, max(mosaics(n, s // native) * (s // native + 1) ** 2
                                                          for s in sides), native, args.seed + i)
                for i, (split, n) in enumerate((("train", args.train_images), ("test", args.test_images)))}
        try:
            inputs.tiler = PositionTiler()
            inputs.tiler.install(base)  # before any copy is made: the copies' tiling rebinds to them
        except ValueError as e:
            log(f"position code NOT tiled ({e}): it is interpolated")
            inputs.tiler = None
        data_desc = (f"{MOSAIC}: k x k CIFAR-10 images of {native}px, offsets {mosaic_offsets(period)} patches, "
                     f"position code {'tiled with period ' + str(period) if inputs.tiler else 'interpolated'}")
    else:
        sides = [int(r) for r in (args.resolution or str(native)).split(",")]
        path = Path(args.dataset).expanduser()
        train_pairs, test_pairs = (folder_pairs(path, args.train_images, args.test_images, args.seed) if path.is_dir()
                                   else hub_pairs(args.dataset, args))
        if args.reduce_labels:
            from PIL import Image

            def reduce(m):
                a = np.array(m).astype(np.int64)
                return Image.fromarray(np.where(a == 0, IGNORE, a - 1).clip(0, 255).astype(np.uint8))
            train_pairs = [(i, reduce(m)) for i, m in train_pairs]
            test_pairs = [(i, reduce(m)) for i, m in test_pairs]
        num_classes = args.num_classes or int(max(np.array(m)[np.array(m) != IGNORE].max(initial=0)
                                                  for _, m in train_pairs)) + 1
        counts = [inputs.prefix + (s // patch) ** 2 for s in sides]
        data_desc = f"{args.dataset}: {len(train_pairs)} train + {len(test_pairs)} test images"
    log(f"{data_desc}; {num_classes} classes; token counts {counts}")
    result = {"date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "command": " ".join(sys.argv), "code": code_version(),
              "model": args.model if model is None else type(model).__name__, "dataset": args.dataset,
              "data": data_desc, "num_classes": num_classes, "blocks": len(blocks_of(base)),
              "prefix_tokens": inputs.prefix, "patch": patch, "token_counts": counts,
              "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "methods": {}, "results": {}}
    for tokens, side in zip(counts, sides):
        log(f"{tokens} tokens ({side}x{side} px)")
        if mosaic:
            k = side // native
            rng = np.random.default_rng(args.seed + tokens)
            train = make_mosaics(*pool["train"], mosaics(args.train_images, k), k, period, rng)
            test = make_mosaics(*pool["test"], mosaics(args.test_images, k), k, period,
                                np.random.default_rng(args.seed + 1 + tokens))
        else:
            train = pairs_to_split(train_pairs, side, patch, num_classes)
            test = pairs_to_split(test_pairs, side, patch, num_classes)
        x1 = inputs.batch(test, 0, 1)
        models, info = build_methods(names, base, lambda m: count_flops(lambda x: final_tokens(m, x), x1),
                                     side // patch)
        for name, i in info.items():
            result["methods"].setdefault(name, {"description": i["description"], "by_tokens": {}})
            result["methods"][name]["by_tokens"][str(tokens)] = {k: v for k, v in i.items() if k != "description"}
            if "error" in i:
                log(f"  {name}: skipped ({i['error']})")
                result["results"].setdefault(name, {})[str(tokens)] = {"error": i["error"]}
        for name, r in measure_count(models, train, test, inputs, args, num_classes).items():
            result["results"].setdefault(name, {})[str(tokens)] = r
            log(f"  {name:9s} mIoU {r['miou']:.3f} (orig. probe {r['miou_original_probe']:.3f}) patch cos "
                f"{r['patch_cosine']:.4f} class cos {r['class_cosine'] if r['class_cosine'] is None else round(r['class_cosine'], 4)} "
                f"{r['flops'] / 1e9:.2f} GFLOPs x{r['speedup']:.2f}")
    if not args.no_vit_s:
        log("ViT-S/16")
        result["vit_s"] = vit_s(args, names)
    result["runtime_s"] = round(time.time() - t_start, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "dense.json").write_text(json.dumps(result, indent=1))
    render(result, args.out)
    log(f"wrote {args.out}/dense.json, .md, .png in {result['runtime_s'] / 60:.1f} min")
    return result


def code_version() -> dict:
    """The checkout's commit and whether ``vit2cbsa/`` had uncommitted changes (None outside a git checkout)."""
    import subprocess

    def git(*cmd):
        return subprocess.run(["git", *cmd], cwd=REPO, capture_output=True, text=True, timeout=30).stdout.strip()

    try:
        return {"commit": git("rev-parse", "HEAD") or None, "vit2cbsa_dirty": bool(git("status", "--porcelain", "vit2cbsa"))}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "vit2cbsa_dirty": None}


def mosaics(images: int, k: int) -> int:
    """Mosaics of k x k tiles holding about ``images`` CIFAR-10 images' worth of area."""
    return max(1, round(images / k ** 2))


def patch_grid(model: nn.Module, side: int) -> Tuple[int, int]:
    with PatchGridWatch(model) as watch, torch.inference_mode():
        final_tokens(model, torch.zeros(1, 3, side, side))
    return watch.grid


def prefix_tokens(model: nn.Module, side: int) -> int:
    with torch.inference_mode():
        n = final_tokens(model, torch.zeros(1, 3, side, side)).shape[1]
    h, w = patch_grid(model, side)
    return n - h * w


# --------------------------------------------------------------------------- rendering


def _cell(value, fmt="{:.4f}") -> str:
    return "–" if value is None else fmt.format(value)


def render(result: dict, out: Path) -> None:
    (out / "dense.md").write_text(markdown(result))
    plot(result, out / "dense.png")


def markdown(result: dict) -> str:
    counts = [str(t) for t in result["token_counts"]]
    res = result["results"]
    head = "| method | " + " | ".join(f"{t} tokens" for t in counts) + " |\n|---|" + "---:|" * len(counts) + "\n"

    def table(title: str, key: str, fmt: str) -> str:
        rows = []
        for name, by in res.items():
            cells = [("error" if "error" in by.get(t, {}) else _cell(by.get(t, {}).get(key), fmt)) for t in counts]
            rows.append(f"| `{name}` | " + " | ".join(cells) + " |")
        return f"{title}\n\n{head}" + "\n".join(rows) + "\n"

    lines = [f"# Dense features: {result['model']} on {result['dataset']}\n",
             f"{result['data']}; {result['num_classes']} classes; {result['blocks']} blocks, "
             f"{result['prefix_tokens']} prefix token(s), patch {result['patch']}px. Linear probes on frozen "
             f"final-norm patch tokens ({result['settings']['probe_epochs']} epochs AdamW, same for every method), "
             f"mIoU per patch on the test split; {result['settings']['train_images']} train / "
             f"{result['settings']['test_images']} test images. Measured {result['date_utc']} UTC in "
             f"{result.get('runtime_s', 0) / 60:.1f} min.\n",
             table("**Final patch-token cosine to the original**", "patch_cosine", "{:.4f}"),
             table("**mIoU, own probe** (%)", "miou", "{:.2%}"),
             table("**mIoU, the original's probe** (drop-in, %)", "miou_original_probe", "{:.2%}"),
             table("**Pixel (patch) accuracy, own probe** (%)", "pixel_accuracy", "{:.2%}"),
             table("**Final class-token cosine to the original**", "class_cosine", "{:.4f}"),
             _flops_table(res, counts, head),
             table("**CPU speed-up over the original** (batch 1, median, side by side)", "speedup", "{:.2f}x")]
    windows = []
    for t in counts:
        w = result["methods"].get("window", {}).get("by_tokens", {}).get(t, {}).get("window")
        if w:
            windows.append(f"{t} tokens: W={w['window']}, global blocks {w['global_blocks']} "
                           f"({w['flops'] / 1e9:.3g} GFLOPs vs {w['matched_to']} {w['target_flops'] / 1e9:.3g})")
    if windows:
        lines.append("`window` plans (FLOPs matched): " + "; ".join(windows) + "\n")
    last = counts[-1]
    layer_rows = [(n, by[last]) for n, by in res.items() if "patch_cosine_layers" in by.get(last, {})]
    if layer_rows:
        n_layers = len(layer_rows[0][1]["patch_cosine_layers"])
        lines.append(f"**Patch-token cosine after each block, {last} tokens**\n\n| method | "
                     + " | ".join(f"block {i}" for i in range(n_layers)) + " |\n|---|" + "---:|" * n_layers + "\n"
                     + "\n".join(f"| `{n}` | " + " | ".join(_cell(v) for v in r["patch_cosine_layers"]) + " |"
                                 for n, r in layer_rows) + "\n")
    vs = result.get("vit_s")
    if vs:
        vcounts = sorted({t for f in vs["flops"].values() for t in f}, key=int)
        rows = []
        for name, f in vs["flops"].items():
            cells = [_cell(f.get(t), "{:.1f}") if f.get(t) is None else f"{f[t] / 1e9:.1f}" for t in vcounts]
            sp = vs.get("speedup_1024", {}).get(name)
            rows.append(f"| `{name}` | " + " | ".join(cells) + f" | {_cell(vs['flops_exponent'].get(name), '{:.2f}')} | "
                        f"{_cell(sp, '{:.2f}x')} |")
        errors = [f"`{n}`: {i['by_tokens'][t]['error']}" for n, i in vs["methods"].items()
                  for t in list(i["by_tokens"])[:1] if "error" in i["by_tokens"][t]]
        lines.append("**ViT-S/16 (random weights): GFLOPs of one image, FLOPs exponent (log-log slope in tokens) and "
                     "CPU speed-up at 1024x1024**\n\n| method | " + " | ".join(f"{t} tokens" for t in vcounts)
                     + " | exponent | speed-up at 4097 |\n|---|" + "---:|" * (len(vcounts) + 2) + "\n"
                     + "\n".join(rows) + "\n" + (("\nNot measured: " + "; ".join(errors) + "\n") if errors else ""))
    errors = sorted({f"`{n}`: {r['error']}" for n, by in res.items() for r in by.values() if "error" in r})
    if errors:
        lines.append("Skipped: " + "; ".join(errors) + "\n")
    return "\n".join(lines)


def _flops_table(res: dict, counts: List[str], head: str) -> str:
    rows = []
    for name, by in res.items():
        cells = []
        for t in counts:
            r = by.get(t, {})
            cells.append("error" if "error" in r else (f"{r['flops'] / 1e9:.3g}" if "flops" in r else "–"))
        rows.append(f"| `{name}` | " + " | ".join(cells) + " |")
    return "**GFLOPs of one image**\n\n" + head + "\n".join(rows) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    panels = [("patch_cosine", "final patch-token cosine to the original"), ("miou", "mIoU, own probe"),
              ("miou_original_probe", "mIoU, the original's probe")]
    for ax, (key, title) in zip(axes, panels):
        for name, by in result["results"].items():
            pts = [(int(t), r[key]) for t, r in by.items() if r.get(key) is not None]
            if pts:
                ax.plot(*zip(*sorted(pts)), marker="o", label=name)
        ax.set_xscale("log")
        ax.minorticks_off()
        ax.set_xticks(result["token_counts"], [f"{t:,}" for t in result["token_counts"]])
        ax.set_xlabel("tokens")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(f"Dense features: {result['model']} on {result['dataset']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.from_json is not None:
        result = json.loads(args.from_json.read_text())
        render(result, args.from_json.parent)
        return result
    return run(args)


if __name__ == "__main__":
    main()
