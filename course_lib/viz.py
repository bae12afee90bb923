"""Figures for the notebooks: images with boxes and captions, galleries, loss curves, attention maps.

Every function draws with matplotlib and returns the ``Axes`` (or ``Figure``) it drew on; none calls
``plt.show()``, so the notebooks decide when to display and tests can inspect the artists.
Images may be torch tensors ``(3, H, W)`` / ``(H, W)`` or NumPy arrays ``(H, W, 3)`` / ``(H, W)``,
float in [0, 1] or uint8 in [0, 255].
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.patches import Rectangle


def _as_numpy(name: str, value) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().float().numpy() if value.is_floating_point() else value.detach().cpu().numpy()
    if isinstance(value, (np.ndarray, list, tuple)):
        return np.asarray(value)
    raise ValueError(f"{name} must be a torch.Tensor or a NumPy array, got {type(value).__name__}")


def to_numpy_image(image, name: str = "image") -> np.ndarray:
    """Any single image -> float32 NumPy ``(H, W, 3)`` in [0, 1].

    Accepts ``(3, H, W)`` / ``(1, H, W)`` (torch's channel-first layout, preferred for tensors),
    ``(H, W, 3)`` / ``(H, W, 1)`` (preferred for arrays) and grey ``(H, W)``; uint8 is divided by 255.
    Float values outside [0, 1] raise (undo a normalisation before plotting).
    """
    is_tensor = isinstance(image, torch.Tensor)
    array = _as_numpy(name, image)
    if array.ndim == 2:
        array = array[:, :, None]
    elif array.ndim == 3:
        first, last = array.shape[0] in (1, 3), array.shape[2] in (1, 3)
        if first and (is_tensor or not last):
            array = array.transpose(1, 2, 0)
        elif not last:
            raise ValueError(f"{name} must have 1 or 3 channels, got shape {array.shape}")
    else:
        raise ValueError(
            f"{name} must be one image (3, H, W), (H, W, 3) or (H, W), got shape {array.shape}"
            + ("; use image_grid for a batch" if array.ndim == 4 else "")
        )
    if array.dtype == np.uint8:
        array = array.astype(np.float32) / 255.0
    elif array.dtype == np.bool_ or not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"{name} must be float in [0, 1] or uint8, got dtype {array.dtype}")
    array = array.astype(np.float32)
    if not np.isfinite(array).all():
        raise ValueError(f"{name} contains NaN or inf values")
    low, high = float(array.min()), float(array.max())
    if low < -1e-3 or high > 1 + 1e-3:
        raise ValueError(
            f"{name} has float values in [{low:.3f}, {high:.3f}]; expected [0, 1] (undo the normalisation)"
        )
    if array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    return np.clip(array, 0.0, 1.0)


def _new_axes(ax, figsize=(3, 3)):
    if ax is None:
        _, ax = plt.subplots(figsize=figsize)
    return ax


def show_image(image, ax=None, title: str | None = None):
    """Draw one image without axis ticks; returns the ``Axes``."""
    array = to_numpy_image(image)
    ax = _new_axes(ax)
    ax.imshow(array, interpolation="nearest")
    ax.set_axis_off()
    if title is not None:
        ax.set_title(title, fontsize=9)
    return ax


def draw_boxes(ax, boxes, labels: Sequence[str] | None = None, color="yellow", linewidth: float = 1.5):
    """Draw pixel boxes ``(N, 4)`` as x1, y1, x2, y2 rectangles (and optional labels) on ``ax``.

    ``color`` is one matplotlib colour (a name or an RGB tuple) or a list of N colours. Returns ``ax``.
    """
    boxes = _as_numpy("boxes", boxes).astype(np.float64)
    if boxes.size == 0:
        boxes = boxes.reshape(0, 4)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes must have shape (N, 4) as x1, y1, x2, y2 pixels, got {boxes.shape}")
    bad = (boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1]) | ~np.isfinite(boxes).all(axis=1)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"boxes must have x1 <= x2 and y1 <= y2; box {i} is {tuple(boxes[i].round(2))}")
    if labels is not None and len(labels) != len(boxes):
        raise ValueError(f"labels must have one entry per box ({len(boxes)}), got {len(labels)}")
    colors = list(color) if isinstance(color, list) else [color] * len(boxes)
    if len(colors) != len(boxes):
        raise ValueError(f"color must be one colour or one per box ({len(boxes)}), got {len(colors)}")
    for i, (x1, y1, x2, y2) in enumerate(boxes):
        # Pixel edges sit at -0.5 in imshow's coordinates, so shift the box to line up with pixels.
        corner = (x1 - 0.5, y1 - 0.5)
        ax.add_patch(Rectangle(corner, x2 - x1, y2 - y1, fill=False, edgecolor=colors[i], linewidth=linewidth))
        if labels is not None:
            ax.text(*corner, str(labels[i]), color="black", fontsize=7, va="bottom",
                    bbox={"facecolor": colors[i], "alpha": 0.7, "pad": 1, "edgecolor": "none"})
    return ax


def show_scene(image, boxes=None, labels=None, captions: str | Sequence[str] | None = None, ax=None):
    """An image with its boxes (pixel xyxy) and labels, and its captions written under it."""
    ax = show_image(image, ax=ax)
    if boxes is not None:
        draw_boxes(ax, boxes, labels)
    elif labels is not None:
        raise ValueError("labels were given without boxes; pass boxes (N, 4) too")
    if captions is not None:
        captions = [captions] if isinstance(captions, str) else list(captions)
        if not all(isinstance(c, str) for c in captions):
            raise ValueError("captions must be a str or a list of str")
        ax.text(0.5, -0.03, "\n".join(captions), transform=ax.transAxes, ha="center", va="top", fontsize=8, wrap=True)
    return ax


def image_grid(images, titles: Sequence[str] | None = None, ncols: int = 8, figsize=None):
    """A gallery of images, ``ncols`` per row; returns the ``Figure``.

    images: a batch ``(B, 3, H, W)`` / ``(B, H, W, 3)`` or a list of single images.
    """
    if isinstance(images, (torch.Tensor, np.ndarray)):
        if images.ndim != 4:
            raise ValueError(f"images must be a batch (B, 3, H, W) or (B, H, W, 3), got shape {tuple(images.shape)}")
        images = list(images)
    elif not isinstance(images, Sequence):
        raise ValueError(f"images must be a batch tensor/array or a list of images, got {type(images).__name__}")
    if len(images) == 0:
        raise ValueError("images is empty")
    if not isinstance(ncols, int) or ncols < 1:
        raise ValueError(f"ncols must be a positive int, got {ncols!r}")
    if titles is not None and len(titles) != len(images):
        raise ValueError(f"titles must have one entry per image ({len(images)}), got {len(titles)}")
    arrays = [to_numpy_image(im, name=f"images[{i}]") for i, im in enumerate(images)]
    ncols = min(ncols, len(arrays))
    nrows = math.ceil(len(arrays) / ncols)
    figsize = figsize or (1.6 * ncols, 1.6 * nrows + (0.3 * nrows if titles else 0))
    fig, axes = plt.subplots(nrows, ncols, figsize=figsize, squeeze=False)
    for i, ax in enumerate(axes.flat):
        if i < len(arrays):
            show_image(arrays[i], ax=ax, title=None if titles is None else titles[i])
        else:
            ax.set_axis_off()
    fig.tight_layout()
    return fig


def _ema(values: np.ndarray, smooth: float) -> np.ndarray:
    """Exponential moving average with bias correction (TensorBoard's smoothing)."""
    out, running = np.empty_like(values), 0.0
    for i, v in enumerate(values):
        running = smooth * running + (1 - smooth) * v
        out[i] = running / (1 - smooth ** (i + 1))
    return out


def plot_losses(histories, ax=None, smooth: float = 0.0, key: str = "loss"):
    """Loss curves, one labelled line per run; returns the ``Axes``.

    histories: a ``History``, a list of floats, or a dict ``{label: History | list of floats}``.
    smooth: exponential-moving-average weight in [0, 1) (0 = raw); the raw curve stays, faint.
    """
    if not isinstance(smooth, (int, float)) or not 0.0 <= smooth < 1.0:
        raise ValueError(f"smooth must be in [0, 1), got {smooth!r}")
    if not isinstance(histories, Mapping):
        histories = {key: histories}
    if not histories:
        raise ValueError("histories is empty")
    ax = _new_axes(ax, figsize=(5, 3))
    for label, run in histories.items():
        if hasattr(run, "records"):  # a course_lib.train.History
            steps = [r["step"] for r in run.records if key in r]
            values = [r[key] for r in run.records if key in r]
        elif isinstance(run, Sequence) and all(isinstance(v, (int, float)) for v in run):
            steps, values = list(range(1, len(run) + 1)), list(run)
        else:
            raise ValueError(f"histories[{label!r}] must be a History or a list of numbers, got {type(run).__name__}")
        if not values:
            raise ValueError(f"histories[{label!r}] has no {key!r} values")
        values = np.asarray(values, dtype=np.float64)
        if smooth > 0:
            (raw,) = ax.plot(steps, values, alpha=0.25, linewidth=0.8)
            ax.plot(steps, _ema(values, smooth), color=raw.get_color(), label=str(label))
        else:
            ax.plot(steps, values, label=str(label))
    ax.set_xlabel("step")
    ax.set_ylabel(key)
    ax.legend()
    return ax


def _check_labels(name: str, labels, size: int) -> None:
    if labels is not None and len(labels) != size:
        raise ValueError(f"{name} must have {size} entries, got {len(labels)}")


def attention_heatmap(attn, query_labels=None, key_labels=None, ax=None, title: str | None = None):
    """Attention weights ``(Nq, Nk)`` as a heat map, queries down, keys across; returns the ``Axes``."""
    attn = _as_numpy("attn", attn)
    if attn.ndim != 2:
        raise ValueError(f"attn must have shape (Nq, Nk) (pick one head and one example), got {attn.shape}")
    _check_labels("query_labels", query_labels, attn.shape[0])
    _check_labels("key_labels", key_labels, attn.shape[1])
    ax = _new_axes(ax, figsize=(0.3 * attn.shape[1] + 2, 0.3 * attn.shape[0] + 1.5))
    image = ax.imshow(attn, cmap="viridis", aspect="auto")
    ax.figure.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    if query_labels is not None:
        ax.set_yticks(range(attn.shape[0]), [str(q) for q in query_labels], fontsize=7)
    if key_labels is not None:
        ax.set_xticks(range(attn.shape[1]), [str(k) for k in key_labels], rotation=90, fontsize=7)
    ax.set_ylabel("query")
    ax.set_xlabel("key")
    if title is not None:
        ax.set_title(title, fontsize=9)
    return ax


def upsample_patch_weights(weights, grid: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
    """Weights ``(P,)`` over an ``(h, w)`` patch grid -> bilinear map ``(H, W)`` rescaled to [0, 1]."""
    h, w = grid
    flat = torch.as_tensor(_as_numpy("weights", weights), dtype=torch.float32).reshape(1, 1, h, w)
    up = torch.nn.functional.interpolate(flat, size=size, mode="bilinear", align_corners=False)[0, 0]
    up = up - up.min()
    return (up / up.max() if up.max() > 0 else up).numpy()


def attention_on_image(image, weights, grid: tuple[int, int] | None = None, ax=None, alpha: float = 0.5,
                       title: str | None = None):
    """Overlay attention over patches on the image (upsampled bilinearly); returns the ``Axes``.

    weights: ``(P,)``, one weight per patch of a row-major ``(h, w)`` grid (``grid``; square by default).
    """
    weights = _as_numpy("weights", weights)
    if weights.ndim != 1:
        raise ValueError(f"weights must have shape (P,) (one weight per patch), got {weights.shape}")
    if grid is None:
        side = math.isqrt(weights.size)
        if side * side != weights.size:
            raise ValueError(f"grid must be given: {weights.size} weights do not form a square patch grid")
        grid = (side, side)
    if len(grid) != 2 or grid[0] * grid[1] != weights.size:
        raise ValueError(f"grid must be (h, w) with h * w == P = {weights.size}, got {grid}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    array = to_numpy_image(image)
    heat = upsample_patch_weights(weights, grid, array.shape[:2])
    ax = show_image(array, ax=ax, title=title)
    ax.imshow(heat, cmap="jet", alpha=alpha, interpolation="nearest")
    return ax


def plot_similarity(sim, ax=None, title: str | None = "image-text similarity"):
    """A similarity matrix ``(Ni, Nt)`` (images down, texts across); returns the ``Axes``."""
    sim = _as_numpy("sim", sim)
    if sim.ndim != 2:
        raise ValueError(f"sim must have shape (Ni, Nt), got {sim.shape}")
    ax = _new_axes(ax, figsize=(4, 3.5))
    image = ax.imshow(sim, cmap="magma", aspect="auto")
    ax.figure.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    ax.set_xlabel("text")
    ax.set_ylabel("image")
    if title is not None:
        ax.set_title(title, fontsize=9)
    return ax
