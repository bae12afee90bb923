"""Image-text matching (ITM): a binary classifier on the fused [CLS] says "matched or not".

Negatives are either random (UNITER: another image of the batch) or hard (ALBEF, BLIP,
X-VLM): for each text, an image drawn with probability ``softmax(ITC logits)`` over the
other images, so the ones the contrastive model finds similar are picked most often; and
likewise a text for each image. ALBEF then scores B positives and 2B negatives.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from course_lib.utils import check_shape


def sample_random_negatives(batch_size: int, generator: torch.Generator | None = None,
                            device=None) -> torch.Tensor:
    """For each i, an index j != i drawn uniformly from the batch: -> (B,) long."""
    if int(batch_size) != batch_size or batch_size < 2:
        raise ValueError(f"batch_size must be an integer >= 2 to have negatives, got {batch_size}")
    offset = torch.randint(1, batch_size, (batch_size,), generator=generator, device=device)
    return (torch.arange(batch_size, device=device) + offset) % batch_size


def _negative_weights(name: str, sim: torch.Tensor, excluded: torch.Tensor, eps: float) -> torch.Tensor:
    """Row-wise softmax(sim) + eps with the excluded (positive) entries set to 0."""
    weights = F.softmax(sim.float(), dim=1) + eps
    weights = weights.masked_fill(excluded, 0.0)
    empty = (weights.sum(1) == 0).nonzero().flatten()
    if len(empty):
        raise ValueError(f"{name}: rows {empty.tolist()} have no candidate negative "
                         "(every other item shares the same image)")
    return weights


@torch.no_grad()
def sample_hard_negatives(sim_i2t: torch.Tensor, sim_t2i: torch.Tensor,
                          generator: torch.Generator | None = None,
                          same_image: torch.Tensor | None = None,
                          eps: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor]:
    """ALBEF's hard negatives from the in-batch ITC logits: (B, B), (B, B) -> ((B,), (B,)).

    ``sim_i2t[i, j]`` is image i against text j, ``sim_t2i[t, j]`` text t against image j
    (already divided by the temperature). Returns ``neg_image_idx[t]``, an image for text t
    drawn from ``softmax(sim_t2i[t]) + eps`` (BLIP's eps avoids all-zero rows), and
    ``neg_text_idx[i]``, a text for image i drawn from ``softmax(sim_i2t[i]) + eps``.
    The diagonal, and entries where ``same_image`` (B, B) bool is True (X-VLM: captions of the
    same image), get weight 0, so a positive is never drawn.
    """
    check_shape("sim_i2t", sim_i2t, (None, None))
    batch = sim_i2t.shape[0]
    check_shape("sim_i2t", sim_i2t, (batch, batch))
    check_shape("sim_t2i", sim_t2i, (batch, batch))
    if batch < 2:
        raise ValueError("sim_i2t must cover at least 2 pairs to have negatives")
    excluded = torch.eye(batch, dtype=torch.bool, device=sim_i2t.device)
    if same_image is not None:
        check_shape("same_image", same_image, (batch, batch))
        excluded = excluded | same_image.bool()
    weights_t2i = _negative_weights("same_image", sim_t2i, excluded, eps)
    weights_i2t = _negative_weights("same_image", sim_i2t, excluded, eps)
    neg_image_idx = torch.multinomial(weights_t2i, 1, generator=generator).squeeze(1)
    neg_text_idx = torch.multinomial(weights_i2t, 1, generator=generator).squeeze(1)
    return neg_image_idx, neg_text_idx


def itm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Two-way cross-entropy: (N, 2) logits, (N,) labels in {0: mismatched, 1: matched} -> scalar."""
    check_shape("logits", logits, (None, 2))
    check_shape("labels", labels, (logits.shape[0],))
    if logits.shape[0] == 0:
        raise ValueError("logits must hold at least one pair")
    if labels.is_floating_point() or not ((labels == 0) | (labels == 1)).all():
        raise ValueError("labels must be integers 0 (mismatched) or 1 (matched)")
    return F.cross_entropy(logits, labels.long())
