"""Factory parts for tiny Qwen2-VL, Qwen2.5-VL and Qwen3-VL checkpoints (see :mod:`lmms_sgl.factory`).

The real processors and model classes with small sizes: patch 14 (16 for Qwen3-VL), 2 x 2 merge,
4 to 64 visual tokens per image by default, head dimension 32 so that ``mrope_section`` splits
the rotary frequencies over temporal, height and width as the released models do. Qwen2.5-VL
gets window attention in every vision layer but the last; Qwen3-VL gets deepstack features from
every vision layer but the last (added to the first decoder layers).
"""

from __future__ import annotations

from lmms_sgl.factory.specs import ModelSpec

# The released templates' image, video and text parts; Qwen2(.5)-VL add a default system turn, Qwen3-VL not.
_MESSAGES = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content %}"
    "{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{{ '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
_DEFAULT_SYSTEM = (
    "{% if messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
)
CHAT_TEMPLATES = {
    "qwen2_vl": _DEFAULT_SYSTEM + _MESSAGES,
    "qwen2_5_vl": _DEFAULT_SYSTEM + _MESSAGES,
    "qwen3_vl": _MESSAGES,
}
TOKENS_PER_IMAGE = (4, 64)  # default min_pixels / max_pixels, in merged tokens


def patch_size(spec: ModelSpec) -> int:
    return 16 if spec.variant == "qwen3_vl" else 14


def build_qwen_processor(spec: ModelSpec, tokenizer):
    from transformers import Qwen2VLImageProcessor

    factor = 2 * patch_size(spec)
    image_processor = Qwen2VLImageProcessor(
        patch_size=patch_size(spec),
        merge_size=2,
        temporal_patch_size=2,
        min_pixels=TOKENS_PER_IMAGE[0] * factor * factor,
        max_pixels=TOKENS_PER_IMAGE[1] * factor * factor,
        size={
            "shortest_edge": TOKENS_PER_IMAGE[0] * factor * factor,
            "longest_edge": TOKENS_PER_IMAGE[1] * factor * factor,
        },
    )
    template = CHAT_TEMPLATES[spec.variant]
    if spec.variant == "qwen3_vl":
        from transformers import Qwen3VLProcessor, Qwen3VLVideoProcessor

        return Qwen3VLProcessor(
            image_processor=image_processor,
            tokenizer=tokenizer,
            video_processor=Qwen3VLVideoProcessor(patch_size=16),
            chat_template=template,
        )
    from transformers import Qwen2_5_VLProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    processor_class = Qwen2VLProcessor if spec.variant == "qwen2_vl" else Qwen2_5_VLProcessor
    return processor_class(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(),
        chat_template=template,
    )


def build_qwen_config(spec: ModelSpec, tokenizer, common_text: dict):
    vision = spec.vision
    text = {**common_text, "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}}
    ids = {
        "image_token_id": tokenizer.convert_tokens_to_ids("<|image_pad|>"),
        "video_token_id": tokenizer.convert_tokens_to_ids("<|video_pad|>"),
        "vision_start_token_id": tokenizer.convert_tokens_to_ids("<|vision_start|>"),
        "vision_end_token_id": tokenizer.convert_tokens_to_ids("<|vision_end|>"),
        "tie_word_embeddings": False,
    }
    if spec.variant == "qwen2_vl":
        from transformers import Qwen2VLConfig

        text["rope_parameters"]["mrope_section"] = [4, 6, 6]
        return Qwen2VLConfig(
            text_config=text,
            vision_config={
                "depth": vision.num_hidden_layers,
                "embed_dim": vision.hidden_size,
                "hidden_size": spec.text.hidden_size,
                "num_heads": vision.num_attention_heads,
                "mlp_ratio": vision.intermediate_size // vision.hidden_size,
                "patch_size": 14,
            },
            **ids,
        )
    tower = {
        "depth": vision.num_hidden_layers,
        "hidden_size": vision.hidden_size,
        "num_heads": vision.num_attention_heads,
        "intermediate_size": vision.intermediate_size,
        "out_hidden_size": spec.text.hidden_size,
    }
    if spec.variant == "qwen2_5_vl":
        from transformers import Qwen2_5_VLConfig

        text["rope_parameters"]["mrope_section"] = [4, 6, 6]
        tower.update(patch_size=14, window_size=112, fullatt_block_indexes=[vision.num_hidden_layers - 1])
        return Qwen2_5_VLConfig(text_config=text, vision_config=tower, **ids)
    from transformers import Qwen3VLConfig

    text["rope_parameters"].update(mrope_section=[6, 5, 5], mrope_interleaved=True)
    text["head_dim"] = spec.text.hidden_size // spec.text.num_attention_heads
    tower.update(
        patch_size=16,
        num_position_embeddings=64,
        deepstack_visual_indexes=list(range(vision.num_hidden_layers - 1)),
    )
    return Qwen3VLConfig(text_config=text, vision_config=tower, **ids)
