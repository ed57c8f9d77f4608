"""Prompt and visual functions of the ``sgl_video`` task (clips in ``data/videos``)."""

from pathlib import Path

from lmms_sgl.local_tasks import video
from lmms_sgl.local_tasks.prompts import doc_to_text

VIDEOS = Path(__file__).resolve().parent / "data" / "videos"


def doc_to_visual(doc):
    return video.doc_to_visual(doc, VIDEOS)


__all__ = ["doc_to_text", "doc_to_visual"]
