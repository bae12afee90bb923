"""Attention explorer: where one text token looks, in the image and in the text, for any fusion style.

Each fusion style returns its maps differently (``course_lib.fusion.registry``): separate
``"text_to_image"`` and ``"text_self"`` maps (dual-stream, cross-modality, fusion encoder,
encoder-decoder), one merged map over a concatenated sequence (``"self"`` over ``[text; image]`` for
single-stream and multiway, ``"joint"`` over ``[image; text]`` for three-stream), or no cross-modal
map at all (two-tower). ``text_query_attention`` reads one layer of any of them in the order the
style built its sequence; ``attention_explorer`` draws the result for a chosen layer, head and query.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from course_lib.fusion.registry import FUSION_STYLES
from course_lib.utils import check_one_of
from course_lib.viz import attention_on_image, show_image
from course_lib.widgets.base import (Explorer, as_boxes, check_picture, dropdown, esc, message_axes, pick_token,
                                    token_options, weighted_boxes)

# Styles that run one self-attention over a concatenated sequence: the map's key, and which
# modality the style puts first (three-stream's UNIMO builds [image; text], the others [text; image]).
MERGED = {"single_stream": ("self", "text"), "multiway": ("self", "text"), "three_stream": ("joint", "image")}


def _example_map(layer: Mapping, key: str, example: int) -> torch.Tensor:
    """``layer[key][example]`` as a float CPU tensor ``(H, Nq, Nk)``."""
    maps = layer[key]
    if maps is None:
        raise ValueError(f"maps: the {key!r} attention is None; run the model with return_attention=True")
    if not isinstance(maps, torch.Tensor) or maps.ndim != 4:
        raise ValueError(f"maps: the {key!r} attention must be a tensor (B, H, Nq, Nk), got "
                         f"{tuple(getattr(maps, 'shape', ())) or type(maps).__name__}")
    if not 0 <= example < maps.shape[0]:
        raise ValueError(f"example must be in [0, {maps.shape[0]}), got {example!r}")
    return maps[example].detach().float().cpu()


def text_query_attention(style: str, layer: Mapping, image_len: int, example: int = 0):
    """The attention of the text queries in one layer of a fusion style, read in the order the style
    built its sequence.

    Args:
        style: a name of ``FUSION_STYLES``.
        layer: one entry of ``FusionOutput.attentions`` (maps ``(B, H, Nq, Nk)``).
        image_len: ``Li``, the number of image tokens (with the image [CLS] if there is one).
        example: which example of the batch.
    Returns:
        ``(to_image (H, Lt, Li) | None, to_text (H, Lt, Lt) | None, kind)``: ``None`` where the layer
        has no such map (an image-only layer has neither; two-tower never has ``to_image``); ``kind``
        says which attention it is. For merged attention both blocks are cut from one softmax, so a
        row of ``to_image`` plus the same row of ``to_text`` sums to 1; otherwise each sums to 1.
    """
    check_one_of("style", style, FUSION_STYLES)
    if style in MERGED:
        key, first = MERGED[style]
        if key not in layer:
            return None, None, ""
        joint = _example_map(layer, key, example)  # (H, L, L)
        L = joint.shape[-1]
        if not 0 < image_len < L:
            raise ValueError(f"image_len={image_len} must be in [1, {L}): the {key!r} map of {style} covers "
                             f"{L} text + image tokens")
        Lt = L - image_len
        text = slice(0, Lt) if first == "text" else slice(image_len, L)
        image = slice(Lt, L) if first == "text" else slice(0, image_len)
        order = "[text; image]" if first == "text" else "[image; text]"
        return joint[:, text, image], joint[:, text, text], f"merged self-attention over {order}"
    to_image = _example_map(layer, "text_to_image", example) if "text_to_image" in layer else None
    to_text = _example_map(layer, "text_self", example) if "text_self" in layer else None
    if to_image is not None and to_image.shape[-1] != image_len:
        raise ValueError(f"image_len={image_len} does not match the text_to_image map of {style}, which has "
                         f"{to_image.shape[-1]} image tokens")
    if to_image is not None and to_text is not None and to_text.shape[-2:] != (to_image.shape[1],) * 2:
        raise ValueError(f"maps: text_self {tuple(to_text.shape)} and text_to_image {tuple(to_image.shape)} "
                         "disagree on the number of text tokens")
    kind = "cross-attention (its own softmax over the image)" if to_image is not None else (
        "text self-attention only: no cross-modal attention" if to_text is not None else "")
    return to_image, to_text, kind


@dataclass(frozen=True)
class _TextQueries:
    """One layer's text-query maps for one example, as NumPy: ``to_image (H, Lt, Li)``, ``to_text (H, Lt, Lt)``."""

    label: str
    kind: str
    to_image: np.ndarray | None
    to_text: np.ndarray | None

    @property
    def shape(self) -> tuple[int, int]:
        """``(heads, text tokens)``."""
        some = self.to_image if self.to_image is not None else self.to_text
        return some.shape[0], some.shape[1]


