"""Videos as lmms-eval's video tasks give them: a file path per video (``doc_to_visual``).

A video is probed when its request is read (frame count, fps), so an unreadable or empty file is a
clear per-sample error before any model runs. Frames are decoded with decord, the reader
``qwen_vl_utils`` and lmms-eval's own video code use here; transformers' default video loader
needs ``torchcodec``, which the pinned torch cannot take, so the InternVL path asks transformers'
own ``load_video`` for its decord backend (the frames each processor samples stay its own).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

DEFAULT_NUM_FRAMES = (
    32  # lmms-eval's internvl_hf num_frames, llava_hf max_frames_num, qwen2_5_vl max_num_frames
)


class VideoError(ValueError):
    """A video that cannot be read (missing, undecodable or without frames)."""


@dataclass(frozen=True)
class Video:
    """One video of a request: its file and what probing it found."""

    path: str
    total_frames: int
    fps: float


def open_video(path: str) -> Video:
    """Probe ``path`` (cheap: the container's index, no frame decoded)."""
    if not Path(path).is_file():
        raise VideoError(f"video {path!r} does not exist (or is not a file)")
    import decord

    try:
        reader = decord.VideoReader(str(path), ctx=decord.cpu(0))
        total, fps = len(reader), float(reader.get_avg_fps())
    except Exception as error:  # noqa: BLE001 -- decord raises its own DECORDError and RuntimeError
        raise VideoError(f"video {path!r} cannot be decoded: {type(error).__name__}: {error}") from error
    if total < 1:
        raise VideoError(f"video {path!r} has no frames")
    return Video(str(path), total, fps)


def video_of(visual) -> str | None:
    """The path of a visual that is a video as lmms-eval's tasks give it (a path string, or a dict
    with ``url``/``path`` and no clip bounds), else ``None`` (an image)."""
    if isinstance(visual, str):
        return visual
    if isinstance(visual, dict) and visual.get("type", "video") == "video":
        if "video_start" in visual or "video_end" in visual:
            raise VideoError(f"video clip bounds {visual!r} are not supported (whole videos only)")
        path = visual.get("url") or visual.get("path")
        if isinstance(path, str):
            return path
    return None


def decode_sampled(video: Video, sample_frames, num_frames: int):
    """``(frames [T, H, W, 3] uint8, metadata)``: the frames ``sample_frames`` (a video processor's
    own method) picks among the file's, at most ``num_frames`` of them, decoded with decord."""
    from transformers.video_utils import load_video

    count = min(num_frames, video.total_frames)
    return load_video(
        video.path, backend="decord", sample_indices_fn=partial(sample_frames, num_frames=count)
    )


def merge_encoded(parts: list[dict], pad_token_id: int) -> dict:
    """One left-padded batch from batches encoded apart (when the processor cannot stack them:
    videos of different frame counts). Per-token tensors are left-padded; the rest (pixel rows,
    grids) concatenated in order, as the processor would have."""
    length = max(p["input_ids"].shape[1] for p in parts)
    merged: dict = {}
    for key in parts[0]:
        values = []
        for part in parts:
            value = part[key]
            if value.dim() >= 2 and value.shape[:2] == part["input_ids"].shape:  # one entry per token
                missing = length - value.shape[1]
                fill = pad_token_id if key == "input_ids" else 0
                pad = torch.full((value.shape[0], missing, *value.shape[2:]), fill, dtype=value.dtype)
                value = torch.cat([pad.to(value.device), value], dim=1)
            values.append(value)
        merged[key] = torch.cat(values, dim=0)
    return merged
