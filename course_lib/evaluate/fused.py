"""Downstream evaluation of *fused* models (one encoder over both modalities: VisualBERT, UNITER,
ALBEF's fusion...), on region batches (``course_lib.data.regions``) or any batch whose image keys
can be paired with any caption.

- **retrieval** with a fused model has no embeddings to compare: every image is scored with every
  caption by the model's ``match_scores(batch) -> (B,)`` (its ITM head), ``N x N`` forward passes,
  chunked (UNITER's ``itm_eval``);
- **VQA** fine-tunes a :class:`~course_lib.evaluate.vqa.VQAHead` on the model's pooled output
  (``model.encode(batch).pooled``), the question in place of the caption (UNITER, LXMERT);
- **grounding** (referring expression comprehension) by *region scoring*: a fresh linear head scores
  each region's fused output (``model.encode(batch).image``) with the phrase as the text, trained with a
  cross-entropy over the image's regions (UNITER's RE head; ViLBERT's and VL-BERT's likewise); the
  chosen region's box is a hit when its IoU with the true box is at least 0.5 (acc@0.5; detected
  boxes, RefCOCO's ``val^d`` setting). :func:`grounding_chance` is a random region's expected score;
- **word-region alignment** of transport plans (WRA, notebooks 07 and 12): :func:`plan_alignment`, the
  share of object words whose heaviest transport mass lands on their own region, against chance.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from course_lib.data.regions import drop_missing_refs
from course_lib.evaluate.boxes import _check_boxes, _iou, grounding_accuracy
from course_lib.evaluate.retrieval import recall_at_k
from course_lib.evaluate.vqa import VQAHead, vqa_loss, vqa_soft_accuracy, vqa_soft_targets

TEXT_KEYS = ("input_ids", "attention_mask", "token_box", "index")


def pair_batch(batch: dict, image_rows: torch.Tensor, text_rows: torch.Tensor) -> dict:
    """A batch of pairs (image ``image_rows[k]``, caption ``text_rows[k]``) from the rows of ``batch``.

    A caption's box references (``token_box``, B2T2) keep their region index when the image has
    that region, as for the ITM negatives of pretraining (``region_bert.swap_images``).
    """
    pairs = {k: (v[text_rows] if k in TEXT_KEYS else v[image_rows]) for k, v in batch.items()
             if torch.is_tensor(v)}
    if "token_box" in pairs:
        pairs["token_box"] = drop_missing_refs(pairs["token_box"], pairs["region_mask"])
    return pairs


@torch.no_grad()
def match_matrix(model: nn.Module, batch: dict, chunk: int = 512) -> torch.Tensor:
    """``(N_images, N_texts)`` scores ``model.match_scores`` of every image of ``batch`` with every caption."""
    if not hasattr(model, "match_scores"):
        raise ValueError(f"model {type(model).__name__} has no match_scores(batch); retrieval by a fused model "
                         "needs an ITM head")
    n = batch["input_ids"].shape[0]
    images, texts = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    images, texts = images.flatten(), texts.flatten()
    was_training = model.training
    model.eval()
    scores = torch.cat([model.match_scores(pair_batch(batch, images[i:i + chunk], texts[i:i + chunk]))
                        for i in range(0, n * n, chunk)])
    model.train(was_training)
    return scores.view(n, n)


def fused_retrieval(model: nn.Module, batch: dict, ks=(1, 5)) -> dict[str, float]:
    """Recall@K of image <-> caption retrieval over the ``N`` pairs of ``batch`` (row i's caption is
    the positive of row i's image)."""
    scores = match_matrix(model, batch)
    return recall_at_k(scores, torch.arange(scores.shape[0]), ks)


class VQAFineTuner(nn.Module):
    """A pretrained fused model + a fresh ``VQAHead`` on its pooled output.

    ``forward(batch)`` with the question as ``input_ids``/``attention_mask`` and ``answers (B,)``
    -> ``{"loss"}`` (``BCE x num_answers``); ``logits(batch) -> (B, A)``.
    """

    def __init__(self, model: nn.Module, num_answers: int, dim: int | None = None):
        super().__init__()
        if not hasattr(model, "encode"):
            raise ValueError(f"model {type(model).__name__} has no encode(batch) giving a pooled output")
        self.model = model
        self.num_answers = num_answers
        self.head = VQAHead(dim or getattr(model, "pooled_dim", model.config.dim), num_answers)

    def logits(self, batch: dict) -> torch.Tensor:
        return self.head(self.model.encode(batch).pooled)

    def forward(self, batch: dict) -> dict:
        if "answers" not in batch:
            raise ValueError("batch has no 'answers' (B,): the answer class of each question")
        targets = vqa_soft_targets(batch["answers"], self.num_answers).to(batch["answers"].device)
        return {"loss": vqa_loss(self.logits(batch), targets)}

    @torch.no_grad()
    def accuracy(self, batch: dict) -> float:
        """VQA accuracy (single-answer ShapeWorld: exact-match accuracy) on ``batch``."""
        was_training = self.training
        self.eval()
        logits = self.logits(batch)
        self.train(was_training)
        return vqa_soft_accuracy(logits, vqa_soft_targets(batch["answers"], self.num_answers))


# --------------------------------------------------------------------------- grounding by region scoring


def _grounding_inputs(batch: dict, threshold: float):
    if not isinstance(batch, dict):
        raise ValueError(f"batch must be a dict (a grounding batch), got {type(batch).__name__}")
    missing = [k for k in ("region_boxes", "region_mask", "gt_box") if k not in batch]
    if missing:
        raise ValueError(f"batch is missing {missing}; a grounding batch has the region keys, the phrase as "
                         "input_ids/attention_mask and gt_box (N, 4) (ShapeWorldRegions.phrases)")
    boxes, mask, gt = batch["region_boxes"], batch["region_mask"].bool(), batch["gt_box"]
    if boxes.dim() != 3 or boxes.shape[-1] != 4 or tuple(mask.shape) != tuple(boxes.shape[:2]):
        raise ValueError(f"region_boxes must be (N, R, 4) and region_mask (N, R), got {tuple(boxes.shape)} and "
                         f"{tuple(mask.shape)}")
    _check_boxes("gt_box", gt)
    if gt.shape[0] != boxes.shape[0]:
        raise ValueError(f"gt_box has {gt.shape[0]} rows but the batch has {boxes.shape[0]}")
    if not mask.any(1).all():
        raise ValueError(f"region_mask row {int((~mask.any(1)).nonzero()[0])} has no region to choose from")
    if not (isinstance(threshold, (int, float)) and 0.0 < threshold <= 1.0):
        raise ValueError(f"threshold must be in (0, 1], got {threshold!r}")
    return boxes, mask, gt


def region_ious(batch: dict) -> torch.Tensor:
    """``(N, R)`` IoU of every region box with the row's true box ``gt_box``; 0 at padding."""
    boxes, mask, gt = _grounding_inputs(batch, 0.5)
    return _iou(boxes, gt[:, None, :].to(boxes)) * mask


def grounding_targets(batch: dict, threshold: float = 0.5) -> torch.Tensor:
    """``(N,)`` the region to train towards: the detected box with the highest IoU with ``gt_box``, or
    -1 where no box reaches ``threshold`` (the detector missed the object: no correct answer)."""
    _grounding_inputs(batch, threshold)
    best, index = region_ious(batch).max(1)
    return torch.where(best >= threshold, index, torch.full_like(index, -1))


def grounding_chance(batch: dict, threshold: float = 0.5) -> float:
    """acc@``threshold`` of a uniformly random region: the mean share of each row's regions that hit."""
    _, mask, _ = _grounding_inputs(batch, threshold)
    hits = (region_ious(batch) >= threshold) & mask
    return (hits.sum(1).float() / mask.sum(1).float()).mean().item()


class GroundingFineTuner(nn.Module):
    """A pretrained fused model + a fresh linear scorer on each region's fused output.

    ``logits(batch) -> (N, R)`` (``-inf`` at padding); ``forward(batch)`` -> ``{"loss"}``: cross-entropy
    over the regions towards :func:`grounding_targets` (rows whose object was not detected are
    skipped); ``accuracy(batch)``: acc@0.5 of the highest-scoring region's box against ``gt_box``.
    """

    def __init__(self, model: nn.Module, dim: int | None = None):
        super().__init__()
        if not hasattr(model, "encode"):
            raise ValueError(f"model {type(model).__name__} has no encode(batch) giving fused region outputs")
        self.model = model
        self.head = nn.Linear(dim or getattr(model, "region_dim", model.config.dim), 1)

    def logits(self, batch: dict) -> torch.Tensor:
        out = self.model.encode(batch)
        if out.image is None:
            raise ValueError(f"model {type(self.model).__name__} has no region outputs to score (encode(batch).image "
                             "is None: e.g. B2T2 sums its boxes into the words); grounding by region scoring needs "
                             "one output per region")
        scores = self.head(out.image).squeeze(-1)  # (N, R)
        return scores.masked_fill(~batch["region_mask"].bool(), float("-inf"))

    def forward(self, batch: dict) -> dict:
        targets = grounding_targets(batch)
        keep = targets >= 0
        if not keep.any():
            raise ValueError("no row of the batch has a detected box with IoU >= 0.5 with its gt_box: nothing to "
                             "train towards")
        return {"loss": F.cross_entropy(self.logits(batch)[keep], targets[keep])}

    @torch.no_grad()
    def accuracy(self, batch: dict, threshold: float = 0.5) -> float:
        """acc@``threshold`` (IoU of the chosen region's box with ``gt_box`` >= threshold) on ``batch``."""
        boxes, _, gt = _grounding_inputs(batch, threshold)
        was_training = self.training
        self.eval()
        chosen = self.logits(batch).argmax(1)  # (N,)
        self.train(was_training)
        pred = boxes[torch.arange(len(chosen)), chosen]
        return grounding_accuracy(pred, gt.to(pred), threshold)


# --------------------------------------------------------------------------- word-region alignment


def plan_alignment(plans: torch.Tensor, token_box: torch.Tensor, region_mask: torch.Tensor,
                   min_regions: int = 1) -> tuple[float, float]:
    """How well transport plans align words with regions: ``(share, chance)``.

    plans ``(B, L, R)`` (e.g. ``Uniter.transport_plans``); token_box ``(B, L)`` the region each word
    names, -1 for none (``ShapeWorldRegions``: a shape word and the region detected from its object);
    region_mask ``(B, R)``. ``share``: over the words that name a region, the fraction whose heaviest
    mass (argmax over the real regions) is on that region; ``chance``: the same for a region picked
    uniformly, the mean of ``1 / #regions`` over those words. ``min_regions``: score only the words of
    images with at least that many regions (2 leaves out the images where the choice is forced).
    """
    from course_lib.utils import check_shape

    check_shape("plans", plans, (None, None, None))
    B, L, R = plans.shape
    check_shape("token_box", token_box, (B, L))
    check_shape("region_mask", region_mask, (B, R))
    if isinstance(min_regions, bool) or not isinstance(min_regions, int) or min_regions < 1:
        raise ValueError(f"min_regions must be an int >= 1, got {min_regions!r}")
    mask = region_mask.bool()
    named = (token_box >= 0) & (mask.sum(1) >= min_regions)[:, None]  # (B, L)
    if not named.any():
        raise ValueError(f"token_box names no region in an image with >= {min_regions} regions: there is no word "
                         "to score")
    if (token_box >= R).any() or not mask.gather(1, token_box.clamp(min=0))[named].all():
        raise ValueError("token_box points at a padding region or beyond R")
    heaviest = plans.float().masked_fill(~mask[:, None, :], float("-inf")).argmax(-1)  # (B, L)
    share = (heaviest == token_box)[named].float().mean().item()
    chance = (1.0 / mask.sum(1).float())[:, None].expand(B, L)[named].mean().item()
    return share, chance
