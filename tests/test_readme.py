"""Every ```python block of README.md runs as written (offline).

Each block is executed on its own, in a fresh namespace and an empty working folder, exactly as a
user would paste it. Only the network is replaced, by these explicit stand-ins:

* ``timm.create_model(name, pretrained=True, **kw)`` builds ``name`` with ``pretrained=False`` and
  a narrow width (``STAND_IN_TIMM``: same depth, patch size and image size), i.e. random weights;
* ``transformers.AutoModelForImageClassification.from_pretrained(repo_id)`` of a Hub id in
  ``HF_STAND_INS`` reads a tiny random-weight model saved in a temporary folder instead;
* ``huggingface_hub.HfApi.create_repo`` / ``create_commit`` record the upload instead of sending it.

Anything else that would reach the network fails (``HF_HUB_OFFLINE=1``), so a block cannot pass by
downloading. A block that cannot run offline at all is marked in the README with
``<!-- readme-test: skip (reason) -->`` on the line(s) just before its fence; at most
``MAX_SKIPS`` blocks may be marked.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"
MAX_SKIPS = 1
#: what ``pretrained=True`` becomes: the same architecture, narrower (random weights)
STAND_IN_TIMM = dict(embed_dim=32, num_heads=2)
#: Hub ids of transformers models the README loads, and the tiny config that stands in for each
HF_STAND_INS = {
    "google/vit-base-patch16-224": dict(model_type="vit", image_size=224, patch_size=16, num_labels=10),
}

_FENCE_OPEN = re.compile(r"^```\s*(python3?|py)\s*$")
_FENCE_CLOSE = re.compile(r"^```\s*$")
_SKIP = re.compile(r"^<!--\s*readme-test:\s*skip\b\s*(.*?)\s*-->$")


@dataclass
class Block:
    line: int  # 1-based line of the opening fence
    code: str
    skip: Optional[str] = None  # the reason given in the skip marker, or None


def python_blocks(text: str) -> List[Block]:
    """The fenced Python blocks of a Markdown text, with the skip marker just above each (if any)."""
    lines = text.splitlines()
    blocks, i = [], 0
    while i < len(lines):
        if not _FENCE_OPEN.match(lines[i].strip()):
            i += 1
            continue
        start = i
        j = start + 1
        while j < len(lines) and not _FENCE_CLOSE.match(lines[j].strip()):
            j += 1
        if j == len(lines):
            raise ValueError(f"README.md:{start + 1}: unterminated ```python block")
        skip, k = None, start - 1
        while k >= 0 and not lines[k].strip():
            k -= 1
        if k >= 0:
            m = _SKIP.match(lines[k].strip())
            if m:
                skip = m.group(1).strip("() ") or "no reason given"
        blocks.append(Block(start + 1, "\n".join(lines[start + 1:j]) + "\n", skip))
        i = j + 1
    return blocks


BLOCKS = python_blocks(README.read_text(encoding="utf-8"))


# --------------------------------------------------------------------------- stand-ins for the network


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """Install the stand-ins, run in an empty folder; returns what they recorded."""
    import huggingface_hub
    import huggingface_hub.constants
    import timm
    import transformers

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    record = {"timm": [], "hf": [], "create_repo": [], "create_commit": []}

    real_create_model = timm.create_model

    def create_model(name, pretrained=False, **kwargs):
        if pretrained:
            record["timm"].append(name)
            kwargs = {**kwargs, **STAND_IN_TIMM}
        return real_create_model(name, pretrained=False, **kwargs)

    monkeypatch.setattr(timm, "create_model", create_model)

    hub_dir = tmp_path / "hub"
    real_auto_from_pretrained = transformers.AutoModelForImageClassification.from_pretrained

    def auto_from_pretrained(name, *args, **kwargs):
        if name in HF_STAND_INS:
            record["hf"].append(name)
            folder = hub_dir / name
            if not folder.is_dir():
                spec = dict(HF_STAND_INS[name])
                config = transformers.AutoConfig.for_model(
                    spec.pop("model_type"), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                    intermediate_size=64, **spec)
                torch.manual_seed(0)
                transformers.AutoModelForImageClassification.from_config(config).save_pretrained(folder)
            name = str(folder)
        return real_auto_from_pretrained(name, *args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForImageClassification, "from_pretrained", auto_from_pretrained)
    real_processor_from_pretrained = transformers.AutoImageProcessor.from_pretrained

    def processor_from_pretrained(name, *args, **kwargs):
        if name in HF_STAND_INS:  # the stand-in model's processor: its image size, default normalisation
            record["hf"].append(name)
            size = HF_STAND_INS[name]["image_size"]
            return transformers.ViTImageProcessor(size={"height": size, "width": size})
        return real_processor_from_pretrained(name, *args, **kwargs)

    monkeypatch.setattr(transformers.AutoImageProcessor, "from_pretrained", processor_from_pretrained)

    def create_repo(self, repo_id, **kwargs):
        record["create_repo"].append(repo_id)
        return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

    def create_commit(self, **kwargs):
        names = sorted(op.path_in_repo for op in kwargs["operations"])
        record["create_commit"].append({"repo_id": kwargs["repo_id"], "files": names})
        return "commit-info"

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "create_commit", create_commit)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return record


def run_block(block: Block) -> dict:
    """Execute one block in a fresh namespace, as a script; returns its namespace."""
    namespace = {"__name__": "__main__"}
    exec(compile(block.code, f"{README.name}:{block.line}", "exec"), namespace)
    return namespace


# --------------------------------------------------------------------------- the tests


def test_readme_python_blocks_are_found_and_few_are_skipped():
    assert len(BLOCKS) >= 4, f"found only {len(BLOCKS)} ```python blocks in README.md"
    skipped = [(b.line, b.skip) for b in BLOCKS if b.skip]
    assert len(skipped) <= MAX_SKIPS, f"too many README blocks marked readme-test: skip: {skipped}"


@pytest.mark.parametrize("block", BLOCKS, ids=[f"README.md:{b.line}" for b in BLOCKS])
def test_readme_block_runs(block, offline):
    import vit2cbsa

    if block.skip:
        pytest.skip(f"marked in README.md: {block.skip}")
    ns = run_block(block)
    # the stand-ins were used where the block asks for pretrained weights (not silently bypassed)
    if "pretrained=True" in block.code:
        assert offline["timm"], "pretrained=True in the block, but the timm stand-in was not called"
    for name in HF_STAND_INS:
        if f'"{name}"' in block.code:
            assert name in offline["hf"]
    # what the block leaves behind: converted models and finite outputs
    model = ns.get("model")
    if model is not None:
        assert vit2cbsa.is_converted(model), "README block ends with an unconverted `model`"
    for key, value in ns.items():
        value = getattr(value, "logits", value)
        if torch.is_tensor(value) and value.is_floating_point():
            assert torch.isfinite(value).all(), f"`{key}` is not finite"
    if "vit2cbsa.push_to_hub(" in block.code:
        assert offline["create_repo"] and offline["create_commit"], "push_to_hub uploaded nothing"
        files = offline["create_commit"][-1]["files"]
        assert {"README.md", "model.safetensors", "vit2cbsa_config.json"} <= set(files)
    if "pipeline(" in block.code and "preds" in ns:
        assert len(ns["preds"]) == 3 and all(0 <= p["score"] <= 1 for p in ns["preds"])
        assert vit2cbsa.is_converted(ns["classify"].model), "the pipeline runs the original softmax model"
    if "vit2cbsa.save_pretrained(model, " in block.code:
        folder = re.search(r'save_pretrained\(model, "([^"]+)"', block.code).group(1)
        assert (Path(folder) / "vit2cbsa_config.json").is_file()


def test_readme_timm_block_runs_at_any_resolution(offline):
    """The timm block's claim: the converted model takes 512x768 inputs (32x48 patches)."""
    block = next(b for b in BLOCKS if "layers=slice(6, None)" in b.code)
    ns = run_block(block)
    model, logits = ns["model"], ns["logits"]
    assert logits.shape == (1, 1000)
    assert model.vit2cbsa_info.converted_indices == list(range(6, 12))
    import vit2cbsa

    assert vit2cbsa.layout_of(model).grid == (32, 48)


def test_a_wrong_block_fails(offline):
    """The runner reports errors: the README's former HF snippet (undefined ``x``) fails."""
    old = python_blocks('''
```python
from transformers import AutoModelForImageClassification
import vit2cbsa
model = AutoModelForImageClassification.from_pretrained("google/vit-base-patch16-224")
vit2cbsa.convert(model, "contraction_free")
out = model(pixel_values=x, interpolate_pos_encoding=True)
```
''')
    assert len(old) == 1 and old[0].skip is None
    with pytest.raises(NameError, match="'x' is not defined"):
        run_block(old[0])


def test_block_extraction_and_skip_markers():
    text = "\n".join([
        "intro", "```python", "a = 1", "```",
        "<!-- readme-test: skip (needs network) -->", "", "```python", "b = 2", "```",
        "```bash", "echo not python", "```",
        "```py", "c = 3", "", "d = 4", "```",
    ])
    blocks = python_blocks(text)
    assert [(b.line, b.code, b.skip) for b in blocks] == [
        (2, "a = 1\n", None), (7, "b = 2\n", "needs network"), (13, "c = 3\n\nd = 4\n", None)]
    with pytest.raises(ValueError, match="unterminated"):
        python_blocks("```python\nx = 1\n")
