"""Masked-word playground: hide one word of a caption and see what an image-conditioned MLM model puts
back, given the caption's image and given another image.

Any MLM model plugs in through one callable::

    predict(image, input_ids (B, L), attention_mask (B, L)) -> logits (B, L, V)

where ``image`` is one entry of the ``images`` given to the widget (a pixel tensor, a scene index, a
dict of region features: whatever the model reads), used for every row of the batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import ipywidgets as widgets
import numpy as np
import torch

from course_lib.features.text import encode
from course_lib.viz import show_image
from course_lib.widgets.base import (Explorer, check_index, check_pictures, check_top_k, dropdown, esc,
                                    pick_token, token_options)


def masked_word_playground(predict: Callable, tokenizer, caption: str, images: Sequence, *, pictures=None,
                           image: int = 0, other: int = 1, word: str | int | None = None,
                           top_k: int = 5) -> Explorer:
    """Choose the word to mask and the other image; see the top predictions for the hidden word.

    Args:
        predict: ``predict(images[i], input_ids (B, L), attention_mask (B, L)) -> logits (B, L, V)``.
        tokenizer: the model's tokenizer (it needs a mask token); the caption is encoded with
            ``course_lib.features.text.encode``.
        caption: the caption, a str (every word in the tokenizer's vocabulary).
        images: ``N`` images as ``predict`` takes them (a tensor ``(N, ...)`` or any sequence).
        pictures: ``N`` displayable images ``(3, H, W)`` in [0, 1] (``None``: ``images``).
        image: the index of the caption's own image; other: the other image shown at first.
        word: the word masked at first: a token of the caption (its first occurrence) or a token
            position (``None``: the first word).
        top_k: how many predictions to show per image.
    Returns:
        an ``Explorer`` with the controls ``word`` (token positions of the caption) and ``other`` (an
        image index); ``readout.value`` lists both images' top predictions and the probability of the
        hidden word. Each image's predictions for every word come from one batched call of
        ``predict`` (the caption masked at each word in turn), made once per image and kept.
    """
    if not callable(predict):
        raise ValueError(f"predict must be callable as predict(image, input_ids, attention_mask), got {predict!r}")
    if tokenizer.mask_token_id is None:
        raise ValueError("tokenizer must have a mask token ([MASK])")
    if not isinstance(caption, str) or not caption.strip():
        raise ValueError(f"caption must be a non-empty str, got {caption!r}")
    if isinstance(images, str) or not hasattr(images, "__len__") or len(images) < 2:
        raise ValueError("images must hold at least two images (the caption's own and another)")
    n = len(images)
    pictures = check_pictures("pictures", images if pictures is None else pictures, n)
    check_index("image", image, n)
    check_index("other", other, n)
    check_top_k("top_k", top_k, len(tokenizer))
    enc = encode(tokenizer, caption)
    ids, mask = enc["input_ids"], enc["attention_mask"]  # (1, L)
    tokens = tokenizer.convert_ids_to_tokens(ids[0].tolist())
    if tokenizer.unk_token_id in ids[0].tolist():
        raise ValueError(f"caption has words unknown to the tokenizer: {tokens}")
    special = set(tokenizer.all_special_ids)
    positions = [p for p, t in enumerate(ids[0].tolist()) if t not in special]
    if not positions:
        raise ValueError(f"caption has no word to mask: {tokens}")
    word = pick_token("word", word, tokens, positions)
    masked = ids.repeat(len(positions), 1)  # (P, L): row r hides the word at positions[r]
    masked[torch.arange(len(positions)), positions] = tokenizer.mask_token_id
    masks = mask.repeat(len(positions), 1)
    cache: dict[int, np.ndarray] = {}

    @torch.no_grad()
    def probabilities(i: int) -> np.ndarray:
        """P(word) at each masked position given image ``i``: ``(P, V)``, computed once per image."""
        if i not in cache:
            logits = predict(images[i], masked, masks)
            if not isinstance(logits, torch.Tensor) or logits.ndim != 3 or logits.shape[:2] != masked.shape:
                raise ValueError(f"predict must return logits (B, L, V) = ({len(positions)}, {ids.shape[1]}, V), got "
                                 f"{tuple(getattr(logits, 'shape', ())) or type(logits).__name__}")
            rows = logits[torch.arange(len(positions)), torch.tensor(positions)]  # (P, V)
            cache[i] = rows.float().softmax(-1).cpu().numpy()
        return cache[i]

    probabilities(image)  # checks predict now, and the own image's answers are ready
    controls = {"word": dropdown("mask", token_options(tokens, positions), word),
                "other": widgets.IntSlider(value=other, min=0, max=n - 1, description="other image")}

    def draw(fig) -> str:
        position = controls["word"].value
        row, truth = positions.index(position), ids[0, position].item()
        shown = " ".join("[MASK]" if p == position else tokens[p] for p in positions)  # without [CLS], [SEP]
        axes = fig.subplots(1, 4, gridspec_kw={"width_ratios": [1, 1.3, 1, 1.3]})
        lines = [f"caption: <b>{esc(shown)}</b> (hidden: <b>{esc(tokens[position])}</b>)"]
        for (ax_image, ax_bars), i, name in zip((axes[:2], axes[2:]), (image, controls["other"].value),
                                                ("its own image", "the other image")):
            p = probabilities(i)[row]
            top = np.argsort(-p, kind="stable")[:top_k]
            words = tokenizer.convert_ids_to_tokens(top.tolist())
            show_image(pictures[i], ax=ax_image, title=f"image {i}")
            ax_bars.barh(range(top_k), p[top], color=["tab:green" if t == truth else "tab:gray" for t in top])
            ax_bars.set_yticks(range(top_k), words, fontsize=8)
            ax_bars.invert_yaxis()
            ax_bars.set_xlim(0, 1)
            ax_bars.set_title(f"given {name}", fontsize=9)
            guesses = ", ".join(f"{esc(w)} {p[t]:.2f}" for w, t in zip(words, top))
            lines.append(f"given {name} ({i}): {guesses}; P({esc(tokens[position])}) = {p[truth]:.2f}")
        return "<br>".join(lines)

    return Explorer(controls, draw, figsize=(9, 2.4))
