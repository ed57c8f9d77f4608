"""Processing of original InternVL checkpoints: tokenizer ids, prompts and tiling equal the originals.

Each reference here is written independently of ``lmms_sgl.checkpoints.internvl_original`` from the original
code's documented behaviour: the slow tokenizers (added tokens cut out, SentencePiece on the rest,
BOS first), the original ``chat()`` prompt building (MPT separator style, ``<image>\\n`` before the
question replaced by the image tokens) and InternVL's ``dynamic_preprocess`` (PIL + numpy/torch).
"""

from __future__ import annotations

import io
import json
import random
import re
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import torch
from PIL import Image

from lmms_sgl.checkpoints.internvl_original.processing import build_processor, load_processor, stop_token_ids
from lmms_sgl.checkpoints.internvl_original.tokenizer import build_tokenizer
from lmms_sgl.factory import original_tokenizers as fixtures

ARCHITECTURES = {
    "internlm2": "InternLM2ForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "phi3": "Phi3ForCausalLM",
    "llama": "LlamaForCausalLM",  # Yi (InternVL2-40B): SentencePiece
    "llama3": "LlamaForCausalLM",  # Llama-3 (InternVL2-76B): tokenizer.json only
}
MIXED_TEXTS = [
    "Hello world",
    "What color is the circle? Answer the question using a single word or phrase.",
    "  leading and trailing spaces  ",
    "a  b   c    d",
    "lines\nand\n\nmore\n\n\nlines\n",
    "tabs\tand\t\tspaces \t mixed",
    "你好，世界。图片里有什么？",
    "混合 mixed 中文 and English 123",
    "0123456789 3.14159 2024-11-21 1,000,000",
    "emoji 😀 accents ü é ñ and rare 龘",
    "\n",
    " ",
    "",
    "▁odd ▁ markers",
    "def f(x):\n    return x  # comment\n",
    "<|im_start|>system\nsys<|im_end|><|im_start|>user\nWhat?<|im_end|><|im_start|>assistant\n",
    "<img><IMG_CONTEXT><IMG_CONTEXT></img>\nquestion",
    "x<s>y</s>z<unk>w",
    "<|plugin|><|interpreter|><|action_start|><|action_end|>",
    "<quad></quad><ref>the dog</ref><box>[[1, 2, 3, 4]]</box>",
    "<|im_end|> space after\nand <|im_start|>before",
]
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32).reshape(3, 1, 1)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32).reshape(3, 1, 1)


def original_config(arch: str, template: str) -> dict:
    return {
        "architectures": ["InternVLChatModel"],
        "llm_config": {"architectures": [ARCHITECTURES[arch]]},
        "vision_config": {"image_size": 448, "patch_size": 14},
        "template": template,
        "downsample_ratio": 0.5,
        "force_image_size": 448,
        "dynamic_image_size": True,
        "max_dynamic_patch": 12,
        "use_thumbnail": True,
    }


