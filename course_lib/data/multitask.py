"""Data for 12-in-1's multi-task training on ShapeWorld (notebook 14, ``course_lib.evaluate.multitask``).

- :func:`nlvr_pairs`: an NLVR2-like task, two images and one statement, "is it true of both?";
- :func:`clean_train_sets`: 12-in-1's clean splits: no test image of any task in any task's training;
- :func:`duplicate_detections`: a real detector returns several overlapping boxes on one object
  (bottom-up attention keeps up to 100 per image); ShapeWorld's simulated detector returns one. This
  adds jittered duplicates (IoU > 0.4 with their original, the same class distribution, features pooled
  from the pixels inside the new box), so that 12-in-1's overlap masking has something to stop.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from course_lib.data.regions import ShapeWorldRegions, pooled_pixels
from course_lib.evaluate.boxes import box_iou

class CachedRegions(ShapeWorldRegions):
    """``ShapeWorldRegions`` that detects, renders and pools each scene once: the tasks of 12-in-1 read the
    same images (a scene's questions, phrases, caption and NLVR pairs), so their regions are computed once
    and indexed. Same batches as ``ShapeWorldRegions``."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._cache: dict[tuple[str, int], dict] = {}

    def regions(self, scenes) -> dict:
        todo = [s for s in {(s.split, s.index): s for s in scenes}.values() if (s.split, s.index) not in self._cache]
        if todo:
            fresh = super().regions(todo)
            for row, scene in enumerate(todo):
                self._cache[(scene.split, scene.index)] = {k: v[row] for k, v in fresh.items()}
        rows = [self._cache[(s.split, s.index)] for s in scenes]
        return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


PAIR_KEYS = ("region_feats", "region_boxes", "region_mask", "region_labels", "region_probs", "image_feat", "images")


def nlvr_pairs(source: ShapeWorldRegions, indices: Sequence[int], pool: Sequence[int], seed: int = 0) -> dict:
    """NLVR-like rows: for each scene ``a`` of ``indices``, one of its captions (true of ``a``) and a second
    scene ``b`` from ``pool``; the label says whether the caption is true of ``b`` too (of both images:
    ``caption_truth.caption_is_true``). About half the rows are drawn true: ``b`` is a pool scene that has
    the caption among its own (a caption of ``a`` that no pool scene shares gives a false row). The region
    keys of ``a`` are as usual, those of ``b`` prefixed ``right_`` (``right_region_feats`` ...);
    ``label (N,)`` long, 1 = true of both; ``index``/``right_index (N,)`` the two scenes."""
    from course_lib.evaluate.caption_truth import caption_is_true

    if len(indices) < 2 or len(pool) < 2:
        raise ValueError(f"indices and pool need at least 2 scenes each, got {len(indices)} and {len(pool)}")
    rng = np.random.default_rng(seed)
    split, world = source.split, source.world
    left = world.scenes(indices, split)
    pool = [int(i) for i in pool]
    pool_scenes = dict(zip(pool, world.scenes(pool, split)))
    having: dict[str, list[int]] = {}  # caption -> the pool scenes that list it
    for i, scene in pool_scenes.items():
        for caption in set(scene.captions):
            having.setdefault(caption, []).append(i)
    texts, rights = [], []
    for index, scene in zip(indices, left):
        captions = list(scene.captions)
        shared = [c for c in captions if any(j != index for j in having.get(c, ()))]
        if rng.random() < 0.5 and shared:
            text = shared[int(rng.integers(len(shared)))]
            others = [j for j in having[text] if j != index]
            right = others[int(rng.integers(len(others)))]
        else:
            text = captions[int(rng.integers(len(captions)))]
            right = pool[int(rng.integers(len(pool)))]
        texts.append(text)
        rights.append(right)
    right_scenes = [pool_scenes[j] for j in rights]
    batch = source.regions(left)
    batch.pop("region_source")
    right = source.regions(right_scenes)
    batch.update({f"right_{k}": right[k] for k in PAIR_KEYS if k in right})
    batch.update(source.text(texts))
    batch["label"] = torch.tensor([int(caption_is_true(t, s)) for t, s in zip(texts, right_scenes)])
    batch["index"] = torch.as_tensor(list(indices), dtype=torch.long)
    batch["right_index"] = torch.tensor(rights)
    return batch


def right_image(batch: dict) -> dict:
    """The batch with the ``right_`` image in place of the left one (same statement)."""
    out = {k: v for k, v in batch.items() if not k.startswith("right_")}
    out.update({k[len("right_"):]: v for k, v in batch.items() if k.startswith("right_") and k != "right_index"})
    return out


def clean_train_sets(train: Mapping[str, Sequence[int]], test: Mapping[str, Sequence[int]]) -> dict[str, list[int]]:
    """12-in-1's ``--clean_train_sets``: each task's training scenes without the test scenes of *every*
    task (tasks share images: a VQA training image may be a grounding test image)."""
    held_out = {int(i) for ids in test.values() for i in ids}
    return {task: [int(i) for i in ids if int(i) not in held_out] for task, ids in train.items()}


def duplicate_detections(batch: dict, prob: float = 0.5, jitter: float = 0.08, max_regions: int | None = None,
                         seed: int = 0) -> dict:
    """Add a jittered duplicate of each real region with probability ``prob`` (as many as fit in
    ``max_regions``, default: the batch's ``R`` plus the largest number drawn). A duplicate's corners move by
    up to ``jitter`` of the box side, its IoU with the original stays > 0.4 (the jitter is halved until it
    does), its feature is RoIAlign of the pixels inside it (``images`` needed), and it keeps the original's
    class distribution and label. Returns a new batch; ``region_source (B, R)`` says which region each
    came from (itself for the originals, -1 at padding)."""
    if "images" not in batch:
        raise ValueError("duplicate_detections pools the pixels inside each new box: the batch needs 'images'")
    if not 0.0 <= prob <= 1.0:
        raise ValueError(f"prob must be in [0, 1], got {prob!r}")
    g = torch.Generator().manual_seed(seed)
    mask = batch["region_mask"].bool()
    B, R = mask.shape
    draw = (torch.rand(B, R, generator=g) < prob) & mask
    extra = int(draw.sum(1).max()) if B else 0
    size = max_regions or R + extra
    images = batch["images"].float() / 255.0
    H = images.shape[-1]
    keys = ("region_feats", "region_boxes", "region_mask", "region_labels", "region_probs")
    out = {k: v for k, v in batch.items()}
    new = {k: [] for k in keys}
    source = []
    for b in range(B):
        real = mask[b].nonzero().flatten().tolist()
        rows = {k: [batch[k][b, i] for i in real] for k in keys if k in batch}
        src = list(real)
        for i in draw[b].nonzero().flatten().tolist():
            if len(src) >= size:
                break
            box = batch["region_boxes"][b, i]
            side = (box[2:] - box[:2]).repeat(2)
            step = jitter
            while True:
                moved = (box + (torch.rand(4, generator=g) * 2 - 1) * step * side).clamp(0, 1)
                moved = torch.cat([torch.minimum(moved[:2], moved[2:]), torch.maximum(moved[:2], moved[2:])])
                if float(box_iou(box[None], moved[None])[0, 0]) > 0.4 or step < 1e-3:
                    break
                step /= 2
            rows["region_boxes"].append(moved)
            rows["region_feats"].append(pooled_pixels(images[b:b + 1], [moved[None] * H])[0])
            rows["region_mask"].append(torch.tensor(True))
            for k in ("region_labels", "region_probs"):
                if k in rows:
                    rows[k].append(batch[k][b, i])
            src.append(i)
        for k in rows:
            stacked = torch.stack(rows[k])
            pad = {"region_labels": -1, "region_mask": False}.get(k, 0.0)
            full = torch.full((size, *stacked.shape[1:]), pad, dtype=stacked.dtype)
            if k == "region_probs":
                full[:, -1] = 1.0  # padding shows "no object"
            full[:len(stacked)] = stacked[:size]
            new[k].append(full)
        source.append(torch.tensor(src + [-1] * (size - len(src))))
    for k in keys:
        if new[k]:
            out[k] = torch.stack(new[k])
    out["region_source"] = torch.stack(source)
    return out



# --------------------------------------------------------------------------- the 12-in-1 data on ShapeWorld

TASK_NAMES = ("retrieval", "vqa", "grounding", "nlvr")


def task_rows(source: ShapeWorldRegions, task: str, indices: Sequence[int], pool: Sequence[int], seed: int = 0) -> dict:
    """The rows of ``task`` for the scenes ``indices``: retrieval pairs (each image with its caption),
    ``questions``, ``phrases`` of scenes with two objects or more, or :func:`nlvr_pairs` (second images
    from ``pool``)."""
    if task == "retrieval":
        return source(indices)
    if task == "vqa":
        return source.questions(indices)
    if task == "grounding":
        return source.phrases(indices, min_objects=2)
    if task == "nlvr":
        return nlvr_pairs(source, indices, pool, seed=seed)
    raise ValueError(f"unknown task {task!r}; expected one of {list(TASK_NAMES)}")


def multitask_splits(pool: Sequence[int], train_per_task: int, val_per_task: int, test_per_task: int,
                     seed: int = 0) -> tuple[dict, dict, dict, dict]:
    """``(train, val, test, dropped)`` scene indices per task from one shared ``pool`` of images (as COCO's
    images serve VQA, retrieval and referring expressions at once): each task's test and validation scenes
    are its own slice of the pool, its training scenes a random draw of ``train_per_task`` from the rest of
    the pool, from which :func:`clean_train_sets` then drops every task's test scenes; ``dropped[task]`` is
    how many that removed."""
    n_held = val_per_task + test_per_task
    if len(pool) < len(TASK_NAMES) * n_held + train_per_task:
        raise ValueError(f"pool has {len(pool)} scenes; {len(TASK_NAMES)} tasks x {n_held} held out + "
                         f"{train_per_task} training scenes need more")
    rng = np.random.default_rng(seed)
    pool = [int(i) for i in rng.permutation(np.asarray(pool))]
    held = {t: pool[k * n_held:(k + 1) * n_held] for k, t in enumerate(TASK_NAMES)}
    val = {t: ids[:val_per_task] for t, ids in held.items()}
    test = {t: ids[val_per_task:] for t, ids in held.items()}
    own_held = {t: set(ids) for t, ids in held.items()}
    raw = {t: [int(i) for i in rng.permutation([i for i in pool if i not in own_held[t]])[:train_per_task]]
           for t in TASK_NAMES}
    train = clean_train_sets(raw, test)
    train = clean_train_sets(train, val)
    return train, val, test, {t: len(raw[t]) - len(train[t]) for t in TASK_NAMES}


def shapeworld_multitask(world, tokenizer, context_length: int = 20, max_regions: int = 6, pretrain_scenes: int = 1000,
                         pool_scenes: int = 800, train_per_task: int = 400, val_per_task: int = 40,
                         test_per_task: int = 60, duplicates: float = 0.5, seed: int = 0) -> dict:
    """Everything notebook 14 and ``benchmarks/vilbert_multitask.py`` train and score on, built the same way
    by both: ``{"source", "pretrain", "train", "val", "test", "splits", "dropped", "num_answers"}``.

    ``pretrain``: the descriptions of ``pretrain_scenes`` training scenes, with :func:`duplicate_detections`
    (``duplicates`` of the regions get an overlapping twin); the tasks read the next ``pool_scenes`` scenes
    (:func:`multitask_splits`); ``train``/``val``/``test`` map each task to its rows (:func:`task_rows`)."""
    from course_lib.data.language import answer_vocabulary

    source = CachedRegions(world, tokenizer, context_length, max_regions=max_regions - 2, caption="description")
    pretrain = duplicate_detections(source(range(pretrain_scenes)), duplicates, max_regions=max_regions, seed=seed)
    pool = list(range(pretrain_scenes, pretrain_scenes + pool_scenes))
    train, val, test, dropped = multitask_splits(pool, train_per_task, val_per_task, test_per_task, seed)
    rows = {name: {t: task_rows(source, t, ids[t], pool, seed=k) for t in TASK_NAMES}
            for k, (name, ids) in enumerate((("train", train), ("val", val), ("test", test)))}
    return {"source": source, "pretrain": pretrain, **rows, "splits": {"train": train, "val": val, "test": test},
            "dropped": dropped, "num_answers": len(answer_vocabulary(world.config))}
