"""Attention alignment lowers every layer's alignment loss and touches nothing but attention."""

from __future__ import annotations

import pytest
import timm
import torch

import vit2cbsa
from vit2cbsa.train import AttentionAligner, align_attention


def _teacher():
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=4, embed_dim=32,
                              depth=3, num_heads=2, num_classes=10)
    with torch.no_grad():  # sharper attention than random init, so there is something to imitate
        for blk in model.blocks:
            blk.attn.qkv.weight.mul_(8.0)
    return model.eval()


@pytest.mark.parametrize("variant,trainable", [("cbsa", "attention"), ("contraction_free", "attention"), ("linear", "new")])
def test_alignment_lowers_each_layer_loss(variant, trainable):
    teacher = _teacher()
    teacher_state = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = vit2cbsa.convert(teacher, variant, 4, inplace=False)
    other = {k: v.clone() for k, v in student.state_dict().items() if ".attn." not in k}
    images = [torch.randn(8, 3, 32, 32) for _ in range(2)]
    probe = AttentionAligner(student, teacher)
    with torch.no_grad():
        _, before = probe(images[0])
    probe.remove()
    history = align_attention(student, teacher, images, steps=20, lr=3e-2, trainable=trainable, pretrained_lr=1e-3)
    probe = AttentionAligner(student, teacher)
    with torch.no_grad():
        _, after = probe(images[0])
    probe.remove()
    assert len(history) == 20
    assert all(a < b for a, b in zip(after, before)), (before, after)
    assert sum(after) < 0.95 * sum(before), (before, after)
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in teacher_state.items())
    assert all(torch.equal(v, student.state_dict()[k]) for k, v in other.items())
    if trainable == "new":  # pretrained projections untouched too
        assert torch.equal(student.blocks[0].attn.qkv.weight, teacher.blocks[0].attn.qkv.weight)


def test_aligner_rejects_bad_pairs():
    teacher = _teacher()
    with pytest.raises(ValueError, match="not converted"):
        AttentionAligner(teacher, teacher)
    student = vit2cbsa.convert(teacher, "cbsa", 4, inplace=False)
    with pytest.raises(ValueError, match="teacher is converted too"):
        AttentionAligner(student, student)
    with pytest.raises(ValueError, match="'new' or 'attention'"):
        AttentionAligner(student, teacher, trainable="all")
