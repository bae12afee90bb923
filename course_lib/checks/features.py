"""Checks for notebook 03 (image and video features): patchify, the 5-d box geometry and
bilinear interpolation at a point, graded against ``course_lib.features``."""

from __future__ import annotations

import torch

from course_lib.checks.verdict import call_learner, check_callable, expect, expect_close, passed
from course_lib.features.patch import patchify
from course_lib.features.region import box_geometry
from course_lib.features.roi_align import bilinear_weights


def check_patchify(patchify_fn) -> None:
    """``patchify_fn(images (B, C, H, W), p) -> (B, N, C*p*p)``: patches in raster order, each
    flattened channel first, then row, then column (the layout of a ``Conv2d`` kernel)."""
    name = "check_patchify"
    check_callable("patchify_fn", patchify_fn, name)
    g = torch.Generator().manual_seed(3)
    cases = [((2, 3, 32, 32), 8), ((1, 3, 32, 32), 4), ((2, 1, 12, 8), 4), ((1, 2, 6, 9), 3), ((3, 3, 4, 4), 4)]
    for shape, p in cases:
        images = torch.rand(shape, generator=g)
        want = patchify(images, p)
        got = call_learner(name, patchify_fn, images.clone(), p)
        if isinstance(got, torch.Tensor) and tuple(got.shape) == tuple(want.shape) and not torch.allclose(got, want):
            # The right values in the wrong order is the usual mistake: say which.
            same_patches = torch.allclose(got.sort(-1).values, want.sort(-1).values)
            hint = ("each patch holds the right pixels but in another order: flatten (channel, row, column), "
                    "i.e. permute to (B, gh, gw, C, p, p) before the last reshape") if same_patches else (
                    "patches come out in the wrong order or mix pixels of different patches: split H into "
                    "(gh, p) and W into (gw, p), then bring gh and gw to the front")
            expect(False, name, f"images of shape {shape} with p={p}: {hint}")
        expect_close(got, want, name, f"patchify(images of shape {shape}, p={p})", atol=0, rtol=0)
    passed(name, f"{len(cases)} image shapes (square and not, 1-3 channels) match course_lib.features.patch.patchify")


def check_box_geometry_5d(geometry_fn) -> None:
    """``geometry_fn(boxes (N, 4) pixels, image_size (H, W)) -> (N, 5)``:
    ``(x1/W, y1/H, x2/W, y2/H, area / (W*H))`` (ViLBERT's 5-d location feature)."""
    name = "check_box_geometry_5d"
    check_callable("geometry_fn", geometry_fn, name)
    g = torch.Generator().manual_seed(5)
    cases = [
        (torch.tensor([[0.0, 0.0, 32.0, 32.0], [4.0, 8.0, 10.0, 14.0]]), (32, 32)),
        (torch.tensor([[10.0, 5.0, 30.0, 15.0]]), (20, 40)),  # H != W: x is divided by W, y by H
    ]
    for n, (H, W) in ((6, (60, 80)), (3, (100, 50))):
        xy1 = torch.rand(n, 2, generator=g) * torch.tensor([W / 2, H / 2])
        wh = torch.rand(n, 2, generator=g) * torch.tensor([W / 2, H / 2])
        cases.append((torch.cat([xy1, xy1 + wh], dim=1), (H, W)))
    for boxes, (H, W) in cases:
        want = box_geometry(boxes, (H, W), "5d")
        got = call_learner(name, geometry_fn, boxes.clone(), (H, W))
        if isinstance(got, torch.Tensor) and got.shape == want.shape and H != W:
            swapped = want * torch.tensor([W / H, H / W, W / H, H / W, 1.0])  # x / H and y / W instead
            expect(not torch.allclose(got, swapped), name,
                   f"for an image of height {H} and width {W}, x must be divided by the width and y by the height")
        expect_close(got, want, name, f"geometry of boxes {boxes.tolist()} in a {H} x {W} image", atol=1e-6)
    passed(name, f"{len(cases)} sets of boxes (square and non-square images) match box_geometry(..., '5d')")


def _reference_bilinear(feature_map: torch.Tensor, y: float, x: float) -> torch.Tensor:
    """The value at ``(y, x)`` from course_lib's interpolation weights (the ones RoIAlign uses)."""
    _, h, w = feature_map.shape
    rows = bilinear_weights(torch.tensor([[float(y)]]), h)[0, 0]  # (h,)
    cols = bilinear_weights(torch.tensor([[float(x)]]), w)[0, 0]  # (w,)
    return torch.einsum("i,cij,j->c", rows, feature_map, cols)  # (C,)


def check_bilinear_at_point(interpolate_fn) -> None:
    """``interpolate_fn(feature_map (C, h, w), y, x) -> (C,)``: bilinear interpolation at a point with
    ``0 <= y <= h - 1`` and ``0 <= x <= w - 1`` (cell ``(i, j)`` has its centre at ``y = i, x = j``)."""
    name = "check_bilinear_at_point"
    check_callable("interpolate_fn", interpolate_fn, name)
    g = torch.Generator().manual_seed(7)
    fmap = torch.randn(4, 5, 6, generator=g)
    points = [(2.0, 3.0), (1.25, 2.5), (0.0, 0.0), (4.0, 5.0), (4.0, 0.3), (3.7, 5.0), (0.5, 0.5)]
    points += [(float(u) * 4, float(v) * 5) for u, v in torch.rand(8, 2, generator=g)]
    for y, x in points:
        want = _reference_bilinear(fmap, y, x)
        got = call_learner(name, interpolate_fn, fmap.clone(), y, x)
        expect_close(got, want, name, f"the value at (y={y:.3g}, x={x:.3g}) of a (4, 5, 6) map", atol=1e-5)
    ramp = torch.arange(6.0).expand(1, 5, 6)  # f(y, x) = x: interpolation must give x back
    got = call_learner(name, interpolate_fn, ramp.clone(), 2.0, 3.25)
    expect_close(got, torch.tensor([3.25]), name, "the value at x = 3.25 of a map equal to its column index")
    passed(name, f"{len(points) + 1} points, the map's corners and last row/column included, match the "
                 "interpolation weights of course_lib.features.roi_align")
