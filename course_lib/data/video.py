"""Short ShapeWorld videos: T frames of objects moving in straight lines, with captions of the motion.

Used for video features (per-frame features, temporal embeddings, VideoBERT's visual words)
and frame order modelling (FOM): because each object moves at a constant velocity, the frame
order can be read off the frames.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from course_lib.data.language import referring_phrase
from course_lib.data.shapeworld import SIZE_FRACTIONS, Scene, ShapeWorld, _apart, _rng

MOTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
_VIDEO_STREAM = 5


@dataclass(frozen=True)
class Video:
    """frames: one Scene per time step; motions[i]: direction of object i (``"left"`` ...)."""

    frames: tuple[Scene, ...]
    motions: tuple[str, ...]

    @property
    def num_frames(self) -> int:
        return len(self.frames)

    @property
    def captions(self) -> tuple[str, ...]:
        """One caption per object (``"the red circle moves left"``) and one for the whole clip."""
        first = self.frames[0]
        parts = [f"{referring_phrase(first, i)} moves {m}" for i, m in enumerate(self.motions)]
        return (*parts, " and ".join(parts))


def make_video(world: ShapeWorld, index: int, split: str = "train", num_frames: int = 8,
               speed: float = 0.05) -> Video:
    """Video ``index`` of ``split``: the objects of scene ``index`` moving ``speed`` of the image side
    per frame, each in its own direction, never leaving the image."""
    if num_frames < 2:
        raise ValueError(f"num_frames must be >= 2, got {num_frames}")
    if not 0 < speed * (num_frames - 1) <= 0.5:
        raise ValueError(
            f"speed * (num_frames - 1) must be in (0, 0.5] so objects stay in the image; "
            f"got speed={speed}, num_frames={num_frames}"
        )
    base = world.scene(index, split)
    rng = _rng(world.config, split, index, _VIDEO_STREAM)
    travel = speed * (num_frames - 1)
    names = list(MOTIONS)
    while True:
        motions = [names[int(k)] for k in rng.integers(len(names), size=len(base.objects))]
        starts = []
        for obj, motion in zip(base.objects, motions):
            side = SIZE_FRACTIONS[obj.size]
            dx, dy = MOTIONS[motion]
            lo_x, hi_x = 0.02 + travel * max(-dx, 0), 0.98 - side - travel * max(dx, 0)
            lo_y, hi_y = 0.02 + travel * max(-dy, 0), 0.98 - side - travel * max(dy, 0)
            x1, y1 = rng.uniform(lo_x, hi_x), rng.uniform(lo_y, hi_y)
            starts.append((x1, y1, x1 + side, y1 + side))
        ends = [_shift(b, MOTIONS[m], travel) for b, m in zip(starts, motions)]
        if all(_apart(a, b) for boxes in (starts, ends) for k, a in enumerate(boxes) for b in boxes[k + 1:]):
            break
    frames = []
    for t in range(num_frames):
        objs = tuple(
            replace(o, box=_shift(b, MOTIONS[m], speed * t)) for o, b, m in zip(base.objects, starts, motions)
        )
        frames.append(replace(base, objects=objs))
    return Video(tuple(frames), tuple(motions))


def _shift(box, direction, distance):
    dx, dy = direction
    x1, y1, x2, y2 = box
    return (x1 + dx * distance, y1 + dy * distance, x2 + dx * distance, y2 + dy * distance)


def render_video(world: ShapeWorld, video: Video, image_size: int | None = None) -> np.ndarray:
    """(T, H, W, 3) uint8 frames."""
    return world.render_batch(list(video.frames), image_size)
