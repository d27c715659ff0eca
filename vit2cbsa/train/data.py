"""Image-classification data for fine-tuning: an image folder or a Hugging Face dataset, plus the
model's own preprocessing.

* A local folder with ``train/`` and ``val/`` (or ``validation/``, ``test/``) sub-folders of
  class folders is read with ``torchvision.datasets.ImageFolder`` (classes sorted by name).
* Anything else, or any spec prefixed ``hf:``, is a ``datasets.load_dataset`` name or path (e.g.
  ``cifar10``, a Hub id, or a local folder of data files); its image column is the first ``Image`` feature and its label
  column the first ``ClassLabel`` feature.
* Preprocessing: timm models use ``timm.data.resolve_data_config`` + ``create_transform``;
  transformers models their ``AutoImageProcessor``'s size and mean/std (random-resized-crop +
  flip for training, resize + centre-crop for evaluation, as in transformers' image-classification
  example); the embedded CIFAR-10 teacher its recorded mean/std at 32x32 with random crop
  (4-pixel zero padding) + flip for training.

Training augmentation is a pure function of ``(seed, epoch, sample index)``: each sample's random
transform runs under its own seed (:class:`TransformedDataset`). So the batches seen after a
resume, on any number of processes or data-loader workers, are the ones an uninterrupted run sees.

Unreadable images (zero bytes, another kind of file named ``.jpg``, a truncated JPEG) raise
:class:`BadImageError`, whose one-line message names the file, also when a data-loader worker hit
it. With ``skip_bad=True`` such a sample is replaced, deterministically, by the next readable one of
the split, and the sample carries a third element, 1 (else 0), so training can count the skipped
images and evaluation can leave them out.

A ``--dataset`` that looks like a local path (it starts with ``.``, ``/`` or ``~``, has more than one
``/``, or its first component exists here) but does not exist is an error ("no such folder"), never
a ``datasets.load_dataset`` lookup on the Hub.
"""

from __future__ import annotations

import contextlib
import difflib
import os
import random
import struct
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, List, Optional, Sequence

import torch
from torch.utils.data import Dataset

from ..errors import BadImageError, DataError, one_line

EVAL_FOLDERS = ("val", "validation", "test")
EVAL_SPLITS = ("validation", "val", "test", "valid")


@dataclass
class Transforms:
    train: Callable
    eval: Callable
    description: str


# --------------------------------------------------------------------------- preprocessing


def timm_transforms(model: torch.nn.Module) -> Transforms:
    """timm's own preprocessing for ``model`` (at the model's actual input size)."""
    from timm.data import create_transform, resolve_data_config

    overrides = {}
    img_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if img_size is not None:  # models built with img_size=... keep the pretrained cfg's 224
        overrides["input_size"] = (3, *tuple(img_size))
    cfg = resolve_data_config(overrides, model=model)
    return Transforms(create_transform(**cfg, is_training=True), create_transform(**cfg, is_training=False),
                      f"timm {cfg}")


def hf_transforms(processor: Any) -> Transforms:
    """Train/eval transforms from a transformers image processor's size and mean/std."""
    from torchvision import transforms as T

    size = processor.size
    if "shortest_edge" in size:
        crop = resize = size["shortest_edge"]
    else:
        crop = resize = (size["height"], size["width"])
    crop_size = getattr(processor, "crop_size", None)
    if getattr(processor, "do_center_crop", False) and crop_size:
        crop = (crop_size["height"], crop_size["width"])
    norm = T.Normalize(mean=processor.image_mean, std=processor.image_std)
    train = T.Compose([T.RandomResizedCrop(crop), T.RandomHorizontalFlip(), T.ToTensor(), norm])
    evaluate = T.Compose([T.Resize(resize), T.CenterCrop(crop), T.ToTensor(), norm])
    return Transforms(train, evaluate, f"{type(processor).__name__} size={size} crop={crop}")


def teacher_transforms(config: dict) -> Transforms:
    """The embedded CIFAR-10 teacher: its mean/std at 32x32; random crop (pad 4) + flip for training."""
    from torchvision import transforms as T

    size = int(config.get("input_size", [3, 32, 32])[-1])
    norm = T.Normalize(mean=config["mean"], std=config["std"])
    fit = [T.Resize(size), T.CenterCrop(size)]
    train = T.Compose(fit + [T.RandomCrop(size, padding=4), T.RandomHorizontalFlip(), T.ToTensor(), norm])
    return Transforms(train, T.Compose(fit + [T.ToTensor(), norm]), f"teacher mean/std at {size}x{size}")


# --------------------------------------------------------------------------- datasets


@contextlib.contextmanager
def _seeded(seed: int):
    """Run a block under torch and python-random seeds of its own, leaving the global RNGs as they were."""
    py_state = random.getstate()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        random.seed(seed)
        try:
            yield
        finally:
            random.setstate(py_state)


