"""Tests of course_lib.checks.objectives: a correct exercise passes, each typical mistake fails
with a message that names it. The correct answers are course_lib's own losses or a plain
re-derivation; the wrong ones are the mistakes learners make.

Tolerances are those of the check functions (atol 1e-5 on values and gradients)."""

import pytest
import torch
import torch.nn.functional as F

from course_lib.checks.objectives import check_hard_negative_weights, check_info_nce, check_mrc_kl
from course_lib.checks.verdict import ExerciseError
from course_lib.objectives.itc import contrastive_loss
from course_lib.objectives.mvm import region_class_loss_kl


# --------------------------------------------------------------------------- InfoNCE


def info_nce(image_feats, text_feats, logit_scale):
    img, txt = F.normalize(image_feats, dim=-1), F.normalize(text_feats, dim=-1)
    logits = logit_scale * img @ txt.T
    labels = torch.arange(len(img))
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def test_info_nce_accepts_the_library_and_a_rewrite(capsys):
    check_info_nce(contrastive_loss)
    check_info_nce(info_nce)
    out = capsys.readouterr().out
    assert out.count("PASS info_nce") == 2


def _one_direction(i, t, s):
    logits = s * F.normalize(i, dim=-1) @ F.normalize(t, dim=-1).T
    return F.cross_entropy(logits, torch.arange(len(i)))


@pytest.mark.parametrize("wrong, message", [
    (_one_direction, "only the image->text direction"),
    (lambda i, t, s: _one_direction(t, i, s), "only the text->image direction"),
    (lambda i, t, s: 2 * info_nce(i, t, s), "sum of the two directions"),
    (lambda i, t, s: (F.cross_entropy(s * i @ t.T, torch.arange(len(i)))
                      + F.cross_entropy(s * t @ i.T, torch.arange(len(i)))) / 2, "no L2 normalisation"),
    (lambda i, t, s: info_nce(i, t, 1.0), "not multiplied by logit_scale"),
    (lambda i, t, s: info_nce(i, t, 1.0 / s), "logits divided by logit_scale"),
    (lambda i, t, s: info_nce(i, t, s).detach(), "no gradient"),
    (lambda i, t, s: info_nce(i, t, s).reshape(1).repeat(2), "one number"),
    (lambda i, t, s: (_ for _ in ()).throw(NotImplementedError), "NotImplementedError"),
])
def test_info_nce_names_the_mistake(wrong, message):
    with pytest.raises(ExerciseError, match=message):
        check_info_nce(wrong)


def test_info_nce_rejects_a_non_callable():
    with pytest.raises(ValueError, match="fn"):
        check_info_nce("info_nce")


# --------------------------------------------------------------------------- hard-negative weights


def hard_negative_weights(sim):
    weights = F.softmax(sim, dim=1) * (1 - torch.eye(len(sim)))
    return weights / weights.sum(1, keepdim=True)


def test_hard_negative_weights_accepts_a_correct_rewrite(capsys):
    check_hard_negative_weights(hard_negative_weights)
    assert capsys.readouterr().out.startswith("PASS hard_negative_weights")


def test_hard_negative_weights_accepts_masking_before_the_softmax(capsys):
    def masked_softmax(sim):
        return F.softmax(sim.masked_fill(torch.eye(len(sim), dtype=torch.bool), float("-inf")), dim=1)

    check_hard_negative_weights(masked_softmax)
    assert "PASS" in capsys.readouterr().out


def _in_place(sim):
    sim.fill_diagonal_(float("-inf"))
    return F.softmax(sim, dim=1)


@pytest.mark.parametrize("wrong, message", [
    (lambda s: F.softmax(s, dim=1), "diagonal must be exactly 0"),
    (lambda s: F.softmax(s, dim=1) * (1 - torch.eye(len(s))), "each row must sum to 1"),
    (lambda s: hard_negative_weights(s.T).T, "softmax over each column"),
    (lambda s: hard_negative_weights(torch.zeros_like(s)), "uniform over the other items"),
    (lambda s: hard_negative_weights(2 * s), "the weights differs"),
    (lambda s: hard_negative_weights(s)[:, :-1], "shape"),
    (lambda s: torch.exp(s) / torch.exp(s).sum(1, keepdim=True) * 0 + float("nan"), "NaN"),
    (_in_place, "modified in place"),
])
def test_hard_negative_weights_names_the_mistake(wrong, message):
    with pytest.raises(ExerciseError, match=message):
        check_hard_negative_weights(wrong)


# --------------------------------------------------------------------------- MRC-kl


def mrc_kl(logits, detector_probs, masked_positions):
    log_q = F.log_softmax(logits[masked_positions], dim=-1)
    p = detector_probs[masked_positions]
    return (torch.xlogy(p, p) - p * log_q).sum(-1).mean()


def test_mrc_kl_accepts_the_library_and_a_rewrite(capsys):
    check_mrc_kl(region_class_loss_kl)
    check_mrc_kl(mrc_kl)
    assert capsys.readouterr().out.count("PASS mrc_kl") == 2


def _naive_log(logits, p, m):
    log_q = F.log_softmax(logits[m], dim=-1)
    return (p[m] * (torch.log(p[m]) - log_q)).sum(-1).mean()


def _per_region(logits, p, m):
    return F.kl_div(F.log_softmax(logits, -1), p, reduction="none").sum(-1)


@pytest.mark.parametrize("wrong, message", [
    (_naive_log, "0 \\* log 0 must count as 0"),
    (lambda lg, p, m: F.kl_div(F.log_softmax(lg[m], -1), p[m], reduction="none").mean(), "UNITER's kl_div"),
    (lambda lg, p, m: _per_region(lg, p, m)[m].sum(), "summed over the masked regions"),
    (lambda lg, p, m: _per_region(lg, p, m).mean(), "masked or not"),
    (lambda lg, p, m: (F.softmax(lg[m], -1) * (F.log_softmax(lg[m], -1) - torch.log(p[m].clamp_min(1e-12))))
     .sum(-1).mean(), "reverse KL"),
    (lambda lg, p, m: -(p[m] * F.log_softmax(lg[m], -1)).sum(-1).mean(), "cross-entropy"),
    (lambda lg, p, m: F.kl_div(F.softmax(lg[m], -1), p[m], reduction="batchmean"), "log-probabilities"),
    (lambda lg, p, m: mrc_kl(lg, p, m).detach(), "no gradient"),
    (lambda lg, p, m: mrc_kl(lg, p, m).item(), "scalar tensor"),
])
def test_mrc_kl_names_the_mistake(wrong, message):
    with pytest.raises(ExerciseError, match=message):
        check_mrc_kl(wrong)
