"""Local copies of lmms-eval's real task configs (made-up questions and answers, the installed tasks'
schema, prompt functions, pre/post prompts and generation kwargs), written into a folder for
``--include_path``; plus a multi-image task, a text-only task and a task with its own messages
(a system turn, text and images interleaved)."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

# task -> (lmms_eval.tasks module, visual function, text function, generation kwargs, post prompt)
REAL = {
    "pope": (
        "pope.utils",
        "pope_doc_to_visual",
        "pope_doc_to_text",
        "max_new_tokens: 128\n  temperature: 0\n  top_p: 1.0\n  num_beams: 1\n  do_sample: false",
        "\\nAnswer the question using a single word or phrase.",
    ),  # noqa: E501
    "mme": (
        "mme.utils",
        "mme_doc_to_visual",
        "mme_doc_to_text",
        "max_new_tokens: 16\n  temperature: 0\n  top_p: 1.0\n  num_beams: 1\n  do_sample: false",
        "\\nAnswer the question using a single word or phrase.",
    ),  # noqa: E501
    "textvqa": (
        "textvqa.utils",
        "textvqa_doc_to_visual",
        "textvqa_doc_to_text",
        'until:\n    - "ASSISTANT:"',
        "\\nAnswer the question using a single word or phrase.",
    ),  # noqa: E501
    "chartqa": (
        "chartqa.utils",
        "chartqa_doc_to_visual",
        "chartqa_doc_to_text",
        "max_new_tokens: 16\n  temperature: 0\n  do_sample: False",
        "\\nAnswer the question with a single word.",
    ),  # noqa: E501
    "gqa": (
        "gqa.utils",
        "gqa_doc_to_visual",
        "gqa_doc_to_text",
        "max_new_tokens: 16\n  temperature: 0\n  top_p: 1.0\n  num_beams: 1\n  do_sample: false",
        "\\nAnswer the question using a single word or phrase.",
    ),  # noqa: E501
}
# sizes that every family resamples (Qwen's 28 / 32 px grids, InternVL's tiles, LLaVA's crops), small
# so that the tiny models answer fast
SIZES = [(250, 167), (167, 250), (320, 240), (97, 211)]
COLORS = ["red", "blue", "green", "yellow"]

UTILS = '''
from lmms_eval.tasks.pope.utils import pope_doc_to_text


def two_images(doc):
    return [doc["image"].convert("RGB"), doc["image_2"].convert("RGB")]


def own_messages(doc):
    """A system turn, then text and the two images interleaved."""
    return [
        {"role": "system", "content": [{"type": "text", "text": "Answer briefly."}]},
        {"role": "user", "content": [
            {"type": "text", "text": "First picture:"},
            {"type": "image", "url": doc["image"].convert("RGB")},
            {"type": "text", "text": "Second picture:"},
            {"type": "image", "url": doc["image_2"].convert("RGB")},
            {"type": "text", "text": doc["question"]},
        ]},
    ]
'''


def picture(size: tuple[int, int], color: str) -> Image.Image:
    image = Image.new("RGB", size, (235, 235, 240))
    draw = ImageDraw.Draw(image)
    width, height = size
    draw.ellipse((width // 4, height // 4, 3 * width // 4, 3 * height // 4), fill=color)
    draw.text((4, 4), "42", fill="black")
    return image


def rows(n: int = 4) -> dict:
    return {
        "question_id": [str(i) for i in range(n)],
        "question": [f"Is the circle {COLORS[i % 4]}?" for i in range(n)],
        "answer": ["yes" if i % 2 == 0 else "no" for i in range(n)],
        "image": [picture(SIZES[i % len(SIZES)], COLORS[i % 4]) for i in range(n)],
        "image_2": [picture(SIZES[(i + 1) % len(SIZES)], COLORS[(i + 2) % 4]) for i in range(n)],
    }


def common(name: str, visual: str | None, text: str, gen: str) -> str:
    visual_line = f"doc_to_visual: {visual}\n" if visual else ""
    return (
        f"task: {name}\ndataset_path: !function paths.DATA_DIR\n"
        "dataset_kwargs:\n  data_files:\n    test: test.parquet\n"
        f"test_split: test\noutput_type: generate_until\n{visual_line}doc_to_text: {text}\n"
        f"doc_to_target: answer\ngeneration_kwargs:\n  {gen}\n"
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n"
    )


def write_tasks(folder: Path) -> list[str]:
    """Write the tasks and their data into ``folder``; return the task names."""
    from datasets import Dataset

    (folder / "data").mkdir(parents=True, exist_ok=True)
    Dataset.from_dict(rows()).to_parquet(str(folder / "data" / "test.parquet"))
    (folder / "paths.py").write_text(
        "from pathlib import Path\n\nDATA_DIR = str(Path(__file__).resolve().parent / 'data')\n"
    )
    (folder / "local_utils.py").write_text(UTILS)
    names = []
    for task, (module, visual, text, gen, post) in REAL.items():
        name = f"real_{task}"
        body = common(
            name,
            f"!function lmms_eval.tasks.{module}.{visual}",
            f"!function lmms_eval.tasks.{module}.{text}",
            gen,
        )
        body += f'lmms_eval_specific_kwargs:\n  default:\n    pre_prompt: ""\n    post_prompt: "{post}"\n'
        (folder / f"{name}.yaml").write_text(body)
        names.append(name)
    pope_gen = REAL["pope"][3]
    post = (
        f'lmms_eval_specific_kwargs:\n  default:\n    pre_prompt: ""\n    post_prompt: "{REAL["pope"][4]}"\n'
    )
    (folder / "multi_image.yaml").write_text(
        common(
            "multi_image",
            "!function local_utils.two_images",
            "!function local_utils.pope_doc_to_text",
            pope_gen,
        )
        + post
    )
    (folder / "text_only.yaml").write_text(
        common("text_only", None, "!function local_utils.pope_doc_to_text", pope_gen) + post
    )
    (folder / "own_messages.yaml").write_text(
        common("own_messages", "!function local_utils.two_images", "question", pope_gen)
        + "doc_to_messages: !function local_utils.own_messages\n"
    )
    return [*names, "multi_image", "text_only", "own_messages"]
