"""Frame order modelling (FOM, HERO: Li et al., EMNLP 2020).

A fraction of a video's frames is shuffled among themselves; for every shuffled position the
model classifies which original position (one of T) the frame there came from.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from course_lib.utils import check_shape

IGNORE_INDEX = -100


def shuffle_frames(num_frames: int, batch: int, shuffle_prob: float = 0.15,
                   generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw frame shuffles: -> (permutation (B, T) long, targets (B, T) long).

    Each frame is selected with probability ``shuffle_prob`` (at least 2 per video); the
    selected frames are permuted among themselves, never left all in place. Apply it with
    ``frames[torch.arange(B)[:, None], permutation]``: position t then holds original frame
    ``permutation[b, t]``. ``targets[b, t]`` is that original position where the frame was
    selected and -100 elsewhere.
    """
    if int(num_frames) != num_frames or num_frames < 2:
        raise ValueError(f"num_frames must be an integer >= 2 to shuffle, got {num_frames}")
    if int(batch) != batch or batch < 1:
        raise ValueError(f"batch must be an integer >= 1, got {batch}")
    if not 0.0 < shuffle_prob <= 1.0:
        raise ValueError(f"shuffle_prob must be in (0, 1], got {shuffle_prob}")
    permutation = torch.arange(num_frames).repeat(batch, 1)
    targets = torch.full((batch, num_frames), IGNORE_INDEX)
    for b in range(batch):
        selected = (torch.rand(num_frames, generator=generator) < shuffle_prob).nonzero().flatten()
        if len(selected) < 2:
            selected = torch.randperm(num_frames, generator=generator)[:2].sort().values
        order = torch.randperm(len(selected), generator=generator)
        if (order == torch.arange(len(selected))).all():
            order = order.roll(1)                       # an identity shuffle would teach nothing
        permutation[b, selected] = selected[order]
        targets[b, selected] = selected[order]
    return permutation, targets


def frame_order_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over original positions: (B, T, T) logits, (B, T) targets (-100 = skip) -> scalar."""
    check_shape("logits", logits, (None, None, None))
    batch, frames, classes = logits.shape
    if classes != frames:
        raise ValueError(f"logits must have shape (B, T, T), got {tuple(logits.shape)}")
    check_shape("targets", targets, (batch, frames))
    predicted = targets != IGNORE_INDEX
    if not predicted.any():
        raise ValueError("targets has no shuffled frame (all -100)")
    if ((targets[predicted] < 0) | (targets[predicted] >= frames)).any():
        raise ValueError(f"targets must be -100 or a frame index in [0, {frames})")
    return F.cross_entropy(logits[predicted], targets[predicted])
