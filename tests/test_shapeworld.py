"""ShapeWorld: determinism, geometry, annotations that are true of their images, bad configs."""

import numpy as np
import pytest

from course_lib.data import DetectorConfig, ShapeWorld, WorldConfig
from course_lib.data.language import answer_vocabulary, referring_phrase
from course_lib.data.shapeworld import BACKGROUND, PALETTE, relations_between
from course_lib.data.video import make_video, render_video


@pytest.fixture(scope="module")
def world():
    return ShapeWorld(WorldConfig(seed=3))


def test_same_seed_same_scene_and_pixels(world):
    again = ShapeWorld(WorldConfig(seed=3))
    for i in (0, 5, 123):
        a, b = world.scene(i), again.scene(i)
        assert a.objects == b.objects and a.captions == b.captions and a.questions == b.questions
        np.testing.assert_array_equal(world.render(a), again.render(b))
    other = ShapeWorld(WorldConfig(seed=4))
    assert any(world.scene(i).objects != other.scene(i).objects for i in range(5))


def test_splits_differ(world):
    train = [world.scene(i, "train").objects for i in range(20)]
    val = [world.scene(i, "val").objects for i in range(20)]
    assert train != val


def test_object_count_and_attributes_in_range(world):
    c = world.config
    for i in range(200):
        s = world.scene(i)
        assert c.min_objects <= len(s) <= c.max_objects
        for o in s.objects:
            assert o.color in c.colors and o.shape in c.shapes and o.size in c.sizes
            assert o.class_id == c.class_id(o.color, o.shape)
            assert c.class_name(o.class_id) == f"{o.color} {o.shape}"


@pytest.mark.parametrize("size", [32, 64, 224])
def test_objects_are_drawn_inside_their_boxes(world, size):
    """Every object's colour is present inside its box, and outside all boxes is background."""
    for i in range(20):
        s = world.scene(i)
        img = world.render(s, size).astype(int)
        outside = np.ones(img.shape[:2], bool)
        for o, (x1, y1, x2, y2) in zip(s.objects, s.boxes(size).astype(int)):
            assert 0 <= x1 < x2 <= size and 0 <= y1 < y2 <= size
            patch = img[y1:y2, x1:x2]
            assert (np.abs(patch - PALETTE[o.color]).sum(-1) == 0).sum() >= 0.2 * (x2 - x1) ** 2  # a 6 px triangle has 8 solid pixels
            outside[y1:y2, x1:x2] = False
        assert (img[outside] == BACKGROUND).all()


def test_boxes_do_not_overlap(world):
    for i in range(200):
        b = world.scene(i).normalized_boxes
        for j in range(len(b)):
            for k in range(j + 1, len(b)):
                overlap_x = min(b[j, 2], b[k, 2]) - max(b[j, 0], b[k, 0])
                overlap_y = min(b[j, 3], b[k, 3]) - max(b[j, 1], b[k, 1])
                assert overlap_x <= 0 or overlap_y <= 0


def test_relations_hand_checked(world):
    from course_lib.data.shapeworld import SceneObject

    a = SceneObject("circle", "red", "large", (0.1, 0.1, 0.4, 0.4), 1)
    b = SceneObject("square", "blue", "small", (0.6, 0.5, 0.8, 0.7), 12)
    assert relations_between(a, b) == ["left of", "above", "bigger than"]
    assert relations_between(b, a) == ["right of", "below", "smaller than"]
    near = SceneObject("square", "blue", "large", (0.15, 0.12, 0.45, 0.42), 12)
    assert relations_between(a, near) == []  # too close to tell: no relation is stated


def test_annotations_are_true(world):
    c = world.config
    vocab = answer_vocabulary(c)
    for i in range(300):
        s = world.scene(i)
        graph = s.scene_graph
        assert len(graph["objects"]) == len(s) and len(graph["relations"]) == len(s.relations)
        for q, a, t in s.questions:
            assert a in vocab
            if t == "count":
                shape = q.split()[2][:-1]
                assert a == ["zero", "one", "two", "three"][sum(o.shape == shape for o in s.objects)]
            if t == "exist":
                words = q[:-1].split()
                present = any(o.color == words[-2] and o.shape == words[-1] for o in s.objects)
                assert a == ("yes" if present else "no")
        for k, phrase in enumerate(s.region_phrases):
            assert phrase == referring_phrase(s, k)
            assert s.objects[k].shape in phrase


