"""The ``vit2cbsa explain`` figure (:func:`vit2cbsa.analysis.figures.explanation_figure`), read back from the
matplotlib Figure: plain-words panel titles with the notation in captions, colour bars, "random weights"
on the figure of an untrained model, a suptitle that fits narrow figures, numbers checked against
attention computed here by hand. Tiny random-weight models; nothing is downloaded.
"""

from __future__ import annotations

import itertools
import re

import numpy as np
import pytest
import timm
import torch

import vit2cbsa
from vit2cbsa.analysis.figures import RANDOM_WEIGHTS_NOTE, explanation_figure, plot_explanation
from vit2cbsa.analysis.maps import explain, mark_random_weights, rep_window

NOTATION = re.compile(r"A\[|B\[|E =|softmax\(|argmax|γ|φ")


def _teacher(seed=0):
    torch.manual_seed(seed)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=4, embed_dim=32,
                              depth=2, num_heads=2, num_classes=10, dynamic_img_size=True)
    with torch.no_grad():  # peakier attention than the random init
        for blk in model.blocks:
            blk.attn.qkv.weight.mul_(4.0)
    return model.eval()


X = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(9))
IMAGE = (np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8)


@pytest.fixture(scope="module")
def maps():
    teacher = _teacher()
    model = vit2cbsa.convert(teacher, "cbsa", 16, inplace=False).eval()
    conv, _ = explain(model, X, [1])
    ref, _ = explain(teacher, X, [1])
    return teacher, conv, ref


