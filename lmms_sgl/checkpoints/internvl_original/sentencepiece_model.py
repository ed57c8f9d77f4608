"""Read a SentencePiece ``tokenizer.model`` without the generated protobuf module.

The ``sentencepiece_model_pb2`` shipped with ``sentencepiece`` 0.2.x is generated for protobuf 7 and
refuses to import under the protobuf 6 runtime that lmms-eval pins, which also breaks transformers'
own SentencePiece conversion. The model file is a small, stable protobuf message, so we decode the
few fields a tokenizer conversion needs straight from the wire format.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path


class PieceType(IntEnum):
    NORMAL = 1
    UNKNOWN = 2
    CONTROL = 3
    USER_DEFINED = 4
    UNUSED = 5
    BYTE = 6


class ModelType(IntEnum):
    UNIGRAM = 1
    BPE = 2
    WORD = 3
    CHAR = 4


@dataclass(frozen=True)
class Piece:
    piece: str
    score: float
    type: PieceType


@dataclass
class NormalizerSpec:
    # Defaults are the proto2 defaults of sentencepiece_model.proto: absent fields mean these.
    name: str = ""
    precompiled_charsmap: bytes = b""
    add_dummy_prefix: bool = True
    remove_extra_whitespaces: bool = True
    escape_whitespaces: bool = True


@dataclass
class TrainerSpec:
    model_type: ModelType = ModelType.UNIGRAM
    byte_fallback: bool = False
    treat_whitespace_as_suffix: bool = False
    unk_id: int = 0
    bos_id: int = 1
    eos_id: int = 2
    pad_id: int = -1


@dataclass
class SentencePieceModel:
    pieces: list[Piece] = field(default_factory=list)
    trainer: TrainerSpec = field(default_factory=TrainerSpec)
    normalizer: NormalizerSpec = field(default_factory=NormalizerSpec)


# field numbers from sentencepiece_model.proto
_PIECE_FIELDS = {1: "piece", 2: "score", 3: "type"}
_NORMALIZER_FIELDS = {
    1: "name",
    2: "precompiled_charsmap",
    3: "add_dummy_prefix",
    4: "remove_extra_whitespaces",
    5: "escape_whitespaces",
}
_TRAINER_FIELDS = {
    3: "model_type",
    24: "treat_whitespace_as_suffix",
    35: "byte_fallback",
    40: "unk_id",
    41: "bos_id",
    42: "eos_id",
    43: "pad_id",
}


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if pos >= len(data):
            raise ValueError("truncated varint in SentencePiece model")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def _fields(data: bytes):
    """Yield ``(field_number, wire_type, value)``; value is int, bytes or a 4/8-byte blob."""
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(data, pos)
        elif wire == 1:
            value, pos = data[pos : pos + 8], pos + 8
        elif wire == 2:
            length, pos = _varint(data, pos)
            value, pos = data[pos : pos + length], pos + length
        elif wire == 5:
            value, pos = data[pos : pos + 4], pos + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire} in SentencePiece model")
        if pos > len(data):
            raise ValueError("truncated field in SentencePiece model")
        yield number, wire, value


def _signed(value: int) -> int:
    """int32 fields are sign-extended to 64 bits on the wire (pad_id = -1)."""
    return value - (1 << 64) if value >= 1 << 63 else value


def _piece(data: bytes) -> Piece:
    values: dict = {"piece": "", "score": 0.0, "type": PieceType.NORMAL}
    for number, _, value in _fields(data):
        name = _PIECE_FIELDS.get(number)
        if name == "piece":
            values[name] = value.decode("utf-8")
        elif name == "score":
            values[name] = struct.unpack("<f", value)[0]
        elif name == "type":
            values[name] = PieceType(value)
    return Piece(**values)


def read_sentencepiece_model(path: Path) -> SentencePieceModel:
    """Parse pieces, trainer and normalizer specs of a ``.model`` file."""
    data = Path(path).read_bytes()
    model = SentencePieceModel()
    for number, _, value in _fields(data):
        if number == 1:
            model.pieces.append(_piece(value))
        elif number == 2:
            for sub, _, sub_value in _fields(value):
                name = _TRAINER_FIELDS.get(sub)
                if name == "model_type":
                    model.trainer.model_type = ModelType(sub_value)
                elif name in ("treat_whitespace_as_suffix", "byte_fallback"):
                    setattr(model.trainer, name, bool(sub_value))
                elif name is not None:
                    setattr(model.trainer, name, _signed(sub_value))
        elif number == 3:
            for sub, _, sub_value in _fields(value):
                name = _NORMALIZER_FIELDS.get(sub)
                if name == "name":
                    model.normalizer.name = sub_value.decode("utf-8")
                elif name == "precompiled_charsmap":
                    model.normalizer.precompiled_charsmap = bytes(sub_value)
                elif name in ("add_dummy_prefix", "remove_extra_whitespaces", "escape_whitespaces"):
                    setattr(model.normalizer, name, bool(sub_value))
    if not model.pieces:
        raise ValueError(f"{path} holds no SentencePiece pieces (not a SentencePiece model?)")
    return model
