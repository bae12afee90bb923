"""What every explorer shares: a row of controls, an ``Output`` that redraws one matplotlib figure,
and an HTML readout, redrawn whenever a control's value changes.

Everything is readable without a browser or a kernel (ipywidgets 8 fires observers when a
``.value`` is set), which is how the tests drive the widgets::

    view = some_explorer(...)
    view.controls["head"].value = 2      # redraws
    view.readout.value                   # the text under the figure
    view.figure.axes[1].patches          # the figure last drawn (closed, but its artists stay)
"""

from __future__ import annotations

import html
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager

import ipywidgets as widgets
import matplotlib.pyplot as plt
import numpy as np
import torch

from course_lib.viz import draw_boxes, to_numpy_image


def esc(text) -> str:
    """``text`` safe inside HTML (quotes left as they are, so the readout stays readable as text)."""
    return html.escape(str(text), quote=False)


class InputProblem(ValueError):
    """Something the user typed or chose cannot be shown (an unknown word, an empty caption).
    Raised inside a ``draw`` function, it becomes a message in the readout instead of a traceback."""


class Explorer(widgets.VBox):
    """``[title]``, the ``controls`` in a row, the figure, the readout.

    ``draw(fig) -> str`` draws on the empty figure ``fig`` (size ``figsize``) and returns the readout
    as HTML; it may raise ``InputProblem`` to show a message instead. ``on_change[name]()`` runs
    when control ``name`` changes, before the one redraw (e.g. to give another control new options).
    Attributes: ``controls`` (the dict given), ``readout`` (``HTML``), ``output`` (``Output``),
    ``figure`` (the last figure drawn), ``seconds`` (how long the last redraw took, without the PNG
    rendering a notebook adds).
    """

    def __init__(self, controls: Mapping[str, widgets.Widget], draw: Callable, figsize=(8, 3),
                 title: str | None = None, on_change: Mapping[str, Callable[[], None]] | None = None):
        super().__init__()
        self.controls, self._on_change = dict(controls), dict(on_change or {})
        self.readout, self.output = widgets.HTML(), widgets.Output()
        self.figure, self.seconds = None, 0.0
        self._draw, self._figsize, self._held = draw, figsize, 0
        rows = [widgets.HBox(list(self.controls.values())), self.output, self.readout]
        self.children = ([widgets.HTML(f"<b>{esc(title)}</b>")] if title else []) + rows
        for name, control in self.controls.items():
            control.observe(lambda _change, name=name: self._changed(name), names="value")
        self.redraw()

    def _changed(self, name: str) -> None:
        if name in self._on_change:
            with self.holding():
                self._on_change[name]()
        else:
            self.redraw()

    @contextmanager
    def holding(self):
        """Change several controls at once (e.g. new options for a dropdown) and redraw once, at the end."""
        self._held += 1
        try:
            yield
        finally:
            self._held -= 1
        if not self._held:
            self.redraw()

    def redraw(self, _change=None) -> None:
        if self._held:
            return
        start = time.perf_counter()
        fig = plt.figure(figsize=self._figsize, layout="constrained")
        try:
            text = self._draw(fig)
        except InputProblem as problem:
            fig.clear()
            text = f'<span style="color:#b00">{esc(problem)}</span>'
        finally:
            plt.close(fig)  # shown once, in the Output, not again at the end of the cell
        _show(self.output, fig)
        self.figure, self.readout.value = fig, text
        self.seconds = time.perf_counter() - start


def _show(output: widgets.Output, fig) -> None:
    """Replace what ``output`` shows by ``fig`` (nothing if it has no axes) inside IPython; outside it
    (tests, scripts) there is nowhere to show it."""
    from IPython import get_ipython
    from IPython.display import display

    if get_ipython() is None:
        return
    output.clear_output(wait=True)
    if fig.axes:
        with output:
            display(fig)


def dropdown(description: str, options, value=None) -> widgets.Dropdown:
    """A ``Dropdown`` (``options``: values or ``(label, value)`` pairs) whose label is not cut short."""
    box = widgets.Dropdown(options=options, description=description, style={"description_width": "initial"})
    if value is not None:
        box.value = value
    return box


def token_options(tokens: Sequence[str], positions: Sequence[int]) -> list[tuple[str, int]]:
    """Dropdown options ``("3: red", 3)`` for the tokens at ``positions``."""
    return [(f"{i}: {tokens[i]}", i) for i in positions]


def check_picture(name: str, picture):
    """One displayable image ``(3, H, W)`` / ``(H, W, 3)`` in [0, 1]; a ``ValueError`` naming ``name`` otherwise."""
    try:
        return to_numpy_image(picture, name)
    except ValueError as error:
        raise ValueError(f"{name}: {error}") from None


