"""The procedural benchmark: deterministic, disjoint splits, answers that follow from the scene."""

from __future__ import annotations

import pytest

from lmms_sgl.local_tasks.data import TILES_LAYOUT, TILES_SIZE, shapes_records
from lmms_sgl.proving import shapes


def answer_from_scene(record: dict) -> str:
    """Recompute the answer from the scene alone (independent of how the question was made)."""
    objects, words = record["scene"].objects, record["question"].rstrip("?").split()
    if record["type"] == "color":  # What color is the {size} {shape}
        (hit,) = [o for o in objects if o.size == words[-2] and o.shape == words[-1]]
        return hit.color
    if record["type"] == "shape":  # What shape is the {color} object
        (hit,) = [o for o in objects if o.color == words[-2]]
        return hit.shape
    if record["type"] == "count":  # How many {color} objects are there
        return shapes.COUNT_WORDS[sum(o.color == words[2] for o in objects)]
    return "yes" if any(o.color == words[-2] and o.shape == words[-1] for o in objects) else "no"


def test_answers_follow_from_the_scene():
    records = shapes.split("test", 200)
    assert {r["type"] for r in records} == set(shapes.QUESTION_TYPES)
    for record in records:
        assert record["answer"] == answer_from_scene(record), record["question"]


def test_deterministic_and_splits_disjoint():
    a, b = shapes.sample(123), shapes.sample(123)
    assert a["question"] == b["question"] and a["image"].tobytes() == b["image"].tobytes()
    ids = {split: {r["id"] for r in shapes.split(split, 50)} for split in shapes.SPLIT_SEEDS}
    assert not (
        ids["train"] & ids["validation"] or ids["train"] & ids["test"] or ids["validation"] & ids["test"]
    )


def test_answers_are_not_dominated_by_one_value():
    answers = [r["answer"] for r in shapes.split("validation", 300)]
    most_common = max(answers.count(a) for a in set(answers))
    assert most_common / len(answers) < 0.25


@pytest.mark.parametrize(
    "family,size,tokens",
    [("internvl", (448, 448), 256), ("internvl", (896, 448), 768), ("llava", (448, 448), 256)],
)
def test_enough_visual_tokens(models_dir, family, size, tokens):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(models_dir / f"{family}-large")
    record = shapes.sample(5, *size)
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": record["question"]}]}],
        tokenize=False,
        add_generation_prompt=True,
    )
    inputs = (
        processor(images=[record["image"]], text=text, return_tensors="pt", max_patches=6)
        if family == "internvl"
        else processor(images=[record["image"]], text=text, return_tensors="pt")
    )
    image_token = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    assert int((inputs.input_ids == image_token).sum()) == tokens >= 144


@pytest.mark.parametrize(
    "task,size,n,layout",
    [
        ("sgl_shapes", (448, 448), 300, None),
        ("sgl_shapes_wide", (896, 448), 150, None),
        ("sgl_shapes_tiles", TILES_SIZE, 300, TILES_LAYOUT),
    ],
)
def test_shipped_shapes_tasks_match_the_generator(tasks_dir, task, size, n, layout):
    import datasets

    shipped = datasets.load_dataset(str(tasks_dir / task / "data"), split="test")
    assert len(shipped) == n
    fresh = shapes_records(10, *size, layout=layout)
    for row, record in zip(shipped, fresh, strict=False):
        assert (row["question"], row["answer"], row["type"]) == (
            record["question"],
            record["answer"],
            record["type"],
        )
        assert row["image"].convert("RGB").tobytes() == record["image"].tobytes()
