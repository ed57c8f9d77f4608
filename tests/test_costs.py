"""lmms-sgl-cost: its numbers against torch's flop counter on tiny checkpoints of every layout, the
real-pair table of docs/cost.md regenerated from the bundled configs, and its refusals of bad arguments."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from lmms_sgl.costs.cli import main
from lmms_sgl.costs.layout import grid_crops, qwen_grid
from lmms_sgl.costs.real_pairs import real_pairs_table
from lmms_sgl.costs.sources import read_checkpoint

COST_PAGE = Path(__file__).resolve().parent.parent / "docs" / "cost.md"
PROMPT, ANSWER = 9, 3


@pytest.fixture(scope="module")
def original_large(tmp_path_factory) -> tuple[Path, Path]:
    """An original-layout InternVL2 checkpoint (what the command reads) and its conversion (what runs)."""
    from lmms_sgl.checkpoints.internvl_original.convert import convert_checkpoint
    from lmms_sgl.factory.original import SPECS, build_original

    out = tmp_path_factory.mktemp("cost_original")
    source = build_original(SPECS["internvl2-orig-large"], out)
    return source, convert_checkpoint(source, out / "converted", progress=False)


def run_cost(tmp_path: Path, argv: list[str], prompt: int = PROMPT, answer: int = ANSWER) -> list[dict]:
    target = tmp_path / "cost.json"
    request = ["--prompt-tokens", str(prompt), "--answer-tokens", str(answer)]
    assert main([*argv, *request, "--json", str(target)]) == 0
    return json.loads(target.read_text())["rows"]


def image_inputs(config, family: str, layout: list[str]) -> tuple[dict, int]:
    """Model inputs for one image of the layout the command was given, and its visual-token count."""
    generator = torch.Generator().manual_seed(0)
    if family == "internvl":
        tiles = int(layout[1])
        units = tiles + (tiles > 1)
        size = (
            config.vision_config.image_size[0] if isinstance(config.vision_config.image_size, list) else 448
        )
        pixels = {"pixel_values": torch.randn(units, 3, size, size, generator=generator)}
        return pixels, units * config.image_seq_length
    if family == "llava":
        size = config.vision_config.image_size
        if config.model_type == "llava":
            side = size // config.vision_config.patch_size
            return {"pixel_values": torch.randn(1, 3, size, size, generator=generator)}, side * side + int(
                config.vision_feature_select_strategy == "full"
            )
        columns, rows = (int(x) for x in layout[1].split("x"))
        pixels = torch.randn(1, columns * rows + 1, 3, size, size, generator=generator)
        return {"pixel_values": pixels, "image_sizes": torch.tensor([[rows * size, columns * size]])}, None
    width, height = (int(x) for x in layout[1].split("x"))
    grid = qwen_grid(config, width, height, 56 * 56, 28 * 28 * 1280)
    vision = config.vision_config
    channels = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
    patches = grid[0] * grid[1] * grid[2]
    pixels = {"pixel_values": torch.randn(patches, channels, generator=generator)}
    pixels["image_grid_thw"] = torch.tensor([grid])
    return pixels, patches // vision.spatial_merge_size**2


def prompt_ids(config, visual: int) -> torch.Tensor:
    """``PROMPT`` text tokens around ``visual`` image tokens (Qwen-VL: a vision-start token first)."""
    special = {config.image_token_id}
    start = getattr(config, "vision_start_token_id", None)
    text = [t for t in range(5, 200) if t not in special and t != start][:PROMPT]
    before = text[:2] + ([] if start is None else [start])
    after = text[len(before) :] if start is None else text[2 : PROMPT - 1]
    return torch.tensor([before + [config.image_token_id] * visual + after])


LAYOUTS = [
    ("internvl-large", "internvl-guide", ["--tiles", "2"]),
    ("internvl-large", "internvl-guide", ["--tiles", "1"]),
    ("llava-large", "llava-guide", []),
    ("llava-ov-large", "llava-ov-guide", ["--crops", "WIDEST"]),
    ("qwen2-vl-large", "qwen2-vl-guide", ["--image-size", "120x90"]),
    ("qwen2.5-vl-large", "qwen2.5-vl-guide", ["--image-size", "150x100"]),
    ("qwen3-vl-large", "qwen3-vl-guide", ["--image-size", "120x90"]),
    ("ORIGINAL", "ORIGINAL", ["--tiles", "2"]),
]


@pytest.mark.parametrize("large,guide,layout", LAYOUTS, ids=[f"{a}-{' '.join(c)}" for a, _, c in LAYOUTS])
def test_large_alone_equals_flop_counter(models_dir, original_large, tmp_path, large, guide, layout):
    """Vision tower + projector + prefill + decode of the large model alone: the command's total equals
    what torch counts while the model generates ``ANSWER`` tokens (eager attention everywhere)."""
    from transformers import AutoModelForImageTextToText

    if large == "ORIGINAL":
        source, runnable = str(original_large[0]), original_large[1]
        guide_source = source
    else:
        source, runnable, guide_source = str(models_dir / large), models_dir / large, str(models_dir / guide)
    config = read_checkpoint(source, "--large").config
    if layout[1:] == ["WIDEST"]:
        columns, rows = max(grid_crops(config), key=lambda grid: (grid[0] * grid[1], grid))
        layout = [layout[0], f"{columns}x{rows}"]
    rows_out = run_cost(tmp_path, ["--guide", guide_source, "--large", source, *layout])
    alone = rows_out[0]
    assert alone["method"] == "large only"

    model = AutoModelForImageTextToText.from_pretrained(runnable, dtype=torch.float32).eval()
    model.set_attn_implementation("eager")  # CPU SDPA is invisible to the flop counter
    family = read_checkpoint(source, "--large").family
    pixels, visual = image_inputs(model.config, family, layout)
    if visual is None:  # any-resolution: the command's own count, which the model checks against its features
        visual = _visual_tokens(source, layout)
    ids = prompt_ids(model.config, visual)
    assert ids.shape[1] == PROMPT + visual
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            **pixels,
            max_new_tokens=ANSWER,
            min_new_tokens=ANSWER,
            do_sample=False,
        )
    assert alone["total_flops"] / counter.get_total_flops() == pytest.approx(1.0, abs=1e-9)


def _visual_tokens(source: str, layout: list[str]) -> int:
    from lmms_sgl.costs.layout import llava_layout

    columns, rows = (int(x) for x in layout[1].split("x"))
    return llava_layout(read_checkpoint(source, "--large").config, (columns, rows)).visual_tokens


def test_unit_rows_encode_only_their_units(models_dir, tmp_path):
    """Unit skipping and selection pay the vision tower for the units they encode, no more."""
    rows = run_cost(
        tmp_path,
        ["--guide", str(models_dir / "internvl-guide"), "--large", str(models_dir / "internvl-large")]
        + ["--tiles", "6", "--guide-tiles", "1", "--units", "2", "--exit-rate", "0.25"],
    )
    per_unit = rows[0]["large_vision_flops"] / 7
    by = {(r["method"], r["setting"]): r for r in rows}
    best = next(
        r for (m, s), r in by.items() if m == "SGL K=0 + unit skip" and s.startswith("best") and ";" not in s
    )
    encoded = int(best["large_vision_units"].split("/")[0])
    assert best["large_vision_flops"] == pytest.approx(encoded * per_unit)
    chosen = next(r for (m, s), r in by.items() if m == "SGL unit selection" and ";" not in s)
    assert chosen["large_vision_units"] == "3/7"
    assert chosen["large_vision_flops"] == pytest.approx(3 * per_unit)
    exit_row = next(r for (m, s), r in by.items() if m == "SGL unit selection" and s.endswith("exit 25%"))
    assert exit_row["large_vision_flops"] == pytest.approx(0.75 * chosen["large_vision_flops"])
    # with early exit the guide also pays its consistency pass (a run without a threshold skips it)
    assert exit_row["guide_flops"] > chosen["guide_flops"]
    guide_only = [r for r in rows if r["method"] == "guide only"]
    assert guide_only[0]["guide_flops"] == chosen["guide_flops"]  # the same guide, no pass either


def test_docs_real_pair_table_is_reproduced():
    """docs/cost.md's numbers are the bundled configs' numbers (regenerate: lmms-sgl-cost --real-pairs)."""
    section = COST_PAGE.read_text().split("## What SGL saves on the real pairs", 1)[1]
    table = re.search(r"^\|.*?(?=\n\n)", section, flags=re.S | re.M).group(0)
    assert table == real_pairs_table()


def test_issue_sanity_numbers_on_internvl2(tmp_path):
    """The issue's own arithmetic: 84 TFLOPs of InternViT-6B over 7 x 1,025 patches, ~73 of language
    model prefill, SGL presets at 0.91x / 0.78x / 0.66x of the large model alone."""
    rows = run_cost(tmp_path, ["--guide", "InternVL2-2B", "--large", "InternVL2-26B", "--tiles", "6"], 64, 8)
    assert rows[0]["large_vision_flops"] / 1e12 == pytest.approx(84.0, abs=0.1)
    assert 72 < rows[0]["large_prefill_flops"] / 1e12 < 74
    sgl = [r["ratio"] for r in rows if r["method"] == "SGL"]
    assert sgl == pytest.approx([0.91, 0.78, 0.66], abs=0.01)


BAD = [
    (["--tiles", "0"], "--tiles=0: allowed: an integer >= 1"),
    (["--tiles", "6", "--exit-rate", "1.0"], "--exit-rate=1.0: allowed: a fraction in [0, 1)"),
    (["--tiles", "6", "--units", "0"], "--units=0: allowed: an integer >= 1"),
    (["--tiles", "6", "--units", "7"], "--units=7: allowed: at most the layout's 6 tiles / crops"),
    (["--tiles", "6", "--answer-tokens", "0"], "--answer-tokens=0: allowed: an integer >= 1"),
    (["--tiles", "6", "--no-global-view"], "--no-global-view applies to unit selection"),
    (["--crops", "3x3"], "--crops: internvl checkpoints take --tiles, --guide-tiles"),
    ([], "--tiles is required for InternVL checkpoints"),
    (["--tiles", "x"], "argument --tiles: invalid int value: 'x'"),
]


@pytest.mark.parametrize("argv,message", BAD, ids=[m[:30] for _, m in BAD])
def test_bad_arguments_exit_2_with_the_message(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--guide", "InternVL2-2B", "--large", "InternVL2-26B", *argv])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv,message",
    [
        (
            ["--guide", "nope", "--large", "InternVL2-26B", "--tiles", "2"],
            "--guide='nope' is not a bundled config",
        ),
        (
            [
                "--guide",
                "Qwen2.5-VL-3B-Instruct",
                "--large",
                "Qwen2.5-VL-72B-Instruct",
                "--image-size",
                "800x600",
            ]
            + ["--units", "1"],
            "--units=1: the large model's image is one unit",
        ),
        (
            ["--guide", "llava-onevision-qwen2-0.5b-ov-hf", "--large", "llava-onevision-qwen2-72b-ov-hf"]
            + ["--crops", "7x1"],
            "--crops=7x1 is not a grid of the checkpoint's image_grid_pinpoints",
        ),
        (
            ["--guide", "InternVL2-2B", "--large", "Qwen2.5-VL-72B-Instruct", "--image-size", "800x600"],
            "allowed: a guide of the large model's family",
        ),
        (["--large", "InternVL2-26B"], "--guide and --large are required"),
    ],
)
def test_bad_checkpoints_and_layouts_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_a_built_wheel_ships_the_bundled_configs_where_the_command_looks():
    """Non-editable installs have no source tree: pyproject copies configs/checkpoints into the
    package, at the folder ``sources`` looks in first."""
    import tomllib

    from lmms_sgl.costs import sources

    repo = Path(__file__).resolve().parent.parent
    build = tomllib.loads((repo / "pyproject.toml").read_text())["tool"]["hatch"]["build"]["targets"]
    included = build["wheel"]["force-include"]
    assert included["configs/checkpoints"] == sources._PACKAGED.relative_to(repo).as_posix()
    assert (repo / "configs/checkpoints/InternVL2-26B/config.json").is_file()