def test_referring_phrases_are_unique_within_scene(world):
    for i in range(300):
        phrases = world.scene(i).region_phrases
        assert len(set(phrases)) == len(phrases)


def test_yes_no_answers_are_balanced(world):
    answers = [a for i in range(1000) for _, a, t in world.scene(i).questions if t == "exist"]
    assert 0.4 < answers.count("yes") / len(answers) < 0.6


def test_caption_noise_fraction():
    noisy = ShapeWorld(WorldConfig(caption_noise=0.3))
    clean = ShapeWorld(WorldConfig(caption_noise=0.0))
    flags = [f for i in range(400) for f in noisy.scene(i).caption_is_noisy]
    assert 0.25 < np.mean(flags) < 0.35
    for i in range(50):  # clean captions agree with the noiseless world
        s, t = noisy.scene(i), clean.scene(i)
        for flag, a, b in zip(s.caption_is_noisy, s.captions, t.captions):
            if not flag:
                assert a == b


def test_compositional_split():
    held = (("red", "circle"), ("blue", "square"))
    w = ShapeWorld(WorldConfig(held_out=held))
    for split in ("train", "val", "test"):
        for i in range(200):
            assert all((o.color, o.shape) not in held for o in w.scene(i, split).objects)
    for i in range(100):
        assert any((o.color, o.shape) in held for o in w.scene(i, "compositional").objects)
    with pytest.raises(ValueError, match="held_out"):
        ShapeWorld().scene(0, "compositional")


def test_detector_knobs():
    w = ShapeWorld()
    perfect = DetectorConfig(box_noise=0.0, miss_rate=0.0, false_positives=0.0, confidence=20.0)
    for i in range(20):
        s = w.scene(i)
        d = w.detect(s, perfect)
        np.testing.assert_allclose(d.boxes, s.normalized_boxes, atol=1e-6)
        np.testing.assert_array_equal(d.labels, s.class_ids)
        np.testing.assert_allclose(d.class_probs.sum(1), 1.0, rtol=1e-5)
    noisy = DetectorConfig(miss_rate=0.5, false_positives=2.0)
    dets = [w.detect(w.scene(i), noisy) for i in range(300)]
    n_obj = sum(len(w.scene(i)) for i in range(300))
    found = sum((d.matched_object >= 0).sum() for d in dets)
    spurious = sum((d.matched_object < 0).sum() for d in dets)
    assert 0.4 < found / n_obj < 0.6
    assert 1.7 < spurious / 300 < 2.3
    spurious_probs = np.concatenate([d.class_probs[d.matched_object < 0] for d in dets])
    assert (spurious_probs.argmax(1) == spurious_probs.shape[1] - 1).mean() > 0.5  # mostly "no object"
    with pytest.raises(ValueError, match="miss_rate"):
        DetectorConfig(miss_rate=1.5)


def test_video_motion():
    w = ShapeWorld()
    v = make_video(w, 4, num_frames=6, speed=0.05)
    frames = render_video(w, v)
    assert frames.shape == (6, 32, 32, 3)
    for k, motion in enumerate(v.motions):
        (x0, y0), (x1, y1) = v.frames[0].objects[k].center, v.frames[-1].objects[k].center
        dx, dy = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}[motion]
        assert np.isclose(x1 - x0, dx * 0.25) and np.isclose(y1 - y0, dy * 0.25)
        assert all(0 <= b <= 1 for f in v.frames for b in f.objects[k].box)
    assert f"moves {v.motions[0]}" in v.captions[0]
    with pytest.raises(ValueError, match="speed"):
        make_video(w, 0, num_frames=20, speed=0.1)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"colors": ("red", "purple")}, "unknown color 'purple'"),
        ({"shapes": ("circle", "star")}, "unknown shape 'star'"),
        ({"max_objects": 12}, "do not fit"),
        ({"min_objects": 3, "max_objects": 2}, "min_objects"),
        ({"image_size": 8}, "image_size"),
        ({"caption_noise": -0.1}, "caption_noise"),
        ({"held_out": (("red", "star"),)}, "held_out"),
        ({"colors": ()}, "colors must not be empty"),
    ],
)
def test_invalid_configs_name_the_problem(kwargs, match):
    with pytest.raises(ValueError, match=match):
        WorldConfig(**kwargs)


