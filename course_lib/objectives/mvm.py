"""Masked vision modelling on region features (UNITER's MRM; LXMERT's RoI tasks).

Regions are masked with probability 0.15 (at least one per image) by zeroing their features;
the encoder sees the caption and the other regions, and a head reconstructs what was hidden:
- MRFR, feature regression: L2 between the predicted and the original feature;
- MRC, classification with hard labels: cross-entropy on the detector's top class;
- MRC-kl, classification with soft labels: KL from the detector's class distribution.
Detector distributions here have C + 1 columns, the last one being "no object".

:class:`RegressionHead` is UNITER's MRFR head: its output projection is the model's input projection
of region features, transposed (``model/pretrain.py``, ``RegressionHead``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from course_lib.utils import check_shape


def _bool_mask(name: str, mask: torch.Tensor, shape) -> torch.Tensor:
    check_shape(name, mask, shape)
    if mask.dtype != torch.bool:
        if not ((mask == 0) | (mask == 1)).all():
            raise ValueError(f"{name} must be bool or hold only 0/1")
        mask = mask.bool()
    return mask


def mask_regions(features: torch.Tensor, region_mask: torch.Tensor, prob: float = 0.15,
                 generator: torch.Generator | None = None,
                 at_least_one: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero a random subset of real regions: (B, N, D), (B, N) -> ((B, N, D), (B, N) bool).

    Each real region (``region_mask`` True) is masked with probability ``prob``; with
    ``at_least_one`` a sample where none was drawn gets one real region masked at random (UNITER;
    VL-BERT has no such minimum). Returns the masked features (a copy) and ``masked_positions``.
    The model usually adds a learned mask embedding there.
    """
    check_shape("features", features, (None, None, None))
    region_mask = _bool_mask("region_mask", region_mask, features.shape[:2])
    if not 0.0 < prob <= 1.0:
        raise ValueError(f"prob must be in (0, 1], got {prob}")
    empty = (~region_mask.any(1)).nonzero().flatten()
    if len(empty):
        raise ValueError(f"region_mask has samples with no real region: {empty.tolist()}")
    draw = torch.rand(region_mask.shape, generator=generator, device=features.device)
    masked = (draw < prob) & region_mask
    # Fallback: pick one real region uniformly (random scores, padding pushed to -1).
    scores = torch.rand(region_mask.shape, generator=generator, device=features.device)
    fallback = scores.masked_fill(~region_mask, -1).argmax(1)                  # (B,)
    none = ~masked.any(1) & at_least_one
    masked[none, fallback[none]] = True
    return features.masked_fill(masked[..., None], 0.0), masked


def _masked_positions(masked_positions, shape) -> torch.Tensor:
    masked = _bool_mask("masked_positions", masked_positions, shape)
    if not masked.any():
        raise ValueError("masked_positions selects no region; mask at least one")
    return masked


def feature_regression_loss(predicted: torch.Tensor, target: torch.Tensor,
                            masked_positions: torch.Tensor) -> torch.Tensor:
    """MRFR: mean squared error over the masked regions' features: (B, N, D) x2, (B, N) -> scalar.

    The mean runs over all masked elements (N_masked * D), as UNITER's ``mse_loss(...).mean()``.
    """
    check_shape("predicted", predicted, (None, None, None))
    check_shape("target", target, predicted.shape)
    masked = _masked_positions(masked_positions, predicted.shape[:2])
    return F.mse_loss(predicted[masked], target[masked])


def _check_detector(logits: torch.Tensor, detector_probs: torch.Tensor) -> None:
    check_shape("logits", logits, (None, None, None))
    check_shape("detector_probs", detector_probs, logits.shape)
    if logits.shape[-1] < 2:
        raise ValueError("detector_probs needs at least one class plus the 'no object' column")
    if (detector_probs < 0).any() or not torch.allclose(
            detector_probs.sum(-1), torch.ones_like(detector_probs[..., 0]), atol=1e-3):
        raise ValueError("detector_probs must be non-negative and sum to 1 over the last dim")


def region_class_loss_hard(logits: torch.Tensor, detector_probs: torch.Tensor,
                           masked_positions: torch.Tensor) -> torch.Tensor:
    """MRC: cross-entropy to the detector's top object class: (B, N, C+1) x2, (B, N) -> scalar.

    The target is the argmax over the first C columns (the last, "no object", is never a
    target, as UNITER skips its background class); the softmax still runs over all C + 1.
    Mean over masked regions.
    """
    _check_detector(logits, detector_probs)
    masked = _masked_positions(masked_positions, logits.shape[:2])
    target = detector_probs[..., :-1].argmax(-1)                                # (B, N)
    return F.cross_entropy(logits[masked], target[masked])


def region_class_loss_kl(logits: torch.Tensor, detector_probs: torch.Tensor,
                         masked_positions: torch.Tensor) -> torch.Tensor:
    """MRC-kl: KL(detector || model) per masked region, averaged: (B, N, C+1) x2, (B, N) -> scalar.

    ``KL(p || q) = sum_c p_c (log p_c - log q_c)`` with ``q = softmax(logits)`` and 0 log 0 = 0.
    Summed over classes (a true KL); UNITER's ``kl_div(...).mean()`` also divides by C + 1.
    """
    _check_detector(logits, detector_probs)
    masked = _masked_positions(masked_positions, logits.shape[:2])
    log_q = F.log_softmax(logits[masked], dim=-1)
    return F.kl_div(log_q, detector_probs[masked], reduction="batchmean")


class RegressionHead(nn.Module):
    """UNITER's MRFR head: ``Linear(D, D) -> GELU -> LayerNorm -> W^T h + b``, ``(..., D) -> (..., F)``.

    ``tie_to``: the model's input projection of region features, an ``nn.Linear(F, D)``; the head's
    output uses its weight ``W (D, F)`` transposed (UNITER ties them: ``F.linear(h, img_linear.weight.t(),
    bias)``), with a bias of its own. ``tie_to=None`` gives an untied ``(D, F)`` weight.
    """

    def __init__(self, dim: int, feature_dim: int, tie_to: nn.Linear | None = None, layer_norm_eps: float = 1e-5):
        super().__init__()
        for name, value in (("dim", dim), ("feature_dim", feature_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        self.transform = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.LayerNorm(dim, eps=layer_norm_eps))
        if tie_to is not None:
            if not isinstance(tie_to, nn.Linear) or tuple(tie_to.weight.shape) != (dim, feature_dim):
                shape = tuple(tie_to.weight.shape) if isinstance(tie_to, nn.Linear) else None
                raise ValueError(f"tie_to must be the input projection nn.Linear({feature_dim}, {dim}) (weight "
                                 f"({dim}, {feature_dim})), got {type(tie_to).__name__} with weight {shape}")
            self.weight = tie_to.weight  # (D, F): the same Parameter as the model's input projection
        else:
            self.weight = nn.Parameter(torch.empty(dim, feature_dim).normal_(0.0, 0.02))
        self.bias = nn.Parameter(torch.zeros(feature_dim))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(self.transform(hidden), self.weight.t(), self.bias)  # (..., F)
