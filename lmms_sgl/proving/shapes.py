"""A procedural VQA benchmark whose answers depend on small regions of the image.

Each scene holds several small objects (shape, colour, size, position) on a cluttered background;
each question needs the evidence of one or a few objects and has a single-word answer. Everything
is a pure function of a seed, so splits are reproducible and disjoint (different seed ranges).

The scene keeps its objects' boxes so that training code can derive dense per-token labels and the
evidence of each question (:func:`evidence`); see ``lmms_sgl.proving.train``.

Question types (answers in brackets):
* ``color``: "What color is the {size} {shape}?" [colour], the object unique by size and shape;
* ``shape``: "What shape is the {color} object?" [shape], the colour unique in the scene;
* ``count``: "How many {color} objects are there?" [zero..four];
* ``exists``: "Is there a {color} {shape}?" [yes/no].
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

from lmms_sgl.proving.palette import COLORS

SHAPES = ("circle", "square", "triangle", "cross")
SIZES = {"small": 0.09, "large": 0.16}  # object extent as a fraction of the shorter image side
COUNT_WORDS = ("zero", "one", "two", "three", "four")
QUESTION_TYPES = ("color", "shape", "count", "exists")


@dataclass(frozen=True)
class SceneLayout:
    """How many objects a scene holds and what their sizes are fractions of (``None``: the shorter
    image side, as in training)."""

    objects: tuple[int, int] = (3, 6)
    object_scale: int | None = None


@dataclass(frozen=True)
class SceneObject:
    shape: str
    color: str
    size: str
    box: tuple[int, int, int, int]  # left, top, right, bottom in pixels


@dataclass(frozen=True)
class Scene:
    width: int
    height: int
    objects: tuple[SceneObject, ...]
    seed: int


def make_scene(
    seed: int,
    width: int = 448,
    height: int = 448,
    objects: tuple[int, int] = (3, 6),
    object_scale: int | None = None,
) -> Scene:
    """Non-overlapping objects placed on a coarse grid with jitter. Object sizes are fractions of
    ``object_scale`` pixels (default: the shorter image side); a fixed scale such as 448 keeps objects
    at tile size on a large canvas, so that only a full-resolution view resolves them."""
    rng = random.Random(seed)
    scale = min(width, height) if object_scale is None else object_scale
    cells_x, cells_y = max(2, width // 112), max(2, height // 112)
    cells = [(x, y) for x in range(cells_x) for y in range(cells_y)]
    rng.shuffle(cells)
    placed = []
    for cell_x, cell_y in cells[: rng.randint(*objects)]:
        size = rng.choice(sorted(SIZES))
        extent = int(scale * SIZES[size])
        cell_w, cell_h = width // cells_x, height // cells_y
        left = cell_x * cell_w + rng.randint(0, max(0, cell_w - extent - 1))
        top = cell_y * cell_h + rng.randint(0, max(0, cell_h - extent - 1))
        placed.append(
            SceneObject(
                rng.choice(SHAPES), rng.choice(sorted(COLORS)), size, (left, top, left + extent, top + extent)
            )
        )
    return Scene(width, height, tuple(placed), seed)


def render(scene: Scene) -> Image.Image:
    """Light noisy background, grey distractor strokes, then the objects."""
    rng = random.Random(scene.seed * 7919 + 1)
    image = Image.new("RGB", (scene.width, scene.height), tuple(rng.randint(215, 245) for _ in range(3)))
    draw = ImageDraw.Draw(image)
    for _ in range(rng.randint(6, 14)):  # clutter that carries no answer
        x, y = rng.randrange(scene.width), rng.randrange(scene.height)
        shade = rng.randint(150, 200)
        draw.line((x, y, x + rng.randint(-40, 40), y + rng.randint(-40, 40)), fill=(shade,) * 3, width=2)
    for obj in scene.objects:
        _draw(draw, obj)
    return image


def _draw(draw: ImageDraw.ImageDraw, obj: SceneObject) -> None:
    left, top, right, bottom = obj.box
    fill = COLORS[obj.color]
    if obj.shape == "circle":
        draw.ellipse(obj.box, fill=fill)
    elif obj.shape == "square":
        draw.rectangle(obj.box, fill=fill)
    elif obj.shape == "triangle":
        draw.polygon([((left + right) // 2, top), (left, bottom), (right, bottom)], fill=fill)
    else:
        third_w, third_h = (right - left) // 3, (bottom - top) // 3
        draw.rectangle((left + third_w, top, right - third_w, bottom), fill=fill)
        draw.rectangle((left, top + third_h, right, bottom - third_h), fill=fill)


def questions(scene: Scene, rng: random.Random) -> list[tuple[str, str, str]]:
    """All answerable ``(type, question, answer)`` triples for a scene (unambiguous ones only)."""
    out = []
    objects = scene.objects
    for obj in objects:
        if sum(o.shape == obj.shape and o.size == obj.size for o in objects) == 1:
            out.append(("color", f"What color is the {obj.size} {obj.shape}?", obj.color))
        if sum(o.color == obj.color for o in objects) == 1:
            out.append(("shape", f"What shape is the {obj.color} object?", obj.shape))
    present_colors = sorted({o.color for o in objects})
    absent_colors = sorted(set(COLORS) - set(present_colors))
    for color in present_colors + absent_colors[:1]:  # mostly present colours: no "zero" prior
        count = sum(o.color == color for o in objects)
        if count < len(COUNT_WORDS):
            out.append(("count", f"How many {color} objects are there?", COUNT_WORDS[count]))
    pairs = {(o.color, o.shape) for o in objects}
    if objects and rng.random() < 0.5:  # yes and no equally often
        obj = rng.choice(objects)
        out.append(("exists", f"Is there a {obj.color} {obj.shape}?", "yes"))
    else:
        absent = [(c, s) for c in sorted(COLORS) for s in SHAPES if (c, s) not in pairs]
        color, shape = rng.choice(absent)
        out.append(("exists", f"Is there a {color} {shape}?", "no"))
    return out


def evidence(scene: Scene, question: str) -> tuple[SceneObject, ...]:
    """The objects a question is about (parsed back from the question's own words): the colour of
    ``size shape``, the shape of the ``color`` object, the ``color`` objects counted, the ``color
    shape`` objects looked for (none when the answer is no)."""
    words = question.rstrip("?").split()
    colors = [w for w in words if w in COLORS]
    shapes = [w for w in words if w in SHAPES]
    sizes = [w for w in words if w in SIZES]
    return tuple(
        o
        for o in scene.objects
        if all(o.color == c for c in colors)
        and all(o.shape == s for s in shapes)
        and all(o.size == z for z in sizes)
    )


class Unanswerable(ValueError):
    """No question of the requested types is unambiguous in a scene (e.g. every object shares its
    size and shape with another one, so no colour question names a single object)."""


def ask(scene: Scene, rng: random.Random, types: tuple[str, ...] = QUESTION_TYPES) -> tuple[str, str, str]:
    """One ``(type, question, answer)`` for a scene: a uniform type among the answerable ones, then a
    uniform question of that type, so that no type dominates the benchmark."""
    by_type: dict[str, list] = {}
    for kind, question, answer in questions(scene, rng):
        by_type.setdefault(kind, []).append((question, answer))
    answerable = [t for t in types if t in by_type]
    if not answerable:
        raise Unanswerable(f"scene {scene.seed} has no unambiguous question of types {list(types)}")
    kind = rng.choice(answerable)
    question, answer = rng.choice(by_type[kind])
    return kind, question, answer


def sample(
    seed: int,
    width: int = 448,
    height: int = 448,
    types: tuple[str, ...] = QUESTION_TYPES,
    layout: SceneLayout | None = None,
) -> dict:
    """One benchmark record for ``seed``: image, question, answer, type and the scene itself.
    ``layout`` (object count range and scale) defaults to the training scenes'."""
    layout = layout or SceneLayout()
    scene = make_scene(seed, width, height, layout.objects, layout.object_scale)
    kind, question, answer = ask(scene, random.Random(seed * 104729 + 3), types)
    return {
        "id": f"shapes-{seed}",
        "image": render(scene),
        "question": question,
        "answer": answer,
        "type": kind,
        "scene": scene,
    }


SPLIT_SEEDS = {"train": 0, "validation": 10_000_000, "test": 20_000_000}


def split(
    name: str, n: int, width: int = 448, height: int = 448, layout: SceneLayout | None = None
) -> list[dict]:
    """``n`` records of a split; the splits use disjoint seed ranges."""
    base = SPLIT_SEEDS[name]
    return [sample(base + i, width, height, layout=layout) for i in range(n)]