def pick_token(name: str, value, tokens: Sequence[str], positions: Sequence[int]) -> int:
    """The position chosen by ``value``: a token (its first occurrence among ``positions``), a position,
    or ``None`` (the first of ``positions``); a ``ValueError`` naming ``name`` otherwise."""
    if value is None:
        return positions[0]
    if isinstance(value, str):
        value = next((p for p in positions if tokens[p] == value), value)
    if value not in positions:
        raise ValueError(f"{name} must be one of the tokens {[tokens[p] for p in positions]} or its position, "
                         f"got {value!r}")
    return value


def check_pictures(name: str, pictures, count: int):
    """``count`` displayable images (a batch ``(N, 3, H, W)`` or a list), each in [0, 1]; a ``ValueError``
    naming ``name`` otherwise. Returns ``pictures``."""
    if isinstance(pictures, str) or not hasattr(pictures, "__len__") or len(pictures) != count:
        raise ValueError(f"{name} must hold {count} images, got {type(pictures).__name__}"
                         + (f" of length {len(pictures)}" if hasattr(pictures, "__len__") else ""))
    if isinstance(pictures, torch.Tensor) and pictures.is_floating_point() and len(pictures) and (
            pictures.min() < -1e-3 or pictures.max() > 1 + 1e-3):
        raise ValueError(f"{name} must be in [0, 1] (undo the normalisation), got values in "
                         f"[{pictures.min():.2f}, {pictures.max():.2f}]")
    for i in range(count if not isinstance(pictures, torch.Tensor) else min(count, 1)):
        check_picture(f"{name}[{i}]", pictures[i])
    return pictures


def check_index(name: str, value, size: int) -> int:
    """``value`` as an int in ``[0, size)``; a ``ValueError`` naming ``name`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < size:
        raise ValueError(f"{name} must be an int in [0, {size}), got {value!r}")
    return value


def check_top_k(name: str, value, size: int) -> int:
    """``value`` as an int in ``[1, size]``; a ``ValueError`` naming ``name`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= size:
        raise ValueError(f"{name} must be an int in [1, {size}], got {value!r}")
    return value


def as_matrix(name: str, value, rows: int | None = None, columns: int | None = None) -> torch.Tensor:
    """``value`` as a float CPU tensor ``(rows, columns)`` (``None``: any); a ``ValueError`` naming ``name``."""
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.ndim != 2 or (rows is not None and value.shape[0] != rows) or (
            columns is not None and value.shape[1] != columns):
        expected = f"({rows if rows is not None else 'N'}, {columns if columns is not None else 'D'})"
        raise ValueError(f"{name} must have shape {expected}, got {tuple(value.shape)}")
    return value.detach().float().cpu()


def as_boxes(name: str, boxes, count: int | None = None) -> np.ndarray:
    """Pixel boxes ``(R, 4)`` (``x1, y1, x2, y2``; ``R = count`` when given, else >= 1) as a float array."""
    array = np.asarray(boxes.detach().cpu() if isinstance(boxes, torch.Tensor) else boxes, dtype=float)
    if array.ndim != 2 or array.shape[1] != 4 or (len(array) != count if count is not None else len(array) == 0):
        raise ValueError(f"{name} must have shape ({count if count is not None else 'R'}, 4) as x1, y1, x2, y2 "
                         f"pixels, got {array.shape}")
    return array


def weighted_boxes(ax, boxes: np.ndarray, weights: np.ndarray, labels: Sequence[str], rgb=(1.0, 0.85, 0.0)) -> None:
    """Draw each box thicker and more opaque the larger its weight (relative to the largest one)."""
    scale = weights.max() if weights.max() > 0 else 1.0
    for box, weight, label in zip(boxes, weights / scale, labels):
        draw_boxes(ax, box[None], [label], color=(*rgb, 0.25 + 0.75 * weight), linewidth=0.5 + 3.5 * weight)


def ranked(scores: Sequence[float], labels: Sequence[str]) -> str:
    """``labels`` with their ``scores`` as an HTML list, in the given order."""
    items = "".join(f"<li>{esc(label)}: {score:.3f}</li>" for score, label in zip(scores, labels))
    return f"<ol style='margin:0'>{items}</ol>"


def message_axes(ax, text: str) -> None:
    """An empty panel that says ``text`` (what a panel shows when there is nothing to draw)."""
    ax.text(0.5, 0.5, text, ha="center", va="center", wrap=True, fontsize=9, transform=ax.transAxes)
    ax.set_axis_off()
