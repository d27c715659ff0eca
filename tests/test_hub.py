"""save_pretrained / from_pretrained / push_to_hub: exact round trips, strict loading, atomic saves, the card.

Never touches the network: the Hub is a fake cache read with HF_HUB_OFFLINE=1, and uploads go to
monkeypatched ``HfApi`` methods.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import huggingface_hub
import pytest
import timm
import torch
import transformers
from safetensors.torch import load_file, save_file
from vit2cbsa.measure import flop_counter

import vit2cbsa
from vit2cbsa.errors import CheckpointError
from vit2cbsa.hub import CONFIG_NAME, from_pretrained, push_to_hub, read_config, save_pretrained


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path_factory):
    """No test reaches the network; the Hub cache is an empty temporary folder."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path_factory.mktemp("hf_cache")))


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one thread, and a busy machine cannot slow them down much."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------- tiny models of every family

def _timm(name, **kw):
    return lambda: timm.create_model(name, pretrained=False, **{**dict(embed_dim=32, depth=2, num_heads=2, num_classes=5), **kw})


def _vit_direct():
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(img_size=(24, 40), patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5,
                             reg_tokens=2, qk_norm=True, init_values=1e-5, global_pool="avg")


def _hf(config_cls, model_cls, **kw):
    def build():
        cfg = getattr(transformers, config_cls)(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                                intermediate_size=64, **kw)
        return getattr(transformers, model_cls)(cfg)
    return build


# name: (build, input (H, W), conversion options)
FAMILIES = {
    "timm_vit": (_timm("vit_tiny_patch16_224", img_size=32, patch_size=8, drop_path_rate=0.1), (32, 32),
                 dict(variant="cbsa", num_representatives=4)),
    "timm_vit_direct": (_vit_direct, (24, 40), dict(variant="contraction_free", num_representatives=(2, 3), broadcast="query")),
    "timm_deit_distilled": (_timm("deit_tiny_distilled_patch16_224", img_size=32, patch_size=8), (32, 32),
                            dict(variant="linear")),
    "timm_reg4_dynamic": (_timm("vit_small_patch14_reg4_dinov2", img_size=28, patch_size=7, dynamic_img_size=True),
                          (35, 21), dict(variant="cbsa", num_representatives=4, layers=[1], broadcast="transpose")),
    "hf_vit": (_hf("ViTConfig", "ViTForImageClassification", image_size=32, patch_size=8, num_labels=5), (32, 32),
               dict(variant="cbsa", num_representatives=(2, 2))),
    "hf_deit": (_hf("DeiTConfig", "DeiTForImageClassificationWithTeacher", image_size=32, patch_size=8, num_labels=5),
                (32, 32), dict(variant="contraction_free", num_representatives=4)),
    "hf_dinov2": (_hf("Dinov2Config", "Dinov2Model", image_size=28, patch_size=7), (28, 28), dict(variant="linear")),
    "hf_dinov2_reg": (_hf("Dinov2WithRegistersConfig", "Dinov2WithRegistersModel", image_size=28, patch_size=7,
                          num_register_tokens=4), (28, 28), dict(variant="cbsa", num_representatives=4, layers=[0])),
    "hf_clip_vision": (_hf("CLIPVisionConfig", "CLIPVisionModel", image_size=32, patch_size=8), (32, 32),
                       dict(variant="cbsa", num_representatives=4, broadcast="query")),
    "hf_siglip_vision": (_hf("SiglipVisionConfig", "SiglipVisionModel", image_size=32, patch_size=8), (32, 32),
                         dict(variant="contraction_free", num_representatives=4, broadcast="transpose")),
}
HUB_FAMILIES = {"timm_vit": "user/tiny-timm-cbsa", "hf_dinov2_reg": "user/tiny-dinov2-reg-cbsa"}


def outputs(model, x) -> dict:
    """Every output tensor of a timm (``model(x)``) or transformers (``model(pixel_values=x)``) model."""
    with torch.no_grad():
        if isinstance(model, transformers.PreTrainedModel):
            out = model(pixel_values=x)
            return {k: v.contiguous() for k, v in out.items() if isinstance(v, torch.Tensor)}
        return {"out": model(x)}