def test_invalid_calls(world):
    with pytest.raises(ValueError, match="split"):
        world.scene(0, "training")
    with pytest.raises(ValueError, match="index"):
        world.scene(-1)


# ------------------------------------------------------------------ held-out pairs name nowhere but the compositional split

HELD = (("red", "circle"), ("blue", "square"), ("green", "triangle"))
NUM_SCENES = 20_000


def named_pairs(text: str, config) -> set:
    """The (colour, shape) pairs a text names: a colour word right before a shape word ("a small red
    circle", "red circles")."""
    words = text.replace(",", " ").replace("?", " ").split()
    return {(a, b.removesuffix("s")) for a, b in zip(words, words[1:])
            if a in config.colors and b.removesuffix("s") in config.shapes}


def question_pairs(question: str, answer: str, qtype: str, config) -> set:
    """The pairs a question and its answer name together ("what color is the circle?" "red")."""
    pairs = named_pairs(f"{question} {answer}", config)
    words = question[:-1].split()
    if qtype == "color":  # what color is the <shape>?
        pairs.add((answer, words[-1]))
    if qtype == "shape":  # what shape is the <colour> object?
        pairs.add((words[-2], answer))
    return pairs


@pytest.fixture(scope="module")
def held_out_world():
    """A world with three held-out pairs, noisy captions, and its first 20,000 train scenes (texts are
    generated on first access and cached on the scene)."""
    world = ShapeWorld(WorldConfig(held_out=HELD, caption_noise=0.1, seed=5))
    return world, world.scenes(range(NUM_SCENES))


def test_named_pairs_helper():
    c = WorldConfig()
    assert named_pairs("a large red circle, a blue square and a small green triangle", c) == {
        ("red", "circle"), ("blue", "square"), ("green", "triangle")}
    assert named_pairs("the red square left of the circle", c) == {("red", "square")}
    assert question_pairs("what shape is the red object?", "circle", "shape", c) == {("red", "circle")}
    assert named_pairs("the left image has more circles than the right image", c) == set()


@pytest.mark.parametrize("kind", ["captions", "descriptions", "phrases", "questions"])
def test_no_train_text_names_a_held_out_pair(held_out_world, kind):
    from course_lib.data.shapeworld import nameable_pairs

    world, scenes = held_out_world
    c, held = world.config, set(HELD)
    if kind == "questions":
        texts = [(f"{q} {a}", question_pairs(q, a, t, c)) for s in scenes for q, a, t in s.questions]
    else:
        texts = [(t, named_pairs(t, c)) for s in scenes for t in {
            "captions": lambda s: s.captions, "descriptions": lambda s: (s.description,),
            "phrases": lambda s: s.region_phrases}[kind](s)]
    offending = [t for t, pairs in texts if pairs & held]
    assert not offending, f"{len(offending)} train {kind} name a held-out pair, e.g. {offending[:3]}"
    assert set().union(*(pairs for _, pairs in texts)) == nameable_pairs(c, "train")  # every other pair is named


def test_no_train_pair_statement_names_a_held_out_pair(held_out_world):
    from course_lib.data.language import pair_statement

    world, scenes = held_out_world
    rng = np.random.default_rng(0)
    statements = [pair_statement(scenes[i], scenes[i + 1], rng, want)
                  for i in range(0, NUM_SCENES, 2) for want in (True, False)]
    offending = [t for t in statements if named_pairs(t, world.config) & set(HELD)]
    assert not offending, f"{len(offending)} statements name a held-out pair, e.g. {offending[:3]}"
    assert sum(bool(named_pairs(t, world.config)) for t in statements) > len(statements) / 4


def test_corpus_names_no_held_out_pair(held_out_world, monkeypatch):
    world, scenes = held_out_world
    # scene() is a pure function of (seed, split, index): serving the scenes already generated (their
    # texts cached) changes nothing in corpus() but its run time.
    monkeypatch.setattr(world, "scene", lambda index, split="train": scenes[index] if split == "train"
                        else ShapeWorld.scene(world, index, split))
    texts = world.corpus(NUM_SCENES)
    assert len(texts) > 10 * NUM_SCENES
    offending = [t for t in texts if named_pairs(t, world.config) & set(HELD)]
    assert not offending, f"{len(offending)} corpus texts name a held-out pair, e.g. {offending[:3]}"
    prompts = [t for t in texts if t.startswith("a photo of")]
    assert len(prompts) == world.num_classes - len(HELD)


