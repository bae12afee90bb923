"""VL-BERT (Su et al., ICLR 2020, "VL-BERT: Pre-training of Generic Visual-Linguistic Representations").

The figure of the paper, in code: every input element is a *linguistic* embedding plus a *visual*
one, summed with a segment and a position embedding, then one BERT (``SingleStreamFusion``):

=============  ==========================  =========================================  =========  ==========
element        linguistic part             visual part                                segment    position
=============  ==========================  =========================================  =========  ==========
caption word   its word embedding          the **whole image**, pooled as one RoI     A (text)   0, 1, 2...
RoI            a learned ``[IMG]`` token   its detector feature + box                 C (image)  the **same**
                                                                                                 for every RoI
=============  ==========================  =========================================  =========  ==========

The visual parts pass a LayerNorm whose gain starts at 0 (``visual_ln_*``), so the model starts as
BERT and learns the image in. Objectives: MLM with visual clues + **masked RoI classification**
against the detector's *soft* class distribution; **no ITM** (``itm_weight=0``: the paper found
that sentence-image relationship prediction hurt downstream tasks; notebook 10 tests that).

**No peeking.** A masked RoI is hidden from the RoI token *and* from the whole-image token that
every word carries: with ``whole_image="pixels"`` the masked boxes' pixels are set to 0 before the
whole image is pooled (VL-BERT's ``MASK_RAW_PIXELS``); with ``"mean"`` (precomputed features, no
pixels) the whole image is the mean of the unmasked regions (VL-BERT's precomputed mode).
``blank_masked=False`` turns the fix off, to show the leak. ``"auto"`` uses pixels when the batch
has them.

Deviations (to fit a CPU; notebook 10 says so): the box enters as its 4 raw coordinates concatenated
to the feature (the paper: a 2048-d sinusoidal embedding of them); segments A and C only (one
sentence); no ``[END]`` token; no text-only corpus.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from course_lib.data.regions import blank_boxes, whole_image_features
from course_lib.fusion.single_stream import SingleStreamFusion
from course_lib.models.region_bert import RegionBert, RegionBertConfig
from course_lib.utils import check_one_of


@dataclass(frozen=True)
class VLBertConfig(RegionBertConfig):
    itm_weight: float = 0.0  # the paper's choice; 1.0 gives its "with sentence-image relation" ablation
    mrc_weight: float = 1.0
    mrc_target: str = "soft"
    whole_image: str = "auto"  # "pixels", "mean" or "auto" (pixels when the batch has them)
    blank_masked: bool = True  # hide masked RoIs from the whole-image token (False shows the leak)
    visual_gain_init: float = 0.0  # VL-BERT's visual_scale_*_init

    def __post_init__(self):
        super().__post_init__()
        check_one_of("whole_image", self.whole_image, ("auto", "pixels", "mean"))


class VLBert(RegionBert):
    """``forward(region batch)`` -> ``{"loss", "mlm", "mrc"}`` (``"itm"`` too when ``itm_weight > 0``)."""

    config_class = VLBertConfig

    def __init__(self, config: VLBertConfig):
        super().__init__(config)
        c = config
        self.visual_proj = nn.Sequential(nn.Linear(c.region_feat_dim + 4, c.dim), nn.ReLU())
        self.visual_ln_text = nn.LayerNorm(c.dim, eps=c.layer_norm_eps)
        self.visual_ln_object = nn.LayerNorm(c.dim, eps=c.layer_norm_eps)
        self.object_word = nn.Parameter(torch.zeros(2, c.dim))  # [IMG], and [IMG] of a masked RoI
        self.position_embeddings = nn.Embedding(c.context_length + 1, c.dim)
        self.init()
        with torch.no_grad():
            self.object_word.normal_(0.0, c.init_std)
            self.visual_ln_text.weight.fill_(c.visual_gain_init)
            self.visual_ln_object.weight.fill_(c.visual_gain_init)

    def build_fusion(self) -> nn.Module:
        c = self.config
        return SingleStreamFusion(dim=c.dim, num_heads=c.heads, num_layers=c.layers, mlp_ratio=c.mlp_ratio,
                                  dropout=c.dropout, layer_norm_eps=c.layer_norm_eps, text_positions=False)

    def whole_image(self, batch: dict, hidden: torch.Tensor | None) -> torch.Tensor:
        """The whole-image feature ``(B, F)`` every word carries, with the hidden RoIs blanked out."""
        c = self.config
        mode = c.whole_image if c.whole_image != "auto" else ("pixels" if "images" in batch else "mean")
        blank = hidden is not None and c.blank_masked
        if mode == "pixels":
            if "images" not in batch:
                raise ValueError("whole_image='pixels' needs batch['images']; region shards have none: use "
                                 "whole_image='mean' (--model.whole_image=mean)")
            images = batch["images"].float() / (255.0 if batch["images"].dtype == torch.uint8 else 1.0)
            if blank:
                images = blank_boxes(images, batch["region_boxes"], hidden)
            elif "image_feat" in batch:
                return batch["image_feat"]
            return whole_image_features(images)
        keep = batch["region_mask"].bool() & (~hidden if blank else True)
        keep = keep.float()[..., None]  # (B, R, 1)
        return (batch["region_feats"] * keep).sum(1) / keep.sum(1).clamp(min=1.0)

    def visual(self, feats: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        return self.visual_proj(torch.cat([feats, boxes], dim=-1))

    def embed(self, batch, input_ids, hidden_regions):
        B, L = input_ids.shape
        R = batch["region_feats"].shape[1]
        whole = self.whole_image(batch, hidden_regions)  # (B, F)
        full_box = whole.new_tensor([0.0, 0.0, 1.0, 1.0]).expand(B, 4)
        text_visual = self.visual_ln_text(self.visual(whole, full_box))  # (B, D)
        positions = self.position_embeddings.weight
        text = self.word_embeddings(input_ids) + text_visual[:, None] + positions[:L]  # (B, L, D)
        feats = batch["region_feats"]
        hidden = torch.zeros(B, R, dtype=torch.bool, device=feats.device) if hidden_regions is None else hidden_regions
        feats = feats.masked_fill(hidden[..., None], 0.0)
        object_visual = self.visual_ln_object(self.visual(feats, batch["region_boxes"]))  # (B, R, D)
        object_word = self.object_word[hidden.long()]  # (B, R, D): [IMG], or its masked version
        same_position = positions[batch["attention_mask"].sum(1).long()]  # (B, D): every RoI at text length
        image = object_word + object_visual + same_position[:, None]
        return text, image, batch["region_mask"]
