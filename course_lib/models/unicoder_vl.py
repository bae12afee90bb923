"""Unicoder-VL (Li et al., AAAI 2020, "Unicoder-VL: A Universal Encoder for Vision and Language by
Cross-modal Pre-training").

The figure of the paper, in code:
- features: detected regions, each its detector vector and its 5-d box (x1, y1, x2, y2, area)
  projected, summed and LayerNorm-ed (``RegionEmbedding(..., "5d")``, as ViLBERT);
- fusion: one BERT over ``[text; regions]`` (``SingleStreamFusion``);
- objectives: MLM + **masked object classification** (MOC: 15% of the regions have their features
  set to zero *after* the detector, and their detected label is predicted with cross-entropy)
  + visual-linguistic matching (VLM, i.e. ITM with random negatives).

No official code was released; the recipe is the paper's (``reference/RECIPES-2.md`` section 2).
"""

from __future__ import annotations

from dataclasses import dataclass

from course_lib.features.region import RegionEmbedding
from course_lib.models.region_bert import RegionBert, RegionBertConfig


@dataclass(frozen=True)
class UnicoderVLConfig(RegionBertConfig):
    mrc_weight: float = 1.0  # MOC
    mrc_target: str = "hard"


class UnicoderVL(RegionBert):
    """``forward(region batch)`` -> ``{"loss", "mlm", "itm", "mrc"}`` ("mrc" is the paper's MOC)."""

    config_class = UnicoderVLConfig

    def __init__(self, config: UnicoderVLConfig):
        super().__init__(config)
        self.region_embedding = RegionEmbedding(config.region_feat_dim, config.dim, "5d")
        self.init()

    def embed(self, batch, input_ids, hidden_regions):
        feats = batch["region_feats"]
        if hidden_regions is not None:  # MOC: the masked region's features are zeroed, its box stays
            feats = feats.masked_fill(hidden_regions[..., None], 0.0)
        image = self.region_embedding(feats, batch["region_boxes"])
        return self.word_embeddings(input_ids), image, batch["region_mask"]
