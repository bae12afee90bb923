"""Scene graphs parsed from ShapeWorld captions (ERNIE-ViL's parser): the three templates, agreement with
ShapeWorld's ground-truth graph over many scenes, token tags, bad input, and the scene-graph masking
(whole nodes at each role's rate, BERT's 80/10/10)."""

from __future__ import annotations

import pytest
import torch

from course_lib.data import ShapeWorld, WorldConfig
from course_lib.data.datasets import build_tokenizer
from course_lib.data.regions import ShapeWorldRegions
from course_lib.data.scene_graph import (ROLE_IDS, ShapeWorldSceneGraphs, agreement_rates, graph_agreement,
                                         parse_scene_graph, scene_graph_text, token_annotations)
from course_lib.features.text import MASK_ID
from course_lib.objectives.scene_graph import mask_scene_graph_nodes

WORLD = WorldConfig(min_objects=2, max_objects=3, seed=0)


@pytest.fixture(scope="module")
def world():
    return ShapeWorld(WORLD)


@pytest.fixture(scope="module")
def tokenizer(world):
    return build_tokenizer(world, vocab_size=128, num_scenes=200)  # small: "right" is r ##ig ##h ##t


def words(caption, span):
    return caption[span.start:span.end]


def test_the_three_templates():
    cap = "a large red circle, a blue square and a small green triangle"
    g = parse_scene_graph(cap)
    assert g.template == "list" and [o.name for o in g.objects] == ["circle", "square", "triangle"]
    assert [[a.text for a in o.attributes] for o in g.objects] == [["large", "red"], ["blue"], ["small", "green"]]
    assert all(words(cap, o.span) == o.name for o in g.objects) and g.relations == ()
    cap = "a red circle is left of a blue square"
    g = parse_scene_graph(cap)
    assert g.template == "relation" and len(g.relations) == 1
    r = g.relations[0]
    assert (r.subject, r.predicate.text, r.object) == (0, "left of", 1) and words(cap, r.predicate) == "left of"
    assert g.to_dict() == {"objects": [{"id": 0, "name": "circle", "attributes": ["red"]},
                                       {"id": 1, "name": "square", "attributes": ["blue"]}],
                           "relations": [{"subject": 0, "predicate": "left of", "object": 1}]}
    assert [role for role, _ in g.nodes()] == ["object", "object", "attribute", "attribute", "relation"]
    cap = "there are two circles and three objects"
    g = parse_scene_graph(cap)
    assert g.template == "count" and [(o.name, words(cap, o.span), o.attributes[0].text) for o in g.objects] == [
        ("circle", "circles", "two"), ("object", "objects", "three")]
    # spans refer to the caption as given, whatever its case, spacing or final full stop
    cap = "A  Red circle IS above an orange square."
    g = parse_scene_graph(cap)
    assert words(cap, g.relations[0].predicate) == "above" and words(cap, g.objects[1].attributes[0]) == "orange"


def test_agreement_with_the_ground_truth_graph_over_many_scenes(world):
    scenes = world.scenes(range(400))
    captions = [c for s in scenes for c in s.captions]
    truths = [s.scene_graph for s in scenes for _ in s.captions]
    rates = agreement_rates(captions, truths)
    assert rates == {"parsed": 1.0, "objects": 1.0, "attributes": 1.0, "relations": 1.0}  # 2000 captions
    assert sum(parse_scene_graph(c).template == "relation" for c in captions) > 0.3 * len(captions)
    # the check has teeth: captions of other scenes (the noise knob) disagree with this scene's graph
    noisy = ShapeWorld(WORLD, caption_noise=0.5).scenes(range(200))
    rates = agreement_rates([c for s in noisy for c in s.captions], [s.scene_graph for s in noisy for _ in s.captions])
    assert rates["parsed"] == 1.0 and rates["objects"] < 0.85 and rates["relations"] < 0.85