def converted(name, seed=0):
    """A converted tiny model of ``name`` with non-default conversion parameters, in eval mode."""
    build, _, options = FAMILIES[name]
    torch.manual_seed(seed)
    model = vit2cbsa.convert(build().eval(), **options)
    with torch.no_grad():
        for p in vit2cbsa.new_parameters(model):
            p.add_(torch.randn_like(p) * 0.1)  # so that loading them matters
    return model


def fake_hub_repo(cache: Path, repo_id: str, folder: Path, commit: str = "0123456789abcdef0123456789abcdef01234567"):
    """Lay ``folder`` out as the Hub cache does: models--user--name/{snapshots/<commit>/..., refs/main}."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    shutil.copytree(folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)


LOADER = textwrap.dedent("""
    import json, sys, torch
    from safetensors.torch import load_file, save_file
    from vit2cbsa.hub import from_pretrained
    import transformers
    torch.set_num_threads(int(sys.argv[2]))
    for job in json.load(open(sys.argv[1])):
        model = from_pretrained(job["source"])
        x = load_file(job["input"])["x"]
        with torch.no_grad():
            if isinstance(model, transformers.PreTrainedModel):
                out = model(pixel_values=x)
                out = {k: v.contiguous() for k, v in out.items() if isinstance(v, torch.Tensor)}
            else:
                out = {"out": model(x)}
        save_file(out, job["output"])
        info = dict(model.vit2cbsa_info.to_dict(), training=model.training, cls=type(model).__name__)
        json.dump(info, open(job["info"], "w"))
