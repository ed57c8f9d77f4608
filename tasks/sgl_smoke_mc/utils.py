"""The smoke questions as multiple choice over the colour names (scored by log-likelihood)."""

from lmms_sgl.palette import COLORS

CHOICES = sorted(COLORS)


def doc_to_visual(doc):
    return [doc["image"].convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return f"{doc['question']}\nAnswer with one of: {', '.join(CHOICES)}."


def doc_to_choice(doc):
    return [f" {choice}" for choice in CHOICES]


def doc_to_target(doc):
    return CHOICES.index(doc["answer"])
