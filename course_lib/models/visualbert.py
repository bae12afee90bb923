"""VisualBERT (Li et al., 2019, "VisualBERT: A Simple and Performant Baseline for Vision and Language").

The figure of the paper, in code:
- features: detected regions, each a projected detector vector (``visual_projection``), no box input;
- fusion: one BERT over ``[text; regions]`` (``SingleStreamFusion``); a segment embedding tells the
  modalities apart, every region gets the same position;
- objectives: masked language modelling conditioned on the image + sentence-image prediction (ITM).

``transformers`` has the architecture (``VisualBertForPreTraining``): :func:`from_transformers` copies
its weights, pretraining heads included, into a course model, and :func:`to_transformers` exports a
trained course model into one (``save_pretrained`` then loads it as any Hugging Face model).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from course_lib.fusion.hf_import import BERT_LAYER, load_from_hf_visual_bert
from course_lib.models.region_bert import RegionBert, RegionBertConfig


@dataclass(frozen=True)
class VisualBertConfig(RegionBertConfig):
    pass


class VisualBert(RegionBert):
    """``forward(region batch)`` -> ``{"loss", "mlm", "itm"}``; see ``course_lib.models.region_bert``."""

    config_class = VisualBertConfig

    def __init__(self, config: VisualBertConfig):
        super().__init__(config)
        self.visual_projection = nn.Linear(config.region_feat_dim, config.dim)
        self.init()

    def embed(self, batch, input_ids, hidden_regions):
        feats = batch["region_feats"]
        if hidden_regions is not None:
            feats = feats.masked_fill(hidden_regions[..., None], 0.0)
        return self.word_embeddings(input_ids), self.visual_projection(feats), batch["region_mask"]


# ------------------------------------------------------------------------- transformers interop

HEAD_RULES = [("cls.predictions.transform.dense.", "mlm_head.transform.0."),
              ("cls.predictions.transform.LayerNorm.", "mlm_head.transform.2."),
              ("cls.predictions.bias", "mlm_head.decoder.bias"),
              ("cls.seq_relationship.", "itm_head.")]


def _check_hf(hf_model) -> None:
    if type(hf_model).__name__ != "VisualBertForPreTraining":
        raise ValueError(f"hf_model must be a transformers VisualBertForPreTraining, got {type(hf_model).__name__}")
    if hf_model.config.hidden_act != "gelu":
        raise ValueError(f"hf_model.config.hidden_act must be 'gelu' (ours), got {hf_model.config.hidden_act!r}")


@torch.no_grad()
def from_transformers(hf_model) -> VisualBert:
    """A course ``VisualBert`` with the weights of a ``VisualBertForPreTraining`` (heads included).

    Our fusion folds HF's constant visual position (row 0) and visual segment (row 1) into its image
    type embedding (``load_from_hf_visual_bert``); the MLM decoder stays tied to the word embeddings.
    """
    _check_hf(hf_model)
    c = hf_model.config
    config = VisualBertConfig(vocab_size=c.vocab_size, context_length=c.max_position_embeddings, dim=c.hidden_size,
                              layers=c.num_hidden_layers, heads=c.num_attention_heads,
                              mlp_ratio=c.intermediate_size / c.hidden_size, layer_norm_eps=c.layer_norm_eps,
                              region_feat_dim=c.visual_embedding_dim, init_std=c.initializer_range)
    model = VisualBert(config)
    model.fusion = load_from_hf_visual_bert(hf_model.visual_bert)
    state = hf_model.state_dict()
    model.word_embeddings.weight.copy_(state["visual_bert.embeddings.word_embeddings.weight"])
    model.visual_projection.load_state_dict({k.split(".")[-1]: v for k, v in state.items()
                                             if k.startswith("visual_bert.embeddings.visual_projection.")})
    ours = model.state_dict()
    for name, tensor in state.items():
        for theirs, mine in HEAD_RULES:
            if name.startswith(theirs):
                ours[mine + name[len(theirs):]].copy_(tensor)
    return model


@torch.no_grad()
def to_transformers(model: VisualBert):
    """Export ``model`` into a new ``transformers.VisualBertForPreTraining`` with the same outputs.

    HF gives text its segment 0 and regions ``visual_token_type_ids`` 1 at ``visual_position`` 0
    (its defaults): our image type vector goes to ``visual_token_type_embeddings[1]`` and the visual
    position table is zero.
    """
    from transformers import VisualBertConfig as HFConfig, VisualBertForPreTraining

    if not isinstance(model, VisualBert):
        raise ValueError(f"model must be a course VisualBert, got {type(model).__name__}")
    c = model.config
    hf = VisualBertForPreTraining(HFConfig(
        vocab_size=c.vocab_size, hidden_size=c.dim, num_hidden_layers=c.layers, num_attention_heads=c.heads,
        intermediate_size=int(c.dim * c.mlp_ratio), hidden_act="gelu", max_position_embeddings=c.context_length,
        type_vocab_size=2, visual_embedding_dim=c.region_feat_dim, layer_norm_eps=c.layer_norm_eps,
        hidden_dropout_prob=c.dropout, attention_probs_dropout_prob=c.dropout, initializer_range=c.init_std))
    hf.eval()
    fusion = model.fusion
    state = {"visual_bert.embeddings.word_embeddings.weight": model.word_embeddings.weight,
             "visual_bert.embeddings.position_embeddings.weight": fusion.position_embeddings.weight,
             "visual_bert.embeddings.LayerNorm.weight": fusion.embed_norm.weight,
             "visual_bert.embeddings.LayerNorm.bias": fusion.embed_norm.bias,
             "visual_bert.embeddings.visual_projection.weight": model.visual_projection.weight,
             "visual_bert.embeddings.visual_projection.bias": model.visual_projection.bias,
             "visual_bert.pooler.dense.weight": fusion.pooler.dense.weight,
             "visual_bert.pooler.dense.bias": fusion.pooler.dense.bias}
    hf_state = hf.state_dict()
    types = torch.zeros_like(hf_state["visual_bert.embeddings.token_type_embeddings.weight"])
    types[0] = fusion.type_embeddings.weight[0]
    visual_types = torch.zeros_like(types)
    visual_types[1] = fusion.type_embeddings.weight[1]
    state["visual_bert.embeddings.token_type_embeddings.weight"] = types
    state["visual_bert.embeddings.visual_token_type_embeddings.weight"] = visual_types
    state["visual_bert.embeddings.visual_position_embeddings.weight"] = torch.zeros_like(
        hf_state["visual_bert.embeddings.visual_position_embeddings.weight"])
    ours = model.state_dict()
    for i in range(c.layers):
        for theirs, mine in BERT_LAYER:
            if theirs.startswith("crossattention"):
                continue
            for suffix in ("weight", "bias"):
                key = f"visual_bert.encoder.layer.{i}.{theirs}{suffix}"
                if key in hf_state:
                    state[key] = ours[f"fusion.encoder.layers.{i}.{mine}{suffix}"]
                for qkv in ("query.", "key.", "value."):
                    key = f"visual_bert.encoder.layer.{i}.{theirs}{qkv}{suffix}"
                    if key in hf_state and theirs == "attention.self.":
                        state[key] = ours[f"fusion.encoder.layers.{i}.{mine}{qkv}{suffix}"]
    for theirs, mine in HEAD_RULES:
        for key in hf_state:
            if key.startswith(theirs):
                state[key] = ours[mine + key[len(theirs):]]
    state["cls.predictions.decoder.weight"] = model.word_embeddings.weight
    if "cls.predictions.decoder.bias" in hf_state:
        state["cls.predictions.decoder.bias"] = model.mlm_head.decoder.bias
    missing = sorted(set(hf_state) - set(state))
    if missing:
        raise RuntimeError(f"to_transformers left HF weights unset: {missing[:5]}")
    hf.load_state_dict({k: v.detach().clone() for k, v in state.items()}, strict=True)
    return hf
