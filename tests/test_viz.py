"""Plotting helpers (course_lib.viz): each returns its Axes/Figure with the expected artists."""

import matplotlib

matplotlib.use("Agg")  # headless; set here rather than through MPLBACKEND (which would leak into notebooks)

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from course_lib import viz  # noqa: E402
from course_lib.train import History  # noqa: E402


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def rectangles(ax):
    return [p for p in ax.patches if isinstance(p, Rectangle)]


def test_to_numpy_image_layouts_and_dtypes():
    chw = torch.rand(3, 5, 7)
    hwc_uint8 = (chw.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    out = viz.to_numpy_image(chw)
    assert out.shape == (5, 7, 3) and out.dtype == np.float32
    np.testing.assert_allclose(out, chw.permute(1, 2, 0).numpy(), atol=0)
    np.testing.assert_allclose(viz.to_numpy_image(hwc_uint8), out, atol=0.5 / 255 + 1e-7)  # uint8 rounding
    grey = viz.to_numpy_image(torch.rand(5, 7))
    assert grey.shape == (5, 7, 3) and np.array_equal(grey[..., 0], grey[..., 2])
    assert viz.to_numpy_image(torch.rand(1, 4, 4)).shape == (4, 4, 3)
    assert viz.to_numpy_image(np.zeros((3, 4, 3), dtype=np.float32)).shape == (3, 4, 3)  # array: HWC wins


@pytest.mark.parametrize(
    "bad, match",
    [
        (torch.rand(2, 3, 4, 4), "image_grid"),
        (torch.rand(5, 4, 4), "channels"),
        (torch.rand(3, 4, 4) * 3 - 1, r"\[0, 1\]"),
        (np.zeros((4, 4, 3), dtype=np.int64), "dtype"),
    ],
)
def test_to_numpy_image_rejects_bad_images(bad, match):
    with pytest.raises(ValueError, match=f"image.*{match}"):
        viz.to_numpy_image(bad)


def test_show_image_and_scene_draw_one_rectangle_per_box():
    image = torch.rand(3, 32, 32)
    ax = viz.show_image(image, title="a scene")
    assert isinstance(ax, plt.Axes) and ax.get_title() == "a scene" and len(ax.images) == 1
    boxes = np.array([[1, 2, 10, 12], [15, 15, 30, 31], [0, 0, 32, 32]], dtype=np.float32)
    ax = viz.show_scene(image, boxes, labels=["red circle", "blue square", "all"],
                        captions=["a red circle left of a blue square", "two shapes"])
    assert len(rectangles(ax)) == 3
    assert rectangles(ax)[0].get_xy() == (0.5, 1.5) and rectangles(ax)[0].get_width() == 9  # pixel edges
    texts = [t.get_text() for t in ax.texts]
    assert {"red circle", "blue square", "all"} <= set(texts)
    assert "a red circle left of a blue square\ntwo shapes" in texts


def test_draw_boxes_on_existing_axes_and_bad_boxes():
    _, ax = plt.subplots()
    assert viz.draw_boxes(ax, torch.tensor([[0.0, 0.0, 4.0, 4.0]]), color=["red"]) is ax
    assert len(rectangles(ax)) == 1
    assert len(rectangles(viz.draw_boxes(ax, np.zeros((0, 4))))) == 1  # no boxes: nothing added
    with pytest.raises(ValueError, match="boxes must have shape"):
        viz.draw_boxes(ax, np.zeros((2, 3)))
    with pytest.raises(ValueError, match=r"boxes must have x1 <= x2.*box 1"):
        viz.draw_boxes(ax, np.array([[0, 0, 1, 1], [5, 0, 1, 1]]))
    with pytest.raises(ValueError, match="labels"):
        viz.draw_boxes(ax, np.zeros((2, 4)), labels=["one"])
    with pytest.raises(ValueError, match="color"):
        viz.draw_boxes(ax, np.zeros((2, 4)), color=["red"])


def test_image_grid_layout_and_titles():
    fig = viz.image_grid(torch.rand(5, 3, 8, 8), titles=list("abcde"), ncols=3)
    assert isinstance(fig, plt.Figure)
    assert len(fig.axes) == 6  # 2 rows x 3 columns, the last one blank
    assert [ax.get_title() for ax in fig.axes[:5]] == list("abcde")
    assert sum(len(ax.images) for ax in fig.axes) == 5
    assert len(viz.image_grid([np.zeros((8, 8, 3), np.uint8)] * 2).axes) == 2
    with pytest.raises(ValueError, match="titles"):
        viz.image_grid(torch.rand(2, 3, 8, 8), titles=["only one"])
    with pytest.raises(ValueError, match="images"):
        viz.image_grid(torch.rand(3, 8, 8))
    with pytest.raises(ValueError, match="ncols"):
        viz.image_grid(torch.rand(2, 3, 8, 8), ncols=0)


def test_plot_losses_labels_and_smoothing():
    history = History([{"step": s, "loss": 1.0 / s} for s in range(1, 21)])
    ax = viz.plot_losses({"clip": history, "baseline": [2.0, 1.0, 0.5]})
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["clip", "baseline"]
    assert list(ax.lines[0].get_xdata()) == list(range(1, 21))
    smoothed = viz.plot_losses(history, smooth=0.5)
    assert len(smoothed.lines) == 2  # faint raw curve + labelled smoothed one
    assert [t.get_text() for t in smoothed.get_legend().get_texts()] == ["loss"]
    # Debiased EMA by hand: first value kept; second = (0.5*0.5*1 + 0.5*0.5) / (1 - 0.25) = 2/3
    np.testing.assert_allclose(smoothed.lines[1].get_ydata()[:2], [1.0, 2 / 3], atol=1e-12)
    with pytest.raises(ValueError, match="smooth"):
        viz.plot_losses(history, smooth=1.0)
    with pytest.raises(ValueError, match="histories"):
        viz.plot_losses({"x": "not a history"})


def test_attention_heatmap_and_labels():
    attn = torch.softmax(torch.randn(3, 5), dim=-1)
    ax = viz.attention_heatmap(attn, query_labels=["a", "red", "circle"], key_labels=list("vwxyz"), title="head 0")
    assert len(ax.images) == 1 and ax.get_title() == "head 0"
    np.testing.assert_allclose(ax.images[0].get_array(), attn.numpy(), atol=0)
    assert [t.get_text() for t in ax.get_yticklabels()] == ["a", "red", "circle"]
    with pytest.raises(ValueError, match="attn"):
        viz.attention_heatmap(torch.rand(2, 3, 5))
    with pytest.raises(ValueError, match="key_labels"):
        viz.attention_heatmap(attn, key_labels=["only", "two"])


def test_attention_on_image_upsamples_to_image_size():
    weights = torch.zeros(16)
    weights[5] = 1.0  # patch (row 1, col 1) of a 4 x 4 grid over a 32 x 32 image
    ax = viz.attention_on_image(torch.rand(3, 32, 32), weights)
    assert len(ax.images) == 2
    heat = np.asarray(ax.images[1].get_array())
    assert heat.shape == (32, 32) and heat.max() == pytest.approx(1.0) and heat.min() == 0.0
    row, col = np.unravel_index(heat.argmax(), heat.shape)
    assert 8 <= row < 16 and 8 <= col < 16  # the peak sits inside that patch
    wide = viz.attention_on_image(torch.rand(3, 16, 32), torch.rand(8), grid=(2, 4))
    assert wide.images[1].get_array().shape == (16, 32)
    with pytest.raises(ValueError, match="grid"):
        viz.attention_on_image(torch.rand(3, 32, 32), torch.rand(12))
    with pytest.raises(ValueError, match="grid"):
        viz.attention_on_image(torch.rand(3, 32, 32), torch.rand(12), grid=(3, 3))
    with pytest.raises(ValueError, match="weights"):
        viz.attention_on_image(torch.rand(3, 32, 32), torch.rand(4, 4))


def test_plot_similarity():
    sim = torch.randn(4, 6)
    ax = viz.plot_similarity(sim)
    assert ax.get_xlabel() == "text" and ax.get_ylabel() == "image"
    np.testing.assert_allclose(ax.images[0].get_array(), sim.numpy(), atol=0)
    with pytest.raises(ValueError, match="sim"):
        viz.plot_similarity(torch.randn(4))
