"""The chat interface of the SGL models: requests carry the task's messages, not a text and visuals.

lmms-eval 0.7 prefers a model's chat implementation (``ModelManifest.chat_class_path``) and builds a
chat request as ``(context, doc_to_messages, gen_kwargs, doc_id, task, split)``; ``doc_to_messages``
gives the task's turns (its own, or the ones lmms-eval builds from ``doc_to_visual`` +
``doc_to_text``), images and videos placed where the task puts them. Its chat models render those
turns with the checkpoint's chat template as they are; so do we (the family adds what lmms-eval's
model for that family adds, e.g. Qwen3-VL's system turn). Chat tasks are generation-only in lmms-eval
(multiple choice needs ``--force_simple``, which selects the simple class).
"""

from __future__ import annotations

from pathlib import Path

from lmms_eval.api.instance import Instance
from lmms_eval.protocol import ChatMessages
from PIL import Image

from lmms_sgl.families.base import Prompt
from lmms_sgl.families.video import open_video, video_of
from lmms_sgl.lmms.task_kinds import check_chat_tasks
from lmms_sgl.pipeline import Sample


def _image(url, where: str) -> Image.Image:
    if isinstance(url, Image.Image):
        return url.convert("RGB")
    if isinstance(url, (str, Path)) and Path(url).is_file():
        with Image.open(url) as image:
            return image.convert("RGB")
    raise ValueError(f"{where}: image {str(url)[:80]!r} is neither a PIL image nor a local file")


def prompt_from_messages(messages: list[dict], where: str) -> Prompt:
    """The task's turns as a :class:`Prompt`: text entries kept in place, each image replaced by a
    ``{"type": "image"}`` entry (its pixels go to ``images``, in order), each video by a
    ``{"type": "video"}`` entry (its file probed into ``videos``: unreadable or empty is a clear
    error). Audio is refused by name."""
    parsed = ChatMessages(messages=messages)  # lmms-eval's own validation of the protocol
    turns, images, videos, texts = [], [], [], []
    for message in parsed.messages:
        content = []
        for part in message.content:
            if part.type == "text":
                content.append({"type": "text", "text": part.text})
                texts.append(part.text)
            elif part.type == "image":
                content.append({"type": "image"})
                images.append(_image(part.url, where))
            elif part.type == "video" and video_of(part.url) is not None:
                if part.start_time is not None or part.end_time is not None:
                    raise ValueError(
                        f"{where}: video clip bounds (start_time={part.start_time}, "
                        f"end_time={part.end_time}) are not supported (whole videos only)"
                    )
                content.append({"type": "video"})
                videos.append(open_video(video_of(part.url)))
            else:
                raise ValueError(
                    f"{where}: a {part.type} entry in the task's messages is not supported "
                    "(images and video files)"
                )
        turns.append({"role": message.role, "content": content})
    return Prompt("\n".join(texts), images, videos, messages=turns)


class ChatRequests:
    """Mixin over an :class:`~lmms_sgl.lmms.base.SGLModel`: lmms-eval's chat request layout."""

    is_simple = False

    def __init__(self, **model_args) -> None:
        check_chat_tasks()  # a multiple-choice task needs --force_simple: say so before loading
        super().__init__(**model_args)

    @staticmethod
    def gen_kwargs(request: Instance) -> dict:
        return request.args[2]

    def _sample(self, request: Instance) -> Sample:
        _, doc_to_messages, _, doc_id, task, split = request.args[:6]
        doc = self.task_dict[task][split][doc_id]
        prompt = prompt_from_messages(doc_to_messages(doc), f"{task}/{doc_id}")
        self._check_videos(prompt.videos)
        return Sample(task, doc_id, prompt)
