"""Train the proving-ground model pairs on the shapes benchmark, on the CPU, with transformers' classes.

A plain end-to-end recipe never grounds here: small VLMs trained from scratch for 20 minutes stay at
the answer priors. This recipe splits the problem in two stages that each learn fast:

1. **Dense vision pretraining.** The vision tower and projector of the real model learn per-token
   targets derived from the scene (colour, shape and size of the covering object, and whether an
   object's centre falls in the token), through linear heads on the projector output. Every token is
   a labelled example, so a few thousand images suffice.
2. **Language model on frozen visual tokens.** The tower and projector are frozen; their output for
   a pool of training scenes is computed once and cached. The text model then learns to answer many
   questions per scene from those tokens (loss on the answer only). Each step costs a text forward
   and backward only, which makes thousands of steps fit on two CPU cores.

Everything is deterministic from the spec's seed and the step index, and the whole state is saved
every ``checkpoint_every`` steps, so an interrupted run resumes where it stopped:
``python -m lmms_sgl.proving.train --models shapes-internvl-large`` (``--help``).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from loguru import logger
from torch import nn
from tqdm import tqdm

from lmms_sgl.factory import ModelSpec, TextSpec, VisionSpec, build_model
from lmms_sgl.palette import COLORS
from lmms_sgl.proving.shapes import (
    QUESTION_TYPES,
    SHAPES,
    SIZES,
    SPLIT_SEEDS,
    Scene,
    ask,
    evidence,
    make_scene,
    render,
    sample,
)

POST_PROMPT = "\nAnswer the question using a single word or phrase."  # the sgl_shapes task's prompt
GRID = 16  # visual tokens per side for a 448 px image, both families (256 tokens)
COLOR_NAMES = sorted(COLORS)
SIZE_NAMES = sorted(SIZES)


@dataclass(frozen=True)
class Recipe:
    """Steps, batch sizes and learning rates of the two stages."""

    vision_steps: int = 1500
    vision_batch: int = 16
    vision_lr: float = 2e-3
    pool_images: int = 4000  # scenes whose visual tokens are cached for stage 2
    lm_steps: int = 4000
    lm_batch: int = 32  # questions per step
    questions_per_image: int = 4  # after the curriculum: questions asked about one image per sequence
    lm_lr: float = 2e-3
    lm_restarts: tuple[int, ...] = ()  # steps where a new cosine leg starts (warm restarts)
    restart_peak: float = 0.5  # learning-rate factor at each restart
    warmup: int = 100
    curriculum_steps: int = 1200  # visual tokens revealed in phases (see Trainer.curriculum_mask)
    eval_every: int = 500
    eval_samples: int = 300
    checkpoint_every: int = 250


@dataclass(frozen=True)
class ProvingModel:
    spec: ModelSpec
    recipe: Recipe = field(default_factory=Recipe)


def _spec(name, family, role, text, vision, seed) -> ModelSpec:
    return ModelSpec(name, family, role, TextSpec(*text), VisionSpec(*vision), seed=seed)


GUIDE_RECIPE = Recipe(lm_steps=3000)
# Large models: a 5,000-step cosine leg (about 80 % validation accuracy), then a warm restart for
# 3,000 more steps at half the peak learning rate.
LARGE_RECIPE = Recipe(lm_steps=8000, lm_restarts=(5000,))

PROVING_MODELS: dict[str, ProvingModel] = {
    m.spec.name: m
    for m in (
        ProvingModel(
            _spec("shapes-internvl-guide", "internvl", "guide", (64, 2, 4, 2, 128), (32, 2, 2, 64), 31),
            GUIDE_RECIPE,
        ),
        ProvingModel(
            _spec("shapes-internvl-large", "internvl", "large", (64, 12, 4, 2, 192), (64, 2, 4, 128), 32),
            replace(LARGE_RECIPE, vision_steps=1200),  # 1,024 patches per image: the costly tower
        ),
        ProvingModel(
            _spec("shapes-llava-guide", "llava", "guide", (64, 2, 4, 2, 128), (32, 2, 2, 64), 41),
            GUIDE_RECIPE,
        ),
        ProvingModel(
            _spec("shapes-llava-large", "llava", "large", (64, 12, 4, 2, 192), (64, 2, 4, 128), 42),
            LARGE_RECIPE,
        ),
    )
}


# -- targets ---------------------------------------------------------------------------------------
def object_cells(obj, width: int, height: int, grid: int = GRID) -> list[int]:
    """Row-major indices of the visual tokens whose centre lies inside the object's box."""
    left, top, right, bottom = obj.box
    cell_w, cell_h = width / grid, height / grid
    return [
        row * grid + col
        for row in range(grid)
        if top <= (row + 0.5) * cell_h < bottom
        for col in range(grid)
        if left <= (col + 0.5) * cell_w < right
    ]


