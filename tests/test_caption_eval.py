"""VQA head/loss/targets, captioning metrics, ShapeWorld caption truth and the most-frequent-caption
baseline (course_lib.evaluate). Fast: about two seconds."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from course_lib.data.language import answer_vocabulary
from course_lib.data.shapeworld import PALETTE, SHAPE_NAMES, Scene, SceneObject, ShapeWorld, WorldConfig
from course_lib.evaluate import (
    VQAHead,
    caption_is_true,
    caption_metrics,
    caption_truth_rate,
    most_frequent_caption,
    parse_caption,
    tokenize_caption,
    vqa_loss,
    vqa_soft_accuracy,
    vqa_soft_targets,
    vqa_soft_targets_from_scores,
)
from course_lib.evaluate.caption_truth import CountClaim, ListClaim, ObjectPhrase, RelationClaim

torch.set_num_threads(1)


# --------------------------------------------------------------------------- VQA head and loss


def test_vqa_head_is_uniter_answer_classifier():
    head = VQAHead(dim=8, num_answers=5)
    linear1, act, norm, linear2 = head.net
    assert (linear1.in_features, linear1.out_features) == (8, 16)
    assert isinstance(act, nn.GELU) and act.approximate == "none"
    assert norm.normalized_shape == (16,) and norm.eps == 1e-12
    assert (linear2.in_features, linear2.out_features) == (16, 5)
    assert not linear1.bias.detach().any() and float(linear1.weight.detach().std()) < 0.05  # BERT init
    pooled = torch.randn(3, 8)
    expected = linear2(norm(F.gelu(linear1(pooled))))
    torch.testing.assert_close(head(pooled), expected)
    assert VQAHead(8, 5, hidden_ratio=3).net[0].out_features == 24


def test_vqa_head_errors_name_the_argument():
    with pytest.raises(ValueError, match="pooled must have shape"):
        VQAHead(8, 5)(torch.randn(3, 7))
    for kwargs, name in (({"dim": 0, "num_answers": 5}, "dim"), ({"dim": 8, "num_answers": 2.0}, "num_answers"),
                         ({"dim": 8, "num_answers": 5, "hidden_ratio": 0}, "hidden_ratio")):
        with pytest.raises(ValueError, match=f"{name} must be a positive int"):
            VQAHead(**kwargs)


def test_vqa_loss_is_bce_times_num_answers():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 6, generator=g)
    targets = torch.rand(4, 6, generator=g)
    p = torch.sigmoid(logits)
    by_hand = -(targets * p.log() + (1 - targets) * (1 - p).log()).sum(dim=1).mean()  # sum over answers
    torch.testing.assert_close(vqa_loss(logits, targets), by_hand)
    # zero logits: every answer costs log 2, whatever the targets
    torch.testing.assert_close(vqa_loss(torch.zeros(2, 6), targets[:2]), torch.tensor(6 * math.log(2)))


def test_vqa_loss_errors():
    with pytest.raises(ValueError, match="soft_targets must have shape"):
        vqa_loss(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match=r"soft_targets must lie in \[0, 1\]"):
        vqa_loss(torch.zeros(2, 3), torch.full((2, 3), 2.0))
    with pytest.raises(ValueError, match="logits is empty"):
        vqa_loss(torch.zeros(0, 3), torch.zeros(0, 3))


def test_vqa_head_learns_shapeworld_answers():
    """The head, the loss and the targets fit together: 64 separable pooled vectors are learned."""
    torch.manual_seed(0)
    num_answers = len(answer_vocabulary(WorldConfig()))
    answers = torch.arange(64) % num_answers
    pooled = torch.randn(num_answers, 16)[answers] + 0.1 * torch.randn(64, 16)
    targets = vqa_soft_targets(answers, num_answers)
    head = VQAHead(16, num_answers)
    opt = torch.optim.AdamW(head.parameters(), lr=1e-2)
    first = vqa_loss(head(pooled), targets).item()
    for _ in range(60):
        opt.zero_grad()
        loss = vqa_loss(head(pooled), targets)
        loss.backward()
        opt.step()
    assert loss.item() < 0.1 * first
    assert vqa_soft_accuracy(head(pooled), targets) == 1.0


def test_vqa_soft_targets_one_hot():
    targets = vqa_soft_targets(torch.tensor([2, 0, 2]), 4)
    assert targets.dtype == torch.float32
    assert targets.tolist() == [[0, 0, 1, 0], [1, 0, 0, 0], [0, 0, 1, 0]]
    assert vqa_soft_targets([1], 2).tolist() == [[0, 1]]
    with pytest.raises(ValueError, match=r"answer_ids must be answer classes in \[0, 4\)"):
        vqa_soft_targets(torch.tensor([4]), 4)
    with pytest.raises(ValueError, match="answer_ids must be integer answer classes of shape"):
        vqa_soft_targets(torch.tensor([0.0, 1.0]), 4)
    with pytest.raises(ValueError, match="num_answers must be a positive int"):
        vqa_soft_targets([0], 0)


def test_vqa_soft_targets_from_scores():
    vocab = ("yes", "no", "two")
    targets = vqa_soft_targets_from_scores([{"yes": 1.0, "no": 0.3}, {"two": 0.9}], vocab)
    torch.testing.assert_close(targets, torch.tensor([[1.0, 0.3, 0.0], [0.0, 0.0, 0.9]]))
    by_id = vqa_soft_targets_from_scores([{0: 0.6}], 2)
    torch.testing.assert_close(by_id, torch.tensor([[0.6, 0.0]]))
    with pytest.raises(ValueError, match=r"answer_scores\[1\] has answer 'maybe'.*drop_unknown=True"):
        vqa_soft_targets_from_scores([{"yes": 1.0}, {"maybe": 1.0}], vocab)
    dropped = vqa_soft_targets_from_scores([{"maybe": 1.0, "no": 0.6}], vocab, drop_unknown=True)
    torch.testing.assert_close(dropped, torch.tensor([[0.0, 0.6, 0.0]]))
    with pytest.raises(ValueError, match=r"answer_scores\[0\]\['yes'\] must be a score in \[0, 1\]"):
        vqa_soft_targets_from_scores([{"yes": 3}], vocab)
    with pytest.raises(ValueError, match="answers must be distinct strings"):
        vqa_soft_targets_from_scores([{"yes": 1.0}], ("yes", "yes"))
    with pytest.raises(ValueError, match="answer_scores must be a sequence"):
        vqa_soft_targets_from_scores({"yes": 1.0}, vocab)


# --------------------------------------------------------------------------- caption metrics


def test_tokenize_caption_like_ptb_for_simple_english():
    words = ["a", "red", "circle", "left", "of", "the", "square"]
    assert tokenize_caption("A red circle, left of (the) square.") == words
    assert tokenize_caption("  is it blue? yes!  ") == ["is", "it", "blue", "yes"]
    assert tokenize_caption(" ,. ") == []


def test_identical_captions_give_bleu_one_and_cider_ten():
    refs = ["a large red circle and a small blue square", "there are two circles and three objects"]
    scores = caption_metrics(refs, [[r] for r in refs])
    assert scores["BLEU-4"] == pytest.approx(1.0, abs=1e-6)
    assert scores["CIDEr"] == pytest.approx(10.0, abs=1e-6)  # cosine 1 for every n, times 10
    # punctuation and case do not count
    assert caption_metrics(["A large red circle, and a small blue square.", refs[1]], [[r] for r in refs]) == scores


def test_captions_sharing_no_ngram_score_zero():
    scores = caption_metrics(["green triangle above", "yellow squares below"],
                             [["a red circle"], ["there is one cross"]])
    assert scores["BLEU-4"] == pytest.approx(0.0, abs=1e-6)
    assert scores["CIDEr"] == 0.0


def test_bleu4_by_hand_with_brevity_penalty():
    candidates = ["a red circle is above", "there are two green squares"]
    references = [["a red circle is above a blue square"], ["there are three green squares"]]
    # clipped n-gram matches summed over both images (image 1 matches all; image 2: 4/5 words,
    # "there are" and "green squares" of 4 bigrams, no trigram, no 4-gram):
    #   1-grams 9/10, 2-grams 6/8, 3-grams 3/6, 4-grams 2/4
    # candidate length 10, reference length 8 + 5 = 13 -> brevity penalty exp(1 - 13/10)
    precisions = (9 / 10) * (6 / 8) * (3 / 6) * (2 / 4)
    expected = precisions ** (1 / 4) * math.exp(1 - 13 / 10)
    assert caption_metrics(candidates, references)["BLEU-4"] == pytest.approx(expected, rel=1e-6)
    # a second reference of 6 words is closer to the candidate's 5: reference length 6 + 5 = 11
    references[0].append("the red circle is high up")
    expected = precisions ** (1 / 4) * math.exp(1 - 11 / 10)
    assert caption_metrics(candidates, references)["BLEU-4"] == pytest.approx(expected, rel=1e-6)


def test_cider_averages_images_and_idf_comes_from_the_evaluated_references():
    # image 1 exact (10), image 2 shares nothing (0): CIDEr is the mean over images, 5
    scores = caption_metrics(["a red circle is above", "blue"], [["a red circle is above"], ["two green squares"]])
    assert scores["CIDEr"] == pytest.approx(5.0, abs=1e-6)
    # the same exact caption, but every image has the same reference: each n-gram is in the references
    # of every image, so its IDF log(2) - log(2) is 0 and CIDEr is 0, although BLEU-4 is 1
    scores = caption_metrics(["a red circle is above"] * 2, [["a red circle is above"]] * 2)
    assert scores["BLEU-4"] == pytest.approx(1.0, abs=1e-6)
    assert scores["CIDEr"] == 0.0


@pytest.mark.parametrize("candidates, references, message", [
    ([], [], "at least 2 images"),
    (["a red circle"], [["a red circle"]], "at least 2 images, got 1: CIDEr's IDF"),
    (["a", "b"], [["a"]], "one entry per image, got 2 candidates and 1 reference lists"),
    (["a red circle", ""], [["a"], ["b"]], r"candidates\[1\] is empty"),
    (["a red circle", "b"], [["a"], ["b", " . "]], r"references\[1\]\[1\] is empty"),
    (["a red circle", "b"], [["a"], []], r"references\[1\] must be a non-empty list"),
    (["a red circle", "b"], [["a"], "b"], r"references\[1\] must be a non-empty list"),
    (["a red circle", 3], [["a"], ["b"]], r"candidates\[1\] must be a str"),
    ("a red circle", [["a"]], "candidates must be a list"),
])
def test_caption_metrics_errors(candidates, references, message):
    with pytest.raises(ValueError, match=message):
        caption_metrics(candidates, references)


# --------------------------------------------------------------------------- caption truth

def _obj(shape, color, size, box):
    return SceneObject(shape, color, size, box, 0)


@pytest.fixture
def scene():
    """Left to right: a large red circle (top left), a small blue square (bottom middle), a small green
    circle (top right). The circle is left of, above and bigger than the square; the square is left of
    and below the green circle."""
    objects = (
        _obj("circle", "red", "large", (0.05, 0.05, 0.35, 0.35)),
        _obj("square", "blue", "small", (0.45, 0.60, 0.65, 0.80)),
        _obj("circle", "green", "small", (0.75, 0.10, 0.95, 0.30)),
    )
    return Scene(WorldConfig(), "train", 0, objects)


@pytest.mark.parametrize("caption", [
    "a large red circle, a small blue square and a small green circle",
    "a red circle, a blue square and a green circle",
    "a large red circle, a blue square and a green circle",  # sizes for some objects only
    "A red circle , a blue square and a green circle.",  # case, spacing and a full stop
    "a red circle is left of a blue square",
    "a red circle is above a blue square",
    "a red circle is bigger than a blue square",
    "a large red circle is left of a small green circle",
    "a blue square is below a green circle",
    "a green circle is right of a blue square",
    "there are two circles and three objects",
    "there is one square and three objects",
    "there are zero triangles and three objects",
])
def test_true_captions(scene, caption):
    assert caption_is_true(caption, scene)


@pytest.mark.parametrize("caption", [
    "a red circle, a blue square and a yellow circle",  # wrong colour
    "a red circle, a green square and a green circle",  # wrong colour
    "a small red circle, a blue square and a green circle",  # wrong size
    "a red circle, a blue triangle and a green circle",  # wrong shape
    "a blue square, a red circle and a green circle",  # wrong order
    "a red circle and a blue square",  # an object missing
    "a red circle, a blue square, a green circle and a red square",  # an extra object
    "there is a red circle",  # a list states the whole scene
    "a red circle is right of a blue square",  # wrong relation
    "a blue square is above a red circle",  # wrong relation
    "a red circle is left of a red circle",  # an object is not related to itself
    "a red circle is left of a yellow square",  # no such object
    "a green circle is smaller than a blue square",  # same size
    "there are three circles and three objects",  # wrong count
    "there are two circles and four objects",  # wrong total
    "there is two circles and three objects",  # not the grammar: agreement
    "an red circle is left of a blue square",  # not the grammar: article
    "a red circle, and a blue square and a green circle",  # not the grammar: list punctuation
    "a circle is left of a square",  # not the grammar: colour missing
    "purple elephants dance in the rain",  # garbage
    "",
])
def test_false_captions(scene, caption):
    assert not caption_is_true(caption, scene)


def test_parse_caption_claims():
    assert parse_caption("there is an orange cross") == ListClaim((ObjectPhrase("orange", "cross"),), there_is=True)
    assert parse_caption("a small red circle and a blue diamond") == ListClaim(
        (ObjectPhrase("red", "circle", "small"), ObjectPhrase("blue", "diamond")))
    assert parse_caption("a red circle is smaller than a large cyan square") == RelationClaim(
        ObjectPhrase("red", "circle"), "smaller than", ObjectPhrase("cyan", "square", "large"))
    assert parse_caption("there is one cross and one object") == CountClaim("cross", 1, 1)
    assert parse_caption("a red circle is next to a blue square") is None


def _scenes(config, n=300):
    return ShapeWorld(config).scenes(range(n))


_CONFIGS = {
    "default": WorldConfig(),
    "every colour and shape": WorldConfig(colors=tuple(PALETTE), shapes=SHAPE_NAMES, max_objects=4),
}


@pytest.mark.parametrize("name", list(_CONFIGS))
def test_every_generated_caption_is_true_of_its_scene(name):
    scenes = _scenes(_CONFIGS[name])
    captions = [(c, s) for s in scenes for c in (*s.captions, s.description)]
    assert len(captions) == 300 * 6
    false = [(c, s.index) for c, s in captions if not caption_is_true(c, s)]
    assert not false, false[:5]


@pytest.mark.parametrize("name", list(_CONFIGS))
def test_captions_of_other_scenes_are_mostly_false(name):
    scenes = _scenes(_CONFIGS[name])
    others = scenes[1:] + scenes[:1]
    pairs = [(c, other) for s, other in zip(scenes, others) for c in (*s.captions, s.description)]
    rate = caption_truth_rate([c for c, _ in pairs], [o for _, o in pairs])
    # measured 3.4% (default) and 0.9%: almost all of it count captions ("there is one circle and two
    # objects" is true of many scenes); a list or relation caption is true of another scene well under 2%
    assert rate < 0.08, rate
    specific = [(c, o) for c, o in pairs if not isinstance(parse_caption(c), CountClaim)]
    assert caption_truth_rate([c for c, _ in specific], [o for _, o in specific]) < 0.02


def test_noisy_captions_are_caught():
    """With caption_noise, the replaced captions (from other scenes) are mostly false, the others true."""
    scenes = _scenes(WorldConfig(caption_noise=0.3), n=200)
    clean = [(c, s) for s in scenes for c, noisy in zip(s.captions, s.caption_is_noisy) if not noisy]
    noisy = [(c, s) for s in scenes for c, noisy in zip(s.captions, s.caption_is_noisy) if noisy]
    assert len(noisy) > 200
    assert caption_truth_rate(*zip(*clean)) == 1.0
    assert caption_truth_rate(*zip(*noisy)) < 0.1


def test_caption_truth_errors(scene):
    with pytest.raises(ValueError, match="caption must be a str"):
        caption_is_true(3, scene)
    with pytest.raises(ValueError, match="scene must be a ShapeWorld Scene"):
        caption_is_true("a red circle", "scene")
    with pytest.raises(ValueError, match="captions and scenes must have the same length, got 2 and 1"):
        caption_truth_rate(["a", "b"], [scene])
    with pytest.raises(ValueError, match="captions is empty"):
        caption_truth_rate([], [])
    with pytest.raises(ValueError, match="captions must be a list"):
        caption_truth_rate("a red circle", [scene])


# --------------------------------------------------------------------------- baseline


def test_most_frequent_caption():
    assert most_frequent_caption(["b", "a", "A.", "b", "a"]) == "a"  # "a" x3 counted case-free
    assert most_frequent_caption(["x y", "z", "z", "x y"]) == "x y"  # a tie goes to the first seen
    with pytest.raises(ValueError, match="train_captions must be a non-empty list"):
        most_frequent_caption([])
    with pytest.raises(ValueError, match=r"train_captions\[1\] must be a str"):
        most_frequent_caption(["a", None])
    with pytest.raises(ValueError, match="no caption with a word"):
        most_frequent_caption([".", ""])


def test_most_frequent_caption_baseline_on_shapeworld():
    """The language prior alone: one training caption for every val image. It must score well above
    zero (its words are common) and well below a caption that describes the image."""
    world = ShapeWorld()
    train = [c for s in world.scenes(range(2000)) for c in s.captions]
    baseline = most_frequent_caption(train)
    val = world.scenes(range(500), "val")
    references = [list(s.captions) for s in val]
    prior = caption_metrics([baseline] * len(val), references)
    described = caption_metrics([s.description for s in val], references)
    shuffled = caption_metrics([s.description for s in val[1:] + val[:1]], references)
    # measured: prior BLEU-4 0.30, CIDEr 0.92; description 0.80, 3.79; another scene's description 0.15, 0.62
    assert 0.05 < prior["BLEU-4"] < 0.5 * described["BLEU-4"]
    assert 0.1 < prior["CIDEr"] < 0.5 * described["CIDEr"]
    assert shuffled["BLEU-4"] < described["BLEU-4"] and shuffled["CIDEr"] < described["CIDEr"]
    assert caption_truth_rate([baseline] * len(val), val) < 0.3  # measured 0.10
    assert caption_truth_rate([s.description for s in val], val) == 1.0
