"""Proving-ground points: one lmms-eval run each (a method, its K and keep ratio), cached as JSON.

The study (:mod:`.study`) and its sections evaluate every point with the sweep's engine
(:func:`lmms_sgl.sweep.run.evaluate`: lmms-eval's own evaluator, as the CLI runs it, its samples log
written beside the cached summary) and summarise them the same way.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from loguru import logger

from lmms_sgl.method.cost import shared_schedule as schedule  # noqa: F401  (the study's name)
from lmms_sgl.method.registry import method_named

TASK = "sgl_shapes"
FAMILIES = {
    "internvl": ("sgl_internvl2", "models/shapes-internvl-large", "models/shapes-internvl-guide"),
    "llava": ("sgl_llava", "models/shapes-llava-large", "models/shapes-llava-guide"),
}

# The multi-tile case: InternVL on 896 x 448 images (two tiles plus a thumbnail, 768 visual tokens).
WIDE_TASK, WIDE_RATIOS = "sgl_shapes_wide", (0.35, 0.09)
# Unit selection: InternVL on 1344 x 448 images (3 tiles plus a thumbnail, 1,024 visual tokens).
TILES_TASK = "sgl_shapes_tiles"


@dataclass(frozen=True)
class Point:
    """One lmms-eval run: a method and, for pruning methods, the layer K and keep ratio."""

    family: str
    method: str
    prune_layer: float | None = None
    keep_ratio: float | None = None
    exit_threshold: float | None = None
    target_ratio: float | None = None
    task: str = TASK
    schedule: str = "K=1"
    # Image layouts and unit selection (InternVL): the guide's and the large model's tile limits, and
    # how many units (tiles) the guide chooses for the large model, with or without the thumbnail.
    guide_max_tiles: int | None = None
    max_tiles: int | None = None
    keep_units: int | None = None
    keep_global_view: bool = True
    # SGL's selection rule (``topk``: the paper's; ``spread``: :mod:`lmms_sgl.method.spread`)
    selection: str = "topk"
    spread_radius: int | None = None

    @property
    def records_exit_score(self) -> bool:
        """Every guided point without an exit threshold records the guide's exit score (its
        consistency pass runs and is counted in its FLOPs), so that any of them can have its exit
        thresholds replayed (the exit sweep, the spread study's frontiers). The points cached before
        the pass became optional ran it too, so the key needs no mark for it."""
        return method_named(self.method).guided and self.exit_threshold is None

    @property
    def key(self) -> str:
        parts = [self.family, self.method] if self.task == TASK else [self.family, self.task, self.method]
        if self.schedule == "preset":
            parts.append("preset")
        if self.target_ratio is not None:
            parts.append(f"r{self.target_ratio:g}")
        if self.prune_layer is not None:
            parts.append(f"p{self.prune_layer:.4f}")
        if self.exit_threshold is not None:
            parts.append(f"exit{self.exit_threshold!r}")
        if self.guide_max_tiles is not None:
            parts.append(f"guide{self.guide_max_tiles}t")
        if self.max_tiles is not None:
            parts.append(f"tiles{self.max_tiles}")
        if self.keep_units is not None:
            parts.append(f"units{self.keep_units}" + ("" if self.keep_global_view else "-noglobal"))
        if self.selection != "topk":
            parts.append(f"{self.selection}{'' if self.spread_radius is None else self.spread_radius}")
        return "-".join(parts)

    def model_args(self, root: Path) -> str:
        _, large, guide = FAMILIES[self.family]
        args = [f"pretrained={root / large}", f"method={self.method}"]
        if method_named(self.method).uses_guide:
            args.append(f"guide={root / guide}")
        if method_named(self.method).guided:  # explicit: the default (auto) depends on the ratio
            args.append(f"selection={self.selection}")
            if self.spread_radius is not None:
                args.append(f"spread_radius={self.spread_radius}")
        if self.prune_layer is not None:
            args += [f"prune_layer={self.prune_layer:.6f}", f"keep_ratio={self.keep_ratio:.6f}"]
        if self.exit_threshold is not None:
            args.append(
                f"exit_threshold={self.exit_threshold!r}"
            )  # exact: the replay compares the same float
        if self.records_exit_score:
            args.append("record_exit_score=true")
        if self.guide_max_tiles is not None:
            args.append(f"guide_max_tiles={self.guide_max_tiles}")
        if self.max_tiles is not None:
            args.append(f"max_tiles={self.max_tiles}")
        if self.keep_units is not None:
            args.append(f"keep_units={self.keep_units}")
            if not self.keep_global_view:
                args.append("keep_global_view=false")
        return ",".join(args)


def text_layers(checkpoint: Path) -> int:
    """The decoder layers of a checkpoint's language model (its ``config.json``)."""
    config = json.loads((checkpoint / "config.json").read_text())
    return config["text_config"]["num_hidden_layers"]


@functools.lru_cache
def fingerprint(root: Path, family: str) -> str:
    """Short hash of the family's two checkpoints: cached points never outlive the weights they used.
    Computed once per process (the study asks for it at every point)."""
    import hashlib

    digest = hashlib.sha256()
    for folder in FAMILIES[family][1:]:
        digest.update((root / folder / "model.safetensors").read_bytes())
    return digest.hexdigest()[:12]


def run_point(point: Point, root: Path, work_dir: Path, limit: int | None, batch_size: int) -> dict:
    """Evaluate one point through lmms-eval (cached as JSON); returns per-sample rows and metrics."""
    cache = (
        work_dir
        / f"{point.key}-{fingerprint(root, point.family)}{'' if limit is None else f'-n{limit}'}.json"
    )
    if cache.exists():
        return json.loads(cache.read_text())
    from lmms_sgl.sweep.run import Settings, evaluate

    model, _, _ = FAMILIES[point.family]
    logger.info(f"study point {point.key}: {point.model_args(root)}")
    settings = Settings(
        model=model,
        model_args=point.model_args(root),
        tasks=[point.task],
        include_paths=[str(root / "tasks")],
        limit=limit,
        batch_size=batch_size,
        output_path=work_dir,
    )
    # the sweep's engine: lmms-eval's evaluator, its samples log kept beside the summary
    results = evaluate(settings, settings.model_args, work_dir / "lmms-eval" / cache.stem)
    rows = []
    for logged in results["samples"][point.task]:
        record = logged["token_counts"][0]["sgl"] if logged.get("token_counts") else {}
        rows.append(
            {
                "doc_id": logged["doc_id"],
                "type": logged["doc"]["type"],
                "target": logged["target"],
                "exact_match": float(logged["exact_match"]),
                **{k: record.get(k) for k in _RECORD_FIELDS},
            }
        )
    rows.sort(key=lambda r: r["doc_id"])
    payload = {
        "point": asdict(point),
        "accuracy": results["results"][point.task]["exact_match,none"],
        "rows": rows,
    }
    work_dir.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(payload))
    return payload


