"""Model families: thin adapters that know processors, templates and layouts (not lmms-eval).

May import ``lmms_sgl.method`` and ``lmms_sgl.checkpoints``; never the pipeline, adapters or reporting.
"""

from lmms_sgl.families.base import CheckpointError, HFVisionLanguageFamily, LoadedVLM, Prompt
from lmms_sgl.families.internvl import InternVLFamily
from lmms_sgl.families.llava import LlavaFamily
from lmms_sgl.families.qwen_vl import QwenVLFamily

__all__ = [
    "CheckpointError",
    "HFVisionLanguageFamily",
    "InternVLFamily",
    "LlavaFamily",
    "LoadedVLM",
    "Prompt",
    "QwenVLFamily",
]
