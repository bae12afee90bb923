"""Scene graphs parsed from captions, what ERNIE-ViL (Yu et al., AAAI 2021) masks and predicts.

ERNIE-ViL runs an off-the-shelf parser (SPICE's) over each caption and gets its *scene graph*: the
**objects** it names, each object's **attributes**, and the **relations** between objects, each node
tied to the words that say it. On ShapeWorld the parser is the caption grammar itself
(``course_lib.data.language``; :func:`course_lib.evaluate.caption_truth.parse_caption` reads it):

==============================================  ==============================================================
caption (template)                               scene graph
==============================================  ==============================================================
``a large red circle and a blue square``         objects circle {large, red}, square {blue}; no relation
(list, objects left to right)
``a red circle is left of a blue square``        objects circle {red}, square {blue}; relation circle
(relation)                                       --left of--> square
``there are two circles and three objects``      objects circle {two}, object {three} (counts are attributes,
(count)                                          as SPICE's); no relation
==============================================  ==============================================================

Every node keeps the character span of its words in the caption as given (a relation node spans
both words of ``"left of"``), so :func:`token_annotations` can tag the tokens of any tokenizer with a
role and a node. Ground truth is at hand: :func:`graph_agreement` checks a parsed graph against
ShapeWorld's own ``Scene.scene_graph`` (Visual Genome's layout), which is how the tests measure the
parser's agreement over many scenes.

A caption outside the grammar is a ``ValueError`` naming it (``parse_scene_graph(caption)``), or,
with ``strict=False``, an **empty graph**: no word gets a role, and ERNIE-ViL masks such a caption
with ordinary random MLM (``course_lib.models.ernie_vil``), as a real parser that finds nothing leaves
nothing for scene-graph prediction.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from course_lib.data.language import NUMBER_WORDS
from course_lib.evaluate.caption_truth import CountClaim, ListClaim, RelationClaim, parse_caption
from course_lib.objectives.scene_graph import ROLES

ROLE_IDS = {"none": 0, **ROLES}  # the role of a token: course_lib.objectives.scene_graph.ROLES, 0 for none
_WORD = re.compile(r"[a-z]+")


@dataclass(frozen=True)
class Span:
    """Words of the caption: ``text`` (lower case), characters ``[start, end)`` of the caption as given."""

    text: str
    start: int
    end: int


@dataclass(frozen=True)
class GraphObject:
    """An object node: ``name`` (singular: "circle"), the words naming it (``span``: "circles" in a
    count caption) and its attribute nodes (size, colour or count words)."""

    name: str
    span: Span
    attributes: tuple[Span, ...]


@dataclass(frozen=True)
class GraphRelation:
    """``objects[subject] --predicate--> objects[object]``; ``predicate.text`` e.g. ``"left of"``."""

    subject: int
    predicate: Span
    object: int


@dataclass(frozen=True)
class CaptionGraph:
    """The scene graph of one caption (``template``: ``"list"``, ``"relation"``, ``"count"``, or
    ``"none"`` for the empty graph of a caption that did not parse)."""

    caption: str
    template: str
    objects: tuple[GraphObject, ...] = ()
    relations: tuple[GraphRelation, ...] = ()

    def nodes(self) -> list[tuple[str, Span]]:
        """Every node as ``(role, span)``, in ERNIE-ViL's three kinds: each object, each
        (object, attribute) pair's attribute, each relation."""
        out = [("object", o.span) for o in self.objects]
        out += [("attribute", a) for o in self.objects for a in o.attributes]
        out += [("relation", r.predicate) for r in self.relations]
        return out

    def to_dict(self) -> dict:
        """Visual Genome's layout, as ``Scene.scene_graph`` (without boxes)."""
        return {"objects": [{"id": i, "name": o.name, "attributes": [a.text for a in o.attributes]}
                            for i, o in enumerate(self.objects)],
                "relations": [{"subject": r.subject, "predicate": r.predicate.text, "object": r.object}
                              for r in self.relations]}


class _Words:
    """The caption's words in order, each with its span in the caption as given; ``take`` consumes them."""

    def __init__(self, caption: str):
        self.words = [Span(m[0], m.start(), m.end()) for m in _WORD.finditer(caption.lower())]
        self.cursor = 0

    def take(self, *texts: str) -> Span:
        """The next run of words equal to ``texts`` (skipping articles and joiners before it), as one span."""
        for k in range(self.cursor, len(self.words) - len(texts) + 1):
            run = self.words[k:k + len(texts)]
            if [w.text for w in run] == list(texts):
                self.cursor = k + len(texts)
                return Span(" ".join(texts), run[0].start, run[-1].end)
        raise AssertionError(f"words {texts} not found in order")  # parse_caption's round trip rules it out


