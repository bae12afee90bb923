"""Box IoU and grounding accuracy.

Grounding counts IoU >= 0.5 as a hit (X-VLM ``grounding_eval_bbox``), with the continuous box
convention of ``torchvision.ops.box_iou`` (area = (x2 - x1) * (y2 - y1), no "+1" pixel).
"""

from __future__ import annotations

import torch

from course_lib.utils import check_shape


def _check_boxes(name: str, boxes: torch.Tensor) -> None:
    check_shape(name, boxes, (None, 4))
    if not boxes.is_floating_point():
        raise ValueError(f"{name} must be a float tensor, got {boxes.dtype}")
    bad = ~torch.isfinite(boxes).all(dim=1) | (boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1])
    if bad.any():
        i = int(bad.nonzero()[0])
        raise ValueError(
            f"{name} must have shape (N, 4) as finite x1, y1, x2, y2 with x1 <= x2 and y1 <= y2; "
            f"box {i} is {tuple(round(v, 4) for v in boxes[i].tolist())}"
        )


def _iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of broadcastable ``(..., 4)`` xyxy boxes; 0 where the union is empty (degenerate boxes)."""
    top_left = torch.maximum(a[..., :2], b[..., :2])
    bottom_right = torch.minimum(a[..., 2:], b[..., 2:])
    inter = (bottom_right - top_left).clamp(min=0).prod(dim=-1)
    area_a = (a[..., 2:] - a[..., :2]).prod(dim=-1)
    area_b = (b[..., 2:] - b[..., :2]).prod(dim=-1)
    union = area_a + area_b - inter
    return torch.where(union > 0, inter / union.clamp(min=torch.finfo(union.dtype).tiny), torch.zeros_like(union))


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise IoU ``(N, M)`` between boxes ``a (N, 4)`` and ``b (M, 4)`` in x1, y1, x2, y2.

    IoU = area(a ∩ b) / area(a ∪ b), with area = (x2 - x1) * (y2 - y1) (torchvision's convention).
    """
    _check_boxes("a", a)
    _check_boxes("b", b)
    return _iou(a[:, None, :], b[None, :, :].to(a))


def grounding_accuracy(pred: torch.Tensor, gt: torch.Tensor, threshold: float = 0.5) -> float:
    """Fraction of predicted boxes ``pred (N, 4)`` with IoU >= ``threshold`` against ``gt (N, 4)``."""
    _check_boxes("pred", pred)
    _check_boxes("gt", gt)
    if gt.shape != pred.shape:
        raise ValueError(f"gt must have the shape of pred {tuple(pred.shape)}, got {tuple(gt.shape)}")
    if pred.shape[0] == 0:
        raise ValueError("pred is empty (N = 0); grounding accuracy is undefined")
    if not (isinstance(threshold, (int, float)) and 0.0 < threshold <= 1.0):
        raise ValueError(f"threshold must be in (0, 1], got {threshold!r}")
    return (_iou(pred, gt.to(pred)) >= threshold).float().mean().item()
