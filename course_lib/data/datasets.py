"""Torch datasets over ShapeWorld for pretraining and for each downstream task, with their
collate functions (padding + masks).

Each dataset holds ``size`` scenes of one split. Images are rendered once, up front, into a
uint8 tensor (32 px images take 3 KB each), so a training step costs no rendering; text is
tokenized per batch by the collate function, which pads and builds the attention masks.

| dataset              | item                                        | task                        |
|----------------------|---------------------------------------------|-----------------------------|
| ImageTextDataset     | image, its captions                          | pretraining, retrieval, captioning |
| RegionDataset        | image, boxes, classes, detector output       | region features, MRC, grounding |
| VQADataset           | image, question, answer id                   | visual question answering   |
| GroundingDataset     | image, referring phrase, box                 | visual grounding            |
| PairDataset          | two images, a statement, true/false          | NLVR-like reasoning         |
| VideoDataset         | T frames, caption                            | video-text, frame order     |
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from course_lib.data.language import QUESTION_TYPES, answer_vocabulary, pair_statement
from course_lib.data.shapeworld import ShapeWorld
from course_lib.data.simulated_detector import DetectorConfig
from course_lib.utils import check_one_of


def images_to_tensor(pixels: np.ndarray) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float32 in [0, 1]."""
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).float().div_(255.0)


class ShapeWorldDataset(Dataset):
    """``size`` scenes of ``split``, scene ids ``offset .. offset + size - 1``, pre-rendered."""

    def __init__(self, world: ShapeWorld, split: str = "train", size: int = 1000,
                 image_size: int | None = None, offset: int = 0):
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        self.world, self.split, self.size = world, split, size
        self.image_size = image_size or world.config.image_size
        self.scenes = world.scenes(range(offset, offset + size), split)
        self._pixels = torch.from_numpy(world.render_batch(self.scenes, self.image_size))  # (N, H, W, 3)

    def __len__(self) -> int:
        return self.size

    def image(self, i: int) -> torch.Tensor:
        """(3, H, W) float32 in [0, 1]."""
        return self._pixels[i].permute(2, 0, 1).float().div_(255.0)

    def all_images(self) -> torch.Tensor:
        """(N, 3, H, W) float32: the whole split at once (for evaluation)."""
        return self._pixels.permute(0, 3, 1, 2).float().div_(255.0)


class ImageTextDataset(ShapeWorldDataset):
    """Items: ``{"image": (3, H, W), "captions": tuple[str], "index": int}``.

    ``captions="grammar"`` gives the scene's varied captions (some vague, some noisy when the world
    has ``caption_noise``); ``"description"`` gives only the canonical full description, the
    cleanest signal (what retrieval is evaluated on).
    """

    def __init__(self, world, split="train", size=1000, image_size=None, offset=0, captions="grammar"):
        super().__init__(world, split, size, image_size, offset)
        check_one_of("captions", captions, ("grammar", "description"))
        self.captions = captions

    def __getitem__(self, i: int) -> dict:
        s = self.scenes[i]
        caps = s.captions if self.captions == "grammar" else (s.description,)
        return {"image": self.image(i), "captions": caps, "index": i}


class RegionDataset(ShapeWorldDataset):
    """Items add ground-truth boxes and classes and, with a detector config, simulated detections.

    Boxes are in pixels of the rendered image. With ``detector``, ``"det_boxes"`` and
    ``"det_probs"`` ((N', C + 1), last column "no object") come from the simulated detector.
    """

    def __init__(self, world, split="train", size=1000, image_size=None, offset=0,
                 detector: DetectorConfig | None = None):
        super().__init__(world, split, size, image_size, offset)
        self.detector = detector

    def __getitem__(self, i: int) -> dict:
        s = self.scenes[i]
        item = {
            "image": self.image(i),
            "captions": s.captions,
            "boxes": torch.from_numpy(s.boxes(self.image_size)),
            "classes": torch.from_numpy(s.class_ids),
            "index": i,
        }
        if self.detector is not None:
            det = self.world.detect(s, self.detector)
            item["det_boxes"] = torch.from_numpy(det.pixel_boxes(self.image_size))
            item["det_probs"] = torch.from_numpy(det.class_probs)
        return item