def _style_layers(style: str, attentions: Sequence[Mapping], image_len: int, example: int) -> list[_TextQueries]:
    """Every layer of ``attentions`` that has text queries (image-only layers are left out)."""
    if not isinstance(attentions, Sequence) or not all(isinstance(layer, Mapping) for layer in attentions):
        raise ValueError(f"maps[{style!r}] must be a FusionOutput.attentions list (one dict per layer)")
    layers = []
    for i, layer in enumerate(attentions):
        to_image, to_text, kind = text_query_attention(style, layer, image_len, example)
        if to_image is not None or to_text is not None:
            layers.append(_TextQueries(f"layer {i}", kind, None if to_image is None else to_image.numpy(),
                                       None if to_text is None else to_text.numpy()))
    if not layers:
        raise ValueError(f"maps[{style!r}] has no layer with text queries (run with return_attention=True)")
    return layers


def _image_token_names(image_cls: bool, grid, boxes) -> list[str]:
    names = ["[IMG]"] if image_cls else []
    if boxes is not None:
        return names + [f"region {r}" for r in range(len(boxes))]
    return names + [f"patch ({r}, {c})" for r in range(grid[0]) for c in range(grid[1])]


def _top(weights: np.ndarray, names: Sequence[str], k: int = 3) -> str:
    order = np.argsort(-weights, kind="stable")[:k]
    return ", ".join(f"{esc(names[i])} {weights[i]:.2f}" for i in order)


