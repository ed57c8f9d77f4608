"""``sgl_video``: procedural short clips written as real video files, in lmms-eval's video-task format.

Each clip shows one coloured square on a light background that moves one way during the first
half of the clip and another way during the second half; the question asks about one half
("Which way does the red square move in the second half of the video?"), so the answer needs the
frames of that half. Clips are MPEG-4 (PyAV, ``qscale`` 2), 8 fps; most have 32 frames (what
lmms-eval's video models sample by default), some 48, so that sampling and clips of different
lengths are exercised. The documents store the file name; ``doc_to_visual`` returns the absolute
path, as ``videomme`` does. Deterministic from the seed.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np

from lmms_sgl.proving.palette import COLORS

DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
SIZE = (112, 112)  # width, height
SQUARE = 20
FPS = 8


def clip_frames(first: str, second: str, frames: int, color: tuple[int, int, int], rng: random.Random):
    """``[frames, H, W, 3]`` uint8: the square moves ``first`` for half the frames, then ``second``."""
    width, height = SIZE
    background = np.array([rng.randint(225, 250) for _ in range(3)], dtype=np.uint8)
    step = (min(width, height) // 2 - SQUARE) / (frames // 2)
    x, y = (width - SQUARE) / 2, (height - SQUARE) / 2
    out = np.empty((frames, height, width, 3), dtype=np.uint8)
    for index in range(frames):
        dx, dy = DIRECTIONS[first if index < frames // 2 else second]
        if index:
            x, y = x + dx * step, y + dy * step
        out[index] = background
        left, top = int(round(x)), int(round(y))
        out[index, top : top + SQUARE, left : left + SQUARE] = color
    return out


def write_clip(frames: np.ndarray, path: Path) -> Path:
    """An MPEG-4 file of ``frames`` (PyAV; decord and every lmms-eval video reader can read it)."""
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = SIZE[0], SIZE[1], "yuv420p"
        stream.options = {"qscale": "2"}
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return path


def video_records(n: int = 8, seed: int = 7) -> list[dict]:
    """Records ``{id, video, question, answer, half}``; the frames are written by :func:`write_all`."""
    rng = random.Random(seed)
    records = []
    for index in range(n):
        first, second = rng.sample(sorted(DIRECTIONS), 2)
        color = rng.choice(sorted(COLORS))
        half = ("first", "second")[index % 2]
        records.append(
            {
                "id": f"video-{index:03d}",
                "video": f"video-{index:03d}.mp4",
                "question": f"Which way does the {color} square move in the {half} half of the video?",
                "answer": first if half == "first" else second,
                "half": half,
                "frames": 48 if index % 4 == 3 else 32,
                "directions": (first, second),
                "color": COLORS[color],
                "seed": rng.randrange(2**31),
            }
        )
    return records


def write_all(task_dir: Path, n: int = 8, seed: int = 7) -> list[Path]:
    """The clips under ``task_dir/data/videos`` and the documents as ``task_dir/data/test.parquet``."""
    import datasets

    records = video_records(n, seed)
    written = []
    for record in records:
        frames = clip_frames(
            *record["directions"], record["frames"], record["color"], random.Random(record["seed"])
        )
        written.append(write_clip(frames, task_dir / "data" / "videos" / record["video"]))
    columns = {key: [str(r[key]) for r in records] for key in ("id", "video", "question", "answer", "half")}
    path = task_dir / "data" / "test.parquet"
    datasets.Dataset.from_dict(columns).to_parquet(str(path))
    return [*written, path]


def doc_to_visual(doc, videos_dir: Path) -> list[str]:
    """The clip's absolute path (lmms-eval's video tasks give paths; the model decodes)."""
    return [str(videos_dir / doc["video"])]
