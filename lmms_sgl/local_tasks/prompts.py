"""Prompt and visual functions shared by the local tasks in ``tasks/`` (their ``utils.py`` re-export
these, since lmms-eval resolves ``!function utils.NAME`` next to each task's YAML)."""


def doc_to_visual(doc):
    return [doc["image"].convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    kwargs = lmms_eval_specific_kwargs or {}
    return f"{kwargs.get('pre_prompt', '')}{doc['question']}{kwargs.get('post_prompt', '')}"
