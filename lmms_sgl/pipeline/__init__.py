"""The per-sample SGL flow (guide, maybe exit, pruned large model) and its records.

May import ``lmms_sgl.method`` and ``lmms_sgl.families``; never lmms-eval or the adapters.
"""

from lmms_sgl.pipeline.flow import SGLPipeline
from lmms_sgl.pipeline.generation import GenerationSettings
from lmms_sgl.pipeline.records import Sample, SampleRecord

__all__ = ["GenerationSettings", "SGLPipeline", "Sample", "SampleRecord"]
