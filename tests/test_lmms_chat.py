"""``method=large_only`` equals lmms-eval's own model for the same tiny checkpoint, through lmms-eval's
evaluator, on local copies of real task configs (tests/real_tasks.py): chat interface (the default)
and simple interface (``force_simple``), resampled images, two images, text only, own messages.
One evaluator run per model and interface, one sample per task, short answers (kept fast)."""

from __future__ import annotations

import pytest

from tests import helpers
from tests.helpers import evaluate, raw_response
from tests.real_tasks import write_tasks

LIMIT = 1
# Small explicit Qwen bounds on both sides (the images still resample): the tests stay fast, the
# user-facing default (lmms-eval's own) is left alone.
QWEN_BOUNDS = ",min_pixels=3136,max_pixels=50176"
# host model, our model, checkpoint, dtype the host loads with, host args, our args
CASES = {
    # internvl_hf hard-codes bfloat16 (no dtype argument): compared in bfloat16
    "internvl": (
        "internvl_hf",
        "sgl_internvl2",
        "internvl-large",
        "bfloat16",
        ",max_patches=2",
        ",max_tiles=2",
    ),
    "llava": ("llava_hf", "sgl_llava", "llava-large", "float32", "", ""),
    "qwen2_vl": ("qwen2_vl", "sgl_qwen2_vl", "qwen2-vl-large", "float32", QWEN_BOUNDS, QWEN_BOUNDS),
    "qwen2_5_vl": ("qwen2_5_vl", "sgl_qwen2_vl", "qwen2.5-vl-large", "bfloat16", QWEN_BOUNDS, QWEN_BOUNDS),
    "qwen3_vl": ("qwen3_vl", "sgl_qwen2_vl", "qwen3-vl-large", "bfloat16", "", ""),
}
TASKS = "real_pope,real_textvqa,multi_image,text_only"
# lmms-eval's llava_hf cannot answer text-only requests (it hands the processor an empty image list)
HOST_CANNOT = {"llava_hf": {"text_only"}}
FAST = "max_new_tokens=6"  # the same override on both sides: random tiny models rarely stop by themselves
one_thread = pytest.fixture(scope="module", autouse=True)(helpers.one_thread)


@pytest.fixture
def generate_inputs(monkeypatch):
    """What every ``generate`` call of any model receives: the unpadded prompt tokens and the pixels
    (random tiny models answer much the same whatever the prompt order, so answers alone would not
    show a prompt built differently; the tokens and pixels do)."""
    from transformers.generation.utils import GenerationMixin

    calls: list[list[tuple]] = [[]]
    generate = GenerationMixin.generate

    def spy(self, *args, **kwargs):
        ids, mask = kwargs["input_ids"], kwargs.get("attention_mask")
        for b in range(ids.shape[0]):
            tokens = ids[b] if mask is None else ids[b][mask[b].bool()]
            pixels = kwargs.get("pixel_values")
            grid = kwargs.get("image_grid_thw")
            calls[-1].append(
                (
                    tuple(tokens.tolist()),
                    # as the vision tower reads them (callers may cast to the model's dtype or leave it)
                    None if pixels is None else tuple(pixels.to(self.dtype).float().flatten()[::97].tolist()),
                    None if grid is None else tuple(map(tuple, grid.tolist())),
                )
            )
        return generate(self, *args, **kwargs)

    monkeypatch.setattr(GenerationMixin, "generate", spy)
    return calls


@pytest.fixture(scope="module")
def real_tasks(tmp_path_factory):
    folder = tmp_path_factory.mktemp("real_tasks")
    write_tasks(folder)
    return folder


def normal(answer: str, host: str) -> str:
    """lmms-eval's ``qwen2_vl`` cuts at its injected "\\n\\n" stop (we do not, see docs/how-it-works.md);
    scoring strips."""
    return (answer.split("\n\n")[0] if host == "qwen2_vl" else answer).strip()


def output_tokens(row: dict) -> int | None:
    counts = row.get("token_counts") or [None]
    return (counts[0] or {}).get("output_tokens")


@pytest.mark.parametrize("case", sorted(CASES))
def test_large_only_equals_lmms_eval_model(real_tasks, models_dir, generate_inputs, case):
    host, ours, checkpoint, dtype, host_extra, our_extra = CASES[case]
    path = models_dir / checkpoint
    tasks = TASKS + ("" if host == "qwen2_vl" else ",own_messages")  # qwen2_vl is simple-only
    tasks = ",".join(t for t in tasks.split(",") if t not in HOST_CANNOT.get(host, ()))
    theirs = evaluate(
        host,
        f"pretrained={path},device=cpu,device_map=cpu{host_extra}",
        tasks,
        real_tasks,
        LIMIT,
        gen_kwargs=FAST,
    )
    generate_inputs.append([])
    args = f"pretrained={path},method=large_only,dtype={dtype}{our_extra}"
    chat = evaluate(ours, args, tasks, real_tasks, LIMIT, gen_kwargs=FAST)
    generate_inputs.append([])
    simple = evaluate(ours, args, tasks, real_tasks, LIMIT, gen_kwargs=FAST, force_simple=True)
    their_inputs, chat_inputs, simple_inputs = generate_inputs
    assert len(their_inputs) == len(tasks.split(",")) * LIMIT
    assert sorted(chat_inputs) == sorted(their_inputs)  # same prompt tokens and pixels, request by request
    own = len(theirs["samples"].get("own_messages", []))  # own messages reach chat models only
    assert len(simple_inputs) == len(their_inputs)
    assert sum(call in their_inputs for call in simple_inputs) >= len(their_inputs) - own
    assert chat["config"]["model_backend"].endswith("Chat (chat)")
    assert simple["config"]["model_backend"].endswith(" (simple)")
    answered = []
    for task in tasks.split(","):
        expected = [normal(raw_response(row), host) for row in theirs["samples"][task]]
        assert len(expected) == LIMIT, task
        answered += expected
        runs = [chat] + ([simple] if task != "own_messages" else [])  # own messages reach chat models only
        for run in runs:
            rows = run["samples"][task]
            assert [normal(raw_response(row), host) for row in rows] == expected, task
            for row, reference in zip(rows, theirs["samples"][task], strict=True):
                ours_count, their_count = output_tokens(row), output_tokens(reference)
                assert ours_count == row["token_counts"][0]["sgl"]["output_tokens"] > 0, task
                if their_count is not None:  # lmms-eval's chat models count the answer's tokens too
                    assert ours_count == their_count, task
    assert any(answered), "every answer empty: the comparison would prove nothing"
