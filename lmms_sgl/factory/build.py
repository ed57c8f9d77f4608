"""Offline model factory: deterministic small InternVL and LLaVA checkpoints built from code.

Model hubs are unreachable on our machines, yet tests and the demo must exercise the real
transformers classes end to end (``from_pretrained``, ``AutoProcessor``, chat templates, dynamic
tiling). This module builds such checkpoints from nothing: a byte-level BPE tokenizer trained on a
fixed corpus, the family's real image processor and processor, and a randomly initialised model
seeded per spec, saved with ``save_pretrained``. Two builds are byte-identical.

For each family there is a *guide* (fewer, narrower layers) and a *large* model (more, wider layers)
with the same visual-token layout for the same image, which is what SGL needs:

* InternVL (``InternVLForConditionalGeneration``, Qwen2 text model): 448 px tiles, patch 14, pixel
  shuffle 0.5, so 256 tokens per tile; dynamic tiling up to ``max_patches`` tiles plus a thumbnail.
* LLaVA (``LlavaForConditionalGeneration``, CLIP vision + Llama text): 224 px, patch 14, 256 tokens.
* LLaVA-NeXT (``LlavaNextForConditionalGeneration``, CLIP with [CLS] + Llama, the ``llava-next-large``
  checkpoint): 112 px crops of 64 tokens, any-resolution grid up to 2 x 2 crops plus the base image,
  unpadded, image-newline tokens, features from the second-to-last vision layer.
* LLaVA-OneVision (``LlavaOnevisionForConditionalGeneration``, SigLIP + Qwen2): 112 px crops of 64
  tokens, any-resolution grid up to 2 x 2 crops plus the base image, image-newline tokens; the
  ``llava-ov-video-*`` pair also takes videos (``<video>`` token, frames at 112 px, 2 x 2 pooled).
* Qwen2-VL / Qwen2.5-VL / Qwen3-VL (``variant``): dynamic resolution, one token per 2 x 2 merged
  patches (28 px, 32 px for Qwen3-VL), 4 to 64 tokens per image by default; multimodal RoPE with
  a real ``mrope_section``; Qwen2.5-VL with window attention, Qwen3-VL with deepstack features.

Command line: ``lmms-sgl-build-models --out models/`` (``--help`` lists the specs).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

import torch
from loguru import logger

from lmms_sgl.factory.specs import SPECS, ModelSpec

# Words the tokenizer learns as whole tokens: templates, task prompts (lmms-eval's GQA prompt among
# them) and answer words. Anything else still tokenizes, byte by byte.
_CORPUS_WORDS = """
the a an of and or to in on at is are what which who how many much color colour shape size
question answer answer the question using single word phrase with yes no left right top bottom
middle center image picture there object objects small large big tiny red green blue yellow
purple orange black white gray grey brown pink cyan circle square triangle star cross ring
diamond one two three four five six seven eight nine ten zero count number please describe
""".split()

_CORPUS_LINES = [
    "Answer the question using a single word or phrase.",
    "What color is the circle?",
    "What shape is the red object?",
    "How many blue objects are there?",
    "Is there a green square in the image?",
    "USER: ASSISTANT:",
    "<|im_start|>system\n<|im_end|>\n<|im_start|>user\n<|im_start|>assistant\n",
]


# LLaVA-OneVision: SigLIP crops of 112 px (64 tokens each), any-resolution grid up to 2 x 2 crops
# plus the base image, image-newline tokens; the processor's token count matches the model's.
ONEVISION_GRID = [[112, 112], [112, 224], [224, 112], [224, 224]]
NEXT_GRID = [[112, 224], [224, 112], [224, 224]]  # LLaVA-NeXT's pinpoints hold no 1 x 1 grid

INTERNVL_SPECIAL = {
    "bos": None,
    "eos": "<|im_end|>",
    "pad": "<|endoftext|>",
    "extra": ["<|im_start|>", "<img>", "</img>", "<IMG_CONTEXT>", "<video>"],
}
LLAVA_SPECIAL = {"bos": "<s>", "eos": "</s>", "pad": "<pad>", "extra": ["<image>"]}
# OneVision with video: the released checkpoints' <video> token besides <image>
LLAVA_VIDEO_SPECIAL = {**LLAVA_SPECIAL, "extra": ["<image>", "<video>"]}
QWEN_NAMED_TOKENS = {
    "image_token": "<|image_pad|>",
    "video_token": "<|video_pad|>",
    "vision_bos_token": "<|vision_start|>",
    "vision_eos_token": "<|vision_end|>",
}
QWEN_SPECIAL = {
    "bos": None,
    "eos": "<|im_end|>",
    "pad": "<|endoftext|>",
    "extra": ["<|im_start|>", *QWEN_NAMED_TOKENS.values()],
}

INTERNVL_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}{{ '<IMG_CONTEXT>\\n' }}"
    "{% elif content['type'] == 'video' %}{{ '<video>\\n' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] + ' ' }}"
    "{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\\n' }}"
    "{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' ' }}{% endfor %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
# the same, with "<video>\n" per video before the images (lmms-eval's llava_hf writes "<video>\n{text}")
LLAVA_VIDEO_CHAT_TEMPLATE = LLAVA_CHAT_TEMPLATE.replace(
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}",
    "{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}{{ '<video>\\n' }}"
    "{% endfor %}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}",
)


def build_tokenizer(family: str, video: bool = False):
    """A byte-level BPE tokenizer trained on a fixed corpus: deterministic, offline, lossless
    (``video``: a LLaVA tokenizer that also has the ``<video>`` token)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    llava = LLAVA_VIDEO_SPECIAL if video else LLAVA_SPECIAL
    special = {"internvl": INTERNVL_SPECIAL, "qwen_vl": QWEN_SPECIAL}.get(family, llava)
    special_tokens = [t for t in (special["bos"], special["eos"], special["pad"]) if t] + special["extra"]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = _CORPUS_LINES + [" ".join(_CORPUS_WORDS)] + [f" {w}" for w in _CORPUS_WORDS] * 4
    backend.train_from_iterator(corpus, trainer=trainer)
    kwargs: dict = {
        "tokenizer_object": backend,
        "eos_token": special["eos"],
        "pad_token": special["pad"],
        "padding_side": "left",
        "model_max_length": 8192,
    }
    if special["bos"]:
        kwargs["bos_token"] = special["bos"]
    if family == "internvl":
        kwargs["extra_special_tokens"] = {
            "start_image_token": "<img>",
            "end_image_token": "</img>",
            "context_image_token": "<IMG_CONTEXT>",
            "video_token": "<video>",
        }
    elif family == "qwen_vl":
        kwargs["extra_special_tokens"] = QWEN_NAMED_TOKENS
    else:
        kwargs["extra_special_tokens"] = {
            "image_token": "<image>",
            **({"video_token": "<video>"} if video else {}),
        }
    return PreTrainedTokenizerFast(**kwargs)


