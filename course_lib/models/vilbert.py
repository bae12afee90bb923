"""ViLBERT (Lu et al., NeurIPS 2019, "ViLBERT: Pretraining Task-Agnostic Visiolinguistic
Representations for Vision-and-Language Tasks") and the pretraining changes of 12-in-1 (Lu et al.,
CVPR 2020, "12-in-1: Multi-Task Vision and Language Representation Learning").

The figure of the paper, in code (recipes: ``facebookresearch/vilbert-multi-task`` ``vilbert/vilbert.py``,
``config/bert_base_6layer_6conect.json``, ``vilbert/datasets/concept_cap_dataset.py``;
``reference/RECIPES.md`` 2.10, ``RECIPES-2.md`` section 5):

- **two streams**: the words through BERT's embeddings (word + position + type, LayerNorm), the
  regions through ``LN(W_f f + W_g g)`` with the **5-d geometry** ``g = (x1, y1, x2, y2, area)``
  (``RegionEmbedding(F, Dv, "5d")``), led by a **global image token**: the mean of the visible
  region features at the box ``(0, 0, 1, 1)``;
- **fusion**: ``DualStreamFusion``, the paper's asymmetric depths: ``text_only_layers`` text layers,
  then ``layers`` x [co-attention block, one image layer, one text layer]; the image stream has its
  own width, heads and feed-forward (ViLBERT-base: text 12 x 768, image 6 x 1024 with 8 heads and a
  1024-d feed-forward, co-attention in 1024 dimensions, 8 heads);
- **objectives**, summed on every batch:

  =========  ===============================================================================
  ``mlm``    15% of the words (BERT's 80/10/10), cross-entropy, head tied to the embeddings
  ``mrckl``  15% of the regions hidden, 90% of those zeroed (the rest kept as they are); KL from
             the detector's class distribution to the prediction of the image stream's output
  ``itm``    half the pairs get another image of the batch; 2-way head on the pooled product
             ``ReLU(W_t t_CLS) * ReLU(W_v v_IMG)``
  =========  ===============================================================================

- **12-in-1's changes** (the defaults here; ``overlap_iou=0.0, masked_on_negatives=True`` is the
  2019 recipe): regions overlapping a hidden region by IoU > ``overlap_iou`` (0.4) are zeroed too, so
  that a duplicate detection of the hidden object does not give its class away, and MLM and MRC-kl
  are scored on matched pairs only (a word of a caption that belongs to another image is not
  predictable from this one).

``forward(batch)`` returns ``{"loss", "mlm", "mrckl", "itm"}`` (those switched on, weights
``<name>_weight``; ``mrc_weight > 0`` adds MRC with the detector's top class, for region shards,
which keep no distribution). Extension points (ERNIE-ViL builds on them): ``mask_text(batch, rows)``,
``mask_image(batch, rows)``, ``embed``, ``encode`` and ``objective_losses``.

Deviations: ITM negatives replace the image (the paper replaces the caption; the same pairs for a
2-way head, and the region batch's convention); the text stream's embedding LayerNorm is BERT's
(``TextEmbeddings``), shared word table with the MLM decoder.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from course_lib.evaluate.boxes import box_iou
from course_lib.features.region import RegionEmbedding
from course_lib.features.text import TextEmbeddings
from course_lib.fusion.base import FusionOutput
from course_lib.fusion.dual_stream import DualStreamFusion
from course_lib.models.region_bert import (REGION_SIZES, RegionBert, RegionBertConfig, check_region_batch,
                                          hide_regions, itm_negatives, mask_caption)
from course_lib.objectives.itm import itm_loss
from course_lib.objectives.mlm import MLMHead, masked_lm_loss
from course_lib.objectives.mvm import region_class_loss_kl
from course_lib.presets import apply_overrides, get_preset

# Stream sizes per preset: (text_only_layers, co-attention blocks, image_dim, image_heads, bi_dim, bi_heads).
# The text stream's width and heads, the vocabulary, the region features and classes come from
# region_bert.REGION_SIZES; gpu-base is bert_base_6layer_6conect.json (6 + 6 text layers of 768,
# 6 image layers of 1024 with 8 heads, co-attention 1024 with 8 heads).
STREAM_SIZES = {
    "cpu-tiny": (1, 2, 96, 4, 96, 4),
    "cpu-small": (2, 2, 192, 4, 192, 4),
    "gpu-small": (3, 3, 512, 8, 512, 8),
    "gpu-base": (6, 6, 1024, 8, 1024, 8),
}
GLOBAL_BOX = (0.0, 0.0, 1.0, 1.0)  # the global image token's box: 5-d geometry (0, 0, 1, 1, 1)


@dataclass(frozen=True)
class ViLBERTConfig(RegionBertConfig):
    """``dim``/``heads`` are the text stream's, ``layers`` the number of co-attention blocks (= image
    layers); the text stream has ``text_only_layers + layers`` layers."""

    text_only_layers: int = 1
    image_dim: int = 96
    image_heads: int = 4
    image_mlp_ratio: float = 1.0  # v_intermediate_size / v_hidden_size = 1024 / 1024
    bi_dim: int = 96  # bi_hidden_size: the co-attention's width, and the pooled output's
    bi_heads: int = 4
    mrckl_weight: float = 1.0  # ViLBERT's visual_target=0: KL to the detector's distribution
    region_zero_prob: float = 0.9  # share of the hidden regions whose features are zeroed (the rest kept)
    overlap_iou: float = 0.4  # 12-in-1: regions overlapping a hidden one by IoU > this are zeroed too (0: off)
    masked_on_negatives: bool = False  # True: ViLBERT 2019 also scores MLM/MRC-kl on mismatched pairs
    global_image_token: bool = True  # the mean region feature, first in the image stream (pooled from it)
    OBJECTIVES: ClassVar[tuple[str, ...]] = ("mlm", "itm", "mrc", "mrckl")

    def __post_init__(self):
        super().__post_init__()
        for name in ("text_only_layers", "image_dim", "image_heads", "bi_dim", "bi_heads"):
            value, low = getattr(self, name), 0 if name == "text_only_layers" else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        for width, heads in (("dim", "heads"), ("image_dim", "image_heads"), ("bi_dim", "bi_heads")):
            if getattr(self, width) % getattr(self, heads):
                raise ValueError(f"{width}={getattr(self, width)} must be a multiple of {heads}={getattr(self, heads)}")
        if not 0.0 <= self.region_zero_prob <= 1.0:
            raise ValueError(f"region_zero_prob must be in [0, 1], got {self.region_zero_prob!r}")
        if not 0.0 <= self.overlap_iou < 1.0:
            raise ValueError(f"overlap_iou must be in [0, 1) (0: no overlap masking), got {self.overlap_iou!r}")
        if not self.image_mlp_ratio > 0:
            raise ValueError(f"image_mlp_ratio must be > 0, got {self.image_mlp_ratio!r}")
        for name in ("masked_on_negatives", "global_image_token"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")

    @classmethod
    def from_preset(cls, name: str, **overrides):
        get_preset(name)  # an unknown name lists the valid ones
        dim, _, heads, context, feat, classes, std, vocab = REGION_SIZES[name]
        text_only, blocks, image_dim, image_heads, bi_dim, bi_heads = STREAM_SIZES[name]
        base = cls(dim=dim, layers=blocks, heads=heads, context_length=context, region_feat_dim=feat,
                   num_region_classes=classes, init_std=std, vocab_size=vocab, text_only_layers=text_only,
                   image_dim=image_dim, image_heads=image_heads, bi_dim=bi_dim, bi_heads=bi_heads)
        return apply_overrides(base, overrides)


def overlapping_regions(boxes: torch.Tensor, region_mask: torch.Tensor, hidden: torch.Tensor,
                        threshold: float) -> torch.Tensor:
    """12-in-1's overlap rule: the real regions ``(B, R)`` bool whose box overlaps a ``hidden`` region's
    box by IoU > ``threshold`` (the hidden regions themselves included). boxes ``(B, R, 4)`` x1, y1, x2, y2."""
    iou = torch.stack([box_iou(b, b) for b in boxes.float()])  # (B, R, R)
    near = ((iou > threshold) & hidden[:, None, :].bool()).any(-1)  # (B, R): overlaps some hidden region
    return (near | hidden.bool()) & region_mask.bool()


class ViLBERT(RegionBert):
    """``forward(region batch)`` -> ``{"loss", "mlm", "mrckl", "itm"}``; see the module docstring.

    ``encode(batch, input_ids=None, hidden_regions=None)`` -> ``FusionOutput``: ``text (B, L, D)``,
    ``image (B, R, Dv)`` (one output per region of the batch, the global token left out),
    ``pooled (B, Db)``, ``extras["image_global"] (B, Dv)``; the attention maps' image axis has the
    global token first (``R + 1`` columns) when ``global_image_token``.
    """

    config_class = ViLBERTConfig

    def __init__(self, config: ViLBERTConfig):
        super().__init__(config)
        c = config
        self.text_embeddings = TextEmbeddings(c.vocab_size, c.dim, max_positions=c.context_length, dropout=c.dropout,
                                              layer_norm_eps=c.layer_norm_eps)
        self.word_embeddings = self.text_embeddings.word_embeddings  # one table for the input and the MLM decoder
        self.mlm_head = MLMHead(c.dim, c.vocab_size, tie_to=self.word_embeddings, layer_norm_eps=c.layer_norm_eps)
        self.region_embedding = RegionEmbedding(c.region_feat_dim, c.image_dim, "5d")
        self.itm_head = nn.Linear(c.bi_dim, 2)  # ViLBERT's seq_relationship on the pooled product
        self.mrc_head = (MLMHead(c.image_dim, c.num_region_classes, layer_norm_eps=c.layer_norm_eps)
                         if c.mrc_weight > 0 or c.mrckl_weight > 0 else None)  # BertImagePredictionHead
        self.pooled_dim, self.region_dim = c.bi_dim, c.image_dim  # what the shared evaluation's heads read
        self.init()

    def build_fusion(self) -> nn.Module:
        c = self.config
        return DualStreamFusion(dim=c.dim, num_heads=c.heads, num_layers=c.layers, mlp_ratio=c.mlp_ratio,
                                dropout=c.dropout, layer_norm_eps=c.layer_norm_eps,
                                text_only_layers=c.text_only_layers, image_dim=c.image_dim,
                                image_heads=c.image_heads, image_mlp_ratio=c.image_mlp_ratio, bi_dim=c.bi_dim,
                                bi_heads=c.bi_heads)

    # ------------------------------------------------------------------ inputs
    def embed(self, batch: dict, input_ids: torch.Tensor, hidden_regions: torch.Tensor | None):
        """``(text (B, L, D), image (B, 1 + R, Dv), image_mask (B, 1 + R))``; ``hidden_regions (B, R)``
        bool: the regions whose features are zeroed (they keep their box). Without
        ``global_image_token`` the image has ``R`` tokens."""
        feats, boxes, mask = batch["region_feats"], batch["region_boxes"], batch["region_mask"].bool()
        if hidden_regions is not None:
            feats = feats.masked_fill(hidden_regions[..., None].bool(), 0.0)
        if self.config.global_image_token:  # the mean of the visible regions' features, box (0, 0, 1, 1)
            visible = mask if hidden_regions is None else mask & ~hidden_regions.bool()
            mean = (feats * visible[..., None]).sum(1) / visible.sum(1, keepdim=True).clamp(min=1)  # (B, F)
            feats = torch.cat([mean[:, None], feats], 1)
            boxes = torch.cat([boxes.new_tensor(GLOBAL_BOX).expand(len(boxes), 1, 4), boxes], 1)
            mask = torch.cat([mask.new_ones(len(mask), 1), mask], 1)
        return self.text_embeddings(input_ids), self.region_embedding(feats, boxes), mask

    def encode(self, batch: dict, input_ids: torch.Tensor | None = None, hidden_regions: torch.Tensor | None = None,
               return_attention: bool = False) -> FusionOutput:
        """Both streams (see the class docstring). ``input_ids (B, L)`` replaces the batch's (the masked
        caption); ``hidden_regions (B, R)`` bool are the regions whose features are zeroed."""
        check_region_batch(batch, self.config)
        if hidden_regions is not None:
            if hidden_regions.shape != batch["region_mask"].shape:
                raise ValueError(f"hidden_regions must have the shape of region_mask {tuple(batch['region_mask'].shape)},"
                                 f" got {tuple(hidden_regions.shape)}")
        ids = batch["input_ids"] if input_ids is None else input_ids
        text, image, image_mask = self.embed(batch, ids, hidden_regions)
        out = self.fusion(text, batch["attention_mask"], image, image_mask, return_attention=return_attention)
        if self.config.global_image_token:
            out.extras["image_global"] = out.image[:, 0]
            out.image = out.image[:, 1:]
        return out

    # ------------------------------------------------------------------ masking (override points)
    def mask_text(self, batch: dict, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(masked input_ids (B, L), labels (B, L))``: BERT's masking of every caption, scored on
        ``rows (B,)`` bool (-100 elsewhere). ERNIE-ViL overrides it to mask scene-graph words."""
        c = self.config
        return mask_caption(batch["input_ids"], batch["attention_mask"], rows, c.vocab_size, c.mask_prob)

    def mask_image(self, batch: dict, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(targets (B, R), zeroed (B, R))`` bool: the regions predicted (each real region of every row
        drawn with probability ``region_mask_prob``, kept on ``rows (B,)``) and the regions whose features are zeroed
        (``region_zero_prob`` of the targets, plus every region overlapping a target by IoU >
        ``overlap_iou``)."""
        c = self.config
        drawn = hide_regions(batch["region_mask"], rows, c.region_mask_prob)  # every row alike (see mask_caption)
        zeroed = drawn & (torch.rand(drawn.shape, device=drawn.device) < c.region_zero_prob)
        if c.overlap_iou > 0:
            zeroed = zeroed | (overlapping_regions(batch["region_boxes"], batch["region_mask"], drawn, c.overlap_iou)
                               & ~drawn)
        return drawn & rows[:, None], zeroed

    # ------------------------------------------------------------------ objectives
    def objective_losses(self, out: FusionOutput, batch: dict, labels: torch.Tensor | None,
                         targets: torch.Tensor | None, matched: torch.Tensor) -> dict[str, torch.Tensor]:
        """The unweighted losses from one forward pass: MLM on ``labels`` (-100: not scored), MRC-kl
        (and MRC) on ``targets (B, R)``, ITM on every pair (``matched (B,)``). An objective whose input is
        None (no ``labels``, no ``targets``) is left out."""
        c = self.config
        losses = {}
        if c.mlm_weight > 0 and labels is not None:
            losses["mlm"] = masked_lm_loss(self.mlm_head(out.text), labels)
        if c.mrckl_weight > 0 and targets is not None:
            if "region_probs" not in batch:
                raise ValueError("MRC-kl needs region_probs (B, R, C + 1) in the batch: the detector's class "
                                 "distribution per region. Region shards keep only each region's top class: train "
                                 "MRC instead (--model.mrckl_weight=0.0 --model.mrc_weight=1.0)")
            losses["mrckl"] = region_class_loss_kl(self.mrc_head(out.image), batch["region_probs"], targets)
        if c.mrc_weight > 0 and targets is not None:
            losses["mrc"] = self.region_class_loss(out.image, batch, targets)
        if c.itm_weight > 0:
            losses["itm"] = itm_loss(self.itm_from_output(out), matched.long())
        return losses

    def forward(self, batch: dict) -> dict:
        c = self.config
        check_region_batch(batch, c)
        batch, matched = itm_negatives(batch, c.itm_weight, c.itm_prob)
        rows = torch.ones_like(matched) if c.masked_on_negatives else matched
        ids, labels = batch["input_ids"], None
        if c.mlm_weight > 0:
            ids, labels = self.mask_text(batch, rows)
        targets = zeroed = None
        if c.mrckl_weight > 0 or c.mrc_weight > 0:
            targets, zeroed = self.mask_image(batch, rows)
        out = self.encode(batch, ids, zeroed)
        losses = self.objective_losses(out, batch, labels, targets, matched)
        total = sum(getattr(c, f"{name}_weight") * loss for name, loss in losses.items())
        return {"loss": total, **losses}

    # ------------------------------------------------------------------ inspection
    @torch.no_grad()
    def region_class_accuracy(self, batch: dict, targets: torch.Tensor, zeroed: torch.Tensor) -> float:
        """Share of the ``targets (B, R)`` whose predicted class (argmax over the detector's classes) is
        the detector's top class, with the ``zeroed (B, R)`` regions' features hidden (nothing else
        masked): how much of a hidden object the model recovers."""
        if "region_labels" not in batch:
            raise ValueError("region_class_accuracy needs region_labels (B, R) in the batch")
        scored = targets.bool() & (batch["region_labels"] >= 0)
        if not scored.any():
            raise ValueError("targets selects no labelled region")
        logits = self.mrc_head(self.encode(batch, hidden_regions=zeroed.bool()).image)[..., :-1]  # (B, R, C)
        return (logits.argmax(-1)[scored] == batch["region_labels"][scored]).float().mean().item()
