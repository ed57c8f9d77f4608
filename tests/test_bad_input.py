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
    from lmms_sgl.lmms.args import split_model_args

    assert split_model_args('a=1,b={"x": 1, "y": [2, 3]},c="p,q"') == [
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


def corrupt_copy(source, target, name_part: str):
    """A copy of a factory checkpoint with NaN written into the data of its tensors whose names
    contain ``name_part`` (header and sizes intact, as a damaged download)."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(source, target)
    weights = load_file(str(target / "model.safetensors"))
    hit = [name for name in weights if name_part in name]
    for name in hit:
        weights[name] = torch.full_like(weights[name], float("nan"))
    save_file(weights, str(target / "model.safetensors"), metadata={"format": "pt"})
    return hit


def test_non_finite_weights_are_named_when_the_checkpoint_loads(models_dir, tmp_path):
    from lmms_sgl.checkpoints.integrity import CorruptCheckpointError

    hit = corrupt_copy(models_dir / "llava-large", tmp_path / "broken", "vision_tower")
    assert hit
    with pytest.raises(
        CorruptCheckpointError, match=rf"pretrained=.*broken.*: {len(hit)} weight tensor\(s\) hold NaN"
    ):
        LlavaFamily().load(
            str(tmp_path / "broken"), dtype=torch.float32, device_map="cpu", text_attention="sdpa"
        )


def test_non_finite_scores_make_a_counted_failure_for_that_sample_only(models_dir):
    """NaN in one sample's hidden states (as corrupt inputs or weights would give): that sample is a
    failure with the reason, its batch neighbour answers as alone."""
    large = LlavaFamily().load(
        str(models_dir / "llava-large"), dtype=torch.float32, device_map="cpu", text_attention="sdpa"
    )
    gen = GenerationSettings.from_gen_kwargs({"max_new_tokens": 3})
    samples = [
        Sample("t", i, Prompt("Color?", [Image.new("RGB", (64, 64), c)]))
        for i, c in enumerate(("red", "blue"))
    ]
    pipeline = SGLPipeline(large, None, SGLSettings(method="large_only"))
    alone = pipeline.generate(samples[:1], gen)[0]

    def poison(module, args, output):
        output = output.clone()
        output[1] = float("nan")
        return output

    handle = large.model.lm_head.register_forward_hook(poison)
    try:
        records = pipeline.generate(samples, gen)
    finally:
        handle.remove()
    assert records[0].answer == alone.answer and not records[0].extra.get("failed")
    assert records[1].extra.get("failed") and records[1].answer == ""
    assert "next-token scores are not finite (NaN or inf) from answer token 1" in records[1].fallback


def test_an_unwritable_output_path_is_refused_before_loading(tmp_path, monkeypatch):
    """A read-only file system (here /proc, read-only even for root): refused with the path; a
    writable one is created and left alone."""
    from lmms_sgl.lmms.output_check import check_output_path

    with pytest.raises(ValueError, match=r"--output_path='/proc/lmms-sgl-results' cannot be written"):
        check_output_path(["lmms-eval", "--output_path", "/proc/lmms-sgl-results"])
    check_output_path(["lmms-eval", f"--output_path={tmp_path / 'new' / 'results'}"])
    assert (tmp_path / "new" / "results").is_dir() and not list((tmp_path / "new" / "results").iterdir())
    check_output_path(["lmms-eval", "--model", "x"])  # no output path: nothing to check

    from lmms_sgl.families.base import HFVisionLanguageFamily
    from lmms_sgl.lmms.sgl_llava import SGLLlava

    monkeypatch.setattr(HFVisionLanguageFamily, "load", no_loading)
    monkeypatch.setattr("sys.argv", ["lmms-eval", "--output_path", "/proc/lmms-sgl-results"])
    with pytest.raises(ValueError, match=r"cannot be written"):
        SGLLlava(pretrained="anything", method="large_only")


def test_a_folder_without_tokenizer_files_is_named_before_loading(models_dir, tmp_path):
    import shutil

    from lmms_sgl.checkpoints.integrity import CheckpointError

    shutil.copytree(models_dir / "llava-large", tmp_path / "no-tokenizer")
    (tmp_path / "no-tokenizer" / "tokenizer.json").unlink()
    with pytest.raises(
        CheckpointError, match=r"guide=.*no-tokenizer.* has no tokenizer files \(none of tokenizer.json"
    ):
        LlavaFamily().check_checkpoint(str(tmp_path / "no-tokenizer"), "guide")
    LlavaFamily().check_checkpoint(str(models_dir / "llava-large"), "guide")  # complete: accepted


def test_a_multiple_choice_task_on_the_chat_interface_asks_for_force_simple_before_loading(
    tasks_dir, monkeypatch
):
    from lmms_sgl.families.base import HFVisionLanguageFamily
    from lmms_sgl.lmms.sgl_llava import SGLLlavaChat
    from lmms_sgl.lmms.task_kinds import check_chat_tasks

    argv = [
        "lmms-eval",
        "--model",
        "sgl_llava",
        "--tasks",
        "sgl_smoke,sgl_smoke_mc",
        "--include_path",
        str(tasks_dir),
    ]
    with pytest.raises(ValueError, match=r"\['sgl_smoke_mc'\] are multiple-choice .* add --force_simple"):
        check_chat_tasks(argv)
    check_chat_tasks([*argv, "--force_simple"])  # the simple interface takes it
    check_chat_tasks(["lmms-eval", "--tasks", "sgl_smoke", "--include_path", str(tasks_dir)])  # generation
    monkeypatch.setattr(HFVisionLanguageFamily, "load", no_loading)
    monkeypatch.setattr("sys.argv", argv)
    with pytest.raises(ValueError, match=r"add --force_simple"):
        SGLLlavaChat(pretrained="anything", method="large_only")
