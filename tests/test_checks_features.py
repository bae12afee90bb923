"""The grading functions of notebook 03 accept right answers and reject wrong ones with a message
that says what to fix."""

import math

import pytest
import torch

from course_lib.checks import ExerciseError
from course_lib.checks.features import check_bilinear_at_point, check_box_geometry_5d, check_patchify


# ------------------------------------------------------------------------------ patchify


def patchify_right(images, p):
    B, C, H, W = images.shape
    x = images.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(B, (H // p) * (W // p), C * p * p)


def patchify_loops(images, p):  # a slow but right answer passes too
    B, C, H, W = images.shape
    rows = [images[:, :, r:r + p, c:c + p].reshape(B, -1) for r in range(0, H, p) for c in range(0, W, p)]
    return torch.stack(rows, dim=1)


def test_patchify_accepts_right_answers(capsys):
    check_patchify(patchify_right)
    check_patchify(patchify_loops)
    assert capsys.readouterr().out.count("PASS check_patchify") == 2


def test_patchify_pixels_in_the_wrong_order():
    def channel_last(images, p):  # (row, column, channel) flattening: the right pixels, wrong layout
        B, C, H, W = images.shape
        x = images.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 3, 5, 1)
        return x.reshape(B, (H // p) * (W // p), C * p * p)

    with pytest.raises(ExerciseError, match="right pixels but in another order"):
        check_patchify(channel_last)


def test_patchify_mixed_patches():
    def plain_reshape(images, p):  # cuts rows of the image, not p x p squares
        B, C, H, W = images.shape
        return images.reshape(B, (H // p) * (W // p), C * p * p)

    with pytest.raises(ExerciseError, match="wrong order or mix pixels"):
        check_patchify(plain_reshape)


def test_patchify_stub_and_crash():
    def stub(images, p):
        raise NotImplementedError

    with pytest.raises(ExerciseError, match="not yet: fill in stub: it still raises NotImplementedError"):
        check_patchify(stub)
    with pytest.raises(ExerciseError, match="not yet: fill in <lambda>: it returned None"):
        check_patchify(lambda images, p: None)
    with pytest.raises(ExerciseError, match="wrong: <lambda> raised RuntimeError"):
        check_patchify(lambda images, p: images.reshape(-1, 7))
    with pytest.raises(ExerciseError, match="wrong: .*should be a torch.Tensor, got list"):
        check_patchify(lambda images, p: [])


# ------------------------------------------------------------------------------ geometry


def geometry_right(boxes, image_size):
    H, W = image_size
    corners = boxes / torch.tensor([W, H, W, H], dtype=boxes.dtype)
    area = (corners[:, 2] - corners[:, 0]) * (corners[:, 3] - corners[:, 1])
    return torch.cat([corners, area[:, None]], dim=1)


def test_geometry_accepts_right_answer(capsys):
    check_box_geometry_5d(geometry_right)
    assert "PASS check_box_geometry_5d" in capsys.readouterr().out


def test_geometry_hand_computed_case():
    # A 6 x 6 box at (4, 8) in a 32 x 32 image: (4/32, 8/32, 10/32, 14/32, 36/1024), by hand.
    got = geometry_right(torch.tensor([[4.0, 8.0, 10.0, 14.0]]), (32, 32))
    torch.testing.assert_close(got, torch.tensor([[0.125, 0.25, 0.3125, 0.4375, 36 / 1024]]))


def test_geometry_width_and_height_swapped():
    def swapped(boxes, image_size):
        H, W = image_size
        return geometry_right(boxes, (W, H))

    with pytest.raises(ExerciseError, match="divided by the width"):
        check_box_geometry_5d(swapped)


def test_geometry_area_in_pixels():
    def pixel_area(boxes, image_size):
        out = geometry_right(boxes, image_size)
        out[:, 4] = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        return out

    with pytest.raises(ExerciseError, match="differs from the expected values"):
        check_box_geometry_5d(pixel_area)


def test_geometry_missing_area():
    with pytest.raises(ExerciseError, match=r"shape \(2, 4\), expected \(2, 5\)"):
        check_box_geometry_5d(lambda boxes, size: boxes / size[0])


# ------------------------------------------------------------------------------ bilinear


def bilinear_right(fmap, y, x):
    h, w = fmap.shape[-2:]
    y0, x0 = min(int(math.floor(y)), h - 1), min(int(math.floor(x)), w - 1)
    y1, x1 = min(y0 + 1, h - 1), min(x0 + 1, w - 1)
    ty, tx = y - y0, x - x0
    return ((1 - ty) * (1 - tx) * fmap[:, y0, x0] + (1 - ty) * tx * fmap[:, y0, x1]
            + ty * (1 - tx) * fmap[:, y1, x0] + ty * tx * fmap[:, y1, x1])


def test_bilinear_accepts_right_answer(capsys):
    check_bilinear_at_point(bilinear_right)
    assert "PASS check_bilinear_at_point" in capsys.readouterr().out


def test_bilinear_hand_computed_value():
    # f = [[0, 1], [2, 3]]; at (y, x) = (0.5, 0.25): 0.5 * (0.25 * 1) + 0.5 * (2 + 0.25) = 1.25, by hand.
    fmap = torch.tensor([[[0.0, 1.0], [2.0, 3.0]]])
    torch.testing.assert_close(bilinear_right(fmap, 0.5, 0.25), torch.tensor([1.25]))


def test_bilinear_nearest_cell_is_rejected():
    def nearest(fmap, y, x):
        return fmap[:, round(y), round(x)]

    with pytest.raises(ExerciseError, match="differs from the expected values"):
        check_bilinear_at_point(nearest)


def test_bilinear_last_row_out_of_range():
    def no_clamp(fmap, y, x):  # indexes row h at y = h - 1
        y0, x0 = int(y), int(x)
        ty, tx = y - y0, x - x0
        return ((1 - ty) * (1 - tx) * fmap[:, y0, x0] + (1 - ty) * tx * fmap[:, y0, x0 + 1]
                + ty * (1 - tx) * fmap[:, y0 + 1, x0] + ty * tx * fmap[:, y0 + 1, x0 + 1])

    with pytest.raises(ExerciseError, match="raised IndexError"):
        check_bilinear_at_point(no_clamp)


def test_bilinear_x_and_y_swapped():
    with pytest.raises(ExerciseError):
        check_bilinear_at_point(lambda fmap, y, x: bilinear_right(fmap, x, y))
