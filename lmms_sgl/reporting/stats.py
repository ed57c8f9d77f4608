"""Run statistics: per task and overall, from sample records, mergeable across ranks.

Ratios are computed from summed numerators and denominators (never averages of averages), so a
merge of ranks equals a single-process run over the same samples.

* ``visual_token_ratio``: layer-averaged visual tokens the large model processed over the visual
  tokens it was given, summed over samples that reached it (sum_s r_s * n_s / sum_s n_s).
* ``vision_units_ratio``: vision units (tiles, crops, images) the large model's vision tower
  encoded over the units of its inputs, summed over samples that reached it (below 1 only with
  unit skipping, ``skip_units``).
* ``exit_rate`` / ``large_call_rate``: share of samples answered by the guide / by the large model.
* ``flops_ratio``: pipeline FLOPs (guide, consistency pass, pruned large model) over the FLOPs of
  the unpruned large model alone on the same samples.
* ``flops_ratio_reference``: the same pipeline FLOPs over the unpruned large model alone at the
  reference layout (``flops_reference``: by default the large model's own default layout, so a
  downsampled run, e.g. ``max_tiles=1``, is placed against the full layout), over the samples that
  have a reference figure; equal to ``flops_ratio`` when the run's layout is the reference.
* ``guide_seconds`` / ``large_seconds``: wall-clock seconds spent in each model (batch time split
  evenly over the batch's samples).
* ``fallbacks``: samples that left the SGL path (layout mismatch, errors); ``failed``: samples
  that got no answer at all.
* ``exit_not_applied``: log-likelihood (multiple-choice) requests of a run with an exit threshold;
  they have no guide answer, so they never exit and always reach the large model.
* ``acceptance_rate`` / ``tokens_per_large_forward`` (``draft=guide``): drafted tokens the large
  model accepted over drafted tokens, and answer tokens over large-model forwards (prefill
  included; 1.0 is plain decoding), over the samples it answered speculatively.
  ``draft_not_applied``: samples whose settings (sampling, beams) kept plain decoding.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields


@dataclass
class Totals:
    samples: int = 0
    exited: int = 0
    reached_large: int = 0
    fallbacks: int = 0
    failed: int = 0
    exit_not_applied: int = 0
    visual_given: float = 0.0
    visual_processed: float = 0.0
    units_given: int = 0
    units_encoded: int = 0
    flops: float = 0.0
    flops_large_alone: float = 0.0
    flops_at_reference: float = 0.0  # pipeline FLOPs of the samples priced at the reference layout
    flops_reference: float = 0.0
    guide_seconds: float = 0.0
    large_seconds: float = 0.0
    output_tokens: int = 0
    drafted_samples: int = 0
    drafted_tokens: int = 0
    accepted_tokens: int = 0
    drafted_answer_tokens: int = 0
    large_forwards: int = 0
    draft_not_applied: int = 0

    def add(self, record: dict) -> None:
        self.samples += 1
        self.exited += int(record["exited"])
        self.reached_large += int(record["reached_large"])
        self.fallbacks += int(record["fallback"] is not None)
        self.failed += int(bool(record.get("extra", {}).get("failed")))
        self.exit_not_applied += int(bool(record.get("extra", {}).get("exit_not_applied")))
        if record["reached_large"] and record["token_ratio"] is not None and record["total_visual"]:
            self.visual_given += record["total_visual"]
            self.visual_processed += record["token_ratio"] * record["total_visual"]
        if record["reached_large"] and record.get("vision_units"):
            self.units_given += record["vision_units"]
            self.units_encoded += record["vision_units_encoded"]
        self.flops += record["flops"]
        self.flops_large_alone += record["flops_large_alone"]
        if record.get("flops_reference") is not None:  # records of older versions have none
            self.flops_at_reference += record["flops"]
            self.flops_reference += record["flops_reference"]
        self.guide_seconds += record["guide_seconds"]
        self.large_seconds += record["large_seconds"]
        self.output_tokens += record["output_tokens"]
        drafting = record.get("extra", {}).get("drafting")
        if drafting:
            self.drafted_samples += 1
            self.drafted_tokens += drafting["drafted"]
            self.accepted_tokens += drafting["accepted"]
            self.drafted_answer_tokens += record["output_tokens"]
            self.large_forwards += drafting["large_forwards"]
        self.draft_not_applied += int(bool(record.get("extra", {}).get("draft_not_applied")))

    def merge(self, other: Totals) -> None:
        for name in TOTALS_FIELDS:
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def summary(self) -> dict:
        n = max(self.samples, 1)
        return {
            "samples": self.samples,
            "visual_token_ratio": self.visual_processed / self.visual_given if self.visual_given else None,
            "vision_units_ratio": self.units_encoded / self.units_given if self.units_given else None,
            "exit_rate": self.exited / n,
            "large_call_rate": self.reached_large / n,
            "flops_ratio": self.flops / self.flops_large_alone if self.flops_large_alone else None,
            "tflops": self.flops / 1e12,
            "tflops_large_alone": self.flops_large_alone / 1e12,
            "flops_ratio_reference": (
                self.flops_at_reference / self.flops_reference if self.flops_reference else None
            ),
            "tflops_reference": self.flops_reference / 1e12,
            "guide_seconds": self.guide_seconds,
            "large_seconds": self.large_seconds,
            "fallbacks": self.fallbacks,
            "failed": self.failed,
            "exit_not_applied": self.exit_not_applied,
            "acceptance_rate": self.accepted_tokens / self.drafted_tokens if self.drafted_tokens else None,
            "tokens_per_large_forward": (
                self.drafted_answer_tokens / self.large_forwards if self.large_forwards else None
            ),
            "draft_not_applied": self.draft_not_applied,
        }


@dataclass
class RunStats:
    overall: Totals
    by_task: dict[str, Totals]

    @classmethod
    def empty(cls) -> RunStats:
        return cls(Totals(), {})

    def add(self, record: dict) -> None:
        self.overall.add(record)
        self.by_task.setdefault(record["task"], Totals()).add(record)

    def as_payload(self) -> dict:
        return {"overall": asdict(self.overall), "by_task": {k: asdict(v) for k, v in self.by_task.items()}}

    @classmethod
    def from_payloads(cls, payloads: list[dict]) -> RunStats:
        merged = cls.empty()
        for payload in payloads:
            merged.overall.merge(Totals(**payload["overall"]))
            for task, totals in payload["by_task"].items():
                merged.by_task.setdefault(task, Totals()).merge(Totals(**totals))
        return merged

    def summary(self) -> dict:
        return {
            "overall": self.overall.summary(),
            **{task: t.summary() for task, t in sorted(self.by_task.items())},
        }


def flatten(summary: dict, prefix: str = "sgl") -> dict[str, float]:
    """``{"overall": {"exit_rate": x}}`` -> ``{"sgl.overall.exit_rate": x}``, numbers only."""
    flat = {}
    for scope, metrics in summary.items():
        for name, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                flat[f"{prefix}.{scope}.{name}"] = value
    return flat


def format_table(summary: dict) -> str:
    """A small Markdown table for the console, one row per scope."""
    columns = [
        "samples",
        "visual_token_ratio",
        "vision_units_ratio",
        "exit_rate",
        "large_call_rate",
        "flops_ratio",
        "flops_ratio_reference",
        "guide_seconds",
        "large_seconds",
        "fallbacks",
        "failed",
        "exit_not_applied",
        "acceptance_rate",
        "tokens_per_large_forward",
    ]

    def cell(value) -> str:
        if value is None:
            return "-"
        return f"{value:.4f}" if isinstance(value, float) else str(value)

    lines = ["| scope | " + " | ".join(columns) + " |", "|" + "---|" * (len(columns) + 1)]
    for scope, metrics in summary.items():
        lines.append(f"| {scope} | " + " | ".join(cell(metrics.get(c)) for c in columns) + " |")
    return "\n".join(lines)


TOTALS_FIELDS = tuple(f.name for f in fields(Totals))
