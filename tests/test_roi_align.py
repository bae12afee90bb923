"""RoIAlign: vectorised version vs a slow loop that follows torchvision's C++ kernel line by line,
plus hand-computed values. Tolerance: 1e-5 absolute (float32; values are O(1))."""

import math

import pytest
import torch

from course_lib.features.roi_align import roi_align


def bilinear_reference(fmap, y, x):
    """torchvision's ``bilinear_interpolate`` (roi_align_kernel.cpp), one sample, all channels."""
    _, height, width = fmap.shape
    if y < -1.0 or y > height or x < -1.0 or x > width:
        return torch.zeros(fmap.shape[0], dtype=fmap.dtype)
    y, x = max(y, 0.0), max(x, 0.0)
    y_low, x_low = int(y), int(x)
    if y_low >= height - 1:
        y_high = y_low = height - 1
        y = float(y_low)
    else:
        y_high = y_low + 1
    if x_low >= width - 1:
        x_high = x_low = width - 1
        x = float(x_low)
    else:
        x_high = x_low + 1
    ly, lx = y - y_low, x - x_low
    hy, hx = 1.0 - ly, 1.0 - lx
    return (hy * hx * fmap[:, y_low, x_low] + hy * lx * fmap[:, y_low, x_high]
            + ly * hx * fmap[:, y_high, x_low] + ly * lx * fmap[:, y_high, x_high])


def roi_align_reference(features, rois, output_size, spatial_scale, sampling_ratio, aligned):
    """Slow loop over boxes, bins and samples; rois (K, 5) with the batch index first."""
    ph, pw = output_size
    out = torch.zeros(len(rois), features.shape[1], ph, pw, dtype=features.dtype)
    offset = 0.5 if aligned else 0.0
    for k, (b, x1, y1, x2, y2) in enumerate(rois.tolist()):
        start_w, start_h = x1 * spatial_scale - offset, y1 * spatial_scale - offset
        roi_w, roi_h = x2 * spatial_scale - offset - start_w, y2 * spatial_scale - offset - start_h
        if not aligned:
            roi_w, roi_h = max(roi_w, 1.0), max(roi_h, 1.0)
        bin_h, bin_w = roi_h / ph, roi_w / pw
        g = sampling_ratio
        for i in range(ph):
            for j in range(pw):
                total = torch.zeros(features.shape[1], dtype=features.dtype)
                for iy in range(g):
                    y = start_h + i * bin_h + (iy + 0.5) * bin_h / g
                    for ix in range(g):
                        x = start_w + j * bin_w + (ix + 0.5) * bin_w / g
                        total += bilinear_reference(features[int(b)], y, x)
                out[k, :, i, j] = total / (g * g)
    return out


def random_rois(generator, batch, count, image_h, image_w):
    """Valid pixel boxes (K, 5), some touching the image border, some degenerate (zero width)."""
    xy = torch.rand(count, 4, generator=generator) * torch.tensor([image_w, image_h, image_w, image_h])
    x1, x2 = torch.minimum(xy[:, 0], xy[:, 2]), torch.maximum(xy[:, 0], xy[:, 2])
    y1, y2 = torch.minimum(xy[:, 1], xy[:, 3]), torch.maximum(xy[:, 1], xy[:, 3])
    x1[0], y1[0], x2[0], y2[0] = 0.0, 0.0, image_w, image_h  # the whole image
    x2[1] = x1[1]  # zero width
    index = torch.randint(batch, (count,), generator=generator).float()
    return torch.stack([index, x1, y1, x2, y2], dim=1)


@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("output_size,spatial_scale,sampling_ratio", [((7, 7), 0.25, 2), ((3, 5), 0.125, 1), ((2, 2), 1.0, 3)])
def test_matches_slow_reference_loop(aligned, output_size, spatial_scale, sampling_ratio):
    g = torch.Generator().manual_seed(0)
    features = torch.randn(2, 3, 6, 9, generator=g)  # (B, C, h, w), not square on purpose
    image_h, image_w = 6 / spatial_scale, 9 / spatial_scale
    rois = random_rois(g, 2, 12, image_h, image_w)
    fast = roi_align(features, rois, output_size, spatial_scale, sampling_ratio, aligned)
    slow = roi_align_reference(features, rois, output_size, spatial_scale, sampling_ratio, aligned)
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=0)


def test_list_of_boxes_equals_batch_index_rows():
    g = torch.Generator().manual_seed(1)
    features = torch.randn(2, 4, 8, 8, generator=g)
    boxes = [torch.tensor([[1.0, 2.0, 5.0, 7.0]]), torch.tensor([[0.0, 0.0, 8.0, 8.0], [3.0, 1.0, 4.0, 2.0]])]
    rows = torch.tensor([[0, 1.0, 2.0, 5.0, 7.0], [1, 0.0, 0.0, 8.0, 8.0], [1, 3.0, 1.0, 4.0, 2.0]])
    torch.testing.assert_close(roi_align(features, boxes, 3), roi_align(features, rows, 3), atol=0, rtol=0)