class VQADataset(ShapeWorldDataset):
    """One item per (scene, question): ``{"image", "question", "answer" (class id), "qtype"}``.

    ``question_types`` keeps only some types (``"exist", "count", "color", "shape", "relation"``).
    """

    def __init__(self, world, split="train", size=1000, image_size=None, offset=0,
                 question_types=QUESTION_TYPES):
        super().__init__(world, split, size, image_size, offset)
        unknown = set(question_types) - set(QUESTION_TYPES)
        if unknown:
            raise ValueError(f"unknown question_types {sorted(unknown)}; valid ones are {list(QUESTION_TYPES)}")
        self.answers = answer_vocabulary(world.config)
        self.items = [
            (i, q, self.answers.index(a), QUESTION_TYPES.index(t))
            for i, s in enumerate(self.scenes)
            for q, a, t in s.questions
            if t in question_types
        ]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, k: int) -> dict:
        i, q, a, t = self.items[k]
        return {"image": self.image(i), "question": q, "answer": a, "qtype": t, "index": i}


class GroundingDataset(ShapeWorldDataset):
    """One item per object: ``{"image", "phrase", "box"}`` with the box normalised (x1, y1, x2, y2)
    to the rendered pixels / image size."""

    def __init__(self, world, split="train", size=1000, image_size=None, offset=0):
        super().__init__(world, split, size, image_size, offset)
        self.items = [(i, j) for i, s in enumerate(self.scenes) for j in range(len(s.objects))]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, k: int) -> dict:
        i, j = self.items[k]
        s = self.scenes[i]
        box = torch.from_numpy(s.boxes(self.image_size)[j]) / self.image_size
        return {"image": self.image(i), "phrase": s.region_phrases[j], "box": box, "index": i}


class PairDataset(ShapeWorldDataset):
    """NLVR-like: item k pairs scenes 2k and 2k+1 with a statement that is true for half the items.

    ``{"left": (3, H, W), "right": (3, H, W), "statement": str, "label": 0 or 1}``
    """

    def __init__(self, world, split="train", size=1000, image_size=None, offset=0):
        super().__init__(world, split, 2 * size, image_size, 2 * offset)
        rng = np.random.default_rng((world.config.seed, 7, offset, size))
        labels = rng.permutation(np.arange(size) % 2)  # exactly balanced
        self.items = [
            (pair_statement(self.scenes[2 * k], self.scenes[2 * k + 1], rng, bool(labels[k])), int(labels[k]))
            for k in range(size)
        ]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, k: int) -> dict:
        statement, label = self.items[k]
        return {"left": self.image(2 * k), "right": self.image(2 * k + 1), "statement": statement,
                "label": label, "index": k}


class VideoDataset(Dataset):
    """Items: ``{"frames": (T, 3, H, W), "caption": str, "motions": tuple[str]}``."""

    def __init__(self, world: ShapeWorld, split="train", size=200, num_frames=8, image_size=None, offset=0):
        from course_lib.data.video import make_video, render_video

        self.videos = [make_video(world, i, split, num_frames) for i in range(offset, offset + size)]
        size_px = image_size or world.config.image_size
        self.frames = [torch.from_numpy(render_video(world, v, size_px)) for v in self.videos]

    def __len__(self) -> int:
        return len(self.videos)

    def __getitem__(self, i: int) -> dict:
        v = self.videos[i]
        frames = self.frames[i].permute(0, 3, 1, 2).float().div_(255.0)
        return {"frames": frames, "caption": v.captions[-1], "motions": v.motions, "index": i}


# ------------------------------------------------------------------------------ collation
def pad_boxes(boxes: list[torch.Tensor], width: int = 4, value: float = 0.0):
    """Pad a list of (N_i, width) tensors to (B, N_max, width); also return the (B, N_max) bool mask."""
    n_max = max((len(b) for b in boxes), default=0)
    out = torch.full((len(boxes), max(n_max, 1), width), value, dtype=torch.float32)
    mask = torch.zeros(len(boxes), max(n_max, 1), dtype=torch.bool)
    for k, b in enumerate(boxes):
        out[k, : len(b)] = b
        mask[k, : len(b)] = True
    return out, mask


