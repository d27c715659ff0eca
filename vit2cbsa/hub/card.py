"""The model card (``README.md``) pushed with a converted model, rendered from ``model_card_template.md``.

The template is a Jinja2 file shipped with the package and rendered by
``huggingface_hub.ModelCard.from_template``: YAML metadata (library, pipeline tag, tags, ``base_model``,
``model-index`` when metrics come with a dataset, and a ``vit2cbsa`` entry with the conversion options and
costs), then the conversion, its cost for one image (:mod:`vit2cbsa.hub.costs`), fine-tuning results, how to
load it and the CBSA citation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional

from .costs import CostReport, change, human
from ..info import saved_config

TEMPLATE = Path(__file__).with_name("model_card_template.md")


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
        cost: FLOPs/parameters before and after (see :func:`vit2cbsa.hub.costs.compare_costs`).
        repo_id: the Hub repository the card is for (used in the loading snippet).
        metrics: fine-tuning results, e.g. ``{"top1": 80.1}``; with ``dataset`` they also go into
            the ``model-index`` metadata.
        dataset: the evaluation dataset of ``metrics`` (a Hub dataset id or a name).
        license: a license identifier for the metadata (e.g. ``"apache-2.0"``).
    """
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    conv, base = config["conversion"], config["base"]
    library = base["library"]
    name = repo_id.split("/")[-1] if repo_id else "vit2cbsa model"
    task = "image-classification" if base.get("task") == "image-classification" else "image-feature-extraction"
    eval_results = None
    if metrics and dataset:
        eval_results = [EvalResult(task_type=task, dataset_type=dataset, dataset_name=dataset, metric_type=k,
                                   metric_value=float(v)) for k, v in metrics.items()]
    options = {**saved_config(conv).options(), "converted_layers": conv["converted_layers"]}
    data = ModelCardData(
        library_name="vit2cbsa",
        license=license,
        base_model=config.get("base_model"),
        pipeline_tag=task,
        tags=["vit2cbsa", "cbsa", "efficient-attention", "vision-transformer", library],
        model_name=name if eval_results else None,
        eval_results=eval_results,
        vit2cbsa={
            **options,
            "input_size": list(cost.input_size),
            "flops": {"before": cost.flops_before, "after": cost.flops_after},
            "params": {"before": cost.params_before, "after": cost.params_after},
        },
    )
    c, h, w = cost.input_size
    card = ModelCard.from_template(
        data, template_path=str(TEMPLATE), title=name, base_model=config.get("base_model"), library=library,
        base_class=base["class"], architecture=base.get("architecture"), layers=options["converted_layers"],
        num_attention_layers=conv["num_attention_layers"], variant=options["variant"],
        library_version=config["library_version"], cost=cost, c=c, h=h, w=w,
        human=human, change=change, options=options, metrics=metrics or {}, dataset=dataset, repo_id=repo_id)
    return card.content


__all__ = ["TEMPLATE", "render_model_card"]
