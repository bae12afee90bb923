"""The language side of ShapeWorld: captions from a small grammar, referring phrases,
question/answer pairs and true/false statements about image pairs (NLVR-like).

Every sentence is generated from the scene's ground truth, so it is true of its image
(except the captions that the ``caption_noise`` knob deliberately replaces). No text of the train,
val or test split names a held-out (colour, shape) pair (``shapeworld.nameable_pairs``): those pairs
are seen, and named, in the compositional split only.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
_TEXT_STREAM, _NOISE_STREAM, _QA_STREAM = 1, 2, 3
_REDRAW = 7  # last key of the side streams that replace a text naming a held-out pair


def _redraw_rng(config, *keys: int) -> np.random.Generator:
    """A side stream, keyed by ``(config.seed, *keys, _REDRAW)``: a tuple longer than a scene stream's
    ``(seed, split, index, stream)``, so it is none of them. Drawing a replacement from it leaves the
    other texts (and the streams they are drawn from) exactly as they were."""
    return np.random.default_rng((config.seed, *keys, _REDRAW))


def _split_id(split: str) -> int:
    from course_lib.data.shapeworld import SPLITS

    return SPLITS.index(split)


def plural(shape: str) -> str:
    return shape + "s"


def article(phrase: str) -> str:
    return "an" if phrase[0] in "aeiou" else "a"


def describe(obj, with_size: bool = True) -> str:
    """``"a large red circle"`` / ``"a red circle"``"""
    words = f"{obj.size} {obj.color} {obj.shape}" if with_size else f"{obj.color} {obj.shape}"
    return f"{article(words)} {words}"


def count_phrase(n: int, noun: str) -> str:
    """``"one circle"``, ``"two circles"``"""
    return f"{NUMBER_WORDS[n]} {noun if n == 1 else noun + 's'}"


# --------------------------------------------------------------------------- captions
def _caption(scene, rng: np.random.Generator) -> str:
    """One caption of the scene, from one of four templates."""
    objs = scene.objects
    kinds = ["list", "list", "count"]
    if scene.relations:
        kinds += ["relation", "relation"]
    kind = kinds[int(rng.integers(len(kinds)))]
    if kind == "list":  # objects from left to right
        with_size = bool(rng.integers(2))
        parts = [describe(o, with_size) for o in objs]
        if len(parts) == 1:
            return f"there is {parts[0]}"
        return ", ".join(parts[:-1]) + " and " + parts[-1]
    if kind == "relation":
        i, rel, j = scene.relations[int(rng.integers(len(scene.relations)))]
        return f"{describe(objs[i], False)} is {rel} {describe(objs[j], False)}"
    # count
    shapes = Counter(o.shape for o in objs)
    shape = sorted(shapes)[int(rng.integers(len(shapes)))]
    n = shapes[shape]
    verb = "is" if n == 1 else "are"
    return f"there {verb} {count_phrase(n, shape)} and {count_phrase(len(objs), 'object')}"


def full_description(scene) -> str:
    """The canonical caption: every object, left to right, with its size, colour and shape.
    Deterministic (no random template), so it is what retrieval is evaluated on."""
    parts = [describe(o) for o in scene.objects]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def scene_captions(scene) -> tuple[str, ...]:
    """``captions_per_image`` captions; a ``caption_noise`` fraction comes from other scenes."""
    rng = scene.rng(_TEXT_STREAM)
    caps = [_caption(scene, rng) for _ in range(scene.config.captions_per_image)]
    for k, noisy in enumerate(noisy_caption_flags(scene)):
        if noisy:
            caps[k] = _caption(_other_scene(scene, k), rng)
    return tuple(caps)


def noisy_caption_flags(scene) -> tuple[bool, ...]:
    """Which captions the noise knob replaced (ground truth for filtering experiments)."""
    p = scene.config.caption_noise
    if p == 0:
        return (False,) * scene.config.captions_per_image
    rng = scene.rng(_NOISE_STREAM)
    return tuple(bool(u < p) for u in rng.random(scene.config.captions_per_image))


def _other_scene(scene, k: int):
    from course_lib.data.shapeworld import ShapeWorld

    rng = scene.rng(_NOISE_STREAM + 10 + k)
    other = int(rng.integers(1, 2**31)) + scene.index
    return ShapeWorld(scene.config).scene(other, scene.split)


# ------------------------------------------------------------------ referring phrases
def _matches(obj, attrs: dict) -> bool:
    return all(getattr(obj, k) == v for k, v in attrs.items())


def referring_phrase(scene, i: int) -> str:
    """The shortest description true of object ``i`` alone: ``"the red circle"``,
    ``"the small circle"``, ``"the circle left of the blue square"``, ``"the leftmost circle"``."""
    obj = scene.objects[i]
    for keys in (("shape",), ("color", "shape"), ("size", "shape"), ("size", "color", "shape")):
        attrs = {k: getattr(obj, k) for k in keys}
        if sum(_matches(o, attrs) for o in scene.objects) == 1:
            return "the " + " ".join(attrs[k] for k in keys)
    full = {k: getattr(obj, k) for k in ("size", "color", "shape")}
    twins = [j for j, o in enumerate(scene.objects) if _matches(o, full)]
    head = f"the {obj.size} {obj.color} {obj.shape}"
    for s, rel, o in scene.relations:  # a relation to an object that tells the twins apart
        if s == i and sum((t, rel, o) in scene.relations for t in twins) == 1:
            other = scene.objects[o]
            return f"{head} {rel} the {other.color} {other.shape}"
    # identical objects with identical relations: objects are sorted left to right
    return f"the {'leftmost' if twins[0] == i else 'rightmost'} {obj.size} {obj.color} {obj.shape}"


def referring_phrases(scene) -> tuple[str, ...]:
    return tuple(referring_phrase(scene, i) for i in range(len(scene.objects)))


# ------------------------------------------------------------------------- questions
QUESTION_TYPES = ("exist", "count", "color", "shape", "relation")


def scene_questions(scene) -> tuple[tuple[str, str, str], ...]:
    """Question/answer pairs of every type the scene supports; yes/no answers are balanced."""
    from course_lib.data.shapeworld import nameable_pairs

    c, objs, rng = scene.config, scene.objects, scene.rng(_QA_STREAM)
    qa: list[tuple[str, str, str]] = []
    present = sorted({(o.color, o.shape) for o in objs})
    absent = [(col, sh) for col in c.colors for sh in c.shapes if (col, sh) not in present]
    pick_present = bool(rng.integers(2)) or not absent
    col, sh = (present if pick_present else absent)[int(rng.integers(len(present if pick_present else absent)))]
    nameable = nameable_pairs(c, scene.split)
    if (col, sh) not in nameable:  # an absent held-out pair outside the compositional split: ask about
        side = _redraw_rng(c, _split_id(scene.split), scene.index, _QA_STREAM)  # another absent pair
        allowed = [p for p in absent if p in nameable]
        pick_present = not allowed
        pool = present if pick_present else allowed
        col, sh = pool[int(side.integers(len(pool)))]
    qa.append((f"is there {article(col)} {col} {sh}?", "yes" if pick_present else "no", "exist"))

    shape = c.shapes[int(rng.integers(len(c.shapes)))]
    n = sum(o.shape == shape for o in objs)
    qa.append((f"how many {plural(shape)} are there?", NUMBER_WORDS[n], "count"))

    shape_counts = Counter(o.shape for o in objs)
    unique_shapes = [o for o in objs if shape_counts[o.shape] == 1]
    if unique_shapes:
        o = unique_shapes[int(rng.integers(len(unique_shapes)))]
        qa.append((f"what color is the {o.shape}?", o.color, "color"))
    color_counts = Counter(o.color for o in objs)
    unique_colors = [o for o in objs if color_counts[o.color] == 1]
    if unique_colors:
        o = unique_colors[int(rng.integers(len(unique_colors)))]
        qa.append((f"what shape is the {o.color} object?", o.shape, "shape"))

    if len(objs) >= 2:
        i, j = (int(v) for v in rng.choice(len(objs), size=2, replace=False))
        rel = ("left of", "right of", "above", "below")[int(rng.integers(4))]
        answer = "yes" if (i, rel, j) in scene.relations else "no"
        a, b = referring_phrase(scene, i), referring_phrase(scene, j)
        qa.append((f"is {a} {rel} {b}?", answer, "relation"))
    return tuple(qa)


def answer_vocabulary(config) -> tuple[str, ...]:
    """Every answer a ShapeWorld question can have, in a fixed order (the VQA classes)."""
    numbers = NUMBER_WORDS[: config.max_objects + 1]
    return ("yes", "no", *numbers, *config.colors, *config.shapes)


# ------------------------------------------------------------ image pairs (NLVR-like)
def pair_statement(left, right, rng: np.random.Generator, want_true: bool) -> str:
    """A statement about two scenes whose truth is ``want_true`` (drawn until it matches).

    It never names a held-out pair unless one of the scenes is from the compositional split. When the
    statement drawn from ``rng`` would, the next draws come from a side stream of the two scenes, so
    ``rng`` advances exactly as if that statement had been kept and the following statements stay the same.
    """
    from course_lib.data.shapeworld import nameable_pairs

    c = left.config
    nameable = nameable_pairs(c, left.split) | nameable_pairs(c, right.split)
    draw = rng
    for _ in range(1000):
        text, truth, pair = _random_pair_statement(left, right, draw, c)
        if truth == want_true:
            if pair is None or pair in nameable:
                return text
            if draw is rng:
                draw = _redraw_rng(c, _split_id(left.split), left.index, _split_id(right.split), right.index)
    raise RuntimeError("could not draw a statement with the requested truth value")


def _random_pair_statement(left, right, rng, c) -> tuple[str, bool, tuple[str, str] | None]:
    """``(statement, truth, the (colour, shape) pair it names or None)``."""
    kind = int(rng.integers(4))
    objects = left.objects + right.objects
    if rng.random() < 0.5:  # half the time talk about an object that is there
        o = objects[int(rng.integers(len(objects)))]
        col, sh = o.color, o.shape
    else:
        col, sh = c.colors[int(rng.integers(len(c.colors)))], c.shapes[int(rng.integers(len(c.shapes)))]
    has = lambda s: any(o.color == col and o.shape == sh for o in s.objects)  # noqa: E731
    count = lambda s: sum(o.shape == sh for o in s.objects)  # noqa: E731
    if kind == 0:
        return f"both images contain {article(col)} {col} {sh}", has(left) and has(right), (col, sh)
    if kind == 1:
        side, scene = (("left", left), ("right", right))[int(rng.integers(2))]
        return f"the {side} image contains {article(col)} {col} {sh}", has(scene), (col, sh)
    if kind == 2:
        return (f"the left image has more {plural(sh)} than the right image", count(left) > count(right), None)
    total = len(objects)
    n = total if rng.random() < 0.5 else int(rng.integers(2 * c.min_objects, 2 * c.max_objects + 1))
    return f"the two images contain {count_phrase(n, 'object')} in total", n == total, None


# ---------------------------------------------------------------------------- corpus
def corpus(world, num_scenes: int = 2000, split: str = "train") -> list[str]:
    """All the text of ``num_scenes`` scenes of ``split`` (for training a tokenizer), and a prompt
    ``"a photo of a red circle"`` per (colour, shape) pair the split may name."""
    from course_lib.data.shapeworld import nameable_pairs

    texts: list[str] = []
    c = world.config
    scenes = world.scenes(range(num_scenes + num_scenes % 2), split)  # an even number: pairs (i, i + 1)
    for s in scenes[:num_scenes]:
        texts += list(s.captions) + list(s.region_phrases)
        for q, a, _ in s.questions:
            texts += [q, a]
    rng = np.random.default_rng([c.seed, 99])
    for i in range(0, num_scenes, 2):
        texts.append(pair_statement(scenes[i], scenes[i + 1], rng, bool(rng.integers(2))))
    texts += list(answer_vocabulary(c))  # every answer word is seen at least once
    nameable = nameable_pairs(c, split)
    texts += [f"a photo of {article(n)} {n}"
              for n in (f"{col} {sh}" for col in c.colors for sh in c.shapes if (col, sh) in nameable)]
    return texts
