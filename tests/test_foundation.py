"""The foundation: pinned stack, torchvision fix, offline factory, local tasks."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch
from PIL import Image

from lmms_sgl import _tv_compat
from lmms_sgl.factory import build as factory
from lmms_sgl.local_tasks import data as local_tasks

REPO = Path(__file__).resolve().parent.parent


def test_stack_is_the_pinned_cpu_stack():
    import transformers

    assert torch.__version__.startswith("2.13.0")
    assert torch.version.cuda is None, "a CUDA torch was installed: a requirement admitted a newer torch"
    assert transformers.__version__ == "5.23.0"


def test_every_torch_family_requirement_is_pinned_exactly():
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    for name in ("torch", "torchvision", "transformers", "lmms-eval"):
        spec = next(d for d in deps if d.split("==")[0] == name)
        assert "==" in spec, f"{name} must be pinned exactly, got {spec!r}"


def test_plain_interpreter_imports_torchvision_and_image_utils():
    """A fresh interpreter (no import of ours) gets the fix from the installed .pth file."""
    code = "import torchvision, transformers.image_utils, sys; print(torchvision.__version__)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_fix_is_a_no_op_where_native_ops_load(monkeypatch):
    monkeypatch.delitem(sys.modules, "torchvision", raising=False)
    calls = []
    monkeypatch.setattr(torch.ops, "load_library", lambda path: calls.append(path))
    assert _tv_compat.ensure_torchvision_importable() == "native-ops"
    assert calls and calls[0].endswith("_C.so")


def test_plain_lmms_eval_cli_lists_our_tasks():
    exe = Path(sys.executable).with_name("lmms-eval")
    done = subprocess.run(
        [str(exe), "tasks", "list", "--include-path", str(REPO / "tasks")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    for task in ("sgl_smoke", "sgl_smoke_mc", "sgl_gqa_local", "sgl_shapes", "sgl_shapes_wide"):
        assert task in done.stdout, task


def _digest(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def test_factory_is_byte_identical_across_builds(tmp_path, models_dir):
    factory.build_all(tmp_path, ["internvl-guide", "llava-large"])
    for name in ("internvl-guide", "llava-large"):
        assert _digest(tmp_path / name) == _digest(models_dir / name)


def test_factory_rejects_unknown_spec(tmp_path):
    with pytest.raises(ValueError, match="unknown model spec"):
        factory.build_all(tmp_path, ["internvl-huge"])


IMAGE_SIZES = [
    (448, 448),
    (640, 480),
    (896, 448),
    (448, 1344),
    (300, 200),
    (1000, 1000),
    (1344, 448),
    (2000, 600),
]


@pytest.mark.parametrize("family", ["internvl", "llava", "llava-ov"])
def test_guide_and_large_share_the_visual_layout(models_dir, family):
    from transformers import AutoConfig, AutoProcessor

    counts = {}
    for role in ("guide", "large"):
        path = models_dir / f"{family}-{role}"
        processor = AutoProcessor.from_pretrained(path)
        image_token_id = AutoConfig.from_pretrained(path).image_token_id
        text = processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}],
            tokenize=False,
            add_generation_prompt=True,
        )
        counts[role] = [
            int(
                (
                    processor(images=[Image.new("RGB", size)], text=text, return_tensors="pt").input_ids
                    == image_token_id
                ).sum()
            )
            for size in IMAGE_SIZES
        ]
    assert counts["guide"] == counts["large"]
    if family == "internvl":
        tiles = {count // 256 for count in counts["guide"]}
        assert {1, 3, 7} <= tiles, f"dynamic tiling should give 1 and 3..7 tiles, got {sorted(tiles)}"
    elif family == "llava":
        assert set(counts["guide"]) == {256}
    else:
        assert len(set(counts["guide"])) >= 3, "any-resolution layouts should vary with the image"


@pytest.mark.parametrize("name", sorted(factory.SPECS))
def test_checkpoints_load_back_and_generate(models_dir, name):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(models_dir / name)
    model = AutoModelForImageTextToText.from_pretrained(models_dir / name, dtype=torch.float32).eval()
    spec = factory.SPECS[name]
    assert model.config.text_config.num_hidden_layers == spec.text.num_hidden_layers
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Color?"}]}],
        tokenize=False,
        add_generation_prompt=True,
    )
    inputs = processor(images=[Image.new("RGB", (500, 400), "red")], text=text, return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == inputs.input_ids.shape[1] + 3 or out[0, -1] == processor.tokenizer.eos_token_id


def test_shipped_task_data_matches_the_generator(tasks_dir):
    import datasets

    shipped = datasets.load_dataset(str(tasks_dir / "sgl_smoke" / "data"), split="test")
    fresh = local_tasks.smoke_records()
    assert len(shipped) == len(fresh) >= 24
    for row, record in zip(shipped, fresh, strict=True):
        assert row["question"] == record["question"] and row["answer"] == record["answer"]
        assert row["image"].convert("RGB").tobytes() == record["image"].tobytes()
