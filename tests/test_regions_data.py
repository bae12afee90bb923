"""ShapeWorld as region batches (course_lib.data.regions) and the evaluation of fused models on them
(course_lib.evaluate.fused)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from course_lib.data import DetectorConfig, ShapeWorld, WorldConfig
from course_lib.data.datasets import build_tokenizer
from course_lib.data.language import answer_vocabulary
from course_lib.data.regions import (FEATURE_DIM, ShapeWorldRegions, blank_boxes, pooled_pixels, shape_word_spans,
                                     whole_image_features)
from course_lib.evaluate import VQAFineTuner, fused_retrieval, match_matrix, pair_batch


@pytest.fixture(scope="module")
def world():
    return ShapeWorld(WorldConfig(min_objects=1, max_objects=3))


@pytest.fixture(scope="module")
def tokenizer(world):
    return build_tokenizer(world, vocab_size=128, num_scenes=200)


def test_region_batch_follows_the_contract(world, tokenizer):
    source = ShapeWorldRegions(world, tokenizer, context_length=24, max_regions=5)
    batch = source(list(range(16)))
    assert batch["region_feats"].shape == (16, 5, FEATURE_DIM)
    assert batch["region_probs"].shape == (16, 5, world.num_classes + 1)
    assert batch["region_mask"].any(1).all()
    real = batch["region_mask"]
    assert (batch["region_feats"][~real] == 0).all() and (batch["region_labels"][~real] == -1).all()
    torch.testing.assert_close(batch["region_probs"].sum(-1), torch.ones(16, 5))
    boxes = batch["region_boxes"][real]
    assert (boxes >= 0).all() and (boxes <= 1).all() and (boxes[:, 2:] > boxes[:, :2]).all()
    again = source(list(range(16)))
    assert all(torch.equal(batch[k], again[k]) for k in batch)  # a pure function of the indices


def test_features_are_centred_on_the_background(world):
    images = torch.full((1, 3, 32, 32), 0.0)
    images[:] = torch.tensor([25, 25, 30])[None, :, None, None] / 255
    assert pooled_pixels(images, [torch.tensor([[2.0, 2.0, 20.0, 20.0]])]).abs().max() < 1e-5
    assert whole_image_features(images).shape == (1, FEATURE_DIM)


def test_a_scene_with_no_detection_gets_the_whole_image(world, tokenizer):
    blind = DetectorConfig(miss_rate=1.0, false_positives=0.0)
    batch = ShapeWorldRegions(world, tokenizer, 24, detector=blind)(list(range(4)))
    assert batch["region_mask"].sum(1).eq(1).all()
    torch.testing.assert_close(batch["region_boxes"][:, 0], torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 4))
    assert (batch["region_labels"] == -1).all() and (batch["token_box"] == -1).all()


def test_shape_words_point_to_the_region_detected_from_their_object(world, tokenizer):
    source = ShapeWorldRegions(world, tokenizer, 24, caption="description")
    perfect = ShapeWorldRegions(world, tokenizer, 24, caption="description",
                                detector=DetectorConfig(miss_rate=0.0, false_positives=0.0, box_noise=0.0))
    batch = perfect(list(range(20)))
    for b in range(20):
        scene = world.scene(b)
        tokens = tokenizer.convert_ids_to_tokens(batch["input_ids"][b])
        named = [(tokens[t], int(r)) for t, r in enumerate(batch["token_box"][b]) if r >= 0]
        assert named == [(o.shape, i) for i, o in enumerate(scene.objects)]  # detections keep the object order
    assert source(list(range(4)))["token_box"].shape == (4, 24)


def test_shape_word_spans_for_each_template(world):
    scene = next(s for s in world.scenes(range(50)) if len(s.objects) == 2 and s.relations)
    a, b = scene.objects
    listed = f"a {a.color} {a.shape} and a {b.color} {b.shape}"
    assert [listed[s:e] for _, s, e in shape_word_spans(scene, listed)] == [a.shape, b.shape]
    i, rel, j = scene.relations[0]
    oi, oj = scene.objects[i], scene.objects[j]
    relation = f"a {oi.color} {oi.shape} is {rel} a {oj.color} {oj.shape}"
    assert [(o, relation[s:e]) for o, s, e in shape_word_spans(scene, relation)] == [(i, oi.shape), (j, oj.shape)]
    assert shape_word_spans(scene, "there are two circles and two objects") == []


def test_questions_repeat_their_scene_regions(world, tokenizer):
    source = ShapeWorldRegions(world, tokenizer, 24)
    qa = source.questions(range(10))
    n = sum(len(s.questions) for s in world.scenes(range(10)))
    assert qa["input_ids"].shape == (n, 24) and qa["answers"].shape == (n,)
    assert qa["answers"].max() < len(answer_vocabulary(world.config))
    scenes = source(list(range(10)))
    first = qa["index"] == 3
    assert torch.equal(qa["region_feats"][first][0], scenes["region_feats"][3])


def test_blank_boxes_zeroes_only_the_chosen_boxes():
    images = torch.ones(1, 3, 8, 8)
    boxes = torch.tensor([[[0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0]]])
    out = blank_boxes(images, boxes, torch.tensor([[True, False]]))
    assert (out[0, :, :4, :4] == 0).all() and (out[0, :, 4:, 4:] == 1).all() and (images == 1).all()


class DiagonalScorer(nn.Module):
    """match_scores = minus |image index - caption index|: a perfect retrieval model."""

    def match_scores(self, batch):
        return -(batch["image_id"] - batch["input_ids"][:, 0]).abs().float()


def test_fused_retrieval_scores_every_image_with_every_caption():
    n = 7
    batch = {"input_ids": torch.arange(n)[:, None], "attention_mask": torch.ones(n, 1), "image_id": torch.arange(n),
             "region_mask": torch.ones(n, 2, dtype=torch.bool)}
    scores = match_matrix(DiagonalScorer(), batch, chunk=5)
    assert scores.shape == (n, n) and (scores.argmax(1) == torch.arange(n)).all()
    assert fused_retrieval(DiagonalScorer(), batch, (1,))["mean_recall"] == 1.0
    with pytest.raises(ValueError, match="match_scores"):
        match_matrix(nn.Linear(1, 1), batch)


def test_pair_batch_drops_box_references_the_image_lacks():
    batch = {"input_ids": torch.zeros(2, 3, dtype=torch.long), "token_box": torch.tensor([[-1, 2, 0], [-1, 0, -1]]),
             "region_mask": torch.tensor([[True, True, True], [True, False, False]])}
    pairs = pair_batch(batch, torch.tensor([1, 0]), torch.tensor([0, 1]))
    assert pairs["token_box"].tolist() == [[-1, -1, 0], [-1, 0, -1]]


def test_vqa_finetuner_needs_answers(world, tokenizer):
    from course_lib.models.registry import build_model

    model = build_model("visualbert", "cpu-tiny", vocab_size=128, context_length=24)
    qa = ShapeWorldRegions(world, tokenizer, 24).questions(range(6))
    tuner = VQAFineTuner(model, len(answer_vocabulary(world.config)))
    assert torch.isfinite(tuner(qa)["loss"])
    assert 0.0 <= tuner.accuracy(qa) <= 1.0
    with pytest.raises(ValueError, match="answers"):
        tuner({k: v for k, v in qa.items() if k != "answers"})
