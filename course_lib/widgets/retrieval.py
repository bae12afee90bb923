"""Retrieval playground: type a caption and see a two-tower model's best images; pick an image and see
its best captions. The gallery's image and caption embeddings are computed once, when it is built;
an update embeds at most the one typed caption."""

from __future__ import annotations

from collections.abc import Sequence

import ipywidgets as widgets
import torch

from course_lib.features.text import encode
from course_lib.viz import show_image
from course_lib.widgets.base import Explorer, InputProblem, check_pictures, check_top_k, esc, ranked


def caption_problem(tokenizer, text: str, whole_words: bool = True, max_length: int | None = None) -> str | None:
    """Why ``text`` cannot be ranked (empty, words the tokenizer does not know, more than ``max_length``
    tokens with [CLS] and [SEP]), or ``None``.

    A word is unknown when it becomes ``[UNK]``, or, with ``whole_words``, when the tokenizer has to
    spell it in sub-word pieces (``purple`` -> ``p ##u ##r ##p ##le``): a ShapeWorld vocabulary holds
    every word of its world whole, so a split word is one its model never read.
    """
    if not text.strip():
        return "Type a caption: the text box is empty."
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    pieces: dict[int, list[int]] = {}
    for position, word in enumerate(enc.word_ids()):
        pieces.setdefault(word, []).append(position)
    tokens, spans = enc.tokens(), enc["offset_mapping"]
    unknown = [text[spans[p[0]][0]:spans[p[-1]][1]] for p in pieces.values()
               if tokenizer.unk_token in (tokens[i] for i in p) or (whole_words and len(p) > 1)]
    if unknown:
        words = ", ".join(f"'{w}'" for w in dict.fromkeys(unknown))
        return f"Unknown word(s): {words} (not in the model's vocabulary)."
    if max_length is not None and len(tokens) + 2 > max_length:
        return f"The caption has {len(tokens) + 2} tokens with [CLS] and [SEP]; the model reads at most {max_length}."
    return None


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def _embed_images(model, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    device = _device(model)
    return torch.cat([model.encode_image(images[i:i + batch_size].to(device)).float().cpu()
                      for i in range(0, len(images), batch_size)])  # (N, E)


@torch.no_grad()
def _embed_texts(model, tokenizer, texts: Sequence[str], max_length: int | None, batch_size: int) -> torch.Tensor:
    device = _device(model)
    chunks = []
    for i in range(0, len(texts), batch_size):
        enc = encode(tokenizer, list(texts[i:i + batch_size]), max_length=max_length)
        chunks.append(model.encode_text(enc["input_ids"].to(device), enc["attention_mask"].to(device)).float().cpu())
    return torch.cat(chunks)  # (T, E)


def retrieval_playground(model, tokenizer, images: torch.Tensor, captions: Sequence[str], *, k: int = 5,
                         pictures=None, query: str | None = None, whole_words: bool = True,
                         batch_size: int = 256) -> widgets.VBox:
    """Caption -> images and image -> captions with a trained two-tower model (CLIP).

    Args:
        model: ``encode_image(images (B, 3, H, W)) -> (B, E)`` and ``encode_text(input_ids (B, L),
            attention_mask (B, L)) -> (B, E)``, both L2-normalised (``course_lib.models.clip.CLIP``).
        tokenizer: the model's tokenizer (captions are encoded with ``course_lib.features.text.encode``,
            truncated to ``model.config.context_length`` when the model has one).
        images: ``(N, 3, H, W)``, the gallery, as the model takes them (``H = W =
            model.config.image_size`` when the model has one).
        captions: the captions ranked for an image (repeats are ranked once). When there are ``N``,
            ``captions[i]`` is taken to be image ``i``'s own and hits are marked with a check.
        k: how many images / captions to show. pictures: ``(N, 3, H, W)`` in [0, 1] to draw
            (``None``: ``images``). query: the caption typed at first (default ``captions[0]``).
        whole_words: treat words the tokenizer splits into pieces as unknown (see ``caption_problem``).
    Returns:
        a ``VBox`` of two ``Explorer``s: ``children[0]`` with the ``Text`` control ``caption`` (its
        top-k images and cosine scores), ``children[1]`` with the control ``image`` (its top-k captions
        in the readout). An empty caption or an unknown word shows a message in the readout.
    """
    for method in ("encode_image", "encode_text"):
        if not callable(getattr(model, method, None)):
            raise ValueError(f"model must have an {method} method (a two-tower model such as CLIP)")
    config = getattr(model, "config", None)
    size = getattr(config, "image_size", None)
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3 or len(images) == 0 or (
            size is not None and tuple(images.shape[2:]) != (size, size)):
        expected = f"(N, 3, {size}, {size})" if size is not None else "(N, 3, H, W)"
        raise ValueError(f"images must be a tensor {expected} with N >= 1, got {tuple(getattr(images, 'shape', ()))}")
    if isinstance(captions, str) or not isinstance(captions, Sequence) or not captions or \
            not all(isinstance(c, str) and c.strip() for c in captions):
        raise ValueError("captions must be a non-empty list of non-empty str")
    pictures = check_pictures("pictures", images if pictures is None else pictures, len(images))
    check_top_k("k", k, len(images))
    query = captions[0] if query is None else query
    if not isinstance(query, str):
        raise ValueError(f"query must be a str, got {type(query).__name__}")
    max_length = getattr(config, "context_length", None)
    aligned = len(captions) == len(images)
    unique = list(dict.fromkeys(captions))
    image_emb = _embed_images(model, images, batch_size)  # (N, E), once
    caption_emb = _embed_texts(model, tokenizer, unique, max_length, batch_size)  # (T, E), once

    caption_box = widgets.Text(value=query, description="caption", continuous_update=False,
                               layout=widgets.Layout(width="60%"))

    def draw_images(fig) -> str:
        text = caption_box.value.strip()
        problem = caption_problem(tokenizer, text, whole_words, max_length)
        if problem:
            raise InputProblem(problem)
        scores = image_emb @ _embed_texts(model, tokenizer, [text], max_length, 1)[0]  # (N,)
        top = scores.topk(k)
        hits = [aligned and captions[i] == text for i in top.indices.tolist()]
        for ax, i, score, hit in zip(fig.subplots(1, k), top.indices.tolist(), top.values.tolist(), hits):
            show_image(pictures[i], ax=ax, title=f"{'✓ ' if hit else ''}#{i}: {score:.3f}")
        labels = [f"image {i}" + (f" ({captions[i]})" if aligned else "") for i in top.indices.tolist()]
        return f"top {k} images for <b>{esc(text)}</b> (cosine similarity):" + ranked(top.values.tolist(), labels)

    image_slider = widgets.IntSlider(value=0, min=0, max=len(images) - 1, description="image")

    def draw_captions(fig) -> str:
        i = image_slider.value
        scores = caption_emb @ image_emb[i]  # (T,)
        top = scores.topk(min(k, len(unique)))
        show_image(pictures[i], ax=fig.subplots(), title=f"image {i}")
        labels = [("✓ " if aligned and unique[j] == captions[i] else "") + unique[j] for j in top.indices.tolist()]
        return f"top captions for image {i} (cosine similarity):" + ranked(top.values.tolist(), labels)

    return widgets.VBox([Explorer({"caption": caption_box}, draw_images, figsize=(1.8 * k, 2.2),
                                  title="caption → images"),
                         Explorer({"image": image_slider}, draw_captions, figsize=(2, 2), title="image → captions")])
