"""Scripted guide/large pairs for speculative decoding (tests and benchmark): the large model answers
a fixed chain of distinct tokens; the guide follows the same chain where ``agree(i)`` holds and
jumps off it elsewhere, so agreement patterns are made on purpose. Both keep the factory
tokenizer untouched, so their token ids are shared."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from lmms_sgl.factory.build import build_model, generation_prompt_token, script_transitions
from lmms_sgl.factory.specs import SPECS


def answer_tokens(processor, count: int) -> tuple[list[int], list[int]]:
    """``count`` distinct ordinary tokens for the answer chain, and a few others to jump to."""
    tokenizer = processor.tokenizer
    special = set(tokenizer.all_special_ids) | {generation_prompt_token(processor)}
    ordinary = [
        i
        for i in range(len(tokenizer))
        if i not in special and (text := tokenizer.decode([i])).strip() and "\n" not in text
    ]
    if len(ordinary) < count + 4:
        raise ValueError(f"the tokenizer has {len(ordinary)} ordinary tokens, {count + 4} needed")
    return ordinary[:count], ordinary[-4:]


def script_pair(guide, large, length: int, agree: Callable[[int], bool]) -> list[int]:
    """Script ``(model, processor)`` pairs in place; returns the large model's answer (its chain
    after the generation prompt, EOS included)."""
    tokens, elsewhere = answer_tokens(large[1], length)
    tokenizer = large[1].tokenizer
    chain = [generation_prompt_token(large[1]), *tokens, tokenizer.eos_token_id]
    steps = list(zip(chain[:-1], chain[1:], strict=True))
    script_transitions(large[0], dict(steps))
    off = {a: b if agree(i) else elsewhere[i % len(elsewhere)] for i, (a, b) in enumerate(steps)}
    script_transitions(guide[0], off)
    return chain[1:]


def save_pair(
    family: str, out: Path, length: int, agree: Callable[[int], bool]
) -> tuple[Path, Path, list[int]]:
    """Scripted ``{family}-guide`` / ``{family}-large`` factory checkpoints saved under ``out``;
    returns their folders and the large model's answer."""
    built = {role: build_model(SPECS[f"{family}-{role}"]) for role in ("guide", "large")}
    chain = script_pair(built["guide"], built["large"], length, agree)
    folders = []
    for role, (model, processor) in built.items():
        folder = out / f"{family}-{role}"
        model.save_pretrained(folder, safe_serialization=True)
        processor.save_pretrained(folder)
        folders.append(folder)
    return folders[0], folders[1], chain
