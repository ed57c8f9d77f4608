"""``--model sgl_llava``: SGL over transformers-native LLaVA-1.5 / NeXT / OneVision checkpoints."""

from lmms_sgl.families.llava import LlavaFamily
from lmms_sgl.lmms.base import SGLModel


class SGLLlava(SGLModel):
    family_class = LlavaFamily