def _class_token_attention_by_hand(model, x, layer=-1):
    """``H x patches``: the class token's softmax attention in block ``layer``, from its own qkv weights."""
    attn, seen = model.blocks[layer].attn, {}
    handle = attn.register_forward_pre_hook(lambda mod, args: seen.setdefault("x", args[0]))
    with torch.no_grad():
        model(x)
        handle.remove()
        tokens = seen["x"]
        b, n, _ = tokens.shape
        q, k, _ = attn.qkv(tokens).reshape(b, n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
        weights = torch.softmax(q @ k.transpose(-2, -1) * attn.head_dim ** -0.5, dim=-1)
    return weights[0, :, 0, 1:].numpy()


def _grid(fig):
    """The panel axes (not the colour bars), in row-major order."""
    return [ax for ax in fig.axes if not hasattr(ax, "_colorbar")]


def _texts(fig):
    """Every visible non-empty text of the figure, with its window extent (after a draw)."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    out = []
    candidates = [fig._suptitle] if fig._suptitle is not None else []
    for ax in fig.axes:
        candidates += [ax.title, ax.xaxis.label, ax.yaxis.label]
    for t in candidates:
        if t.get_visible() and t.get_text().strip() and (t.axes is None or t.axes.axison or t is t.axes.title):
            out.append((t, t.get_window_extent(renderer)))
    return out


def _caption_number(caption: str, key: str) -> str:
    return re.search(rf"{key} ([0-9.e+-]+)", caption).group(1)


def test_panels_titled_in_plain_words_with_the_notation_in_captions(maps):
    teacher, conv, ref = maps
    fig = explanation_figure(IMAGE, conv, reference=ref, heads=[0, 1], num_reps=2, title="tiny | 32x32")
    panels = _grid(fig)
    ncols = 2 + 1 + 2 + 2
    assert len(panels) == 2 * ncols
    titles = [ax.get_title() for ax in panels[:ncols]]
    assert titles[:4] == ["image", "original model:\nwhere the class token looks",
                          "converted: where the class token\nlooks (whole layer)",
                          "where the class token's rep.\nreads from (extraction)"]
    assert re.fullmatch(r"where rep\. r\d,\d \(boxed\)\nreads from \(extraction\)", titles[4])
    assert titles[5] == "how each patch reads back\nthe class token's rep. (broadcast)"
    assert titles[6] == "which representative each\npatch reads back most"
    assert not any(NOTATION.search(t) for t in titles), titles  # no paper notation in the titles ...
    captions = [ax.get_xlabel() for ax in panels[:ncols]]
    assert captions[0] == ""
    assert captions[1].startswith("class-token row of softmax(s q K^T)\nmax ")
    assert captions[2].startswith("class-token row of E = B(I+γS)A\nmax ")
    assert captions[3].startswith("A[cls], read by the class token: B_cls 1.00\n")  # it reads only its own
    assert re.match(r"A\[r\d,\d\], read by the class token: B_cls 0\.00\n", captions[4])
    assert captions[5].startswith("B[:, cls]\nmax ")
    assert re.fullmatch(r"argmax_r B: \d+ of 17 reps used", captions[6])  # ... but in the captions
    assert [ax.get_ylabel() for ax in panels[::ncols]] == ["layer 1, head 0\nCBSA", "layer 1, head 1\nCBSA"]
    # the numbers: the class token's attention computed by hand from the teacher's weights; at conversion
    # the converted layer gives the class token exactly that attention (its own representative)
    by_hand = _class_token_attention_by_hand(teacher, X)
    for head in (0, 1):
        row = panels[head * ncols:(head + 1) * ncols]
        assert _caption_number(row[1].get_xlabel(), "max") == f"{by_hand[head].max():.3g}"
        assert _caption_number(row[2].get_xlabel(), "max") == f"{by_hand[head].max():.3g}"
        uniform = 1 / (1 + 64)
        assert f"({by_hand[head].max() / uniform:.1f}x unif.)" in row[1].get_xlabel()
    # the boxed window of the pooled representative shown in column 4 (display image: 224 px for 8 patches)
    name = re.search(r"A\[(r\d,\d)\]", captions[4]).group(1)
    r, c = map(int, name[1:].split(","))
    (box,) = panels[4].patches
    r0, r1, c0, c1 = rep_window(r * 4 + c, (4, 4), (8, 8))
    assert box.get_xy() == (c0 * 28 - 0.5, r0 * 28 - 0.5) and box.get_width() == (c1 - c0) * 28
    assert not panels[3].patches  # the class token's representative has no window


def test_colour_bars_span_the_maps(maps):
    _, conv, ref = maps
    fig = explanation_figure(IMAGE, conv, reference=ref, heads=[0], num_reps=1)
    bars = [ax._colorbar for ax in fig.axes if hasattr(ax, "_colorbar")]
    assert sorted(b.cmap.name for b in bars) == ["inferno", "viridis"]  # gather/class maps, broadcast maps
    for bar in bars:
        assert (bar.norm.vmin, bar.norm.vmax) == (0, 1)
        assert [t.get_text() for t in bar.ax.get_yticklabels()] == ["min", "", "max"]
        assert "own range" in bar.ax.get_ylabel()
    # the maps themselves are drawn on that scale: each overlay spans exactly [0, 1]
    for ax in _grid(fig)[1:-1]:
        heat = ax.images[1].get_array()
        assert ax.images[1].get_cmap().name in ("inferno", "viridis")
        assert float(heat.min()) == 0.0 and float(heat.max()) == pytest.approx(1.0)
    # a softmax-only figure has the one bar of its class-token maps
    only = explanation_figure(IMAGE, ref, heads=[0])
    assert [ax._colorbar.cmap.name for ax in only.axes if hasattr(ax, "_colorbar")] == ["inferno"]


LONG = ("/a/very/long/path/to/a/local/model/folder/with_a_long_name_without_spaces_at_all:contraction_free | "
        "ILSVRC2012_val_00000001_a_photo_with_a_long_file_name.JPEG | 224x224 | prediction: golden retriever (p=0.12)")


@pytest.mark.parametrize("kind", ["narrow", "wide"])
@pytest.mark.parametrize("random_weights", [False, True])
def test_title_and_every_text_fit_without_overlap(maps, kind, random_weights):
    _, conv, ref = maps
    if kind == "narrow":  # a softmax layer without reference: 2 panels, ~4.8 inches for a 200-character title
        fig = explanation_figure(IMAGE, ref, heads=[0], title=LONG, random_weights=random_weights)
    else:
        fig = explanation_figure(IMAGE, conv, reference=ref, heads=[0, 1], num_reps=3, title=LONG,
                                 random_weights=random_weights)
    texts = _texts(fig)
    box = fig.bbox
    for text, extent in texts:
        assert (extent.x0 >= box.x0 - 0.5 and extent.x1 <= box.x1 + 0.5 and extent.y0 >= box.y0 - 0.5
                and extent.y1 <= box.y1 + 0.5), f"{text.get_text()!r} is clipped: {extent} outside {box}"
    for (a, ea), (b, eb) in itertools.combinations(texts, 2):
        assert not ea.shrunk(0.98, 0.98).overlaps(eb.shrunk(0.98, 0.98)), \
            f"{a.get_text()!r} overlaps {b.get_text()!r}"
    heading = fig._suptitle.get_text()
    assert heading.count("\n") >= (3 if kind == "narrow" else 0) + random_weights  # wrapped; nothing dropped:
    expected = LONG + (RANDOM_WEIGHTS_NOTE if random_weights else "")
    assert re.sub(r"[\s|]", "", heading) == re.sub(r"[\s|]", "", expected)
    # the suptitle sits above every panel title
    top_of_titles = max(e.y1 for t, e in texts if t.axes is not None and t is t.axes.title)
    suptitle_extent = next(e for t, e in texts if t is fig._suptitle)
    assert suptitle_extent.y0 >= top_of_titles


def _random_marks(fig):
    marks = [t for ax in fig.axes for t in ax.texts if t.get_text() == "random weights"]
    heading = fig._suptitle.get_text() if fig._suptitle is not None else ""
    return marks, heading


def test_random_weights_are_written_on_the_figure(maps):
    teacher, conv, ref = maps
    fig = explanation_figure(IMAGE, conv, reference=ref, heads=[0], num_reps=2, title="t")
    marks, heading = _random_marks(fig)
    assert not marks and "random" not in heading.lower()  # trained weights: nothing said
    fig = explanation_figure(IMAGE, conv, reference=ref, heads=[0], num_reps=2, title="t", random_weights=True)
    marks, heading = _random_marks(fig)
    map_panels = [ax for ax in _grid(fig) if len(ax.images) == 2]
    assert len(map_panels) == 6 and len(marks) == len(map_panels)  # on every map, not on the image itself
    assert {m.axes for m in marks} == set(map_panels)
    assert heading.startswith("t\n") and heading.replace("\n", " ") == "t " + RANDOM_WEIGHTS_NOTE
    assert fig._suptitle.get_color() == "firebrick"
    # without a title the note is the heading
    _, heading = _random_marks(explanation_figure(IMAGE, ref, heads=[0], random_weights=True))
    assert heading.replace("\n", " ") == RANDOM_WEIGHTS_NOTE


def test_a_model_marked_as_random_carries_it_into_its_maps_and_conversions():
    teacher = mark_random_weights(_teacher(seed=3))
    converted = vit2cbsa.convert(teacher, "contraction_free", 4, inplace=False)  # a deep copy keeps the mark
    conv, _ = explain(converted, X, [0])
    ref, _ = explain(teacher, X, [0])
    assert conv[0].random_weights and ref[0].random_weights
    marks, heading = _random_marks(explanation_figure(IMAGE, conv, reference=ref, heads=[1], num_reps=1))
    assert marks and RANDOM_WEIGHTS_NOTE in heading.replace("\n", " ")
    plain, _ = explain(_teacher(seed=3), X, [0])
    assert not plain[0].random_weights
    assert not _random_marks(explanation_figure(IMAGE, plain, heads=[0]))[0]


def test_plot_explanation_saves_the_figure(maps, tmp_path):
    from PIL import Image

    _, conv, ref = maps
    out = plot_explanation(IMAGE, conv, tmp_path / "sub" / "maps.png", reference=ref, heads=[1], num_reps=2,
                           title="t", random_weights=True)
    fig = explanation_figure(IMAGE, conv, reference=ref, heads=[1], num_reps=2, title="t", random_weights=True)
    with Image.open(out) as im:
        assert im.format == "PNG"
        width, height = fig.get_size_inches() * fig.dpi
        assert abs(im.size[0] - width) <= 1 and abs(im.size[1] - height) <= 1


def test_cli_random_weight_fallback_is_written_on_the_figure(tmp_path, monkeypatch):
    import huggingface_hub.constants
    from PIL import Image

    import vit2cbsa.analysis.figures as figures_module
    from vit2cbsa.cli import explain_main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    seen = {}
    real = figures_module.plot_explanation

    def spy(pixels, maps, path, **kwargs):
        seen["random"] = kwargs.get("random_weights", False) or any(lm.random_weights for lm in maps)
        return real(pixels, maps, path, **kwargs)

    monkeypatch.setattr(figures_module, "plot_explanation", spy)
    photo = tmp_path / "photo.png"
    Image.fromarray(IMAGE).resize((48, 40)).save(photo)
    assert explain_main(["test_vit:contraction_free", str(photo), "--heads", "0", "--num-reps", "1",
                         "--out", str(tmp_path / "maps.png")]) == 0
    assert seen["random"] is True
