"""Prompt and visual functions of the ``sgl_shapes_tiles`` task (shared by the local tasks)."""

from lmms_sgl.local_tasks.prompts import doc_to_text, doc_to_visual

__all__ = ["doc_to_text", "doc_to_visual"]
