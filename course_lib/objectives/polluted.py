"""Polluted inputs for a matching loss: Oscar's contrastive loss with polluted tags (Li et al. 2020).

Oscar reads a triple ``(words, tags, regions)``. Its contrastive loss takes the tags as the image
side ``h' = [tags; regions]`` and *pollutes* it: with probability 0.5 the tag sequence is replaced
by that of another image ("a random tag sequence from the dataset"), and a binary classifier on
the fused ``[CLS]`` says whether the triple is polluted (``oscar/datasets/oscar_tsv.py:
random_sent``, label 1 for a replaced ``text_b``; ``num_contrast_classes=2``). Image-text matching
is the same loss with the regions polluted instead.

:func:`pollute` does it for any keys of a batch: ``keys=("tag_ids", "tag_mask")`` is Oscar's,
the region keys are ITM's. The label says "still matched" (1) or "polluted" (0), as the course's
ITM heads do (``course_lib.objectives.itm.itm_loss``); Oscar's code numbers them the other way round.

One rule beyond the paper: a row that borrowed an input *identical* to its own is not polluted. In
a real corpus two images rarely share their whole tag sequence; in ShapeWorld, with 18 classes and
one to three objects per scene, 1-2% of the borrowed tag sequences are the same as the true ones
(two scenes of one object of the same class), and labelling those "polluted" would teach the head
noise.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from course_lib.objectives.itm import sample_random_negatives


def pollute(batch: dict, keys: Sequence[str], prob: float = 0.5,
            generator: torch.Generator | None = None) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """Replace ``keys`` of a share ``prob`` of the rows by another row's -> ``(batch, matched, source)``.

    batch: a dict of ``(B, ...)`` tensors (``B >= 2``); keys: the keys to pollute (at least one in
    ``batch``). Each row is replaced with probability ``prob``, except that row 0 never is and the
    last row always is (a batch holds both kinds). ``source (B,)`` is the row each row's ``keys`` now
    come from (itself if kept); ``matched (B,)`` bool is False for a polluted row: one that borrowed
    an input different from its own (module docstring). The other keys are left as they are.
    """
    if not isinstance(batch, dict):
        raise ValueError(f"batch must be a dict of tensors, got {type(batch).__name__}")
    present = [k for k in keys if k in batch]
    if not present:
        raise ValueError(f"batch has none of the keys to pollute {list(keys)}; it holds {sorted(batch)}")
    if not 0.0 < prob < 1.0:
        raise ValueError(f"prob must be in (0, 1), got {prob!r}")
    first = batch[present[0]]
    B, device = first.shape[0], first.device
    if B < 2:
        raise ValueError("pollute needs a batch of at least 2 rows to borrow from")
    replaced = torch.rand(B, generator=generator, device=device) < prob
    replaced[0], replaced[-1] = False, True
    source = torch.where(replaced, sample_random_negatives(B, generator, device), torch.arange(B, device=device))
    out = dict(batch)
    same = torch.ones(B, dtype=torch.bool, device=device)
    for key in present:
        out[key] = batch[key][source]
        same &= (out[key] == batch[key]).reshape(B, -1).all(1)
    return out, ~replaced | same, source