def build_processor(spec: ModelSpec):
    """The family's real processor around our tokenizer."""
    video = spec.variant == "onevision_video"
    tokenizer = build_tokenizer(spec.family, video=video)
    if spec.family == "qwen_vl":
        from lmms_sgl.factory.qwen import build_qwen_processor

        return build_qwen_processor(spec, tokenizer)
    if spec.family == "internvl":
        from transformers import GotOcr2ImageProcessor, InternVLProcessor, InternVLVideoProcessor

        image_processor = GotOcr2ImageProcessor(
            size={"height": 448, "width": 448},
            crop_to_patches=True,
            min_patches=1,
            max_patches=spec.max_patches,
        )
        return InternVLProcessor(
            image_processor=image_processor,
            tokenizer=tokenizer,
            # frames are single 448 px tiles, as the released -hf checkpoints' video processors
            video_processor=InternVLVideoProcessor(size={"height": 448, "width": 448}),
            image_seq_length=256,
            chat_template=INTERNVL_CHAT_TEMPLATE,
        )
    if spec.variant in ("onevision", "onevision_video"):
        from transformers import (
            LlavaOnevisionImageProcessor,
            LlavaOnevisionProcessor,
            LlavaOnevisionVideoProcessor,
        )

        # frames resized to the tower's 112 px (the video variant; the image-only one keeps the default)
        frames = {"size": {"height": 112, "width": 112}} if video else {}
        return LlavaOnevisionProcessor(
            image_processor=LlavaOnevisionImageProcessor(
                size={"height": 112, "width": 112}, image_grid_pinpoints=ONEVISION_GRID
            ),
            tokenizer=tokenizer,
            video_processor=LlavaOnevisionVideoProcessor(**frames),
            num_image_tokens=64,
            vision_feature_select_strategy="full",
            chat_template=LLAVA_VIDEO_CHAT_TEMPLATE if video else LLAVA_CHAT_TEMPLATE,
        )
    # CLIP towers whose [CLS] the LM does not see (LLaVA-1.5 and NeXT): 14 px patches
    clip_tokens = {
        "tokenizer": tokenizer,
        "patch_size": 14,
        "vision_feature_select_strategy": "default",
        "num_additional_image_tokens": 1,
        "chat_template": LLAVA_CHAT_TEMPLATE,
    }
    if spec.variant == "next":
        from transformers import LlavaNextImageProcessor, LlavaNextProcessor

        return LlavaNextProcessor(
            image_processor=LlavaNextImageProcessor(
                size={"shortest_edge": 112},
                crop_size={"height": 112, "width": 112},
                image_grid_pinpoints=NEXT_GRID,
            ),
            **clip_tokens,
        )
    from transformers import CLIPImageProcessor, LlavaProcessor

    image_processor = CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
    return LlavaProcessor(image_processor=image_processor, **clip_tokens)


