"""Bad input that used to pass without a word or fail with a message that did not help: a model
argument given twice, a layout argument of another family, an empty image."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from lmms_sgl.families import LlavaFamily, Prompt
from lmms_sgl.method.settings import SGLSettings
from lmms_sgl.pipeline import GenerationSettings, Sample, SGLPipeline


def no_loading(*args, **kwargs):
    raise AssertionError("weights were loaded")


@pytest.mark.parametrize(
    "arg_string,message",
    [
        ("pretrained=big,method=sgl,keep_ratio=0.2,keep_ratio=0.5", r"'keep_ratio' is given twice"),
        ("pretrained=big,guide=small,pretrained=small", r"'pretrained' is given twice \(pretrained=big"),
    ],
)
def test_an_argument_given_twice_is_refused_before_loading(monkeypatch, arg_string, message):
    """lmms-eval's own parser keeps the last value; the plugin names both."""
    from lmms_sgl.families.base import HFVisionLanguageFamily
    from lmms_sgl.lmms.sgl_llava import SGLLlavaChat

    monkeypatch.setattr(HFVisionLanguageFamily, "load", no_loading)
    with pytest.raises(ValueError, match=message):
        SGLLlavaChat.create_from_arg_string(arg_string)


def test_the_argument_split_keeps_json_values_whole():
    from lmms_sgl.lmms.args import top_level_items

    assert top_level_items('a=1,b={"x": 1, "y": [2, 3]},c="p,q"') == [
        "a=1",
        'b={"x": 1, "y": [2, 3]}',
        'c="p,q"',
    ]


def test_max_tiles_on_a_family_without_tiles_is_refused_before_loading(models_dir, monkeypatch):
    from lmms_sgl.families.base import HFVisionLanguageFamily
    from lmms_sgl.lmms.sgl_llava import SGLLlava

    monkeypatch.setattr(HFVisionLanguageFamily, "load", no_loading)
    with pytest.raises(
        ValueError, match=r"max_tiles=4 sets InternVL's dynamic tiling; SGLLlava does not take"
    ):
        SGLLlava(pretrained=str(models_dir / "llava-large"), method="large_only", max_tiles=4)


def test_an_empty_image_is_a_counted_failure_that_names_it(models_dir):
    large = LlavaFamily().load(
        str(models_dir / "llava-large"), dtype=torch.float32, device_map="cpu", text_attention="sdpa"
    )
    gen = GenerationSettings.from_gen_kwargs({"max_new_tokens": 3})
    good = Sample("t", 0, Prompt("Color?", [Image.new("RGB", (64, 64), "red")]))
    empty = Sample("t", 1, Prompt("Color?", [Image.new("RGB", (0, 0))]))
    records = SGLPipeline(large, None, SGLSettings(method="large_only")).generate([good, empty], gen)
    assert records[0].answer and not records[0].extra.get("failed")
    assert (
        records[1].extra.get("failed")
        and "image 0 of the batch is empty (0 x 0 pixels)" in records[1].fallback
    )
