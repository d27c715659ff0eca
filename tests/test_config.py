"""ConversionConfig: one frozen, validated object for every conversion option (Python, saved folders, CLI)."""

from __future__ import annotations

import argparse
import dataclasses

import pytest
import torch

import vit2cbsa
from vit2cbsa import ConversionConfig
from vit2cbsa.errors import UsageError


def _tiny_vit():
    import timm

    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32,
                             depth=4, num_heads=2, num_classes=5).eval()


def test_defaults_are_the_documented_ones_and_frozen():
    c = ConversionConfig()
    assert (c.variant, c.num_representatives, c.layers, c.broadcast, c.extra_representatives, c.prefix_broadcast) == \
        ("cbsa", (8, 8), None, "query", "prefix", "own")
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.variant = "linear"  # type: ignore[misc]
    assert c.replace(broadcast="key").broadcast == "key" and c.broadcast == "query"


@pytest.mark.parametrize("given,expected", [(64, (8, 8)), ((4, 2), (4, 2)), ("8x4", (8, 4)), ("16", (4, 4))])
def test_representatives_are_normalised_to_a_grid(given, expected):
    assert ConversionConfig(num_representatives=given).num_representatives == expected


@pytest.mark.parametrize("given,expected", [("6:", slice(6, None)), ("all", None), ([0, 2], (0, 2)), (3, (3,)),
                                            ("0,1", (0, 1)), (slice(None, 2), slice(None, 2))])
def test_layers_are_normalised(given, expected):
    assert ConversionConfig(layers=given).layers == expected


@pytest.mark.parametrize("field,value,message", [
    ("variant", "softmax", r"unknown variant 'softmax'; choose one of \['cbsa', 'contraction_free', 'linear'"),
    ("broadcast", "keys", r"unknown broadcast 'keys'; choose one of \['key', 'query', 'transpose'\]"),
    ("extra_representatives", 3, "unknown extra_representatives 3"),
    ("prefix_broadcast", "mine", "unknown prefix_broadcast 'mine'"),
    ("num_representatives", 0, "representatives"),
    ("layers", "six", "layers='six' is not a layer spec"),
])
def test_bad_values_are_one_clear_usage_error(field, value, message):
    with pytest.raises(UsageError, match=message):
        ConversionConfig(**{field: value})
    with pytest.raises(ValueError):  # a UsageError is a ValueError, for callers catching the built-in
        ConversionConfig(**{field: value})


def test_variants_without_representatives_drop_the_representative_options():
    c = ConversionConfig(variant="linear", extra_representatives="global", prefix_broadcast="own")
    assert (c.extra_representatives, c.prefix_broadcast) == ("none", "all")


@pytest.mark.parametrize("config", [ConversionConfig(), ConversionConfig("linear", 16, [0, 3]),
                                    ConversionConfig("contraction_free", (4, 2), "2:", "key", "global", "all")])
def test_dict_round_trip(config):
    d = config.to_dict()
    import json

    assert ConversionConfig.from_dict(json.loads(json.dumps(d))) == config


def test_from_dict_refuses_unknown_keys_and_predicates_are_not_saved():
    with pytest.raises(UsageError, match="unknown conversion option 'num_reps'"):
        ConversionConfig.from_dict({"num_reps": 4})
    with pytest.raises(UsageError, match="predicate"):
        ConversionConfig(layers=lambda i, name, m: i > 0).to_dict()


def test_build_reads_todays_convert_call():
    base = ConversionConfig(broadcast="key")
    assert ConversionConfig.build("linear", 16, "1:") == ConversionConfig("linear", (4, 4), slice(1, None))
    assert ConversionConfig.build(base, layers=[1]) == base.replace(layers=(1,))
    assert ConversionConfig.build(None) == ConversionConfig()
    with pytest.raises(UsageError, match="got variant twice"):
        ConversionConfig.build("cbsa", variant="linear")
    with pytest.raises(UsageError, match="got num_representatives twice"):
        ConversionConfig.build("cbsa", 16, num_representatives=4)
    with pytest.raises(UsageError, match="unknown conversion option 'reps'"):
        ConversionConfig.build(reps=4)
    with pytest.raises(UsageError, match="config must be a vit2cbsa.ConversionConfig"):
        ConversionConfig.build({"variant": "cbsa"})  # type: ignore[arg-type]


def test_convert_with_a_config_equals_the_keyword_call_and_info_gives_it_back():
    """The three spellings convert identically (outputs compared), and the info's config rebuilds the conversion
    on the original model (outputs equal again)."""
    x = torch.randn(2, 3, 32, 32)
    config = ConversionConfig("cbsa", (2, 2), "2:", broadcast="key")
    a = vit2cbsa.convert(_tiny_vit(), config)
    b = vit2cbsa.convert(_tiny_vit(), "cbsa", 4, "2:", broadcast="key")
    c = vit2cbsa.convert(_tiny_vit(), ConversionConfig(), num_representatives=(2, 2), layers=slice(2, None),
                         broadcast="key")
    with torch.no_grad():
        ya, yb, yc = a(x), b(x), c(x)
    assert torch.equal(ya, yb) and torch.equal(ya, yc)
    info = vit2cbsa.conversion_info(a)
    assert info.config == config.replace(layers=(2, 3))
    with torch.no_grad():
        assert torch.equal(vit2cbsa.convert(_tiny_vit(), info.config)(x), ya)


def test_a_bad_option_leaves_the_model_unchanged():
    model = _tiny_vit()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UsageError):
        vit2cbsa.convert(model, broadcast="sideways")
    assert not vit2cbsa.is_converted(model) and all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_command_line_options_come_from_the_fields():
    parser = argparse.ArgumentParser(prog="t")
    ConversionConfig.add_arguments(parser)
    help_text = " ".join(parser.format_help().split())
    for name, meta in ConversionConfig.cli_fields():
        assert meta["flag"] in help_text and " ".join(meta["help"].split())[:40] in help_text
    assert ConversionConfig.from_arguments(parser.parse_args([])) == ConversionConfig()
    ns = parser.parse_args(["--variant", "contraction_free", "--representatives", "4x2", "--layers", "6:",
                            "--broadcast", "key", "--extra-representatives", "none", "--prefix-broadcast", "all"])
    assert ConversionConfig.given(ns) == {"variant": "contraction_free", "num_representatives": (4, 2),
                                          "layers": slice(6, None), "broadcast": "key",
                                          "extra_representatives": "none", "prefix_broadcast": "all"}
    assert ConversionConfig.from_arguments(ns) == ConversionConfig("contraction_free", (4, 2), "6:", "key", "none", "all")
    with pytest.raises(SystemExit):
        parser.parse_args(["--variant", "softmax"])
    with pytest.raises(SystemExit):
        parser.parse_args(["--representatives", "0x3"])