def _phrase(words: _Words, phrase) -> GraphObject:
    attributes = [words.take(phrase.size)] if phrase.size else []
    attributes.append(words.take(phrase.color))
    return GraphObject(phrase.shape, words.take(phrase.shape), tuple(attributes))


def parse_scene_graph(caption: str, strict: bool = True) -> CaptionGraph:
    """The scene graph of a ShapeWorld caption (see the module docstring for the three templates).

    A caption outside ShapeWorld's grammar raises ``ValueError`` with ``strict=True``; with
    ``strict=False`` it gives the empty graph (``template="none"``, no node).
    """
    if not isinstance(caption, str):
        raise ValueError(f"caption must be a str, got {type(caption).__name__}")
    claim = parse_caption(caption) if caption.strip() else None
    if claim is None:
        if strict:
            raise ValueError(f"caption {caption!r} is not in ShapeWorld's caption grammar (list, relation or count "
                             "template; course_lib.data.language); pass strict=False to get an empty scene graph")
        return CaptionGraph(caption, "none")
    words = _Words(caption)
    if isinstance(claim, ListClaim):
        return CaptionGraph(caption, "list", tuple(_phrase(words, p) for p in claim.objects))
    if isinstance(claim, RelationClaim):
        subject = _phrase(words, claim.subject)
        predicate = words.take(*claim.relation.split())
        obj = _phrase(words, claim.object)
        return CaptionGraph(caption, "relation", (subject, obj), (GraphRelation(0, predicate, 1),))
    assert isinstance(claim, CountClaim)
    count = words.take(NUMBER_WORDS[claim.count])
    noun = words.take(claim.shape if claim.count == 1 else claim.shape + "s")
    total = words.take(NUMBER_WORDS[claim.total])
    objects = words.take("object" if claim.total == 1 else "objects")
    return CaptionGraph(caption, "count", (GraphObject(claim.shape, noun, (count,)),
                                           GraphObject("object", objects, (total,))))


# --------------------------------------------------------------------------- ground truth


def _matches(node: GraphObject, truth: dict) -> bool:
    return node.name == truth["name"] and all(a.text in truth["attributes"] for a in node.attributes)


def graph_agreement(graph: CaptionGraph, scene_graph: dict) -> dict[str, tuple[int, int]]:
    """How much of ``graph`` (parsed from a caption) ShapeWorld's ground-truth ``scene_graph``
    (``Scene.scene_graph``) confirms: ``{"objects", "attributes", "relations": (agreeing, parsed)}``.

    - list captions name the scene's objects left to right: object k must be the scene's object k
      (same name) and each of its attributes one of that object's, and the caption must list them all;
    - relation captions: the relation agrees when some true relation with that predicate joins an
      object matching the subject node to one matching the object node (then both nodes and their
      attributes agree); a node alone agrees when some object of the scene matches it;
    - count captions: a noun and its number agree when the scene has exactly that many such objects
      (``"object"``: that many objects in all).
    """
    if not isinstance(graph, CaptionGraph):
        raise ValueError(f"graph must be a CaptionGraph (parse_scene_graph), got {type(graph).__name__}")
    if not isinstance(scene_graph, dict) or not {"objects", "relations"} <= set(scene_graph):
        raise ValueError("scene_graph must be a dict with 'objects' and 'relations' (Scene.scene_graph)")
    truth, edges = scene_graph["objects"], scene_graph["relations"]
    objects = attributes = relations = 0
    if graph.template == "list":
        complete = len(graph.objects) == len(truth)
        for node, true in zip(graph.objects, truth):
            same = complete and node.name == true["name"]
            objects += same
            attributes += sum(same and a.text in true["attributes"] for a in node.attributes)
    elif graph.template == "relation":
        for r in graph.relations:
            s, o = graph.objects[r.subject], graph.objects[r.object]
            held = any(e["predicate"] == r.predicate.text and _matches(s, truth[e["subject"]])
                       and _matches(o, truth[e["object"]]) for e in edges)
            relations += held
        for node in graph.objects:
            found = held or any(_matches(node, t) for t in truth)
            objects += found
            attributes += found * len(node.attributes)
    elif graph.template == "count":
        for node in graph.objects:
            n = len(truth) if node.name == "object" else sum(t["name"] == node.name for t in truth)
            same = NUMBER_WORDS.index(node.attributes[0].text) == n
            objects += same
            attributes += same
    return {"objects": (objects, len(graph.objects)),
            "attributes": (attributes, sum(len(o.attributes) for o in graph.objects)),
            "relations": (relations, len(graph.relations))}


