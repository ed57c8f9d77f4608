"""The original InternVL conversation formats as Jinja chat templates, and their stop tokens.

Original checkpoints name their format in ``config.json`` (``template``); their ``chat()`` builds
the prompt with InternVL's own conversation class (MPT separator style):
``system_template.format(system_message) + sep``, then per turn ``role + message + sep``, ending with
the bare assistant role. The image placeholder ``<image>\\n`` goes before the question and is later
replaced by ``<img>`` + ``<IMG_CONTEXT>`` x N + ``</img>``. Our templates emit ``<IMG_CONTEXT>\\n``
instead, which transformers' ``InternVLProcessor`` expands into exactly that, so the token ids equal
the original ones. BOS is left to the tokenizer, as in the original (``tokenizer(query)``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

# The InternVL2 checkpoints (internlm2-chat, Hermes-2, phi3-chat) all carry this system message;
# InternVL2.5's own template has a newer one.
INTERNVL2_SYSTEM = (
    "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，"
    "英文名叫InternVL, 是一个有用无害的人工智能助手。"
)
INTERNVL2_5_SYSTEM = (
    "你是书生·万象，英文名是InternVL，"
    "是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"
)
IMAGE_PLACEHOLDER = "<IMG_CONTEXT>"


@dataclass(frozen=True)
class ConversationFormat:
    """One original conversation template (MPT separator style)."""

    name: str
    system_prefix: str  # system_template up to {system_message}
    system_message: str
    user_role: str
    assistant_role: str
    sep: str

    @property
    def stop_token(self) -> str:
        """The original ``chat()`` stops at ``tokenizer.convert_tokens_to_ids(template.sep.strip())``."""
        return self.sep.strip()


FORMATS: dict[str, ConversationFormat] = {
    fmt.name: fmt
    for fmt in (
        # ChatML; Hermes-2 differs from internlm2-chat only in BOS handling during training.
        ConversationFormat(
            "internlm2-chat",
            "<|im_start|>system\n",
            INTERNVL2_SYSTEM,
            "<|im_start|>user\n",
            "<|im_start|>assistant\n",
            "<|im_end|>",
        ),
        ConversationFormat(
            "Hermes-2",
            "<|im_start|>system\n",
            INTERNVL2_SYSTEM,
            "<|im_start|>user\n",
            "<|im_start|>assistant\n",
            "<|im_end|>",
        ),
        ConversationFormat(
            "phi3-chat", "<|system|>\n", INTERNVL2_SYSTEM, "<|user|>\n", "<|assistant|>\n", "<|end|>"
        ),
        ConversationFormat(
            "internvl2_5",
            "<|im_start|>system\n",
            INTERNVL2_5_SYSTEM,
            "<|im_start|>user\n",
            "<|im_start|>assistant\n",
            "<|im_end|>\n",
        ),
    )
}


def conversation_format(template: object) -> ConversationFormat:
    """The format named by a checkpoint's ``template`` field; anything else is refused."""
    if not isinstance(template, str) or template not in FORMATS:
        raise ValueError(
            f"config.json field 'template' is {template!r}; supported original InternVL templates: "
            f"{sorted(FORMATS)}"
        )
    return FORMATS[template]


def _js(text: str) -> str:
    """A Jinja string literal (JSON escaping is valid Jinja)."""
    return json.dumps(text, ensure_ascii=False)


def chat_template(template: str) -> str:
    """Jinja template for ``apply_chat_template``: system turn (default or the messages' own), turns, prompt.

    Content may be a string or a list of ``{"type": "image"|"text"}`` entries; each image becomes
    ``<IMG_CONTEXT>\\n`` at its place, as the original ``<image>\\n``. Video is refused.
    """
    fmt = conversation_format(template)
    sep, role = _js(fmt.sep), {"user": _js(fmt.user_role), "assistant": _js(fmt.assistant_role)}
    content = (
        "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
        "{% for part in message['content'] %}"
        f"{{% if part['type'] == 'image' %}}{{{{ {_js(IMAGE_PLACEHOLDER + chr(10))} }}}}"
        "{% elif part['type'] == 'video' %}"
        "{{ raise_exception('original InternVL checkpoints take images, not video') }}"
        "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
        "{% endfor %}{% endif %}"
    )
    return (
        f"{{% set system = namespace(text={_js(fmt.system_message)}) %}}"
        "{% for message in messages %}{% if message['role'] == 'system' %}"
        "{% if message['content'] is string %}{% set system.text = message['content'] %}"
        "{% else %}{% set system.text = message['content'] | selectattr('type', 'equalto', 'text') "
        "| map(attribute='text') | join('') %}{% endif %}"
        "{% endif %}{% endfor %}"
        f"{{{{ {_js(fmt.system_prefix)} + system.text + {sep} }}}}"
        "{% for message in messages %}"
        "{% if message['role'] == 'user' %}"
        f"{{{{ {role['user']} }}}}{content}{{{{ {sep} }}}}"
        "{% elif message['role'] == 'assistant' %}"
        f"{{{{ {role['assistant']} }}}}{content}{{{{ {sep} }}}}"
        "{% elif message['role'] != 'system' %}"
        "{{ raise_exception('unsupported chat role: ' + message['role']) }}"
        "{% endif %}"
        "{% endfor %}"
        f"{{% if add_generation_prompt %}}{{{{ {role['assistant']} }}}}{{% endif %}}"
    )
