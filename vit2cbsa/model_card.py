"""What a conversion costs (tokens, FLOPs, parameters before/after) and the model card pushed to the Hub.

FLOPs are counted with :class:`torch.utils.flop_counter.FlopCounterMode` for one image (batch 1)
on deep copies of the models, so the caller's models are untouched. The counter sees matrix
multiplications, convolutions and fused attention (2 FLOPs per multiply-add), not element-wise
ops such as softmax or normalisation.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
from torch import nn

from .adapters import ConvertedAttention, find_adapter
from .measure import count_flops
from .modeling import InputSize, PatchGridWatch, forward_pixels, input_size_of

CBSA_CITATION = """@inproceedings{wen2025cbsa,
  title         = {Towards Interpretable and Efficient Attention: Compressing All by Contracting a Few},
  author        = {Wen, Qishuai and Huang, Zhiyuan and Li, Chun-Guang},
  booktitle     = {Advances in Neural Information Processing Systems (NeurIPS)},
  year          = {2025},
  eprint        = {2509.16875},
  archivePrefix = {arXiv},
}"""


@dataclass
class CostReport:
    """Tokens, FLOPs and parameters of a model before and after conversion, for one image."""

    input_size: InputSize
    num_tokens: int
    num_prefix_tokens: int
    patch_grid: Tuple[int, int]
    flops_before: int
    flops_after: int
    params_before: int
    params_after: int

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        d["input_size"], d["patch_grid"] = list(self.input_size), list(self.patch_grid)
        return d


def _param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _measure(model: nn.Module, input_size: InputSize) -> Tuple[int, int, Tuple[int, int]]:
    """FLOPs, tokens seen by the first attention layer, and patch grid of one forward pass."""
    model = copy.deepcopy(model).eval()
    ref = next(model.parameters())
    seen: Dict[str, Any] = {}
    attn = next(m for m in model.modules() if isinstance(m, ConvertedAttention) or find_adapter(m) is not None)

    def on_attn(module, args, kwargs):
        x = args[0] if args else next(iter(kwargs.values()))
        seen.setdefault("tokens", int(x.shape[1]))

    handle = attn.register_forward_pre_hook(on_attn, with_kwargs=True)
    pixels = torch.zeros(1, *input_size, device=ref.device, dtype=ref.dtype)
    try:
        with PatchGridWatch(model) as watch:
            flops = count_flops(forward_pixels, model, pixels)
    finally:
        handle.remove()
    return flops, seen["tokens"], tuple(int(v) for v in watch.grid)


def compare_costs(base: nn.Module, converted: nn.Module, input_size: Optional[InputSize] = None) -> CostReport:
    """Tokens, FLOPs and parameters of ``base`` (unconverted) vs ``converted`` for one image.

    ``input_size`` defaults to the converted model's own input size; both models run on copies.
    """
    input_size = tuple(input_size or input_size_of(converted))  # type: ignore[assignment]
    flops_before, tokens, grid = _measure(base, input_size)
    flops_after, _, _ = _measure(converted, input_size)
    return CostReport(input_size, tokens, tokens - grid[0] * grid[1], grid, flops_before, flops_after,
                      _param_count(base), _param_count(converted))


def human(n: float) -> str:
    """``1234567 -> '1.23 M'``."""
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f}"


def change(before: float, after: float) -> str:
    return f"{100.0 * (after - before) / before:+.1f}%" if before else "n/a"


def cost_table(cost: CostReport) -> str:
    """A markdown table of FLOPs and parameters before/after."""
    rows = [("FLOPs", cost.flops_before, cost.flops_after), ("Parameters", cost.params_before, cost.params_after)]
    lines = ["| | original (softmax) | converted | change |", "|---|---:|---:|---:|"]
    lines += [f"| {name} | {human(b)} | {human(a)} | {change(b, a)} |" for name, b, a in rows]
    return "\n".join(lines)


def render_model_card(
    config: Mapping[str, Any],
    cost: CostReport,
    *,
    repo_id: Optional[str] = None,
    metrics: Optional[Mapping[str, float]] = None,
    dataset: Optional[str] = None,
    license: Optional[str] = None,
) -> str:
    """The README.md (YAML metadata + markdown) of a converted model.

    Args:
        config: the contents of a saved ``vit2cbsa_config.json``.
        cost: FLOPs/parameters before and after (see :func:`compare_costs`).
        repo_id: the Hub repository the card is for (used in the loading snippet).
        metrics: fine-tuning results, e.g. ``{"top1": 80.1}``; with ``dataset`` they also go into
            the ``model-index`` metadata.
        dataset: the evaluation dataset of ``metrics`` (a Hub dataset id or a name).
        license: a license identifier for the metadata (e.g. ``"apache-2.0"``).
    """
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    conv, base = config["conversion"], config["base"]
    gh, gw = conv["num_representatives"]
    library = base["library"]
    base_model = config.get("base_model")
    name = repo_id.split("/")[-1] if repo_id else "vit2cbsa model"
    layers = conv["converted_layers"]
    classifier = base.get("task") == "image-classification"
    eval_results = None
    if metrics and dataset:
        eval_results = [
            EvalResult(task_type="image-classification" if classifier else "image-feature-extraction",
                       dataset_type=dataset, dataset_name=dataset, metric_type=k, metric_value=float(v))
            for k, v in metrics.items()
        ]
    data = ModelCardData(
        library_name="vit2cbsa",
        license=license,
        base_model=base_model,
        pipeline_tag="image-classification" if classifier else "image-feature-extraction",
        tags=["vit2cbsa", "cbsa", "efficient-attention", "vision-transformer", library],
        model_name=name if eval_results else None,
        eval_results=eval_results,
        vit2cbsa={
            "variant": conv["variant"],
            "num_representatives": [gh, gw],
            "broadcast": conv["broadcast"],
            "extra_representatives": conv.get("extra_representatives", "none"),
            "prefix_broadcast": conv.get("prefix_broadcast", "all"),
            "converted_layers": layers,
            "input_size": list(cost.input_size),
            "flops": {"before": cost.flops_before, "after": cost.flops_after},
            "params": {"before": cost.params_before, "after": cost.params_after},
        },
    )
    c, h, w = cost.input_size
    source = f"[{base_model}](https://huggingface.co/{base_model})" if base_model else f"a {library} `{base['class']}`"
    lines = [
        f"# {name}",
        "",
        f"{source} with {len(layers)} of its {conv['num_attention_layers']} softmax self-attention layers "
        f"replaced by **{conv['variant']}** attention (Contract-and-Broadcast Self-Attention family) with "
        f"vit2cbsa. Converted layers reuse the pretrained q/k/v/output projections; "
        f"their cost is linear in the number of tokens.",
        "",
        "## Conversion",
        "",
        "| option | value |",
        "|---|---|",
        f"| variant | `{conv['variant']}` |",
        f"| representatives per head | {gh}x{gw} = {gh * gw} |",
        f"| extra representatives | `{conv.get('extra_representatives', 'none')}` (prefix tokens read "
        f"`{conv.get('prefix_broadcast', 'all')}`) |",
        f"| broadcast | `{conv['broadcast']}` |",
        f"| converted layers | {', '.join(map(str, layers))} |",
        f"| base architecture | {library} `{base['class']}`" + (f" (`{base['architecture']}`)" if base.get("architecture") else "") + " |",
        f"| vit2cbsa version | {config['library_version']} |",
        "",
        f"## Cost for one {h}x{w} image ({cost.num_tokens} tokens: {cost.num_prefix_tokens} prefix + "
        f"{cost.patch_grid[0]}x{cost.patch_grid[1]} patches)",
        "",
        cost_table(cost),
        "",
        "FLOPs counted with `torch.utils.flop_counter.FlopCounterMode` (matmuls, convolutions, attention).",
        "",
    ]
    if metrics:
        lines += ["## Fine-tuning results", ""] + ([f"Dataset: {dataset}", ""] if dataset else [])
        lines += ["| metric | value |", "|---|---:|"] + [f"| {k} | {v} |" for k, v in metrics.items()] + [""]
    lines += [
        "## How to use",
        "",
        "```python",
        "import torch, vit2cbsa",
        "",
        f'model = vit2cbsa.from_pretrained("{repo_id or "path/to/this/folder"}")  # rebuilds, converts, loads strictly; eval mode',
        f"pixels = torch.randn(1, {c}, {h}, {w})",
        "out = model(pixels)" if library == "timm" else "out = model(pixel_values=pixels)",
        "```",
        "",
        "Needs the `vit2cbsa` package; the original pretrained weights are not downloaded."
        + (" After `import vit2cbsa`, transformers' `AutoModelForImageClassification.from_pretrained` / `AutoModel` and "
           "`pipeline(...)` load it too (without vit2cbsa, transformers refuses the unknown model type `vit2cbsa` "
           "rather than loading the original softmax model)." if library != "timm" else ""),
        "",
        "## Citation",
        "",
        "```bibtex",
        CBSA_CITATION,
        "```",
        "",
    ]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines)).content


def attention_table(model: nn.Module, converted: Optional[List[str]] = None) -> List[Dict[str, Any]]:
    """Every attention module an adapter recognises (or that is already converted), in block order."""
    rows = []
    for name, m in model.named_modules():
        adapter = find_adapter(m)
        if adapter is None and not isinstance(m, ConvertedAttention):
            continue
        spec = adapter.describe(m) if adapter is not None else m.spec
        rows.append({"index": len(rows), "name": name, "family": spec.family, "num_heads": spec.num_heads,
                     "head_dim": spec.head_dim, "converted": converted is not None and name in converted})
    return rows
