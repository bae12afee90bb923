"""LXMERT (Tan & Bansal, EMNLP 2019, "LXMERT: Learning Cross-Modality Encoder Representations from
Transformers").

The figure of the paper, in code:
- features: detected objects, each ``(LN(W_f f) + LN(W_b box)) / 2`` with the 4-d box
  (``RegionEmbedding(..., "4d")``); words as BERT embeds them (``TextEmbeddings``);
- fusion: the cross-modality encoder (``CrossModalityFusion``): a *language encoder* over the words
  alone, an *object-relationship encoder* over the objects alone, then a *cross-modality encoder*
  whose layers cross-attend both ways with one shared module (the paper's 9 / 5 / 5 layers; the CPU
  presets keep the ratio: 2 / 1 / 1);
- five pretraining tasks, each an objective with a ``<name>_weight`` field:

  ======  =======================================================================================
  mlm     masked language modelling (15% of the words, BERT's 80/10/10), on every pair
  itm     cross-modality matching: a share ``itm_prob`` = 0.5 of the pairs get **another row's
          sentence** (the image stays), a linear head on the pooled language [CLS] says matched or not
  feat    masked object prediction by feature regression: 15% of the objects hidden (80% zeroed,
          10% another object's feature, 10% kept), smooth-L1 to the detector feature
  obj     masked object prediction by label classification: cross-entropy to the detector's label,
          weighted by its confidence
  attr    the same for attributes (only with ``num_attributes > 0`` and ``region_attributes`` in the batch)
  qa      image question answering: a sentence that is a question (``answers >= 0`` in the batch)
          and still paired with its own image is answered from the pooled output (``VQAHead``)
  ======  =======================================================================================

The recipe is the public code's (``airsplay/lxmert``: ``src/pretrain/lxmert_pretrain.py``,
``lxmert_data.py``, ``src/lxrt/modeling.py``): the masked-modelling losses are computed on every
pair, matched or not (the sentence is swapped, the image never, so an object stays predictable from
its own image); ``masked_loss_on_mismatched=False`` scores MLM on matched pairs only (UNITER's
rule). The QA loss is computed on matched pairs only (a swapped question is not about this image).
The visual losses are reduced as the original: ``(loss * weight).mean() * visual_loss_normalizer``
(6.67 = 1 / 0.15) over the real objects; the label losses run over **all** objects, not only the
masked ones (``obj_confs`` is never multiplied by the mask in the public code;
``label_masked_only=True`` restricts them to the masked objects, as the paper's text describes).

``transformers`` has the architecture (``LxmertForPreTraining``): :func:`from_transformers` copies
its weights, every head included, into a course model, and :func:`to_transformers` exports a trained
course model into one (``save_pretrained``, then ``from_pretrained`` gives the same outputs).

Deviations: the position and segment embeddings have no padding row (the original and HF give row 0
``padding_idx=0``, so position 0 never learns); the matching negatives come from the batch rather
than the whole dataset (a negative may by chance describe its image too: ShapeWorld captions are
short); 10% "random feature" substitutes come from the batch's objects.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from course_lib.distributed import is_distributed
from course_lib.evaluate.fused import pair_batch
from course_lib.evaluate.vqa import VQAHead
from course_lib.features.region import RegionEmbedding
from course_lib.features.text import TextEmbeddings
from course_lib.fusion.cross_modality import CrossModalityFusion
from course_lib.fusion.hf_import import lxmert_fusion_rules
from course_lib.models.region_bert import (REGION_SIZES, RegionBert, RegionBertConfig, check_region_batch,
                                          itm_negatives, mask_caption)
from course_lib.objectives.itm import itm_loss, sample_random_negatives
from course_lib.objectives.mlm import masked_lm_loss
from course_lib.presets import apply_overrides, get_preset
from course_lib.utils import check_shape

# (language, object-relationship, cross-modality) layers per preset: the paper's 9 / 5 / 5, scaled.
LXMERT_LAYERS = {"cpu-tiny": (2, 1, 1), "cpu-small": (4, 2, 2), "gpu-small": (5, 3, 3), "gpu-base": (9, 5, 5)}
# QA answers: the default ShapeWorld's 15 (course_lib.data.language.answer_vocabulary) on CPU; the paper's 9500 on GPU.
QA_ANSWERS = {"cpu-tiny": 15, "cpu-small": 15, "gpu-small": 9500, "gpu-base": 9500}
ATTRIBUTES = {"cpu-tiny": 0, "cpu-small": 0, "gpu-small": 400, "gpu-base": 400}  # Visual Genome's 400
TASKS = ("mlm", "itm", "feat", "obj", "attr", "qa")


@dataclass(frozen=True)
class LXMERTConfig(RegionBertConfig):
    """``layers`` is the cross-modality encoder's depth; ``text_layers`` the language encoder's and
    ``image_layers`` the object-relationship encoder's. ``num_region_classes - 1`` object labels (the
    last class is "no object", never a target: LXMERT's 1600 Visual Genome objects at gpu-base)."""

    text_layers: int = 2
    image_layers: int = 1
    layers: int = 1
    num_qa_answers: int = 15
    num_attributes: int = 0  # 0: no attribute head
    feat_weight: float = 1.0
    obj_weight: float = 1.0
    attr_weight: float = 1.0
    qa_weight: float = 1.0
    visual_loss_normalizer: float = 6.67  # the original's 1 / 0.15 (HF: visual_loss_normalizer)
    masked_loss_on_mismatched: bool = True  # the public code; False: MLM on matched pairs only
    label_masked_only: bool = False  # the public code scores every object's label; True: the masked ones
    OBJECTIVES: ClassVar[tuple[str, ...]] = TASKS

    def __post_init__(self):
        super().__post_init__()
        if self.mrc_weight != 0:
            raise ValueError(f"LXMERT's object-label task is obj_weight (mrc_weight must stay 0, got {self.mrc_weight!r})")
        for name in ("text_layers", "image_layers", "num_qa_answers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if isinstance(self.num_attributes, bool) or not isinstance(self.num_attributes, int) or self.num_attributes < 0:
            raise ValueError(f"num_attributes must be an int >= 0 (0: no attribute head), got {self.num_attributes!r}")
        if self.dim % self.heads:
            raise ValueError(f"dim={self.dim} must be a multiple of heads={self.heads}")
        if not self.visual_loss_normalizer > 0:
            raise ValueError(f"visual_loss_normalizer must be > 0, got {self.visual_loss_normalizer!r}")
        for name in ("masked_loss_on_mismatched", "label_masked_only"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")

    @classmethod
    def from_preset(cls, name: str, **overrides):
        get_preset(name)  # an unknown name lists the valid ones
        dim, _, heads, context, feat, classes, std, vocab = REGION_SIZES[name]
        text, image, cross = LXMERT_LAYERS[name]
        base = cls(dim=dim, heads=heads, context_length=context, region_feat_dim=feat, num_region_classes=classes,
                   init_std=std, vocab_size=vocab, text_layers=text, image_layers=image, layers=cross,
                   num_qa_answers=QA_ANSWERS[name], num_attributes=ATTRIBUTES[name])
        return apply_overrides(base, overrides)


class ObjectHeads(nn.Module):
    """LXMERT's ``VisualObjHead``: one shared ``Linear -> GELU -> LayerNorm`` transform, then a linear
    decoder per visual task. ``forward(image (B, R, D))`` -> ``{"feat": (B, R, F), "obj": (B, R, C),
    "attr": (B, R, A)}`` (``attr`` only with ``num_attributes > 0``)."""

    def __init__(self, dim: int, feature_dim: int, num_objects: int, num_attributes: int = 0,
                 layer_norm_eps: float = 1e-12):
        super().__init__()
        self.transform = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.LayerNorm(dim, eps=layer_norm_eps))
        sizes = {"obj": num_objects, "feat": feature_dim}
        if num_attributes:
            sizes["attr"] = num_attributes
        self.decoders = nn.ModuleDict({k: nn.Linear(dim, n) for k, n in sizes.items()})

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        hidden = self.transform(image)
        return {k: decoder(hidden) for k, decoder in self.decoders.items()}


def hide_objects(region_feats: torch.Tensor, region_mask: torch.Tensor, prob: float = 0.15,
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """LXMERT's ``random_feat``: each real object is chosen with probability ``prob`` (no minimum);
    of those, 80% get a zero feature, 10% the feature of a random real object of the batch, 10% keep
    theirs. ``(B, R, F), (B, R)`` -> ``(masked features (B, R, F), chosen (B, R) bool)``."""
    check_shape("region_feats", region_feats, (None, None, None))
    check_shape("region_mask", region_mask, region_feats.shape[:2])
    real = region_mask.bool()
    draw = torch.rand(real.shape, generator=generator, device=region_feats.device)
    chosen = (draw < prob) & real
    action = draw / prob  # where chosen, uniform in [0, 1): the original's ``prob /= ratio``
    zero = chosen & (action < 0.8)
    swap = chosen & (action >= 0.8) & (action < 0.9)
    pool = region_feats[real]  # (K, F) every real object of the batch
    pick = torch.randint(len(pool), real.shape, generator=generator, device=region_feats.device)
    feats = torch.where(swap[..., None], pool[pick], region_feats)
    return feats.masked_fill(zero[..., None], 0.0), chosen


def swap_sentences(batch: dict, swapped: torch.Tensor, generator: torch.Generator | None = None) -> dict:
    """LXMERT's matching negatives: rows ``swapped (B,)`` get **another row's sentence** (the image
    stays); a swapped row's answer becomes -1 (a question about another image is not answered)."""
    B = batch["input_ids"].shape[0]
    rows = torch.arange(B, device=swapped.device)
    source = torch.where(swapped, sample_random_negatives(B, generator, swapped.device), rows)
    out = pair_batch(batch, rows, source)
    if "answers" in out:
        out["answers"] = out["answers"].masked_fill(swapped, -1)
    return out


class LXMERT(RegionBert):
    """``forward(region batch)`` -> ``{"loss", "mlm", "itm", "feat", "obj", ["attr"], ["qa"]}``.

    A batch may hold ``answers (B,)`` (an answer class, -1 for a sentence that is not a question) and
    ``region_attributes (B, R)`` (-1 where none); see the module docstring.
    """

    config_class = LXMERTConfig

    def __init__(self, config: LXMERTConfig):
        super().__init__(config)
        c = config
        self.text_embeddings = TextEmbeddings(c.vocab_size, c.dim, c.context_length, 2, dropout=c.dropout,
                                              layer_norm_eps=c.layer_norm_eps)
        self.text_embeddings.word_embeddings = self.word_embeddings  # one table, tied to the MLM decoder
        self.region_embedding = RegionEmbedding(c.region_feat_dim, c.dim, "4d")
        for norm in (self.region_embedding.feature_norm, self.region_embedding.geometry_norm):
            norm.eps = c.layer_norm_eps  # LXMERT's 1e-12
        self.region_dropout = nn.Dropout(c.dropout)
        self.object_heads = ObjectHeads(c.dim, c.region_feat_dim, c.num_region_classes - 1, c.num_attributes,
                                        c.layer_norm_eps)
        self.qa_head = VQAHead(c.dim, c.num_qa_answers)  # LXMERT's answer head (logit_fc)
        self.init()

    def build_fusion(self) -> nn.Module:
        c = self.config
        return CrossModalityFusion(dim=c.dim, num_heads=c.heads, num_layers=c.layers, text_layers=c.text_layers,
                                   image_layers=c.image_layers, mlp_ratio=c.mlp_ratio, dropout=c.dropout,
                                   layer_norm_eps=c.layer_norm_eps)

    def embed(self, batch, input_ids, hidden_regions):
        """Words: BERT's embeddings (segment 0). Objects: ``(LN(W_f f) + LN(W_b box)) / 2``.
        ``hidden_regions`` here is the *already masked* feature tensor ``(B, R, F)`` or None."""
        feats = batch["region_feats"] if hidden_regions is None else hidden_regions
        image = self.region_dropout(self.region_embedding(feats, batch["region_boxes"]))
        return self.text_embeddings(input_ids), image, batch["region_mask"]

    def heads(self, out) -> dict[str, torch.Tensor]:
        """Every head on a fused output: ``mlm (B, L, V)``, ``itm (B, 2)``, ``qa (B, A)``, and the object
        heads ``feat (B, R, F)``, ``obj (B, R, C)``, ``attr (B, R, A_attr)``."""
        return {"mlm": self.mlm_head(out.text), "itm": self.itm_head(out.pooled), "qa": self.qa_head(out.pooled),
                **self.object_heads(out.image)}

    # ------------------------------------------------------------------ the losses

    def visual_losses(self, predicted: dict, batch: dict, chosen: torch.Tensor) -> dict[str, torch.Tensor]:
        """``feat`` (smooth-L1 on the chosen objects), ``obj`` and ``attr`` (cross-entropy weighted by the
        detector's confidence), each ``(loss * weight).sum() / #real objects * visual_loss_normalizer``."""
        c = self.config
        real = batch["region_mask"].bool()
        n_real = real.sum().clamp(min=1)
        losses = {}
        if c.feat_weight > 0:
            per_object = F.smooth_l1_loss(predicted["feat"], batch["region_feats"], reduction="none").mean(-1)
            losses["feat"] = (per_object * chosen).sum() / n_real * c.visual_loss_normalizer
        scored = chosen if c.label_masked_only else real
        if c.obj_weight > 0:
            labels = batch.get("region_labels")
            if labels is None:
                raise ValueError("the object-label task (obj_weight > 0) needs region_labels (B, R) in the batch")
            conf = torch.ones_like(real, dtype=predicted["obj"].dtype)  # the detector's confidence in its label
            if "region_probs" in batch:
                conf = batch["region_probs"][..., :-1].gather(-1, labels.clamp(min=0)[..., None])[..., 0]
            weight = conf * (scored & (labels >= 0))
            ce = F.cross_entropy(predicted["obj"].flatten(0, 1), labels.clamp(min=0).flatten(), reduction="none")
            losses["obj"] = (ce * weight.flatten()).sum() / n_real * c.visual_loss_normalizer
        if c.attr_weight > 0 and "attr" in predicted and "region_attributes" in batch:
            attrs = batch["region_attributes"]
            check_shape("region_attributes", attrs, tuple(real.shape))
            weight = batch.get("region_attribute_conf", torch.ones_like(attrs, dtype=predicted["attr"].dtype))
            weight = weight * (scored & (attrs >= 0))
            ce = F.cross_entropy(predicted["attr"].flatten(0, 1), attrs.clamp(min=0).flatten(), reduction="none")
            losses["attr"] = (ce * weight.flatten()).sum() / n_real * c.visual_loss_normalizer
        return losses

    def qa_loss(self, logits: torch.Tensor, answers: torch.Tensor) -> torch.Tensor | None:
        """Cross-entropy over the answers of the rows with one (``answers >= 0``); None when no row has."""
        c = self.config
        check_shape("answers", answers, (logits.shape[0],))
        if answers.device.type == "cpu" and answers.numel() and answers.max() >= c.num_qa_answers:
            raise ValueError(f"answers go up to {int(answers.max())} but the model has num_qa_answers="
                             f"{c.num_qa_answers}; set --model.num_qa_answers")
        asked = answers >= 0
        if not asked.any():
            return None
        return F.cross_entropy(logits[asked], answers[asked])

    def forward(self, batch: dict) -> dict:
        c = self.config
        check_region_batch(batch, c)
        B = batch["input_ids"].shape[0]
        if "answers" in batch:
            check_shape("answers", batch["answers"], (B,))
        batch, matched = itm_negatives(batch, c.itm_weight, c.itm_prob, swap_sentences, "sentence")
        ids, labels = batch["input_ids"], None
        if c.mlm_weight > 0:
            scored_rows = torch.ones_like(matched) if c.masked_loss_on_mismatched else matched
            ids, labels = mask_caption(batch["input_ids"], batch["attention_mask"], scored_rows, c.vocab_size,
                                       c.mask_prob)
        feats, chosen = batch["region_feats"], torch.zeros_like(batch["region_mask"], dtype=torch.bool)
        if c.feat_weight > 0 or c.obj_weight > 0 or c.attr_weight > 0:
            feats, chosen = hide_objects(batch["region_feats"], batch["region_mask"], c.region_mask_prob)
        out = self.encode(batch, ids, feats)
        losses = {}
        if c.mlm_weight > 0:
            losses["mlm"] = masked_lm_loss(self.mlm_head(out.text), labels)
        if c.itm_weight > 0:
            losses["itm"] = itm_loss(self.itm_head(out.pooled), matched.long())
        if c.feat_weight > 0 or c.obj_weight > 0 or c.attr_weight > 0:
            losses.update(self.visual_losses(self.object_heads(out.image), batch, chosen))
        if c.qa_weight > 0 and "answers" in batch:
            qa = self.qa_loss(self.qa_head(out.pooled), batch["answers"])
            if qa is not None:
                losses["qa"] = qa
        total = sum(getattr(c, f"{name}_weight") * loss for name, loss in losses.items())
        if is_distributed():  # DDP: every parameter in the graph, with weight 0
            total = total + 0.0 * sum(p.sum() for p in self.parameters() if p.requires_grad)
        return {"loss": total, **losses}


# ------------------------------------------------------------------------- pretraining data with questions


def qa_pretraining_pool(source, indices, with_questions: bool = True) -> dict:
    """LXMERT's pretraining sentences for the scenes ``indices`` of a ``ShapeWorldRegions``: one row per
    caption (``answers`` -1) and, with ``with_questions``, one row per question with its answer class
    (the paper adds the VQA/GQA/VG-QA questions to the captions). The keys both kinds share."""
    captions = source(indices)
    captions["answers"] = torch.full((len(captions["input_ids"]),), -1, dtype=torch.long)
    if not with_questions:
        return {k: v for k, v in captions.items() if k not in ("token_box",)}
    questions = source.questions(indices)
    keys = sorted(set(captions) & set(questions))
    return {k: torch.cat([captions[k], questions[k]]) for k in keys}


# ------------------------------------------------------------------------- transformers interop

HEAD_RULES = [("cls.predictions.transform.dense.", "mlm_head.transform.0."),
              ("cls.predictions.transform.LayerNorm.", "mlm_head.transform.2."),
              ("cls.predictions.bias", "mlm_head.decoder.bias"),
              ("cls.seq_relationship.", "itm_head."),
              ("obj_predict_head.transform.dense.", "object_heads.transform.0."),
              ("obj_predict_head.transform.LayerNorm.", "object_heads.transform.2."),
              ("obj_predict_head.decoder_dict.", "object_heads.decoders."),
              ("answer_head.logit_fc.", "qa_head.net."),
              ("lxmert.embeddings.word_embeddings.", "word_embeddings."),
              ("lxmert.embeddings.position_embeddings.", "text_embeddings.position_embeddings."),
              ("lxmert.embeddings.token_type_embeddings.", "text_embeddings.token_type_embeddings."),
              ("lxmert.embeddings.LayerNorm.", "text_embeddings.LayerNorm."),
              ("lxmert.encoder.visn_fc.visn_fc.", "region_embedding.feature_proj."),
              ("lxmert.encoder.visn_fc.visn_layer_norm.", "region_embedding.feature_norm."),
              ("lxmert.encoder.visn_fc.box_fc.", "region_embedding.geometry_proj."),
              ("lxmert.encoder.visn_fc.box_layer_norm.", "region_embedding.geometry_norm.")]


def _rules(c) -> list[tuple[str, str]]:
    """Every (HF ``LxmertForPreTraining`` prefix, course ``LXMERT`` prefix): the fusion's (from
    ``course_lib.fusion.hf_import``) and the embeddings' and heads'."""
    fusion = [("lxmert." + theirs, "fusion." + mine)
              for theirs, mine in lxmert_fusion_rules(c.text_layers, c.image_layers, c.layers)]
    return fusion + HEAD_RULES


def _rename(state: dict, rules) -> dict:
    """``state`` with each name renamed by the rule of the longest matching source prefix (``attn.out.``
    before ``attn.``); names no rule matches are left out."""
    rules = sorted(rules, key=lambda rule: -len(rule[0]))
    out = {}
    for name, tensor in state.items():
        for source, target in rules:
            if name.startswith(source):
                out[target + name[len(source):]] = tensor
                break
    return out


def _check_hf(hf_model) -> None:
    if type(hf_model).__name__ != "LxmertForPreTraining":
        raise ValueError(f"hf_model must be a transformers LxmertForPreTraining, got {type(hf_model).__name__}")
    c = hf_model.config
    if c.hidden_act != "gelu":
        raise ValueError(f"hf_model.config.hidden_act must be 'gelu' (ours), got {c.hidden_act!r}")
    if c.visual_pos_dim != 4:
        raise ValueError(f"hf_model.config.visual_pos_dim must be 4 (LXMERT's box), got {c.visual_pos_dim}")
    needed = {"task_obj_predict": True, "task_qa": True, "visual_obj_loss": True, "visual_feat_loss": True}
    wrong = {k: getattr(c, k) for k, v in needed.items() if getattr(c, k) != v}
    if wrong:
        raise ValueError(f"hf_model must have every head (task_obj_predict, task_qa, visual_obj_loss, visual_feat_loss"
                         f" all True), got {wrong}")


@torch.no_grad()
def from_transformers(hf_model) -> LXMERT:
    """A course ``LXMERT`` with the weights of a ``LxmertForPreTraining``, every head included (the
    attribute head when ``visual_attr_loss``). The MLM decoder stays tied to the word embeddings."""
    _check_hf(hf_model)
    c = hf_model.config
    config = LXMERTConfig(vocab_size=c.vocab_size, context_length=c.max_position_embeddings, dim=c.hidden_size,
                          heads=c.num_attention_heads, mlp_ratio=c.intermediate_size / c.hidden_size,
                          text_layers=c.l_layers, image_layers=c.r_layers, layers=c.x_layers,
                          region_feat_dim=c.visual_feat_dim, num_region_classes=c.num_object_labels + 1,
                          num_attributes=c.num_attr_labels if c.visual_attr_loss else 0,
                          num_qa_answers=c.num_qa_labels, init_std=c.initializer_range,
                          visual_loss_normalizer=c.visual_loss_normalizer)
    model = LXMERT(config)
    state = _rename(hf_model.state_dict(), _rules(config))
    state.pop("mlm_head.decoder.weight", None)
    ours = model.state_dict()
    missing = sorted(set(ours) - set(state) - {"mlm_head.decoder.weight", "text_embeddings.word_embeddings.weight"})
    if missing:
        raise RuntimeError(f"from_transformers left course weights unset: {missing[:5]}")
    for name, tensor in state.items():
        ours[name].copy_(tensor)
    return model


@torch.no_grad()
def to_transformers(model: LXMERT):
    """Export ``model`` into a new ``transformers.LxmertForPreTraining`` with the same outputs."""
    from transformers import LxmertConfig as HFConfig, LxmertForPreTraining

    if not isinstance(model, LXMERT):
        raise ValueError(f"model must be a course LXMERT, got {type(model).__name__}")
    c = model.config
    hf = LxmertForPreTraining(HFConfig(
        vocab_size=c.vocab_size, hidden_size=c.dim, num_attention_heads=c.heads, intermediate_size=int(c.dim * c.mlp_ratio),
        hidden_act="gelu", max_position_embeddings=c.context_length, type_vocab_size=2, l_layers=c.text_layers,
        r_layers=c.image_layers, x_layers=c.layers, visual_feat_dim=c.region_feat_dim, visual_pos_dim=4,
        num_object_labels=c.num_region_classes - 1, num_attr_labels=max(c.num_attributes, 1),
        visual_attr_loss=c.num_attributes > 0, num_qa_labels=c.num_qa_answers, hidden_dropout_prob=c.dropout,
        attention_probs_dropout_prob=c.dropout, initializer_range=c.init_std,
        visual_loss_normalizer=c.visual_loss_normalizer))
    hf.eval()
    inverse = [(mine, theirs) for theirs, mine in _rules(c)]
    state = _rename(model.state_dict(), inverse)
    state["cls.predictions.decoder.weight"] = model.word_embeddings.weight
    hf_state = hf.state_dict()
    missing = sorted(set(hf_state) - set(state))
    if missing:
        raise RuntimeError(f"to_transformers left HF weights unset: {missing[:5]}")
    hf.load_state_dict({k: state[k].detach().clone() for k in hf_state}, strict=True)
    return hf