_RECORD_FIELDS = (
    "answer",
    "guide_answer",
    "exited",
    "reached_large",
    "exit_score",
    "token_ratio",
    "flops",
    "flops_large_alone",
    "kept_visual",
    "total_visual",
    "vision_units",
    "vision_units_encoded",
    "fallback",
    "extra",
)


def summarize(payload: dict) -> dict:
    rows = payload["rows"]
    n = len(rows)
    accuracy = sum(r["exact_match"] for r in rows) / n
    ratios = [r["token_ratio"] for r in rows if r["token_ratio"] is not None]
    flops = sum(r["flops"] or 0 for r in rows)
    alone = sum(r["flops_large_alone"] or 0 for r in rows)
    by_type: dict[str, list[float]] = {}
    for r in rows:
        by_type.setdefault(r["type"], []).append(r["exact_match"])
    return {
        **payload["point"],
        "n": n,
        "accuracy": accuracy,
        "stderr": math.sqrt(accuracy * (1 - accuracy) / n),
        "token_ratio": sum(ratios) / len(ratios) if ratios else None,
        "flops_ratio": flops / alone if alone else None,
        "exit_rate": sum(bool(r["exited"]) for r in rows) / n,
        "scores": {str(r["doc_id"]): r["exact_match"] for r in rows},  # for paired differences
        "by_type": {t: sum(v) / len(v) for t, v in sorted(by_type.items())},
    }


def guide_exact_match(rows: list[dict]) -> list[float]:
    """The task's own metric on the guide's answers: lmms-eval's exact match with the flags that
    sgl_shapes.yaml sets (ignore case and punctuation), as the large model's answers were scored."""
    from lmms_eval.api.metrics import exact_match_hf_evaluate

    return [
        float(
            exact_match_hf_evaluate(
                [r["guide_answer"]], [r["target"]], ignore_case=True, ignore_punctuation=True
            )["exact_match"]
        )
        for r in rows
    ]


def ratio_stderr(numerators: list[float], denominators: list[float]) -> float:
    """Standard error of ``sum(numerators) / sum(denominators)`` (ratio estimator, delta method)."""
    n = len(numerators)
    if n < 2 or not sum(denominators):
        return float("nan")
    ratio = sum(numerators) / sum(denominators)
    mean = sum(denominators) / n
    residuals = sum((a - ratio * b) ** 2 for a, b in zip(numerators, denominators, strict=True))
    return math.sqrt(residuals / (n * (n - 1))) / mean


def write_section(
    out_dir: Path, stem: str, data: dict, command: str, plot, lines: list[str], start: str, end: str
) -> Path:
    """A study section's outputs: ``{stem}.json`` (with its command, so that a rerun of the main
    report can rebuild the section), ``{stem}.png`` drawn by ``plot(data, path)``, and ``lines``
    between the markers of ``proving_ground.md`` (replaced in place, or appended)."""
    from lmms_sgl.reporting.sections import insert_marked_section

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{stem}.json").write_text(json.dumps({**data, "command": command}, indent=1))
    plot(data, out_dir / f"{stem}.png")
    return insert_marked_section(out_dir / "proving_ground.md", lines, start, end)
