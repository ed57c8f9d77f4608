"""Tokenizers of the original InternVL checkpoints as transformers-native fast tokenizers.

The original repositories name remote tokenizer classes (``InternLM2Tokenizer`` through ``auto_map``)
or slow SentencePiece classes. We rebuild each as a ``tokenizers`` backend with the ids the original
``chat()`` sees, wrap it in ``PreTrainedTokenizerFast`` (saved as ``tokenizer.json``; loads through
``AutoTokenizer`` without remote code) and add what transformers' ``InternVLProcessor`` needs: the
``start_image_token`` / ``end_image_token`` / ``context_image_token`` / ``video_token`` names, left
padding, and the template's stop token as EOS. The vocabulary stays exactly the checkpoint's (its
embedding rows): the original tokenizers have no video token and these checkpoints take no video
here, so ``video_token`` names ``</img>``, a token that never occurs in a prompt before the image
expansion (``InternVLProcessor`` only looks for it there).

* InternLM2 / InternLM2.5 (``tokenizer.model``): SentencePiece on every chunk between added tokens,
  BOS first (InternLM2Tokenizer semantics).
* Phi-3, Yi (``tokenizer.model``): LlamaTokenizer semantics, ``legacy`` read from the config.
* Qwen2 (``vocab.json`` + ``merges.txt``): transformers' own ``Qwen2Tokenizer``.
* Llama-3 (``tokenizer.json`` only): the file itself.

The SentencePiece ones are :class:`SentencePieceTokenizer`: ids, pieces and saved files are those of a
plain ``PreTrainedTokenizerFast``; only decoding differs, to give SentencePiece's text for runs of
byte-fallback pieces that are not valid UTF-8 (see ``sentencepiece_convert``). The saved
``tokenizer_config.json`` names ``TokenizersBackend``, so plain ``AutoTokenizer`` / ``AutoProcessor``
load the folder in any transformers version (they decode such runs as the ``ByteFallback`` decoder
does: one U+FFFD per byte of the run); ``processing.load_processor`` loads it as
:class:`SentencePieceTokenizer` (whenever its decoder has a ``ByteFallback`` step), with the exact
decoding.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from loguru import logger
from tokenizers import AddedToken, Tokenizer, processors
from transformers import PreTrainedTokenizerFast

from lmms_sgl.checkpoints.internvl_original.sentencepiece_convert import (
    byte_of,
    sentencepiece_backend,
    split_byte_runs,
)
from lmms_sgl.checkpoints.internvl_original.templates import conversation_format

INTERNVL_TOKENS = {
    "start_image_token": "<img>",
    "end_image_token": "</img>",
    "context_image_token": "<IMG_CONTEXT>",
}
VIDEO_TOKEN = "</img>"  # see the module docstring: no new token, so the vocabulary keeps its size
TEXT_ARCHITECTURES = {
    "InternLM2ForCausalLM": "internlm2",
    "Qwen2ForCausalLM": "qwen2",
    "Phi3ForCausalLM": "phi3",
    "LlamaForCausalLM": "llama",
}
MODEL_MAX_LENGTH = 32768


class SentencePieceTokenizer(PreTrainedTokenizerFast):
    """A fast tokenizer that decodes runs of byte-fallback pieces as SentencePiece does.

    Each run is cut into characters before the backend's own decoder pipeline runs
    (:func:`split_byte_runs`), so everything else (spaces, added tokens, the dummy prefix) decodes
    exactly as before. Saved as ``TokenizersBackend`` (see the module docstring).
    """

    def _byte_ids(self) -> frozenset[int]:
        """Ids of the byte-fallback pieces (the model vocabulary never changes after loading)."""
        if getattr(self, "_byte_id_set", None) is None:
            vocab = self.backend_tokenizer.get_vocab(with_added_tokens=False)
            self._byte_id_set = frozenset(i for token, i in vocab.items() if byte_of(token) is not None)
        return self._byte_id_set

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return super().convert_tokens_to_string(split_byte_runs(list(tokens)))

    def _decode(
        self,
        token_ids: int | list[int],
        skip_special_tokens: bool = False,
        clean_up_tokenization_spaces: bool | None = None,
        **kwargs,
    ) -> str:
        ids = [token_ids] if isinstance(token_ids, int) else token_ids
        ids = ids["input_ids"] if isinstance(ids, dict) else list(ids)
        if self._byte_ids().isdisjoint(ids):  # nothing to cut: the backend's own decode
            return super()._decode(ids, skip_special_tokens, clean_up_tokenization_spaces, **kwargs)
        backend = self.backend_tokenizer
        # the tokens the backend's decode feeds its decoder: unknown ids dropped, special ones if asked
        special = {i for i, t in backend.get_added_tokens_decoder().items() if t.special}
        tokens = [
            token
            for i in ids
            if not (skip_special_tokens and i in special) and (token := backend.id_to_token(i)) is not None
        ]
        text = self.convert_tokens_to_string(tokens)
        # the base class cleans up only non-BPE output (or when forced); these backends are BPE
        if (
            clean_up_tokenization_spaces
            if clean_up_tokenization_spaces is not None
            else self.clean_up_tokenization_spaces
        ) and getattr(self, "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output", False):
            text = self.clean_up_tokenization(text)
        return text

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Save as a plain ``TokenizersBackend``: loadable without lmms_sgl, in any transformers."""
        files = super().save_pretrained(save_directory, *args, **kwargs)
        config_file = Path(save_directory) / "tokenizer_config.json"
        config = json.loads(config_file.read_text(encoding="utf-8"))
        config["tokenizer_class"] = "TokenizersBackend"
        config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        return files


