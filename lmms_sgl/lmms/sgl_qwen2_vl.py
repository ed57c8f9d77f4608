"""``--model sgl_qwen2_vl``: SGL over transformers-native Qwen2-VL, Qwen2.5-VL and Qwen3-VL checkpoints."""

from lmms_sgl.families.qwen_vl import QwenVLFamily
from lmms_sgl.lmms.base import SGLModel
from lmms_sgl.lmms.chat import ChatRequests


class SGLQwen2VL(SGLModel):
    family_class = QwenVLFamily

    def make_family(self) -> QwenVLFamily:
        """``min_pixels`` / ``max_pixels`` go to both processors, so guide and large see the same tokens."""
        args = self.args
        return QwenVLFamily(
            max_tiles=args.max_tiles,
            min_pixels=args.min_pixels,
            max_pixels=args.max_pixels,
            preprocessing=args.preprocessing,
        )


class SGLQwen2VLChat(ChatRequests, SGLQwen2VL):
    """The chat interface (what a plain ``--model sgl_qwen2_vl`` resolves to)."""
