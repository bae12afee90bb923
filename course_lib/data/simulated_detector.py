"""A simulated object detector for ShapeWorld.

The region-feature systems of 2019-2020 (ViLBERT, LXMERT, UNITER...) never saw ground-truth
boxes: a Faster R-CNN trained on Visual Genome gave them noisy boxes, missed some objects,
invented others, and gave each box a soft distribution over 1,600 classes. Masked region
classification with KL (MRC-kl) learns from exactly that distribution.

This module reproduces those imperfections with knobs, so notebooks can show what each one
costs: box noise, misses, false positives and how confident (peaked) the class distribution is.
Class distributions have ``num_classes + 1`` columns; the last is "no object" (background).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_DETECTOR_STREAM = 4


@dataclass(frozen=True)
class DetectorConfig:
    """Knobs of the simulated detector.

    box_noise: std of the corner jitter, as a fraction of the object's side.
    miss_rate: probability that a real object is not detected.
    false_positives: expected number of spurious boxes per image (Poisson).
    confidence: logit margin of the true class; larger = more peaked distributions.
    confusion: extra logit given to classes that share the colour or the shape of the truth
        (the detector mixes up similar classes, as real ones do).
    """

    box_noise: float = 0.05
    miss_rate: float = 0.05
    false_positives: float = 0.2
    confidence: float = 4.0
    confusion: float = 1.5

    def __post_init__(self):
        for name in ("box_noise", "false_positives", "confidence", "confusion"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.miss_rate <= 1:
            raise ValueError(f"miss_rate must be in [0, 1], got {self.miss_rate}")


@dataclass(frozen=True)
class Detections:
    """What the detector returns for one image.

    boxes: (N, 4) float32 normalised ``x1, y1, x2, y2``.
    class_probs: (N, C + 1) float32, rows sum to 1; column C is "no object".
    matched_object: (N,) int64 index of the real object each box came from, -1 for false positives.
    """

    boxes: np.ndarray
    class_probs: np.ndarray
    matched_object: np.ndarray

    def __len__(self) -> int:
        return len(self.boxes)

    @property
    def labels(self) -> np.ndarray:
        """(N,) the detector's top class, ignoring "no object" (what MRC with hard labels uses)."""
        return self.class_probs[:, :-1].argmax(axis=1)

    def pixel_boxes(self, image_size: int) -> np.ndarray:
        return self.boxes * image_size


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _class_logits(config, rng, class_id: int | None, det: DetectorConfig) -> np.ndarray:
    """Logits over C + 1 classes for a box whose true class is ``class_id`` (None = background)."""
    n_shapes = len(config.shapes)
    logits = rng.normal(0.0, 1.0, size=config.num_classes + 1)
    if class_id is None:
        logits[-1] += det.confidence
        return logits
    ids = np.arange(config.num_classes)
    same_color = ids // n_shapes == class_id // n_shapes
    same_shape = ids % n_shapes == class_id % n_shapes
    logits[:-1] += det.confusion * (same_color | same_shape)
    logits[class_id] += det.confidence
    return logits


def _jitter(box, rng, noise: float) -> np.ndarray:
    x1, y1, x2, y2 = box
    side = max(x2 - x1, y2 - y1)
    out = np.array(box) + rng.normal(0.0, noise * side, size=4)
    out = np.clip(out, 0.0, 1.0)
    out[2:] = np.maximum(out[2:], out[:2] + 0.02)  # keep x2 > x1, y2 > y1
    return np.clip(out, 0.0, 1.0)


def simulate_detections(scene, det: DetectorConfig = DetectorConfig()) -> Detections:
    """Detections of ``scene``: deterministic for a given scene and detector config."""
    rng = scene.rng(_DETECTOR_STREAM)
    boxes, logits, matched = [], [], []
    for i, obj in enumerate(scene.objects):
        if rng.random() < det.miss_rate:
            continue
        boxes.append(_jitter(obj.box, rng, det.box_noise))
        logits.append(_class_logits(scene.config, rng, obj.class_id, det))
        matched.append(i)
    for _ in range(rng.poisson(det.false_positives)):
        side = rng.uniform(0.1, 0.3)
        x1, y1 = rng.uniform(0.0, 1.0 - side, size=2)
        boxes.append(np.array([x1, y1, x1 + side, y1 + side]))
        logits.append(_class_logits(scene.config, rng, None, det))
        matched.append(-1)
    c = scene.config.num_classes + 1
    return Detections(
        boxes=np.array(boxes, dtype=np.float32).reshape(-1, 4),
        class_probs=_softmax(np.array(logits, dtype=np.float32).reshape(-1, c)),
        matched_object=np.array(matched, dtype=np.int64),
    )
