"""What the single-stream region systems share: BERT over words and detected regions, and its
pretraining objectives (VisualBERT, B2T2, Unicoder-VL, VL-BERT; Part II of the course).

Every system is a :class:`RegionBert` that says how it turns a *region batch*
(``course_lib.data.regions``) into embedded text and image tokens (``embed``); the rest is common:

- **fusion**: ``SingleStreamFusion``, one BERT over ``[text; regions]`` (merged attention);
- **MLM** on the caption, conditioned on the regions (``MLMHead`` tied to the word embeddings);
- **ITM** on the pooled ``[CLS]``: for a share ``itm_prob`` of the pairs the regions of another
  image of the batch replace the true ones, and a linear head says "matched or not";
- **masked region classification** (``mrc_weight > 0``): 15% of the regions are hidden (no
  minimum per image) and their class predicted, from the detector's top label (``"hard"``: Unicoder-VL's MOC) or its whole
  distribution (``"soft"``: VL-BERT).

MLM and region classification are scored on matched pairs only (B2T2's and UNITER's rule: a word
of a caption that belongs to another image is not predictable from this one), and ITM on the pairs
with no hidden region (UNITER masks one modality at a time: a pair whose only object is hidden
cannot be judged). Every row is masked alike, matched or not, so that masking never tells ITM
the answer. ``forward(batch)``
returns ``{"loss", "mlm", "itm", "mrc"}`` (those switched on); objective weights are config fields,
so an ablation is one override: ``build_model("vl_bert", itm_weight=1.0)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from course_lib.data.regions import drop_missing_refs
from course_lib.features.text import MASK_ID, PAD_ID, SEP_ID, CLS_ID, UNK_ID, mask_tokens
from course_lib.fusion.base import FusionOutput
from course_lib.fusion.single_stream import SingleStreamFusion
from course_lib.nn import init_weights
from course_lib.objectives.itm import itm_loss, sample_random_negatives
from course_lib.objectives.mlm import IGNORE_INDEX, MLMHead, masked_lm_loss
from course_lib.objectives.mvm import mask_regions, region_class_loss_hard
from course_lib.presets import apply_overrides, get_preset
from course_lib.utils import check_one_of, check_shape

# Sizes per preset: (dim, layers, heads, context_length, region_feat_dim, num_region_classes, init_std,
# vocab_size).
# CPU presets read ShapeWorld's 108-d pooled pixels and 18 classes + "no object"; GPU presets
# read bottom-up-attention features (2048-d, 1600 Visual Genome classes + background), BERT-base
# at gpu-base. BERT's init std 0.02 is tuned for width 768; at width 64 it starves the
# attention of signal (notebook 04), so the tiny presets use 0.8 / sqrt(dim).
REGION_SIZES = {
    "cpu-tiny": (64, 2, 4, 32, 108, 19, 0.1, 256),
    "cpu-small": (128, 4, 4, 32, 108, 19, 0.07, 256),
    "gpu-small": (384, 6, 6, 64, 2048, 1601, 0.02, 30522),
    "gpu-base": (768, 12, 12, 64, 2048, 1601, 0.02, 30522),  # BERT-base's sizes and vocabulary
}
SPECIAL_IDS = (PAD_ID, UNK_ID, CLS_ID, SEP_ID, MASK_ID)
REGION_KEYS = ("region_feats", "region_boxes", "region_mask", "region_labels", "region_probs", "image_feat",
               "images", "tag_ids", "tag_mask")  # an image's object tags (Oscar) go with it


@dataclass(frozen=True)
class RegionBertConfig:
    vocab_size: int = 256
    context_length: int = 32
    dim: int = 64
    layers: int = 2
    heads: int = 4
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    layer_norm_eps: float = 1e-12
    init_std: float = 0.1
    region_feat_dim: int = 108
    num_region_classes: int = 19  # detector classes + "no object"
    mask_prob: float = 0.15  # caption tokens chosen for MLM (BERT's 80/10/10 rule)
    region_mask_prob: float = 0.15  # regions hidden for region classification (at least one per image)
    itm_prob: float = 0.5  # share of pairs whose regions come from another image (ITM negatives)
    mlm_weight: float = 1.0
    itm_weight: float = 1.0
    mrc_weight: float = 0.0
    mrc_target: str = "hard"  # "hard": the detector's top class; "soft": its whole distribution
    OBJECTIVES: ClassVar[tuple[str, ...]] = ("mlm", "itm", "mrc")  # each has a <name>_weight field

    def __post_init__(self):
        check_one_of("mrc_target", self.mrc_target, ("hard", "soft"))
        for name in ("mask_prob", "region_mask_prob", "itm_prob"):
            if not 0.0 < getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in (0, 1), got {getattr(self, name)!r}")
        weights = [f"{name}_weight" for name in self.OBJECTIVES]
        for name in weights:
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if all(getattr(self, name) == 0 for name in weights):
            raise ValueError(f"{', '.join(weights[:-1])} and {weights[-1]} are all 0: nothing would be learned")
        for name in ("vocab_size", "context_length", "dim", "layers", "heads", "region_feat_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if self.num_region_classes < 2:
            raise ValueError(f"num_region_classes must be >= 2 (classes + 'no object'), got {self.num_region_classes}")

    @classmethod
    def from_preset(cls, name: str, **overrides):
        get_preset(name)  # an unknown name lists the valid ones
        dim, layers, heads, context, feat, classes, std, vocab = REGION_SIZES[name]
        base = cls(dim=dim, layers=layers, heads=heads, context_length=context, region_feat_dim=feat,
                   num_region_classes=classes, init_std=std, vocab_size=vocab)
        return apply_overrides(base, overrides)


def check_region_batch(batch: dict, config: RegionBertConfig) -> None:
    """Raise ``ValueError`` naming the key and what was expected unless ``batch`` is a region batch
    (``course_lib.data.regions``) this model can read."""
    if not isinstance(batch, dict):
        raise ValueError(f"batch must be a dict of tensors (a region batch), got {type(batch).__name__}")
    missing = [k for k in ("input_ids", "attention_mask", "region_feats", "region_boxes", "region_mask")
               if k not in batch]
    if missing:
        raise ValueError(f"batch is missing {missing}; a region model needs input_ids, attention_mask, region_feats,"
                         " region_boxes and region_mask (see course_lib.data.regions)")
    ids, feats = batch["input_ids"], batch["region_feats"]
    check_shape("input_ids", ids, (None, None))
    B, L = ids.shape
    check_shape("attention_mask", batch["attention_mask"], (B, L))
    check_shape("region_feats", feats, (B, None, config.region_feat_dim))
    R = feats.shape[1]
    check_shape("region_boxes", batch["region_boxes"], (B, R, 4))
    check_shape("region_mask", batch["region_mask"], (B, R))
    if L > config.context_length:
        raise ValueError(f"input_ids has {L} tokens; the model's context_length is {config.context_length}")
    if "region_probs" in batch:
        check_shape("region_probs", batch["region_probs"], (B, R, config.num_region_classes))
    if ids.device.type != "cpu":
        return  # the value checks below need a device sync
    real_words = (batch["attention_mask"].bool() & ~torch.isin(ids, ids.new_tensor(SPECIAL_IDS))).sum(1)
    if (real_words == 0).any():
        raise ValueError(f"caption {int((real_words == 0).nonzero()[0])} of input_ids is empty (only special "
                         "tokens); every caption needs at least one word")
    if not batch["region_mask"].bool().any(1).all():
        raise ValueError(f"region_mask row {int((~batch['region_mask'].bool().any(1)).nonzero()[0])} has no "
                         "region; every image needs at least one (use the whole image as a box)")
    if not torch.isfinite(feats).all():
        raise ValueError("region_feats holds NaN or inf values")
    boxes = batch["region_boxes"][batch["region_mask"].bool()]
    if ((boxes < -1e-4) | (boxes > 1 + 1e-4)).any() or (boxes[:, 2:] < boxes[:, :2]).any():
        raise ValueError("region_boxes must be x1, y1, x2, y2 normalised to [0, 1] with x1 <= x2 and y1 <= y2")
    labels = batch.get("region_labels")
    if labels is not None and labels.numel() and labels.max() >= config.num_region_classes - 1:
        raise ValueError(f"region_labels go up to {int(labels.max())} but the model has num_region_classes="
                         f"{config.num_region_classes} (classes + 'no object'); set --model.num_region_classes")


def draw_mismatched(batch_size: int, prob: float, device=None) -> torch.Tensor:
    """``(B,)`` bool: the pairs that get another image's regions (ITM negatives), each with probability
    ``prob``; the first pair always keeps its image and the last never does, so both kinds are scored."""
    swapped = torch.rand(batch_size, device=device) < prob
    swapped[0], swapped[-1] = False, True
    return swapped


def itm_negatives(batch: dict, itm_weight: float, itm_prob: float, swap=None, other: str = "image"):
    """``(batch, matched (B,) bool)``: with ITM on (``itm_weight > 0``), the pairs drawn by
    :func:`draw_mismatched` get another row's ``other`` through ``swap(batch, swapped)`` (default
    :func:`swap_images`; LXMERT swaps the sentence); with ITM off, the batch as given, every pair matched."""
    B = batch["input_ids"].shape[0]
    device = batch["input_ids"].device
    if itm_weight <= 0:
        return batch, torch.ones(B, dtype=torch.bool, device=device)
    if B < 2:
        raise ValueError(f"ITM needs a batch of at least 2 pairs to draw a mismatched {other} from, got {B}")
    swapped = draw_mismatched(B, itm_prob, device)
    return (swap or swap_images)(batch, swapped), ~swapped


def swap_images(batch: dict, swapped: torch.Tensor, generator: torch.Generator | None = None) -> dict:
    """The ITM negatives: rows ``swapped (B,)`` get every region key of another row of the batch.

    A B2T2 token reference (``token_box``) that points past the new image's regions is dropped.
    """
    B = batch["input_ids"].shape[0]
    source = torch.arange(B, device=swapped.device)
    source = torch.where(swapped, sample_random_negatives(B, generator, swapped.device), source)  # (B,)
    out = dict(batch)
    for key in REGION_KEYS:
        if key in batch:
            out[key] = batch[key][source]
    if "token_box" in batch:
        out["token_box"] = drop_missing_refs(batch["token_box"], out["region_mask"])
    return out


def mask_caption(input_ids: torch.Tensor, attention_mask: torch.Tensor, keep_rows: torch.Tensor, vocab_size: int,
                 prob: float, generator: torch.Generator | None = None,
                 every_row: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking of every caption, scored on rows ``keep_rows``: ``(B, L)`` -> ``(masked ids, labels)``.

    Every row is corrupted, matched or not: masking only the matched captions would tell the ITM
    head which pairs match (no ``[MASK]`` = a mismatched pair). Labels are -100 outside
    ``keep_rows``; at least one word is scored (the first word of the first kept row when the draw
    chose none), so the MLM loss is always defined. ``every_row=True`` is UNITER's rule instead: every
    kept row where the draw chose no word gets one word, drawn uniformly, replaced by ``[MASK]``.
    """
    masked, labels = mask_tokens(input_ids, vocab_size, MASK_ID, SPECIAL_IDS, prob, generator=generator)
    labels = labels.masked_fill(~keep_rows[:, None], IGNORE_INDEX)
    words = (attention_mask > 0) & ~torch.isin(input_ids, input_ids.new_tensor(SPECIAL_IDS))  # (B, L)
    if every_row:
        empty = keep_rows & ~(labels != IGNORE_INDEX).any(1)  # (B,)
        scores = torch.rand(input_ids.shape, generator=generator, device=input_ids.device).masked_fill(~words, -1.0)
        rows, cols = empty.nonzero().flatten(), scores.argmax(1)[empty]
        labels[rows, cols], masked[rows, cols] = input_ids[rows, cols], MASK_ID
    if not (labels != IGNORE_INDEX).any():
        row = int(keep_rows.nonzero()[0])
        col = int(words[row].nonzero()[0])
        labels[row, col], masked[row, col] = input_ids[row, col], MASK_ID
    return masked, labels


