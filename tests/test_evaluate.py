"""Retrieval, classification, box and VQA metrics (course_lib.evaluate)."""

import pytest
import torch

from course_lib.evaluate import (
    accuracy,
    box_iou,
    chance_recall_at_k,
    grounding_accuracy,
    positives_matrix,
    recall_at_k,
    vqa_soft_accuracy,
)

torch.set_num_threads(1)


def naive_recall(similarity, positive, ks):
    """Slow reference: sort each query's candidates, hit if any positive is in the first K."""
    out = {}
    for direction, sim, pos in (("i2t", similarity.tolist(), positive.tolist()),
                                ("t2i", similarity.T.tolist(), positive.T.tolist())):
        hits = {k: 0 for k in ks}
        queries = 0
        for scores, flags in zip(sim, pos):
            if not any(flags):
                continue
            queries += 1
            order = sorted(range(len(scores)), key=lambda j: -scores[j])
            for k in ks:
                hits[k] += any(flags[j] for j in order[:k])
        for k in ks:
            out[f"{direction}_R@{k}"] = hits[k] / queries
    out["mean_recall"] = sum(out.values()) / len(out)
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_recall_matches_naive_loop_with_bool_positives(seed):
    g = torch.Generator().manual_seed(seed)
    similarity = torch.randn(13, 29, generator=g)  # continuous: no ties
    positive = torch.rand(13, 29, generator=g) < 0.1
    positive[3] = False  # an image with no caption: not an i2t query
    ks = (1, 3, 5, 40)
    result = recall_at_k(similarity, positive, ks)
    expected = naive_recall(similarity, positive, ks)
    assert result.keys() == expected.keys()
    for key in expected:  # fractions of small integers: exact up to float32 rounding (1e-6)
        assert result[key] == pytest.approx(expected[key], abs=1e-6), key


def test_recall_matches_naive_loop_with_index_positives():
    g = torch.Generator().manual_seed(5)
    text_to_image = torch.randint(0, 11, (40,), generator=g)  # several captions per image
    similarity = torch.randn(12, 40, generator=g)  # image 11 is a distractor with no caption
    result = recall_at_k(similarity, text_to_image, ks=(1, 5, 10))
    positive = torch.zeros(12, 40, dtype=torch.bool)
    positive[text_to_image, torch.arange(40)] = True
    expected = naive_recall(similarity, positive, (1, 5, 10))
    for key in expected:
        assert result[key] == pytest.approx(expected[key], abs=1e-6), key
    assert torch.equal(positives_matrix(text_to_image, 12), positive)


def test_recall_hand_worked_3x3():
    similarity = torch.tensor([[0.9, 0.1, 0.3],
                               [0.8, 0.2, 0.1],
                               [0.1, 0.5, 0.7]])
    # image i <-> text i. i2t top-1: img0 -> t0 (hit), img1 -> t0 (miss; t1 is 2nd), img2 -> t2 (hit).
    # t2i top-1: t0 -> img0 (0.9, hit), t1 -> img2 (0.5, miss; img1 is 2nd of 3), t2 -> img2 (hit).
    result = recall_at_k(similarity, torch.arange(3), ks=(1, 2))
    assert result["i2t_R@1"] == pytest.approx(2 / 3)
    assert result["t2i_R@1"] == pytest.approx(2 / 3)
    assert result["i2t_R@2"] == 1.0 and result["t2i_R@2"] == 1.0
    assert result["mean_recall"] == pytest.approx((2 / 3 + 2 / 3 + 1 + 1) / 4)


def test_ties_count_against_the_model():
    result = recall_at_k(torch.zeros(4, 4), torch.arange(4), ks=(1, 4))
    assert result["i2t_R@1"] == 0.0 and result["t2i_R@1"] == 0.0  # a constant model is not perfect
    assert result["i2t_R@4"] == 1.0


def test_chance_level_matches_monte_carlo():
    g = torch.Generator().manual_seed(0)
    positive = torch.rand(20, 30, generator=g) < 0.08
    positive[torch.arange(20), torch.arange(20)] = True  # every image has at least one caption
    exact = chance_recall_at_k(positive, k=(1, 5))
    trials = [recall_at_k(torch.rand(20, 30, generator=g), positive, ks=(1, 5)) for _ in range(300)]
    for key in exact:
        estimate = sum(t[key] for t in trials) / len(trials)
        assert estimate == pytest.approx(exact[key], abs=0.02), key  # 300 trials x 20-30 queries: loose
    # Hand value: one caption per image among n = 10 images, R@1 = 1/10 and R@5 = 5/10 both ways.
    single = chance_recall_at_k(torch.arange(10), k=(1, 5))
    assert single["i2t_R@1"] == pytest.approx(0.1) and single["t2i_R@5"] == pytest.approx(0.5)