def attention_explorer(maps: Mapping[str, Sequence[Mapping]], image, tokens: Sequence[str], *,
                       grid: tuple[int, int] | None = None, boxes=None, image_cls: bool = True,
                       query: str | int | None = None, example: int = 0) -> Explorer:
    """Choose a fusion style, a layer, a head and a query token; see that query's attention over the
    image (a heat map over the patches, or boxes weighted by attention) and over the text (bars).

    Args:
        maps: ``{style name: FusionOutput.attentions}``, one or more styles, computed once with
            ``return_attention=True`` (the widget only reads them: updates cost no forward pass).
        image: the picture the image tokens come from, ``(3, H, W)`` in [0, 1] (undo any normalisation).
        tokens: the text tokens of the first ``len(tokens)`` text positions (the real ones; padding
            after them is never a query).
        grid: ``(h, w)`` for patch tokens (row-major), or
        boxes: ``(R, 4)`` pixel boxes ``x1, y1, x2, y2`` for region tokens; give exactly one of the two.
        image_cls: whether the image sequence starts with a [CLS]/[IMG] token (reported in the
            readout, not drawn on the image).
        query: the query shown first: a token (its first occurrence) or a position (``None``: the first).
        example: which example of the batch the maps hold.
    Returns:
        an ``Explorer``: ``controls`` ``style``, ``layer``, ``head``, ``query``; ``readout.value`` names
        the most attended image and text tokens. A style without cross-modal attention (two-tower)
        shows its text self-attention and says that it has no map over the image.
    """
    if not isinstance(maps, Mapping) or not maps:
        raise ValueError("maps must be a non-empty dict {style name: FusionOutput.attentions}")
    picture = check_picture("image", image)
    if (grid is None) == (boxes is None):
        raise ValueError("give exactly one of grid=(h, w) (patch tokens) and boxes=(R, 4) (region tokens)")
    if boxes is not None:
        boxes = as_boxes("boxes", boxes)
    elif not (isinstance(grid, tuple) and len(grid) == 2 and all(isinstance(g, int) and g > 0 for g in grid)):
        raise ValueError(f"grid must be a tuple (h, w) of positive ints, got {grid!r}")
    if not isinstance(tokens, Sequence) or isinstance(tokens, str) or not tokens or \
            not all(isinstance(t, str) for t in tokens):
        raise ValueError("tokens must be a non-empty list of str (the real text tokens)")
    if not isinstance(image_cls, bool):
        raise ValueError(f"image_cls must be True or False, got {image_cls!r}")
    image_len = int(image_cls) + (len(boxes) if boxes is not None else grid[0] * grid[1])
    layers = {style: _style_layers(style, attentions, image_len, example) for style, attentions in maps.items()}
    for style, entries in layers.items():
        if len(tokens) > entries[0].shape[1]:
            raise ValueError(f"tokens has {len(tokens)} entries but the maps of {style} hold {entries[0].shape[1]} "
                             "text tokens")
    names = _image_token_names(image_cls, grid, boxes)
    query = pick_token("query", query, tokens, range(len(tokens)))
    first = next(iter(layers))

    def layer_options(style):
        return [(f"{layer.label}: {layer.kind}", i) for i, layer in enumerate(layers[style])]

    def head_options(style):
        return [("mean of heads", -1)] + [(f"head {h}", h) for h in range(layers[style][0].shape[0])]

    controls = {"style": dropdown("style", list(layers), first),
                "layer": dropdown("layer", layer_options(first), len(layers[first]) - 1),
                "head": dropdown("head", head_options(first), -1),
                "query": dropdown("query", token_options(tokens, range(len(tokens))), query)}

    def new_style():
        style = controls["style"].value
        controls["layer"].options = layer_options(style)
        controls["layer"].value = len(layers[style]) - 1  # the last layer, as the notebooks show first
        controls["head"].options = head_options(style)
        controls["head"].value = -1

    def row(maps_: np.ndarray | None, width: int | None = None) -> np.ndarray | None:
        """The query's row, for the chosen head or averaged over heads; cut to ``width`` keys."""
        if maps_ is None:
            return None
        head = controls["head"].value
        chosen = maps_.mean(0) if head < 0 else maps_[head]
        return chosen[controls["query"].value, :width]

    def draw(fig) -> str:
        style, q = controls["style"].value, controls["query"].value
        layer = layers[style][controls["layer"].value]
        image_row, text_row = row(layer.to_image), row(layer.to_text, len(tokens))
        ax_image, ax_text = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1, 1.8]})
        head = "mean of heads" if controls["head"].value < 0 else f"head {controls['head'].value}"
        lines = [f"<b>{style}</b> · {layer.label}: {esc(layer.kind)} · {head} · query <b>{esc(tokens[q])}</b>"]
        if image_row is None:
            show_image(picture, ax=ax_image, title=f"{style}: no map over the image")
            lines.append(f"{style} has no cross-modal attention: its text and image meet only in the dot product "
                         "of their pooled embeddings.")
        else:
            drawn = image_row[int(image_cls):]  # the [IMG] token has no place on the image
            if boxes is not None:
                show_image(picture, ax=ax_image, title=f"'{tokens[q]}' -> regions")
                weighted_boxes(ax_image, boxes, drawn, [f"{w:.2f}" for w in drawn])
            else:
                attention_on_image(picture, drawn, grid=grid, ax=ax_image, title=f"'{tokens[q]}' -> patches")
            share = "" if style not in MERGED else f" ({100 * image_row.sum():.0f}% of the row; the text has the rest)"
            cls = f" ([IMG] token: {image_row[0]:.2f})" if image_cls else ""
            lines.append(f"image tokens{share}: {_top(image_row, names)}{cls}")
        if text_row is None:
            message_axes(ax_text, "this layer has no text-to-text map")
        else:
            colors = ["tab:orange" if i == q else "tab:blue" for i in range(len(tokens))]
            ax_text.bar(range(len(tokens)), text_row, color=colors)
            ax_text.set_xticks(range(len(tokens)), tokens, rotation=60, fontsize=7)
            ax_text.set_ylabel("attention")
            ax_text.set_title(f"'{tokens[q]}' -> text tokens (orange: itself)", fontsize=9)
            lines.append(f"text tokens: {_top(text_row, tokens)}")
        return "<br>".join(lines)

    return Explorer(controls, draw, figsize=(8, 3), on_change={"style": new_style})
