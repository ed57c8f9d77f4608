"""The lmms-eval model shared by ``sgl_internvl2``, ``sgl_llava`` and ``sgl_qwen2_vl``; each names its family.

This class is the *simple* interface (``is_simple = True``; ``doc_to_visual`` + the task text, and the
only one lmms-eval sends log-likelihood / multiple-choice requests to); ``lmms_sgl.lmms.chat`` turns
it into the chat interface lmms-eval prefers. Simple prompts are built as lmms-eval's chat models
build the auto-generated messages (one image entry per image, then the task text, through the
checkpoint's chat template), so with ``method=large_only`` both paths equal lmms-eval's own models
on tasks without messages of their own (see docs/arguments.md).
"""

from __future__ import annotations

import json
import os
import time
from collections import defaultdict

import torch
from accelerate import Accelerator
from lmms_eval.api.instance import GenerationResult, Instance, TokenCounts
from lmms_eval.api.model import lmms
from loguru import logger
from PIL import Image
from tqdm import tqdm

from lmms_sgl.baselines.visionzip import VISION_ATTENTION_NAME
from lmms_sgl.families.base import HFVisionLanguageFamily, Prompt
from lmms_sgl.families.video import open_video, video_of
from lmms_sgl.lmms import resumable
from lmms_sgl.lmms.args import ModelArgs, check_schedule, parse_model_args, reject_repeated_arguments
from lmms_sgl.lmms.output_check import check_output_path
from lmms_sgl.method.importance import ATTENTION_NAME, recording_attention
from lmms_sgl.pipeline import GenerationSettings, Sample, SampleRecord, SGLPipeline
from lmms_sgl.reporting.stats import RunStats
from lmms_sgl.reporting.tracking import print_summary, report_to_lmms_eval, report_to_wandb

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class SGLTokenCounts(TokenCounts):
    """lmms-eval's per-sample token counts plus our per-sample record (lands in the samples log).

    ``input_tokens`` / ``output_tokens`` are those of the model whose answer is returned (the guide's
    for an exited sample): its unpadded prompt, visual tokens included, and its answer up to and
    including the stop token, as lmms-eval's own HF models count them; pruning is in ``sgl``."""

    def __init__(self, output_tokens: int, sgl: dict, input_tokens: int | None = None):
        super().__init__(input_tokens=input_tokens, output_tokens=output_tokens)
        self.sgl = sgl

    def to_dict(self) -> dict:
        return {**super().to_dict(), "sgl": self.sgl}


