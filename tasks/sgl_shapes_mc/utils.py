"""``sgl_shapes`` as multiple choice: the same prompt as generation, the answers of its type as
choices. Choices carry no leading space: lmms-eval puts its ``target_delimiter`` (" ") before each."""

from lmms_sgl.local_tasks.prompts import doc_to_visual
from lmms_sgl.proving.palette import COLORS
from lmms_sgl.proving.shapes import COUNT_WORDS, SHAPES

__all__ = ["doc_to_choice", "doc_to_target", "doc_to_text", "doc_to_visual"]

CHOICES = {
    "color": sorted(COLORS),
    "shape": list(SHAPES),
    "count": list(COUNT_WORDS),
    "exists": ["yes", "no"],
}
POST_PROMPT = "\nAnswer the question using a single word or phrase."


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return f"{doc['question']}{POST_PROMPT}"


def doc_to_choice(doc):
    return CHOICES[doc["type"]]


def doc_to_target(doc):
    return CHOICES[doc["type"]].index(doc["answer"])