class Collator:
    """Stacks images, tokenizes and pads text, pads boxes; returns one dict of tensors.

    ``caption``: which caption of an image-text item to use: ``"first"``, ``"random"`` (drawn
    from the collator's own seeded generator, so runs repeat) or an int.
    """

    def __init__(self, tokenizer, max_length: int = 32, caption="random", seed: int = 0):
        if not (caption in ("first", "random") or isinstance(caption, int)):
            raise ValueError(f"caption must be 'first', 'random' or an int, got {caption!r}")
        self.tokenizer, self.max_length, self.caption = tokenizer, max_length, caption
        self.generator = torch.Generator().manual_seed(seed)

    def _pick(self, captions) -> str:
        if self.caption == "first":
            return captions[0]
        if self.caption == "random":
            return captions[int(torch.randint(len(captions), (1,), generator=self.generator))]
        return captions[self.caption % len(captions)]

    def text(self, texts: list[str], prefix: str = "") -> dict:
        from course_lib.features.text import encode

        enc = encode(self.tokenizer, texts, max_length=self.max_length)
        return {f"{prefix}input_ids": enc["input_ids"], f"{prefix}attention_mask": enc["attention_mask"]}

    def __call__(self, items: list[dict]) -> dict:
        if not items:
            raise ValueError("cannot collate an empty list of items")
        batch: dict = {"index": torch.tensor([it["index"] for it in items])}
        first = items[0]
        for key, name in (("image", "images"), ("left", "left"), ("right", "right"), ("frames", "frames")):
            if key in first:
                batch[name] = torch.stack([it[key] for it in items])
        if "captions" in first:
            batch["captions"] = [self._pick(it["captions"]) for it in items]
            batch.update(self.text(batch["captions"]))
        for key in ("question", "phrase", "statement", "caption"):
            if key in first:
                batch.update(self.text([it[key] for it in items]))
                batch[key + "s"] = [it[key] for it in items]
        for key in ("answer", "label", "qtype"):
            if key in first:
                batch[key + "s"] = torch.tensor([it[key] for it in items])
        if "box" in first:
            batch["boxes"] = torch.stack([it["box"] for it in items])
        if "boxes" in first:
            batch["boxes"], batch["box_mask"] = pad_boxes([it["boxes"] for it in items])
            batch["classes"] = pad_boxes([it["classes"].float()[:, None] for it in items], 1, -1)[0][..., 0].long()
        if "det_boxes" in first:
            batch["det_boxes"], batch["det_mask"] = pad_boxes([it["det_boxes"] for it in items])
            width = first["det_probs"].shape[1]
            batch["det_probs"] = pad_boxes([it["det_probs"] for it in items], width)[0]
        return batch


class StepBatches:
    """``batches(step)`` -> the collated batch number ``step``: a deterministic function of
    ``(seed, step)``, so a resumed run sees exactly the batches an uninterrupted one would.

    Items are drawn without replacement within an epoch (a fresh seeded permutation per epoch).
    """

    def __init__(self, dataset, collate: Collator, batch_size: int, seed: int = 0):
        if len(dataset) == 0:
            raise ValueError("dataset is empty: nothing to draw batches from")
        if not 1 <= batch_size <= len(dataset):
            raise ValueError(f"batch_size must be in [1, len(dataset)={len(dataset)}], got {batch_size}")
        self.dataset, self.collate, self.batch_size, self.seed = dataset, collate, batch_size, seed
        self.per_epoch = len(dataset) // batch_size
        self._perm_epoch, self._perm = -1, None

    def __call__(self, step: int) -> dict:
        epoch, k = divmod(int(step), self.per_epoch)
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm, self._perm_epoch = torch.randperm(len(self.dataset), generator=g), epoch
        idx = self._perm[k * self.batch_size:(k + 1) * self.batch_size]
        self.collate.generator.manual_seed(self.seed * 1_000_003 + 7919 * int(step) + 1)
        return self.collate([self.dataset[int(i)] for i in idx])


def build_tokenizer(world: ShapeWorld, vocab_size: int = 256, directory=None, num_scenes: int = 2000):
    """A WordPiece tokenizer trained on the world's text; loaded from ``directory`` if saved there."""
    from pathlib import Path

    from course_lib.features.text import load_tokenizer, save_tokenizer, train_tokenizer

    if directory is not None and (Path(directory) / "tokenizer.json").exists():
        return load_tokenizer(directory)
    tokenizer = train_tokenizer(world.corpus(num_scenes), vocab_size=vocab_size)
    if directory is not None:
        save_tokenizer(tokenizer, directory)
    return tokenizer