def test_graph_agreement_catches_each_kind_of_error(world):
    scene = next(s for s in world.scenes(range(50)) if len(s.objects) == 2 and any(
        r == "left of" for _, r, _ in s.relations))
    i, _, j = next(t for t in scene.relations if t[1] == "left of")
    a, b = scene.objects[i], scene.objects[j]
    truth = scene.scene_graph
    right = parse_scene_graph(f"a {a.color} {a.shape} is left of a {b.color} {b.shape}".replace("a o", "an o"))
    assert graph_agreement(right, truth)["relations"] == (1, 1)
    wrong = parse_scene_graph(f"a {a.color} {a.shape} is right of a {b.color} {b.shape}".replace("a o", "an o"))
    assert graph_agreement(wrong, truth)["relations"] == (0, 1)
    listed = parse_scene_graph(scene.description)
    assert graph_agreement(listed, truth) == {"objects": (2, 2), "attributes": (4, 4), "relations": (0, 0)}
    swapped = parse_scene_graph(" and ".join(scene.description.split(" and ")[::-1]))
    if a.shape != b.shape:
        assert graph_agreement(swapped, truth)["objects"][0] < 2  # left-to-right order matters
    with pytest.raises(ValueError, match="scene_graph"):
        graph_agreement(listed, {"objects": []})
    with pytest.raises(ValueError, match="CaptionGraph"):
        graph_agreement("a red circle", truth)


def test_captions_outside_the_grammar():
    for bad in ("a red circle is near a blue square", "hello world", "a red circles", ""):
        with pytest.raises(ValueError, match="not in ShapeWorld's caption grammar"):
            parse_scene_graph(bad)
        g = parse_scene_graph(bad, strict=False)
        assert g.template == "none" and g.nodes() == []
    with pytest.raises(ValueError, match="caption must be a str"):
        parse_scene_graph(None)


def test_tokens_get_the_role_and_node_of_their_words(tokenizer):
    captions = ["a red circle is right of a blue square", "there are two circles and three objects", "hello"]
    text = scene_graph_text(tokenizer, captions, context_length=24)
    tokens = [tokenizer.convert_ids_to_tokens(row) for row in text["input_ids"]]
    roles, nodes = text["sg_roles"], text["sg_nodes"]
    relation = [t for t, r in zip(tokens[0], roles[0]) if r == ROLE_IDS["relation"]]
    assert "".join(relation).replace("##", "") == "rightof" and len(relation) > 2  # every piece of "right of"
    assert len(set(nodes[0][roles[0] == ROLE_IDS["relation"]].tolist())) == 1  # one node
    assert [t for t, r in zip(tokens[0], roles[0]) if r == ROLE_IDS["object"]] == ["circle", "square"]
    assert [t for t, r in zip(tokens[0], roles[0]) if r == ROLE_IDS["attribute"]] == ["red", "blue"]
    assert (roles[0][0] == 0) and (nodes[0][tokens[0].index("[SEP]")] == -1)  # special tokens: no node
    assert "".join(t for t, r in zip(tokens[1], roles[1]) if r == ROLE_IDS["object"]).replace("##", "") == \
        "circlesobjects"
    assert (roles[2] == 0).all() and (nodes[2] == -1).all()  # no graph: no role
    assert ((nodes >= 0) == (roles > 0)).all()
    with pytest.raises(ValueError, match="offsets"):
        token_annotations([parse_scene_graph(captions[0])], torch.zeros(1, 4))
    with pytest.raises(ValueError, match="graphs has 1"):
        token_annotations([parse_scene_graph(captions[0])], torch.zeros(2, 4, 2, dtype=torch.long))


def test_scene_graph_batches_extend_the_region_batch(world, tokenizer):
    regions = ShapeWorldRegions(world, tokenizer, context_length=24, max_regions=4)
    batch = ShapeWorldSceneGraphs(regions)(range(8))
    plain = regions(range(8))
    assert set(batch) == set(plain) | {"sg_roles", "sg_nodes"}
    assert torch.equal(batch["input_ids"], plain["input_ids"]) and batch["sg_roles"].shape == plain["input_ids"].shape
    assert (batch["sg_roles"] > 0).any(1).all()  # every ShapeWorld caption has a graph
    with pytest.raises(ValueError, match="ShapeWorldRegions"):
        ShapeWorldSceneGraphs(world)