def decodes_byte_fallback(backend: Tokenizer) -> bool:
    """Whether the backend's decoder has a ``ByteFallback`` step (the SentencePiece conversions)."""
    if backend.decoder is None:
        return False
    decoder = json.loads(backend.to_str()).get("decoder") or {}
    steps = decoder.get("decoders", [decoder]) if decoder.get("type") == "Sequence" else [decoder]
    return any(step.get("type") == "ByteFallback" for step in steps)


def text_arch(original_config: dict) -> str:
    """``internlm2`` / ``qwen2`` / ``phi3`` / ``llama`` from ``llm_config.architectures``."""
    archs = (original_config.get("llm_config") or {}).get("architectures") or []
    if len(archs) != 1 or archs[0] not in TEXT_ARCHITECTURES:
        raise ValueError(
            f"config.json field 'llm_config.architectures' is {archs!r}; "
            f"supported: {sorted(TEXT_ARCHITECTURES)}"
        )
    return TEXT_ARCHITECTURES[archs[0]]


def read_tokenizer_config(src_dir: Path) -> dict:
    path = Path(src_dir) / "tokenizer_config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: every original InternVL checkpoint ships one")
    return json.loads(path.read_text(encoding="utf-8"))


def _added_tokens(config: dict) -> dict[int, AddedToken]:
    """``added_tokens_decoder`` as AddedTokens, by id."""
    tokens = {}
    for key, spec in (config.get("added_tokens_decoder") or {}).items():
        if not isinstance(spec, dict) or "content" not in spec:
            raise ValueError(f"tokenizer_config.json added_tokens_decoder[{key!r}] has no 'content'")
        tokens[int(key)] = AddedToken(
            spec["content"],
            single_word=spec.get("single_word", False),
            lstrip=spec.get("lstrip", False),
            rstrip=spec.get("rstrip", False),
            normalized=spec.get("normalized", False),
            special=spec.get("special", True),
        )
    return tokens


def _add_by_id(backend: Tokenizer, tokens: dict[int, AddedToken]) -> None:
    """Add tokens beyond the base vocabulary, checking each lands on the id the checkpoint gives it."""
    for token_id in sorted(tokens):
        token = tokens[token_id]
        current = backend.token_to_id(token.content)
        if current == token_id:
            (backend.add_special_tokens if token.special else backend.add_tokens)([token])
            continue
        expected = backend.get_vocab_size(with_added_tokens=True)
        if current is not None or token_id != expected:
            raise ValueError(
                f"added token {token.content!r} has id {token_id} in tokenizer_config.json, but the "
                f"vocabulary gives it {current if current is not None else f'the next free id {expected}'}"
            )
        (backend.add_special_tokens if token.special else backend.add_tokens)([token])


def _bos_post_processor(backend: Tokenizer, bos: str | None, eos: str | None, add_bos: bool, add_eos: bool):
    single = " ".join(([f"{bos}:0"] if add_bos else []) + ["$A:0"] + ([f"{eos}:0"] if add_eos else []))
    second = ([f"{bos}:1"] if add_bos else []) + ["$B:1"] + ([f"{eos}:1"] if add_eos else [])
    pair = single + " " + " ".join(second)
    special = [(t, backend.token_to_id(t)) for t, on in ((bos, add_bos), (eos, add_eos)) if on]
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)


def _token(value) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