def dense_targets(scene: Scene, grid: int = GRID) -> torch.Tensor:
    """``(4, grid * grid)`` long targets per visual token, row-major like the models' token order:
    colour, shape and size of the object covering the token centre (0 = background, else index + 1)
    and 1 where an object's centre falls in the token (so that objects can be counted)."""
    targets = torch.zeros(4, grid * grid, dtype=torch.long)
    cell_w, cell_h = scene.width / grid, scene.height / grid
    for obj in scene.objects:
        cells = object_cells(obj, scene.width, scene.height, grid)
        targets[0, cells] = COLOR_NAMES.index(obj.color) + 1
        targets[1, cells] = SHAPES.index(obj.shape) + 1
        targets[2, cells] = SIZE_NAMES.index(obj.size) + 1
        left, top, right, bottom = obj.box
        center_row = min(grid - 1, int((top + bottom) / 2 / cell_h))
        center_col = min(grid - 1, int((left + right) / 2 / cell_w))
        targets[3, center_row * grid + center_col] = 1
    return targets


def evidence_mask(scene: Scene, question: str, grid: int = GRID) -> torch.Tensor:
    """``(grid * grid,)`` bool: the visual tokens of the objects the question is about."""
    mask = torch.zeros(grid * grid, dtype=torch.bool)
    for obj in evidence(scene, question):
        mask[object_cells(obj, scene.width, scene.height, grid)] = True
    return mask


class DenseHeads(nn.Module):
    """Linear read-outs of the visual tokens used only while pretraining the vision side."""

    def __init__(self, hidden: int):
        super().__init__()
        self.heads = nn.ModuleList(
            nn.Linear(hidden, n) for n in (len(COLOR_NAMES) + 1, len(SHAPES) + 1, len(SIZE_NAMES) + 1, 2)
        )

    def loss(self, tokens: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, float]:
        """Cross-entropy summed over heads; object tokens weigh 4x so the background does not dominate.
        Returns the loss and the token accuracy of the shape head on object tokens."""
        on_object = targets[:, 0] > 0
        weight = 1.0 + 3.0 * on_object.float()
        total = tokens.new_zeros(())
        for i, head in enumerate(self.heads):
            logits = head(tokens)
            ce = F.cross_entropy(logits.flatten(0, 1), targets[:, i].flatten(), reduction="none")
            total = total + (ce * weight.flatten()).sum() / weight.sum()
            if i == 1:
                hits = (logits.argmax(-1) == targets[:, 1])[on_object]
                shape_accuracy = hits.float().mean().item() if hits.numel() else 0.0
        return total, shape_accuracy