# ----------------------------------------------------------------------------- masking


@pytest.fixture(scope="module")
def many(world, tokenizer):
    captions = [c for s in world.scenes(range(300)) for c in s.captions]
    return scene_graph_text(tokenizer, captions, context_length=24)


def test_nodes_are_masked_whole_at_each_roles_rate(many):
    ids, roles, nodes = many["input_ids"], many["sg_roles"], many["sg_nodes"]
    g = torch.Generator().manual_seed(0)
    masked, labels = mask_scene_graph_nodes(ids, roles, nodes, 128, probs=0.3, at_least_one=False, generator=g)
    chosen = labels != -100
    assert (chosen <= (roles > 0)).all() and torch.equal(labels[chosen], ids[chosen])
    for b in range(len(ids)):  # whole nodes: a node's tokens are all chosen or none
        for k in nodes[b][nodes[b] >= 0].unique():
            on = chosen[b][nodes[b] == k]
            assert on.all() or not on.any()
    for role in ("object", "attribute", "relation"):  # the rate is per node (1500 captions)
        r = ROLE_IDS[role]
        node_chosen = [bool(chosen[b][(nodes[b] == k)].any()) for b in range(len(ids))
                       for k in nodes[b][roles[b] == r].unique()]
        assert abs(sum(node_chosen) / len(node_chosen) - 0.3) < 0.04, role
    # 80/10/10, decided per node
    replaced = (masked[chosen] == MASK_ID).float().mean().item()
    kept = (masked[chosen] == ids[chosen]).float().mean().item()
    assert abs(replaced - 0.8) < 0.04 and 0.06 < kept < 0.15
    relation = roles == ROLE_IDS["relation"]
    for b in range(len(ids)):
        if (chosen[b] & relation[b]).any():
            tokens = masked[b][chosen[b] & relation[b]]
            assert (tokens == MASK_ID).all() or not (tokens == MASK_ID).any()  # one fate per node


def test_masking_rates_switches_and_minimum(many):
    ids, roles, nodes = many["input_ids"][:200], many["sg_roles"][:200], many["sg_nodes"][:200]
    g = torch.Generator().manual_seed(1)
    _, labels = mask_scene_graph_nodes(ids, roles, nodes, 128, probs=1e-9, generator=g)
    assert ((labels != -100).any(1) == (roles > 0).any(1)).all()  # at least one node per caption with a graph
    probs = {"object": 1.0, "attribute": 0.0, "relation": 0.0}
    _, labels = mask_scene_graph_nodes(ids, roles, nodes, 128, probs=probs, replace_prob=1.0, random_prob=0.0,
                                       generator=g)
    assert torch.equal(labels != -100, roles == ROLE_IDS["object"])
    torch.manual_seed(5)
    a = mask_scene_graph_nodes(ids, roles, nodes, 128, generator=torch.Generator().manual_seed(3))
    b = mask_scene_graph_nodes(ids, roles, nodes, 128, generator=torch.Generator().manual_seed(3))
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_masking_bad_input(many):
    ids, roles, nodes = many["input_ids"][:4], many["sg_roles"][:4], many["sg_nodes"][:4]
    with pytest.raises(ValueError, match="probs"):
        mask_scene_graph_nodes(ids, roles, nodes, 128, probs={"object": 0.3})
    with pytest.raises(ValueError, match="word_nodes must be >= 0 exactly where"):
        mask_scene_graph_nodes(ids, roles, nodes.clamp(min=0), 128)
    with pytest.raises(ValueError, match="word_nodes"):
        mask_scene_graph_nodes(ids, roles, nodes[:, :3], 128)
    with pytest.raises(ValueError, match="word_roles"):
        mask_scene_graph_nodes(ids, roles + 4, nodes, 128)
    with pytest.raises(ValueError, match="replace_prob"):
        mask_scene_graph_nodes(ids, roles, nodes, 128, replace_prob=0.95, random_prob=0.1)
