"""The proving-ground training recipe: targets, curriculum, loss going down, exact resumption."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
import torch

from lmms_sgl.proving import shapes
from lmms_sgl.proving.shapes import ask
from lmms_sgl.proving.targets import GRID, dense_targets, evidence_mask, object_cells
from lmms_sgl.proving.train import (
    PROVING_MODELS,
    ProvingModel,
    Recipe,
    Trainer,
    _schedule,
    pool_question,
    train_scene,
)
from lmms_sgl.proving.vlm_io import answer_logits_and_loss, pixel_batch, visual_tokens

TINY = Recipe(
    vision_steps=12,
    vision_batch=4,
    pool_images=16,
    lm_steps=12,
    lm_batch=8,
    questions_per_image=2,
    warmup=2,
    curriculum_steps=6,
    eval_every=6,
    eval_samples=8,
    checkpoint_every=4,
)


def tiny(name: str = "shapes-llava-guide", **overrides) -> ProvingModel:
    return ProvingModel(PROVING_MODELS[name].spec, replace(TINY, **overrides))


def test_dense_targets_cover_each_object_once_with_its_attributes():
    scene = shapes.make_scene(5)
    targets = dense_targets(scene)
    assert targets.shape == (4, GRID * GRID)
    assert int(targets[3].sum()) == len(scene.objects)  # one centre token per object
    for obj in scene.objects:
        cx, cy = (obj.box[0] + obj.box[2]) / 2, (obj.box[1] + obj.box[3]) / 2
        index = int(cy / (scene.height / GRID)) * GRID + int(cx / (scene.width / GRID))
        assert targets[3, index] == 1
        assert shapes.SHAPES[int(targets[1, index]) - 1] == obj.shape


def test_evidence_holds_the_answer():
    """The evidence of a question, read back from the scene, gives the reference answer."""
    for seed in range(200):
        record = shapes.sample(seed)
        objects = shapes.evidence(record["scene"], record["question"])
        kind, answer = record["type"], record["answer"]
        if kind == "color":
            assert [o.color for o in objects] == [answer]
        elif kind == "shape":
            assert [o.shape for o in objects] == [answer]
        elif kind == "count":
            assert shapes.COUNT_WORDS[len(objects)] == answer
        else:
            assert (len(objects) > 0) == (answer == "yes")
        if objects:
            assert evidence_mask(record["scene"], record["question"]).any()


def test_visual_tokens_follow_the_token_grid(tmp_path):
    """Our row-major targets must match the order in which each family hands tokens to its text
    model: a single bright square must light up the tokens the targets say it covers."""
    for name in ("shapes-llava-guide", "shapes-internvl-guide"):
        trainer = Trainer(tiny(name), tmp_path)
        scene = shapes.Scene(
            448, 448, (shapes.SceneObject("square", "red", "large", (280, 56, 392, 112)),), 0
        )
        from PIL import Image, ImageDraw

        image = Image.new("RGB", (448, 448), (255, 255, 255))
        ImageDraw.Draw(image).rectangle(scene.objects[0].box, fill=(0, 0, 0))
        # the first layers of a random tower are local enough for a linear probe of "dark here":
        # compare tokens against an all-white image and check where they differ most
        with torch.inference_mode():
            tokens = visual_tokens(trainer.model, pixel_batch(trainer.processor, [image]))[0]
            blank = visual_tokens(
                trainer.model, pixel_batch(trainer.processor, [Image.new("RGB", (448, 448), (255, 255, 255))])
            )[0]
        change = (tokens - blank).norm(dim=-1)
        covered = dense_targets(scene)[0] > 0
        assert change[covered].min() > change[~covered].max(), name


def test_curriculum_reveals_evidence_then_objects_then_background(tmp_path):
    trainer = Trainer(tiny(curriculum_steps=30), tmp_path)
    on_object = torch.zeros(1, 256, dtype=torch.bool)
    on_object[0, :40] = True
    on_evidence = torch.zeros(1, 256, dtype=torch.bool)
    on_evidence[0, :10] = True
    first = trainer.curriculum_mask(0, on_object, on_evidence)
    assert not first[0, :10].any() and first[0, 10:].all()  # only the evidence is visible
    middle = trainer.curriculum_mask(25, on_object, on_evidence)
    assert not middle[0, :40].any() and middle[0, 40:].any()  # objects visible, background partly
    assert trainer.curriculum_mask(30, on_object, on_evidence) is None  # the whole image


def test_warm_restart_leaves_the_first_leg_unchanged():
    for step in (0, 50, 100, 2500, 4999):
        assert _schedule(step, 8000, 100, (5000,), 0.5) == _schedule(step, 5000, 100)
    assert _schedule(5000, 8000, 100, (5000,), 0.5) == 0.5
    assert _schedule(7999, 8000, 100, (5000,), 0.5) < 1e-5


def _losses(trainer: Trainer, stage: str, steps: int) -> list[float]:
    out = []
    for step in range(steps):
        if stage == "vision":
            loss, _ = trainer.vision_step(step)
        else:
            indices, rows = trainer.lm_rows(step)
            ids, mask, labels = trainer.prompts.conversations(rows)
            _, loss = answer_logits_and_loss(trainer.model, ids, mask, labels, trainer._pool[indices])
        trainer._optimizer.zero_grad()
        loss.backward()
        trainer._optimizer.step()
        out.append(loss.item())
    return out


def test_a_few_steps_reduce_both_losses(tmp_path):
    trainer = Trainer(tiny(), tmp_path)
    trainer._make_optimizer()
    vision = _losses(trainer, "vision", 15)
    assert sum(vision[-3:]) < 0.8 * sum(vision[:3])
    trainer.state.stage = "lm"
    trainer._make_optimizer()
    trainer._pool = trainer._features()[0]
    text = _losses(trainer, "lm", 15)
    assert sum(text[-3:]) < 0.8 * sum(text[:3])


@pytest.mark.slow
def test_an_interrupted_run_resumes_to_the_same_weights(tmp_path):
    whole = Trainer(tiny(), tmp_path / "whole")
    whole.run()
    interrupted = Trainer(tiny(), tmp_path / "parts")
    interrupted.run(max_steps=7)  # pauses inside stage 1
    resumed = Trainer(tiny(), tmp_path / "parts")
    assert (resumed.state.stage, resumed.state.step) == ("vision", 7)
    resumed.run(max_steps=9)  # pauses inside stage 2
    resumed = Trainer(tiny(), tmp_path / "parts")
    assert resumed.state.stage == "lm"
    resumed.run()
    assert resumed.state.stage == whole.state.stage == "done"
    for (name, a), b in zip(
        whole.model.state_dict().items(), resumed.model.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(a, b, msg=name)


def test_focus_share_draws_more_of_the_focus_type_and_zero_leaves_the_stream_alone():
    plain = [pool_question(i, 3) for i in range(400)]
    assert plain == [ask(train_scene(i), random.Random(i * 1_000_003 + 3 * 7 + 11)) for i in range(400)]
    focused = [pool_question(i, 3, "color", 0.5) for i in range(400)]
    share = {
        name: sum(q[0] == "color" for q in qs) / 400 for name, qs in (("plain", plain), ("focus", focused))
    }
    assert share["plain"] < 0.35 < 0.55 < share["focus"], share
    no_objects = shapes.Scene(448, 448, (), seed=0)
    with pytest.raises(shapes.Unanswerable, match="types \\['color'\\]"):
        ask(no_objects, random.Random(0), ("color",))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"focus_share": 1.5}, r"Recipe.focus_share=1.5 must be within \[0, 1\]"),
        ({"binding_hide": -0.1}, r"Recipe.binding_hide=-0.1 must be within \[0, 1\]"),
        ({"focus_type": "colour"}, r"Recipe.focus_type='colour'; allowed: \['color', 'shape'"),
    ],
)
def test_recipe_rejects_bad_focus_and_binding_settings(overrides, message):
    with pytest.raises(ValueError, match=message):
        Recipe(**overrides)


def test_binding_steps_hide_the_other_size_and_keep_the_asked_object(tmp_path):
    trainer = Trainer(tiny(binding_from=4, pool_images=400), tmp_path)
    assert [trainer.is_binding_step(step) for step in range(3, 9)] == [False] * 2 + [True, False] * 2
    indices, rows, hidden = [], [], []
    for step in range(5, 45, 2):
        step_indices, step_rows, step_hidden = trainer.binding_rows(step)
        assert len(step_rows) == len(step_hidden) == TINY.lm_batch // 2
        indices += step_indices
        rows += step_rows
        hidden += list(step_hidden)
    again = trainer.binding_rows(5)
    n = TINY.lm_batch // 2
    assert (again[0], again[1]) == (indices[:n], rows[:n]) and torch.equal(again[2], torch.stack(hidden[:n]))
    masked = both_sizes = 0
    for index, [(question, answer)], mask in zip(indices, rows, hidden, strict=True):
        scene = train_scene(index)
        assert question.startswith("What color is the")
        (asked,) = shapes.evidence(scene, question)
        assert asked.color == answer
        assert not mask[evidence_mask(scene, question)].any()  # the asked object stays visible
        both_sizes += len({o.size for o in scene.objects}) == 2
        if mask.any():
            masked += 1
            for obj in scene.objects:  # hidden: exactly the objects of the other size
                cells = object_cells(obj, scene.width, scene.height)
                assert bool(mask[cells].all()) == (obj.size != asked.size)
            assert int(mask.sum()) == sum(
                len(object_cells(o, scene.width, scene.height)) for o in scene.objects if o.size != asked.size
            )
    assert 0.5 < masked / both_sizes < 0.9  # binding_hide = 0.7 (scenes of one size have nothing to hide)


def test_a_finished_run_extended_by_a_new_leg_equals_a_straight_run(tmp_path):
    """How the shipped large InternVL model got its warm restarts and its shape-binding leg: a
    finished run resumed with a longer recipe must end where a run with that recipe from the start
    ends."""
    longer = {
        "lm_steps": 20,
        "lm_restarts": (12, 16),
        "focus_share": 0.5,
        "focus_from": 12,
        "binding_from": 16,
    }
    straight = Trainer(tiny(**longer), tmp_path / "straight")
    straight.run()
    Trainer(tiny(), tmp_path / "extended").run()
    extended = Trainer(tiny(**longer), tmp_path / "extended")
    assert (extended.state.stage, extended.state.step) == ("lm", 12)
    extended.run()
    assert extended.state.stage == straight.state.stage == "done"
    for (name, a), b in zip(
        straight.model.state_dict().items(), extended.model.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(a, b, msg=name)


@pytest.mark.slow
def test_export_writes_a_loadable_fp16_checkpoint_with_its_card_which_refreshes_without_the_state(
    tmp_path, capsys
):
    from safetensors import safe_open
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from lmms_sgl.proving.export import export, refresh_card
    from lmms_sgl.proving.train_cli import main

    tried = ("an earlier recipe: 0.42 at the end", "a probe: 0.37 at 300 steps")
    proving = replace(tiny(), tried=tried)
    trainer = Trainer(proving, tmp_path / "work")
    trainer.run()
    folder = export(trainer, tmp_path / "models", test_samples=8)
    with safe_open(folder / "model.safetensors", "pt") as weights:
        assert {weights.get_tensor(k).dtype for k in weights.keys()} == {torch.float16}
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32)
    for name, value in trainer.model.state_dict().items():  # fp16 round trip of the trained weights
        torch.testing.assert_close(model.state_dict()[name], value.half().float(), msg=name)
    AutoProcessor.from_pretrained(folder)
    card = (folder / "README.md").read_text()
    assert "shapes-llava-guide" in card and "| all |" in card
    # what was tried before the recipe is listed, one bullet each, after the accuracy table
    history = card.split("## What was tried before this recipe\n", 1)[1]
    assert history.splitlines()[: len(tried)] == [f"- {line}" for line in tried]
    assert card.index("| all |") < card.index("## What was tried")

    # the card again from training.json alone; the oracle is the card written from the live trainer
    (folder / "README.md").unlink()
    refresh_card(proving, folder)
    assert (folder / "README.md").read_text() == card
    refresh_card(replace(proving, tried=(*tried, "a later probe: 0.51")), folder)
    refreshed = (folder / "README.md").read_text()
    assert refreshed.startswith(card.split("## What was tried")[0])
    assert refreshed.endswith("- a later probe: 0.51\n")
    with pytest.raises(ValueError, match="another recipe"):
        refresh_card(replace(proving, recipe=replace(proving.recipe, lm_steps=13)), folder)
    # the command line refuses to write the shipped recipe's card for a model trained with another
    with pytest.raises(ValueError, match="shapes-llava-guide's current one"):
        main(["--models", "shapes-llava-guide", "--refresh-cards", str(tmp_path / "models")])
    with pytest.raises(SystemExit):  # refreshing trains nothing: training options are refused
        main(["--refresh-cards", str(tmp_path / "models"), "--export", str(tmp_path / "models")])
    assert "--refresh-cards trains nothing; it cannot be combined with --export" in capsys.readouterr().err


def test_sincos_positions_depend_only_on_the_offset():
    from lmms_sgl.proving.train import sincos_positions

    codes = sincos_positions(8, 16).reshape(8, 8, 16)
    similarity = torch.einsum("abd,d->ab", codes, codes[3, 4])
    assert similarity.argmax() == 3 * 8 + 4  # peaks at the patch itself
    # the same offset gives the same similarity anywhere on the grid
    torch.testing.assert_close(codes[3, 4] @ codes[3, 6], codes[5, 1] @ codes[5, 3])
    torch.testing.assert_close(codes[3, 4] @ codes[1, 4], codes[6, 2] @ codes[4, 2])
    with pytest.raises(ValueError, match="dim=18"):
        sincos_positions(8, 18)


def test_internvl_recipe_starts_from_sincos_positions_and_resume_keeps_trained_ones(tmp_path):
    from lmms_sgl.proving.train import sincos_positions

    proving = tiny("shapes-internvl-guide", sincos_positions=True)
    trainer = Trainer(proving, tmp_path)
    table = trainer.model.model.vision_tower.embeddings.position_embeddings
    torch.testing.assert_close(table[0, 1:], sincos_positions(32, table.shape[-1]))
    assert (
        Trainer(tiny("shapes-internvl-guide"), tmp_path / "zero")
        .model.model.vision_tower.embeddings.position_embeddings.abs()
        .sum()
        == 0
    )
    trainer.run(max_steps=3)  # trains and saves
    trained = table.detach().clone()
    assert not torch.equal(trained[0, 1:], sincos_positions(32, table.shape[-1]))
    resumed = Trainer(proving, tmp_path).model.model.vision_tower.embeddings.position_embeddings
    torch.testing.assert_close(resumed, trained)
