"""RoIAlign (Mask R-CNN, He et al., 2017), written from scratch with bilinear sampling.

Each box (in image pixels) is mapped onto the feature map (``* spatial_scale``), split into
``ph x pw`` bins, and each bin is the average of ``g x g`` bilinearly interpolated samples
(``g = sampling_ratio``) at the centres of a regular sub-grid. No coordinate is ever rounded,
which is what distinguishes RoIAlign from RoIPool. ``aligned=True`` shifts boxes by half a cell,
so a pixel box ``[0, W]`` covers the map's cells ``0 .. w-1`` exactly (torchvision's convention).

The trick that vectorises it: bilinear interpolation is separable, ``f(y, x) = sum_ij a_i(y) b_j(x)
f[i, j]``, and so is the bin average. For each box we build a row-weight matrix ``A (ph, h)`` and a
column-weight matrix ``Bm (pw, w)``, and the pooled output is two matrix products ``A F Bm^T``
(batched over the boxes of each image).
Sample points follow torchvision's ``roi_align_kernel.cpp``: a sample more than one cell outside the
map counts as 0, a sample past the last row/column is clamped onto it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from course_lib.utils import check_shape


def _pair(size) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else tuple(size)


def validate_boxes(boxes: torch.Tensor, image_size, name: str = "boxes", first_index: int = 0) -> None:
    """Raise ``ValueError`` naming ``name`` and the box unless each row is a finite pixel box
    ``(x1, y1, x2, y2)`` with ``0 <= x1 <= x2 <= W`` and ``0 <= y1 <= y2 <= H``.

    ``boxes``: ``(N, 4)``; ``image_size``: ``H`` or ``(H, W)`` in pixels. ``first_index`` offsets
    the index printed in the message (for boxes that are part of a larger list).
    """
    check_shape(name, boxes, (None, 4))
    H, W = _pair(image_size)
    tol = 1e-4 * max(H, W)  # float rounding of boxes that were rescaled
    x1, y1, x2, y2 = boxes.detach().unbind(-1)
    problems = [
        (~torch.isfinite(boxes.detach()).all(-1), "is not finite"),
        ((x2 < x1) | (y2 < y1), "has x2 < x1 or y2 < y1"),
        ((x1 < -tol) | (y1 < -tol) | (x2 > W + tol) | (y2 > H + tol), f"is outside the {H} x {W} image"),
    ]
    for bad, what in problems:
        if bad.any():
            i = int(bad.nonzero()[0, 0])
            box = ", ".join(f"{v:g}" for v in boxes[i].tolist())
            raise ValueError(
                f"{name} must hold pixel boxes (x1, y1, x2, y2) with 0 <= x1 <= x2 <= {W} and "
                f"0 <= y1 <= y2 <= {H}; box {first_index + i} ({box}) {what}"
            )


def boxes_to_rois(boxes, batch_size: int, image_size, dtype=torch.float32) -> torch.Tensor:
    """``list[(N_i, 4)]`` (one entry per image) or ``(K, 5)`` rows ``(b, x1, y1, x2, y2)`` -> ``(K, 5)``.

    Validates every box (see :func:`validate_boxes`).
    """
    if isinstance(boxes, (list, tuple)):
        if len(boxes) != batch_size:
            raise ValueError(f"boxes must be a list with one (N_i, 4) tensor per image ({batch_size}), got {len(boxes)}")
        rois = []
        for b, image_boxes in enumerate(boxes):
            validate_boxes(image_boxes, image_size, name=f"boxes[{b}]")
            image_boxes = image_boxes.to(dtype)
            index = torch.full_like(image_boxes[:, :1], float(b))  # (N_b, 1)
            rois.append(torch.cat([index, image_boxes], dim=1))  # (N_b, 5)
        return torch.cat(rois) if rois else torch.zeros(0, 5, dtype=dtype)
    check_shape("boxes", boxes, (None, 5))
    index = boxes[:, 0]
    bad = (index != index.round()) | (index < 0) | (index >= batch_size)
    if bad.any():
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"boxes[:, 0] must be batch indices in [0, {batch_size}); row {i} has {index[i].item():g}")
    validate_boxes(boxes[:, 1:], image_size, name="boxes")
    return boxes.to(dtype)


def bilinear_weights(coords: torch.Tensor, size: int) -> torch.Tensor:
    """Interpolation weights of sample positions ``coords (K, S)`` on an axis of ``size`` cells
    -> ``(K, S, size)``: row ``s`` holds ``1 - t`` at ``floor(c)`` and ``t`` at ``floor(c) + 1``."""
    inside = (coords >= -1.0) & (coords <= size)  # farther out: the sample is 0
    c = coords.clamp(min=0.0)
    low = c.floor().long()
    past_end = low >= size - 1
    low = low.clamp(max=size - 1)  # (K, S)
    high = (low + 1).clamp(max=size - 1)  # (K, S)
    t = torch.where(past_end, torch.zeros_like(c), c - low.to(c.dtype))  # (K, S) fraction towards high
    weights = (1 - t)[..., None] * F.one_hot(low, size) + t[..., None] * F.one_hot(high, size)  # (K, S, size)
    return weights * inside[..., None]


def _bin_weights(start: torch.Tensor, length: torch.Tensor, bins: int, samples: int, size: int) -> torch.Tensor:
    """Average interpolation weights per bin: ``(K, bins, size)`` for boxes ``[start, start + length)``."""
    K = start.shape[0]
    bin_len = length / bins  # (K,)
    steps = torch.arange(bins, dtype=start.dtype, device=start.device)[:, None]  # (bins, 1)
    sub = (torch.arange(samples, dtype=start.dtype, device=start.device) + 0.5) / samples  # (g,)
    coords = start[:, None, None] + (steps + sub)[None] * bin_len[:, None, None]  # (K, bins, g)
    w = bilinear_weights(coords.reshape(K, bins * samples), size)  # (K, bins*g, size)
    return w.reshape(K, bins, samples, size).mean(2)  # (K, bins, size)


def roi_align(features: torch.Tensor, boxes, output_size=(7, 7), spatial_scale: float = 1.0,
              sampling_ratio: int = 2, aligned: bool = True, image_size=None) -> torch.Tensor:
    """Pool a ``(ph, pw)`` grid of features inside each box.

    features: ``(B, C, h, w)`` feature map. boxes: ``list[(N_i, 4)]`` pixel boxes per image, or
    ``(K, 5)`` rows ``(batch_index, x1, y1, x2, y2)``. spatial_scale: map cells per pixel
    (``1 / stride``). sampling_ratio: ``g`` samples per bin and axis (must be >= 1; torchvision's
    adaptive ``<= 0`` is not supported). image_size: ``(H, W)`` pixels used to validate boxes,
    default ``(h / spatial_scale, w / spatial_scale)``.

    Returns ``(K, C, ph, pw)`` in box order (image 0's boxes first for a list).
    """
    check_shape("features", features, (None, None, None, None))
    B, C, h, w = features.shape
    ph, pw = _pair(output_size)
    if ph < 1 or pw < 1:
        raise ValueError(f"output_size must be positive, got {output_size!r}")
    if not isinstance(sampling_ratio, int) or sampling_ratio < 1:
        raise ValueError(f"sampling_ratio must be an int >= 1, got {sampling_ratio!r}")
    if not (spatial_scale > 0 and math.isfinite(spatial_scale)):
        raise ValueError(f"spatial_scale must be a positive number, got {spatial_scale!r}")
    if image_size is None:
        image_size = (h / spatial_scale, w / spatial_scale)
    rois = boxes_to_rois(boxes, B, image_size, features.dtype).to(features.device)  # (K, 5)

    offset = 0.5 if aligned else 0.0
    x1, y1, x2, y2 = (rois[:, 1:] * spatial_scale - offset).unbind(-1)  # each (K,), in map cells
    roi_w, roi_h = x2 - x1, y2 - y1
    if not aligned:  # the legacy convention forces boxes to be at least one cell
        roi_w, roi_h = roi_w.clamp(min=1.0), roi_h.clamp(min=1.0)

    rows = _bin_weights(y1, roi_h, ph, sampling_ratio, h).to(features.dtype)  # (K, ph, h)
    cols = _bin_weights(x1, roi_w, pw, sampling_ratio, w).to(features.dtype)  # (K, pw, w)
    image_of_box = rois[:, 0].long()  # (K,)
    out = features.new_zeros(len(rois), C, ph, pw)
    for b in image_of_box.unique().tolist():  # one pair of matrix products per image, not per box
        k = (image_of_box == b).nonzero()[:, 0]  # boxes of image b
        out[k] = torch.einsum("nyh,chw,nxw->ncyx", rows[k], features[b], cols[k])  # (n, C, ph, pw)
    return out
