"""Data for the local lmms-eval tasks shipped in ``tasks/`` (no dataset hub needed).

* ``sgl_smoke``: one coloured shape per image, "What color is the shape?", scored by exact match.
  Image sizes and aspect ratios vary so that InternVL's dynamic tiling produces 1 to 7 tiles.
* ``sgl_gqa_local``: the same kind of question stored in GQA's schema (``id``, ``imageId``,
  ``question``, ``answer``, ``fullAnswer``, ``image``) so that the task reuses lmms-eval's own GQA
  prompt and visual functions, proving compatibility with the real task code.
* ``sgl_shapes`` / ``sgl_shapes_wide``: the test split of the procedural benchmark in
  ``lmms_sgl.proving.shapes`` (several small objects, answers need local evidence), on 448 px
  square images (both families) and on 896 x 448 images (InternVL: 2 tiles plus a thumbnail).
* ``sgl_shapes_tiles``: 1344 x 448 scenes whose objects keep the training scenes' size (InternVL: 3
  tiles plus a thumbnail), so that a downsampled view loses them: the unit-selection study's task.
  ``sgl_shapes_anls`` scores the ``sgl_shapes`` data with ANLS and has no data of its own.
* ``sgl_shapes_val``: the benchmark's validation split (disjoint seeds), for calibrating the exit
  threshold (``lmms-sgl-calibrate``) away from the test split.
* ``sgl_video``: short procedural clips written as MPEG-4 files (``lmms_sgl.local_tasks.video``).

Everything is deterministic from the seed. Regenerate the shipped files with
``python -m lmms_sgl.local_tasks.data --tasks-dir tasks``.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

from PIL import Image, ImageDraw

from lmms_sgl.proving.palette import COLORS
from lmms_sgl.proving.shapes import SceneLayout

SHAPES = ("circle", "square", "triangle")
# (width, height): 1 tile, 2-6 tiles plus a thumbnail for InternVL; always 256 tokens for LLaVA.
IMAGE_SIZES = ((448, 448), (640, 480), (896, 448), (448, 1344), (300, 200), (1000, 1000), (1344, 448))


def draw_shape(
    size: tuple[int, int], shape: str, color: tuple[int, int, int], rng: random.Random
) -> Image.Image:
    """A single filled shape at a random place on a light background."""
    width, height = size
    background = tuple(rng.randint(225, 250) for _ in range(3))
    image = Image.new("RGB", size, background)
    draw = ImageDraw.Draw(image)
    extent = int(min(width, height) * rng.uniform(0.3, 0.6))
    left = rng.randint(0, width - extent)
    top = rng.randint(0, height - extent)
    box = (left, top, left + extent, top + extent)
    if shape == "circle":
        draw.ellipse(box, fill=color)
    elif shape == "square":
        draw.rectangle(box, fill=color)
    else:
        draw.polygon(
            [(left + extent // 2, top), (left, top + extent), (left + extent, top + extent)], fill=color
        )
    return image


def smoke_records(n: int = 32, seed: int = 0) -> list[dict]:
    """Records ``{id, question, answer, shape, image}``: ask for the colour of the only shape."""
    rng = random.Random(seed)
    records = []
    for index in range(n):
        color = rng.choice(sorted(COLORS))
        shape = rng.choice(SHAPES)
        size = IMAGE_SIZES[index % len(IMAGE_SIZES)]
        records.append(
            {
                "id": f"smoke-{index:03d}",
                "question": f"What color is the {shape}?",
                "answer": color,
                "shape": shape,
                "image": draw_shape(size, shape, COLORS[color], rng),
            }
        )
    return records


def gqa_schema_records(n: int = 24, seed: int = 1) -> list[dict]:
    """The smoke questions in GQA's testdev schema (as lmms-eval's ``gqa`` task reads it)."""
    records = []
    for index, record in enumerate(smoke_records(n, seed)):
        records.append(
            {
                "id": f"{index:08d}",
                "imageId": f"img{index:05d}",
                "question": record["question"],
                "answer": record["answer"],
                "fullAnswer": f"The {record['shape']} is {record['answer']}.",
                "image": record["image"],
            }
        )
    return records


def write_parquet(records: list[dict], path: Path) -> Path:
    import datasets

    columns = {key: [record[key] for record in records] for key in records[0]}
    features = datasets.Features(
        {key: datasets.Image() if key == "image" else datasets.Value("string") for key in columns}
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_dict(columns, features=features).to_parquet(str(path))
    return path


def shapes_records(
    n: int, width: int, height: int, split_name: str = "test", layout: SceneLayout | None = None
) -> list[dict]:
    from lmms_sgl.proving.shapes import split

    return [
        {key: r[key] for key in ("id", "question", "answer", "type", "image")}
        for r in split(split_name, n, width, height, layout)
    ]


# ``sgl_shapes_tiles``: 1344 x 448 px (InternVL: 3 tiles + thumbnail, 1,024 tokens) with objects at
# the training scenes' tile scale (sizes as fractions of 448 px), four to eight per scene. Probed on 40
# scenes each, the trained large model read 3 x 1 tiles (67.5 %) far better than 3 x 2 (50 %) or 4 x 1
# (50 %): it never saw sequences as long as those, so the study uses the layout it can read.
TILES_SIZE = (1344, 448)
TILES_LAYOUT = SceneLayout(objects=(4, 8), object_scale=448)


def write_all(tasks_dir: Path) -> list[Path]:
    return [
        write_parquet(smoke_records(), tasks_dir / "sgl_smoke" / "data" / "test.parquet"),
        write_parquet(gqa_schema_records(), tasks_dir / "sgl_gqa_local" / "data" / "testdev.parquet"),
        write_parquet(shapes_records(300, 448, 448), tasks_dir / "sgl_shapes" / "data" / "test.parquet"),
        write_parquet(shapes_records(150, 896, 448), tasks_dir / "sgl_shapes_wide" / "data" / "test.parquet"),
        write_parquet(
            shapes_records(300, *TILES_SIZE, layout=TILES_LAYOUT),
            tasks_dir / "sgl_shapes_tiles" / "data" / "test.parquet",
        ),
        write_shapes_val(tasks_dir),
        *write_video(tasks_dir / "sgl_video"),
    ]


def write_video(task_dir: Path) -> list[Path]:
    """``sgl_video``: procedural clips as MPEG-4 files plus their documents (``local_tasks.video``)."""
    from lmms_sgl.local_tasks.video import write_all as write_clips

    return write_clips(task_dir)


def write_shapes_val(tasks_dir: Path) -> Path:
    """``sgl_shapes_val``: 300 validation scenes (seeds disjoint from the test split)."""
    return write_parquet(
        shapes_records(300, 448, 448, "validation"),
        tasks_dir / "sgl_shapes_val" / "data" / "validation.parquet",
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Regenerate the data of the local lmms-eval tasks.")
    parser.add_argument("--tasks-dir", type=Path, default=Path("tasks"))
    args = parser.parse_args(argv)
    for path in write_all(args.tasks_dir):
        print(path)


if __name__ == "__main__":
    main()
