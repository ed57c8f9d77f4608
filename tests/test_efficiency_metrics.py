"""lmms-eval 0.7's efficiency metrics for our models: per-sample ``input_tokens`` / ``output_tokens``
are those of the model whose answer is returned (the large model's; the guide's when the sample
exited), counted independently from the checkpoint's processor and the scripted answers, and
results.json's ``efficiency`` block (totals, ``tokens_per_correct_answer``) equals what the records say.

InternVL with a guide that tiles less than the large model (``guide_max_tiles``), so the guide's and
the large model's prompts differ in length; scripted checkpoints so that the answers (and so the
scores) are known."""

from __future__ import annotations

import pytest
from datasets import Dataset
from PIL import Image
from transformers import AutoProcessor

from lmms_sgl.factory import build as factory
from tests import helpers
from tests.helpers import evaluate

TASK, LIMIT = "sgl_smoke", 3
GUIDE_ANSWER, LARGE_ANSWER = "orange", "blue"  # the task's first answers: purple, orange, blue
TILES = {"large": 2, "guide": 1}
one_thread = pytest.fixture(scope="module", autouse=True)(helpers.one_thread)


@pytest.fixture(scope="module")
def scripted(tmp_path_factory):
    out = tmp_path_factory.mktemp("scripted_efficiency")
    return {
        "large": factory.save_scripted("internvl-large", LARGE_ANSWER, out),
        "guide": factory.save_scripted("internvl-guide", GUIDE_ANSWER, out),
    }


def prompt_tokens(path, question: str, image: Image.Image, tiles: int) -> int:
    """The prompt lmms-eval's internvl_hf would give this checkpoint, counted by its processor."""
    processor = AutoProcessor.from_pretrained(path)
    content = [{"type": "image"}, {"type": "text", "text": question}]
    text = processor.apply_chat_template(
        [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
    )
    return processor(images=[image], text=text, max_patches=tiles, return_tensors="pt").input_ids.shape[1]


def answer_tokens(path, answer: str) -> int:
    """The scripted answer's tokens and its EOS (lmms-eval's own models count the EOS too)."""
    return len(AutoProcessor.from_pretrained(path).tokenizer(answer, add_special_tokens=False).input_ids) + 1


@pytest.mark.parametrize("exits", [False, True], ids=["large_answers", "guide_answers"])
def test_token_counts_and_efficiency_equal_the_records(scripted, tasks_dir, exits):
    args = (
        f"pretrained={scripted['large']},guide={scripted['guide']},keep_ratio=0.3,"
        f"max_tiles={TILES['large']},guide_max_tiles={TILES['guide']}"
        + (",exit_threshold=0.0" if exits else "")
    )
    result = evaluate("sgl_internvl2", args, TASK, tasks_dir, LIMIT)
    docs = Dataset.from_parquet(str(tasks_dir / TASK / "data" / "test.parquet"))
    answering = "guide" if exits else "large"
    answer = GUIDE_ANSWER if exits else LARGE_ANSWER
    rows = result["samples"][TASK]
    assert len(rows) == LIMIT
    for row in rows:
        counts, record = row["token_counts"][0], row["token_counts"][0]["sgl"]
        assert record["exited"] is exits and row["filtered_resps"][0] == answer
        doc = docs[row["doc_id"]]
        question = row["arguments"][0]  # the task's text, as the prompt carries it
        assert doc["question"] in question
        expected_in = prompt_tokens(scripted[answering], question, doc["image"], TILES[answering])
        assert counts["input_tokens"] == record["input_tokens"] == expected_in, row["doc_id"]
        expected_out = answer_tokens(scripted[answering], answer)
        assert counts["output_tokens"] == record["output_tokens"] == expected_out, row["doc_id"]
    wide = docs[2]["image"]  # 896 x 448: two tiles and a thumbnail for the large model, one for the guide
    question = rows[0]["arguments"][0]
    assert prompt_tokens(scripted["guide"], question, wide, 1) < prompt_tokens(
        scripted["large"], question, wide, 2
    )

    efficiency = result["efficiency"]["by_task"][TASK]
    records = [row["token_counts"][0]["sgl"] for row in rows]
    correct = sum(row["exact_match"] for row in rows)
    assert correct == 1  # the scripted answer matches one of the first three answers
    assert efficiency["total_input_tokens"] == sum(r["input_tokens"] for r in records)
    assert efficiency["total_output_tokens"] == sum(r["output_tokens"] for r in records)
    assert efficiency["tokens_per_correct_answer"] == pytest.approx(
        sum(r["output_tokens"] for r in records) / correct
    )
