"""Tests of course_lib.checks.clip: a correct exercise passes, the starter is "not yet", and each typical
mistake fails with a message that names it."""

import math

import pytest
import torch
import torch.nn.functional as F

from course_lib.checks.clip import check_binding_score, check_clamp_logit_scale, check_prompt_ensemble
from course_lib.checks.verdict import ExerciseError


def prompt_ensemble(prompt_emb):
    return F.normalize(F.normalize(prompt_emb, dim=-1).mean(1), dim=-1)


def clamp_logit_scale(logit_scale, max_scale):
    with torch.no_grad():
        logit_scale.clamp_(0, math.log(max_scale))
    return logit_scale


def binding_score(image_emb, true_emb, swapped_emb):
    return ((image_emb * true_emb).sum(1) > (image_emb * swapped_emb).sum(1)).float().mean().item()


def starter(*args):
    raise NotImplementedError("your code")


def test_solutions_pass(capsys):
    check_prompt_ensemble(prompt_ensemble)
    check_clamp_logit_scale(clamp_logit_scale)
    check_binding_score(binding_score)
    out = capsys.readouterr().out
    assert all(f"PASS {name}" in out for name in ("prompt_ensemble", "clamp_logit_scale", "binding_score"))


@pytest.mark.parametrize("check", [check_prompt_ensemble, check_clamp_logit_scale, check_binding_score])
def test_starters_are_not_yet(check):
    with pytest.raises(ExerciseError, match="NotImplementedError"):
        check(starter)


@pytest.mark.parametrize("wrong, message", [
    (lambda e: F.normalize(e.mean(1), dim=-1), "averaged the raw prompt embeddings"),
    (lambda e: F.normalize(e, dim=-1).mean(1), "norm 1"),
    (lambda e: F.normalize(F.normalize(e, dim=-1).mean(2), dim=-1), r"shape \(C, E\)"),
])
def test_prompt_ensemble_mistakes(wrong, message):
    with pytest.raises(ExerciseError, match=message):
        check_prompt_ensemble(wrong)


def _clamp_to_scale(p, m):
    with torch.no_grad():
        p.clamp_(0, m)
    return p


def _new_tensor(p, m):
    return p.detach().clamp(0, math.log(m))


def _upper_only(p, m):
    with torch.no_grad():
        p.clamp_(max=math.log(m))
    return p


@pytest.mark.parametrize("wrong, message", [
    (_clamp_to_scale, r"the scale.s \*log\*"),
    (_new_tensor, "in place"),
    (_upper_only, r"\[0, ln max_scale\]"),
])
def test_clamp_mistakes(wrong, message):
    with pytest.raises(ExerciseError, match=message):
        check_clamp_logit_scale(wrong)


@pytest.mark.parametrize("wrong, message", [
    (lambda i, t, s: ((i * t).sum(1) >= (i * s).sum(1)).float().mean().item(), "tie"),
    (lambda i, t, s: (i @ t.T > i @ s.T).float().mean().item(), "row by row"),
    (lambda i, t, s: ((i * t).sum(1) - (i * s).sum(1)).mean().item(), "expected 0.25"),
])
def test_binding_mistakes(wrong, message):
    with pytest.raises(ExerciseError, match=message):
        check_binding_score(wrong)
