"""Check functions for notebook 14 (ViLBERT and 12-in-1).

Each ``check_*`` calls the learner's function on fixed inputs, compares it with the library and
prints ``PASS ...``, or raises :class:`~course_lib.checks.verdict.ExerciseError` saying what to fix.

- ``check_overlap_mask(fn)``: 12-in-1's rule, the real regions overlapping a hidden region by IoU >
  threshold (and the hidden ones), vs ``models.vilbert.overlapping_regions``;
- ``check_global_image_feature(fn)``: ViLBERT's global image token, the mean feature of the visible
  regions, vs ``ViLBERT.embed``.
"""

from __future__ import annotations

import torch

from course_lib.checks.verdict import call_learner, check_callable, expect, expect_close, passed

# Two images, four region slots. Image 0: region 1 is a twin of the hidden region 0 (IoU 0.8), region 2
# overlaps it by IoU 0.35 (< 0.4; 0.5 with region 1), region 3 is padding lying on region 0. Image 1: the
# hidden region 1 lies apart; regions 0 and 2 overlap each other (IoU 0.97), neither hidden.
BOXES = torch.tensor([[[0.1, 0.1, 0.5, 0.5], [0.1, 0.1, 0.42, 0.5], [0.1, 0.1, 0.24, 0.5], [0.1, 0.1, 0.5, 0.5]],
                      [[0.0, 0.0, 0.3, 0.3], [0.6, 0.6, 0.9, 0.9], [0.0, 0.0, 0.3, 0.29], [0.0, 0.0, 0.0, 0.0]]])
MASK = torch.tensor([[True, True, True, False], [True, True, True, False]])
HIDDEN = torch.tensor([[True, False, False, False], [False, True, False, False]])


def check_overlap_mask(fn) -> None:
    """Grade ``fn(boxes (B, R, 4), region_mask (B, R), hidden (B, R), threshold)`` -> ``(B, R)`` bool."""
    from course_lib.models.vilbert import overlapping_regions

    check = "overlap_mask"
    check_callable("fn", fn, check)
    want = overlapping_regions(BOXES, MASK, HIDDEN, 0.4)
    ours = call_learner(check, fn, BOXES.clone(), MASK.clone(), HIDDEN.clone(), 0.4)
    expect(isinstance(ours, torch.Tensor), check, f"return a (B, R) bool tensor, got {type(ours).__name__}")
    expect(tuple(ours.shape) == tuple(want.shape), check, f"the mask should have shape {tuple(want.shape)} (B, R), "
                                                          f"got {tuple(ours.shape)}")
    ours = ours.bool()
    if not ours[HIDDEN].all():
        expect(False, check, "a hidden region is missing from the mask: the hidden regions themselves are masked too")
    if ours[0, 3]:
        expect(False, check, "a padding region (region_mask False) is in the mask: keep real regions only")
    if ours[0, 2]:
        expect(False, check, "region 2 of image 0 overlaps the hidden region by IoU 0.35 only, and overlaps region 1 "
                             "(not hidden): it should stay; compare with the hidden regions, at IoU > threshold")
    if ours[1, 0] or ours[1, 2]:
        expect(False, check, "image 1's regions 0 and 2 overlap each other, but neither is hidden: only overlaps with a "
                             "*hidden* region count")
    if not ours[0, 1]:
        expect(False, check, "region 1 of image 0 (IoU 0.8 with the hidden region 0) is missing: compare each region "
                             "with every hidden region of its own image")
    expect_close(ours.long(), want.long(), check, "the overlap mask", atol=0, rtol=0)
    bigger = call_learner(check, fn, BOXES.clone(), MASK.clone(), HIDDEN.clone(), 0.85)
    expect_close(torch.as_tensor(bigger).bool().long(), overlapping_regions(BOXES, MASK, HIDDEN, 0.85).long(), check,
                 "the overlap mask at threshold 0.85", atol=0, rtol=0)
    passed(check, "the hidden regions and every real region of the same image that overlaps one by IoU > threshold")


def check_global_image_feature(fn) -> None:
    """Grade ``fn(feats (B, R, F), region_mask (B, R), zeroed (B, R))`` -> ``(B, F)``: the mean feature of
    each image's real regions that are not zeroed (zeros when none)."""
    check = "global_image_feature"
    check_callable("fn", fn, check)
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(3, 4, 5, generator=g)
    mask = torch.tensor([[True, True, True, False], [True, True, False, False], [True, False, False, False]])
    zeroed = torch.tensor([[True, False, False, False], [False, False, False, False], [True, False, False, False]])
    visible = (mask & ~zeroed).float()[..., None]
    want = (feats * visible).sum(1) / visible.sum(1).clamp(min=1)
    ours = call_learner(check, fn, feats.clone(), mask.clone(), zeroed.clone())
    expect(isinstance(ours, torch.Tensor), check, f"return a (B, F) tensor, got {type(ours).__name__}")
    expect(tuple(ours.shape) == (3, 5), check, f"the global feature should have shape (3, 5) (B, F), got "
                                               f"{tuple(ours.shape)}")
    expect(bool(torch.isfinite(ours).all()), check, "image 2 has no visible region and got NaN or inf: divide by the "
                                                    "number of visible regions clamped to at least 1 (its mean is 0)")
    if torch.allclose(ours[0], feats[0, :3].mean(0), atol=1e-5):
        expect(False, check, "image 0's zeroed region 0 was averaged in: a masked region must not reach the global "
                             "token, it would give its feature away")
    if torch.allclose(ours[0], feats[0, 1:].mean(0), atol=1e-5):
        expect(False, check, "image 0's padding region 3 was averaged in: use region_mask")
    expect_close(ours, want, check, "the global image feature")
    passed(check, "the mean of the real, visible regions' features; a masked region gives nothing away")
