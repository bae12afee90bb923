"""Region features (OD-RF): one token per detected object.

The detector-era models (ViLBERT, LXMERT, UNITER, VisualBERT, Unicoder-VL...) describe an image by
its object boxes: RoIAlign pools a CNN feature vector inside each box, and the box's geometry is
embedded beside it, because pooling alone forgets *where* the object is. The papers differ in the
geometry vector and in how the two are combined (reference: RECIPES 2.10-2.12, the original code):

=======  =====================================================  =========================================
kind     geometry (coordinates divided by W or H)                combination
=======  =====================================================  =========================================
``5d``   ViLBERT, Unicoder-VL: x1, y1, x2, y2, area fraction     ``LN(W_f f + W_g g)``       (sum, then LN)
``7d``   UNITER: x1, y1, x2, y2, w, h, w*h                       ``LN(LN(W_f f) + LN(W_g g))`` (LN each, sum)
``4d``   LXMERT: x1, y1, x2, y2                                  ``(LN(W_f f) + LN(W_g g)) / 2`` (average)
``6d``   Oscar: x1, y1, x2, y2, w, h                             ``LN(W [f; g])`` = ``LN(W_f f + W_g g)``
=======  =====================================================  =========================================

Oscar appends its 6 numbers to the 2048-d feature and applies one ``Linear(2054 -> H)``
(``img_embedding``, then LayerNorm with ``use_img_layernorm``): a linear map of a concatenation is
the sum of a map of each part, so it is the ``5d`` combination with another geometry vector.

UNITER adds a token-type embedding before its last LN; that belongs to the model, not here.

Unified VLP (Zhou et al. 2020) does it differently (:class:`VLPRegionEmbedding`): the feature goes
through an MLP and takes the place of the region slot's *word* embedding, and the box does not join
the feature at all: it *replaces the slot's position embedding*, computed from a 6-d geometry
(x1, y1, x2, y2, area, detector confidence: :func:`detection_geometry`) and the detector's whole
class distribution, each LayerNorm-ed without parameters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from course_lib.features.roi_align import roi_align, validate_boxes
from course_lib.utils import check_one_of


@dataclass(frozen=True)
class GeometryPreset:
    size: int  # length of the geometry vector
    combine: str  # "sum_then_norm" | "norm_each_then_sum" | "average_of_norms"
    papers: str


GEOMETRY = {
    "5d": GeometryPreset(5, "sum_then_norm", "ViLBERT, Unicoder-VL"),
    "7d": GeometryPreset(7, "norm_each_then_sum", "UNITER"),
    "4d": GeometryPreset(4, "average_of_norms", "LXMERT"),
    "6d": GeometryPreset(6, "sum_then_norm", "Oscar"),
}


def box_geometry(boxes: torch.Tensor, image_size, kind: str = "5d") -> torch.Tensor:
    """Pixel boxes ``(N, 4)`` ``(x1, y1, x2, y2)`` -> geometry vectors ``(N, G)``, ``G = 5, 7, 4 or 6``.

    image_size: ``H`` or ``(H, W)``. All coordinates are divided by the image width or height:
    ``5d`` = (x1, y1, x2, y2, w*h), ``7d`` = (x1, y1, x2, y2, w, h, w*h), ``4d`` = (x1, y1, x2, y2),
    ``6d`` = (x1, y1, x2, y2, w, h).
    """
    check_one_of("kind", kind, GEOMETRY)
    H, W = (image_size, image_size) if isinstance(image_size, (int, float)) else image_size
    validate_boxes(boxes, (H, W))
    scale = boxes.new_tensor([W, H, W, H])
    corners = boxes / scale  # (N, 4) in [0, 1]
    w = corners[:, 2] - corners[:, 0]  # (N,)
    h = corners[:, 3] - corners[:, 1]  # (N,)
    extra = {"4d": [], "5d": [w * h], "7d": [w, h, w * h], "6d": [w, h]}[kind]
    return torch.cat([corners, *[e[:, None] for e in extra]], dim=1)  # (N, G)


class RegionTokens(NamedTuple):
    tokens: torch.Tensor  # (B, Nmax, D) embedded regions, zeros at padding
    mask: torch.Tensor  # (B, Nmax) bool, True for a real region
    pooled: torch.Tensor  # (B, Nmax, C) RoIAlign features before projection (MRFR targets)
    geometry: torch.Tensor  # (B, Nmax, G) geometry vectors


class RegionEmbedding(nn.Module):
    """Region features ``(..., F)`` + normalised boxes ``(..., 4)`` -> region embeddings ``(..., D)``.

    For features computed elsewhere (a detector's 2048-d vectors read from disk, ShapeWorld's pooled
    pixels): the projection and the paper's combination with the box geometry (module docstring).
    ``geometry="none"`` embeds the feature alone, as VisualBERT does (no box input).
    """

    def __init__(self, feature_dim: int, dim: int, geometry: str = "5d"):
        super().__init__()
        check_one_of("geometry", geometry, (*GEOMETRY, "none"))
        self.geometry = geometry
        self.feature_proj = nn.Linear(feature_dim, dim)
        if geometry == "none":
            return
        self.preset = GEOMETRY[geometry]
        self.geometry_proj = nn.Linear(self.preset.size, dim)
        if self.preset.combine == "sum_then_norm":
            self.norm = nn.LayerNorm(dim)
        else:
            self.feature_norm, self.geometry_norm = nn.LayerNorm(dim), nn.LayerNorm(dim)
            if self.preset.combine == "norm_each_then_sum":
                self.norm = nn.LayerNorm(dim)

    def combine(self, features: torch.Tensor, geometry: torch.Tensor) -> torch.Tensor:
        """``(K, C)`` pooled features + ``(K, G)`` geometry -> ``(K, D)`` region embeddings."""
        f, g = self.feature_proj(features), self.geometry_proj(geometry)
        if self.preset.combine == "sum_then_norm":  # ViLBERT
            return self.norm(f + g)
        f, g = self.feature_norm(f), self.geometry_norm(g)
        if self.preset.combine == "norm_each_then_sum":  # UNITER
            return self.norm(f + g)
        return (f + g) / 2  # LXMERT

    def forward(self, features: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """features ``(..., F)``, boxes ``(..., 4)`` in [0, 1] -> ``(..., D)`` (padding rows: any value)."""
        if self.geometry == "none":
            return self.feature_proj(features)
        flat = boxes.reshape(-1, 4).clamp(0.0, 1.0)
        geometry = box_geometry(flat, 1.0, self.geometry).reshape(*boxes.shape[:-1], -1)  # (..., G)
        return self.combine(features, geometry)


class RegionFeatures(RegionEmbedding):
    """Images ``(B, 3, H, W)`` + boxes ``list[(N_i, 4)]`` (pixels) -> :class:`RegionTokens`.

    The boxes may come from ground truth, ShapeWorld's simulated detector or a trained detector.
    RoIAlign (``output_size`` bins, average-pooled) on ``backbone``'s map gives a ``C``-vector per
    box; see the module docstring for how it is combined with the geometry. With
    ``train_backbone=False`` the backbone is frozen in place (``requires_grad_(False)``, no
    gradients, always in eval mode), as when the features come from a fixed detector, e.g.
    ``RegionFeatures(trained_detector.backbone, dim, train_backbone=False)``.
    """

    def __init__(self, backbone: nn.Module, dim: int, geometry: str = "5d", output_size: int = 7,
                 train_backbone: bool = True, sampling_ratio: int = 2):
        check_one_of("geometry", geometry, GEOMETRY)
        if not hasattr(backbone, "out_channels") or not hasattr(backbone, "stride"):
            raise ValueError("backbone must have out_channels and stride attributes (e.g. SmallCNN)")
        super().__init__(backbone.out_channels, dim, geometry)
        self.backbone, self.output_size, self.sampling_ratio = backbone, output_size, sampling_ratio
        self.train_backbone = train_backbone
        self.backbone.requires_grad_(train_backbone)

    def train(self, mode: bool = True):
        super().train(mode)
        if not self.train_backbone:
            self.backbone.eval()
        return self

    def forward(self, images: torch.Tensor, boxes: list[torch.Tensor]) -> RegionTokens:
        with torch.set_grad_enabled(self.train_backbone and torch.is_grad_enabled()):
            feature_map = self.backbone(images)  # (B, C, h, w)
        image_size = tuple(images.shape[-2:])
        pooled = roi_align(feature_map, boxes, self.output_size, 1.0 / self.backbone.stride,
                           self.sampling_ratio, aligned=True, image_size=image_size)  # (K, C, 7, 7)
        pooled = pooled.mean(dim=(2, 3))  # (K, C)
        all_boxes = torch.cat([b.to(pooled.dtype) for b in boxes])  # (K, 4)
        geometry = box_geometry(all_boxes, image_size, self.geometry)  # (K, G)
        tokens = self.combine(pooled, geometry)  # (K, D)
        return RegionTokens(*pad_regions([len(b) for b in boxes], tokens, pooled, geometry))


def pad_regions(counts: list[int], *flat: torch.Tensor):
    """Split ``(K, F)`` tensors by ``counts`` and pad to ``(B, Nmax, F)``; returns the padded tensors
    with the ``(B, Nmax)`` bool mask in second place."""
    B, n_max = len(counts), max(counts, default=0)
    counts_t = torch.tensor(counts, device=flat[0].device)
    mask = torch.arange(n_max, device=flat[0].device)[None, :] < counts_t[:, None]  # (B, Nmax)
    padded = []
    for x in flat:
        out = x.new_zeros(B, n_max, x.shape[-1])  # (B, Nmax, F)
        out[mask] = x  # mask is row-major, like the concatenated boxes
        padded.append(out)
    return padded[0], mask, *padded[1:]


def detection_geometry(boxes: torch.Tensor, class_probs: torch.Tensor) -> torch.Tensor:
    """Unified VLP's 6-d region geometry: boxes ``(..., 4)`` (x1, y1, x2, y2 in [0, 1]) and the
    detector's class distribution ``(..., C + 1)`` (last column "no object") -> ``(..., 6)`` =
    x1, y1, x2, y2, relative area, confidence (the probability of the top object class, the
    detector's score for the box)."""
    if boxes.shape[-1] != 4 or boxes.shape[:-1] != class_probs.shape[:-1]:
        raise ValueError(f"boxes (..., 4) and class_probs (..., C + 1) must agree on the leading dims, got "
                         f"{tuple(boxes.shape)} and {tuple(class_probs.shape)}")
    area = ((boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])).clamp(min=0)  # (...,)
    confidence = class_probs[..., :-1].max(dim=-1).values  # (...,)
    return torch.cat([boxes, area[..., None], confidence[..., None]], dim=-1)


