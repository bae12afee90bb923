"""Box regression for grounding (X-VLM): L1 + generalised IoU, both with weight 1.

Boxes are normalised to [0, 1]. The head predicts (cx, cy, w, h) through a sigmoid; GIoU
(Rezatofighi et al., CVPR 2019) is computed on corners (x1, y1, x2, y2):

    GIoU = IoU - (area(C) - area(A u B)) / area(C),   C = smallest box enclosing A and B,

which lies in (-1, 1] and still has a gradient when the boxes do not overlap.
Zero-area boxes: unions and enclosing areas are clamped below by ``eps``, so the result stays
finite; two identical zero-area boxes get GIoU 0 (loss 1) instead of 0/0. (X-VLM zeroes the
GIoU loss of a batch with a degenerate box; we keep the L1 term and a finite GIoU term.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from course_lib.utils import check_one_of, check_shape

EPS = 1e-7


def box_cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    """(..., 4) centre/size boxes -> (..., 4) corner boxes."""
    if not isinstance(boxes, torch.Tensor) or boxes.dim() == 0 or boxes.shape[-1] != 4:
        raise ValueError(f"boxes must be a tensor of shape (..., 4), got {getattr(boxes, 'shape', boxes)}")
    cx, cy, w, h = boxes.unbind(-1)
    if (w < 0).any() or (h < 0).any():
        raise ValueError("boxes must have non-negative width and height (cx, cy, w, h)")
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)


def _check_xyxy(name: str, boxes: torch.Tensor) -> None:
    check_shape(name, boxes, (None, 4))
    if not torch.isfinite(boxes).all():
        raise ValueError(f"{name} must be finite")
    bad = ((boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1])).nonzero().flatten()
    if len(bad):
        i = bad[0].item()
        raise ValueError(f"{name} must be (x1, y1, x2, y2) with x1 <= x2 and y1 <= y2; "
                         f"box {i} is {tuple(round(v, 4) for v in boxes[i].tolist())}")


def _area(boxes: torch.Tensor) -> torch.Tensor:
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def generalized_box_iou(a: torch.Tensor, b: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """Paired GIoU of corner boxes: (N, 4), (N, 4) -> (N,); ``a[i]`` is compared with ``b[i]`` only."""
    _check_xyxy("a", a)
    _check_xyxy("b", b)
    check_shape("b", b, a.shape)
    top_left = torch.maximum(a[:, :2], b[:, :2])
    bottom_right = torch.minimum(a[:, 2:], b[:, 2:])
    inter = (bottom_right - top_left).clamp(min=0).prod(dim=1)
    union = _area(a) + _area(b) - inter
    iou = inter / union.clamp(min=eps)
    enclosing = torch.cat([torch.minimum(a[:, :2], b[:, :2]), torch.maximum(a[:, 2:], b[:, 2:])], dim=1)
    enclosing_area = _area(enclosing)
    return iou - (enclosing_area - union) / enclosing_area.clamp(min=eps)


def box_regression_loss(pred: torch.Tensor, target: torch.Tensor,
                        box_format: str = "cxcywh") -> dict[str, torch.Tensor]:
    """X-VLM's grounding loss: (N, 4), (N, 4) -> {"l1", "giou", "loss"} scalars.

    ``l1`` = sum over the 4 coordinates of |pred - target|, mean over boxes (in ``box_format``);
    ``giou`` = mean of 1 - GIoU on corner boxes; ``loss`` = l1 + giou.
    """
    check_one_of("box_format", box_format, ["cxcywh", "xyxy"])
    check_shape("pred", pred, (None, 4))
    check_shape("target", target, pred.shape)
    if pred.shape[0] == 0:
        raise ValueError("pred must hold at least one box")
    l1 = F.l1_loss(pred, target, reduction="none").sum(1).mean()
    if box_format == "cxcywh":
        pred, target = box_cxcywh_to_xyxy(pred), box_cxcywh_to_xyxy(target)
    giou = (1 - generalized_box_iou(pred, target)).mean()
    return {"l1": l1, "giou": giou, "loss": l1 + giou}
