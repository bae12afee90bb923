"""Captioning metrics: corpus BLEU-4 and CIDEr with the COCO caption evaluation code, and the
most-frequent-caption baseline a captioner must beat.

The scores come from ``pycocoevalcap``'s ``Bleu(4)`` and ``Cider`` scorers, as in the COCO caption
leaderboard and every captioning paper of the course (Unified VLP, BLIP, CoCa...). Two things differ
from the usual ``COCOEvalCap`` pipeline, and both are deliberate:

- **Tokenisation.** COCO runs Stanford's PTB tokenizer (a Java program) with ``-lowerCase`` and then
  drops the punctuation tokens ``'' ' `` ` -LRB- -RRB- -LCB- -RCB- . ? ! , : - -- ... ;``. The course
  has no Java, so :func:`tokenize_caption` does it in Python: lower case, replace each of the
  characters ``. ? ! , : ; - ' ` " ( ) [ ] { }`` by a space, split on whitespace. For captions of
  lower-case words, spaces and that punctuation (all of ShapeWorld's, most of COCO's) this gives
  exactly the PTB tokens. It differs on hyphenated words (PTB keeps ``left-hand`` as one token, here
  ``left hand``) and clitics (PTB ``it 's``, here ``it s``), which only move scores a little.
- **Scores are fractions.** BLEU-4 is in [0, 1] (papers print it x100); CIDEr is as computed
  (papers print it x100 too: "CIDEr 1.2" here is "120" there).

CIDEr weighs each n-gram by its IDF over the *references of the evaluated set*:
``log(#images) - log(#images whose references contain it)``. So it is a corpus metric: an n-gram in
every image's references weighs 0, and with a single image everything weighs 0 and CIDEr is 0 for any
caption. :func:`caption_metrics` therefore asks for at least 2 images; use hundreds for stable numbers.
BLEU-4 is the corpus BLEU (n-gram counts summed over images, brevity penalty with the closest
reference length per image), not a mean of per-image scores.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

# The punctuation the COCO pipeline removes after PTB tokenisation, as characters.
_PUNCTUATION = ".?!,:;-'`\"()[]{}"
_STRIP_PUNCTUATION = str.maketrans({c: " " for c in _PUNCTUATION})


def tokenize_caption(caption: str) -> list[str]:
    """``"A red circle, left of it."`` -> ``["a", "red", "circle", "left", "of", "it"]``.

    What the COCO evaluation's PTB tokenizer gives for simple lower-case English: lower case,
    punctuation removed, split on whitespace (see the module docstring for where it differs).
    """
    if not isinstance(caption, str):
        raise ValueError(f"caption must be a str, got {type(caption).__name__}")
    return caption.lower().translate(_STRIP_PUNCTUATION).split()


def _tokenized(name: str, caption) -> str:
    """The caption as the space-joined tokens pycocoevalcap expects; errors name ``name``."""
    if not isinstance(caption, str):
        raise ValueError(f"{name} must be a str, got {type(caption).__name__}: {caption!r}")
    tokens = tokenize_caption(caption)
    if not tokens:
        raise ValueError(f"{name} is empty (no word after removing punctuation): {caption!r}")
    return " ".join(tokens)


def _is_list_like(value) -> bool:
    return isinstance(value, Sequence) and not isinstance(value, str)


def _coco_inputs(candidates, references) -> tuple[dict[int, list[str]], dict[int, list[str]]]:
    """Check the arguments of :func:`caption_metrics`; return pycocoevalcap's ``(gts, res)`` dicts."""
    if not _is_list_like(candidates):
        raise ValueError(f"candidates must be a list of caption strings, got {type(candidates).__name__}")
    if not _is_list_like(references):
        raise ValueError(f"references must be a list of lists of caption strings, got {type(references).__name__}")
    if len(candidates) != len(references):
        raise ValueError(
            f"candidates and references must have one entry per image, got {len(candidates)} candidates "
            f"and {len(references)} reference lists"
        )
    if len(candidates) < 2:
        raise ValueError(
            f"caption_metrics needs at least 2 images, got {len(candidates)}: CIDEr's IDF is computed over "
            "the references of the evaluated images, so with one image every n-gram weighs 0"
        )
    res, gts = {}, {}
    for i, (candidate, refs) in enumerate(zip(candidates, references)):
        res[i] = [_tokenized(f"candidates[{i}]", candidate)]
        if not _is_list_like(refs) or len(refs) == 0:
            raise ValueError(f"references[{i}] must be a non-empty list of caption strings, got {refs!r}")
        gts[i] = [_tokenized(f"references[{i}][{j}]", ref) for j, ref in enumerate(refs)]
    return gts, res


def _coco_scorers():
    try:
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
    except ImportError as error:
        raise ImportError(
            "caption_metrics needs pycocoevalcap: pip install pycocoevalcap==1.2 (it is in requirements.txt)"
        ) from error
    return Bleu(4), Cider()


def caption_metrics(candidates: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """Corpus BLEU-4 and CIDEr of one generated caption per image against its references.

    candidates: ``N`` captions, one per image (N >= 2). references: ``N`` non-empty lists of
    reference captions (ShapeWorld: ``scene.captions``; COCO: 5 per image).
    Returns ``{"BLEU-4": float in [0, 1], "CIDEr": float >= 0}`` (identical captions on distinct
    images give BLEU-4 1 and CIDEr 10). Every caption must hold at least one word.
    """
    gts, res = _coco_inputs(candidates, references)
    bleu, cider = _coco_scorers()
    bleu_scores, _ = bleu.compute_score(gts, res, verbose=0)
    cider_score, _ = cider.compute_score(gts, res)
    return {"BLEU-4": float(bleu_scores[3]), "CIDEr": float(cider_score)}


def most_frequent_caption(train_captions: Sequence[str]) -> str:
    """The training caption that occurs most often: the baseline a captioner must beat.

    Captions are counted by their tokens (:func:`tokenize_caption`), so "A red circle." and
    "a red circle" are one caption; the first spelling seen is returned. Ties go to the caption seen
    first. Predicting it for every image scores what the language prior alone scores.
    """
    if not _is_list_like(train_captions) or len(train_captions) == 0:
        raise ValueError(f"train_captions must be a non-empty list of caption strings, got {train_captions!r:.80}")
    counts: Counter[str] = Counter()
    first_spelling: dict[str, str] = {}
    for i, caption in enumerate(train_captions):
        if not isinstance(caption, str):
            raise ValueError(f"train_captions[{i}] must be a str, got {type(caption).__name__}")
        key = " ".join(tokenize_caption(caption))
        if key:
            counts[key] += 1
            first_spelling.setdefault(key, caption)
    if not counts:
        raise ValueError("train_captions holds no caption with a word in it")
    best, _ = counts.most_common(1)[0]  # most_common keeps first-seen order among ties
    return first_spelling[best]