class VLPRegionEmbedding(nn.Module):
    """Unified VLP's region tokens (``VLP/pytorch_pretrained_bert/modeling.py``, ``vis_embed`` and
    ``vis_pe_embed``): ``forward(feats (B, R, F), boxes (B, R, 4), class_probs (B, R, C + 1))`` ->
    ``(content (B, R, D), position (B, R, D))``.

    - ``content = Dropout(ReLU(W2 ReLU(W1 f)))`` with ``W1: F -> F`` (the paper starts it from the
      detector's own fc7 layer) and ``W2: F -> D``; it replaces the region slot's word embedding;
    - ``position = Dropout(ReLU(W [LN(g); LN(p)]))`` over the 6-d :func:`detection_geometry` ``g`` and
      the class distribution ``p``, both LayerNorm-ed without parameters (``F.layer_norm``, as the
      paper's data loader does); it replaces the slot's position embedding.

    The model adds the two and a segment embedding, then BERT's embedding LayerNorm.
    """

    def __init__(self, feature_dim: int, num_classes: int, dim: int, dropout: float = 0.0):
        super().__init__()
        for name, value in (("feature_dim", feature_dim), ("num_classes", num_classes), ("dim", dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        self.feature_dim, self.num_classes = feature_dim, num_classes
        self.content = nn.Sequential(nn.Linear(feature_dim, feature_dim), nn.ReLU(), nn.Linear(feature_dim, dim),
                                     nn.ReLU(), nn.Dropout(dropout))
        self.position = nn.Sequential(nn.Linear(6 + num_classes, dim), nn.ReLU(), nn.Dropout(dropout))

    def position_input(self, boxes: torch.Tensor, class_probs: torch.Tensor) -> torch.Tensor:
        """``(..., 6 + C + 1)``: the LayerNorm-ed geometry and class distribution, side by side."""
        geometry = detection_geometry(boxes, class_probs)
        return torch.cat([F.layer_norm(geometry, (6,)), F.layer_norm(class_probs, (self.num_classes,))], dim=-1)

    def forward(self, feats: torch.Tensor, boxes: torch.Tensor, class_probs: torch.Tensor):
        if feats.shape[-1] != self.feature_dim:
            raise ValueError(f"feats must have {self.feature_dim} features per region, got {tuple(feats.shape)}")
        if class_probs.shape[-1] != self.num_classes:
            raise ValueError(f"class_probs must have {self.num_classes} columns (classes + 'no object'), got "
                             f"{tuple(class_probs.shape)}")
        return self.content(feats), self.position(self.position_input(boxes, class_probs))
