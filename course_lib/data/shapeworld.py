"""ShapeWorld: a small synthetic visual world with full ground truth.

Every notebook of the course trains on it, because nothing can be downloaded while learning.
A scene holds 1..K coloured shapes (shape, colour, size, position). From a scene we can

- render an RGB image at any side from 32 px (notebooks) to 224 px (GPU runs): :meth:`ShapeWorld.render`;
- read its boxes, class ids, attributes, pairwise relations and scene graph: :class:`Scene`;
- read captions, region phrases, questions and answers (``course_lib.data.language``);
- run a simulated object detector on it (``course_lib.data.simulated_detector``).

Everything is a pure function of ``(config.seed, split, index)``: scene 17 of the training split
is the same scene on every machine, in every worker, at every resolution.

Coordinates are normalised to [0, 1] (x to the right, y downwards); ``Scene.boxes(size)`` gives
the exact pixel boxes of the rendering at that size.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property, lru_cache

import numpy as np

from course_lib.utils import check_one_of

# Colour names and their RGB values. Chosen to be easy to tell apart at 32 px.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (230, 50, 50),
    "green": (50, 190, 70),
    "blue": (60, 100, 240),
    "yellow": (240, 220, 50),
    "magenta": (210, 70, 210),
    "cyan": (60, 210, 220),
    "orange": (245, 140, 30),
    "white": (240, 240, 240),
}
SHAPE_NAMES = ("square", "circle", "triangle", "diamond", "cross")
# Side of an object as a fraction of the image side.
SIZE_FRACTIONS: dict[str, float] = {"small": 0.2, "large": 0.3}

SPLITS = ("train", "val", "test", "compositional")
_SPLIT_IDS = {name: i for i, name in enumerate(SPLITS)}
RELATIONS = ("left of", "right of", "above", "below", "bigger than", "smaller than")
BACKGROUND = (25, 25, 30)
# Centres closer than this along an axis get no left/right (or above/below) relation,
# so that every stated relation is visible at 32 px.
RELATION_MARGIN = 0.12
_GAP = 0.02  # minimum free space between two objects' boxes


@dataclass(frozen=True)
class WorldConfig:
    """What a ShapeWorld looks like. Every field is checked in ``__post_init__``.

    held_out: (colour, shape) pairs that never appear in the train/val/test splits, neither in a scene
    nor in a text (not even in a question answered "no"; see :func:`nameable_pairs`), and appear in
    every scene of the ``"compositional"`` split (the compositional generalisation test).
    caption_noise: fraction of captions replaced by the caption of another scene (web data is noisy).
    """

    image_size: int = 32
    min_objects: int = 1
    max_objects: int = 3
    colors: tuple[str, ...] = ("red", "green", "blue", "yellow", "magenta", "cyan")
    shapes: tuple[str, ...] = ("square", "circle", "triangle")
    sizes: tuple[str, ...] = ("small", "large")
    held_out: tuple[tuple[str, str], ...] = ()
    caption_noise: float = 0.0
    captions_per_image: int = 5
    seed: int = 0

    def __post_init__(self):
        if not isinstance(self.image_size, int) or not 16 <= self.image_size <= 512:
            raise ValueError(f"image_size must be an int in [16, 512], got {self.image_size!r}")
        for name, values, valid in (
            ("colors", self.colors, PALETTE),
            ("shapes", self.shapes, SHAPE_NAMES),
            ("sizes", self.sizes, SIZE_FRACTIONS),
        ):
            if len(values) == 0:
                raise ValueError(f"{name} must not be empty; choose from {list(valid)}")
            if len(set(values)) != len(values):
                raise ValueError(f"{name} has duplicates: {values}")
            for v in values:
                if v not in valid:
                    raise ValueError(f"unknown {name[:-1]} {v!r} in {name}; valid ones are {list(valid)}")
        if not 1 <= self.min_objects <= self.max_objects:
            raise ValueError(
                f"need 1 <= min_objects <= max_objects, got min_objects={self.min_objects}, "
                f"max_objects={self.max_objects}"
            )
        largest = max(SIZE_FRACTIONS[s] for s in self.sizes) + _GAP
        if self.max_objects * largest**2 > 0.45:
            fit = int(0.45 / largest**2)
            raise ValueError(
                f"max_objects={self.max_objects} objects of size up to {largest - _GAP:.2f} of the image "
                f"side do not fit in one image; use max_objects <= {fit} or smaller sizes"
            )
        for pair in self.held_out:
            if len(pair) != 2 or pair[0] not in self.colors or pair[1] not in self.shapes:
                raise ValueError(
                    f"held_out entries must be (colour, shape) pairs from colors/shapes, got {pair!r}"
                )
        if len(self.held_out) >= len(self.colors) * len(self.shapes):
            raise ValueError("held_out leaves no (colour, shape) combination for training")
        if not 0.0 <= self.caption_noise <= 1.0:
            raise ValueError(f"caption_noise must be in [0, 1], got {self.caption_noise}")
        if self.captions_per_image < 1:
            raise ValueError(f"captions_per_image must be >= 1, got {self.captions_per_image}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {self.seed!r}")

    @property
    def num_classes(self) -> int:
        """Object classes are (colour, shape) pairs, fine-grained like Visual Genome's."""
        return len(self.colors) * len(self.shapes)

    def class_id(self, color: str, shape: str) -> int:
        return self.colors.index(color) * len(self.shapes) + self.shapes.index(shape)

    def class_name(self, class_id: int) -> str:
        color, shape = divmod(int(class_id), len(self.shapes))
        return f"{self.colors[color]} {self.shapes[shape]}"


