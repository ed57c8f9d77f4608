"""``--model sgl_llava``: SGL over transformers-native LLaVA-1.5 / NeXT / OneVision checkpoints."""

from lmms_sgl.families.llava import LlavaFamily
from lmms_sgl.lmms.base import SGLModel
from lmms_sgl.lmms.chat import ChatRequests


class SGLLlava(SGLModel):
    family_class = LlavaFamily


class SGLLlavaChat(ChatRequests, SGLLlava):
    """The chat interface (what a plain ``--model sgl_llava`` resolves to)."""
