"""Pretraining objectives against hand-computed values and naive loops.

Tolerances: hand-computed values and naive loops agree to 1e-6 (float32, same operations in a
different order) unless a test says otherwise.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from course_lib.objectives.boxes import box_cxcywh_to_xyxy, box_regression_loss, generalized_box_iou
from course_lib.objectives.distill import (FeatureQueue, distillation_targets, momentum_copy,
                                           momentum_update, soft_cross_entropy)
from course_lib.objectives.fom import frame_order_loss, shuffle_frames
from course_lib.objectives.itc import ContrastiveLoss, contrastive_loss
from course_lib.objectives.itm import itm_loss, sample_hard_negatives, sample_random_negatives
from course_lib.objectives.lm import causal_lm_loss, prefix_lm_mask
from course_lib.objectives.mlm import MLMHead, masked_lm_loss
from course_lib.objectives.mvm import (feature_regression_loss, mask_regions, region_class_loss_hard,
                                       region_class_loss_kl)
from course_lib.objectives.scene_graph import scene_graph_loss, scene_graph_mask

TOL = dict(atol=1e-6, rtol=1e-6)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def nll(logits_row, target):
    """-log softmax(logits_row)[target], the naive way."""
    return -(logits_row[target] - logits_row.exp().sum().log())


def assert_finite_grad(tensor):
    assert tensor.grad is not None and torch.isfinite(tensor.grad).all()


# ---------------------------------------------------------------- MLM
def test_masked_lm_loss_hand_and_naive():
    labels = torch.tensor([[-100, 2, -100], [1, -100, -100]])
    assert masked_lm_loss(torch.zeros(2, 3, 4), labels).item() == pytest.approx(math.log(4))
    logits = torch.randn(2, 3, 4, generator=gen(), requires_grad=True)
    loss = masked_lm_loss(logits, labels)
    naive = (nll(logits[0, 1], 2) + nll(logits[1, 0], 1)) / 2
    torch.testing.assert_close(loss, naive, **TOL)
    loss.backward()
    assert_finite_grad(logits)
    assert (logits.grad[labels == -100] == 0).all()          # unmasked positions get no gradient


def test_mlm_head_ties_weights_and_rejects_bad_input():
    embedding = nn.Embedding(11, 8)
    head = MLMHead(8, 11, tie_to=embedding)
    assert head.decoder.weight is embedding.weight
    out = head(torch.randn(2, 3, 8, generator=gen()))
    assert out.shape == (2, 3, 11)
    masked_lm_loss(out, torch.tensor([[1, -100, -100], [-100, -100, 10]])).backward()
    assert_finite_grad(embedding.weight)
    with pytest.raises(ValueError, match="tie_to"):
        MLMHead(8, 12, tie_to=embedding)
    with pytest.raises(ValueError, match="labels"):
        masked_lm_loss(torch.zeros(1, 2, 4), torch.full((1, 2), -100))   # nothing masked: no NaN
    with pytest.raises(ValueError, match="labels"):
        masked_lm_loss(torch.zeros(1, 2, 4), torch.tensor([[4, -100]]))  # id outside the vocab


# ---------------------------------------------------------------- causal LM / PrefixLM
def test_causal_lm_loss_naive_loop_with_prompt_padding_and_smoothing():
    logits = torch.randn(2, 5, 6, generator=gen(1), requires_grad=True)
    ids = torch.tensor([[0, 3, 4, 5, 2], [0, 1, 2, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    prompt = torch.tensor([2, 1])
    eps = 0.1
    terms = []
    for b in range(2):
        for t in range(1, 5):                                  # target position t, from logits t - 1
            if mask[b, t] and t >= prompt[b]:
                logp = torch.log_softmax(logits[b, t - 1], -1)
                terms.append(-(1 - eps) * logp[ids[b, t]] - eps * logp.mean())
    naive = torch.stack(terms).mean()                          # 3 + 2 = 5 target tokens
    loss = causal_lm_loss(logits, ids, mask, prompt, label_smoothing=eps)
    torch.testing.assert_close(loss, naive, **TOL)
    loss.backward()
    assert_finite_grad(logits)
    with pytest.raises(ValueError, match="prompt_lengths"):
        causal_lm_loss(logits, ids, mask, torch.tensor([6, 1]))
    with pytest.raises(ValueError, match="target"):
        causal_lm_loss(logits, ids, mask, prompt_lengths=5)    # everything is prompt: no NaN
    with pytest.raises(ValueError, match="label_smoothing"):
        causal_lm_loss(logits, ids, mask, label_smoothing=1.0)


def test_prefix_lm_mask_hand():
    mask = prefix_lm_mask(torch.tensor([2, 0]), 4)
    expected_prefix_2 = torch.tensor([[1, 1, 0, 0],
                                      [1, 1, 0, 0],
                                      [1, 1, 1, 0],
                                      [1, 1, 1, 1]]).bool()
    assert torch.equal(mask[0], expected_prefix_2)
    assert torch.equal(mask[1], torch.ones(4, 4).tril().bool())   # no prefix: plain causal
    with pytest.raises(ValueError, match="prefix_lengths"):
        prefix_lm_mask(torch.tensor([5]), 4)


# ---------------------------------------------------------------- MVM
def test_mask_regions_rules():
    feats = torch.randn(200, 10, 3, generator=gen(2)) + 5
    region_mask = torch.arange(10)[None] < torch.randint(1, 11, (200, 1), generator=gen(3))
    masked_feats, masked = mask_regions(feats, region_mask, 0.15, generator=gen(4))
    assert masked.any(1).all()                                 # at least one per image
    assert not (masked & ~region_mask).any()                   # never a padding region
    assert (masked_feats[masked] == 0).all() and torch.equal(masked_feats[~masked], feats[~masked])
    rate = masked.sum() / region_mask.sum()
    assert 0.12 < rate < 0.25                                  # 0.15 plus the at-least-one fallback
    again = mask_regions(feats, region_mask, 0.15, generator=gen(4))[1]
    assert torch.equal(masked, again)                          # seeded
    with pytest.raises(ValueError, match="region_mask"):
        mask_regions(feats[:1], torch.zeros(1, 10, dtype=torch.bool))


def test_feature_regression_and_region_classification():
    masked = torch.tensor([[True, False], [False, True]])
    pred, target = torch.zeros(2, 2, 3), torch.ones(2, 2, 3)
    target[0, 1] = 100.0                                       # unmasked: ignored
    assert feature_regression_loss(pred, target, masked).item() == 1.0
    # Detector distributions over 3 classes + "no object" (last column, the largest in row 0).
    probs = torch.tensor([[[0.1, 0.3, 0.0, 0.6], [0.25] * 4],
                          [[0.25] * 4, [0.7, 0.1, 0.1, 0.1]]])
    logits = torch.randn(2, 2, 4, generator=gen(5), requires_grad=True)
    hard = region_class_loss_hard(logits, probs, masked)
    torch.testing.assert_close(hard, (nll(logits[0, 0], 1) + nll(logits[1, 1], 0)) / 2, **TOL)
    kl = region_class_loss_kl(logits, probs, masked)
    naive_kl = 0.0
    for b, n in [(0, 0), (1, 1)]:
        logq = torch.log_softmax(logits[b, n], -1)
        naive_kl += sum(p * (math.log(p) - logq[c]) for c, p in enumerate(probs[b, n].tolist()) if p > 0)
    torch.testing.assert_close(kl, naive_kl / 2, **TOL)
    (hard + kl).backward()
    assert_finite_grad(logits)                                 # finite despite the zero probability
    assert region_class_loss_kl(probs.log().clamp(min=-50), probs.clamp(min=0), masked).item() == \
        pytest.approx(0.0, abs=1e-6)                           # q = p -> KL 0
    with pytest.raises(ValueError, match="detector_probs"):
        region_class_loss_kl(logits, probs * 2, masked)
    with pytest.raises(ValueError, match="masked_positions"):
        feature_regression_loss(pred, target, torch.zeros(2, 2, dtype=torch.bool))


# ---------------------------------------------------------------- ITM
def test_random_negatives_never_self():
    idx = sample_random_negatives(5, generator=gen(6))
    assert (idx != torch.arange(5)).all() and ((idx >= 0) & (idx < 5)).all()
    draws = torch.stack([sample_random_negatives(3, gen(s)) for s in range(60)])
    assert set(draws[:, 0].tolist()) == {1, 2}                 # every other index is possible
    with pytest.raises(ValueError, match="batch_size"):
        sample_random_negatives(1)


def test_hard_negatives_follow_itc_softmax_and_skip_positives():
    # Logits sim[i, j] = v[(j - i) % n] + r_i: every row has the same weights over the offsets
    # (j - i) % n, so one call gives n draws of the offset distribution. The row constants r_i
    # leave a row softmax unchanged but not a column one, and i2t and t2i get different offset
    # profiles v, so sampling along the wrong dim or from the wrong matrix shows.
    n, calls = 100, 100
    g = gen(7)
    offsets = (torch.arange(n)[None] - torch.arange(n)[:, None]) % n

    def logits(head):
        v = torch.full((n,), -5.0)
        v[:len(head)] = torch.tensor(head)                    # offset 0 is the positive
        return v[offsets] + 3 * torch.randn(n, 1, generator=g), v

    sim_i2t, v_i2t = logits([5.0, 1.0, 0.0])
    sim_t2i, v_t2i = logits([5.0, -1.0, 2.0, 0.5])
    draws = [sample_hard_negatives(sim_i2t, sim_t2i, g) for _ in range(calls)]
    for column, v in ((0, v_t2i), (1, v_i2t)):                 # images for texts: t2i; texts for images: i2t
        drawn = torch.cat([(d[column] - torch.arange(n)) % n for d in draws])      # 10,000 offsets
        counts = torch.bincount(drawn, minlength=n).double()
        w = torch.softmax(v.double(), 0) + 1e-4                # BLIP's eps; the positive gets 0
        w[0] = 0
        expected = len(drawn) * w / w.sum()                    # >= 19 per offset
        assert counts[0] == 0                                  # never the positive
        # Pearson's chi-square over the 99 negative offsets (98 degrees of freedom). Bound: the
        # 1 - 1e-4 quantile, 158.8. Measured: 83 and 74; without the eps 986 and 1950; softmax
        # over the wrong dim 4849; logits halved (a temperature slip) 14256.
        chi_square = ((counts[1:] - expected[1:]) ** 2 / expected[1:]).sum()
        assert chi_square < 158.8
    sim = torch.tensor([[5.0, 1.0, 0.0], [0.0, 5.0, 2.0], [3.0, 0.0, 5.0]])
    same = torch.tensor([[1, 1, 0], [1, 1, 0], [0, 0, 1]]).bool()   # captions 0 and 1: same image
    neg_img, neg_txt = sample_hard_negatives(sim, sim, gen(8), same_image=same)
    assert neg_img[:2].tolist() == [2, 2] and neg_txt[:2].tolist() == [2, 2]
    with pytest.raises(ValueError, match="same_image"):
        sample_hard_negatives(sim, sim, same_image=torch.ones(3, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="sim_t2i"):
        sample_hard_negatives(sim, sim[:2])


def test_itm_loss_hand():
    assert itm_loss(torch.zeros(3, 2), torch.tensor([1, 0, 1])).item() == pytest.approx(math.log(2))
    logits = torch.tensor([[2.0, 0.0]])
    assert itm_loss(logits, torch.tensor([0])).item() == pytest.approx(math.log(1 + math.exp(-2)))
    with pytest.raises(ValueError, match="labels"):
        itm_loss(torch.zeros(2, 2), torch.tensor([0, 2]))


# ---------------------------------------------------------------- ITC
def test_contrastive_loss_hand_and_naive():
    s = 3.0
    eye = torch.eye(2)                                         # logits [[s, 0], [0, s]]
    assert contrastive_loss(eye, eye, s).item() == pytest.approx(math.log(1 + math.exp(-s)))
    img = torch.randn(4, 5, generator=gen(9), requires_grad=True)
    txt = torch.randn(4, 5, generator=gen(10))
    loss = contrastive_loss(img, txt, 10.0)
    logits = 10 * F.normalize(img, dim=1) @ F.normalize(txt, dim=1).T
    naive = sum(nll(logits[i], i) + nll(logits[:, i], i) for i in range(4)) / 8
    torch.testing.assert_close(loss, naive, **TOL)
    loss.backward()
    assert_finite_grad(img)
    with pytest.raises(ValueError, match="logit_scale"):
        contrastive_loss(img, txt, 0.0)
    with pytest.raises(ValueError, match="text_feats"):
        contrastive_loss(img, txt[:3], 10.0)                   # mismatched batch sizes


def test_contrastive_module_temperature_and_clamp():
    criterion = ContrastiveLoss()
    assert criterion.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    img, txt = torch.randn(4, 5, generator=gen(11)), torch.randn(4, 5, generator=gen(12))
    torch.testing.assert_close(criterion(img, txt), contrastive_loss(img, txt, 1 / 0.07), **TOL)
    criterion(img, txt).backward()
    assert_finite_grad(criterion.logit_scale)
    with torch.no_grad():
        criterion.logit_scale.fill_(6.0)
    criterion.clamp_()
    assert criterion.logit_scale.item() == pytest.approx(math.log(100))   # CLIP's cap
    frozen = ContrastiveLoss(init_temperature=0.5, learnable=False)
    assert len(list(frozen.parameters())) == 0 and frozen.temperature == pytest.approx(0.5)
    for bad in (0.0, -0.1):
        with pytest.raises(ValueError, match="init_temperature"):
            ContrastiveLoss(init_temperature=bad)


# ---------------------------------------------------------------- boxes
def test_giou_known_boxes():
    a = torch.tensor([[0, 0, 2, 2], [0, 0, 1, 1], [0, 0, 2, 2], [0, 0, 4, 4]], dtype=torch.float)
    b = torch.tensor([[0, 0, 2, 2], [1, 1, 2, 2], [1, 1, 3, 3], [1, 1, 2, 2]], dtype=torch.float)
    # identical: 1; corner-touching: 0 - (4 - 2) / 4; overlap 1: 1/7 - (9 - 7)/9; contained: 1/16
    expected = torch.tensor([1.0, -0.5, 1 / 7 - 2 / 9, 1 / 16])
    torch.testing.assert_close(generalized_box_iou(a, b), expected, **TOL)
    assert torch.equal(box_cxcywh_to_xyxy(torch.tensor([0.5, 0.5, 0.2, 0.4])),
                       torch.tensor([0.4, 0.3, 0.6, 0.7]))


def test_giou_zero_area_boxes_are_finite():
    a = torch.tensor([[0.5, 0.5, 0.5, 0.5], [0, 0, 1, 1], [0.2, 0.2, 0.2, 0.2]], requires_grad=True)
    b = torch.tensor([[0.5, 0.5, 0.5, 0.5], [2, 2, 2, 2], [0, 0, 1, 1]])
    giou = generalized_box_iou(a, b)
    # identical points: 0 (documented, instead of 0/0); point outside: 0 - (4 - 1)/4; point inside: 0
    torch.testing.assert_close(giou, torch.tensor([0.0, -0.75, 0.0]), **TOL)
    giou.sum().backward()
    assert_finite_grad(a)


def test_box_regression_loss_hand():
    pred = torch.tensor([[0.5, 0.5, 0.2, 0.2]], requires_grad=True)
    target = torch.tensor([[0.5, 0.5, 0.4, 0.4]])
    out = box_regression_loss(pred, target)
    # L1 = 0.2 + 0.2; GIoU = 0.04 / 0.16 = 0.25 (pred inside target) -> 0.75
    torch.testing.assert_close(torch.stack([out["l1"], out["giou"], out["loss"]]),
                               torch.tensor([0.4, 0.75, 1.15]), **TOL)
    out["loss"].backward()
    assert_finite_grad(pred)
    with pytest.raises(ValueError, match="box 1"):
        generalized_box_iou(torch.tensor([[0, 0, 1, 1], [1, 0, 0, 1.0]]), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="box_format"):
        box_regression_loss(pred, target, box_format="xywh")


# ---------------------------------------------------------------- FOM
def test_shuffle_frames_and_frame_order_loss():
    perm, targets = shuffle_frames(8, 50, 0.15, generator=gen(13))
    assert torch.equal(perm.sort(1).values, torch.arange(8).expand(50, 8))   # each row a permutation
    chosen = targets != -100
    assert (chosen.sum(1) >= 2).all()
    assert torch.equal(targets[chosen], perm[chosen])
    assert torch.equal(perm[~chosen], torch.arange(8).expand(50, 8)[~chosen])
    assert (perm != torch.arange(8)).any(1).all()                            # something moved
    logits = torch.randn(2, 3, 3, generator=gen(14), requires_grad=True)
    tgt = torch.tensor([[2, -100, 0], [-100, -100, -100]])
    loss = frame_order_loss(logits, tgt)
    torch.testing.assert_close(loss, (nll(logits[0, 0], 2) + nll(logits[0, 2], 0)) / 2, **TOL)
    loss.backward()
    assert_finite_grad(logits)
    with pytest.raises(ValueError, match="logits"):
        frame_order_loss(torch.zeros(2, 3, 4), tgt)
    with pytest.raises(ValueError, match="num_frames"):
        shuffle_frames(1, 4)


# ---------------------------------------------------------------- scene graph
def test_scene_graph_mask_and_loss():
    ids = torch.tensor([[5, 6, 7, 8, 9], [5, 6, 7, 0, 0]])
    roles = torch.tensor([[0, 2, 1, 3, 1], [0, 0, 0, 0, 0]])   # "a red circle left-of square"
    masked, labels = scene_graph_mask(ids, roles, "object", gen(15), mask_token_id=1, prob=1.0)
    assert masked[0].tolist() == [5, 6, 1, 8, 1] and labels[0].tolist() == [-100, -100, 7, -100, 9]
    assert torch.equal(masked[1], ids[1]) and (labels[1] == -100).all()       # no object word
    _, one = scene_graph_mask(ids, roles, "object", gen(16), mask_token_id=1, prob=1e-6)
    assert (one[0] != -100).sum() == 1                                         # at least one
    logits = torch.randn(2, 5, 10, generator=gen(17), requires_grad=True)
    labels = torch.tensor([[-100, 6, 7, -100, 9], [-100] * 5])
    losses = scene_graph_loss(logits, labels, roles)
    torch.testing.assert_close(losses["object"], (nll(logits[0, 2], 7) + nll(logits[0, 4], 9)) / 2, **TOL)
    torch.testing.assert_close(losses["attribute"], nll(logits[0, 1], 6), **TOL)
    assert losses["relation"].item() == 0.0                                    # none masked
    torch.testing.assert_close(losses["total"], (2 * losses["object"] + losses["attribute"]) / 3, **TOL)
    sum(losses.values()).backward()
    assert_finite_grad(logits)
    with pytest.raises(ValueError, match="role"):
        scene_graph_mask(ids, roles, "colour", mask_token_id=1)
    with pytest.raises(ValueError, match="word_roles"):
        scene_graph_loss(logits, labels, roles + 3)


# ---------------------------------------------------------------- distillation
def test_momentum_update_and_queue():
    model = nn.Linear(2, 1)
    momentum = momentum_copy(model)
    assert not any(p.requires_grad for p in momentum.parameters())
    with torch.no_grad():
        model.weight.fill_(1.0)
        momentum.weight.fill_(0.0)
    momentum_update(model, momentum, m=0.9)
    torch.testing.assert_close(momentum.weight, torch.full((1, 2), 0.1))    # 0.9 * 0 + 0.1 * 1
    with pytest.raises(ValueError, match="momentum_model"):
        momentum_update(model, nn.Linear(3, 1))
    queue = FeatureQueue(dim=2, size=5, generator=gen(18))
    torch.testing.assert_close(queue.queue.norm(dim=1), torch.ones(5))
    queue.dequeue_and_enqueue(torch.full((3, 2), 1.0))
    queue.dequeue_and_enqueue(torch.full((3, 2), 2.0))                       # wraps around
    assert queue.queue[:, 0].tolist() == [2.0, 1.0, 1.0, 2.0, 2.0] and queue.ptr.item() == 1
    with pytest.raises(ValueError, match="features"):
        queue.dequeue_and_enqueue(torch.zeros(6, 2))


def test_distillation_targets_and_soft_cross_entropy():
    sim = torch.tensor([[2.0, 0.0, 1.0], [0.0, 1.0, 3.0]])    # 2 queries, 2 batch keys + 1 queued
    torch.testing.assert_close(distillation_targets(sim, 0.0), torch.eye(2, 3))
    mixed = distillation_targets(sim, 0.4)
    torch.testing.assert_close(mixed, 0.4 * torch.softmax(sim, 1) + 0.6 * torch.eye(2, 3), **TOL)
    logits = torch.randn(2, 3, generator=gen(19), requires_grad=True)
    torch.testing.assert_close(soft_cross_entropy(logits, torch.eye(2, 3)),
                               F.cross_entropy(logits, torch.tensor([0, 1])), **TOL)
    loss = soft_cross_entropy(logits, mixed)
    naive = -(mixed * torch.log_softmax(logits, 1)).sum() / 2
    torch.testing.assert_close(loss, naive, **TOL)
    loss.backward()
    assert_finite_grad(logits)
    with pytest.raises(ValueError, match="alpha"):
        distillation_targets(sim, 1.5)
    with pytest.raises(ValueError, match="soft_targets"):
        soft_cross_entropy(logits, torch.ones(2, 3))