# -- model plumbing --------------------------------------------------------------------------------
def visual_tokens(model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """``(images, tokens, text_hidden)``: what the text model receives for each image."""
    features = model.model.get_image_features(pixel_values=pixel_values, return_dict=True).pooler_output
    return torch.stack(list(features)) if isinstance(features, (list, tuple)) else features


def pixel_batch(processor, images) -> torch.Tensor:
    pixels = processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
    if pixels.shape[0] != len(images):
        raise ValueError(f"expected one tile per 448 px image, got {pixels.shape[0]} for {len(images)}")
    return pixels


def vision_parameters(model: nn.Module) -> list[nn.Parameter]:
    return list(model.model.vision_tower.parameters()) + list(model.model.multi_modal_projector.parameters())


class PromptCache:
    """Token ids of ``prompt + answer + eos`` per question, with the image placeholder expanded by
    the family's own processor (once per distinct question: the chat template and expansion are the
    real ones, and batches need no image processing)."""

    def __init__(self, processor):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self._prompts: dict[str, list[int]] = {}
        self._answers: dict[str, list[int]] = {}
        self._follow_ups: dict[str, list[int]] = {}
        from PIL import Image

        self._blank = Image.new("RGB", (448, 448))

    def prompt_text(self, question: str) -> str:
        messages = [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question + POST_PROMPT}]}
        ]
        return self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def prompt(self, question: str) -> list[int]:
        if question not in self._prompts:
            encoded = self.processor(
                text=[self.prompt_text(question)], images=[self._blank], return_tensors="pt"
            )
            self._prompts[question] = encoded["input_ids"][0].tolist()
        return self._prompts[question]

    def answer(self, answer: str) -> list[int]:
        if answer not in self._answers:
            ids = self.tokenizer(answer, add_special_tokens=False)["input_ids"]
            self._answers[answer] = ids + [self.tokenizer.eos_token_id]
        return self._answers[answer]

    def follow_up(self, question: str) -> list[int]:
        """A later user turn (no image) of the same conversation, up to the generation prompt."""
        if question not in self._follow_ups:
            messages = [{"role": "user", "content": [{"type": "text", "text": question + POST_PROMPT}]}]
            text = self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            self._follow_ups[question] = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return self._follow_ups[question]

    def batch(self, pairs: list[tuple[str, str]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (answer tokens only)."""
        return self.conversations([[pair] for pair in pairs])

    def conversations(
        self, rows: list[list[tuple[str, str]]]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Like :meth:`batch` with several questions about one image per row: the first turn is
        exactly the evaluation prompt, later turns reuse the image's tokens (cheaper training)."""
        sequences = []
        for turns in rows:
            ids: list[int] = []
            labels: list[int] = []
            for turn, (question, answer) in enumerate(turns):
                prompt = self.prompt(question) if turn == 0 else self.follow_up(question)
                ids += prompt + self.answer(answer)
                labels += [-100] * len(prompt) + self.answer(answer)
            sequences.append((ids, labels))
        width = max(len(ids) for ids, _ in sequences)
        pad = self.tokenizer.pad_token_id
        ids_out = torch.full((len(rows), width), pad, dtype=torch.long)
        labels_out = torch.full((len(rows), width), -100, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (ids, labels) in enumerate(sequences):
            ids_out[i, : len(ids)] = torch.tensor(ids)
            labels_out[i, : len(ids)] = torch.tensor(labels)
            mask[i, : len(ids)] = 1
        return ids_out, mask, labels_out


def answer_logits_and_loss(
    model, ids, mask, labels, features, hidden=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forced forward with cached visual tokens scattered at the image-token positions;
    ``hidden`` (images, tokens) bool masks visual tokens out of attention (the curriculum)."""
    embeds = model.get_input_embeddings()(ids)
    is_image = ids == model.config.image_token_id
    embeds = embeds.masked_scatter(
        is_image.unsqueeze(-1).expand_as(embeds), features.to(embeds.dtype).reshape(-1)
    )
    if hidden is not None:
        mask = mask.clone()
        mask[is_image] = (~hidden).reshape(-1).to(mask.dtype)
    out = model(inputs_embeds=embeds, attention_mask=mask, labels=labels)
    return out.logits, out.loss


def answers_correct(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per row: every answer token (and the eos) is the argmax, i.e. greedy decoding emits the answer."""
    predicted = logits[:, :-1].argmax(-1)
    target = labels[:, 1:]
    return ((predicted == target) | (target == -100)).all(-1)


# -- data ------------------------------------------------------------------------------------------
def train_scene(index: int) -> Scene:
    return make_scene(SPLIT_SEEDS["train"] + index)


def pool_question(scene_index: int, draw: int) -> tuple[str, str, str]:
    """The ``draw``-th question asked about training scene ``scene_index`` (deterministic)."""
    return ask(train_scene(scene_index), random.Random(scene_index * 1_000_003 + draw * 7 + 11))


def encode_pool(model, processor, indices: list[int], batch: int = 32) -> torch.Tensor:
    """Visual tokens (fp16) of training scenes, computed once with the frozen vision side."""
    out = []
    with torch.inference_mode():
        for start in tqdm(range(0, len(indices), batch), desc="caching visual tokens", leave=False):
            images = [render(train_scene(i)) for i in indices[start : start + batch]]
            out.append(visual_tokens(model, pixel_batch(processor, images)).to(torch.float16))
    return torch.cat(out)


def encode_validation(model, processor, n: int) -> tuple[torch.Tensor, list[dict]]:
    records = [sample(SPLIT_SEEDS["validation"] + i) for i in range(n)]
    with torch.inference_mode():
        chunks = [
            visual_tokens(model, pixel_batch(processor, [r["image"] for r in records[s : s + 32]]))
            for s in range(0, n, 32)
        ]
    return torch.cat(chunks).to(torch.float16), records


# -- training --------------------------------------------------------------------------------------
def _schedule(
    step: int, total: int, warmup: int, restarts: tuple[int, ...] = (), restart_peak: float = 1.0
) -> float:
    """Learning-rate factor: linear warmup, then cosine decay to zero; at each step in ``restarts`` a
    new cosine leg starts from ``restart_peak`` (a warm restart) and runs to the next one or to
    ``total``."""
    bounds = [0, *restarts, total]
    leg = max(i for i in range(len(bounds) - 1) if bounds[i] <= step)
    start, end = bounds[leg], bounds[leg + 1]
    if leg == 0 and step < warmup:
        return (step + 1) / warmup
    offset = warmup if leg == 0 else 0
    peak = 1.0 if leg == 0 else restart_peak
    return peak * 0.5 * (1 + math.cos(math.pi * (step - start - offset) / max(1, end - start - offset)))


@dataclass
class TrainState:
    stage: str = "vision"  # "vision" -> "lm" -> "done"
    step: int = 0
    seconds: float = 0.0
    history: list[dict] = field(default_factory=list)


class Trainer:
    """Runs (or resumes) both stages of one proving model in ``work_dir``."""

    def __init__(self, proving: ProvingModel, work_dir: Path, threads: int | None = None):
        self.spec, self.recipe = proving.spec, proving.recipe
        self.work_dir = Path(work_dir) / self.spec.name
        self.work_dir.mkdir(parents=True, exist_ok=True)
        if threads:
            torch.set_num_threads(threads)
        self.model, self.processor = build_model(self.spec)
        self.heads = DenseHeads(self.model.config.text_config.hidden_size)
        self.state = TrainState()
        self.prompts = PromptCache(self.processor)
        self._optimizer: torch.optim.Optimizer | None = None
        self._resume()

    # -- persistence ---------------------------------------------------------------------------
    @property
    def _state_path(self) -> Path:
        return self.work_dir / "state.pt"

    def restart_lm(self) -> None:
        """Start stage 2 again from the end of stage 1 (e.g. after changing the stage-2 recipe)."""
        snapshot = self.work_dir / "vision_stage.pt"
        if not snapshot.exists():
            raise FileNotFoundError(f"{snapshot} is missing: stage 1 of {self.spec.name} has not finished")
        self.model.load_state_dict(torch.load(snapshot, weights_only=True))
        self.state = TrainState(stage="lm", history=[h for h in self.state.history if h["stage"] == "vision"])
        self._make_optimizer()
        self._save()

    def _resume(self) -> None:
        if not self._state_path.exists():
            return
        saved = torch.load(self._state_path, weights_only=False)
        self.model.load_state_dict(saved["model"])
        self.heads.load_state_dict(saved["heads"])
        self.state = TrainState(**saved["state"])
        if self.state.stage == "done" and self.state.step < self.recipe.lm_steps:
            self.state.stage = "lm"  # the recipe now asks for more text-model steps (a new leg)
        self._make_optimizer()
        if saved.get("optimizer") is not None:
            self._optimizer.load_state_dict(saved["optimizer"])
        logger.info(f"{self.spec.name}: resumed at stage {self.state.stage} step {self.state.step}")

    def _save(self) -> None:
        payload = {
            "model": self.model.state_dict(),
            "heads": self.heads.state_dict(),
            "state": asdict(self.state),
            "optimizer": self._optimizer.state_dict() if self._optimizer else None,
        }
        tmp = self._state_path.with_suffix(".tmp")
        torch.save(payload, tmp)
        tmp.replace(self._state_path)  # atomic: an interrupted save never corrupts the last state

    def _make_optimizer(self) -> None:
        if self.state.stage == "vision":
            params = vision_parameters(self.model) + list(self.heads.parameters())
            lr = self.recipe.vision_lr
        else:
            for p in vision_parameters(self.model):
                p.requires_grad_(False)
            params = [p for p in self.model.parameters() if p.requires_grad]
            lr = self.recipe.lm_lr
        self._optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)

    def _log(self, **entry) -> None:
        entry = {
            "stage": self.state.stage,
            "step": self.state.step,
            "seconds": round(self.state.seconds),
            **entry,
        }
        self.state.history.append(entry)
        logger.info(f"{self.spec.name}: {entry}")

    # -- stage 1 -------------------------------------------------------------------------------
    def vision_step(self, step: int) -> tuple[float, float]:
        """One dense-pretraining step on fresh scenes (scene indices depend only on ``step``)."""
        batch = self.recipe.vision_batch
        scenes = [train_scene(1_000_000 + step * batch + i) for i in range(batch)]
        pixels = pixel_batch(self.processor, [render(s) for s in scenes])
        targets = torch.stack([dense_targets(s) for s in scenes])  # (batch, 4, tokens)
        loss, shape_accuracy = self.heads.loss(visual_tokens(self.model, pixels), targets)
        return loss, shape_accuracy

    # -- stage 2 -------------------------------------------------------------------------------
    def lm_rows(self, step: int) -> tuple[list[int], list[list[tuple[str, str]]]]:
        """Pool scenes and their questions for ``step``: one question per scene during the curriculum
        (its visibility mask is per question), then ``questions_per_image`` per scene."""
        rng = random.Random(self.spec.seed * 7_919 + step)
        recipe = self.recipe
        per_image = 1 if step < recipe.curriculum_steps else recipe.questions_per_image
        indices = [rng.randrange(recipe.pool_images) for _ in range(recipe.lm_batch // per_image)]
        rows = []
        for i in indices:
            asked = [pool_question(i, rng.randrange(1_000)) for _ in range(per_image)]
            rows.append([(q, a) for _, q, a in asked])
        return indices, rows

    def curriculum_mask(
        self, step: int, on_object: torch.Tensor, on_evidence: torch.Tensor
    ) -> torch.Tensor | None:
        """Which visual tokens attention cannot see at ``step`` (True = hidden). Three phases of
        ``curriculum_steps / 3``: only the question's evidence objects are visible (learn to read
        visual tokens), then the other objects appear (learn to select), then the background (learn
        to ignore it); afterwards the whole image, as at test time. Nothing supervises attention."""
        total = self.recipe.curriculum_steps
        if step >= total:
            return None
        phase = 3 * step / total
        show_objects, show_background = min(max(phase - 1, 0), 1), min(max(phase - 2, 0), 1)
        generator = torch.Generator().manual_seed(self.spec.seed * 31 + step)
        draw = torch.rand(on_object.shape, generator=generator)
        visible = on_evidence | (on_object & (draw < show_objects)) | (~on_object & (draw < show_background))
        return ~visible

    def evaluate(self, features: torch.Tensor, records: list[dict], shuffle: bool = False) -> dict:
        """Validation accuracy per question type (greedy == teacher-forced argmax of the answer)."""
        self.model.eval()
        order = list(range(len(records)))
        if shuffle:  # pair each question with another scene's image: accuracy must drop
            random.Random(0).shuffle(order)
        hits: dict[str, list[bool]] = {t: [] for t in QUESTION_TYPES}
        with torch.inference_mode():
            for start in range(0, len(records), 50):
                chunk = records[start : start + 50]
                ids, mask, labels = self.prompts.batch([(r["question"], r["answer"]) for r in chunk])
                feats = features[order[start : start + 50]]
                logits, _ = answer_logits_and_loss(self.model, ids, mask, labels, feats)
                for r, ok in zip(chunk, answers_correct(logits, labels).tolist(), strict=True):
                    hits[r["type"]].append(ok)
        self.model.train()
        result = {t: round(sum(v) / len(v), 4) for t, v in hits.items() if v}
        result["all"] = round(sum(sum(v) for v in hits.values()) / len(records), 4)
        return result

    def run(self, max_minutes: float | None = None, max_steps: int | None = None) -> TrainState:
        """Train until done, or pause (state saved, resumable) after ``max_minutes`` or ``max_steps``
        optimizer steps in this call."""
        self._deadline = time.monotonic() + 60 * max_minutes if max_minutes else math.inf
        self._steps_left = max_steps if max_steps is not None else math.inf
        torch.manual_seed(self.spec.seed)
        if self._optimizer is None:
            self._make_optimizer()
        self.model.train()
        if self.state.stage == "vision":
            self._run_vision()
        if self.state.stage == "lm":
            self._run_lm()
        return self.state

    def _pause(self) -> bool:
        if time.monotonic() < self._deadline and self._steps_left > 0:
            self._steps_left -= 1
            return False
        self._save()
        logger.info(f"{self.spec.name}: paused at stage {self.state.stage} step {self.state.step}")
        return True

    def _run_vision(self) -> None:
        recipe = self.recipe
        progress = tqdm(total=recipe.vision_steps, initial=self.state.step, desc=f"{self.spec.name} vision")
        running = None
        while self.state.step < recipe.vision_steps:
            if self._pause():
                return
            started = time.monotonic()
            for group in self._optimizer.param_groups:
                group["lr"] = recipe.vision_lr * _schedule(
                    self.state.step, recipe.vision_steps, recipe.warmup
                )
            loss, shape_accuracy = self.vision_step(self.state.step)
            self._optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(vision_parameters(self.model), 1.0)
            self._optimizer.step()
            self.state.step += 1
            self.state.seconds += time.monotonic() - started
            running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
            progress.update()
            progress.set_postfix(loss=f"{running:.3f}", shape_acc=f"{shape_accuracy:.2f}")
            if self.state.step % 100 == 0 or self.state.step == recipe.vision_steps:
                self._log(loss=round(running, 4), shape_token_accuracy=round(shape_accuracy, 3))
            if self.state.step % recipe.checkpoint_every == 0:
                self._save()
        progress.close()
        self.state.stage, self.state.step = "lm", 0
        torch.save(self.model.state_dict(), self.work_dir / "vision_stage.pt")  # for --restart-lm
        self._make_optimizer()
        self._save()

    def _features(self) -> tuple[torch.Tensor, torch.Tensor, list[dict]]:
        """Cached visual tokens of the training pool and of the validation scenes (recomputed, and
        saved, when missing: they are a pure function of the frozen vision side)."""
        path = self.work_dir / "visual_tokens.pt"
        if path.exists():
            cached = torch.load(path, weights_only=False)
            return (
                cached["pool"],
                cached["validation"],
                [sample(SPLIT_SEEDS["validation"] + i) for i in range(self.recipe.eval_samples)],
            )
        self.model.eval()
        pool = encode_pool(self.model, self.processor, list(range(self.recipe.pool_images)))
        validation, records = encode_validation(self.model, self.processor, self.recipe.eval_samples)
        self.model.train()
        torch.save({"pool": pool, "validation": validation}, path)
        return pool, validation, records

    def _run_lm(self) -> None:
        recipe = self.recipe
        pool, validation, records = self._features()
        on_object = torch.stack([dense_targets(train_scene(i))[0] > 0 for i in range(len(pool))])
        progress = tqdm(total=recipe.lm_steps, initial=self.state.step, desc=f"{self.spec.name} lm")
        running = None
        while self.state.step < recipe.lm_steps:
            if self._pause():
                return
            started = time.monotonic()
            for group in self._optimizer.param_groups:
                group["lr"] = recipe.lm_lr * _schedule(
                    self.state.step, recipe.lm_steps, recipe.warmup, recipe.lm_restarts, recipe.restart_peak
                )
            indices, rows = self.lm_rows(self.state.step)
            ids, mask, labels = self.prompts.conversations(rows)
            hidden = None
            if self.state.step < recipe.curriculum_steps:
                on_evidence = torch.stack(
                    [
                        evidence_mask(train_scene(i), turns[0][0])
                        for i, turns in zip(indices, rows, strict=True)
                    ]
                )
                hidden = self.curriculum_mask(self.state.step, on_object[indices], on_evidence)
            _, loss = answer_logits_and_loss(self.model, ids, mask, labels, pool[indices], hidden)
            self._optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            self._optimizer.step()
            self.state.step += 1
            self.state.seconds += time.monotonic() - started
            running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
            progress.update()
            progress.set_postfix(loss=f"{running:.3f}")
            if self.state.step % recipe.eval_every == 0 or self.state.step == recipe.lm_steps:
                self._log(
                    loss=round(running, 4),
                    validation=self.evaluate(validation, records),
                    validation_shuffled_images=self.evaluate(validation, records, shuffle=True)["all"],
                )
            if self.state.step % recipe.checkpoint_every == 0:
                self._save()
        progress.close()
        self.state.stage = "done"
        self._save()


def test_features(trainer: Trainer, n: int) -> tuple[torch.Tensor, list[dict]]:
    records = [sample(SPLIT_SEEDS["test"] + i) for i in range(n)]
    trainer.model.eval()
    with torch.inference_mode():
        chunks = [
            visual_tokens(
                trainer.model, pixel_batch(trainer.processor, [r["image"] for r in records[s : s + 32]])
            )
            for s in range(0, n, 32)
        ]
    return torch.cat(chunks), records


def export(trainer: Trainer, out_dir: Path, test_samples: int = 300) -> Path:
    """Write the trained model (fp16 safetensors), its processor and a model card to ``out_dir/name``."""
    if trainer.state.stage != "done":
        raise RuntimeError(
            f"{trainer.spec.name} is at stage {trainer.state.stage!r}; train it to the end first"
        )
    features, records = test_features(trainer, test_samples)
    test = trainer.evaluate(features, records)
    shuffled = trainer.evaluate(features, records, shuffle=True)["all"]
    target = Path(out_dir) / trainer.spec.name
    target.mkdir(parents=True, exist_ok=True)
    half = build_model(trainer.spec)[0]
    half.load_state_dict(trainer.model.state_dict())
    half.to(torch.float16).save_pretrained(target, safe_serialization=True)
    trainer.processor.save_pretrained(target)
    summary = {
        "spec": asdict(trainer.spec),
        "recipe": asdict(trainer.recipe),
        "train_seconds": round(trainer.state.seconds),
        "test_accuracy_teacher_forced": test,
        "test_accuracy_shuffled_images": shuffled,
        "history": trainer.state.history,
    }
    (target / "training.json").write_text(json.dumps(summary, indent=1) + "\n")
    (target / "README.md").write_text(model_card(trainer, test, shuffled))
    logger.info(f"exported {trainer.spec.name} -> {target}: test {test}")
    return target


def model_card(trainer: Trainer, test: dict, shuffled: float) -> str:
    spec, recipe = trainer.spec, trainer.recipe
    params = sum(p.numel() for p in trainer.model.parameters())
    last = next((h for h in reversed(trainer.state.history) if "validation" in h), {})
    restarts = (
        f" with warm restarts at steps {', '.join(map(str, recipe.lm_restarts))} "
        f"(peak x{recipe.restart_peak:g})"
        if recipe.lm_restarts
        else ""
    )
    rows = "\n".join(
        f"| {t} | {100 * last.get('validation', {}).get(t, float('nan')):.1f} | {100 * test[t]:.1f} |"
        for t in (*QUESTION_TYPES, "all")
    )
    return f"""# {spec.name}

The {spec.role} model of the lmms-sgl proving ground for the {spec.family} family: a
`{type(trainer.model).__name__}` ({params / 1e6:.2f} M parameters; {spec.description}) trained from
scratch on this repository's procedural shapes benchmark (`lmms_sgl/proving/shapes.py`), on a CPU.
Weights are fp16; load them in fp32 on a CPU. Not a general-purpose model: it knows 256-token
448 px scenes of coloured shapes and the four question forms of the `sgl_shapes` task.

## Recipe (`python -m lmms_sgl.proving.train --models {spec.name}`, resumable)
1. Dense vision pretraining: {recipe.vision_steps} steps of {recipe.vision_batch} fresh scenes, AdamW
   {recipe.vision_lr:g}; linear heads on the projector output predict colour, shape and size of the
   object under each visual token and the token holding each object's centre. The heads are dropped.
2. Vision tower and projector frozen; their tokens cached for {recipe.pool_images} training scenes.
   The text model trains {recipe.lm_steps} steps of {recipe.lm_batch} questions (loss on the answer),
   AdamW {recipe.lm_lr:g}, cosine schedule{restarts}. Curriculum over the first
   {recipe.curriculum_steps} steps: only the question's evidence tokens visible, then the other
   objects, then the background (attention itself is never supervised); afterwards
   {recipe.questions_per_image} questions about one image per sequence, the first turn being exactly
   the evaluation prompt.

Seed {spec.seed}. Training time on 2 CPU cores: {trainer.state.seconds / 60:.0f} min.

## Accuracy (greedy answer equals the reference; 300 validation / 300 test scenes)
| question type | validation % | test % |
|---|---|---|
{rows}

With every question paired with another scene's image, test accuracy falls to {100 * shuffled:.1f} %:
the answers come from the image. The lmms-eval numbers of this model (through `sgl_*` with
`method=large_only` / `guide_only`) are in `reports/proving_ground.md`.
"""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--models", nargs="+", default=list(PROVING_MODELS), help=f"subset of {list(PROVING_MODELS)}"
    )
    parser.add_argument(
        "--work-dir", type=Path, default=Path(".cache/proving"), help="training state (resumable)"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--restart-lm", action="store_true", help="redo stage 2 from the end of stage 1")
    parser.add_argument("--export", type=Path, default=None, help="after training, export the models here")
    parser.add_argument("--max-minutes", type=float, default=None, help="stop (resumably) after this long")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.models) - set(PROVING_MODELS))
    if unknown:
        parser.error(f"--models: unknown {unknown}; allowed: {list(PROVING_MODELS)}")
    for name in args.models:
        trainer = Trainer(PROVING_MODELS[name], args.work_dir, args.threads)
        if args.restart_lm:
            trainer.restart_lm()
        state = trainer.run(args.max_minutes)
        if args.export is not None and state.stage == "done":
            export(trainer, args.export)


if __name__ == "__main__":
    main()
