"""``method=large_only`` equals lmms-eval's own model for the same tiny checkpoint, through lmms-eval's
evaluator, on local copies of real task configs (tests/real_tasks.py): chat interface (the default)
and simple interface (``force_simple``), resampled images, two images, text only, own messages."""

from __future__ import annotations

import pytest

from tests.helpers import evaluate, raw_response
from tests.real_tasks import write_tasks

pytestmark = pytest.mark.slow
LIMIT = 2
# host model, our model, checkpoint, dtype the host loads with, host args, our args
CASES = {
    "internvl": (
        "internvl_hf",
        "sgl_internvl2",
        "internvl-large",
        "bfloat16",
        ",max_patches=2",
        ",max_tiles=2",
    ),
    "llava": ("llava_hf", "sgl_llava", "llava-large", "float32", "", ""),
    "qwen2_vl": ("qwen2_vl", "sgl_qwen2_vl", "qwen2-vl-large", "float32", "", ""),
    "qwen2_5_vl": ("qwen2_5_vl", "sgl_qwen2_vl", "qwen2.5-vl-large", "bfloat16", "", ""),
    "qwen3_vl": ("qwen3_vl", "sgl_qwen2_vl", "qwen3-vl-large", "bfloat16", "", ""),
}
TASKS = "real_pope,real_textvqa,real_chartqa,multi_image,text_only"
# lmms-eval's llava_hf cannot answer text-only requests (it hands the processor an empty image list)
HOST_CANNOT = {"llava_hf": {"text_only"}}
FAST = "max_new_tokens=8"  # the same override on both sides: random tiny models rarely stop by themselves


@pytest.fixture(scope="module")
def real_tasks(tmp_path_factory):
    folder = tmp_path_factory.mktemp("real_tasks")
    write_tasks(folder)
    return folder


def normal(answer: str, host: str) -> str:
    """lmms-eval's ``qwen2_vl`` cuts at its injected "\\n\\n" stop (we do not, see README); scoring strips."""
    return (answer.split("\n\n")[0] if host == "qwen2_vl" else answer).strip()


@pytest.mark.parametrize("case", sorted(CASES))
def test_large_only_equals_lmms_eval_model(real_tasks, models_dir, case):
    host, ours, checkpoint, dtype, host_extra, our_extra = CASES[case]
    path = models_dir / checkpoint
    chat_tasks = TASKS + ("" if host == "qwen2_vl" else ",own_messages")  # qwen2_vl is simple-only
    chat_tasks = ",".join(t for t in chat_tasks.split(",") if t not in HOST_CANNOT.get(host, ()))
    theirs = evaluate(
        host,
        f"pretrained={path},device=cpu,device_map=cpu{host_extra}",
        chat_tasks,
        real_tasks,
        LIMIT,
        gen_kwargs=FAST,
    )
    args = f"pretrained={path},method=large_only,dtype={dtype}{our_extra}"
    chat = evaluate(ours, args, chat_tasks, real_tasks, LIMIT, gen_kwargs=FAST)
    simple = evaluate(ours, args, chat_tasks, real_tasks, LIMIT, gen_kwargs=FAST, force_simple=True)
    assert chat["config"]["model_backend"].endswith("Chat (chat)")
    assert simple["config"]["model_backend"].endswith(" (simple)")
    for task in chat_tasks.split(","):
        expected = [normal(raw_response(row), host) for row in theirs["samples"][task]]
        assert len(expected) == LIMIT and any(expected), task
        assert [normal(raw_response(row), host) for row in chat["samples"][task]] == expected, task
        if task != "own_messages":  # a task's own messages reach chat models only
            assert [normal(raw_response(row), host) for row in simple["samples"][task]] == expected, task
