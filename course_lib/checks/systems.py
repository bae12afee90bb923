"""Check functions for the systems notebooks: notebook 10 (the single-stream region family).

Each ``check_*`` calls the learner's function on fixed inputs, compares it with the library and
prints ``PASS ...``, or raises :class:`~course_lib.checks.verdict.ExerciseError` saying what to fix.

- ``check_b2t2_visual_input(fn)``: B2T2's visual input, every token's box feature through the
  token-box matrix and the whole image at ``[IMAGE]``, vs ``models.b2t2``;
- ``check_blank_boxes(fn)``: VL-BERT's no-peeking fix, the masked boxes' pixels set to 0, vs
  ``data.regions.blank_boxes``.
"""

from __future__ import annotations

import torch

from course_lib.checks.verdict import call_learner, check_callable, expect, expect_close, passed
from course_lib.data.regions import blank_boxes


def _b2t2_case(seed: int, batch: int = 3, length: int = 7, regions: int = 4, dim: int = 5):
    g = torch.Generator().manual_seed(seed)
    token_box = torch.full((batch, length), -1)
    token_box[0, 2], token_box[0, 5], token_box[1, 1], token_box[2, 3], token_box[2, 4] = 0, 3, 1, 2, 2
    feats = torch.randn(batch, regions, dim, generator=g)
    image = torch.randn(batch, dim, generator=g)
    return token_box, feats, image


def _b2t2_reference(token_box, feats, image):
    onehot = torch.nn.functional.one_hot(token_box.clamp(min=0), feats.shape[1]).float() * (token_box >= 0)[..., None]
    boxes = onehot @ feats  # (B, L, F)
    return torch.cat([boxes[:, :1], image[:, None], boxes[:, 1:]], dim=1)


def check_b2t2_visual_input(fn) -> None:
    """Grade ``fn(token_box (B, L) long, region_feats (B, R, F), image_feat (B, F)) -> (B, L + 1, F)``.

    Row ``t`` of the result is the feature of the region token ``t`` names (``M f``, with ``M`` the
    0/1 token-box matrix; zeros where ``token_box`` is -1); ``[IMAGE]``, inserted at position 1 after
    ``[CLS]``, gets the whole image. Exact up to 1e-6, on two cases.
    """
    check = "b2t2_visual_input"
    check_callable("fn", fn, check)
    for seed in (0, 1):
        token_box, feats, image = _b2t2_case(seed)
        ours = call_learner(check, fn, token_box.clone(), feats.clone(), image.clone())
        want = _b2t2_reference(token_box, feats, image)
        expect(isinstance(ours, torch.Tensor), check, f"return a tensor (B, L + 1, F), got {type(ours).__name__}")
        if tuple(ours.shape) == (3, 7, 5):
            expect(False, check, "the result has L rows: insert the [IMAGE] row (the whole image) at position 1, "
                                 "after [CLS], so there are L + 1")
        if tuple(ours.shape) == tuple(want.shape) and torch.allclose(ours[:, 1], torch.zeros_like(ours[:, 1])):
            expect(False, check, "position 1 ([IMAGE]) is zero: it must hold the whole image's feature")
        if tuple(ours.shape) == tuple(want.shape) and not torch.allclose(ours[0, 1 + 1], feats[0, 0], atol=1e-6):
            expect(not torch.allclose(ours[0, 2], feats[0, 1], atol=1e-6), check,
                   "token 1 (row 2) names region 0 but got region 1's feature: are the region indices off by one?")
        expect_close(ours, want, check, "the visual input", atol=1e-6, rtol=1e-6)
    passed(check, "every referring token carries its box, [IMAGE] the whole image, the other tokens zeros")


def check_blank_boxes(fn) -> None:
    """Grade ``fn(images (B, 3, H, W), boxes (B, R, 4) in [0, 1], blank (B, R) bool) -> (B, 3, H, W)``.

    Pixels whose centre lies inside a box to blank become 0 (all channels), every other pixel keeps
    its value, and the input is not modified. Must equal ``course_lib.data.regions.blank_boxes``.
    """
    check = "blank_boxes"
    check_callable("fn", fn, check)
    g = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 16, 16, generator=g) + 0.1  # no pixel is 0 before blanking
    boxes = torch.tensor([[[0.0, 0.0, 0.5, 0.25], [0.5, 0.5, 1.0, 1.0]],
                          [[0.25, 0.25, 0.75, 0.75], [0.0, 0.0, 1.0, 1.0]]])
    blank = torch.tensor([[True, False], [True, False]])
    original = images.clone()
    ours = call_learner(check, fn, images, boxes.clone(), blank.clone())
    expect(torch.equal(images, original), check, "your function changed the input images in place; blank a copy "
                                                 "(e.g. images.masked_fill(...) or images.clone())")
    want = blank_boxes(original, boxes, blank)
    expect(isinstance(ours, torch.Tensor) and tuple(ours.shape) == tuple(want.shape), check,
           f"return images of shape {tuple(want.shape)}")
    if bool((ours[1] == 0).all()):
        expect(False, check, "the whole second image is blank: only the boxes with blank=True are blanked")
    if bool((ours[0, :, 8:, 8:] == 0).all()):
        expect(False, check, "box 1 of image 0 was blanked but its blank flag is False")
    expect_close(ours, want, check, "the blanked images", atol=0.0, rtol=0.0)
    passed(check, "the masked boxes' pixels are 0 in every channel, the rest unchanged, the input untouched")
