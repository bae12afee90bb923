"""Object tags (Oscar, Li et al. 2020): what a detector called each region, written as words.

A detector gives every region a class id; Oscar reads the class *names* of an image's regions as a
second sentence, ``"dog dog man frisbee"``, tokenised by the caption's own tokenizer and embedded by
the same word embeddings as the caption. A tag and the caption word that names the same object are
then the same vector: an anchor between the two modalities (Oscar's ``od_labels``; the original
data joins the detector's labels with spaces, duplicates and all, ``oscar/datasets/oscar_tsv.py``).

:class:`ObjectTags` turns region batches into tags, with no string work per batch: the class names
are tokenised once into a ``(C, P)`` table of word pieces, and a batch's tags are gathered from it:

- one tag per labelled region, in the detector's order (``region_labels >= 0``; a padding slot or a
  "no object" placeholder, label -1, has none), the word pieces of its class name;
- then ``[SEP]``, which closes Oscar's second segment; an image without a labelled region gets
  ``[SEP]`` alone;
- cut to ``max_tokens`` (the last tags are dropped, the ``[SEP]`` stays) and padded with ``[PAD]``.

For ShapeWorld the class names come from the world (``"red circle"``, ...); for real region shards
the class ids index the detector's vocabulary (bottom-up-attention's 1,600 Visual Genome objects,
its ``objects_vocab.txt``, one name per line): give those names as ``class_names``
(:func:`read_class_names`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from course_lib.features.text import PAD_ID, SEP_ID
from course_lib.utils import check_shape


def read_class_names(path: str | Path) -> list[str]:
    """The class names of a detector vocabulary file, one per line (line i is class i); a line
    ``"name,synonym"`` (the bottom-up-attention layout) keeps its first name."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"tag_names file {str(path)!r} does not exist; it should hold one class name per line "
                                "(line i names class i, e.g. bottom-up-attention's objects_vocab.txt)")
    names = [line.split(",")[0].strip() for line in path.read_text(encoding="utf-8").splitlines()]
    while names and not names[-1]:
        names.pop()
    empty = [i for i, name in enumerate(names) if not name]
    if not names or empty:
        problem = "no class name" if not names else f"empty lines {empty[:5]}"
        raise ValueError(f"tag_names file {str(path)!r} has {problem}; every line must name its class")
    return names


class ObjectTags:
    """``tags(region_labels (B, R), region_mask (B, R))`` -> ``{"tag_ids": (B, T), "tag_mask": (B, T)}``
    int64, ``T = max_tokens``: the class names of each image's labelled regions as word pieces, then
    ``[SEP]`` (see the module docstring).

    tokenizer: the caption tokenizer (a ``transformers`` tokenizer); class_names: ``C`` strings,
    ``class_names[c]`` the name of class ``c``.
    """

    def __init__(self, tokenizer, class_names: Sequence[str], max_tokens: int):
        if isinstance(class_names, str) or not isinstance(class_names, Sequence) or len(class_names) == 0:
            raise ValueError(f"class_names must be a non-empty list of class names, got {class_names!r}")
        bad = [i for i, n in enumerate(class_names) if not isinstance(n, str) or not n.strip()]
        if bad:
            raise ValueError(f"class_names[{bad[0]}] is {class_names[bad[0]]!r}; every class needs a name")
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 2:
            raise ValueError(f"max_tokens must be an int >= 2 (a tag and [SEP]), got {max_tokens!r}")
        self.class_names, self.max_tokens = list(class_names), max_tokens
        pieces = [tokenizer(name, add_special_tokens=False)["input_ids"] for name in self.class_names]
        empty = [name for name, p in zip(self.class_names, pieces) if not p]
        if empty:
            raise ValueError(f"the tokenizer turns class names {empty[:3]} into no token")
        width = max(len(p) for p in pieces)
        self.table = torch.full((len(pieces), width), PAD_ID, dtype=torch.long)  # (C, P) word pieces
        for c, p in enumerate(pieces):
            self.table[c, : len(p)] = torch.tensor(p)
        self.lengths = torch.tensor([len(p) for p in pieces])  # (C,)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __call__(self, region_labels: torch.Tensor, region_mask: torch.Tensor) -> dict:
        check_shape("region_labels", region_labels, (None, None))
        check_shape("region_mask", region_mask, tuple(region_labels.shape))
        if region_labels.numel() and int(region_labels.max()) >= self.num_classes:
            raise ValueError(f"region_labels go up to {int(region_labels.max())} but there are {self.num_classes} "
                             "class names; give one name per detector class")
        B, R = region_labels.shape
        table, lengths = self.table.to(region_labels.device), self.lengths.to(region_labels.device)
        labelled = region_mask.bool() & (region_labels >= 0)  # (B, R)
        classes = region_labels.clamp(min=0)
        pieces = table[classes]  # (B, R, P)
        real = (torch.arange(table.shape[1], device=table.device) < lengths[classes][..., None])  # (B, R, P)
        real = (real & labelled[..., None]).flatten(1)  # (B, R * P)
        pieces = pieces.flatten(1)
        order = torch.argsort((~real).int(), dim=1, stable=True)  # the real pieces first, in order
        pieces, real = pieces.gather(1, order), real.gather(1, order)
        T = self.max_tokens
        if pieces.shape[1] < T:  # room for every piece and [SEP]
            pad = T - pieces.shape[1]
            pieces = torch.cat([pieces, pieces.new_full((B, pad), PAD_ID)], 1)
            real = torch.cat([real, real.new_zeros(B, pad)], 1)
        pieces, real = pieces[:, : T - 1], real[:, : T - 1]  # (B, T - 1): the [SEP] always fits
        count = real.sum(1)  # (B,) tag pieces kept
        ids = torch.cat([pieces.masked_fill(~real, PAD_ID), pieces.new_full((B, 1), PAD_ID)], 1)  # (B, T)
        ids[torch.arange(B, device=ids.device), count] = SEP_ID
        mask = torch.arange(T, device=ids.device)[None] <= count[:, None]
        return {"tag_ids": ids, "tag_mask": mask.long()}

    def __repr__(self) -> str:
        return f"ObjectTags({self.num_classes} classes, max_tokens={self.max_tokens})"