@pytest.fixture(scope="module")
def layouts(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("original_tokenizers")
    return {arch: fixtures.write_tokenizer(root / arch, arch) for arch in ARCHITECTURES}


# --- independent slow-tokenizer references ------------------------------------------------------


class SlowReference:
    """The slow tokenizers: added tokens cut out atomically (longest first), SentencePiece on the rest.

    ``mode="internlm2"`` / ``"llama_legacy"``: SentencePiece with its own normalisation on every
    chunk. ``mode="llama"`` (LlamaTokenizer legacy=false): one ``▁`` before the whole text and no
    dummy prefix per chunk.
    """

    def __init__(self, folder: Path, mode: str):
        config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
        proto = (folder / "tokenizer.model").read_bytes()
        self.sp = spm.SentencePieceProcessor(model_proto=proto)
        # normalizer_spec (field 3) merged with add_dummy_prefix (field 3 inside) = false
        self.sp_no_prefix = spm.SentencePieceProcessor(model_proto=proto + b"\x1a\x02\x18\x00")
        self.added = {spec["content"]: (int(i), spec) for i, spec in config["added_tokens_decoder"].items()}
        self.pattern = re.compile("|".join(re.escape(t) for t in sorted(self.added, key=len, reverse=True)))
        self.mode, self.bos = mode, config.get("add_bos_token", True)

    def split(self, text: str) -> list[str]:
        parts, pos = [], 0
        for match in self.pattern.finditer(text):
            parts += [text[pos : match.start()], match.group()]
            pos = match.end()
        parts.append(text[pos:])
        for i in range(1, len(parts), 2):  # odd positions hold added tokens
            spec = self.added[parts[i]][1]
            if spec.get("rstrip"):
                parts[i + 1] = parts[i + 1].lstrip()
            if spec.get("lstrip"):
                parts[i - 1] = parts[i - 1].rstrip()
        return parts

    def encode(self, text: str) -> list[int]:
        ids = [1] if self.bos else []
        for i, part in enumerate(self.split(text)):
            if i % 2:
                ids.append(self.added[part][0])
            elif part and self.mode == "llama":
                ids += self.sp_no_prefix.encode(("▁" if i == 0 else "") + part.replace("▁", " "))
            elif part:
                ids += self.sp.encode(part)
        return ids

    def decode_plain(self, ids: list[int]) -> str:
        """What the slow tokenizer decodes with skip_special_tokens=True: SentencePiece on the rest."""
        special = {token_id for token_id, _ in self.added.values()}
        return self.sp.decode([i for i in ids if i not in special])


def corpus_fragments(count: int = 150, seed: int = 0) -> list[str]:
    """Random substrings of the fixture corpus: many merge paths in a few milliseconds."""
    rng, text = random.Random(seed), "\n".join(fixtures.CORPUS)
    fragments = []
    for _ in range(count):
        start = rng.randrange(len(text))
        fragments.append(text[start : start + rng.randrange(1, 40)])
    return fragments


def check_ids(
    tokenizer, reference: SlowReference, texts: list[str], decode_leading_space: bool = True
) -> None:
    """Same ids as the slow tokenizer; for InternLM2 also the same decoded text.

    SentencePiece models trained with remove_extra_whitespaces drop every leading space when
    decoding; that cosmetic case (``decode_leading_space=False``) is not compared.
    """
    for text in texts:
        ids = reference.encode(text)
        assert tokenizer(text)["input_ids"] == ids, text
        leading = text[:1].isspace() or text.startswith("▁")
        if reference.mode == "internlm2" and (decode_leading_space or not leading):
            assert tokenizer.decode(ids, skip_special_tokens=True) == reference.decode_plain(ids), text


def test_internlm2_ids_equal_slow_sentencepiece_tokenizer(layouts):
    tokenizer = build_tokenizer(layouts["internlm2"], original_config("internlm2", "internlm2-chat"))
    reference = SlowReference(layouts["internlm2"], "internlm2")
    check_ids(tokenizer, reference, MIXED_TEXTS + corpus_fragments())
    every_special = "".join(reference.added)
    check_ids(tokenizer, reference, [every_special, f"a {every_special} b"])
    assert len(tokenizer) == max(i for i, _ in reference.added.values()) + 1  # vocabulary size unchanged


@pytest.mark.parametrize(
    "normalization",
    [
        {"add_dummy_prefix": False, "remove_extra_whitespaces": False, "normalization_rule_name": "identity"},
        {"add_dummy_prefix": True, "remove_extra_whitespaces": True, "normalization_rule_name": "identity"},
        {"add_dummy_prefix": True, "remove_extra_whitespaces": True, "normalization_rule_name": "nmt_nfkc"},
    ],
    ids=["no-prefix", "strip-spaces", "nfkc"],
)
def test_sentencepiece_normalizer_variants(layouts, tmp_path, normalization):
    """Whatever normaliser a SentencePiece model was trained with, the ids stay the slow ones."""
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(fixtures.CORPUS * 20),
        model_writer=out,
        model_type="bpe",
        vocab_size=560,
        byte_fallback=True,
        character_coverage=1.0,
        num_threads=1,
        minloglevel=2,
        **normalization,
    )
    (tmp_path / "tokenizer.model").write_bytes(out.getvalue())
    size = spm.SentencePieceProcessor(model_proto=out.getvalue()).get_piece_size()
    config = json.loads((layouts["internlm2"] / "tokenizer_config.json").read_text(encoding="utf-8"))
    base = {k: v for k, v in config["added_tokens_decoder"].items() if int(k) < 3}
    extra = [
        v for k, v in sorted(config["added_tokens_decoder"].items(), key=lambda kv: int(kv[0])) if int(k) >= 3
    ]
    config["added_tokens_decoder"] = base | {str(size + i): spec for i, spec in enumerate(extra)}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    tokenizer = build_tokenizer(tmp_path, original_config("internlm2", "internlm2-chat"))
    texts = MIXED_TEXTS + corpus_fragments(60, seed=1)
    check_ids(
        tokenizer, SlowReference(tmp_path, "internlm2"), texts, not normalization["remove_extra_whitespaces"]
    )


