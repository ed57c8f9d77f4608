"""Export a trained proving model: fp16 safetensors, its processor, a model card and the training log."""

from __future__ import annotations

import json
from dataclasses import MISSING, asdict, fields
from pathlib import Path

import torch
from loguru import logger

from lmms_sgl.factory.build import build_model
from lmms_sgl.proving.shapes import QUESTION_TYPES
from lmms_sgl.proving.train import ProvingModel, Trainer, encode_images, split_records


def export(trainer: Trainer, out_dir: Path, test_samples: int = 300) -> Path:
    """Write the trained model (fp16 safetensors), its processor and a model card to ``out_dir/name``."""
    if trainer.state.stage != "done":
        raise RuntimeError(
            f"{trainer.spec.name} is at stage {trainer.state.stage!r}; train it to the end first"
        )
    records = split_records("test", test_samples)
    trainer.model.eval()
    features = encode_images(trainer.model, trainer.processor, [r["image"] for r in records])
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
    (target / "README.md").write_text(model_card(trainer.proving, summary, half))
    logger.info(f"exported {trainer.spec.name} -> {target}: test {test}")
    return target


def refresh_card(proving: ProvingModel, folder: Path) -> Path:
    """Rewrite ``folder/README.md`` from the exported ``training.json`` and ``proving`` as it is now
    (e.g. with more of what was tried), without the training state, which lives only where the model
    was trained. The spec and recipe must be the ones the exported model was trained with."""
    card = Path(folder) / "README.md"
    summary = json.loads((Path(folder) / "training.json").read_text())
    for part, current in (("spec", proving.spec), ("recipe", proving.recipe)):
        # a field added after the export counts with its default, which reproduces the old behaviour
        defaults = {f.name: f.default for f in fields(current) if f.default is not MISSING}
        if json.loads(json.dumps({**defaults, **summary[part]})) != json.loads(json.dumps(asdict(current))):
            raise ValueError(
                f"{folder}/training.json: the model was trained with another {part} than "
                f"{proving.spec.name}'s current one; retrain and export it instead of refreshing its card"
            )
    card.write_text(model_card(proving, summary, build_model(proving.spec)[0]))
    logger.info(f"refreshed {card}")
    return card


def model_card(proving: ProvingModel, summary: dict, model: torch.nn.Module) -> str:
    """The model card of an exported proving model, from its ``training.json`` ``summary``."""
    spec, recipe = proving.spec, proving.recipe
    test, shuffled = summary["test_accuracy_teacher_forced"], summary["test_accuracy_shuffled_images"]
    params = sum(p.numel() for p in model.parameters())
    last = next((h for h in reversed(summary["history"]) if "validation" in h), {})
    restarts = (
        f" with warm restarts at steps {', '.join(map(str, recipe.lm_restarts))} "
        f"(peak x{recipe.restart_peak:g})"
        if recipe.lm_restarts
        else ""
    )
    tried = proving.tried
    history = (
        "\n## What was tried before this recipe\n" + "\n".join(f"- {line}" for line in tried) + "\n"
        if tried
        else ""
    )
    focus = (
        f" From step {recipe.focus_from} on, {100 * recipe.focus_share:.0f} % of the questions are"
        f" {recipe.focus_type} questions where the scene has one (the rest drawn as before)."
        if recipe.focus_share
        else ""
    )
    binding = (
        f" From step {recipe.binding_from} on, every other step is {recipe.lm_batch // 2} shape-binding"
        f" questions instead: colour questions (the object named by its size and shape) with, in"
        f" {100 * recipe.binding_hide:.0f} % of them, the objects of the other size hidden from"
        " attention, so that only shape picks the object out."
        if recipe.binding_from is not None
        else ""
    )
    positions = (
        " The tower's position embeddings start from a 2-D sine-cosine table (they start at zero in"
        " transformers' initialisation) and stay trainable."
        if recipe.sincos_positions
        else ""
    )
    rows = "\n".join(
        f"| {t} | {100 * last.get('validation', {}).get(t, float('nan')):.1f} | {100 * test[t]:.1f} |"
        for t in (*QUESTION_TYPES, "all")
    )
    return f"""# {spec.name}

The {spec.role} model of the lmms-sgl proving ground for the {spec.family} family: a
`{type(model).__name__}` ({params / 1e6:.2f} M parameters; {spec.description}) trained from
scratch on this repository's procedural shapes benchmark (`lmms_sgl/proving/shapes.py`), on a CPU.
Weights are fp16; load them in fp32 on a CPU. Not a general-purpose model: it knows 256-token
448 px scenes of coloured shapes and the four question forms of the `sgl_shapes` task.

## Recipe (`lmms-sgl-train-proving --models {spec.name}`, resumable)
1. Dense vision pretraining: {recipe.vision_steps} steps of {recipe.vision_batch} fresh scenes, AdamW
   {recipe.vision_lr:g}; linear heads on the projector output predict colour, shape and size of the
   object under each visual token and the token holding each object's centre. The heads are
   dropped.{positions}
2. Vision tower and projector frozen; their tokens cached for {recipe.pool_images} training scenes.
   The text model trains {recipe.lm_steps} steps of {recipe.lm_batch} questions (loss on the answer),
   AdamW {recipe.lm_lr:g}, cosine schedule{restarts}. Curriculum over the first
   {recipe.curriculum_steps} steps: only the question's evidence tokens visible, then the other
   objects, then the background (attention itself is never supervised); afterwards
   {recipe.questions_per_image} questions about one image per sequence, the first turn being exactly
   the evaluation prompt.{focus}{binding}

Seed {spec.seed}. Training time: {summary["train_seconds"] / 60:.0f} min of optimizer steps on a 2-core CPU
machine, one or two threads, at times beside a second training (caching and evaluation not counted).

## Accuracy (greedy answer equals the reference; 300 validation / 300 test scenes)
| question type | validation % | test % |
|---|---|---|
{rows}

With every question paired with another scene's image, test accuracy falls to {100 * shuffled:.1f} %:
the answers come from the image. The lmms-eval numbers of this model (through `sgl_*` with
`method=large_only` / `guide_only`) are in `reports/proving_ground.md`.
{history}"""
