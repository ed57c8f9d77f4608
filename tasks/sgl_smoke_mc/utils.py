"""The smoke questions as multiple choice over the colour names (scored by log-likelihood)."""

from lmms_sgl.proving.palette import COLORS

CHOICES = sorted(COLORS)


def doc_to_visual(doc):
    return [doc["image"].convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return f"{doc['question']}\nAnswer with one of: {', '.join(CHOICES)}."


def doc_to_choice(doc):
    # No leading space: lmms-eval puts its target_delimiter (" ") before each choice.
    return list(CHOICES)


def doc_to_target(doc):
    return CHOICES.index(doc["answer"])