def build_config(spec: ModelSpec, tokenizer):
    vocab_size = len(tokenizer)
    text = asdict(spec.text)
    common_text = {
        "vocab_size": vocab_size,
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        **text,
    }
    vision = asdict(spec.vision)
    if spec.family == "qwen_vl":
        from lmms_sgl.factory.qwen import build_qwen_config

        return build_qwen_config(spec, tokenizer, common_text)
    if spec.family == "internvl":
        from transformers import InternVLConfig, InternVLVisionConfig, Qwen2Config

        return InternVLConfig(
            vision_config=InternVLVisionConfig(image_size=448, patch_size=14, **vision),
            text_config=Qwen2Config(**common_text),
            image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"),
            image_seq_length=256,
            downsample_ratio=0.5,
            tie_word_embeddings=False,
        )
    if spec.variant in ("onevision", "onevision_video"):
        from transformers import LlavaOnevisionConfig, Qwen2Config, SiglipVisionConfig

        video = {"video_token_index": tokenizer.convert_tokens_to_ids("<video>")}
        return LlavaOnevisionConfig(
            vision_config=SiglipVisionConfig(image_size=112, patch_size=14, **vision),
            text_config=Qwen2Config(**common_text),
            image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
            **(video if spec.variant == "onevision_video" else {}),
            image_grid_pinpoints=ONEVISION_GRID,
            vision_feature_select_strategy="full",
            vision_feature_layer=-1,
            tie_word_embeddings=False,
        )
    if spec.variant == "next":
        from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig

        return LlavaNextConfig(
            vision_config=CLIPVisionConfig(
                image_size=112, patch_size=14, projection_dim=vision["hidden_size"], **vision
            ),
            text_config=LlamaConfig(**common_text),
            image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
            image_grid_pinpoints=NEXT_GRID,
            vision_feature_select_strategy="default",
            vision_feature_layer=-2,
            tie_word_embeddings=False,
        )
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    return LlavaConfig(
        vision_config=CLIPVisionConfig(
            image_size=224, patch_size=14, projection_dim=vision["hidden_size"], **vision
        ),
        text_config=LlamaConfig(**common_text),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        image_seq_length=256,
        tie_word_embeddings=False,
    )


