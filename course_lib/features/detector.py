"""A tiny one-stage object detector for ShapeWorld (CenterNet-like).

The region-feature papers used a Faster R-CNN trained on Visual Genome. Here a detector small
enough to train in seconds plays that part: on :class:`~course_lib.features.cnn.SmallCNN`'s map,
every cell predicts

- objectness: "an object's centre falls in this cell" (sigmoid, binary cross-entropy on all cells);
- the class of that object (softmax, cross-entropy on the object cells);
- its box: the centre as an offset inside the cell and the size relative to the stride,
  ``cx = (j + sigmoid(u)) * stride``, ``w = exp(s) * stride`` (L1 on normalised corners).

Detections are the cells whose objectness is a local 3x3 maximum above ``threshold`` (no NMS
needed: one object, one centre cell). The output has the simulated detector's format: pixel boxes
``(N, 4)`` and class probabilities ``(N, num_classes + 1)``, last column "no object"
(``[p * softmax(class), 1 - p]``, so each row sums to 1). Its backbone can then serve region
features, frozen or trainable: ``RegionFeatures(detector.backbone, dim, train_backbone=False)``.

Measured (1 CPU thread, 32 px world, seed 0): 300 steps of batch 32 take about 23 s and reach
0.975 recall at IoU 0.5 on 500 validation scenes (0.974 with the right class).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from course_lib.features.cnn import SmallCNN
from course_lib.utils import check_shape


class TinyDetector(nn.Module):
    """Images ``(B, 3, H, W)`` -> per-cell logits ``(B, 1 + num_classes + 4, h, w)``."""

    def __init__(self, num_classes: int, channels: tuple[int, ...] = (32, 64), hidden: int = 64):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.backbone = SmallCNN(channels=channels)
        self.head = nn.Sequential(
            nn.Conv2d(self.backbone.out_channels, hidden, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(hidden, 1 + num_classes + 4, 1),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(images))  # (B, 1 + K + 4, h, w)

    def split(self, out: torch.Tensor):
        """Raw output -> objectness logits ``(B, h, w)``, class logits ``(B, h, w, K)``, pixel boxes ``(B, h, w, 4)``."""
        B, _, h, w = out.shape
        stride = self.backbone.stride
        out = out.permute(0, 2, 3, 1)  # (B, h, w, 1 + K + 4)
        objectness, classes, box = out[..., 0], out[..., 1 : 1 + self.num_classes], out[..., -4:]
        ys, xs = torch.meshgrid(torch.arange(h, device=out.device), torch.arange(w, device=out.device), indexing="ij")
        cx = (xs + torch.sigmoid(box[..., 0])) * stride  # (B, h, w)
        cy = (ys + torch.sigmoid(box[..., 1])) * stride
        half_w = box[..., 2].clamp(max=8).exp() * stride / 2  # clamp: no overflow early in training
        half_h = box[..., 3].clamp(max=8).exp() * stride / 2
        boxes = torch.stack([cx - half_w, cy - half_h, cx + half_w, cy + half_h], dim=-1)  # (B, h, w, 4)
        return objectness, classes, boxes

    @torch.no_grad()
    def detect(self, images: torch.Tensor, threshold: float = 0.5) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Images ``(B, 3, H, W)`` -> per image ``(boxes (N, 4) pixels, class_probs (N, K + 1))``."""
        check_shape("images", images, (None, 3, None, None))
        if not 0 < threshold < 1:
            raise ValueError(f"threshold must be in (0, 1), got {threshold}")
        H, W = images.shape[-2:]
        objectness, classes, boxes = self.split(self(images))
        p = torch.sigmoid(objectness)  # (B, h, w)
        peaks = (p == F.max_pool2d(p[:, None], 3, stride=1, padding=1)[:, 0]) & (p > threshold)
        scale = boxes.new_tensor([W, H, W, H])
        results = []
        for b in range(len(images)):
            keep = peaks[b]  # (h, w)
            box = torch.minimum(boxes[b][keep].clamp(min=0), scale)  # (N, 4) inside the image
            pk = p[b][keep][:, None]  # (N, 1)
            probs = torch.cat([pk * classes[b][keep].softmax(-1), 1 - pk], dim=1)  # (N, K + 1)
            results.append((box, probs))
        return results


def detection_targets(scenes, image_size: int, stride: int, grid: tuple[int, int]):
    """Ground truth per cell: object mask ``(B, h, w)`` bool, class ``(B, h, w)`` long, box ``(B, h, w, 4)`` pixels.

    The cell holding an object's centre is responsible for it (ShapeWorld objects never share one
    at stride <= 4 px per 32 px image, since they do not overlap).
    """
    h, w = grid
    has_object = torch.zeros(len(scenes), h, w, dtype=torch.bool)
    classes = torch.zeros(len(scenes), h, w, dtype=torch.long)
    boxes = torch.zeros(len(scenes), h, w, 4)
    for b, scene in enumerate(scenes):
        for box, class_id in zip(torch.from_numpy(scene.boxes(image_size)), scene.class_ids.tolist()):
            col = min(int((box[0] + box[2]) / 2 // stride), w - 1)
            row = min(int((box[1] + box[3]) / 2 // stride), h - 1)
            has_object[b, row, col], classes[b, row, col], boxes[b, row, col] = True, class_id, box
    return has_object, classes, boxes


def detection_loss(detector: TinyDetector, images: torch.Tensor, scenes, box_weight: float = 5.0) -> torch.Tensor:
    """Objectness BCE (all cells) + class CE + ``box_weight`` * L1 on corners / image size (object cells)."""
    objectness, classes, boxes = detector.split(detector(images))
    size = images.shape[-1]
    has_object, target_class, target_box = detection_targets(scenes, size, detector.backbone.stride, objectness.shape[1:])
    loss = F.binary_cross_entropy_with_logits(objectness, has_object.float())
    if has_object.any():
        loss = loss + F.cross_entropy(classes[has_object], target_class[has_object])
        loss = loss + box_weight * F.l1_loss(boxes[has_object] / size, target_box[has_object] / size)
    return loss


@dataclass(frozen=True)
class DetectorTraining:
    """How :func:`train_detector` trains."""

    steps: int = 300
    batch_size: int = 32
    lr: float = 2e-3
    image_size: int | None = None  # default: the world's
    seed: int = 0


def train_detector(world, steps: int | None = None, config: DetectorTraining = DetectorTraining(),
                   detector: TinyDetector | None = None) -> tuple[TinyDetector, list[float]]:
    """Train a :class:`TinyDetector` on fresh ShapeWorld training scenes; returns it and the loss per step.

    ``steps`` overrides ``config.steps``. Each step renders ``batch_size`` new scenes (scene ids
    ``step * batch_size ...``), so the detector never sees the same image twice.
    """
    steps = config.steps if steps is None else steps
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    torch.manual_seed(config.seed)
    detector = detector or TinyDetector(world.num_classes)
    size = config.image_size or world.config.image_size
    optimizer = torch.optim.AdamW(detector.parameters(), lr=config.lr)
    detector.train()
    losses = []
    for step in range(steps):
        scenes = world.scenes(range(step * config.batch_size, (step + 1) * config.batch_size), "train")
        pixels = torch.from_numpy(world.render_batch(scenes, size))  # (B, H, W, 3) uint8
        images = pixels.permute(0, 3, 1, 2).float() / 255.0  # (B, 3, H, W)
        loss = detection_loss(detector, images, scenes)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return detector.eval(), losses
