"""Is a caption true of a ShapeWorld scene? A parser for ShapeWorld's caption grammar and a checker.

BLEU and CIDEr reward n-grams shared with the references; on ShapeWorld we can ask the better
question, whether what the caption says is true. :func:`parse_caption` reads the grammar of
``course_lib.data.language`` into a claim; the claim is then checked against ``Scene.objects``
(shape, colour, size, left-to-right order) and ``Scene.relations``. The rules:

- **list** (``"a large red circle, a blue square and a green triangle"``, ``"there is a red circle"``,
  and the canonical ``scene.description``): the listed objects must match the scene's objects one to
  one, in the scene's left-to-right order (by the left edge of the box, the order of
  ``Scene.objects``): as many objects as the scene has, and object k names the colour and shape (and
  the size, when given) of the k-th object from the left. A list caption states the whole scene, so
  ``"there is a red circle"`` is true only of a scene whose single object is a red circle. Sizes may
  be given for some objects and not others.
- **relation** (``"a red circle is left of a blue square"``): true when some object matching the
  first phrase stands in the relation to some other object matching the second (one of the triples
  of ``Scene.relations``: left of, right of, above, below, bigger than, smaller than; left/right and
  above/below need the centres ``RELATION_MARGIN`` apart). The phrases may carry a size.
- **count** (``"there are two circles and three objects"``): true when the scene has exactly that
  many objects of that shape and exactly that many objects in all.

A caption that does not parse is false. Parsing is strict about the grammar (articles "a"/"an",
"is"/"are", singular/plural must agree, as the generator writes them: its plural of "cross" is
"crosss") and lenient about spelling details: upper case, repeated spaces, spaces around commas and
a final full stop are ignored.
Colours, shapes and sizes are those ShapeWorld can draw (``PALETTE``, ``SHAPE_NAMES``,
``SIZE_FRACTIONS``), whatever the scene's config; naming one the scene lacks is simply false.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from course_lib.data.language import NUMBER_WORDS, article, count_phrase
from course_lib.data.shapeworld import PALETTE, RELATIONS, SHAPE_NAMES, SIZE_FRACTIONS


def _alternatives(words) -> str:
    return "|".join(sorted(map(re.escape, words), key=len, reverse=True))


# "a large red circle" / "an orange square": one object phrase, sizes optional.
_OBJECT = (
    rf"an? (?:(?P<size>{_alternatives(SIZE_FRACTIONS)}) )?"
    rf"(?P<color>{_alternatives(PALETTE)}) (?P<shape>{_alternatives(SHAPE_NAMES)})"
)
_OBJECT_RE = re.compile(_OBJECT)
_RELATION_RE = re.compile(
    rf"(?P<subject>an? .+?) is (?P<relation>{_alternatives(RELATIONS)}) (?P<object>an? .+)"
)
_COUNT_RE = re.compile(
    rf"there (?:is|are) (?P<n>{_alternatives(NUMBER_WORDS)}) (?P<shape>{_alternatives(SHAPE_NAMES)})s? "
    rf"and (?P<total>{_alternatives(NUMBER_WORDS)}) objects?"
)


# --------------------------------------------------------------------------- claims


@dataclass(frozen=True)
class ObjectPhrase:
    """``"a [size] colour shape"``; ``size`` is None when the phrase gives none."""

    color: str
    shape: str
    size: str | None = None

    def matches(self, obj) -> bool:
        """True when the scene object ``obj`` has every attribute the phrase names."""
        return obj.color == self.color and obj.shape == self.shape and self.size in (None, obj.size)

    def text(self) -> str:
        words = " ".join(w for w in (self.size, self.color, self.shape) if w)
        return f"{article(words)} {words}"


@dataclass(frozen=True)
class ListClaim:
    """The scene's objects, left to right; ``there_is`` for the one-object form "there is ..."."""

    objects: tuple[ObjectPhrase, ...]
    there_is: bool = False

    def holds(self, scene) -> bool:
        ordered = sorted(scene.objects, key=lambda o: o.box[0])  # Scene.objects' own order
        return len(ordered) == len(self.objects) and all(p.matches(o) for p, o in zip(self.objects, ordered))

    def text(self) -> str:
        parts = [p.text() for p in self.objects]
        if self.there_is:
            return "there is " + parts[0]
        return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