def build_model(spec: ModelSpec, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """Return ``(model, processor)`` for a spec; weights depend only on ``spec.seed`` (and, off the
    CPU, on the device's random generator). The weights are created on ``device`` in ``dtype``
    directly, so a model too large for host memory can be built on a GPU."""
    from transformers import AutoModelForImageTextToText

    processor = build_processor(spec)
    config = build_config(spec, processor.tokenizer)
    torch.manual_seed(spec.seed)
    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(config, dtype=dtype)
    model.generation_config.eos_token_id = processor.tokenizer.eos_token_id
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    return model.eval(), processor


def save_checkpoint(spec: ModelSpec, out_dir: Path) -> Path:
    """Build one spec and write it to ``out_dir/spec.name`` with ``save_pretrained``."""
    model, processor = build_model(spec)
    target = out_dir / spec.name
    target.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(target, safe_serialization=True)
    processor.save_pretrained(target)
    (target / "lmms_sgl_spec.json").write_text(json.dumps(asdict(spec), indent=2, sort_keys=True) + "\n")
    return target


def generation_prompt_token(processor) -> int:
    """The last token of the chat template's generation prompt: what every answer follows."""
    sample = [{"role": "user", "content": [{"type": "text", "text": "?"}]}]
    text = processor.apply_chat_template(sample, tokenize=False, add_generation_prompt=True)
    return processor.tokenizer(text).input_ids[-1]


def script_transitions(model, transitions: dict[int, int], scale: float = 40.0):
    """Make ``model`` follow token ``a`` with ``transitions[a]`` greedily, whatever came before.

    Every decoder layer's output projections are zeroed, so the final hidden state of a position
    is the normalised embedding of its own token; the LM head then maps each source token to its
    successor. Attention (and so SGL's importance) still runs on the real prompt. Token-level, so
    two models scripted from one tokenizer keep identical token ids (speculative-decoding pairs).
    """
    text_model = model.model.language_model
    sources, targets = list(transitions), list(transitions.values())
    with torch.no_grad():
        for layer in text_model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        hidden = text_model.norm(text_model.embed_tokens.weight[sources])  # [n, d]
        head = model.lm_head.weight
        head.zero_()
        head[targets] += scale * hidden / hidden.pow(2).sum(-1, keepdim=True)
    return model


def script_answer(model, processor, answer: str, scale: float = 40.0):
    """Make ``model`` answer ``answer`` (then EOS) greedily, whatever the image and question.

    For tests that need a known long-form answer, e.g. one with blank lines, where random weights
    would need luck (:func:`script_transitions` over the answer's chain). Words of the answer are
    added to the tokenizer when they are not single tokens, so that each token of the chain is
    distinct.
    """
    tokenizer = processor.tokenizer
    pieces = [piece for piece in answer.replace("\n\n", "\0\n\n\0").split("\0") if piece]
    tokenizer.add_tokens([piece for piece in pieces if len(tokenizer.tokenize(piece)) != 1])
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    chain = [
        generation_prompt_token(processor),
        *tokenizer(answer, add_special_tokens=False).input_ids,
        tokenizer.eos_token_id,
    ]
    if len(set(chain[:-1])) != len(chain) - 1:
        raise ValueError(
            f"answer {answer!r} repeats a token of its chain {chain}: scripting needs distinct ones"
        )
    script_transitions(model, dict(zip(chain[:-1], chain[1:], strict=True)), scale)
    model.config.text_config.vocab_size = len(tokenizer)
    return model, processor


def save_scripted(spec_name: str, answer: str, out_dir: Path) -> Path:
    """A factory checkpoint scripted to answer ``answer`` (see :func:`script_answer`)."""
    model, processor = script_answer(*build_model(SPECS[spec_name]), answer)
    target = Path(out_dir) / f"{spec_name}-scripted"
    target.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(target, safe_serialization=True)
    processor.save_pretrained(target)
    return target


def build_all(out_dir: Path, names: list[str] | None = None) -> dict[str, Path]:
    unknown = sorted(set(names or []) - set(SPECS))
    if unknown:
        raise ValueError(f"unknown model spec(s) {unknown}; allowed: {sorted(SPECS)}")
    built = {}
    for name in names or list(SPECS):
        built[name] = save_checkpoint(SPECS[name], Path(out_dir))
        logger.info(f"built {name} ({SPECS[name].description}) -> {built[name]}")
    return built


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="directory that receives one folder per spec")
    parser.add_argument("--only", nargs="*", default=None, help=f"subset of {sorted(SPECS)}")
    args = parser.parse_args(argv)
    build_all(args.out, args.only)


if __name__ == "__main__":
    main()
