"""Grounding by region scoring (course_lib.evaluate.fused) and ShapeWorld's referring phrases as region
batches (ShapeWorldRegions.phrases): targets by IoU, chance, acc@0.5 of the chosen box, bad input."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from course_lib.data import ShapeWorld, WorldConfig
from course_lib.data.datasets import build_tokenizer
from course_lib.data.regions import ShapeWorldRegions
from course_lib.evaluate import GroundingFineTuner, grounding_chance, grounding_targets, region_ious
from course_lib.models.registry import build_model


@pytest.fixture(scope="module")
def source():
    world = ShapeWorld(WorldConfig(min_objects=1, max_objects=3))
    tokenizer = build_tokenizer(world, vocab_size=128, num_scenes=200)
    return ShapeWorldRegions(world, tokenizer, context_length=20, max_regions=5)


@pytest.fixture(scope="module")
def phrases(source):
    return source.phrases(range(40), min_objects=2)


def toy_batch():
    boxes = torch.tensor([[[0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]],
                          [[0.0, 0.0, 0.2, 0.2], [0.6, 0.6, 0.8, 0.8], [0.0, 0.0, 1.0, 1.0]]])
    mask = torch.tensor([[True, True, False], [True, True, True]])
    gt = torch.tensor([[0.5, 0.5, 1.0, 0.95], [0.3, 0.3, 0.5, 0.5]])
    return {"region_boxes": boxes, "region_mask": mask, "gt_box": gt}


def test_targets_and_chance_by_hand():
    batch = toy_batch()
    ious = region_ious(batch)
    torch.testing.assert_close(ious[0], torch.tensor([0.0, 0.9, 0.0]))  # padding scores 0
    assert grounding_targets(batch).tolist() == [1, -1]  # row 1: no detected box reaches IoU 0.5
    assert grounding_chance(batch) == pytest.approx((1 / 2 + 0 / 3) / 2)
    assert grounding_chance(batch, threshold=0.03) == pytest.approx((1 / 2 + 1 / 3) / 2)  # the whole image: 0.04


class Oracle(nn.Module):
    """A stand-in fused model whose region outputs hold each region's IoU with the true box."""

    def __init__(self):
        super().__init__()
        self.config = SimpleNamespace(dim=2)
        self.unused = nn.Linear(1, 1)

    def encode(self, batch):
        ious = region_ious(batch)
        return SimpleNamespace(image=torch.stack([ious, torch.zeros_like(ious)], -1), pooled=None)


def test_accuracy_scores_the_chosen_box_against_the_true_box(phrases):
    tuner = GroundingFineTuner(Oracle())
    with torch.no_grad():
        tuner.head.weight.copy_(torch.tensor([[1.0, 0.0]]))
        tuner.head.bias.zero_()
    hits = (region_ious(phrases).max(1).values >= 0.5).float().mean().item()
    assert tuner.accuracy(phrases) == pytest.approx(hits)  # it picks the best box: a hit when the detector found it
    assert hits > 0.8
    with torch.no_grad():
        tuner.head.weight.neg_()  # the worst real box (padding is never chosen)
    chosen = tuner.logits(phrases).argmax(1)
    assert phrases["region_mask"][torch.arange(len(chosen)), chosen].all()
    assert tuner.accuracy(phrases) < grounding_chance(phrases)
    loss = tuner(phrases)["loss"]
    assert torch.isfinite(loss)
    loss.backward()
    assert tuner.head.weight.grad is not None


def test_phrases_are_one_row_per_object(source, phrases):
    scenes = source.world.scenes(range(40), "train")
    kept = [s for s in scenes if len(s.objects) >= 2]
    assert len(phrases["input_ids"]) == sum(len(s.objects) for s in kept)
    assert set(phrases["index"].tolist()) == {s.index for s in kept}
    first = kept[0]
    torch.testing.assert_close(phrases["gt_box"][: len(first.objects)], torch.from_numpy(first.normalized_boxes))
    text = source.tokenizer.decode(phrases["input_ids"][0], skip_special_tokens=True)
    assert text.replace(" ", "") == first.region_phrases[0].replace(" ", "")
    assert phrases["object"][: len(first.objects)].tolist() == list(range(len(first.objects)))
    with pytest.raises(ValueError, match="min_objects"):
        source.phrases(range(4), min_objects=0)


def test_a_region_model_fine_tunes_and_b2t2_is_refused(phrases):
    torch.manual_seed(0)
    tuner = GroundingFineTuner(build_model("uniter", "cpu-tiny", vocab_size=128, context_length=20))
    out = tuner(phrases)
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and 0.0 <= tuner.accuracy(phrases) <= 1.0
    with pytest.raises(ValueError, match="no region outputs"):
        GroundingFineTuner(build_model("b2t2", "cpu-tiny", vocab_size=128, context_length=20)).logits(phrases)


def test_bad_grounding_input_names_the_key():
    batch = toy_batch()
    with pytest.raises(ValueError, match=r"missing \['gt_box'\]"):
        grounding_chance({k: v for k, v in batch.items() if k != "gt_box"})
    with pytest.raises(ValueError, match="gt_box"):
        grounding_targets({**batch, "gt_box": torch.tensor([[0.5, 0.5, 0.1, 0.95], [0.0, 0.0, 1.0, 1.0]])})
    with pytest.raises(ValueError, match="has no region"):
        grounding_chance({**batch, "region_mask": torch.zeros_like(batch["region_mask"])})
    with pytest.raises(ValueError, match="threshold"):
        grounding_chance(batch, threshold=0.0)
    with pytest.raises(ValueError, match="no encode"):
        GroundingFineTuner(nn.Linear(2, 2))


def test_plan_alignment_counts_the_heaviest_real_region():
    from course_lib.evaluate import plan_alignment

    region_mask = torch.tensor([[True, True, False], [True, False, False]])
    token_box = torch.tensor([[-1, 1, 0], [0, -1, -1]])
    plans = torch.zeros(2, 3, 3)
    plans[0, 1] = torch.tensor([0.1, 0.2, 0.9])  # heaviest on padding: the real choice is region 1, a hit
    plans[0, 2] = torch.tensor([0.1, 0.3, 0.0])  # region 1, a miss
    plans[1, 0] = torch.tensor([0.5, 0.0, 0.0])
    assert plan_alignment(plans, token_box, region_mask) == pytest.approx((2 / 3, (0.5 + 0.5 + 1.0) / 3))
    assert plan_alignment(plans, token_box, region_mask, min_regions=2) == pytest.approx((0.5, 0.5))
    with pytest.raises(ValueError, match="padding region"):
        plan_alignment(plans, torch.tensor([[-1, 2, 0], [0, -1, -1]]), region_mask)
    with pytest.raises(ValueError, match="names no region"):
        plan_alignment(plans, torch.full((2, 3), -1), region_mask)
