"""Model arguments: coerced from lmms-eval's strings, validated before any weights load."""

from __future__ import annotations

import pytest

from lmms_sgl.lmms.args import parse_model_args
from lmms_sgl.lmms.registry import strip_wandb_flags


def test_defaults_and_coercion():
    args = parse_model_args(
        pretrained="big", guide="small", exit_threshold="none", batch_size="4", max_tiles=6.0
    )
    assert args.settings.method == "sgl" and args.settings.exit_threshold is None
    assert (args.settings.prune_layer, args.settings.keep_ratio) == (0.2, 0.2)
    assert args.batch_size == 4 and args.max_tiles == 6 and args.dtype == "auto"


def test_token_ratio_preset():
    args = parse_model_args(pretrained="big", guide="small", token_ratio=0.09, exit_threshold=0.8)
    assert (args.settings.prune_layer, args.settings.keep_ratio, args.settings.exit_threshold) == (
        0.05,
        0.05,
        0.8,
    )


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (
            {"guide": "s", "colour": "red"},
            r"unknown model argument\(s\) \['colour'\]; allowed: .*'keep_ratio'",
        ),
        ({}, r"pretrained=<large model path or hub id> is required"),
        ({"method": "sgl"}, r"method='sgl' needs guide="),
        ({"guide": "s", "method": "turbo"}, r"method='turbo' is not one of"),
        ({"guide": "s", "keep_ratio": 2}, r"keep_ratio=2.0 is outside the allowed range \(0, 1\]"),
        ({"guide": "s", "prune_layer": "x"}, r"prune_layer='x' must be a number"),
        ({"guide": "s", "exit_threshold": "often"}, r"exit_threshold='often' must be a number or 'none'"),
        (
            {"guide": "s", "token_ratio": 0.35, "keep_ratio": 0.5},
            r"give either token_ratio or prune_layer/keep_ratio",
        ),
        ({"guide": "s", "token_ratio": 0.5}, r"token_ratio=0.5 is not a preset"),
        ({"guide": "s", "dtype": "fp8"}, r"dtype='fp8' is not one of"),
        (
            {"guide": "s", "attn_implementation": "flash_attention_2"},
            r"attn_implementation='flash_attention_2'",
        ),
        ({"guide": "s", "max_tiles": 0}, r"max_tiles=0 must be >= 1"),
        (
            {"guide": "s", "batch_size": "auto:4"},
            r"batch_size='auto:4': automatic batch sizes are not supported",
        ),
    ],
)
def test_bad_arguments_name_value_and_allowed(kwargs, message):
    if "pretrained" not in kwargs and kwargs != {}:
        kwargs = {"pretrained": "big", **kwargs}
    with pytest.raises(ValueError, match=message):
        parse_model_args(**kwargs)


def test_wandb_flags_are_stripped_on_other_ranks():
    argv = [
        "lmms-eval",
        "--model",
        "m",
        "--wandb_args",
        "project=x",
        "--wandb_log_samples",
        "--wandb_args=a=b",
        "-x",
    ]
    assert strip_wandb_flags(argv) == ["lmms-eval", "--model", "m", "-x"]


def test_models_resolve_through_the_entry_point():
    from lmms_eval.models import MODEL_REGISTRY_V2, get_model

    for name, simple in (("sgl_internvl2", "SGLInternVL2"), ("sgl_llava", "SGLLlava")):
        assert MODEL_REGISTRY_V2.resolve(name).model_type == "chat"  # what a plain --model gets
        assert get_model(name).__name__ == f"{simple}Chat" and not get_model(name).is_simple
        assert MODEL_REGISTRY_V2.resolve(name, force_simple=True).model_type == "simple"
        assert get_model(name, force_simple=True).__name__ == simple


@pytest.mark.parametrize("extra", [{"prune_layer": 0.2}, {"keep_ratio": 0.3}, {}])
def test_token_ratio_that_is_no_preset_names_the_presets_and_the_alternative(extra):
    """0.5 is not "a preset" whatever else is given: the message names the presets, their settings
    and how to get another ratio."""
    with pytest.raises(ValueError) as refused:
        parse_model_args(pretrained="big", guide="small", token_ratio=0.5, **extra)
    message = str(refused.value)
    assert message.startswith("token_ratio=0.5 is not a preset; allowed: [0.09, 0.35, 0.64]")
    assert "0.35 (prune_layer=0.2, keep_ratio=0.2)" in message
    assert "give prune_layer and keep_ratio instead of token_ratio" in message
    assert "is a preset" not in message


def test_token_ratio_preset_with_its_own_knobs_says_what_the_preset_sets():
    with pytest.raises(
        ValueError, match=r"token_ratio=0.35 is the paper preset prune_layer=0.2, keep_ratio=0.2; "
    ):
        parse_model_args(pretrained="big", guide="small", token_ratio=0.35, prune_layer=0.2)