""")


@pytest.fixture(scope="module")
def round_trip(tmp_path_factory):
    """Convert + save every family here; load each in ONE fresh process (some via a Hub repo id)."""
    root = tmp_path_factory.mktemp("round_trip")
    cache = root / "hub_cache"
    refs, jobs = {}, []
    for name, (_, (h, w), _) in FAMILIES.items():
        model = converted(name)
        torch.manual_seed(1)
        x = torch.randn(2, 3, h, w)
        save_file({"x": x}, str(root / f"{name}.input.safetensors"))
        folder = save_pretrained(model, root / name)
        refs[name] = (outputs(model, x), model.vit2cbsa_info.to_dict(), type(model).__name__)
        source = str(folder)
        if name in HUB_FAMILIES:
            fake_hub_repo(cache, HUB_FAMILIES[name], folder)
            shutil.rmtree(folder)  # only the Hub copy is left
            source = HUB_FAMILIES[name]
        jobs.append({"source": source, "input": str(root / f"{name}.input.safetensors"),
                     "output": str(root / f"{name}.output.safetensors"), "info": str(root / f"{name}.info.json")})
    (root / "jobs.json").write_text(json.dumps(jobs))
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(cache))
    proc = subprocess.run([sys.executable, "-c", LOADER, str(root / "jobs.json"), str(torch.get_num_threads())],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root, refs


@pytest.mark.parametrize("name", list(FAMILIES))
def test_round_trip_in_fresh_process_is_exact(round_trip, name):
    root, refs = round_trip
    ref_out, ref_info, ref_cls = refs[name]
    out = load_file(str(root / f"{name}.output.safetensors"))
    info = json.loads((root / f"{name}.info.json").read_text())
    assert info.pop("training") is False and info.pop("cls") == ref_cls
    assert info == json.loads(json.dumps(ref_info))
    assert sorted(out) == sorted(ref_out)
    for key, ref in ref_out.items():
        assert out[key].dtype == torch.float32
        assert torch.equal(out[key], ref), f"{name}: output {key} differs after reloading"


# --------------------------------------------------------------------------- what is written


def test_saved_folder_layout_and_config(tmp_path):
    model = converted("timm_vit")
    folder = save_pretrained(model, tmp_path / "out")
    assert sorted(os.listdir(folder)) == ["model.safetensors", CONFIG_NAME]
    assert os.listdir(tmp_path) == ["out"]  # no temporary folder left behind
    config = read_config(folder)
    assert config["library_version"] == vit2cbsa.__version__
    assert config["conversion"]["variant"] == "cbsa" and config["conversion"]["num_representatives"] == [2, 2]
    assert config["conversion"]["broadcast"] == "query" and config["conversion"]["converted_layers"] == [0, 1]
    assert config["conversion"]["extra_representatives"] == "prefix" and config["conversion"]["prefix_broadcast"] == "own"
    base = config["base"]
    assert base["library"] == "timm" and base["architecture"] == "vit_tiny_patch16_224"
    assert base["model_kwargs"]["img_size"] == [32, 32] and base["model_kwargs"]["depth"] == 2
    assert base["model_kwargs"]["drop_path_rate"] == 0.1
    assert base["pretrained_cfg"]["mean"] == [0.5, 0.5, 0.5]
    assert set(config["files"]) == {"model.safetensors"}
    assert set(load_file(str(folder / "model.safetensors"))) == set(model.state_dict())
    assert any(k.endswith("attn.mixer.kappa") for k in model.state_dict())
    # the reloaded timm model keeps timm's data config
    assert from_pretrained(folder).pretrained_cfg["mean"] == (0.5, 0.5, 0.5)


def test_version_1_folder_loads_as_the_pooled_grid_only(tmp_path):
    """Folders written before extra representatives existed (format 1, no such keys) meant the pooled grid
    alone: they load as extra_representatives="none", prefix_broadcast="all", with the outputs of that model."""
    torch.manual_seed(0)
    model = vit2cbsa.convert(FAMILIES["timm_vit"][0](), "cbsa", 4, extra_representatives="none", prefix_broadcast="all")
    folder = save_pretrained(model, tmp_path / "v1")

    def as_version_1(c):
        c["format_version"] = 1
        for key in ("extra_representatives", "prefix_broadcast"):
            del c["conversion"][key]

    _rewrite_config(folder, as_version_1)
    loaded = from_pretrained(folder)
    info = loaded.vit2cbsa_info
    assert (info.extra_representatives, info.prefix_broadcast) == ("none", "all")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model.eval()(x), rtol=0, atol=0)


def test_hf_folder_has_transformers_config(tmp_path):
    folder = save_pretrained(converted("hf_vit"), tmp_path / "out")
    assert sorted(os.listdir(folder)) == ["config.json", "model.safetensors", CONFIG_NAME]
    hf_config = json.loads((folder / "config.json").read_text())
    # the base config is wrapped, so plain transformers cannot mistake the folder for a softmax ViT
    assert hf_config["model_type"] == "vit2cbsa" and hf_config["architectures"] == ["Vit2CBSAForImageClassification"]
    base = hf_config["base_config"]
    assert base["model_type"] == "vit" and base["architectures"] == ["ViTForImageClassification"]
    assert base["hidden_size"] == 32
    assert read_config(folder)["base"] == {"library": "transformers", "class": "ViTForImageClassification",
                                           "task": "image-classification", "config": "config.json",
                                           "attn_implementation": "sdpa"}


def test_sharded_save_round_trip(tmp_path):
    model = converted("hf_clip_vision")
    folder = save_pretrained(model, tmp_path / "out", max_shard_size="40KB")
    shards = sorted(p.name for p in folder.glob("model-*.safetensors"))
    assert len(shards) > 1 and (folder / "model.safetensors.index.json").is_file()
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(model.state_dict()) and set(index["weight_map"].values()) == set(shards)
    x = torch.randn(1, 3, 32, 32)
    reloaded = from_pretrained(folder)
    for k, v in outputs(model, x).items():
        assert torch.equal(outputs(reloaded, x)[k], v)


def test_hf_attention_implementation_is_kept(tmp_path):
    torch.manual_seed(0)
    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                    image_size=32, patch_size=8, attn_implementation="eager")
    model = vit2cbsa.convert(transformers.ViTModel(config).eval(), "cbsa", 4, layers=[1])  # layer 0 stays softmax
    reloaded = from_pretrained(save_pretrained(model, tmp_path / "out"))
    assert reloaded.config._attn_implementation == "eager"
    x = torch.randn(1, 3, 32, 32)
    assert torch.equal(outputs(model, x)["last_hidden_state"], outputs(reloaded, x)["last_hidden_state"])


def test_half_precision_is_kept(tmp_path):
    model = converted("timm_deit_distilled").to(torch.bfloat16)
    reloaded = from_pretrained(save_pretrained(model, tmp_path / "out"))
    assert all(p.dtype == torch.bfloat16 for p in reloaded.parameters())
    x = torch.randn(1, 3, 32, 32, dtype=torch.bfloat16)
    assert torch.equal(outputs(model, x)["out"], outputs(reloaded, x)["out"])


def test_resave_of_a_loaded_model(tmp_path):
    first = from_pretrained(save_pretrained(converted("timm_vit_direct"), tmp_path / "a", base_model="me/vit"))
    second = from_pretrained(save_pretrained(first, tmp_path / "b"))
    assert read_config(tmp_path / "a")["base"] == read_config(tmp_path / "b")["base"]
    assert read_config(tmp_path / "b")["base_model"] == "me/vit"
    x = torch.randn(1, 3, 24, 40)
    assert torch.equal(outputs(first, x)["out"], outputs(second, x)["out"])


def test_compiled_model_converts_and_saves_underneath_the_wrapper(tmp_path):
    """torch.compile wraps a model in an OptimizedModule: convert and save act on the module beneath."""
    base = _timm("vit_tiny_patch16_224", img_size=32, patch_size=8)()
    x = torch.randn(1, 3, 32, 32)
    copy_of = vit2cbsa.convert(torch.compile(copy.deepcopy(base)), "cbsa", 4, inplace=False)
    assert type(copy_of).__name__ != "OptimizedModule" and vit2cbsa.conversion_info(copy_of) is not None
    compiled = torch.compile(base)
    assert vit2cbsa.convert(compiled, "cbsa", 4) is compiled  # in place: the wrapper, over the converted model
    assert vit2cbsa.is_converted(base) and vit2cbsa.conversion_info(base) is not None
    folder = save_pretrained(compiled, tmp_path / "out")  # never called, so nothing was compiled
    weights = load_file(str(folder / "model.safetensors"))
    assert not any(k.startswith("_orig_mod") for k in weights) and weights.keys() == base.state_dict().keys()
    assert torch.equal(outputs(base, x)["out"], outputs(from_pretrained(folder), x)["out"])
    assert torch.equal(outputs(copy_of, x)["out"], outputs(base, x)["out"])  # same weights, same conversion


# --------------------------------------------------------------------------- what cannot be saved


def test_unconverted_model_is_refused(tmp_path):
    with pytest.raises(ValueError, match="not converted"):
        save_pretrained(FAMILIES["timm_vit"][0](), tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("custom, message", [
    (dict(norm_layer="rmsnorm"), r"unexpected tensor\(s\): .*norm\.bias"),  # RmsNorm has no bias
    (dict(act_layer="gelu_tanh"), r"`\(act\): GELUTanh\(\)` would be rebuilt as `\(act\): GELU\(approximate='none'\)`"),
])
def test_unrebuildable_timm_model_asks_for_model_kwargs(tmp_path, custom, message):
    from timm.models.vision_transformer import VisionTransformer

    kwargs = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=3, **custom)
    torch.manual_seed(0)
    model = vit2cbsa.convert(VisionTransformer(**kwargs)).eval()
    with pytest.raises(ValueError, match=message + r".*pass save_pretrained\(\.\.\., model_kwargs="):
        save_pretrained(model, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []  # nothing written
    reloaded = from_pretrained(save_pretrained(model, tmp_path / "out", model_kwargs=kwargs))
    x = torch.randn(1, 3, 32, 32)
    assert torch.equal(outputs(model, x)["out"], outputs(reloaded, x)["out"])
    with pytest.raises(ValueError, match="does not rebuild"):  # wrong kwargs are caught too
        save_pretrained(model, tmp_path / "other", model_kwargs={**kwargs, "depth": 3})


def test_existing_foreign_folder_is_not_overwritten(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        save_pretrained(converted("timm_vit"), tmp_path / "out")
    assert os.listdir(tmp_path / "out") == ["notes.txt"]


# --------------------------------------------------------------------------- atomic saves


def test_interrupted_save_keeps_the_previous_one(tmp_path, monkeypatch):
    import vit2cbsa.hub.io as hub_io

    old = converted("timm_vit", seed=0)
    folder = save_pretrained(old, tmp_path / "out")
    x = torch.randn(1, 3, 32, 32)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(hub_io, "sha256", interrupted)  # dies after the weights, before the marker
    with pytest.raises(KeyboardInterrupt):
        save_pretrained(converted("timm_vit", seed=1), folder)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["out"]
    assert torch.equal(outputs(from_pretrained(folder), x)["out"], outputs(old, x)["out"])


def test_killed_save_leaves_nothing_loadable(tmp_path, monkeypatch):
    import vit2cbsa.hub.io as hub_io

    # simulate a kill: no cleanup runs, the temporary folder stays, the target never appears
    monkeypatch.setattr(hub_io.shutil, "rmtree", lambda *a, **k: None)
    monkeypatch.setattr(hub_io, "sha256", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        save_pretrained(converted("timm_vit"), tmp_path / "out")
    monkeypatch.undo()
    assert not (tmp_path / "out").exists()
    (leftover,) = tmp_path.iterdir()
    assert leftover.name.startswith(".out.tmp-") and (leftover / "model.safetensors").is_file()
    with pytest.raises(CheckpointError, match="no vit2cbsa_config.json"):
        from_pretrained(leftover)


# --------------------------------------------------------------------------- strict loading


@pytest.fixture
def saved(tmp_path, monkeypatch):
    """A saved tiny timm model; ``Module.load_state_dict`` is spied on to prove nothing is loaded."""
    folder = save_pretrained(converted("timm_vit"), tmp_path / "out")
    calls = []
    real = torch.nn.Module.load_state_dict
    monkeypatch.setattr(torch.nn.Module, "load_state_dict", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    return folder, calls


def _rewrite_config(folder, change):
    config = json.loads((folder / CONFIG_NAME).read_text())
    change(config)
    (folder / CONFIG_NAME).write_text(json.dumps(config))


def _forge(folder, change):
    """Edit the config as an attacker would: also rewrite the binding inside the weights and every checksum,
    so that only the deeper checks (names, shapes, dtypes, what may be imported) stand in the way."""
    from safetensors import safe_open

    from vit2cbsa.hub.weights import BINDING_KEY, binding_of_config, canonical

    _rewrite_config(folder, change)
    _refresh_checksums(folder)
    config = json.loads((folder / CONFIG_NAME).read_text())
    for name in config["weights"]:
        with safe_open(str(folder / name), "pt") as f:
            metadata = dict(f.metadata() or {"format": "pt"})
        metadata[BINDING_KEY] = canonical(binding_of_config(config))
        save_file(load_file(str(folder / name)), str(folder / name), metadata=metadata)
    _refresh_checksums(folder)


def _refresh_checksums(folder):
    from vit2cbsa.hub.io import sha256

    def change(config):
        for name in config["files"]:
            config["files"][name] = {"size": (folder / name).stat().st_size, "sha256": sha256(folder / name)}
    _rewrite_config(folder, change)


def _corrupt_truncated(folder):
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])


def _corrupt_flipped_byte(folder):
    data = bytearray((folder / "model.safetensors").read_bytes())
    data[-100] ^= 0xFF
    (folder / "model.safetensors").write_bytes(bytes(data))


def _corrupt_header(folder):
    data = bytearray((folder / "model.safetensors").read_bytes())
    data[8:20] = b"not json!!!!"
    (folder / "model.safetensors").write_bytes(bytes(data))
    _refresh_checksums(folder)  # a file that was broken when it was saved


def _config_truncated(folder):
    text = (folder / CONFIG_NAME).read_text()
    (folder / CONFIG_NAME).write_text(text[: len(text) // 2])


def _other_architecture(folder):
    torch.manual_seed(0)
    other = vit2cbsa.convert(timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8,
                                               embed_dim=32, depth=1, num_heads=2, num_classes=7), "cbsa", 4)
    save_file(other.state_dict(), str(folder / "model.safetensors"))
    _forge(folder, lambda c: None)


def _float8_tensor(folder):
    state = load_file(str(folder / "model.safetensors"))
    state["head.weight"] = state["head.weight"].to(torch.float8_e4m3fn)
    save_file(state, str(folder / "model.safetensors"))
    _forge(folder, lambda c: None)


CORRUPTIONS = {
    "truncated_weights": (_corrupt_truncated, r"model\.safetensors is truncated"),
    "flipped_byte": (_corrupt_flipped_byte, r"corrupt or was modified .*sha256"),
    "bad_header": (_corrupt_header, r"not a readable safetensors file"),
    "missing_weights": (lambda f: (f / "model.safetensors").unlink(), r"incomplete: model\.safetensors is missing"),
    "missing_marker": (lambda f: (f / CONFIG_NAME).unlink(), r"no vit2cbsa_config\.json"),
    "truncated_config": (_config_truncated, r"not valid JSON"),
    "unknown_variant": (lambda f: _rewrite_config(f, lambda c: c["conversion"].update(variant="cbsa_v9")),
                        r"unknown attention variant 'cbsa_v9'"),
    "unknown_broadcast": (lambda f: _rewrite_config(f, lambda c: c["conversion"].update(broadcast="sideways")),
                          r"unknown broadcast 'sideways'"),
    "unknown_extra": (lambda f: _rewrite_config(f, lambda c: c["conversion"].update(extra_representatives="all")),
                      r"unknown extra_representatives 'all'"),
    "layers_out_of_range": (lambda f: _forge(f, lambda c: c["conversion"].update(converted_layers=[5])),
                            r"does not apply .*layer 5 does not exist"),
    "edited_broadcast": (lambda f: _rewrite_config(f, lambda c: c["conversion"].update(broadcast="key")),
                         r"does not match the weights it was saved with \(conversion\.broadcast is \"key\" in the "
                         r"config but \"query\" in the weights\); it was edited after saving"),
    "edited_grid": (lambda f: _rewrite_config(f, lambda c: c["conversion"].update(num_representatives=[1, 1])),
                    r"conversion\.num_representatives is \[1, 1\] in the config but \[2, 2\] in the weights"),
    "edited_model_kwargs": (lambda f: _rewrite_config(f, lambda c: c["base"]["model_kwargs"].update(global_pool="avg")),
                            r"base\.model_kwargs\.global_pool is \"avg\" in the config but \"token\""),
    "edited_dtype": (lambda f: _rewrite_config(f, lambda c: c.update(dtype="float64")),
                     r"dtype is \"float64\" in the config but \"float32\" in the weights"),
    "weights_without_binding": (lambda f: (save_file(load_file(str(f / "model.safetensors")), str(f / "model.safetensors")),
                                           _refresh_checksums(f)), r"has no vit2cbsa_binding in its metadata"),
    "dtype_nonsense": (lambda f: _forge(f, lambda c: c.update(dtype="nonsense")),
                       r"dtype 'nonsense' is not one of float16, bfloat16, float32, float64"),
    "dtype_float8": (lambda f: _forge(f, lambda c: c.update(dtype="float8_e4m3fn")), r"dtype 'float8_e4m3fn' is not one of"),
    "float8_tensor": (_float8_tensor, r"1 tensor\(s\) with an unsupported dtype: head\.weight \(saved F8_E4M3, "
                                      r"expected float16/bfloat16/float32/float64\)"),
    "unsafe_file_name": (lambda f: _rewrite_config(f, lambda c: c["files"].update({"../elsewhere": {"size": 1, "sha256": ""}})),
                         r"malformed: its file list must hold plain file names"),
    "newer_format": (lambda f: _rewrite_config(f, lambda c: c.update(format_version=99, library_version="9.0")),
                     r"format version 99 \(written by vit2cbsa 9\.0\); this vit2cbsa \(0\.1\.0\) reads format versions "
                     r"up to 3: upgrade vit2cbsa"),
    "foreign_class": (lambda f: _forge(f, lambda c: c["base"].update(architecture=None, **{"class": "os.system"})),
                      r"refusing to import 'os\.system'"),
    # resealed folders whose model_kwargs would make timm read a file or download: refused before timm sees them
    "forged_checkpoint_path": (lambda f: _forge(f, lambda c: c["base"]["model_kwargs"].update(checkpoint_path="/etc/x.pth")),
                               r"model_kwargs 'checkpoint_path' are not constructor arguments of timm's VisionTransformer"),
    "forged_pretrained": (lambda f: _forge(f, lambda c: c["base"]["model_kwargs"].update(
                              pretrained=True, pretrained_cfg_overlay={"file": "/etc/x.pth"}, cache_dir="/tmp/c")),
                          r"model_kwargs 'cache_dir', 'pretrained', 'pretrained_cfg_overlay' are not constructor"),
    "other_architecture": (_other_architecture,
                           r"do not match .*missing tensor\(s\): blocks\.1\..*wrong shape: head\.bias \(saved \(7,\), model \(5,\)\)"),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_broken_checkpoints_fail_clearly_and_load_nothing(saved, case):
    folder, load_calls = saved
    damage, message = CORRUPTIONS[case]
    damage(folder)
    with pytest.raises(CheckpointError, match=message):
        from_pretrained(folder)
    assert load_calls == []


def test_a_config_asking_for_a_huge_model_is_refused_before_anything_is_allocated(saved, monkeypatch):
    """embed_dim 8192 x depth 64 beside a tiny file (about 200 GB if built): refused from the header, and the
    architecture is only ever built on the meta device."""
    folder, load_calls = saved
    _forge(folder, lambda c: c["base"]["model_kwargs"].update(embed_dim=8192, depth=64, num_heads=64))
    import vit2cbsa.hub as hub

    devices = []
    real_build = hub.BaseModelSpec.build
    monkeypatch.setattr(hub.BaseModelSpec, "build", lambda self: devices.append(torch.empty(0).device.type) or real_build(self))
    with pytest.raises(CheckpointError, match=r"do not match .*wrong shape: .*\(saved \(32,\), model \(8192,\)\)"):
        from_pretrained(folder)
    assert devices == ["meta"] and load_calls == []


def test_each_tensor_keeps_its_saved_dtype(tmp_path):
    """A float32 model with a float16 head comes back mixed (it used to come back all float32), bit-identical."""
    model = converted("timm_vit")
    model.head.half()
    folder = save_pretrained(model, tmp_path / "out")
    loaded = from_pretrained(folder)
    assert loaded.head.weight.dtype == torch.float16 and loaded.blocks[0].attn.mixer.kappa.dtype == torch.float32
    for k, v in model.state_dict().items():
        assert loaded.state_dict()[k].dtype == v.dtype
        torch.testing.assert_close(loaded.state_dict()[k], v, rtol=0, atol=0)


def test_missing_folder_or_repo(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a local folder nor a Hugging Face Hub repo id"):
        from_pretrained(tmp_path / "does" / "not" / "exist")
    with pytest.raises(FileNotFoundError, match="cannot get 'user/missing' from the Hugging Face Hub"):
        from_pretrained("user/missing")


# --------------------------------------------------------------------------- transformers API after reloading


def test_reloaded_hf_model_works_with_transformers_api(tmp_path):
    from PIL import Image

    model = converted("hf_vit")
    processor = transformers.ViTImageProcessor(size={"height": 32, "width": 32})
    folder = save_pretrained(model, tmp_path / "out", image_processor=processor)
    assert (folder / "preprocessor_config.json").is_file()
    reloaded = from_pretrained(folder)
    assert isinstance(reloaded, transformers.ViTForImageClassification)

    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = reloaded(pixel_values=x, output_hidden_states=True)
    assert len(out.hidden_states) == 3 and out.hidden_states[-1].shape == (2, 17, 32)

    image_processor = transformers.AutoImageProcessor.from_pretrained(str(folder))
    image = Image.fromarray((torch.rand(40, 48, 3) * 255).to(torch.uint8).numpy())
    classify = transformers.pipeline("image-classification", model=reloaded, image_processor=image_processor)
    preds = classify(image, top_k=5)
    assert len(preds) == 5 and {p["label"] for p in preds} == {f"LABEL_{i}" for i in range(5)}
    pixels = image_processor(image, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        probs = model(pixel_values=pixels).logits.softmax(-1)[0]
    assert abs(preds[0]["score"] - probs.max().item()) < 1e-6


# --------------------------------------------------------------------------- push_to_hub


@pytest.fixture
def hub_calls(monkeypatch):
    """Record HfApi.create_repo / create_commit calls, with the bytes of every file committed."""
    from helpers import committed_files

    calls = {}

    def create_repo(self, repo_id, **kwargs):
        calls["create_repo"] = dict(repo_id=repo_id, token=self.token, **kwargs)
        return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

    def create_commit(self, **kwargs):
        calls["create_commit"] = kwargs
        calls["files"] = committed_files(kwargs["operations"])
        return "commit-info"

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "create_commit", create_commit)
    return calls


def _flops(model, size):
    with torch.no_grad(), flop_counter() as counter:
        model(torch.zeros(1, *size))
    return counter.get_total_flops()


def test_push_to_hub_uploads_folder_and_card(hub_calls):
    torch.manual_seed(0)
    base = FAMILIES["timm_vit"][0]().eval()
    flops_before = _flops(copy.deepcopy(base), (3, 32, 32))
    params_before = sum(p.numel() for p in base.parameters())
    model = vit2cbsa.convert(copy.deepcopy(base), "cbsa", 4)
    result = push_to_hub(model, "user/tiny-cbsa", metrics={"top1": 71.5, "top5": 90.25}, dataset="imagenet-1k",
                         license="apache-2.0", private=True, token="hf_fake", commit_message="hello")
    assert result == "commit-info"
    assert hub_calls["create_repo"] == dict(repo_id="user/tiny-cbsa", token="hf_fake", private=True, exist_ok=True,
                                            repo_type="model")
    up = hub_calls["create_commit"]
    assert up["repo_id"] == "user/tiny-cbsa" and up["repo_type"] == "model" and up["commit_message"] == "hello"
    assert up["create_pr"] is False and up["revision"] is None
    assert sorted(hub_calls["files"]) == ["README.md", "model.safetensors", CONFIG_NAME]

    card = huggingface_hub.ModelCard(hub_calls["files"]["README.md"].decode())
    meta = card.data.to_dict()
    assert meta["library_name"] == "vit2cbsa" and meta["license"] == "apache-2.0"
    assert meta["base_model"] == "timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k"
    assert meta["pipeline_tag"] == "image-classification"
    assert {"vit2cbsa", "cbsa", "timm"} <= set(meta["tags"])
    info = meta["vit2cbsa"]
    assert info["variant"] == "cbsa" and info["num_representatives"] == [2, 2] and info["converted_layers"] == [0, 1]
    assert info["input_size"] == [3, 32, 32]
    assert info["flops"] == {"before": flops_before, "after": _flops(copy.deepcopy(model), (3, 32, 32))}
    assert info["params"] == {"before": params_before, "after": sum(p.numel() for p in model.parameters())}
    results = meta["model-index"][0]["results"][0]
    assert results["dataset"]["name"] == "imagenet-1k"
    assert {m["type"]: m["value"] for m in results["metrics"]} == {"top1": 71.5, "top5": 90.25}
    text = card.text
    assert 'vit2cbsa.from_pretrained("user/tiny-cbsa")' in text
    assert "| top1 | 71.5 |" in text and "| FLOPs |" in text and "| Parameters |" in text
    assert "Towards Interpretable and Efficient Attention: Compressing All by Contracting a Few" in text
    assert "2509.16875" in text and "Wen, Qishuai and Huang, Zhiyuan and Li, Chun-Guang" in text


def test_the_card_template_ships_with_the_package():
    """The card is rendered from a template file: it must be package data of a wheel, not only in the checkout."""
    import fnmatch

    from vit2cbsa.hub.card import TEMPLATE

    tomllib = pytest.importorskip("tomllib")
    package = Path(vit2cbsa.__file__).parent
    if not (package.parent / "pyproject.toml").is_file():
        pytest.skip("an installed vit2cbsa: no pyproject.toml next to it")
    patterns = tomllib.loads((package.parent / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    relative = TEMPLATE.relative_to(package).as_posix()
    assert TEMPLATE.is_file() and any(fnmatch.fnmatch(relative, p) for p in patterns["vit2cbsa"])


def test_push_a_saved_folder(tmp_path, hub_calls):
    processor = transformers.BitImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    folder = save_pretrained(converted("hf_dinov2"), tmp_path / "out", image_processor=processor,
                             base_model="facebook/dinov2-small")
    copies = []
    real_copytree = shutil.copytree
    monkey = pytest.MonkeyPatch()
    monkey.setattr(shutil, "copytree", lambda *a, **k: copies.append(a) or real_copytree(*a, **k))
    try:
        push_to_hub(folder, "user/dino", create_pr=True, revision="main")
    finally:
        monkey.undo()
    assert copies == []  # uploaded where it is, not staged in a copy
    assert sorted(hub_calls["files"]) == sorted(os.listdir(folder) + ["README.md"])
    assert all(hub_calls["files"][name] == (folder / name).read_bytes() for name in os.listdir(folder))
    assert hub_calls["create_commit"]["create_pr"] is True and hub_calls["create_commit"]["revision"] == "main"
    meta = huggingface_hub.ModelCard(hub_calls["files"]["README.md"].decode()).data.to_dict()
    assert meta["base_model"] == "facebook/dinov2-small" and meta["pipeline_tag"] == "image-feature-extraction"
    assert "transformers" in meta["tags"] and "model-index" not in meta
    assert meta["vit2cbsa"]["flops"]["after"] > 0
    assert sorted(os.listdir(folder)) == sorted(hub_calls["files"].keys() - {"README.md"})  # folder untouched
