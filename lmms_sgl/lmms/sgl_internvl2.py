"""``--model sgl_internvl2``: SGL over transformers-native InternVL checkpoints."""

from lmms_sgl.families.internvl import InternVLFamily
from lmms_sgl.lmms.base import SGLModel
from lmms_sgl.lmms.chat import ChatRequests


class SGLInternVL2(SGLModel):
    family_class = InternVLFamily


class SGLInternVL2Chat(ChatRequests, SGLInternVL2):
    """The chat interface (what a plain ``--model sgl_internvl2`` resolves to)."""
