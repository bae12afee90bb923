"""Oscar (Li et al., ECCV 2020, "Oscar: Object-Semantics Aligned Pre-training for Vision-Language Tasks").

The figure of the paper, in code:

- **input**: the triple (words ``w``, object tags ``q``, regions ``v``), one sequence
  ``[CLS] w [SEP] q [SEP] v``. The tags are the detector's class names of the image's regions
  (``tag_ids``/``tag_mask`` of the batch, ``course_lib.features.tags``), embedded by the *same*
  word embeddings as the caption: "dog" the tag and "dog" the word are one vector, an anchor
  between the modalities. Segment A for ``[CLS] w [SEP]``, segment B for ``q [SEP]``; the tags
  follow the caption's last token (``features.text.pack_pair``), padding at the end;
- **regions**: ``LN(W [f; g])`` with Oscar's 6-d box ``g = (x1, y1, x2, y2, w, h)``
  (``RegionEmbedding(..., "6d")``);
- **fusion**: one BERT over the triple (``SingleStreamFusion``);
- **objectives**: the masked token loss over words **and** tags (BERT's 15%, 80/10/10, on both
  segments; every row masked alike) and the **contrastive loss with polluted tags**: with
  probability ``pollute_prob`` (the paper's 0.5) an image's tag sequence is replaced by another
  image's, and a binary head on the pooled ``[CLS]`` says whether (w, q, v) is polluted
  (``objectives.polluted``). The masked token loss is scored on polluted triples too
  (Oscar's ``mask_loss_for_unmatched=1``): their caption still belongs with their regions.

``forward(batch)`` returns ``{"loss", "mlm", "contrastive"}``. Switches, each one override:

- ``use_tags=False``: the no-tags ablation, ``[CLS] w [SEP] v``; with no tags to pollute, the
  contrastive loss pollutes the regions instead (another image's, as ITM does), which makes it the
  tag-less BERT-style pretraining the paper compares with; MLM is then scored on matched pairs only;
- ``itm_weight > 0`` (with ``contrastive_weight=0``): image-text matching with whole images
  (regions *and* their tags) from another pair, Oscar's retrieval fine-tuning ("a different image
  or a different caption"), ``{"loss", "mlm", "itm"}``.

The matching head is one ``Linear(D, 2)`` with the course's convention (class 1 = matched): Oscar's
code numbers "polluted" 1 and "matched" 0, the same classifier with its rows swapped. So
``match_scores`` (what ``course_lib.evaluate.fused_retrieval`` ranks by) is the log-odds that the
triple is not polluted.

Tags in a batch: ``ShapeWorldRegions(..., tag_tokens=T)`` writes ShapeWorld's class names;
``RegionBatches(..., tag_names=names)`` the names of a real detector's classes, and
``python -m course_lib.pretrain --model=oscar --data=region_shards`` reads them from
``--model.tag_names_file`` (one class name per line, line ``i`` naming class ``i``, e.g.
bottom-up-attention's ``objects_vocab.txt``).

Deviations (notebook 13 says so): the polluting tags come from another image of the batch (the
original draws them from the whole dataset); a polluted triple whose borrowed tags are identical to its
own counts as matched (``objectives.polluted``); tags share the course's small tokenizer; the
segment-B embedding is the fusion's text segment plus a learned offset (``tag_segment``), the same
family of vectors as BERT's two segments, so that ``SingleStreamFusion`` stays shared.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

import torch
from torch import nn

from course_lib.features.region import RegionEmbedding
from course_lib.features.text import pack_pair
from course_lib.fusion.base import FusionOutput
from course_lib.fusion.single_stream import SingleStreamFusion
from course_lib.models.region_bert import (REGION_KEYS, RegionBert, RegionBertConfig, check_region_batch,
                                           draw_mismatched, mask_caption, swap_images)
from course_lib.objectives.itm import itm_loss
from course_lib.objectives.mlm import masked_lm_loss
from course_lib.objectives.polluted import pollute
from course_lib.presets import apply_overrides

TAG_KEYS = ("tag_ids", "tag_mask")
# Tag tokens per preset: ShapeWorld's up to 6 regions x 2 pieces + [SEP] on CPUs; a few dozen of
# Visual Genome's labels on GPUs (Oscar's captions and tags share max_seq_length 70 in fine-tuning).
TAG_TOKENS = {"cpu-tiny": 16, "cpu-small": 16, "gpu-small": 32, "gpu-base": 32}


@dataclass(frozen=True)
class OscarConfig(RegionBertConfig):
    itm_weight: float = 0.0  # retrieval fine-tuning only (see the module docstring)
    contrastive_weight: float = 1.0  # the polluted-tag loss
    pollute_prob: float = 0.5  # Oscar's rate: half of the triples get another image's tags
    use_tags: bool = True  # False: the no-tags ablation
    max_tag_tokens: int = 16  # tag word pieces + [SEP] the position table makes room for
    tag_names_file: str = ""  # class names for --data=region_shards (one per line)
    OBJECTIVES: ClassVar[tuple[str, ...]] = ("mlm", "itm", "mrc", "contrastive")

    def __post_init__(self):
        super().__post_init__()
        if self.contrastive_weight < 0:
            raise ValueError(f"contrastive_weight must be >= 0, got {self.contrastive_weight!r}")
        if not 0.0 < self.pollute_prob < 1.0:
            raise ValueError(f"pollute_prob must be in (0, 1), got {self.pollute_prob!r}")
        if not isinstance(self.use_tags, bool):
            raise ValueError(f"use_tags must be True or False, got {self.use_tags!r}")
        if isinstance(self.max_tag_tokens, bool) or not isinstance(self.max_tag_tokens, int) or self.max_tag_tokens < 2:
            raise ValueError(f"max_tag_tokens must be an int >= 2 (a tag and [SEP]), got {self.max_tag_tokens!r}")
        if self.mrc_weight:
            raise ValueError(f"mrc_weight={self.mrc_weight}: Oscar has no region objective (its objectives are "
                             "mlm, contrastive and, for retrieval fine-tuning, itm)")
        if self.itm_weight and self.contrastive_weight:
            raise ValueError("itm_weight and contrastive_weight are both > 0, but they train the same matching head "
                             "on different negatives; pretrain with contrastive_weight (polluted tags) and fine-tune "
                             "for retrieval with itm_weight=1.0, contrastive_weight=0.0")
        if self.mlm_weight == self.itm_weight == self.contrastive_weight == 0:
            raise ValueError("mlm_weight, itm_weight and contrastive_weight are all 0: nothing would be learned")

    @classmethod
    def from_preset(cls, name: str, **overrides):
        base = super().from_preset(name)
        return apply_overrides(replace(base, max_tag_tokens=TAG_TOKENS[name]), overrides)


class Oscar(RegionBert):
    """``forward(region batch with tags)`` -> ``{"loss", "mlm", "contrastive"}``; see the module docstring."""

    config_class = OscarConfig

    def __init__(self, config: OscarConfig):
        super().__init__(config)
        self.region_embedding = RegionEmbedding(config.region_feat_dim, config.dim, "6d")
        self.tag_segment = nn.Embedding(1, config.dim)  # segment B, as an offset from the text segment A
        self.init()

    def build_fusion(self) -> nn.Module:
        c = self.config
        return SingleStreamFusion(dim=c.dim, num_heads=c.heads, num_layers=c.layers, mlp_ratio=c.mlp_ratio,
                                  dropout=c.dropout, layer_norm_eps=c.layer_norm_eps,
                                  max_text_len=c.context_length + c.max_tag_tokens)

    # ------------------------------------------------------------------ input

    def check_batch(self, batch: dict) -> None:
        """``check_region_batch`` and, with ``use_tags``, the tags: ``tag_ids``/``tag_mask`` ``(B, T)``."""
        c = self.config
        check_region_batch(batch, c)
        if not c.use_tags:
            return
        missing = [k for k in TAG_KEYS if k not in batch]
        if missing:
            raise ValueError(f"batch is missing {missing}: Oscar reads the detector's class names as object tags; "
                             "build the batch with ShapeWorldRegions(..., tag_tokens=N) or RegionBatches(..., "
                             "tag_names=...) (course_lib.features.tags), or set use_tags=False")
        tags, mask = batch["tag_ids"], batch["tag_mask"]
        B = batch["input_ids"].shape[0]
        if tags.dim() != 2 or tags.shape[0] != B:
            raise ValueError(f"tag_ids must have shape (B={B}, T), got {tuple(tags.shape)}")
        if tuple(mask.shape) != tuple(tags.shape):
            raise ValueError(f"tag_mask must have the shape of tag_ids {tuple(tags.shape)}, got {tuple(mask.shape)}")
        if tags.shape[1] > c.max_tag_tokens:
            raise ValueError(f"tag_ids has {tags.shape[1]} tokens; the model's max_tag_tokens is {c.max_tag_tokens}")
        if tags.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"tag_ids must hold integer token ids, got dtype {tags.dtype}")
        if tags.device.type != "cpu":
            return  # the value checks below need a device sync
        if tags.numel() and (tags.min() < 0 or tags.max() >= c.vocab_size):
            raise ValueError(f"tag_ids must lie in [0, vocab_size={c.vocab_size}), got [{tags.min()}, {tags.max()}]")
        if not mask.bool().any(1).all():
            raise ValueError(f"tag_mask row {int((~mask.bool().any(1)).nonzero()[0])} is empty; every tag sequence "
                             "ends with [SEP], even an image without tags")

    def text_sequence(self, batch: dict, input_ids: torch.Tensor | None = None):
        """The triple's text: ``(ids, mask, segments)``, each ``(B, L + T)``: ``[CLS] w [SEP] q [SEP]``
        packed (positions count on from the caption into the tags), segment 0 for the caption and 1
        for the tags; without tags, the caption ``(B, L)`` with segment 0. ``input_ids`` replaces the
        caption. The caption's tokens keep their columns."""
        words = batch["input_ids"] if input_ids is None else input_ids
        if not self.config.use_tags:
            return words, batch["attention_mask"], torch.zeros_like(words)
        return pack_pair(words, batch["attention_mask"], batch["tag_ids"], batch["tag_mask"])

    def embed(self, batch: dict, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None):
        """``(text (B, L', D), image (B, R, D), image_mask (B, R))`` of the triple text ``input_ids``
        (from :meth:`text_sequence`) with its segments, and the regions."""
        text = self.word_embeddings(input_ids)
        if token_type_ids is not None:
            text = text + token_type_ids[..., None].to(text.dtype) * self.tag_segment.weight[0]
        image = self.region_embedding(batch["region_feats"], batch["region_boxes"])
        return text, image, batch["region_mask"]

    def encode(self, batch: dict, input_ids: torch.Tensor | None = None, hidden_regions: torch.Tensor | None = None,
               return_attention: bool = False, text=None) -> FusionOutput:
        """Fused triple: ``text (B, L + T, D)`` (the caption's tokens at their columns, then the tags),
        ``image (B, R, D)``, ``pooled (B, D)``. ``input_ids (B, L)`` replaces the caption; ``text``, an
        ``(ids, mask, segments)`` triple text, replaces the whole text (the masked one in ``forward``)."""
        if hidden_regions is not None:
            raise ValueError("hidden_regions: Oscar hides no region (it has no region objective)")
        self.check_batch(batch)
        ids, mask, segments = self.text_sequence(batch, input_ids) if text is None else text
        words, image, image_mask = self.embed(batch, ids, segments)
        return self.fusion(words, mask, image, image_mask, return_attention=return_attention)

    # ------------------------------------------------------------------ pretraining

    def forward(self, batch: dict) -> dict:
        c = self.config
        self.check_batch(batch)
        B = batch["input_ids"].shape[0]
        device = batch["input_ids"].device
        matched = torch.ones(B, dtype=torch.bool, device=device)
        scored = matched  # the rows whose masked tokens are scored
        if (c.contrastive_weight or c.itm_weight) and B < 2:
            raise ValueError("the contrastive (or ITM) loss needs a batch of at least 2 triples to borrow from")
        if c.contrastive_weight > 0:
            keys = TAG_KEYS if c.use_tags else REGION_KEYS  # without tags, pollute the regions (ITM)
            batch, matched, _ = pollute(batch, keys, c.pollute_prob)
            scored = torch.ones_like(matched) if c.use_tags else matched
        elif c.itm_weight > 0:  # retrieval fine-tuning: whole images (regions and tags) of other pairs
            swapped = draw_mismatched(B, c.itm_prob, device)
            batch = swap_images(batch, swapped)
            matched = scored = ~swapped
        ids, mask, segments = self.text_sequence(batch)
        labels = None
        if c.mlm_weight > 0:
            ids, labels = mask_caption(ids, mask, scored, c.vocab_size, c.mask_prob)
        out = self.encode(batch, text=(ids, mask, segments))
        losses = {}
        if c.mlm_weight > 0:
            losses["mlm"] = masked_lm_loss(self.mlm_head(out.text), labels)
        if c.contrastive_weight > 0:
            losses["contrastive"] = itm_loss(self.itm_from_output(out), matched.long())
        elif c.itm_weight > 0:
            losses["itm"] = itm_loss(self.itm_from_output(out), matched.long())
        weights = {"mlm": c.mlm_weight, "itm": c.itm_weight, "contrastive": c.contrastive_weight}
        total = sum(weights[name] * loss for name, loss in losses.items())
        return {"loss": total, **losses}