def hide_regions(region_mask: torch.Tensor, keep_rows: torch.Tensor, prob: float,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Regions ``(B, R)`` bool hidden for masked region classification: each real region of every row
    with probability ``prob`` (VL-BERT's rule: no minimum per image, which would hide the only object
    of a one-object image), and one region of the first kept row if the draw scored none."""
    mask = region_mask.bool()
    _, hidden = mask_regions(mask.float()[..., None], mask, prob, generator, at_least_one=False)
    if not (hidden & keep_rows[:, None]).any():
        row = int(keep_rows.nonzero()[0])
        hidden[row, int(mask[row].nonzero()[0])] = True
    return hidden


class RegionBert(nn.Module):
    """Base class: subclasses define ``embed(batch, input_ids, hidden_regions)`` -> ``(text (B, L, D),
    image (B, R, D), image_mask (B, R))``. See the module docstring for ``forward``."""

    config_class = RegionBertConfig
    inputs = "regions"  # course_lib.pretrain feeds it region batches

    def __init__(self, config: RegionBertConfig):
        super().__init__()
        if not isinstance(config, self.config_class):
            raise ValueError(f"config must be a {self.config_class.__name__}, got {type(config).__name__}")
        c = self.config = config
        self.word_embeddings = nn.Embedding(c.vocab_size, c.dim, padding_idx=PAD_ID)
        self.fusion = self.build_fusion()
        self.mlm_head = MLMHead(c.dim, c.vocab_size, tie_to=self.word_embeddings, layer_norm_eps=c.layer_norm_eps)
        self.itm_head = nn.Linear(c.dim, 2)
        self.mrc_head = MLMHead(c.dim, c.num_region_classes, layer_norm_eps=c.layer_norm_eps) if c.mrc_weight else None

    def build_fusion(self) -> nn.Module:
        c = self.config
        return SingleStreamFusion(dim=c.dim, num_heads=c.heads, num_layers=c.layers, mlp_ratio=c.mlp_ratio,
                                  dropout=c.dropout, layer_norm_eps=c.layer_norm_eps, max_text_len=c.context_length)

    def init(self) -> None:
        """Initialise every weight with ``config.init_std`` (call at the end of a subclass's ``__init__``)."""
        init_weights(self, std=self.config.init_std)

    def embed(self, batch: dict, input_ids: torch.Tensor, hidden_regions: torch.Tensor | None):
        raise NotImplementedError

    def encode(self, batch: dict, input_ids: torch.Tensor | None = None, hidden_regions: torch.Tensor | None = None,
               return_attention: bool = False) -> FusionOutput:
        """Fused tokens: ``text (B, L, D)``, ``image (B, R, D)`` (or None), ``pooled (B, D)``.

        ``input_ids`` replaces the batch's (the masked caption); ``hidden_regions (B, R)`` bool are the
        regions hidden for masked region classification.
        """
        check_region_batch(batch, self.config)
        ids = batch["input_ids"] if input_ids is None else input_ids
        text, image, image_mask = self.embed(batch, ids, hidden_regions)
        return self.fusion(text, batch["attention_mask"], image, image_mask, return_attention=return_attention)

    def itm_from_output(self, out: FusionOutput) -> torch.Tensor:
        """``(B, 2)`` ITM logits from the fused output (the head on the pooled ``[CLS]``)."""
        return self.itm_head(out.pooled)

    def itm_logits(self, batch: dict) -> torch.Tensor:
        """``(B, 2)`` "mismatched / matched" logits of the pairs as given (no masking)."""
        return self.itm_from_output(self.encode(batch))

    def match_scores(self, batch: dict) -> torch.Tensor:
        """``(B,)`` log-odds that caption i matches image i: what retrieval ranks by."""
        logits = self.itm_logits(batch)
        return logits[:, 1] - logits[:, 0]

    def forward(self, batch: dict) -> dict:
        c = self.config
        check_region_batch(batch, c)
        batch, matched = itm_negatives(batch, c.itm_weight, c.itm_prob)
        losses = {}
        ids, labels = batch["input_ids"], None
        if c.mlm_weight > 0:
            ids, labels = mask_caption(batch["input_ids"], batch["attention_mask"], matched, c.vocab_size, c.mask_prob)
        hidden = None
        if c.mrc_weight > 0:
            hidden = hide_regions(batch["region_mask"], matched, c.region_mask_prob)
        out = self.encode(batch, ids, hidden)
        if c.mlm_weight > 0:
            losses["mlm"] = masked_lm_loss(self.mlm_head(out.text), labels)
        if c.itm_weight > 0:  # on the pairs whose regions are all visible (see the module docstring)
            whole = ~hidden.any(1) if hidden is not None and not hidden.any(1).all() else torch.ones_like(matched)
            losses["itm"] = itm_loss(self.itm_from_output(out)[whole], matched[whole].long())
        if c.mrc_weight > 0:
            losses["mrc"] = self.region_class_loss(out.image, batch, hidden & matched[:, None])
        weights = {"mlm": c.mlm_weight, "itm": c.itm_weight, "mrc": c.mrc_weight}
        total = sum(weights[name] * loss for name, loss in losses.items())
        return {"loss": total, **losses}

    def region_class_loss(self, image_hidden: torch.Tensor, batch: dict, hidden: torch.Tensor) -> torch.Tensor:
        """Masked region classification on the hidden regions' outputs ``(B, R, D)``."""
        logits = self.mrc_head(image_hidden)  # (B, R, C + 1)
        if self.config.mrc_target == "soft" and "region_probs" in batch:  # VL-BERT: soft cross-entropy
            target = batch["region_probs"][hidden]
            return -(target * F.log_softmax(logits[hidden], dim=-1)).sum(-1).mean()
        if "region_labels" not in batch:
            raise ValueError("masked region classification needs region_labels (or region_probs) in the batch")
        labels = batch["region_labels"]
        scored = hidden & (labels >= 0)
        if not scored.any():  # every hidden region is a placeholder without a label
            return logits.sum() * 0.0
        probs = F.one_hot(labels.clamp(min=0), self.config.num_region_classes).float()
        return region_class_loss_hard(logits, probs, scored)