def test_val_and_test_texts_name_no_held_out_pair_but_compositional_ones_do():
    from course_lib.data.datasets import PairDataset

    world = ShapeWorld(WorldConfig(held_out=HELD, seed=5))
    for split in ("val", "test"):
        texts = [t for i in range(2000) for s in [world.scene(i, split)] for t in
                 (*s.captions, s.description, *s.region_phrases, *(f"{q} {a}" for q, a, _ in s.questions))]
        texts += [statement for statement, _ in PairDataset(world, split, size=500).items]
        texts += world.corpus(500, split)
        assert not [t for t in texts if named_pairs(t, world.config) & set(HELD)], split
    # The compositional split names them: every description, and absent held-out pairs in questions ("no").
    comp = [world.scene(i, "compositional") for i in range(500)]
    assert all(named_pairs(s.description, world.config) & set(HELD) for s in comp)
    exist = [(q, a) for s in comp for q, a, t in s.questions if t == "exist" and named_pairs(q, world.config) & set(HELD)]
    assert {"yes", "no"} <= {a for _, a in exist}
    assert len([t for t in world.corpus(10, "compositional") if t.startswith("a photo of")]) == world.num_classes


def test_only_texts_naming_a_held_out_pair_change(monkeypatch):
    """The fix replaces a text only when it would name a held-out pair; every other text, and every
    scene, is what the generator gave before (other notebooks' results depend on them)."""
    import course_lib.data.shapeworld as shapeworld
    from course_lib.data.datasets import PairDataset

    config = WorldConfig(held_out=HELD, seed=5)

    def generate():
        world = ShapeWorld(config)
        scenes = world.scenes(range(3000))
        return ([s.objects for s in scenes], [s.questions for s in scenes],
                [t for t, _ in PairDataset(world, "train", size=1500).items], world.corpus(300))

    objects, questions, statements, corpus = generate()
    with monkeypatch.context() as m:  # the generator before the fix: every pair may be named
        m.setattr(shapeworld, "nameable_pairs", lambda c, split: frozenset(
            (col, sh) for col in c.colors for sh in c.shapes))
        old_objects, old_questions, old_statements, old_corpus = generate()
    assert objects == old_objects
    held, changed = set(HELD), 0
    for new, old in zip(questions, old_questions):
        for (q, a, t), (oq, oa, ot) in zip(new, old, strict=True):
            if (q, a) != (oq, oa):
                assert t == ot == "exist" and named_pairs(oq, config) & held and a == oa == "no"
                changed += 1
    assert changed > 100  # about 260 in 3,000 scenes
    diff = [(n, o) for n, o in zip(statements, old_statements, strict=True) if n != o]
    assert diff and all(named_pairs(o, config) & held for _, o in diff)
    n = len(corpus) - (config.num_classes - len(HELD))  # the texts before the "a photo of" prompts
    assert n == len(old_corpus) - config.num_classes
    diff = [(new, old) for new, old in zip(corpus[:n], old_corpus[:n]) if new != old]
    assert diff and all(named_pairs(old, config) & held for _, old in diff)
    assert corpus[n:] == [t for t in old_corpus[n:] if not named_pairs(t, config) & held]


def test_no_held_out_pairs_no_change():
    """With nothing held out, nothing is filtered: the texts are the generator's as always."""
    from course_lib.data.shapeworld import nameable_pairs

    config = WorldConfig(seed=3)
    assert nameable_pairs(config, "train") == {(c, s) for c in config.colors for s in config.shapes}
    world = ShapeWorld(config)
    assert world.scene(0).questions == ShapeWorld(config).scene(0).questions


def test_held_out_texts_are_deterministic():
    from course_lib.data.datasets import PairDataset

    a, b = ShapeWorld(WorldConfig(held_out=HELD, seed=5)), ShapeWorld(WorldConfig(held_out=HELD, seed=5))
    assert [a.scene(i).questions for i in range(300)] == [b.scene(i).questions for i in range(300)]
    assert PairDataset(a, size=200).items == PairDataset(b, size=200).items
    assert a.corpus(200) == b.corpus(200)