def test_llama_sentencepiece_ids_equal_slow_llama_tokenizer(layouts):
    """Yi-style (legacy) and Phi-3-style (legacy=false, chat tokens stripping the space after them)."""
    legacy = build_tokenizer(layouts["llama"], original_config("llama", "Hermes-2"))
    check_ids(legacy, SlowReference(layouts["llama"], "llama_legacy"), MIXED_TEXTS + corpus_fragments())
    phi3 = build_tokenizer(layouts["phi3"], original_config("phi3", "phi3-chat"))
    # Known, documented difference: legacy=false text that itself begins with a space or "▁" (chat
    # prompts always begin with a special token, so prompts are unaffected).
    texts = [t for t in MIXED_TEXTS + corpus_fragments() if not t.startswith((" ", "▁"))]
    chat = "<|system|>\nsys<|end|><|user|>\n q <|end|><|assistant|>\n"
    check_ids(phi3, SlowReference(layouts["phi3"], "llama"), texts + [chat])


def test_tokenizer_json_layout_and_refusals(layouts):
    """Llama-3 style checkpoints ship only tokenizer.json: its own ids, BOS from its post-processor."""
    from tokenizers import Tokenizer

    tokenizer = build_tokenizer(layouts["llama3"], original_config("llama3", "Hermes-2"))
    raw = Tokenizer.from_file(str(layouts["llama3"] / "tokenizer.json"))
    for text in MIXED_TEXTS + corpus_fragments(60, seed=2):
        assert tokenizer(text)["input_ids"] == raw.encode(text).ids, text
    assert len(tokenizer) == raw.get_vocab_size(with_added_tokens=True)
    with pytest.raises(ValueError, match=r"llm_config.architectures.*supported"):
        build_tokenizer(layouts["qwen2"], {**original_config("qwen2", "Hermes-2"), "llm_config": {}})


# --- prompts: the original chat() -------------------------------------------------------------

ORIGINAL_TEMPLATES = {  # name: (system_template, roles, sep) as the original conversation module has them
    "internlm2-chat": (
        "<|im_start|>system\n{}",
        ("<|im_start|>user\n", "<|im_start|>assistant\n"),
        "<|im_end|>",
    ),
    "Hermes-2": ("<|im_start|>system\n{}", ("<|im_start|>user\n", "<|im_start|>assistant\n"), "<|im_end|>"),
    "phi3-chat": ("<|system|>\n{}", ("<|user|>\n", "<|assistant|>\n"), "<|end|>"),
    "internvl2_5": (
        "<|im_start|>system\n{}",
        ("<|im_start|>user\n", "<|im_start|>assistant\n"),
        "<|im_end|>\n",
    ),
}
SYSTEM_MESSAGES = {
    "internvl2": "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，"
    "英文名叫InternVL, 是一个有用无害的人工智能助手。",
    "internvl2_5": "你是书生·万象，英文名是InternVL，"
    "是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。",
}


def original_query(template: str, question: str, num_patches: int | None, tokens_per_tile: int = 256) -> str:
    """The original chat(): MPT-style prompt, ``<image>\\n`` + question, then image tokens."""
    system_template, (user, assistant), sep = ORIGINAL_TEMPLATES[template]
    system = SYSTEM_MESSAGES["internvl2_5" if template == "internvl2_5" else "internvl2"]
    if num_patches is not None and "<image>" not in question:
        question = "<image>\n" + question
    query = system_template.format(system) + sep + user + question + sep + assistant
    if num_patches is not None:
        image = "<img>" + "<IMG_CONTEXT>" * tokens_per_tile * num_patches + "</img>"
        query = query.replace("<image>", image, 1)
    return query