def test_constant_map_gives_the_constant():
    features = torch.full((1, 2, 5, 5), 3.5)
    boxes = [torch.tensor([[0.0, 0.0, 5.0, 5.0], [1.2, 0.3, 4.9, 2.2], [2.0, 2.0, 2.0, 2.0]])]
    out = roi_align(features, boxes, (4, 4), spatial_scale=1.0, sampling_ratio=2)
    torch.testing.assert_close(out, torch.full((3, 2, 4, 4), 3.5), atol=1e-6, rtol=0)


def test_linear_ramp_hand_computed():
    # f[y, x] = x. Bilinear interpolation of a linear function is exact, so each bin is the mean of
    # its sample x-coordinates. Box x in [1.5, 5.5] px, aligned: [1.0, 5.0] cells; 2 bins of width 2;
    # samples at 1.5, 2.5 (mean 2.0) and 3.5, 4.5 (mean 4.0).
    ramp = torch.arange(8.0).expand(1, 1, 8, 8)
    out = roi_align(ramp, [torch.tensor([[1.5, 0.5, 5.5, 4.5]])], (1, 2), sampling_ratio=2)
    torch.testing.assert_close(out.flatten(), torch.tensor([2.0, 4.0]), atol=1e-6, rtol=0)
    # Whole 4-cell map in 4 bins: samples (-0.25, 0.25) -> -0.25 is clamped to 0: (0 + 0.25) / 2;
    # last bin (2.75, 3.25) -> 3.25 is past the last cell, clamped to 3: (2.75 + 3) / 2.
    ramp4 = torch.arange(4.0).expand(1, 1, 4, 4)
    out = roi_align(ramp4, [torch.tensor([[0.0, 0.0, 4.0, 4.0]])], (1, 4), sampling_ratio=2)
    torch.testing.assert_close(out.flatten(), torch.tensor([0.125, 1.0, 2.0, 2.875]), atol=1e-6, rtol=0)


def test_two_dimensional_ramp_with_stride():
    # f[y, x] = 10 y + x on a stride-4 map: a bin's value is 10 * (centre y) + (centre x) in cells.
    h = w = 8
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    fmap = (10 * ys + xs)[None, None]  # (1, 1, 8, 8)
    box = torch.tensor([[6.0, 10.0, 22.0, 18.0]])  # pixels -> cells [1.5, 2.5, 5.5, 4.5], aligned -> [1, 2, 5, 4]
    out = roi_align(fmap, [box], (2, 2), spatial_scale=0.25, sampling_ratio=2)
    expected = torch.tensor([[10 * 2.5 + 2.0, 10 * 2.5 + 4.0], [10 * 3.5 + 2.0, 10 * 3.5 + 4.0]])
    torch.testing.assert_close(out[0, 0], expected, atol=1e-5, rtol=0)


def test_gradient_flows_to_features():
    features = torch.randn(1, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    boxes = [torch.tensor([[0.5, 1.0, 3.0, 4.0]], dtype=torch.float64)]
    assert torch.autograd.gradcheck(lambda f: roi_align(f, boxes, 2), (features,))


@pytest.mark.parametrize(
    "boxes,match",
    [
        ([torch.tensor([[0.0, 0.0, 4.0, 4.0], [5.0, 1.0, 2.0, 3.0]])], r"boxes\[0\].*box 1 .*x2 < x1"),
        ([torch.tensor([[0.0, 0.0, 4.0, 40.0]])], r"boxes\[0\].*box 0 .*outside"),
        ([torch.tensor([[-3.0, 0.0, 4.0, 4.0]])], r"boxes\[0\].*outside"),
        ([torch.tensor([[0.0, 0.0, math.nan, 4.0]])], r"boxes\[0\].*not finite"),
        ([torch.zeros(2, 3)], r"boxes\[0\] must have shape \(\*, 4\)"),
        ([torch.zeros(1, 4), torch.zeros(1, 4)], r"boxes must be a list with one"),
        (torch.tensor([[1.0, 0.0, 0.0, 2.0, 2.0]]), r"boxes\[:, 0\] must be batch indices"),
    ],
)
def test_bad_boxes_name_the_argument_and_the_box(boxes, match):
    features = torch.zeros(1, 1, 4, 4)  # stride 4 -> a 16 x 16 image
    with pytest.raises(ValueError, match=match):
        roi_align(features, boxes, 2, spatial_scale=0.25)


def test_bad_features_and_options():
    with pytest.raises(ValueError, match="features"):
        roi_align(torch.zeros(1, 4, 4), [torch.zeros(0, 4)])
    with pytest.raises(ValueError, match="sampling_ratio"):
        roi_align(torch.zeros(1, 1, 4, 4), [torch.zeros(0, 4)], sampling_ratio=0)