# what decoding a broken file raises (PIL: UnidentifiedImageError is an OSError; truncated data
# OSError / SyntaxError / struct.error / zlib.error; huge images DecompressionBombError)
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error, zlib.error)
_warned: set = set()  # files already reported by this process


def _decode_errors() -> tuple:
    from PIL import Image

    return _DECODE_ERRORS + (Image.DecompressionBombError,)


def _reason(e: BaseException, path: Optional[str]) -> str:
    from PIL import UnidentifiedImageError

    if path is not None:
        try:
            if os.path.getsize(path) == 0:
                return "empty file (0 bytes)"
        except OSError:
            pass
    if isinstance(e, UnidentifiedImageError):
        return "not an image file PIL can read"
    return one_line(e)


class TransformedDataset(Dataset):
    """``(pixels, label)`` samples: ``base[i]`` is ``(PIL image, label)``; ``transform`` runs under the
    seed ``(seed, epoch, i)`` when ``seed`` is given (call :meth:`set_epoch` before each epoch).

    An image that cannot be decoded raises :class:`BadImageError` naming the file; with ``skip_bad``
    it is replaced by the next readable sample (in index order, so deterministically, transformed
    under the skipped sample's seed), a warning names it once per process, and every sample is
    ``(pixels, label, replaced)`` with ``replaced`` 1 for a replacement and 0 otherwise."""

    def __init__(self, base: Sequence, transform: Callable, seed: Optional[int] = None,
                 indices: Optional[Sequence[int]] = None, skip_bad: bool = False) -> None:
        self.base, self.transform, self.seed, self.epoch = base, transform, seed, 0
        self.indices = list(range(len(base))) if indices is None else list(indices)
        self.skip_bad = skip_bad

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.indices)

    def name_of(self, j: int) -> str:
        """The file (or row) behind ``base[j]``, for messages."""
        samples = getattr(self.base, "samples", None)  # torchvision ImageFolder
        if samples is not None:
            return str(samples[j][0])
        describe = getattr(self.base, "describe", None)
        return describe(j) if describe is not None else f"sample {j}"

    def load(self, j: int):
        """``base[j]`` decoded to an RGB PIL image and its label; :class:`BadImageError` if it cannot be."""
        try:
            image, label = self.base[j]
            image.load()
            return image.convert("RGB"), label
        except _decode_errors() as e:
            name = self.name_of(j)
            path = name if getattr(self.base, "samples", None) is not None else None
            raise BadImageError(f"cannot read image {name}: {_reason(e, path)}", name) from None

    def _load_or_replace(self, i: int):
        try:
            image, label = self.load(self.indices[i])
            return image, label, 0
        except BadImageError as e:
            if not self.skip_bad:
                raise
            if e.path not in _warned:
                _warned.add(e.path)
                print(f"warning: skipping unreadable image ({e})", file=sys.stderr, flush=True)
        n = len(self.indices)
        for k in range(1, n):
            try:
                image, label = self.load(self.indices[(i + k) % n])
                return image, label, 1
            except BadImageError:
                continue
        raise BadImageError(f"none of the {n} images of this split can be read (e.g. {self.name_of(self.indices[i])})")

    def __getitem__(self, i: int):
        image, label, replaced = self._load_or_replace(i)
        if self.seed is None:
            x = self.transform(image)
        else:
            with _seeded(hash((self.seed, self.epoch, i)) & 0x7FFF_FFFF):
                x = self.transform(image)
        return (x, int(label), replaced) if self.skip_bad else (x, int(label))


class _HFRows:
    """A ``datasets.Dataset`` seen as a sequence of ``(image, label)``."""

    def __init__(self, ds, image_col: str, label_col: str) -> None:
        self.ds, self.image_col, self.label_col = ds, image_col, label_col

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int):
        row = self.ds[int(i)]
        return row[self.image_col], row[self.label_col]

    def describe(self, i: int) -> str:
        """The image file behind row ``i`` (when the dataset recorded one) and the row."""
        where = f"row {int(i)} of split {self.ds.split}" if getattr(self.ds, "split", None) else f"row {int(i)}"
        try:
            import datasets

            raw = self.ds.cast_column(self.image_col, datasets.Image(decode=False))[int(i)][self.image_col]
            path = raw.get("path") if isinstance(raw, dict) else None
        except Exception:  # only for a message
            path = None
        return f"{path} ({where})" if path else where


@dataclass
class ImageData:
    """Raw train/eval splits (sequences of ``(PIL image, label)``) and class names."""

    train: Sequence
    eval: Sequence
    classes: List[str]
    source: str


