"""Top-1 classification accuracy (zero-shot classification, NLVR-like true/false, ITM)."""

from __future__ import annotations

import torch

from course_lib.utils import check_shape


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy: fraction of rows of ``logits (N, C)`` whose arg-max equals ``labels (N,)``."""
    check_shape("logits", logits, (None, None))
    check_shape("labels", labels, (logits.shape[0],))
    if logits.shape[0] == 0:
        raise ValueError("logits is empty (N = 0); accuracy is undefined")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor, got {labels.dtype}")
    if labels.min() < 0 or labels.max() >= logits.shape[1]:
        raise ValueError(
            f"labels must be class indices in [0, {logits.shape[1]}), got [{int(labels.min())}, {int(labels.max())}]"
        )
    return (logits.argmax(dim=1) == labels.to(logits.device)).float().mean().item()
