"""A SentencePiece BPE model as a ``tokenizers`` backend with the slow tokenizers' exact ids.

The slow tokenizers of the original checkpoints (InternLM2Tokenizer; LlamaTokenizer for Phi-3 and
Yi) cut the text at added tokens and run SentencePiece on each remaining chunk. SentencePiece
normalises each chunk (character map, extra-whitespace removal, dummy ``▁`` prefix, spaces to
``▁``) and then merges pieces by score. Both map onto ``tokenizers`` pieces: a normalizer applied
per chunk, a BPE model whose merge ranks follow the piece scores, byte fallback, and SentencePiece's
decoder. ``prefix`` chooses where the dummy prefix goes: ``"chunk"`` (SentencePiece on every chunk:
InternLM2, legacy Llama), ``"first"`` (only at the start of the text: Llama with ``legacy=false``) or
``"none"``.

Decoding byte-fallback pieces is the one thing the ``tokenizers`` decoders cannot express: their
``ByteFallback`` turns a run of byte pieces into its text only when the *whole run* is valid UTF-8,
and otherwise into one U+FFFD per byte. SentencePiece decodes the run one character at a time: a
valid UTF-8 sequence becomes its character, each byte that does not start one becomes a U+FFFD
(``"中"`` plus a truncated character is ``"中��"`` there, five U+FFFD in ``ByteFallback``). No
decoder step sees its neighbours, so the run cannot be cut per character inside the pipeline;
:func:`split_byte_runs` does it before the pipeline runs (see ``tokenizer.SentencePieceTokenizer``).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from loguru import logger
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE

from lmms_sgl.checkpoints.internvl_original.sentencepiece_model import (
    ModelType,
    PieceType,
    SentencePieceModel,
    read_sentencepiece_model,
)

Prefix = Literal["chunk", "first", "none"]
SPACE = "▁"
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def byte_of(token: str) -> int | None:
    """The byte a byte-fallback piece (``<0xE4>``) stands for, as the ``ByteFallback`` decoder reads it."""
    match = _BYTE_PIECE.fullmatch(token)
    return int(match.group(1), 16) if match else None


def _utf8_length(lead: int) -> int:
    """Bytes of the UTF-8 sequence ``lead`` starts, by its high bits (SentencePiece's DecodeUTF8)."""
    if lead < 0x80:
        return 1
    if lead & 0xE0 == 0xC0:
        return 2
    if lead & 0xF0 == 0xE0:
        return 3
    if lead & 0xF8 == 0xF0:
        return 4
    return 0  # a continuation byte or 0xF8-0xFF: never starts a character


def character_groups(data: bytes) -> list[int]:
    """Lengths that cut ``data`` as SentencePiece decodes byte pieces: each well-formed UTF-8
    character (no overlong forms, surrogates or code points above U+10FFFF) is one group, every
    other byte a group of its own (one U+FFFD)."""
    groups, offset = [], 0
    while offset < len(data):
        length = _utf8_length(data[offset])
        try:
            valid = length > 0 and offset + length <= len(data)
            if valid:
                data[offset : offset + length].decode("utf-8")
        except UnicodeDecodeError:
            valid = False
        groups.append(length if valid else 1)
        offset += groups[-1]
    return groups


def split_byte_runs(tokens: list[str]) -> list[str]:
    """``tokens`` with an empty token between the characters of each run of byte pieces.

    The ``ByteFallback`` decoder decodes each run between two non-byte tokens on its own, and an
    empty token decodes to nothing, so the pipeline then gives SentencePiece's text.
    """
    out: list[str] = []
    run: list[str] = []

    def flush() -> None:
        start = 0
        for length in character_groups(bytes(byte_of(t) for t in run)):
            if start:
                out.append("")
            out.extend(run[start : start + length])
            start += length
        run.clear()

    for token in tokens:
        if byte_of(token) is not None:
            run.append(token)
            continue
        flush()
        out.append(token)
    flush()
    return out


def _merges(model: SentencePieceModel, pieces: list[str], mergeable: set[int]) -> list[tuple[str, str]]:
    """BPE merges ranked like SentencePiece merges: higher merged-piece score first, then lower id.

    SentencePiece merges the adjacent pair whose concatenation is the best-scored piece; a merge
    list ordered by that score makes ``tokenizers`` pick the same pair.
    """
    index = {pieces[i]: i for i in mergeable}
    merges = []
    for piece_id in sorted(mergeable, key=lambda i: (-model.pieces[i].score, i)):
        piece = pieces[piece_id]
        splits = [(piece[:cut], piece[cut:]) for cut in range(1, len(piece))]
        found = [(index[a], index[b], a, b) for a, b in splits if a in index and b in index]
        merges += [(a, b) for _, _, a, b in sorted(found)]
    return merges


def _check_supported(model: SentencePieceModel, path: Path, prefix: Prefix) -> None:
    if model.trainer.model_type != ModelType.BPE:
        raise ValueError(
            f"{path}: SentencePiece model_type is {model.trainer.model_type.name}; only BPE models "
            "(InternLM2, Llama, Phi-3, Yi) are converted"
        )
    if model.trainer.treat_whitespace_as_suffix:
        raise ValueError(f"{path}: treat_whitespace_as_suffix=true is not supported")
    if model.normalizer.name not in ("", "identity") and not model.normalizer.precompiled_charsmap:
        raise ValueError(
            f"{path}: normalizer {model.normalizer.name!r} has no precompiled_charsmap; "
            "only identity or precompiled normalisation can be reproduced"
        )
    if prefix == "first" and model.normalizer.remove_extra_whitespaces:
        raise ValueError(
            f"{path}: remove_extra_whitespaces=true with a start-only dummy prefix is not supported"
        )
    scores = [p.score for p in model.pieces if p.type == PieceType.NORMAL and len(p.piece) > 1]
    if len(set(scores)) != len(scores):
        # SentencePiece breaks score ties by position, a merge list by rank: rare texts may differ
        logger.warning(f"{path}: some multi-character BPE pieces share a score; ties are ranked by id")


def _normalizer(model: SentencePieceModel, prefix: Prefix):
    spec, steps = model.normalizer, []
    if spec.precompiled_charsmap:
        steps.append(normalizers.Precompiled(spec.precompiled_charsmap))
    if spec.remove_extra_whitespaces:  # SentencePiece strips and collapses plain spaces only
        steps += [normalizers.Replace(Regex(r"\A +| +\z"), ""), normalizers.Replace(Regex(" {2,}"), " ")]
    if prefix == "chunk" and spec.add_dummy_prefix:
        steps.append(normalizers.Prepend(SPACE))  # skipped on empty chunks, as in SentencePiece
    if spec.escape_whitespaces and prefix != "first":
        steps.append(normalizers.Replace(" ", SPACE))
    return normalizers.Sequence(steps) if steps else None


def sentencepiece_backend(
    model_file: Path, renamed: dict[int, AddedToken], prefix: Prefix = "chunk"
) -> Tokenizer:
    """Build the backend; ``renamed`` gives added tokens that take over ids inside the model's range.

    Control and unknown pieces become special added tokens, user-defined pieces plain added tokens
    matched on normalised text (as SentencePiece matches them); pieces renamed by the tokenizer
    config keep their id under the new name.
    """
    model = read_sentencepiece_model(Path(model_file))
    _check_supported(model, Path(model_file), prefix)
    out_of_range = sorted(i for i in renamed if not 0 <= i < len(model.pieces))
    if out_of_range:
        raise ValueError(f"renamed token ids {out_of_range} are outside the SentencePiece vocabulary")
    pieces = [renamed[i].content if i in renamed else p.piece for i, p in enumerate(model.pieces)]
    if len(set(pieces)) != len(pieces):
        raise ValueError(f"{model_file}: duplicate pieces after applying the tokenizer config's added tokens")
    mergeable = {i for i, p in enumerate(model.pieces) if p.type == PieceType.NORMAL and i not in renamed}
    backend = Tokenizer(
        BPE(
            {piece: i for i, piece in enumerate(pieces)},
            _merges(model, pieces, mergeable),
            unk_token=pieces[model.trainer.unk_id] if model.trainer.unk_id >= 0 else None,
            fuse_unk=True,
            byte_fallback=model.trainer.byte_fallback,
        )
    )
    backend.normalizer = _normalizer(model, prefix)
    if prefix == "first":
        scheme = "first" if model.normalizer.add_dummy_prefix else "never"
        backend.pre_tokenizer = pre_tokenizers.Metaspace(
            replacement=SPACE, prepend_scheme=scheme, split=False
        )
    steps = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if model.normalizer.add_dummy_prefix and prefix != "none":
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    backend.decoder = decoders.Sequence(steps)

    added = []
    for i, piece in enumerate(model.pieces):
        if i in renamed:
            added.append(renamed[i])
        elif piece.type in (PieceType.CONTROL, PieceType.UNKNOWN):
            added.append(AddedToken(piece.piece, special=True, normalized=False))
        elif piece.type == PieceType.USER_DEFINED:
            added.append(AddedToken(piece.piece, special=False, normalized=True))
    # already in the vocabulary, so their ids do not change
    backend.add_special_tokens([t for t in added if t.special])
    backend.add_tokens([t for t in added if not t.special])
    return backend
