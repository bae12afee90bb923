"""Check functions for notebook 15 (LXMERT).

Each ``check_*`` calls the learner's function on fixed inputs, compares it with the library and
prints ``PASS ...``, or raises :class:`~course_lib.checks.verdict.ExerciseError` saying what to fix.

- ``check_matching_negatives(fn)``: LXMERT's matching negatives: the swapped rows get another row's
  *sentence* (the image stays) and lose their answer (-1);
- ``check_feature_loss(fn)``: LXMERT's masked-feature regression loss, smooth-L1 averaged over the
  feature, on the chosen objects, summed, divided by the number of real objects, times the normaliser.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from course_lib.checks.verdict import call_learner, check_callable, expect, expect_close, passed


def check_matching_negatives(fn) -> None:
    """Grade ``fn(input_ids (B, L), attention_mask (B, L), answers (B,), swapped (B,) bool, source (B,) long)``
    -> ``(input_ids, attention_mask, answers)``: row ``i`` with ``swapped[i]`` takes the sentence (ids and
    mask) of row ``source[i]`` and the answer -1; the other rows are unchanged. The inputs stay unchanged."""
    check = "matching_negatives"
    check_callable("fn", fn, check)
    ids = torch.tensor([[2, 11, 12, 3, 0], [2, 13, 3, 0, 0], [2, 14, 15, 16, 3], [2, 17, 3, 0, 0]])
    mask = (ids != 0).long()
    answers = torch.tensor([-1, 4, 7, 1])
    swapped = torch.tensor([False, True, True, False])
    source = torch.tensor([1, 2, 3, 0])  # source[i] means nothing where swapped[i] is False
    inputs = [t.clone() for t in (ids, mask, answers, swapped, source)]
    ours = call_learner(check, fn, *inputs)
    expect(isinstance(ours, (tuple, list)) and len(ours) == 3, check,
           f"return a tuple (input_ids, attention_mask, answers); got {type(ours).__name__}")
    new_ids, new_mask, new_answers = ours
    want_ids = torch.where(swapped[:, None], ids[source], ids)
    want_mask = torch.where(swapped[:, None], mask[source], mask)
    want_answers = answers.masked_fill(swapped, -1)
    expect(torch.equal(inputs[0], ids) and torch.equal(inputs[2], answers), check,
           "your function changed its inputs in place; build new tensors (torch.where, indexing, .clone())")
    if isinstance(new_ids, torch.Tensor) and new_ids.shape == ids.shape and torch.equal(new_ids, ids[source]):
        expect(False, check, "every row took row source[i]'s sentence; only the swapped rows should (source[i] "
                             "means nothing where swapped[i] is False)")
    expect_close(new_ids, want_ids, check, "input_ids", atol=0, rtol=0)
    if isinstance(new_mask, torch.Tensor) and torch.equal(new_mask, mask) and not torch.equal(mask, want_mask):
        expect(False, check, "the attention mask must travel with its sentence: a swapped row's mask is row "
                             "source[i]'s, or the model reads padding as words")
    expect_close(new_mask, want_mask, check, "attention_mask", atol=0, rtol=0)
    if isinstance(new_answers, torch.Tensor) and torch.equal(new_answers, answers[source]):
        expect(False, check, "the answers followed the questions: a question moved to another image is no longer "
                             "about it, so its answer is -1 (the QA loss skips it)")
    expect_close(new_answers, want_answers, check, "answers", atol=0, rtol=0)
    passed(check, "swapped rows read another row's sentence about their own image, and have nothing to answer")


def check_feature_loss(fn) -> None:
    """Grade ``fn(predicted (B, R, F), target (B, R, F), chosen (B, R) bool, region_mask (B, R) bool,
    normalizer float)`` -> scalar: ``sum over chosen objects of mean_F smooth_l1(predicted, target)``,
    divided by the number of real objects, times ``normalizer`` (LXMERT's ``(loss * mask).mean() / 0.15``)."""
    check = "feature_loss"
    check_callable("fn", fn, check)
    g = torch.Generator().manual_seed(0)
    predicted = torch.randn(3, 4, 6, generator=g) * 2
    target = torch.randn(3, 4, 6, generator=g)
    mask = torch.tensor([[True, True, True, True], [True, True, False, False], [True, True, True, False]])
    chosen = torch.tensor([[True, False, False, True], [False, True, False, False], [False, False, True, False]])
    per_object = F.smooth_l1_loss(predicted, target, reduction="none").mean(-1)
    want = (per_object * chosen).sum() / mask.sum() * 6.67
    ours = call_learner(check, fn, predicted.clone(), target.clone(), chosen.clone(), mask.clone(), 6.67)
    expect(isinstance(ours, torch.Tensor) and ours.dim() == 0, check,
           f"return a scalar tensor, got {type(ours).__name__} {tuple(getattr(ours, 'shape', ()))}")
    mse = (((predicted - target) ** 2).mean(-1) * chosen).sum() / mask.sum() * 6.67
    if torch.allclose(ours, mse, atol=1e-5):
        expect(False, check, "this is the squared error; LXMERT's feature loss is smooth-L1 (Huber with beta 1: "
                             "quadratic below 1, linear above), F.smooth_l1_loss")
    by_chosen = (per_object * chosen).sum() / chosen.sum() * 6.67
    if torch.allclose(ours, by_chosen, atol=1e-5):
        expect(False, check, "you divided by the number of chosen objects; LXMERT divides by all real objects (its "
                             ".mean() over every object) and multiplies by 1 / 0.15 instead")
    expect_close(ours, want, check, "the feature loss", atol=1e-5)
    passed(check, "smooth-L1 on the hidden objects, averaged like the original code")