def _looks_like_path(spec: str) -> bool:
    """Whether ``spec`` means a local path rather than a Hub dataset id (``name`` or ``owner/name``)."""
    if spec.startswith((".", "/", "~")) or os.path.isabs(spec) or Path(spec).exists():
        return True
    seps = [c for c in (os.sep, os.altsep, "/") if c]
    if not any(c in spec for c in seps):
        return False
    parts = Path(spec).parts
    return len(parts) > 2 or spec.endswith(tuple(seps)) or Path(parts[0]).exists()


def _missing_path_message(spec: str) -> str:
    """``dataset path ... does not exist: no such folder X in Y (did you mean Z?)`` -- one line."""
    path = Path(spec).expanduser()
    parent = path
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    missing = path.relative_to(parent).parts[0] if parent != path else path.name
    where = repr(str(parent)) if str(parent) not in ("", ".") else "the current folder"
    msg = f"dataset path {spec!r} does not exist: no such folder {missing!r} in {where}"
    try:
        siblings = sorted(p.name for p in parent.iterdir() if p.is_dir()) if parent.is_dir() else []
    except OSError:
        siblings = []
    close = difflib.get_close_matches(missing, siblings, n=1, cutoff=0.6)
    if close:
        msg += f" (did you mean {str(parent / close[0])!r}?)"
    if not spec.startswith((".", "/", "~")) and len(Path(spec).parts) == 2:
        msg += f"; for the Hub dataset {spec!r} pass --dataset hf:{spec}"
    return msg


def load_image_data(spec: str, train_split: Optional[str] = None, eval_split: Optional[str] = None) -> ImageData:
    """Open an image folder (``train/`` + ``val|validation|test/``) or a ``datasets.load_dataset`` source
    (``hf:NAME_OR_PATH`` forces the latter). A spec that looks like a local path but does not exist
    raises :class:`DataError` ("no such folder") instead of being looked up on the Hub."""
    if spec.startswith("hf:"):
        return _hf_dataset(spec[3:], train_split, eval_split)
    path = Path(spec).expanduser()
    if path.is_dir() and (path / (train_split or "train")).is_dir():
        return _image_folder(path, train_split, eval_split)
    if _looks_like_path(spec) and not path.exists():
        raise DataError(_missing_path_message(spec))
    return _hf_dataset(spec, train_split, eval_split)


def _image_folder(root: Path, train_split: Optional[str], eval_split: Optional[str]) -> ImageData:
    from torchvision.datasets import ImageFolder

    names = [eval_split] if eval_split else EVAL_FOLDERS
    eval_dir = next((root / n for n in names if (root / n).is_dir()), None)
    if eval_dir is None:
        raise DataError(f"image folder {str(root)!r} has no evaluation split: expected one of {', '.join(names)}/")
    try:
        train, evaluate = ImageFolder(str(root / (train_split or "train"))), ImageFolder(str(eval_dir))
    except (FileNotFoundError, RuntimeError) as e:
        raise DataError(f"image folder {str(root)!r}: {one_line(e)}") from e
    if evaluate.classes != train.classes:
        raise DataError(f"image folder {str(root)!r}: {eval_dir.name}/ has classes {evaluate.classes}, "
                        f"train/ has {train.classes}")
    return ImageData(train, evaluate, list(train.classes), f"ImageFolder {root}")


def _hf_dataset(spec: str, train_split: Optional[str], eval_split: Optional[str]) -> ImageData:
    import datasets

    try:
        dd = datasets.load_dataset(spec)
    except Exception as e:  # offline, unknown name, unreadable files ...
        raise DataError(f"cannot load dataset {spec!r}: {one_line(e)}") from e
    if not isinstance(dd, datasets.DatasetDict):
        raise DataError(f"dataset {spec!r} is not a map-style dataset with splits")
    train_name = train_split or "train"
    eval_name = eval_split or next((s for s in EVAL_SPLITS if s in dd), None)
    for name in (train_name, eval_name):
        if name is None or name not in dd:
            raise DataError(f"dataset {spec!r} has splits {list(dd)}; need {train_name!r} and an evaluation "
                            f"split ({eval_split or ' / '.join(EVAL_SPLITS)})")
    features = dd[train_name].features
    image_col = next((k for k, f in features.items() if isinstance(f, datasets.Image)), None)
    label_col = next((k for k, f in features.items() if isinstance(f, datasets.ClassLabel)), None)
    if image_col is None or label_col is None:
        raise DataError(f"dataset {spec!r} needs an Image and a ClassLabel column; it has {dict(features)}")
    return ImageData(_HFRows(dd[train_name], image_col, label_col), _HFRows(dd[eval_name], image_col, label_col),
                     list(features[label_col].names), f"datasets {spec} [{train_name}/{eval_name}]")


def subset_indices(n: int, limit: Optional[int], seed: int = 0) -> Optional[List[int]]:
    """A fixed random subset of ``limit`` of ``n`` indices (sorted), or ``None`` for all."""
    if limit is None or limit >= n:
        return None
    return sorted(torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:limit].tolist())
