"""What flows through the pipeline: a sample in, a record out, and the guide's scores between.

Plain data: the record is what the samples log, the run statistics and W&B read, so its fields are
the contract with ``lmms_sgl.reporting`` and the lmms-eval adapters.
"""

from __future__ import annotations

import zlib
from dataclasses import asdict, dataclass, field

import torch

from lmms_sgl.families.base import Prompt
from lmms_sgl.method.transfer import BoxesUnavailable, TokenBoxes


@dataclass
class Sample:
    task: str
    doc_id: int | str
    prompt: Prompt

    @property
    def key(self) -> int:
        """Stable per-sample key (seeds the random baseline independently of batching and ranks)."""
        return zlib.crc32(f"{self.task}/{self.doc_id}".encode())


@dataclass
class SampleRecord:
    task: str
    doc_id: int | str
    answer: str = ""
    guide_answer: str | None = None
    exited: bool = False
    reached_large: bool = False
    confidence: float | None = None
    consistency: float | None = None
    exit_score: float | None = None
    kept_visual: int | None = None
    total_visual: int | None = None
    layer_k: int | None = None
    num_layers: int | None = None
    token_ratio: float | None = None
    vision_units: int | None = None  # the large model's vision units (tiles, crops, images)
    vision_units_encoded: int | None = None  # of which its vision tower encoded (unit skipping)
    flops: float = 0.0
    flops_large_alone: float = 0.0
    # the unpruned large model at the reference layout (flops_reference), same answer length;
    # equals flops_large_alone when that layout is the run's own; None: not priced
    flops_reference: float | None = None
    guide_seconds: float = 0.0
    large_seconds: float = 0.0
    output_tokens: int = 0
    # prompt tokens (text + visual, unpadded) given to the model that answered; pruning shows in
    # kept_visual / token_ratio, not here (lmms-eval's input_tokens, see docs/reporting.md)
    input_tokens: int = 0
    fallback: str | None = None
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class GuideScores:
    """The guide's importance of one sample, with the boxes of its visual tokens (or why they
    could not be derived)."""

    values: torch.Tensor
    boxes: TokenBoxes | BoxesUnavailable
    drafts: object | None = None  # the batch's GuideDrafts (lmms_sgl.pipeline.drafting) when drafting

    def __len__(self) -> int:
        return len(self.values)
