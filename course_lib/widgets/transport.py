"""Transport-plan explorer: where each word of a caption sends its mass among the image's regions.

The plan is UNITER's word-region alignment plan (``course_lib.objectives.wra``): cosine cost between
word and region tokens, IPOT with uniform marginals, computed once when the widget is built.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from matplotlib.patches import Rectangle

from course_lib.objectives.wra import cosine_cost, ipot
from course_lib.viz import show_image
from course_lib.widgets.base import (Explorer, as_boxes, as_matrix, check_picture, dropdown, esc, pick_token,
                                    ranked, token_options, weighted_boxes)


def _as_mask(name: str, mask, length: int) -> torch.Tensor:
    """``mask (length,)`` as bool (``None``: all True); a ``ValueError`` naming ``name`` otherwise."""
    if mask is None:
        return torch.ones(length, dtype=torch.bool)
    if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != (length,):
        raise ValueError(f"{name} must be a tensor of shape ({length},), got {tuple(getattr(mask, 'shape', ()))}")
    mask = mask.detach().cpu().bool()
    if not mask.any():
        raise ValueError(f"{name} has no True entry: transport needs at least one real token on each side")
    return mask


def transport_explorer(words: torch.Tensor, regions: torch.Tensor, tokens: Sequence[str], image, boxes, *,
                       word_mask: torch.Tensor | None = None, region_mask: torch.Tensor | None = None,
                       region_labels: Sequence[str] | None = None, word: str | int | None = None,
                       beta: float = 0.5, iterations: int = 50) -> Explorer:
    """Choose a caption word; see how its transport mass splits among the regions (boxes drawn with
    thickness by share) and the whole plan as a matrix, the chosen word's row framed in red.

    Args:
        words: ``(M, D)`` word tokens of one caption; regions: ``(N, D)`` region tokens of one image.
        tokens: ``M`` strings, the token at each word position.
        image: the picture ``(3, H, W)`` in [0, 1].
        boxes: ``(n, 4)`` pixel boxes ``x1, y1, x2, y2``, one per *real* region, in order.
        word_mask: ``(M,)`` True on the words that carry mass (``None``: all; UNITER leaves out [CLS],
            [SEP] and padding). region_mask: ``(N,)`` True on real regions (``None``: all).
        region_labels: ``n`` names for the real regions (default ``region 0``, ...).
        word: the word shown first: a token (its first occurrence) or a position (``None``: the first word).
        beta, iterations: IPOT's step and number of outer steps (UNITER: 0.5, 50).
    Returns:
        an ``Explorer`` with the control ``word``; ``readout.value`` gives the chosen word's share per
        region and the plan's total cost ``<C, T>``. The plan is computed once, here.
    """
    words = as_matrix("words", words)
    regions = as_matrix("regions", regions, columns=words.shape[1])
    if not isinstance(tokens, Sequence) or isinstance(tokens, str) or len(tokens) != len(words):
        raise ValueError(f"tokens must be a list of {len(words)} str (one per row of words)")
    word_mask = _as_mask("word_mask", word_mask, len(words))
    region_mask = _as_mask("region_mask", region_mask, len(regions))
    picture = check_picture("image", image)
    n = int(region_mask.sum())
    boxes = as_boxes("boxes", boxes, count=n)  # one per real region
    region_labels = list(region_labels) if region_labels is not None else [f"region {r}" for r in range(n)]
    if len(region_labels) != n:
        raise ValueError(f"region_labels must have {n} entries (one per real region), got {len(region_labels)}")
    cost = cosine_cost(words[None], regions[None])  # (1, M, N)
    plan = ipot(cost, word_mask[None], region_mask[None], beta=beta, iterations=iterations)[0]  # (M, N)
    total = float((cost[0] * plan).sum())
    rows = word_mask.nonzero().flatten().tolist()  # the words with mass, in caption order
    plan = plan[word_mask][:, region_mask].numpy()  # (m, n)
    m = len(rows)
    controls = {"word": dropdown("word", token_options(tokens, rows), pick_token("word", word, tokens, rows))}

    def draw(fig) -> str:
        i = rows.index(controls["word"].value)
        word = tokens[rows[i]]
        share = plan[i] / plan[i].sum()  # the word's mass, 1/m, split among the regions
        ax_image, ax_plan = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1, 1.4]})
        show_image(picture, ax=ax_image, title=f"where '{word}' sends its mass")
        weighted_boxes(ax_image, boxes, share, [f"{100 * s:.0f}%" for s in share], rgb=(1.0, 0.2, 0.2))
        shown = ax_plan.imshow(plan, cmap="viridis", aspect="auto")
        fig.colorbar(shown, ax=ax_plan, fraction=0.046, pad=0.04)
        ax_plan.add_patch(Rectangle((-0.5, i - 0.5), n, 1, fill=False, edgecolor="red", linewidth=2))
        ax_plan.set_yticks(range(m), [tokens[r] for r in rows], fontsize=7)
        ax_plan.set_xticks(range(n), region_labels, rotation=45, fontsize=7)
        ax_plan.set_title("transport plan: words x regions", fontsize=9)
        order = np.argsort(-share, kind="stable")
        return (f"<b>{esc(word)}</b> carries 1/{m} = {1 / m:.3f} of the mass; its share per region:"
                + ranked(share[order], [region_labels[r] for r in order])
                + f"total transport cost &lt;C, T&gt; = {total:.3f} (cosine cost, IPOT with beta {beta})")

    return Explorer(controls, draw, figsize=(8, 3.2))