@dataclass(frozen=True)
class RelationClaim:
    """``subject relation object``, true when some matching pair of distinct objects is related."""

    subject: ObjectPhrase
    relation: str
    object: ObjectPhrase

    def holds(self, scene) -> bool:
        objs = scene.objects
        return any(
            rel == self.relation and self.subject.matches(objs[i]) and self.object.matches(objs[j])
            for i, rel, j in scene.relations
        )

    def text(self) -> str:
        return f"{self.subject.text()} is {self.relation} {self.object.text()}"


@dataclass(frozen=True)
class CountClaim:
    """``"there are <count> <shape>s and <total> objects"``: both numbers must be exact."""

    shape: str
    count: int
    total: int

    def holds(self, scene) -> bool:
        n = sum(o.shape == self.shape for o in scene.objects)
        return n == self.count and len(scene.objects) == self.total

    def text(self) -> str:
        verb = "is" if self.count == 1 else "are"
        return f"there {verb} {count_phrase(self.count, self.shape)} and {count_phrase(self.total, 'object')}"


Claim = ListClaim | RelationClaim | CountClaim


# --------------------------------------------------------------------------- parsing


def normalize_caption(caption: str) -> str:
    """Lower case, single spaces, ``", "`` around commas, no final full stop."""
    if not isinstance(caption, str):
        raise ValueError(f"caption must be a str, got {type(caption).__name__}")
    text = re.sub(r"\s*,\s*", ", ", caption.lower())
    return " ".join(text.split()).removesuffix(".").rstrip()


def _object_phrase(text: str) -> ObjectPhrase | None:
    m = _OBJECT_RE.fullmatch(text)
    return None if m is None else ObjectPhrase(m["color"], m["shape"], m["size"])


def _parse_count(text: str) -> CountClaim | None:
    m = _COUNT_RE.fullmatch(text)
    if m is None:
        return None
    return CountClaim(m["shape"], NUMBER_WORDS.index(m["n"]), NUMBER_WORDS.index(m["total"]))


def _parse_relation(text: str) -> RelationClaim | None:
    m = _RELATION_RE.fullmatch(text)
    if m is None:
        return None
    subject, obj = _object_phrase(m["subject"]), _object_phrase(m["object"])
    return None if subject is None or obj is None else RelationClaim(subject, m["relation"], obj)


def _parse_list(text: str) -> ListClaim | None:
    if text.startswith("there is "):
        phrase = _object_phrase(text.removeprefix("there is "))
        return None if phrase is None else ListClaim((phrase,), there_is=True)
    *head, last = text.split(", ")  # parse_caption's round trip rejects a misplaced "," or "and"
    items = [*head, *last.split(" and ")]
    phrases = [_object_phrase(item) for item in items]
    return None if any(p is None for p in phrases) else ListClaim(tuple(phrases))


def parse_caption(caption: str) -> Claim | None:
    """The claim a caption of ShapeWorld's grammar makes, or None if it is not one.

    Tries the count, relation and list templates in turn; a parse only counts when writing the claim
    back with the grammar gives the (normalised) caption again, which checks articles and agreement.
    """
    text = normalize_caption(caption)
    for parse in (_parse_count, _parse_relation, _parse_list):
        claim = parse(text)
        if claim is not None and claim.text() == text:
            return claim
    return None


# --------------------------------------------------------------------------- truth


def caption_is_true(caption: str, scene) -> bool:
    """Whether ``caption`` parses (:func:`parse_caption`) and what it states holds in ``scene``
    (rules in the module docstring). ``scene`` is a ``course_lib.data.shapeworld.Scene``."""
    if not hasattr(scene, "objects") or not hasattr(scene, "relations"):
        raise ValueError(
            f"scene must be a ShapeWorld Scene (with .objects and .relations), got {type(scene).__name__}"
        )
    claim = parse_caption(caption)
    return claim is not None and claim.holds(scene)


def caption_truth_rate(captions: Sequence[str], scenes: Sequence) -> float:
    """Fraction of ``captions[i]`` true of ``scenes[i]`` (N captions, N scenes); 0 when none parse."""
    if isinstance(captions, str) or not isinstance(captions, Sequence):
        raise ValueError(f"captions must be a list of caption strings, got {type(captions).__name__}")
    if not isinstance(scenes, Sequence):
        raise ValueError(f"scenes must be a list of ShapeWorld scenes, got {type(scenes).__name__}")
    if len(captions) != len(scenes):
        raise ValueError(f"captions and scenes must have the same length, got {len(captions)} and {len(scenes)}")
    if not captions:
        raise ValueError("captions is empty; the truth rate is undefined")
    return sum(caption_is_true(c, s) for c, s in zip(captions, scenes)) / len(captions)
