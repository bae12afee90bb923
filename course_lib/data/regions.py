"""ShapeWorld as the detector-era systems saw images: detected regions, computed on the fly.

``ShapeWorldRegions(world, tokenizer, context_length)(indices)`` gives the *region batch* that
every region-feature system of the course (VisualBERT, B2T2, Unicoder-VL, VL-BERT, Unified VLP,
UNITER, ...) consumes, the same dict as ``course_lib.data.region_shards`` reads from real
bottom-up-attention features:

================  ========================  ====================================================
key               shape / dtype             meaning
================  ========================  ====================================================
input_ids         (B, L) int64              ``[CLS] caption [SEP]``, padded to ``context_length``
attention_mask    (B, L) int64              1 for a real token
region_feats      (B, R, F) float32         one feature per detected box, zeros at padding
region_boxes      (B, R, 4) float32         x1, y1, x2, y2 in [0, 1]
region_mask       (B, R) bool               True for a real region (at least one per row)
region_labels     (B, R) int64              the detector's top class in [0, C), -1 at padding
region_probs      (B, R, C + 1) float32     the detector's distribution, last column "no object"
image_feat        (B, F) float32            the whole image pooled like a region (B2T2, VL-BERT)
images            (B, 3, H, W) uint8        the pixels (ShapeWorld only)
token_box         (B, L) int64              the region a token names (its shape word), -1 if none
index             (B,) int64                the scene numbers
tag_ids           (B, T) int64              with ``tag_tokens=T``: the detector's class names as
                                            word pieces, then ``[SEP]`` (Oscar's object tags,
                                            ``course_lib.features.tags``)
tag_mask          (B, T) int64              1 for a real tag token (and the ``[SEP]``)
================  ========================  ====================================================

A region's feature stands in for the 2048-d Faster R-CNN vector of the papers: RoIAlign of the
pixels inside the box on a ``6 x 6`` grid, ``6 * 6 * 3 = 108`` numbers (notebook 03 shows that
colour and shape are readable from it). The boxes, misses, false positives and soft class
distributions come from ShapeWorld's simulated detector (``course_lib.data.simulated_detector``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from course_lib.data.language import describe
from course_lib.data.shapeworld import BACKGROUND, SPLITS, ShapeWorld
from course_lib.data.simulated_detector import DetectorConfig
from course_lib.features.region import pad_regions
from course_lib.features.roi_align import roi_align
from course_lib.utils import check_one_of

POOL = 6  # RoIAlign grid of a region feature: 6 x 6 bins x 3 colours = 108 numbers
FEATURE_DIM = 3 * POOL * POOL
CAPTION_STREAM = 101  # the scene's random stream that picks its caption (as ShapeWorldPairs)


PIXEL_MEAN = tuple(c / 255 for c in BACKGROUND)  # features are centred on the empty background...
PIXEL_SCALE = 0.3  # ...and scaled to about unit variance (a detector's features are standardised too)


def pooled_pixels(images: torch.Tensor, boxes: list[torch.Tensor]) -> torch.Tensor:
    """RoIAlign of the pixels: images ``(B, 3, H, W)`` float in [0, 1], pixel boxes ``list[(N_i, 4)]``
    -> ``(sum N_i, 108)``, a region feature per box (image 0's boxes first), centred on the background
    colour and divided by ``PIXEL_SCALE``."""
    pooled = roi_align(images, boxes, output_size=POOL, spatial_scale=1.0, sampling_ratio=2)  # (K, 3, 6, 6)
    mean = pooled.new_tensor(PIXEL_MEAN)[None, :, None, None]
    return ((pooled - mean) / PIXEL_SCALE).flatten(1)


def whole_image_features(images: torch.Tensor) -> torch.Tensor:
    """The whole image pooled as one region: ``(B, 3, H, W)`` -> ``(B, 108)`` (B2T2's and VL-BERT's image token)."""
    B, _, H, W = images.shape
    full = images.new_tensor([0.0, 0.0, W, H])
    return pooled_pixels(images, [full[None]] * B)


def blank_boxes(images: torch.Tensor, boxes: torch.Tensor, blank: torch.Tensor) -> torch.Tensor:
    """Zero the pixels inside the chosen boxes (VL-BERT's ``MASK_RAW_PIXELS``).

    images ``(B, 3, H, W)``; boxes ``(B, R, 4)`` normalised to [0, 1]; blank ``(B, R)`` bool, the
    boxes to blank. Returns a copy; a pixel is blanked when its centre lies inside a chosen box.
    """
    B, _, H, W = images.shape
    ys = (torch.arange(H, device=images.device, dtype=boxes.dtype) + 0.5) / H  # (H,) pixel centres
    xs = (torch.arange(W, device=images.device, dtype=boxes.dtype) + 0.5) / W  # (W,)
    x1, y1, x2, y2 = boxes.unbind(-1)  # each (B, R)
    inside_y = (ys[None, None] >= y1[..., None]) & (ys[None, None] <= y2[..., None])  # (B, R, H)
    inside_x = (xs[None, None] >= x1[..., None]) & (xs[None, None] <= x2[..., None])  # (B, R, W)
    covered = (inside_y[..., :, None] & inside_x[..., None, :] & blank[..., None, None]).any(1)  # (B, H, W)
    return images.masked_fill(covered[:, None], 0.0)


def shape_word_spans(scene, caption: str) -> list[tuple[int, int, int]]:
    """``(object index, start, end)``: the characters of the shape word of every object ``caption``
    names unambiguously, for ShapeWorld's list and relation captions (and the full description).

    A list caption names the objects left to right; a relation caption ``"A is REL B"`` names the
    two objects of a true relation whose phrases match. Counting captions name no single object: [].
    """
    objs = scene.objects
    for with_size in (True, False):  # the list template, or the canonical description
        phrases = [describe(o, with_size) for o in objs]
        listed = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
        if caption in (listed, f"there is {listed}"):
            offset = caption.index(listed)
            return _spans_in_order(caption, phrases, range(len(objs)), offset)
    match = re.fullmatch(r"(.+) is (left of|right of|above|below|bigger than|smaller than) (.+)", caption)
    if match:
        pairs = [(i, j) for i, rel, j in scene.relations if rel == match[2]
                 and describe(objs[i], False) == match[1] and describe(objs[j], False) == match[3]]
        if len(pairs) == 1:
            i, j = pairs[0]
            return _spans_in_order(caption, [match[1], match[3]], (i, j), 0)
    return []


def _spans_in_order(caption: str, phrases, objects, offset: int) -> list[tuple[int, int, int]]:
    spans, cursor = [], offset
    for phrase, obj in zip(phrases, objects):
        start = caption.index(phrase, cursor)
        shape = phrase.rsplit(" ", 1)[1]
        spans.append((obj, start + len(phrase) - len(shape), start + len(phrase)))
        cursor = start + len(phrase)
    return spans


def drop_missing_refs(token_box: torch.Tensor, region_mask: torch.Tensor) -> torch.Tensor:
    """``token_box (B, L)`` with every reference to a region the image lacks (``region_mask (B, R)``
    False there) set to -1: a caption paired with another image keeps the references that image can
    serve (B2T2's ITM negatives, retrieval over all pairs)."""
    valid = region_mask.bool().gather(1, token_box.clamp(min=0)) & (token_box >= 0)
    return token_box.masked_fill(~valid, -1)


class ShapeWorldRegions:
    """``indices -> region batch`` (see the module docstring) for scenes of ``world``'s ``split``.

    caption: ``"random"`` (one of the scene's captions, drawn from its own random stream, so every
    process and worker sees the same) or ``"description"`` (the canonical caption, every object left
    to right). max_regions: boxes kept per image (the detector's first ones). A scene where the
    detector found nothing gets the whole image as its one region (label -1, "no object").
    tag_tokens: when > 0, every batch also holds Oscar's object tags, ``tag_ids``/``tag_mask``
    ``(B, tag_tokens)``: the world's class names of the detector's labels (its errors included).
    """

    def __init__(self, world: ShapeWorld, tokenizer, context_length: int, max_regions: int = 6,
                 detector: DetectorConfig | None = None, split: str = "train", caption: str = "random",
                 tag_tokens: int = 0):
        if not isinstance(world, ShapeWorld):
            raise ValueError(f"world must be a ShapeWorld, got {type(world).__name__}")
        check_one_of("split", split, SPLITS)
        check_one_of("caption", caption, ("random", "description"))
        for name, value, low in (("context_length", context_length, 2), ("max_regions", max_regions, 1)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        self.world, self.tokenizer, self.context_length = world, tokenizer, context_length
        self.max_regions, self.detector = max_regions, detector or DetectorConfig()
        self.split, self.caption = split, caption
        self.num_classes = world.num_classes
        if isinstance(tag_tokens, bool) or not isinstance(tag_tokens, int) or tag_tokens < 0 or tag_tokens == 1:
            raise ValueError(f"tag_tokens must be 0 (no tags) or an int >= 2 (a tag and [SEP]), got {tag_tokens!r}")
        self.tags = None
        if tag_tokens:
            from course_lib.features.tags import ObjectTags

            names = [world.config.class_name(c) for c in range(self.num_classes)]
            self.tags = ObjectTags(tokenizer, names, tag_tokens)

    def captions(self, scenes) -> list[str]:
        if self.caption == "description":
            return [s.description for s in scenes]
        return [s.captions[int(s.rng(CAPTION_STREAM).integers(len(s.captions)))] for s in scenes]

    def regions(self, scenes) -> dict:
        """The image side of the batch (every key but the text ones), and the detections' source objects."""
        size = self.world.config.image_size
        pixels = torch.from_numpy(self.world.render_batch(scenes)).permute(0, 3, 1, 2).contiguous()  # uint8
        images = pixels.float() / 255.0
        boxes, probs, source = [], [], []
        for scene in scenes:
            det = self.world.detect(scene, self.detector)
            keep = slice(0, self.max_regions)
            if len(det) == 0:  # nothing detected: the whole image is the one region
                boxes.append(np.array([[0.0, 0.0, 1.0, 1.0]], dtype=np.float32))
                probs.append(F.one_hot(torch.tensor([self.num_classes]), self.num_classes + 1).float().numpy())
                source.append(np.array([-1]))
            else:
                boxes.append(det.boxes[keep])
                probs.append(det.class_probs[keep])
                source.append(det.matched_object[keep])
        counts = [len(b) for b in boxes]
        flat_boxes = torch.from_numpy(np.concatenate(boxes))  # (K, 4) normalised
        pixel_boxes = list(torch.split(flat_boxes * size, counts))
        feats = pooled_pixels(images, pixel_boxes)  # (K, 108)
        flat_probs = torch.from_numpy(np.concatenate(probs))  # (K, C + 1)
        labels = flat_probs[:, :-1].argmax(1).float()
        labels[flat_probs.argmax(1) == self.num_classes] = -1  # a "no object" placeholder has no label
        src = torch.from_numpy(np.concatenate(source)).float()
        feats, mask, flat_boxes, flat_probs, labels, src = pad_regions(
            counts, feats, flat_boxes, flat_probs, labels[:, None], src[:, None])
        feats, flat_boxes = _pad_to(feats, self.max_regions), _pad_to(flat_boxes, self.max_regions)
        flat_probs, mask = _pad_to(flat_probs, self.max_regions), _pad_to(mask, self.max_regions)
        labels = _pad_to(labels[..., 0], self.max_regions, -1).long()
        src = _pad_to(src[..., 0], self.max_regions, -1).long()
        flat_probs[~mask] = F.one_hot(torch.tensor(self.num_classes), self.num_classes + 1).float()
        labels[~mask] = -1
        src[~mask] = -1  # padding shows no object (pad_regions pads with 0, which is object 0)
        out = {"region_feats": feats, "region_boxes": flat_boxes, "region_mask": mask, "region_labels": labels,
               "region_probs": flat_probs, "image_feat": whole_image_features(images), "images": pixels,
               "region_source": src}
        if self.tags is not None:
            out.update(self.tags(labels, mask))
        return out

    def text(self, texts: Sequence[str], scenes=None, source: torch.Tensor | None = None) -> dict:
        """Token ids and mask ``(B, L)``; with ``scenes`` and ``source`` also ``token_box (B, L)``."""
        enc = self.tokenizer(list(texts), padding="max_length", truncation=True, max_length=self.context_length,
                             return_tensors="pt", return_offsets_mapping=scenes is not None)
        out = {"input_ids": enc["input_ids"].long(), "attention_mask": enc["attention_mask"].long()}
        if scenes is not None:
            out["token_box"] = _token_boxes(scenes, texts, enc["offset_mapping"], source)
        return out

    def questions(self, indices: Sequence[int]) -> dict:
        """One row per (scene, question) of the scenes ``indices``: the region keys of its scene, the
        question as ``input_ids``/``attention_mask``, ``answers (N,)`` (classes of
        ``language.answer_vocabulary``), ``question_types (N,)`` (``language.QUESTION_TYPES``)."""
        from course_lib.data.language import QUESTION_TYPES, answer_vocabulary

        scenes = self.world.scenes(indices, self.split)
        regions = self.regions(scenes)
        regions.pop("region_source")
        rows = [(i, q, a, t) for i, s in enumerate(scenes) for q, a, t in s.questions]
        scene_rows = torch.tensor([i for i, _, _, _ in rows])
        batch = {k: v[scene_rows] for k, v in regions.items()}
        batch.update(self.text([q for _, q, _, _ in rows]))
        answers = answer_vocabulary(self.world.config)
        batch["answers"] = torch.tensor([answers.index(a) for _, _, a, _ in rows])
        batch["question_types"] = torch.tensor([QUESTION_TYPES.index(t) for _, _, _, t in rows])
        batch["index"] = torch.as_tensor(list(indices), dtype=torch.long)[scene_rows]
        return batch

    def phrases(self, indices: Sequence[int], min_objects: int = 1) -> dict:
        """Referring expressions for grounding: one row per object of the scenes ``indices`` that hold at
        least ``min_objects`` objects. Each row has the region keys of its scene (the *detected* boxes), the
        object's phrase (``scene.region_phrases``: "the triangle", "the red circle", true of that object
        only) as ``input_ids``/``attention_mask``, ``gt_box (N, 4)`` its true box (normalised x1, y1, x2,
        y2), ``index (N,)`` the scene and ``object (N,)`` the object. Score with
        ``course_lib.evaluate.GroundingFineTuner`` (acc@0.5 of the chosen detected box)."""
        if not isinstance(min_objects, int) or isinstance(min_objects, bool) or min_objects < 1:
            raise ValueError(f"min_objects must be an int >= 1, got {min_objects!r}")
        indices = [i for i, s in zip(indices, self.world.scenes(indices, self.split)) if len(s.objects) >= min_objects]
        if not indices:
            raise ValueError(f"no scene of the given indices has {min_objects} objects or more")
        scenes = self.world.scenes(indices, self.split)
        regions = self.regions(scenes)
        regions.pop("region_source")
        rows = [(i, o, phrase) for i, s in enumerate(scenes) for o, phrase in enumerate(s.region_phrases)]
        scene_rows = torch.tensor([i for i, _, _ in rows])
        batch = {k: v[scene_rows] for k, v in regions.items()}
        batch.update(self.text([phrase for _, _, phrase in rows]))
        batch["gt_box"] = torch.from_numpy(np.stack([scenes[i].normalized_boxes[o] for i, o, _ in rows]))
        batch["index"] = torch.as_tensor(indices, dtype=torch.long)[scene_rows]
        batch["object"] = torch.tensor([o for _, o, _ in rows])
        return batch

    def __call__(self, indices: Sequence[int]) -> dict:
        scenes = self.world.scenes(indices, self.split)
        batch = self.regions(scenes)
        source = batch.pop("region_source")
        batch.update(self.text(self.captions(scenes), scenes, source))
        batch["index"] = torch.as_tensor(list(indices), dtype=torch.long)
        return batch


def _pad_to(x: torch.Tensor, length: int, value: float = 0.0) -> torch.Tensor:
    """Pad dim 1 of ``x`` to ``length`` with ``value`` (or cut it there)."""
    if x.shape[1] >= length:
        return x[:, :length]
    pad = x.new_full((x.shape[0], length - x.shape[1], *x.shape[2:]), value)
    return torch.cat([x, pad], dim=1)


def _token_boxes(scenes, texts, offsets: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """``(B, L)``: for each token inside an object's shape word, the region detected from that
    object (the first one; -1 if the detector missed it); -1 elsewhere."""
    token_box = torch.full(offsets.shape[:2], -1, dtype=torch.long)
    for b, (scene, text) in enumerate(zip(scenes, texts)):
        for obj, start, end in shape_word_spans(scene, text):
            regions = (source[b] == obj).nonzero().flatten()
            if len(regions) == 0:
                continue
            inside = (offsets[b, :, 0] >= start) & (offsets[b, :, 1] <= end) & (offsets[b, :, 1] > offsets[b, :, 0])
            token_box[b, inside] = int(regions[0])
    return token_box