def resolve_dtype(name: str, device: torch.device) -> torch.dtype | str:
    """``auto``: bfloat16 on GPUs (as the paper and lmms-eval's InternVL model), float32 on CPU."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[name]


class SGLModel(lmms):
    is_simple = True
    sgl_resumable = True  # lmms_sgl.lmms.resumable: --use_cache stores batch by batch, records kept
    family_class: type[HFVisionLanguageFamily] = HFVisionLanguageFamily

    def __init__(self, **model_args) -> None:
        super().__init__()
        self.check_arguments(model_args, before_checkpoints=check_output_path)
        self.accelerator = Accelerator()
        self._rank = self.accelerator.process_index
        self._world_size = self.accelerator.num_processes
        self._device, placement = self._placement()
        dtype = resolve_dtype(self.args.dtype, self._device)
        settings = self.args.settings
        method = settings.keep_method
        # ranks by its own attention: the recording SDPA
        large_attention = ATTENTION_NAME if method.own_attention else self.args.attn_implementation
        logger.info(f"SGL {settings} | large={self.args.pretrained} guide={self.args.guide} on {placement}")
        vision_attention = VISION_ATTENTION_NAME if method.vision_attention else "sdpa"
        large = self.family.load(
            self.args.pretrained,
            dtype=dtype,
            text_attention=large_attention,
            vision_attention=vision_attention,
            **placement,
        )
        guide = None
        if self.args.guide is not None:
            guide = self.guide_family.load(
                self.args.guide,
                dtype=dtype,
                device_map=str(large.device),
                text_attention=(
                    recording_attention(settings.importance_precision) if settings.uses_guide else "sdpa"
                ),
                argument="guide",
            )
        reference = None if self.reference_family is None else self.reference_family.view(large)
        self.pipeline = SGLPipeline(large, guide, settings, reference=reference)
        self._records: list[dict] = []
        self._seconds = 0.0
        self.uncovered = 0  # answers served by --use_cache without our record
        resumable.install()

    def check_arguments(self, model_args: dict, before_checkpoints=None) -> int:
        """Everything checked before any weights load (arguments, the family's own, the checkpoints'
        configs and weight-file headers, the schedule, the FLOPs reference layout); sets ``args``,
        ``family``, ``guide_family`` and ``reference_family`` and returns the large model's layer
        count. ``lmms-sgl-sweep`` calls it on an instance made without ``__init__`` to validate a
        whole grid before the first evaluation."""
        self.args: ModelArgs = parse_model_args(**model_args)
        if before_checkpoints is not None:
            before_checkpoints()  # an unwritable --output_path fails now, not after the evaluation
        self.family = self.make_family()
        # Fail fast, before any weights load: configs, weight-file headers, the schedule.
        large_layers = self.family.check_checkpoint(self.args.pretrained, "pretrained")
        # The guide's own family instance: its layout may differ (guide_max_tiles / guide_max_crops).
        self.guide_family = self.family.for_guide(**self.args.guide_layout)
        for family in {id(f): f for f in (self.family, self.guide_family)}.values():
            family.num_frames = self.args.num_frames  # the guide sees the same frames
        # The large model's family at the FLOPs reference layout (None: the run's own layout).
        self.reference_family = self.make_reference_family()
        if self.args.guide is not None:
            self.guide_family.check_checkpoint(self.args.guide, "guide")
        check_schedule(self.args, large_layers)
        if self.args.settings.keep_units is not None:
            self.family.check_unit_selection(self.args.pretrained)
        self.args.settings.keep_method.check_checkpoint(self.family, self.args.pretrained, "pretrained")
        return large_layers

    def make_family(self) -> HFVisionLanguageFamily:
        """The family adapter for these model args (a model whose family takes more options, such
        as ``sgl_qwen2_vl``'s ``min_pixels``/``max_pixels``, overrides this)."""
        for name in ("min_pixels", "max_pixels"):
            if getattr(self.args, name) is not None:
                raise ValueError(
                    f"{name}={getattr(self.args, name)} sets Qwen-VL's dynamic resolution; "
                    f"{type(self).__name__} does not take it (allowed with sgl_qwen2_vl)"
                )
        if self.args.max_tiles is not None and not self.family_class.has_tiles:
            raise ValueError(
                f"max_tiles={self.args.max_tiles} sets InternVL's dynamic tiling; {type(self).__name__} "
                "does not take it (allowed with sgl_internvl2; LLaVA-NeXT / OneVision crops follow the "
                "checkpoint's image_grid_pinpoints, and guide_max_crops limits the guide's)"
            )
        return self.family_class(max_tiles=self.args.max_tiles)

    def reference_layout_text(self) -> str:
        """The reference layout's arguments (``None``: the processor's default)."""
        family = self.reference_family or self.family
        pairs = zip(family.layout_arguments, family.layout_key(), strict=True)
        return ", ".join(f"{name}={value}" for name, value in pairs) or "the checkpoint's own"

    def make_reference_family(self) -> HFVisionLanguageFamily | None:
        """The large model's family at the layout ``flops_ratio_reference`` prices it alone at
        (``flops_reference=default``: the family's defaults, with any ``reference_*`` layout argument
        given), or ``None`` when that layout is the run's own."""
        if self.args.flops_reference == "run":
            return None
        layout = {name: value for name, value in self.args.reference_layout.items() if value is not None}
        foreign = sorted(set(layout) - set(self.family.layout_arguments))
        if foreign:
            takes = ", ".join(f"reference_{name}" for name in self.family.layout_arguments)
            takes = takes or "none (its large model has one layout, the checkpoint's own)"
            raise ValueError(
                f"{', '.join(f'reference_{name}={layout[name]}' for name in foreign)}: "
                f"{type(self).__name__}'s reference layout arguments are {takes}"
            )
        reference = self.family.at_layout(**layout)
        if reference is self.family:
            return None
        reference.check_reference(self.args.pretrained)
        return reference

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
        """lmms-eval's constructor from ``--model_args``, refusing an argument given twice (its
        parser keeps the last value silently: ``pretrained`` twice would load the second path)."""
        reject_repeated_arguments(arg_string)
        return super().create_from_arg_string(arg_string, additional_config)

    # -- placement -------------------------------------------------------------------------
    def _placement(self) -> tuple[torch.device, dict]:
        """Where the large model goes: one copy per process on its own device, or spread over this
        process's share of the GPUs with ``device_map=auto`` (all GPUs when single-process).
        Returns the first device and the ``from_pretrained`` placement arguments."""
        args = self.args
        if self._world_size > 1:
            device = self.accelerator.device
            if args.device_map == "auto" and device.type == "cuda":
                local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", self.accelerator.num_processes))
                per_rank = max(torch.cuda.device_count() // local_processes, 1)
                first = self.accelerator.local_process_index * per_rank
                memory = {
                    i: torch.cuda.get_device_properties(i).total_memory
                    for i in range(first, first + per_rank)
                }
                return torch.device(f"cuda:{first}"), {"device_map": "auto", "max_memory": memory}
            return device, {"device_map": str(device)}
        default = "cuda" if torch.cuda.is_available() else "cpu"
        device = torch.device(args.device or default)
        return device, {"device_map": args.device_map or str(device)}

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def batch_size(self) -> int:
        return self.args.batch_size

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._world_size

    # -- requests --------------------------------------------------------------------------
    @staticmethod
    def gen_kwargs(request: Instance) -> dict:
        """The request's generation kwargs (their place differs between simple and chat requests)."""
        return request.args[1]

    def _sample(self, request: Instance) -> Sample:
        context, _, doc_to_visual, doc_id, task, split = request.args[:6]
        doc = self.task_dict[task][split][doc_id]
        visuals = doc_to_visual(doc) if doc_to_visual is not None else []
        images, videos = [], []
        for visual in visuals or []:
            if isinstance(visual, Image.Image):
                images.append(visual.convert("RGB"))
                continue
            path = video_of(visual)
            if path is None:
                raise ValueError(
                    f"{task}/{doc_id}: visual of type {type(visual).__name__} is not supported "
                    "(PIL images and video paths)"
                )
            videos.append(open_video(path))  # unreadable or empty: a clear error, counted as failed
        self._check_videos(videos)
        return Sample(task, doc_id, Prompt(context, images, videos))

    def _check_videos(self, videos: list) -> None:
        """A request with videos for a checkpoint without video support: refused per sample,
        before any model runs on it."""
        if videos:
            for model in (self.pipeline.large, self.pipeline.guide):
                if model is not None:
                    model.family.check_video(model)

    def _keep(self, record: SampleRecord) -> dict:
        data = record.as_dict()
        self._records.append(data)
        return data

    def generate_until(self, requests: list[Instance]) -> list[GenerationResult]:
        results: list[GenerationResult | None] = [None] * len(requests)
        groups: dict[str, list[int]] = defaultdict(list)
        for index, request in enumerate(requests):
            if request.metadata.get("__padding_only__"):
                results[index] = GenerationResult(text="")  # padding clones are discarded by lmms-eval
                continue
            groups[json.dumps(self.gen_kwargs(request), sort_keys=True, default=str)].append(index)
        progress = tqdm(total=sum(map(len, groups.values())), disable=self.rank != 0, desc="SGL responding")
        for indices in groups.values():
            gen = GenerationSettings.from_gen_kwargs(self.gen_kwargs(requests[indices[0]]))
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                samples, ready = [], []
                for index in chunk:
                    try:
                        samples.append(self._sample(requests[index]))
                        ready.append(index)
                    except Exception as error:  # noqa: BLE001 -- counted as failed, the run goes on
                        _, _, _, doc_id, task, _ = requests[index].args[:6]
                        record = SampleRecord(task, doc_id, fallback=f"{type(error).__name__}: {error}")
                        record.extra["failed"] = True
                        logger.error(f"{task}/{doc_id}: {record.fallback}")
                        results[index] = GenerationResult(
                            text="", token_counts=SGLTokenCounts(0, self._keep(record))
                        )
                if samples:
                    begin = time.perf_counter()
                    records = self.pipeline.generate(samples, gen)
                    self._seconds += time.perf_counter() - begin
                    for index, record in zip(ready, records, strict=True):
                        counts = SGLTokenCounts(record.output_tokens, self._keep(record), record.input_tokens)
                        results[index] = GenerationResult(text=record.answer, token_counts=counts)
                progress.update(len(chunk))
        progress.close()
        return results

    def loglikelihood(self, requests: list[Instance]) -> list[GenerationResult]:
        """``(mean token loss of the continuation, is_greedy)`` per request, as lmms-eval's own
        models return it (lmms-eval 0.7.3 scores multiple choice by the argmin).

        Each pair is wrapped in a ``GenerationResult``: lmms-eval 0.7.3's
        ``unwrap_generation_output`` turns a bare ``(float, bool)`` into its string, which breaks
        ``multiple_choice`` scoring, while a ``GenerationResult`` passes its payload through
        unchanged (and carries our per-sample record into the samples log).
        """
        results = []
        if requests and self.args.settings.exit_threshold is not None:
            logger.warning(
                f"exit_threshold={self.args.settings.exit_threshold} does not apply to the "
                f"{len(requests)} log-likelihood (multiple-choice) requests: they have no guide answer, "
                "so the large model scores each one (counted as exit_not_applied)"
            )
        for request in tqdm(requests, disable=self.rank != 0, desc="SGL log-likelihood"):
            context, target, doc_to_visual, doc_id, task, split = request.args[:6]
            begin = time.perf_counter()
            try:
                doc = self.task_dict[task][split][doc_id]
                continuation = target(doc) if callable(target) else target
                (loss, greedy), record = self.pipeline.loglikelihood(self._sample(request), str(continuation))
            except Exception as error:  # noqa: BLE001 -- counted as failed, the run goes on
                loss, greedy = float("inf"), False
                record = SampleRecord(task, doc_id, fallback=f"{type(error).__name__}: {error}")
                record.extra["failed"] = True
                logger.error(f"{task}/{doc_id}: log-likelihood failed: {record.fallback}")
            self._seconds += time.perf_counter() - begin
            data = record.as_dict() if request.metadata.get("__padding_only__") else self._keep(record)
            counts = SGLTokenCounts(0, data, data["input_tokens"] or None)
            results.append(GenerationResult(text=(loss, greedy), token_counts=counts))
        return results

    def from_cache(self, answer, record: dict | None) -> GenerationResult:
        """An answer served by ``--use_cache`` with the record stored when it was computed (it then
        counts in this run's statistics, marked ``extra["from_cache"]``), or counted as uncovered."""
        text = tuple(answer) if isinstance(answer, list) else answer  # a stored (loss, greedy) pair
        if record is None:
            self.uncovered += 1
            return GenerationResult(text=text)
        record = {**record, "extra": {**record.get("extra", {}), "from_cache": True}}
        self._records.append(record)
        counts = SGLTokenCounts(record["output_tokens"], record, record.get("input_tokens"))
        return GenerationResult(text=text, token_counts=counts)

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError(
            f"{type(self).__name__} does not support multi-round generation; use a single-round task"
        )

    # -- end of run ------------------------------------------------------------------------
    def run_statistics(self) -> tuple[RunStats, list[dict]]:
        """Statistics and records merged over all ranks (every rank must call this)."""
        payload = {
            "stats": self._local_stats().as_payload(),
            "records": self._records,
            "seconds": self._seconds,
        }
        parts = [payload]
        if torch.distributed.is_available() and torch.distributed.is_initialized() and self.world_size > 1:
            parts = [None] * self.world_size
            torch.distributed.all_gather_object(parts, payload)
        stats = RunStats.from_payloads([p["stats"] for p in parts])
        records = [r for p in parts for r in p["records"]]
        self._seconds_all = max(p["seconds"] for p in parts)
        return stats, records

    def _local_stats(self) -> RunStats:
        stats = RunStats.empty()
        for record in self._records:
            stats.add(record)
        return stats

    def clean(self) -> None:
        stats, records = self.run_statistics()
        if self.uncovered:
            logger.warning(
                f"SGL statistics cover {stats.overall.samples} requests; {self.uncovered} more answers came "
                "from --use_cache without their SGL record (cached by another model or an earlier version)"
            )
        if self.rank == 0 and stats.overall.samples:
            summary = stats.summary()
            report_to_lmms_eval(summary, stats.overall.output_tokens, self._seconds_all)
            print_summary(summary)
            config = {
                **self.args.settings_dict,
                "pretrained": self.args.pretrained,
                "guide": self.args.guide,
                "layer_k": self.pipeline.layer_k,
                "token_selection": self.args.settings.token_selection(self.pipeline.layer_k),  # auto resolved
                "large_layers": self.pipeline.large.num_layers,
                "flops_reference": self.args.flops_reference,
                "flops_reference_layout": self.reference_layout_text(),
            }
            report_to_wandb(config, summary, records)
        self.pipeline = None
        super().clean()
