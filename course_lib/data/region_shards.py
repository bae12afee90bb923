"""Region-feature shards (written by ``python -m data_scripts.shard_regions``) -> region batches.

A sample of such a shard holds ``feats.npy`` (N, F) float16, ``boxes.npy`` (N, 4) float32
(x1, y1, x2, y2 in [0, 1]), ``labels.npy`` (N,) int64 (the detector's top class, -1 when the
features came without labels), ``txt`` (a caption) and ``json`` (captions, questions, sizes).

:class:`RegionShardDataset` streams them with everything ``ShardDataset`` does (splitting by
process and worker, seeded shuffling, corrupt data skipped and counted in ``stats``), keeping
the first ``max_regions`` regions of each image in file order (the detector's order).
:class:`RegionBatches` collates them into the region batch every region model consumes
(``input_ids``, ``attention_mask``, ``region_feats``, ``region_boxes``, ``region_mask``,
``region_labels``, ``index``; padded to ``max_regions`` so shapes are static). It has no
``region_probs`` (the TSV releases keep only each region's top class) and no ``images``.
:func:`region_shard_texts` gives the captions, for training a tokenizer.

Skip reasons, besides ``ShardDataset``'s: ``missing_npy`` (a sample without one of the three
arrays) and ``corrupt_npy`` (an array that does not load, has the wrong shape or dtype, or
features that are not finite).
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterator, Sequence
from itertools import islice

import numpy as np
import torch

from course_lib.data.onthefly import _check_int, _tokenize
from course_lib.data.shards import MAX_TEXT_BYTES, ShardDataset, ShardError, decode_text_fields, load_npy

DEFAULT_MAX_REGIONS = 36  # the bottom-up-attention releases' fixed 36 boxes per image
ARRAY_FIELDS = ("feats.npy", "boxes.npy", "labels.npy")


def _load_array(sample: dict, name: str, where: str) -> np.ndarray:
    if name not in sample:
        fields = sorted(k for k in sample if not k.startswith("__"))
        raise ShardError(f"{where} has no {name} (fields: {fields})", reason="missing_npy")
    try:
        return load_npy(sample[name])
    except (ValueError, OSError, EOFError) as exn:
        raise ShardError(f"{where}: {name} is not a loadable .npy array ({exn})", reason="corrupt_npy") from exn


def _check_arrays(feats: np.ndarray, boxes: np.ndarray, labels: np.ndarray, where: str) -> None:
    """feats (N, F) float, boxes (N, 4) float, labels (N,) int, N >= 1, finite features; else ``corrupt_npy``."""
    problems = []
    if feats.ndim != 2 or feats.shape[0] < 1 or feats.shape[1] < 1 or feats.dtype.kind != "f":
        problems.append(f"feats.npy must be (N >= 1, F >= 1) float, got {feats.dtype} {feats.shape}")
    n = feats.shape[0] if feats.ndim else -1
    if boxes.shape != (n, 4) or boxes.dtype.kind != "f":
        problems.append(f"boxes.npy must be ({n}, 4) float, got {boxes.dtype} {boxes.shape}")
    if labels.shape != (n,) or labels.dtype.kind not in "iu":
        problems.append(f"labels.npy must be ({n},) int, got {labels.dtype} {labels.shape}")
    if not problems and not np.isfinite(feats).all():
        problems.append("feats.npy holds NaN or inf")
    if problems:
        raise ShardError(f"{where}: " + "; ".join(problems), reason="corrupt_npy")


def decode_region_sample(sample: dict, max_regions: int = DEFAULT_MAX_REGIONS, require_text: bool = True,
                         arrays: bool = True) -> dict:
    """Raw region-shard sample -> ``{"feats": (R, F) float32, "boxes": (R, 4) float32,
    "labels": (R,) int64, "text", "meta", "key", "shard"}`` with R = min(N, ``max_regions``), the
    first regions in file order. ``arrays=False`` leaves the three arrays out (text only).

    Raises ``ShardError`` (a ``ValueError`` with a ``reason``) naming the sample and shard:
    ``missing_txt`` (with ``require_text``), ``missing_npy``, ``corrupt_npy``, ``corrupt_txt``,
    ``corrupt_json``.
    """
    key, shard = sample.get("__key__"), sample.get("__url__")
    where = f"sample {key!r} in {shard}"
    if require_text and "txt" not in sample:
        fields = sorted(k for k in sample if not k.startswith("__"))
        raise ShardError(f"{where} has no caption: no .txt member (fields: {fields})", reason="missing_txt")
    out = {}
    if arrays:
        feats, boxes, labels = (_load_array(sample, name, where) for name in ARRAY_FIELDS)
        _check_arrays(feats, boxes, labels, where)
        out = {"feats": torch.from_numpy(feats[:max_regions].astype(np.float32)),
               "boxes": torch.from_numpy(boxes[:max_regions].astype(np.float32)),
               "labels": torch.from_numpy(labels[:max_regions].astype(np.int64))}
    text, meta = decode_text_fields(sample, where)
    return {**out, "text": text, "meta": meta, "key": key, "shard": shard}


class RegionShardDataset(ShardDataset):
    """Stream ``{"feats": (R, F), "boxes": (R, 4), "labels": (R,), "text", "meta", "key", "shard"}``
    samples (R <= ``max_regions``) from region shards.

    Arguments as ``ShardDataset`` (``shuffle``, ``split_by_node``, ``split_by_worker``,
    ``handler``, ``seed``, ``require_text``, ``max_text_bytes``); ``max_regions``: regions kept
    per image, the first in file order; ``arrays=False`` reads only the text (no array is loaded).
    Skipped samples are counted in ``self.stats["reasons"]`` (``corrupt_npy``, ``missing_npy``, ...).
    """

    def __init__(self, urls_or_dir, max_regions: int = DEFAULT_MAX_REGIONS, shuffle: int = 0,
                 split_by_node: bool = True, split_by_worker: bool = True, handler: str = "skip", seed: int = 0,
                 require_text: bool = True, max_text_bytes: int = MAX_TEXT_BYTES, arrays: bool = True):
        _check_int("max_regions", max_regions, 1)
        if not isinstance(arrays, bool):
            raise ValueError(f"arrays must be True or False, got {arrays!r}")
        self.max_regions, self.arrays = max_regions, arrays
        super().__init__(urls_or_dir, shuffle=shuffle, split_by_node=split_by_node, split_by_worker=split_by_worker,
                         handler=handler, seed=seed, require_text=require_text, max_text_bytes=max_text_bytes)

    def _decoder(self):
        return functools.partial(decode_region_sample, max_regions=self.max_regions,
                                 require_text=self.require_text, arrays=self.arrays)


def key_index(key: str) -> int:
    """A stable non-negative int64 id of a sample key (56 bits of its BLAKE2b hash).

    A stream of shards has no global sample position; this id is the same in every epoch,
    process and worker, which is what a per-sample seed needs.
    """
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=7).digest(), "big")


def pad_regions(samples: Sequence[dict], max_regions: int) -> dict:
    """Samples' ``feats`` (N_b, F), ``boxes`` (N_b, 4), ``labels`` (N_b,) -> ``region_feats``
    (B, R, F) float32, ``region_boxes`` (B, R, 4) float32 (zeros at padding), ``region_mask``
    (B, R) bool, ``region_labels`` (B, R) int64 (-1 at padding), with R = ``max_regions``
    (regions beyond it are dropped)."""
    widths = {s["feats"].shape[1] for s in samples}
    if len(widths) > 1:
        raise ValueError(f"samples have region features of widths {sorted(widths)} in one batch; the shards were "
                         "written with different --feat-dim: read them separately")
    b, width = len(samples), widths.pop()
    feats = torch.zeros(b, max_regions, width, dtype=torch.float32)
    boxes = torch.zeros(b, max_regions, 4, dtype=torch.float32)
    mask = torch.zeros(b, max_regions, dtype=torch.bool)
    labels = torch.full((b, max_regions), -1, dtype=torch.long)
    for row, sample in enumerate(samples):
        n = min(len(sample["feats"]), max_regions)
        feats[row, :n], boxes[row, :n] = sample["feats"][:n], sample["boxes"][:n]
        labels[row, :n], mask[row, :n] = sample["labels"][:n], True
    return {"region_feats": feats, "region_boxes": boxes, "region_mask": mask, "region_labels": labels}


class RegionBatches:
    """DataLoader ``collate_fn`` for :class:`RegionShardDataset` samples -> the region batch:
    ``input_ids``, ``attention_mask`` (B, L) int64 (``[CLS] caption [SEP] [PAD]...``, L =
    ``context_length``), ``region_feats`` (B, R, F) float32, ``region_boxes`` (B, R, 4) float32,
    ``region_mask`` (B, R) bool, ``region_labels`` (B, R) int64 (see :func:`pad_regions`; R =
    ``max_regions``), ``index`` (B,) int64 (:func:`key_index` of each sample's key).

    With ``tag_names`` (the detector's class names, ``tag_names[c]`` naming class ``c``: e.g.
    bottom-up-attention's ``objects_vocab.txt``, read by ``course_lib.features.tags.read_class_names``)
    it also gives Oscar's object tags ``tag_ids``/``tag_mask`` (B, ``tag_tokens``)
    (``course_lib.features.tags.ObjectTags``)."""

    def __init__(self, tokenizer, context_length: int, max_regions: int = DEFAULT_MAX_REGIONS,
                 tag_names=None, tag_tokens: int = 32):
        _check_int("context_length", context_length, 2)
        _check_int("max_regions", max_regions, 1)
        self.tokenizer, self.context_length, self.max_regions = tokenizer, context_length, max_regions
        self.tags = None
        if tag_names is not None:
            from course_lib.features.tags import ObjectTags

            self.tags = ObjectTags(tokenizer, tag_names, tag_tokens)

    def __call__(self, samples: list[dict]) -> dict:
        if not samples:
            raise ValueError("samples is empty: nothing to collate")
        missing = [s.get("key") for s in samples if "feats" not in s]
        if missing:
            raise ValueError(f"samples {missing[:3]} have no region arrays; read them with arrays=True")
        regions = pad_regions(samples, self.max_regions)
        tags = {} if self.tags is None else self.tags(regions["region_labels"], regions["region_mask"])
        return {**_tokenize(self.tokenizer, [s["text"] for s in samples], self.context_length), **regions, **tags,
                "index": torch.tensor([key_index(s["key"]) for s in samples], dtype=torch.long)}


def _sample_texts(sample: dict) -> list[str]:
    """Every caption and question of a sample's json (its ``txt`` when the json has none)."""
    meta = sample["meta"] if isinstance(sample["meta"], dict) else {}
    texts = list(meta.get("captions") or [])
    texts += [q.get("question") for q in meta.get("questions") or [] if isinstance(q, dict)]
    texts = [t for t in texts if isinstance(t, str) and t.strip()]
    return texts or ([sample["text"]] if sample["text"].strip() else [])


def region_shard_texts(urls_or_dir, max_samples: int | None = None) -> Iterator[str]:
    """The captions (and VQA questions) of the first ``max_samples`` readable samples (all when
    None), in shard order: the corpus to learn a tokenizer from. Reads no array (no ``.npy`` is
    loaded); samples whose text or json does not parse are skipped."""
    if max_samples is not None:
        _check_int("max_samples", max_samples, 1)
    dataset = RegionShardDataset(urls_or_dir, split_by_node=False, split_by_worker=False, arrays=False)
    for sample in islice(dataset, max_samples):
        yield from _sample_texts(sample)
