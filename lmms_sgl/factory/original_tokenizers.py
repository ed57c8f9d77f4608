"""Tiny, deterministic tokenizer files in the layouts of the original InternVL checkpoints.

The offline model factory needs tokenizers shaped like the real ones (same files, same kind of
config, same special tokens at the end of the vocabulary) but small, so tiny models stay tiny:

* ``internlm2``: a SentencePiece BPE ``tokenizer.model`` (byte fallback, identity normalisation,
  dummy prefix) trained here with ``sentencepiece`` on a fixed English/Chinese/digit/whitespace
  corpus, with InternLM2's reserved pieces at the end of the vocabulary renamed by
  ``tokenizer_config.json`` to ``<|plugin|>`` ... ``<|im_start|>``, followed by InternVL's added
  tokens, and ``auto_map`` to the remote ``InternLM2Tokenizer`` as in the real repositories.
* ``phi3`` / ``llama``: a SentencePiece ``tokenizer.model`` with a LlamaTokenizer config (Phi-3's
  chat tokens; Yi / Hermes' ChatML tokens).
* ``qwen2``: byte-level BPE ``vocab.json`` + ``merges.txt`` with Qwen2's special tokens.
* ``llama3``: only a byte-level ``tokenizer.json`` (BOS ``<|begin_of_text|>`` added by its
  post-processor) with ChatML tokens, as the Llama-3-based InternVL2-76B ships.

``write_tokenizer(dst, text_arch)`` writes the files; two calls give identical bytes.
"""

from __future__ import annotations

import io
import json
import struct
from pathlib import Path

CORPUS = [
    "What color is the circle? Answer the question using a single word or phrase.",
    "How many blue objects are there in the image? There are 3 blue objects.",
    "The quick brown fox jumps over the lazy dog.",
    "Describe the picture in detail, please.",
    "def main():\n    return 42\n\n\nif __name__ == '__main__':\n    main()",
    "numbers 0123456789 3.1415 2024-11-21 100% 7 x 8 = 56",
    "你好，世界。图片里有什么？请用一个词回答问题。",
    "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。",  # noqa: E501
    "这是一个红色的圆形，旁边有两个蓝色的方块。",
    "spaces  between   words    and\ttabs\tand\nnew\n\nlines",
    "left right top bottom middle center red green blue yellow purple orange black white",
]
INTERNLM2_RESERVED = [
    "<|plugin|>",
    "<|interpreter|>",
    "<|action_end|>",
    "<|action_start|>",
    "<|im_end|>",
    "<|im_start|>",
]
INTERNVL_ADDED = [
    "<img>",
    "</img>",
    "<IMG_CONTEXT>",
    "<quad>",
    "</quad>",
    "<ref>",
    "</ref>",
    "<box>",
    "</box>",
]
PHI3_ADDED = [
    "<|endoftext|>",
    "<|assistant|>",
    "<|placeholder1|>",
    "<|placeholder2|>",
    "<|placeholder3|>",
    "<|placeholder4|>",
    "<|system|>",
    "<|end|>",
    "<|placeholder5|>",
    "<|placeholder6|>",
    "<|user|>",
]
TEXT_ARCHS = ("internlm2", "qwen2", "phi3", "llama", "llama3")


def _spec(content: str, special: bool = True, rstrip: bool = False) -> dict:
    return {
        "content": content,
        "lstrip": False,
        "normalized": False,
        "rstrip": rstrip,
        "single_word": False,
        "special": special,
    }


def _train_sentencepiece(vocab_size: int, add_dummy_prefix: bool = True, **extra) -> bytes:
    """A BPE model trained single-threaded on the fixed corpus (deterministic)."""
    import sentencepiece as spm

    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 20),
        model_writer=out,
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        character_coverage=1.0,
        normalization_rule_name="identity",
        add_dummy_prefix=add_dummy_prefix,
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        split_digits=True,
        shuffle_input_sentence=False,
        num_threads=1,
        minloglevel=2,
        **extra,
    )
    return out.getvalue()