def _sentencepiece(src_dir: Path, config: dict, arch: str) -> Tokenizer:
    added = _added_tokens(config)
    model_file = Path(src_dir) / "tokenizer.model"
    size = _sentencepiece_size(model_file)
    if arch == "internlm2":
        prefix = "chunk"
    elif config.get("legacy", True) in (True, None):
        prefix = "chunk"  # legacy LlamaTokenizer (the default then): SentencePiece on every chunk
    else:  # legacy=false: one "▁" before the whole text (unless add_prefix_space=false), none per chunk
        prefix = "first" if config.get("add_prefix_space", True) is not False else "none"
    backend = sentencepiece_backend(model_file, {i: t for i, t in added.items() if i < size}, prefix)
    _add_by_id(backend, {i: t for i, t in added.items() if i >= size})
    bos, eos = _token(config.get("bos_token", "<s>")), _token(config.get("eos_token", "</s>"))
    add_bos, add_eos = config.get("add_bos_token", True), config.get("add_eos_token", False)
    backend.post_processor = _bos_post_processor(backend, bos, eos, add_bos, add_eos)
    return backend


def _sentencepiece_size(model_file: Path) -> int:
    from lmms_sgl.checkpoints.internvl_original.sentencepiece_model import read_sentencepiece_model

    return len(read_sentencepiece_model(model_file).pieces)


def _qwen2(src_dir: Path, config: dict) -> Tokenizer:
    """transformers' Qwen2Tokenizer from vocab.json/merges.txt, ignoring any remote class in the config."""
    from transformers import Qwen2Tokenizer

    clean = {k: v for k, v in config.items() if k not in ("auto_map", "tokenizer_class", "chat_template")}
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("vocab.json", "merges.txt"):
            if not (Path(src_dir) / name).is_file():
                raise FileNotFoundError(f"{Path(src_dir) / name} is missing (Qwen2 tokenizer)")
            shutil.copy(Path(src_dir) / name, Path(tmp) / name)
        (Path(tmp) / "tokenizer_config.json").write_text(json.dumps(clean), encoding="utf-8")
        native = Qwen2Tokenizer.from_pretrained(tmp)
    backend = Tokenizer.from_str(native.backend_tokenizer.to_str())
    _add_by_id(backend, _added_tokens(config))
    return backend


def _tokenizer_json(src_dir: Path, config: dict) -> Tokenizer:
    backend = Tokenizer.from_file(str(Path(src_dir) / "tokenizer.json"))
    _add_by_id(backend, _added_tokens(config))
    return backend


def backend_tokenizer(src_dir: Path, original_config: dict) -> tuple[Tokenizer, dict]:
    """The backend with the original ids, and the checkpoint's tokenizer_config.json."""
    src_dir = Path(src_dir)
    arch, config = text_arch(original_config), read_tokenizer_config(src_dir)
    if arch == "qwen2":
        return _qwen2(src_dir, config), config
    if (src_dir / "tokenizer.model").is_file():
        return _sentencepiece(src_dir, config, arch), config
    if arch == "llama" and (src_dir / "tokenizer.json").is_file():
        return _tokenizer_json(src_dir, config), config
    raise FileNotFoundError(f"{src_dir}: no tokenizer.model (SentencePiece) or tokenizer.json for {arch}")


def build_tokenizer(src_dir: Path, original_config: dict):
    """A ``PreTrainedTokenizerFast`` with the original ids plus the names ``InternVLProcessor`` needs
    (a :class:`SentencePieceTokenizer` for SentencePiece models)."""
    fmt = conversation_format(original_config.get("template"))
    backend, config = backend_tokenizer(src_dir, original_config)
    missing = [t for t in [*INTERNVL_TOKENS.values(), fmt.stop_token] if backend.token_to_id(t) is None]
    if missing:
        raise ValueError(f"{src_dir}: the tokenizer lacks InternVL's tokens {missing}")
    pad = _token(config.get("pad_token")) or _token(config.get("eos_token"))
    unk = _token(config.get("unk_token"))
    bos = _token(config.get("bos_token"))
    kind = SentencePieceTokenizer if decodes_byte_fallback(backend) else PreTrainedTokenizerFast
    tokenizer = kind(
        tokenizer_object=backend,
        bos_token=bos,
        eos_token=fmt.stop_token,  # the original chat() stops here
        unk_token=unk,
        pad_token=pad,
        padding_side="left",
        model_max_length=MODEL_MAX_LENGTH,
        clean_up_tokenization_spaces=False,
        extra_special_tokens={**INTERNVL_TOKENS, "video_token": VIDEO_TOKEN},
    )
    logger.debug(f"tokenizer from {src_dir}: {len(tokenizer)} tokens, stop {fmt.stop_token!r}")
    return tokenizer