def test_recall_bad_inputs():
    sim = torch.randn(3, 4)
    with pytest.raises(ValueError, match="similarity"):
        recall_at_k(torch.randn(3), torch.arange(3))
    with pytest.raises(ValueError, match="positives"):
        recall_at_k(sim, torch.ones(3, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="positives"):
        recall_at_k(sim, torch.tensor([0, 1, 2, 3]))  # image index 3 out of range for 3 images
    with pytest.raises(ValueError, match="positives"):
        recall_at_k(sim, torch.zeros(3, 4))  # float, neither format
    with pytest.raises(ValueError, match="ks"):
        recall_at_k(sim, torch.arange(4) % 3, ks=(0,))
    with pytest.raises(ValueError, match="similarity"):
        recall_at_k(torch.full((3, 4), float("nan")), torch.arange(4) % 3)
    with pytest.raises(ValueError, match="no positive"):
        recall_at_k(sim, torch.zeros(3, 4, dtype=torch.bool))


def test_accuracy_and_vqa_soft_accuracy_hand_values():
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [1.0, 0.0, 5.0], [4.0, 0.0, 0.0]])
    assert accuracy(logits, torch.tensor([0, 1, 0, 0])) == pytest.approx(0.75)
    # arg-max answers 0, 1, 2, 0; their soft scores 1.0, 0.3, 0.0, 0.6 -> mean 0.475
    soft = torch.tensor([[1.0, 0.0, 0.0], [0.9, 0.3, 0.0], [0.3, 0.0, 0.0], [0.6, 0.3, 0.0]])
    assert vqa_soft_accuracy(logits, soft) == pytest.approx(0.475)
    with pytest.raises(ValueError, match="labels"):
        accuracy(logits, torch.tensor([0, 1, 3, 0]))
    with pytest.raises(ValueError, match="labels"):
        accuracy(logits, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="soft_targets"):
        vqa_soft_accuracy(logits, soft * 2)


def test_box_iou_hand_values():
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0], [1.0, 1.0, 3.0, 3.0]])
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0], [0.0, 0.0, 2.0, 2.0], [5.0, 5.0, 6.0, 6.0], [0.0, 0.0, 1.0, 1.0]])
    # [0,0,2,2] vs [1,1,3,3]: inter 1, union 4 + 4 - 1 = 7 -> 1/7; vs itself 1; disjoint 0;
    # vs [0,0,1,1] (inside it): 1/4. [1,1,3,3] vs [0,0,1,1]: touching corner only -> 0.
    expected = torch.tensor([[1 / 7, 1.0, 0.0, 0.25], [1.0, 1 / 7, 0.0, 0.0]])
    torch.testing.assert_close(box_iou(a, b), expected, atol=1e-7, rtol=0)
    degenerate = torch.tensor([[1.0, 1.0, 1.0, 1.0]])
    assert box_iou(degenerate, degenerate).item() == 0.0  # empty union -> 0, not NaN


def test_grounding_accuracy_threshold_is_inclusive():
    gt = torch.tensor([[0.0, 0.0, 4.0, 4.0]] * 3)
    # IoU 0.5 exactly (half the box), 1/7 (shifted), 1.0
    pred = torch.tensor([[0.0, 0.0, 4.0, 2.0], [2.0, 2.0, 6.0, 6.0], [0.0, 0.0, 4.0, 4.0]])
    assert grounding_accuracy(pred, gt) == pytest.approx(2 / 3)
    assert grounding_accuracy(pred, gt, threshold=0.9) == pytest.approx(1 / 3)


def test_box_bad_inputs_name_the_argument():
    good = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    with pytest.raises(ValueError, match=r"b must have shape .*box 0 is \(5.0, 2.0, 1.0, 8.0\)"):
        box_iou(good, torch.tensor([[5.0, 2.0, 1.0, 8.0]]))
    with pytest.raises(ValueError, match="a must have shape"):
        box_iou(torch.zeros(2, 3), good)
    with pytest.raises(ValueError, match="gt"):
        grounding_accuracy(good, torch.zeros(2, 4))
    with pytest.raises(ValueError, match="threshold"):
        grounding_accuracy(good, good, threshold=0.0)
