"""``sgl_internvl2`` on original-layout InternVL checkpoints (the paper's own models), end to end
through lmms-eval's evaluator: the large model through the conversion cache, the guide converted
with the ``lmms-sgl-convert`` command; a second run reuses the cache."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from lmms_sgl.checkpoints.internvl_original.config import OriginalCheckpointError
from lmms_sgl.factory.original import build_original_pair
from lmms_sgl.families import InternVLFamily
from tests.helpers import evaluate, raw_response


@pytest.mark.slow
def test_sgl_internvl2_serves_original_checkpoints(tmp_path, tasks_dir, monkeypatch):
    pair = build_original_pair(tmp_path / "originals")
    monkeypatch.setenv("LMMS_SGL_CACHE", str(tmp_path / "cache"))
    guide = tmp_path / "guide-converted"
    convert = Path(sys.executable).with_name("lmms-sgl-convert")
    subprocess.run(
        [str(convert), str(pair["guide"]), str(guide)], check=True, capture_output=True, timeout=300
    )

    from lmms_sgl.checkpoints.internvl_original import convert as convert_module

    conversions = []
    convert_checkpoint = convert_module.convert_checkpoint

    def counted(*args, **kwargs):
        conversions.append(args[0])
        return convert_checkpoint(*args, **kwargs)

    monkeypatch.setattr(convert_module, "convert_checkpoint", counted)
    args = f"pretrained={pair['large']},guide={guide},prune_layer=0.5,keep_ratio=0.2"
    results = evaluate("sgl_internvl2", args, "sgl_smoke", tasks_dir, 3)
    assert conversions == [pair["large"]], "the large model converts on first use, the guide is converted"
    assert "exact_match,none" in results["results"]["sgl_smoke"]
    rows = results["samples"]["sgl_smoke"]
    assert len(rows) == 3
    for row in rows:
        record = row["token_counts"][0]["sgl"]
        assert record["fallback"] is None and record["reached_large"], record
        assert raw_response(row) == record["answer"] and record["answer"].strip()
        # 256 tokens per tile, at most 6 tiles plus the thumbnail by default for original checkpoints
        assert record["total_visual"] % 256 == 0 and record["total_visual"] <= 7 * 256
        assert record["kept_visual"] == max(1, int(record["total_visual"] * 0.2))

    evaluate("sgl_internvl2", args, "sgl_smoke", tasks_dir, 1)
    assert len(conversions) == 1, "a second run reuses the converted cache"


def test_original_checkpoints_default_to_six_tiles_and_fail_fast(tmp_path):
    pair = build_original_pair(tmp_path / "originals")
    family = InternVLFamily()
    assert family.check_checkpoint(str(pair["large"]), "pretrained") == 4  # the large spec's layers
    assert family.tiles == 6
    assert InternVLFamily(max_tiles=3).tiles == 3
    shard = sorted(pair["large"].glob("*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(ValueError, match=rf"pretrained=.*{shard.name}.*truncated"):
        family.check_checkpoint(str(pair["large"]), "pretrained")
    config = pair["guide"] / "config.json"
    config.write_text(config.read_text().replace('"template"', '"templat"'))
    with pytest.raises(OriginalCheckpointError, match="template"):
        family.check_checkpoint(str(pair["guide"]), "guide")


def add_lora_tensor(folder: Path) -> str:
    """Put an unmerged LoRA tensor into the checkpoint's first shard (listed in its index)."""
    import json

    import torch
    from safetensors.torch import load_file, save_file

    shard = sorted(folder.glob("*.safetensors"))[0]
    name = "language_model.model.layers.0.attention.wqkv.lora_A.weight"
    tensors = load_file(str(shard))
    tensors[name] = torch.zeros(4, 8)
    save_file(tensors, str(shard), metadata={"format": "pt"})
    index = folder / "model.safetensors.index.json"
    if index.exists():
        data = json.loads(index.read_text())
        data["weight_map"][name] = shard.name
        index.write_text(json.dumps(data))
    return name


def widen_intermediate_size(folder: Path) -> str:
    """Make ``config.json`` disagree with the weights (the MLP tensors keep their shapes)."""
    import json

    config = json.loads((folder / "config.json").read_text())
    config["llm_config"]["intermediate_size"] += 8
    (folder / "config.json").write_text(json.dumps(config))
    return "disagree with config.json"


@pytest.mark.parametrize(
    ("defect", "message"), [(add_lora_tensor, "lora_A.*merge it"), (widen_intermediate_size, None)]
)
def test_bad_original_guide_is_refused_before_either_model_loads(tmp_path, monkeypatch, defect, message):
    """The guide's weights are checked against its config (and for unmerged LoRA) together with the
    large model's, from headers alone, before any weights load; the error names guide= and the folder."""
    import re

    from lmms_sgl.lmms.sgl_internvl2 import SGLInternVL2

    pair = build_original_pair(tmp_path / "originals")
    monkeypatch.setenv("LMMS_SGL_CACHE", str(tmp_path / "cache"))
    found = defect(pair["guide"])
    message = message or found

    def loaded(*args, **kwargs):
        raise AssertionError("a model loaded before the guide checkpoint was checked")

    monkeypatch.setattr(InternVLFamily, "load", loaded)
    with pytest.raises(
        OriginalCheckpointError, match=rf"guide={re.escape(repr(str(pair['guide'])))}.*{message}"
    ):
        SGLInternVL2(pretrained=str(pair["large"]), guide=str(pair["guide"]), prune_layer=0.5, keep_ratio=0.2)
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("*.safetensors"))