def _piece_field(piece: str, piece_type: int) -> bytes:
    """A serialised ``ModelProto.pieces`` entry (field 1): piece, score 0, type."""
    text = piece.encode("utf-8")
    body = (
        b"\x0a" + bytes([len(text)]) + text + b"\x15" + struct.pack("<f", 0.0) + b"\x18" + bytes([piece_type])
    )
    return b"\x0a" + bytes([len(body)]) + body


def _append_reserved(model: bytes, names: list[str]) -> bytes:
    """Append control pieces at the end of the vocabulary, as InternLM2's reserved tokens are."""
    return model + b"".join(_piece_field(name, 3) for name in names)


def _write_json(path: Path, value: dict) -> None:
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False, sort_keys=True) + "\n", encoding="utf-8")


def _internlm2(dst: Path) -> None:
    placeholders = [f"[UNUSED_TOKEN_{141 + i}]" for i in range(len(INTERNLM2_RESERVED))]
    model = _append_reserved(_train_sentencepiece(560), placeholders)
    (dst / "tokenizer.model").write_bytes(model)
    import sentencepiece as spm

    size = spm.SentencePieceProcessor(model_proto=model).get_piece_size()
    first_reserved = size - len(INTERNLM2_RESERVED)
    decoder = {"0": _spec("<unk>"), "1": _spec("<s>"), "2": _spec("</s>")}
    decoder |= {str(first_reserved + i): _spec(t) for i, t in enumerate(INTERNLM2_RESERVED)}
    decoder |= {str(size + i): _spec(t) for i, t in enumerate(INTERNVL_ADDED)}
    _write_json(
        dst / "tokenizer_config.json",
        {
            "add_bos_token": True,
            "add_eos_token": False,
            "added_tokens_decoder": decoder,
            "additional_special_tokens": INTERNLM2_RESERVED[::-1],
            "auto_map": {
                "AutoTokenizer": [
                    "tokenization_internlm2.InternLM2Tokenizer",
                    "tokenization_internlm2_fast.InternLM2TokenizerFast",
                ]
            },
            "bos_token": "<s>",
            "chat_template": "{{ bos_token }}{% for message in messages %}{{'<|im_start|>' + "
            "message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}",
            "clean_up_tokenization_spaces": False,
            "decode_with_prefix_space": False,
            "eos_token": "</s>",
            "model_max_length": 8192,
            "pad_token": "</s>",
            "sp_model_kwargs": None,
            "tokenizer_class": "InternLM2Tokenizer",
            "unk_token": "<unk>",
        },
    )


def _llama_like(dst: Path, added: list[str], legacy: bool, rstrip: set[str]) -> None:
    """SentencePiece tokenizer.model + LlamaTokenizer config with chat tokens appended after the model."""
    model = _train_sentencepiece(560)
    (dst / "tokenizer.model").write_bytes(model)
    import sentencepiece as spm

    size = spm.SentencePieceProcessor(model_proto=model).get_piece_size()
    tokens = added + INTERNVL_ADDED
    decoder = {"0": _spec("<unk>"), "1": _spec("<s>"), "2": _spec("</s>")}
    decoder |= {str(size + i): _spec(t, rstrip=t in rstrip) for i, t in enumerate(tokens)}
    _write_json(
        dst / "tokenizer_config.json",
        {
            "add_bos_token": True,
            "add_eos_token": False,
            "added_tokens_decoder": decoder,
            "bos_token": "<s>",
            "clean_up_tokenization_spaces": False,
            "eos_token": "</s>" if "<|endoftext|>" not in added else "<|endoftext|>",
            "legacy": legacy,
            "model_max_length": 4096,
            "pad_token": "<unk>" if "<|endoftext|>" not in added else "<|endoftext|>",
            "sp_model_kwargs": {},
            "tokenizer_class": "LlamaTokenizer",
            "unk_token": "<unk>",
            "use_default_system_prompt": False,
        },
    )