@dataclass(frozen=True)
class SceneObject:
    """One object: its attributes and its box ``(x1, y1, x2, y2)`` normalised to [0, 1]."""

    shape: str
    color: str
    size: str
    box: tuple[float, float, float, float]
    class_id: int

    @property
    def center(self) -> tuple[float, float]:
        x1, y1, x2, y2 = self.box
        return (x1 + x2) / 2, (y1 + y2) / 2

    @property
    def name(self) -> str:
        """``"large red circle"``"""
        return f"{self.size} {self.color} {self.shape}"


@lru_cache(maxsize=64)
def nameable_pairs(config: WorldConfig, split: str) -> frozenset[tuple[str, str]]:
    """The ``(colour, shape)`` pairs that scenes and texts of ``split`` may show or name: every pair in
    the ``"compositional"`` split, every pair but ``config.held_out`` in train, val and test.

    Texts of the other splits never name a held-out pair, not even in a question answered "no" or a
    false statement: a VQA model that read "is there a red circle? no" in training would learn
    "held-out pair -> no" and look compositional on the compositional split when it is not.
    """
    check_one_of("split", split, SPLITS)
    pairs = {(col, sh) for col in config.colors for sh in config.shapes}
    return frozenset(pairs if split == "compositional" else pairs - set(config.held_out))


def _rng(config: WorldConfig, split: str, index: int, stream: int) -> np.random.Generator:
    """Independent random stream for one scene; ``stream`` separates layout, text, detector..."""
    return np.random.default_rng((config.seed, _SPLIT_IDS[split], index, stream))


@dataclass(frozen=True)
class Scene:
    """A scene of ShapeWorld. Annotations are computed on first access and cached."""

    config: WorldConfig
    split: str
    index: int
    objects: tuple[SceneObject, ...]

    def rng(self, stream: int) -> np.random.Generator:
        """The scene's own random stream number ``stream`` (deterministic)."""
        return _rng(self.config, self.split, self.index, stream)

    def __len__(self) -> int:
        return len(self.objects)

    def boxes(self, image_size: int | None = None) -> np.ndarray:
        """(N, 4) float32 pixel boxes ``x1, y1, x2, y2`` of the rendering at side ``image_size``."""
        size = image_size or self.config.image_size
        return np.array([pixel_box(o, size) for o in self.objects], dtype=np.float32).reshape(-1, 4)

    @property
    def normalized_boxes(self) -> np.ndarray:
        """(N, 4) float32 boxes in [0, 1], as stored."""
        return np.array([o.box for o in self.objects], dtype=np.float32).reshape(-1, 4)

    @property
    def class_ids(self) -> np.ndarray:
        """(N,) int64 class ids (colour index * number of shapes + shape index)."""
        return np.array([o.class_id for o in self.objects], dtype=np.int64)

    @property
    def attributes(self) -> dict[str, np.ndarray]:
        """Attribute ids per object: ``{"color": (N,), "shape": (N,), "size": (N,)}`` int64."""
        c = self.config
        return {
            "color": np.array([c.colors.index(o.color) for o in self.objects], dtype=np.int64),
            "shape": np.array([c.shapes.index(o.shape) for o in self.objects], dtype=np.int64),
            "size": np.array([c.sizes.index(o.size) for o in self.objects], dtype=np.int64),
        }

    @cached_property
    def relations(self) -> tuple[tuple[int, str, int], ...]:
        """All true ``(subject, relation, object)`` triples between distinct objects."""
        return tuple(
            (i, rel, j)
            for i, a in enumerate(self.objects)
            for j, b in enumerate(self.objects)
            if i != j
            for rel in relations_between(a, b)
        )

    @property
    def scene_graph(self) -> dict:
        """Nodes (objects with attributes) and edges (relations), as Visual Genome stores them."""
        return {
            "objects": [
                {"id": i, "name": o.shape, "attributes": [o.size, o.color], "box": list(o.box)}
                for i, o in enumerate(self.objects)
            ],
            "relations": [{"subject": s, "predicate": r, "object": o} for s, r, o in self.relations],
        }

    # Language annotations live in course_lib.data.language; cached here per scene.
    @cached_property
    def captions(self) -> tuple[str, ...]:
        from course_lib.data.language import scene_captions

        return scene_captions(self)

    @property
    def description(self) -> str:
        """The canonical caption (all objects, left to right): ``"a large red circle and a small ..."``."""
        from course_lib.data.language import full_description

        return full_description(self)

    @cached_property
    def caption_is_noisy(self) -> tuple[bool, ...]:
        from course_lib.data.language import noisy_caption_flags

        return noisy_caption_flags(self)

    @cached_property
    def region_phrases(self) -> tuple[str, ...]:
        """One referring expression per object, each true of that object only."""
        from course_lib.data.language import referring_phrases

        return referring_phrases(self)

    @cached_property
    def questions(self) -> tuple[tuple[str, str, str], ...]:
        """``(question, answer, question_type)`` triples, types: exist, count, color, shape, relation."""
        from course_lib.data.language import scene_questions

        return scene_questions(self)