PROMPT_CASES = [  # (template, text architecture of the checkpoints that use it)
    ("internlm2-chat", "internlm2"),
    ("Hermes-2", "qwen2"),
    ("Hermes-2", "llama"),
    ("Hermes-2", "llama3"),
    ("phi3-chat", "phi3"),
    ("internvl2_5", "internlm2"),
    ("internvl2_5", "qwen2"),
]


@pytest.mark.parametrize("template,arch", PROMPT_CASES)
def test_prompt_ids_equal_original_chat(layouts, tmp_path, template, arch):
    processor = build_processor(layouts[arch], original_config(arch, template))
    processor.save_pretrained(tmp_path)
    processor = load_processor(tmp_path)
    reference = SlowReference(layouts[arch], "internlm2") if arch == "internlm2" else None
    encode = reference.encode if reference else (lambda q: processor.tokenizer(q)["input_ids"])
    image = Image.new("RGB", (900, 500), (200, 30, 60))
    patches = dynamic_preprocess_reference(image, max_num=6)[0]
    for question in [
        "What color is the circle?",
        "图片里有什么？ Answer with one word.",
        "  spaced  \n question",
    ]:
        with_image = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        text = processor.apply_chat_template(with_image, add_generation_prompt=True, tokenize=False)
        ids = processor(text=[text], images=[image], return_tensors="pt")["input_ids"][0].tolist()
        assert ids == encode(original_query(template, question, len(patches)))
        text_only = [{"role": "user", "content": [{"type": "text", "text": question}]}]
        text = processor.apply_chat_template(text_only, add_generation_prompt=True, tokenize=False)
        assert processor(text=[text], return_tensors="pt")["input_ids"][0].tolist() == encode(
            original_query(template, question, None)
        )
    stop = ORIGINAL_TEMPLATES[template][2].strip()
    assert stop_token_ids(processor.tokenizer, template) == [processor.tokenizer.convert_tokens_to_ids(stop)]
    assert processor.tokenizer.eos_token == stop and processor.tokenizer.padding_side == "left"