def _byte_level_bpe():
    """A byte-level BPE trained with ``tokenizers`` on the fixed corpus (deterministic)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    backend.train_from_iterator(CORPUS * 20, trainer=trainer)
    return backend


def _llama3(dst: Path) -> None:
    """tokenizer.json only, with a BOS post-processor and ChatML + InternVL tokens after the BPE."""
    from tokenizers import AddedToken, processors

    backend = _byte_level_bpe()
    size = backend.get_vocab_size(with_added_tokens=True)
    tokens = ["<|begin_of_text|>", "<|end_of_text|>", "<|im_start|>", "<|im_end|>"] + INTERNVL_ADDED
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in tokens])
    bos = size  # <|begin_of_text|>
    backend.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A",
        pair="<|begin_of_text|> $A <|begin_of_text|> $B:1",
        special_tokens=[("<|begin_of_text|>", bos)],
    )
    (dst / "tokenizer.json").write_text(backend.to_str(pretty=True) + "\n", encoding="utf-8")
    _write_json(
        dst / "tokenizer_config.json",
        {
            "added_tokens_decoder": {str(size + i): _spec(t) for i, t in enumerate(tokens)},
            "bos_token": "<|begin_of_text|>",
            "clean_up_tokenization_spaces": True,
            "eos_token": "<|im_end|>",
            "model_input_names": ["input_ids", "attention_mask"],
            "model_max_length": 8192,
            "pad_token": "<|end_of_text|>",
            "tokenizer_class": "PreTrainedTokenizerFast",
        },
    )


def _qwen2(dst: Path) -> None:
    """Byte-level BPE vocab.json/merges.txt, as Qwen2 ships them."""
    backend = _byte_level_bpe()
    model = json.loads(backend.to_str())["model"]
    vocab, merges = model["vocab"], model["merges"]
    (dst / "vocab.json").write_text(
        json.dumps(vocab, ensure_ascii=False, sort_keys=True) + "\n", encoding="utf-8"
    )
    lines = [" ".join(m) if isinstance(m, list) else m for m in merges]
    (dst / "merges.txt").write_text("#version: 0.2\n" + "\n".join(lines) + "\n", encoding="utf-8")
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    decoder = {str(len(vocab) + i): _spec(t) for i, t in enumerate(specials + INTERNVL_ADDED)}
    _write_json(
        dst / "tokenizer_config.json",
        {
            "add_prefix_space": False,
            "added_tokens_decoder": decoder,
            "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
            "bos_token": None,
            "clean_up_tokenization_spaces": False,
            "eos_token": "<|im_end|>",
            "errors": "replace",
            "model_max_length": 32768,
            "pad_token": "<|endoftext|>",
            "split_special_tokens": False,
            "tokenizer_class": "Qwen2Tokenizer",
            "unk_token": None,
        },
    )


def write_tokenizer(dst: Path, text_arch: str) -> Path:
    """Write the tokenizer files of one original layout into ``dst`` (created if needed)."""
    if text_arch not in TEXT_ARCHS:
        raise ValueError(f"text_arch={text_arch!r}; allowed: {list(TEXT_ARCHS)}")
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    if text_arch == "internlm2":
        _internlm2(dst)
    elif text_arch == "qwen2":
        _qwen2(dst)
    elif text_arch == "llama3":
        _llama3(dst)
    elif text_arch == "phi3":
        # Phi-3-mini's chat tokens follow its 32000 SentencePiece pieces; several strip the space after them.
        _llama_like(
            dst, PHI3_ADDED, legacy=False, rstrip={"<|assistant|>", "<|end|>", "<|user|>", "<|system|>"}
        )
    else:  # Yi-based InternVL2-40B: a SentencePiece Llama tokenizer with ChatML tokens
        _llama_like(dst, ["<|im_start|>", "<|im_end|>", "<|endoftext|>"], legacy=True, rstrip=set())
    return dst