def agreement_rates(captions: Sequence[str], scene_graphs: Sequence[dict]) -> dict[str, float]:
    """Over many (caption, ground-truth graph) pairs: the share of captions that parse
    (``"parsed"``) and, per node kind, the share of parsed nodes the ground truth confirms."""
    if len(captions) != len(scene_graphs) or not captions:
        raise ValueError(f"captions and scene_graphs must be non-empty and of the same length, got "
                         f"{len(captions)} and {len(scene_graphs)}")
    totals = {"objects": [0, 0], "attributes": [0, 0], "relations": [0, 0]}
    parsed = 0
    for caption, truth in zip(captions, scene_graphs):
        graph = parse_scene_graph(caption, strict=False)
        parsed += graph.template != "none"
        for kind, (agree, count) in graph_agreement(graph, truth).items():
            totals[kind][0] += agree
            totals[kind][1] += count
    out = {"parsed": parsed / len(captions)}
    out.update({kind: a / n if n else float("nan") for kind, (a, n) in totals.items()})
    return out


# --------------------------------------------------------------------------- tokens


def token_annotations(graphs: Sequence[CaptionGraph], offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Tag tokens with their scene-graph node: ``offsets (B, L, 2)`` (a fast tokenizer's
    ``offset_mapping`` of the captions ``graphs[b].caption``) -> ``(roles (B, L), nodes (B, L))`` int64.

    ``roles``: 0 none, 1 object, 2 attribute, 3 relation (``ROLE_IDS``); ``nodes``: the index of the
    token's node in ``graphs[b].nodes()``, -1 for none. A token belongs to a node when its characters
    lie inside the node's span (special tokens have empty offsets and belong to none).
    """
    if not torch.is_tensor(offsets) or offsets.dim() != 3 or offsets.shape[-1] != 2:
        raise ValueError(f"offsets must be a (B, L, 2) tensor of character offsets, got "
                         f"{tuple(offsets.shape) if torch.is_tensor(offsets) else type(offsets).__name__}")
    if len(graphs) != offsets.shape[0]:
        raise ValueError(f"graphs has {len(graphs)} captions but offsets has {offsets.shape[0]} rows")
    roles = torch.zeros(offsets.shape[:2], dtype=torch.long)
    nodes = torch.full(offsets.shape[:2], -1, dtype=torch.long)
    start, end = offsets[..., 0], offsets[..., 1]
    for b, graph in enumerate(graphs):
        for k, (role, span) in enumerate(graph.nodes()):
            inside = (start[b] >= span.start) & (end[b] <= span.end) & (end[b] > start[b])
            roles[b, inside], nodes[b, inside] = ROLE_IDS[role], k
    return roles, nodes


def scene_graph_text(tokenizer, captions: Sequence[str], context_length: int, strict: bool = False) -> dict:
    """``input_ids``, ``attention_mask`` ``(B, L)`` padded to ``context_length`` (as
    ``ShapeWorldRegions.text``), and ``sg_roles``, ``sg_nodes`` ``(B, L)`` (:func:`token_annotations`)."""
    if isinstance(captions, str):
        raise ValueError("captions must be a list of strings, got one str")
    graphs = [parse_scene_graph(c, strict=strict) for c in captions]
    enc = tokenizer(list(captions), padding="max_length", truncation=True, max_length=context_length,
                    return_tensors="pt", return_offsets_mapping=True)
    roles, nodes = token_annotations(graphs, enc["offset_mapping"])
    return {"input_ids": enc["input_ids"].long(), "attention_mask": enc["attention_mask"].long(),
            "sg_roles": roles, "sg_nodes": nodes}


class ShapeWorldSceneGraphs:
    """A ``ShapeWorldRegions`` source whose batches also carry each caption's scene graph on its tokens:
    ``sg_roles (B, L)`` and ``sg_nodes (B, L)`` (:func:`token_annotations`), what ERNIE-ViL masks.

    ``ShapeWorldSceneGraphs(regions)(indices)`` is ``regions(indices)`` plus those two keys.
    """

    def __init__(self, regions):
        from course_lib.data.regions import ShapeWorldRegions

        if not isinstance(regions, ShapeWorldRegions):
            raise ValueError(f"regions must be a ShapeWorldRegions, got {type(regions).__name__}")
        self.regions = regions

    def __call__(self, indices: Sequence[int]) -> dict:
        src = self.regions
        batch = src(indices)
        captions = src.captions(src.world.scenes(indices, src.split))
        text = scene_graph_text(src.tokenizer, captions, src.context_length)
        if not torch.equal(text["input_ids"], batch["input_ids"]):
            raise AssertionError("scene-graph tokens differ from the batch's captions")
        batch.update(sg_roles=text["sg_roles"], sg_nodes=text["sg_nodes"])
        return batch
