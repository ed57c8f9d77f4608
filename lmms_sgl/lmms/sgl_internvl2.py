"""``--model sgl_internvl2``: SGL over transformers-native InternVL checkpoints."""

from lmms_sgl.families.internvl import InternVLFamily
from lmms_sgl.lmms.base import SGLModel


class SGLInternVL2(SGLModel):
    family_class = InternVLFamily