def relations_between(a: SceneObject, b: SceneObject) -> list[str]:
    """Relations that hold from ``a`` (subject) to ``b`` (object)."""
    (ax, ay), (bx, by) = a.center, b.center
    out = []
    if bx - ax > RELATION_MARGIN:
        out.append("left of")
    if ax - bx > RELATION_MARGIN:
        out.append("right of")
    if by - ay > RELATION_MARGIN:
        out.append("above")
    if ay - by > RELATION_MARGIN:
        out.append("below")
    if SIZE_FRACTIONS[a.size] > SIZE_FRACTIONS[b.size]:
        out.append("bigger than")
    if SIZE_FRACTIONS[a.size] < SIZE_FRACTIONS[b.size]:
        out.append("smaller than")
    return out


def pixel_box(obj: SceneObject, image_size: int) -> tuple[int, int, int, int]:
    """Integer pixel box of ``obj`` rendered at ``image_size`` (the object's exact extent)."""
    side = max(3, round(SIZE_FRACTIONS[obj.size] * image_size))
    cx, cy = obj.center
    x1 = min(max(round(cx * image_size - side / 2), 0), image_size - side)
    y1 = min(max(round(cy * image_size - side / 2), 0), image_size - side)
    return x1, y1, x1 + side, y1 + side


@lru_cache(maxsize=None)
def shape_mask(shape: str, side: int) -> np.ndarray:
    """(side, side, 1) float32 coverage of ``shape`` in a ``side``-pixel square, anti-aliased 4x4."""
    ss = 4
    t = (np.arange(side * ss) + 0.5) / (side * ss)  # sub-pixel centres in [0, 1]
    x, y = np.meshgrid(t, t)
    if shape == "square":
        inside = (x >= 0.06) & (x <= 0.94) & (y >= 0.06) & (y <= 0.94)
    elif shape == "circle":
        inside = (x - 0.5) ** 2 + (y - 0.5) ** 2 <= 0.5**2
    elif shape == "triangle":  # pointing up
        inside = (y >= 0.04) & (y <= 0.96) & (np.abs(x - 0.5) <= 0.5 * (y - 0.04) / 0.92)
    elif shape == "diamond":
        inside = np.abs(x - 0.5) + np.abs(y - 0.5) <= 0.5
    elif shape == "cross":
        inside = ((np.abs(x - 0.5) <= 0.17) | (np.abs(y - 0.5) <= 0.17))
    else:
        raise ValueError(f"unknown shape {shape!r}; valid ones are {list(SHAPE_NAMES)}")
    cover = inside.reshape(side, ss, side, ss).mean(axis=(1, 3))
    return cover.astype(np.float32)[..., None]


