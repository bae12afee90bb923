"""Check functions for notebook 13 (Oscar).

Each ``check_*`` calls the learner's function on fixed inputs, compares it with the library and
prints ``PASS ...``, or raises :class:`~course_lib.checks.verdict.ExerciseError` saying what to fix.

- ``check_tag_text(fn)``: Oscar's tag sentence (its ``od_labels``), the class names of an image's
  labelled regions joined by spaces, vs ``features.tags.ObjectTags``;
- ``check_anchor_matrix(fn)``: which caption word has an identical tag (the anchors), a
  ``(B, L, T)`` bool matrix.
"""

from __future__ import annotations

import torch

from course_lib.checks.verdict import call_learner, check_callable, expect, expect_close, passed
from course_lib.features.text import CLS_ID, MASK_ID, PAD_ID, SEP_ID, UNK_ID

NAMES = ["red circle", "blue square", "green triangle", "yellow circle"]


def check_tag_text(fn) -> None:
    """Grade ``fn(region_labels (B, R) long, region_mask (B, R) bool, class_names list[str])`` ->
    ``list[str]`` of length B: the names of each image's regions that are real (``region_mask``) and
    labelled (``region_labels >= 0``; -1 is "no object"), in region order, joined by one space
    (``""`` for an image with none)."""
    check = "tag_text"
    check_callable("fn", fn, check)
    labels = torch.tensor([[2, 0, -1, 3], [-1, 1, 1, 0], [-1, -1, -1, -1]])
    mask = torch.tensor([[True, True, True, False], [True, True, True, False], [True, False, False, False]])
    want = ["green triangle red circle", "blue square blue square", ""]
    ours = call_learner(check, fn, labels.clone(), mask.clone(), list(NAMES))
    expect(isinstance(ours, (list, tuple)) and len(ours) == 3, check,
           f"return a list of 3 strings, one per image; got {type(ours).__name__}")
    expect(all(isinstance(s, str) for s in ours), check, "every element should be a string of tags")
    if ours[1].startswith("yellow circle"):
        expect(False, check, "a region labelled -1 got the tag 'yellow circle', the last class: class_names[-1] is "
                             "Python's last element. Skip regions whose label is -1 (no object)")
    if "red circle" in ours[1]:
        expect(False, check, "a padding region (region_mask False) got a tag: only real regions are tagged")
    expect(ours[1] == want[1], check, f"image 1 should be {want[1]!r} (a class detected twice is tagged twice, "
                                      f"as Oscar's od_labels are), got {ours[1]!r}")
    expect(list(ours) == want, check, f"expected {want}, got {list(ours)}")
    passed(check, "the detector's class names of every labelled region, in order, duplicates kept")


def check_anchor_matrix(fn) -> None:
    """Grade ``fn(input_ids (B, L), attention_mask (B, L), tag_ids (B, T), tag_mask (B, T))`` ->
    ``(B, L, T)`` bool: True where caption token ``i`` and tag token ``j`` are the same word piece,
    both real (mask 1) and not special ([PAD], [UNK], [CLS], [SEP], [MASK])."""
    check = "anchor_matrix"
    check_callable("fn", fn, check)
    ids = torch.tensor([[CLS_ID, 11, 12, 13, 14, SEP_ID, PAD_ID], [CLS_ID, 15, 16, SEP_ID, PAD_ID, PAD_ID, PAD_ID]])
    mask = (ids != PAD_ID).long()
    tags = torch.tensor([[12, 14, 12, SEP_ID], [17, SEP_ID, PAD_ID, PAD_ID]])
    tag_mask = (tags != PAD_ID).long()
    ours = call_learner(check, fn, ids.clone(), mask.clone(), tags.clone(), tag_mask.clone())
    special = torch.tensor([PAD_ID, UNK_ID, CLS_ID, SEP_ID, MASK_ID])
    words = mask.bool() & ~torch.isin(ids, special)
    real_tags = tag_mask.bool() & ~torch.isin(tags, special)
    want = (ids[:, :, None] == tags[:, None, :]) & words[:, :, None] & real_tags[:, None, :]
    expect(isinstance(ours, torch.Tensor), check, f"return a (B, L, T) bool tensor, got {type(ours).__name__}")
    expect(tuple(ours.shape) == tuple(want.shape), check, f"the matrix should have shape {tuple(want.shape)} "
                                                          f"(B, L, T), got {tuple(ours.shape)}")
    if bool(ours[0, 5, 3]):
        expect(False, check, "the caption's [SEP] and the tags' [SEP] are marked as anchors: special tokens are not "
                             "words and anchor nothing")
    if bool(ours[1, 4:, 2:].any()):
        expect(False, check, "padding positions are marked: [PAD] in the caption and in the tags matches itself; "
                             "use the masks")
    expect_close(ours.long(), want.long(), check, "the anchor matrix", atol=0, rtol=0)
    passed(check, "every caption word is linked to each tag that is the same word piece, and nothing else")
