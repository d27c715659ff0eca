"""Settle the broadcast design by measurement: zero-shot fidelity of each (variant, broadcast) pair.

On the embedded CIFAR-10 teacher and its 1,000 embedded test images, for each variant and each
way of broadcasting representatives back to tokens (``key``: softmax over extracted
representative keys, ``query``: over pooled queries as in Agent Attention / the authors'
adaptation code, ``transpose``: the paper's ``A^T``), convert without any training and report
accuracy and the cosine similarity of pre-logits features to the teacher's, for 4 and 16
representatives (``cbsa`` equals ``contraction_free`` at conversion: its contraction gate starts at 0). The default of ``vit2cbsa.convert`` is the pair that keeps the teacher best.

    python benchmarks/design_choices.py   # ~1 min on 2 CPU cores
Writes benchmarks/results/design_choices.json.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

import vit2cbsa
from vit2cbsa.measure import accuracy, feature_cosine
from vit2cbsa.zoo import cifar10_samples, load_cifar10_teacher, normalize


def main() -> None:
    torch.manual_seed(0)
    teacher, cfg = load_cifar10_teacher()
    images, labels, _ = cifar10_samples()
    x = normalize(images, cfg)
    with torch.no_grad():
        ref = teacher.forward_head(teacher.forward_features(x), pre_logits=True)
    rows = []
    print(f"teacher accuracy on the 1,000 embedded images: {accuracy(teacher, x, labels):.4f}")
    for reps in (4, 16):
        for variant in ("contraction_free",):  # cbsa equals it at conversion (gamma = 0)
            for broadcast in ("key", "query", "transpose"):
                model = vit2cbsa.convert(teacher, variant, reps, broadcast=broadcast, inplace=False).eval()
                with torch.no_grad():
                    feats = model.forward_head(model.forward_features(x), pre_logits=True)
                row = {"representatives": reps, "variant": variant, "broadcast": broadcast,
                       "accuracy": accuracy(model, x, labels), "feature_cosine": feature_cosine(feats, ref)}
                rows.append(row)
                print(row, flush=True)
    model = vit2cbsa.convert(teacher, "linear", inplace=False).eval()
    with torch.no_grad():
        feats = model.forward_head(model.forward_features(x), pre_logits=True)
    rows.append({"representatives": None, "variant": "linear", "broadcast": None,
                 "accuracy": accuracy(model, x, labels), "feature_cosine": feature_cosine(feats, ref)})
    print(rows[-1])
    record = {"teacher_test_accuracy": cfg.get("test_accuracy"), "teacher_epoch": cfg.get("epoch"),
              "teacher_accuracy_embedded": accuracy(teacher, x, labels), "rows": rows}
    out = Path(__file__).parent / "results" / "design_choices.json"
    out.write_text(json.dumps(record, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
