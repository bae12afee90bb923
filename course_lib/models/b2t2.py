"""B2T2 (Alberti et al., EMNLP 2019, "Fusion of Detected Objects in Text for Visual Question Answering").

B2T2's idea: do not append regions to the sequence; put each box *into the words that refer to it*.
The input is the text ``[CLS] [IMAGE] caption [SEP]``; before the transformer, BERT's embedding of
token ``t`` (word + position + segment, LayerNorm) gets a visual vector added:

    e_t  <-  e_t + tanh(W  sum_k M[t, k] f_k + b)

where ``M`` is the 0/1 **token-box matrix** (``M[t, k] = 1`` when token t names box k) and ``f_k``
the box's feature; the ``[IMAGE]`` token gets the whole image's feature. Then a plain BERT. That is
*early* fusion. The paper's baseline, *late* fusion (``fusion="late"``, its dual encoder), runs BERT
on the text alone and meets the image only at the output: ``s = pooled . tanh(W f_image + b)``,
logits ``[-s, s]``. Objectives: MLM (on matched captions only) + ITM with impostor captions.

In ShapeWorld a caption names objects by their shape word ("a red **circle**"), which carries the
box the detector found for that object (``token_box`` of the region batch); B2T2's ``[OBJ-k]`` tokens
play that role in VCR. Our vocabulary has no ``[IMAGE]`` word: ``[UNK]`` (which no ShapeWorld
caption uses) marks its place.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from course_lib.features.text import UNK_ID, TextEmbeddings
from course_lib.fusion.base import FusionOutput, Pooler
from course_lib.models.region_bert import RegionBert, RegionBertConfig, check_region_batch
from course_lib.nn import TransformerEncoder
from course_lib.utils import check_one_of

IMAGE_TOKEN_ID = UNK_ID


@dataclass(frozen=True)
class B2T2Config(RegionBertConfig):
    fusion: str = "early"  # "early": boxes summed into the referring tokens (B2T2); "late": the dual encoder

    def __post_init__(self):
        super().__post_init__()
        check_one_of("fusion", self.fusion, ("early", "late"))


class B2T2(RegionBert):
    """``forward(region batch)`` -> ``{"loss", "mlm", "itm"}``; the batch's ``token_box (B, L)`` gives the
    token-box matrix (missing: no token names a box, only ``[IMAGE]`` sees the image)."""

    config_class = B2T2Config

    def __init__(self, config: B2T2Config):
        super().__init__(config)
        c = config
        self.visual_dense = nn.Linear(c.region_feat_dim, c.dim)
        if c.fusion == "late":
            self.image_dense = nn.Linear(c.region_feat_dim, c.dim)
        self.init()
        self.embeddings.word_embeddings = self.word_embeddings  # one table, tied to the MLM decoder

    def build_fusion(self) -> nn.Module:
        c = self.config
        self.embeddings = TextEmbeddings(c.vocab_size, c.dim, max_positions=c.context_length + 1,
                                         dropout=c.dropout, layer_norm_eps=c.layer_norm_eps)
        self.pooler = Pooler(c.dim, "tanh")
        return TransformerEncoder(c.layers, c.dim, c.heads, c.mlp_ratio, c.dropout, layer_norm_eps=c.layer_norm_eps)

    @staticmethod
    def image_feature(batch: dict) -> torch.Tensor:
        """The whole image ``(B, F)``: the batch's ``image_feat``, else the mean of its regions."""
        if "image_feat" in batch:
            return batch["image_feat"]
        keep = batch["region_mask"].float()[..., None]
        return (batch["region_feats"] * keep).sum(1) / keep.sum(1).clamp(min=1.0)

    def token_box_matrix(self, batch: dict) -> torch.Tensor:
        """``M (B, L, R)``: 1 where token t names region k (from ``token_box``), else 0."""
        B, L = batch["input_ids"].shape
        R = batch["region_feats"].shape[1]
        refs = batch.get("token_box")
        if refs is None:
            return batch["region_feats"].new_zeros(B, L, R)
        if refs.shape != (B, L):
            raise ValueError(f"token_box must have shape {(B, L)} (one region index or -1 per token), "
                             f"got {tuple(refs.shape)}")
        if refs.device.type == "cpu" and (refs >= R).any():
            raise ValueError(f"token_box holds region index {int(refs.max())} but the batch has {R} regions")
        onehot = torch.nn.functional.one_hot(refs.clamp(min=0), R).to(batch["region_feats"].dtype)
        return onehot * (refs >= 0)[..., None]

    def encode(self, batch, input_ids=None, hidden_regions=None, return_attention: bool = False) -> FusionOutput:
        check_region_batch(batch, self.config)
        ids = batch["input_ids"] if input_ids is None else input_ids
        B = ids.shape[0]
        ids = torch.cat([ids[:, :1], ids.new_full((B, 1), IMAGE_TOKEN_ID), ids[:, 1:]], dim=1)  # [CLS] [IMAGE] ...
        mask = batch["attention_mask"].bool()
        mask = torch.cat([mask[:, :1], mask[:, :1], mask[:, 1:]], dim=1)
        x = self.embeddings(ids)  # (B, 1 + L, D): LN(word + position + segment)
        image = self.image_feature(batch)  # (B, F)
        if self.config.fusion == "early":
            boxes = self.token_box_matrix(batch) @ batch["region_feats"]  # (B, L, F): M f
            visual = torch.cat([boxes[:, :1], image[:, None], boxes[:, 1:]], dim=1)  # [IMAGE] gets the whole image
            x = x + torch.tanh(self.visual_dense(visual))
        h, maps = self.fusion(x, key_mask=mask, return_attention=return_attention)
        pooled = self.pooler(h)
        text = torch.cat([h[:, :1], h[:, 2:]], dim=1)  # aligned with input_ids again
        extras = {"image_vector": torch.tanh(self.image_dense(image))} if self.config.fusion == "late" else {}
        return FusionOutput(text=text, image=None, pooled=pooled, attentions=maps, extras=extras)

    def itm_from_output(self, out: FusionOutput) -> torch.Tensor:
        if self.config.fusion == "early":
            return self.itm_head(out.pooled)
        s = (out.pooled * out.extras["image_vector"]).sum(-1)  # (B,)
        return torch.stack([-s, s], dim=-1)

    def itm_logits(self, batch: dict) -> torch.Tensor:
        return self.itm_from_output(self.encode(batch))