def test_saved_processor_is_plain_transformers(layouts, tmp_path):
    """No remote code anywhere: AutoTokenizer/AutoProcessor read the folder as it is."""
    from transformers import AutoProcessor, AutoTokenizer

    build_processor(layouts["internlm2"], original_config("internlm2", "internlm2-chat")).save_pretrained(
        tmp_path
    )
    config = json.loads((tmp_path / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert "auto_map" not in config and "InternLM2" not in json.dumps(config)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    reference = SlowReference(layouts["internlm2"], "internlm2")
    assert all(tokenizer(t)["input_ids"] == reference.encode(t) for t in MIXED_TEXTS)
    processor = AutoProcessor.from_pretrained(tmp_path)
    assert type(processor).__name__ == "InternVLProcessor" and processor.image_seq_length == 256
    assert (processor.tokenizer.start_image_token, processor.tokenizer.context_image_token) == (
        "<img>",
        "<IMG_CONTEXT>",
    )


# Byte-fallback runs as SentencePiece decodes them: each well-formed character, and one U+FFFD per
# byte that starts none (ByteFallback would give one U+FFFD per byte of the whole run).
ZH, EMOJI = "中".encode(), "😀".encode()
BYTE_RUNS = [
    ZH,  # valid: 中
    ZH + "龘".encode(),  # valid, two characters
    EMOJI,  # valid, four bytes
    ZH + ZH[:2],  # a character, then one cut short (generation stopped mid-character)
    ZH[:2] + b"A",  # a cut character before ASCII: two U+FFFD (Python's "replace" gives one)
    b"\x80" + ZH,  # a stray continuation byte before a character
    EMOJI[:3] + "é".encode(),  # a cut four-byte character, then a two-byte one
    b"\xc0\x80",  # overlong form
    b"\xed\xa0\x80",  # a surrogate
    b"\xf5\x80\x80\x80",  # above U+10FFFF
    b"\xff\xfe",  # never valid
    "龘".encode()[1:] + ZH[:1],  # only continuation bytes and a lead byte
]


def random_ids(reference: SlowReference, count: int, seed: int) -> list[list[int]]:
    """Random answers over the whole vocabulary, byte pieces drawn often (as random weights do)."""
    rng, size = random.Random(seed), reference.sp.get_piece_size()
    byte_ids = [i for i in range(size) if reference.sp.is_byte(i)]
    return [
        [
            rng.choice(byte_ids) if rng.random() < 0.6 else rng.randrange(3, size)
            for _ in range(rng.randrange(1, 24))
        ]
        for _ in range(count)
    ]


def test_byte_fallback_runs_decode_as_sentencepiece(layouts, tmp_path):
    """Valid and invalid runs of byte pieces (Chinese included), alone, between pieces and special
    tokens, and random answers: the text of SentencePiece's own decode, also after saving and
    loading with ``load_processor``; plain transformers still loads the folder."""
    from transformers import AutoTokenizer

    config = original_config("internlm2", "internlm2-chat")
    tokenizer = build_tokenizer(layouts["internlm2"], config)
    reference = SlowReference(layouts["internlm2"], "internlm2")
    sp = reference.sp
    word, im_end = sp.piece_to_id("▁the"), tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert sp.id_to_piece(word) == "▁the" and im_end > 2
    answers = []
    for data in BYTE_RUNS:
        run = [sp.piece_to_id(f"<0x{byte:02X}>") for byte in data]
        answers += [run, [word, *run, word], [*run, im_end, *run], [word, *run[:1], word, *run[1:]]]
    answers += random_ids(reference, 200, seed=0)
    build_processor(layouts["internlm2"], config).save_pretrained(tmp_path)
    loaded = load_processor(tmp_path).tokenizer
    plain = AutoTokenizer.from_pretrained(tmp_path)
    differs = 0
    for ids in answers:
        expected = reference.decode_plain(ids)
        assert tokenizer.decode(ids, skip_special_tokens=True) == expected, ids
        assert loaded.decode(ids, skip_special_tokens=True) == expected, ids
        differs += plain.decode(ids, skip_special_tokens=True) != expected
    assert loaded.batch_decode(answers[:3], skip_special_tokens=True) == [
        reference.decode_plain(ids) for ids in answers[:3]
    ]
    assert sp.decode([sp.piece_to_id(f"<0x{b:02X}>") for b in ZH + ZH[:2]]) == "中\ufffd\ufffd"
    assert differs > 50, "the cases must include runs that ByteFallback alone decodes differently"
    pieces = tokenizer.convert_ids_to_tokens(answers[7])
    assert tokenizer.convert_tokens_to_string(pieces) == sp.decode_pieces(pieces)
    # everything else decodes as the backend's own pipeline (special tokens kept or skipped), here
    # with a valid run, which both decode alike, so that the cutting path runs
    zh = [sp.piece_to_id(f"<0x{byte:02X}>") for byte in ZH]
    for ids in random_ids(reference, 50, seed=1):
        ids = [i for i in ids if not sp.is_byte(i)] + [im_end, *zh, 1]
        for skip in (True, False):
            assert tokenizer.decode(ids, skip_special_tokens=skip) == plain.decode(
                ids, skip_special_tokens=skip
            )


def test_unknown_template_and_bad_fields_are_refused(layouts):
    for bad in ("chatml", None, "internlm2_chat"):
        with pytest.raises(ValueError, match=r"'template' is .*internlm2-chat.*phi3-chat"):
            build_processor(layouts["internlm2"], original_config("internlm2", bad))
    with pytest.raises(ValueError, match="downsample_ratio"):
        build_processor(
            layouts["internlm2"], {**original_config("internlm2", "internlm2-chat"), "downsample_ratio": 0.3}
        )
    with pytest.raises(ValueError, match="use_thumbnail"):
        build_processor(
            layouts["internlm2"], {**original_config("internlm2", "internlm2-chat"), "use_thumbnail": False}
        )
    with pytest.raises(ValueError, match="max_tiles"):
        build_processor(layouts["internlm2"], original_config("internlm2", "internlm2-chat"), max_tiles=0)
    with pytest.raises(ValueError, match="text_arch"):
        fixtures.write_tokenizer(Path("unused"), "gpt2")


def test_fixtures_are_deterministic(tmp_path):
    for arch in ARCHITECTURES:
        first = fixtures.write_tokenizer(tmp_path / "a" / arch, arch)
        second = fixtures.write_tokenizer(tmp_path / "b" / arch, arch)
        names = sorted(p.name for p in first.iterdir())
        assert names == sorted(p.name for p in second.iterdir())
        assert all((first / n).read_bytes() == (second / n).read_bytes() for n in names), arch


# --- images: InternVL's dynamic tiling --------------------------------------------------------


def dynamic_preprocess_reference(image: Image.Image, max_num: int, size: int = 448, min_num: int = 1):
    """InternVL's dynamic_preprocess + build_transform, written from the rule: returns (tiles, grid)."""
    width, height = image.size
    aspect = width / height
    grids = sorted(
        {
            (c, r)
            for n in range(min_num, max_num + 1)
            for c in range(1, n + 1)
            for r in range(1, n + 1)
            if min_num <= c * r <= max_num
        },
        key=lambda g: g[0] * g[1],
    )
    best, best_diff = (1, 1), float("inf")
    for cols, rows in grids:
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and width * height > 0.5 * size * size * cols * rows:
            best = (cols, rows)
    cols, rows = best
    resized = image.resize((size * cols, size * rows), Image.Resampling.BICUBIC)
    tiles = [
        resized.crop((c * size, r * size, (c + 1) * size, (r + 1) * size))
        for r in range(rows)
        for c in range(cols)
    ]
    if len(tiles) > 1:
        tiles.append(image.resize((size, size), Image.Resampling.BICUBIC))
    # ToTensor (uint8 / 255 in float32, channels first), then Normalize((x - mean) / std)
    arrays = [
        (np.asarray(t).transpose(2, 0, 1).astype(np.float32) / np.float32(255) - IMAGENET_MEAN) / IMAGENET_STD
        for t in tiles
    ]
    return [torch.from_numpy(a) for a in arrays], best


TILE_SIZES = [
    (448, 448),
    (800, 500),
    (500, 800),
    (300, 900),
    (900, 300),
    (33, 1000),
    (1000, 33),
    (1600, 900),
    (900, 1600),
    (50, 50),
    (1, 1),
    (2, 7),
    (3000, 2000),
    (1200, 1800),
    (4032, 3024),
    (896, 448),
    (448, 896),
    (1344, 448),
    (672, 448),
    (1000, 1000),
    (640, 640),
    (600, 600),
    (1000, 800),
    (500, 400),
    (1500, 1200),
    (700, 1400),
    (257, 511),
    (123, 4567),
    (4567, 123),
    (1200, 700),
]  # incl. exact-ratio ties decided by the area rule: 640/600 square, 1000x800 / 500x400 at ratio 1.25


def test_tiling_equals_original_rule(layouts, tmp_path):
    assert len(TILE_SIZES) == 30
    build_processor(layouts["internlm2"], original_config("internlm2", "internlm2-chat")).save_pretrained(
        tmp_path
    )
    image_processor = load_processor(tmp_path).image_processor
    rng = np.random.default_rng(0)
    grids = set()
    for width, height in TILE_SIZES:
        # noise at up to 256 px, blown up (nearest) to the full size: every resize kernel sees detail
        small = rng.integers(0, 256, size=(min(height, 256), min(width, 256), 3), dtype=np.uint8)
        image = Image.fromarray(small).resize((width, height), Image.Resampling.NEAREST)
        expected, grid = dynamic_preprocess_reference(image, max_num=6)
        grids.add(grid)
        out = image_processor(images=[image], return_tensors="pt")
        assert out["num_patches"].tolist() == [len(expected)], (width, height)
        assert torch.equal(out["pixel_values"], torch.stack(expected)), (width, height)
    assert {(2, 2), (1, 1), (3, 2), (1, 6), (6, 1)} <= grids  # ties and extremes were exercised