class ShapeWorld:
    """The generator: ``world.scene(i, split)`` gives scene ``i``; ``world.render(scene)`` draws it."""

    def __init__(self, config: WorldConfig | None = None, **overrides):
        if config is None:
            config = WorldConfig(**overrides)
        elif overrides:
            from dataclasses import replace

            config = replace(config, **overrides)
        self.config = config
        c = config
        combos = [(col, sh) for col in c.colors for sh in c.shapes]
        self._train_combos = [p for p in combos if p not in set(c.held_out)]
        self._held_out = list(c.held_out)
        self._colors = np.array([PALETTE[name] for name in c.colors], dtype=np.float32)

    def __repr__(self) -> str:
        return f"ShapeWorld({self.config})"

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    # ------------------------------------------------------------------ scenes
    def scene(self, index: int, split: str = "train") -> Scene:
        """Scene number ``index`` (any int >= 0) of ``split``; the same on every call."""
        check_one_of("split", split, SPLITS)
        if not isinstance(index, (int, np.integer)) or index < 0:
            raise ValueError(f"index must be a non-negative int, got {index!r}")
        if split == "compositional" and not self._held_out:
            raise ValueError(
                "split='compositional' needs held-out combinations: set WorldConfig.held_out, "
                "e.g. held_out=(('red', 'circle'),)"
            )
        rng = _rng(self.config, split, int(index), stream=0)
        return Scene(self.config, split, int(index), self._sample_objects(rng, split))

    def scenes(self, indices, split: str = "train") -> list[Scene]:
        return [self.scene(int(i), split) for i in indices]

    def _sample_objects(self, rng: np.random.Generator, split: str) -> tuple[SceneObject, ...]:
        c = self.config
        n = int(rng.integers(c.min_objects, c.max_objects + 1))
        combos = [self._train_combos[i] for i in rng.integers(len(self._train_combos), size=n)]
        if split == "compositional":  # at least one held-out pair in each scene
            combos[0] = self._held_out[int(rng.integers(len(self._held_out)))]
        sizes = [c.sizes[i] for i in rng.integers(len(c.sizes), size=n)]
        boxes = self._place(rng, [SIZE_FRACTIONS[s] for s in sizes])
        order = sorted(range(n), key=lambda k: boxes[k][0])  # objects listed left to right
        return tuple(
            SceneObject(combos[i][1], combos[i][0], sizes[i], boxes[i], c.class_id(*combos[i]))
            for i in order
        )

    @staticmethod
    def _place(rng: np.random.Generator, sides: list[float]) -> list[tuple[float, float, float, float]]:
        """Non-overlapping boxes for objects of the given sides (rejection sampling)."""
        while True:
            boxes: list[tuple[float, float, float, float]] = []
            candidates = rng.random((len(sides), 30, 2))  # drawn at once: far faster than one by one
            for side, tries in zip(sides, candidates):
                for u, v in tries * (0.96 - side) + 0.02:
                    box = (float(u), float(v), float(u + side), float(v + side))
                    if all(_apart(box, other) for other in boxes):
                        boxes.append(box)
                        break
                else:
                    break  # no room left: start the layout again
            if len(boxes) == len(sides):
                return boxes

    # --------------------------------------------------------------- rendering
    def render(self, scene: Scene, image_size: int | None = None) -> np.ndarray:
        """(H, W, 3) uint8 image of ``scene`` at side ``image_size`` (default: the config's)."""
        return self.render_batch([scene], image_size)[0]

    def render_batch(self, scenes, image_size: int | None = None) -> np.ndarray:
        """(B, H, W, 3) uint8 images of ``scenes``."""
        size = image_size or self.config.image_size
        if not isinstance(size, int) or size < 16:
            raise ValueError(f"image_size must be an int >= 16, got {size!r}")
        out = np.empty((len(scenes), size, size, 3), dtype=np.uint8)
        out[:] = BACKGROUND
        for b, scene in enumerate(scenes):
            for obj in scene.objects:
                x1, y1, x2, y2 = pixel_box(obj, size)
                alpha = shape_mask(obj.shape, x2 - x1)
                region = out[b, y1:y2, x1:x2]
                color = self._colors[self.config.colors.index(obj.color)]
                region[:] = region + alpha * (color - region)
        return out

    def images(self, indices, split: str = "train", image_size: int | None = None):
        """(B, 3, H, W) float32 torch tensor in [0, 1] of the scenes ``indices`` of ``split``."""
        import torch

        pixels = self.render_batch(self.scenes(indices, split), image_size)
        return torch.from_numpy(pixels).permute(0, 3, 1, 2).float().div_(255.0)

    # -------------------------------------------------------------- other views
    def detect(self, scene: Scene, detector=None):
        """Run the simulated detector on ``scene`` (see ``course_lib.data.simulated_detector``)."""
        from course_lib.data.simulated_detector import DetectorConfig, simulate_detections

        return simulate_detections(scene, detector or DetectorConfig())

    def corpus(self, num_scenes: int = 2000, split: str = "train") -> list[str]:
        """Every kind of text the world produces (captions, phrases, questions, answers, statements):
        what a tokenizer for ShapeWorld is trained on."""
        from course_lib.data.language import corpus

        return corpus(self, num_scenes, split)


def _apart(a, b) -> bool:
    return a[2] + _GAP <= b[0] or b[2] + _GAP <= a[0] or a[3] + _GAP <= b[1] or b[3] + _GAP <= a[1]
