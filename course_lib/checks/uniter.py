"""Check functions for notebook 12 (UNITER).

Each ``check_*`` calls the learner's function on fixed inputs, compares it with the library and
prints ``PASS ...``, or raises :class:`~course_lib.checks.verdict.ExerciseError` saying what to fix.

- ``check_uniter_geometry(fn)``: UNITER's 7-d region geometry from normalised boxes, vs
  ``features.region.box_geometry(..., "7d")``;
- ``check_plan_alignment(fn)``: the share of object words whose heaviest transport mass lands on their
  own region, and its chance level, vs ``evaluate.plan_alignment``.
"""

from __future__ import annotations

import torch

from course_lib.checks.verdict import call_learner, check_callable, expect, expect_close, passed
from course_lib.evaluate.fused import plan_alignment
from course_lib.features.region import box_geometry


def check_uniter_geometry(fn) -> None:
    """Grade ``fn(boxes (N, 4)) -> (N, 7)``: boxes are x1, y1, x2, y2 already normalised to [0, 1]; the
    result is (x1, y1, x2, y2, w, h, w * h). Exact up to 1e-6."""
    check = "uniter_geometry"
    check_callable("fn", fn, check)
    g = torch.Generator().manual_seed(0)
    corners = torch.rand(6, 2, 2, generator=g).sort(dim=1).values  # (N, 2 points, xy), sorted: x1 <= x2
    boxes = torch.stack([corners[:, 0, 0], corners[:, 0, 1], corners[:, 1, 0], corners[:, 1, 1]], dim=1)
    boxes[0] = torch.tensor([0.0, 0.0, 1.0, 1.0])  # the whole image
    boxes[1] = torch.tensor([0.1, 0.2, 0.4, 0.3])  # wide and flat: w != h
    ours = call_learner(check, fn, boxes.clone())
    want = box_geometry(boxes, 1.0, "7d")
    expect(isinstance(ours, torch.Tensor), check, f"return a tensor (N, 7), got {type(ours).__name__}")
    expect(ours.dim() == 2 and ours.shape[0] == len(boxes), check,
           f"return one row per box, shape ({len(boxes)}, 7); got {tuple(ours.shape)}")
    if ours.shape[1] == 5:
        expect(False, check, "5 numbers per box is ViLBERT's geometry (corners + area); UNITER's has 7: the "
                             "corners, the width, the height and the area")
    expect(ours.shape[1] == 7, check, f"UNITER's geometry has 7 numbers per box, got {ours.shape[1]}")
    if torch.allclose(ours[1, 4:6], torch.tensor([0.1, 0.3]), atol=1e-6):
        expect(False, check, "box (0.1, 0.2, 0.4, 0.3) got w = 0.1, h = 0.3: w = x2 - x1 and h = y2 - y1")
    expect_close(ours[:, :4], want[:, :4], check, "the corners (columns 0-3, the box as given)", atol=1e-6, rtol=0)
    expect_close(ours[:, 4:6], want[:, 4:6], check, "the width and height (columns 4-5: x2 - x1, y2 - y1)",
                 atol=1e-6, rtol=0)
    expect_close(ours, want, check, "the area (column 6: w * h)", atol=1e-6, rtol=0)
    passed(check, "corners, width, height and area of every box, as UNITER's 7-d geometry")


def _alignment_case(seed: int):
    g = torch.Generator().manual_seed(seed)
    plans = torch.rand(4, 6, 3, generator=g)
    region_mask = torch.tensor([[True, True, True], [True, True, False], [True, False, False], [True, True, True]])
    plans = plans * region_mask[:, None, :]
    token_box = torch.full((4, 6), -1)
    token_box[0, 1], token_box[0, 4], token_box[1, 2], token_box[2, 3], token_box[3, 1], token_box[3, 5] = 2, 0, 1, 0, 1, 2
    plans[1, 2] = torch.tensor([0.1, 0.2, 0.9])  # the heaviest entry is padding: it must not be chosen
    plans[0, 4] = torch.tensor([0.6, 0.1, 0.1])  # a hit
    return plans, token_box, region_mask


def check_plan_alignment(fn) -> None:
    """Grade ``fn(plans (B, L, R), token_box (B, L), region_mask (B, R)) -> (share, chance)``.

    ``share``: among the words with ``token_box >= 0``, the fraction whose heaviest mass over the *real*
    regions is on region ``token_box``; ``chance``: the mean over the same words of ``1 / #real regions``.
    Must equal ``course_lib.evaluate.plan_alignment`` to 1e-6, on two cases.
    """
    check = "plan_alignment"
    check_callable("fn", fn, check)
    for seed in (0, 1):
        plans, token_box, region_mask = _alignment_case(seed)
        ours = call_learner(check, fn, plans.clone(), token_box.clone(), region_mask.clone())
        want = plan_alignment(plans, token_box, region_mask)
        expect(isinstance(ours, (tuple, list)) and len(ours) == 2, check,
               f"return a pair (share, chance), got {type(ours).__name__}")
        share, chance = (float(v) for v in ours)
        unmasked = plan_alignment(plans, token_box, torch.ones_like(region_mask))[0]  # argmax over padding too
        if abs(share - want[0]) > 1e-6 and abs(share - unmasked) < 1e-6:
            expect(False, check, "the share counts a padding region as the heaviest: take the argmax over the "
                                 "real regions only (set the padding columns to -inf first)")
        expect_close(torch.tensor(share), torch.tensor(want[0]), check,
                     "the share of named words whose heaviest region is their own", atol=1e-6, rtol=0)
        expect_close(torch.tensor(chance), torch.tensor(want[1]), check,
                     "the chance level (mean of 1 / #real regions over the named words)", atol=1e-6, rtol=0)
    passed(check, "the heaviest-mass share over the real regions and its chance level")
