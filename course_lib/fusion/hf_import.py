"""Copy Hugging Face ``transformers`` weights into the fusion styles (for parity checks).

Each ``load_from_hf_*`` builds our module with the same sizes as the given HF model and copies its
fusion weights; the HF model's input embeddings stay outside, as our modules take embedded tokens:

==================================  ==========================  ================================================
HF model                            ours                        our inputs, computed with the HF model
==================================  ==========================  ================================================
``VisualBertModel``                 ``SingleStreamFusion``      ``text = word_embeddings(ids)``,
                                                                ``image = embeddings.visual_projection(feats)``
``LxmertModel``                     ``CrossModalityFusion``     ``text = embeddings(ids, types)``,
                                                                ``image = encoder.visn_fc(feats, boxes)``
``CLIPModel``                       ``TwoTowerFusion``          ``text = text_model.embeddings(ids)``,
                                                                ``image = vision_model.embeddings(pixels)``
``BlipTextModel`` (encoder mode)    ``FusionEncoder``           ``text = embeddings(ids)``, ``image`` = the
                                                                vision encoder's output (``image_layers=0``)
``BlipTextModel`` (decoder mode)    ``EncoderDecoderFusion``    as above, causal
==================================  ==========================  ================================================

Only ``transformers``' public module attributes and ``state_dict`` names are used; a name that does
not map makes ``load_state_dict`` fail loudly (strict).
"""

from __future__ import annotations

import torch
from torch import nn

from course_lib.fusion.cross_modality import CrossModalityFusion
from course_lib.fusion.encoder_decoder import EncoderDecoderFusion
from course_lib.fusion.fusion_encoder import FusionEncoder
from course_lib.fusion.single_stream import SingleStreamFusion
from course_lib.fusion.two_tower import TwoTowerFusion

HF_ACTIVATIONS = {"gelu": "gelu", "quick_gelu": "quick_gelu", "gelu_new": "gelu_tanh",
                  "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}

# HF BertLayer sub-module names -> ours (TransformerLayer).
BERT_LAYER = [
    ("attention.self.", "attn."), ("attention.output.dense.", "attn.out."),
    ("attention.output.LayerNorm.", "attn_norm."),
    ("crossattention.self.", "cross_attn."), ("crossattention.output.dense.", "cross_attn.out."),
    ("crossattention.output.LayerNorm.", "cross_norm."),
    ("intermediate.dense.", "mlp.fc1."), ("output.dense.", "mlp.fc2."), ("output.LayerNorm.", "mlp_norm."),
]
# HF CLIPEncoderLayer (pre-LN) -> ours.
CLIP_LAYER = [
    ("self_attn.q_proj.", "attn.query."), ("self_attn.k_proj.", "attn.key."), ("self_attn.v_proj.", "attn.value."),
    ("self_attn.out_proj.", "attn.out."), ("layer_norm1.", "attn_norm."), ("mlp.fc1.", "mlp.fc1."),
    ("mlp.fc2.", "mlp.fc2."), ("layer_norm2.", "mlp_norm."),
]
# One stream of HF LxmertXLayer -> ours (CrossModalityLayer.text_layer / image_layer).
LXMERT_STREAM = [
    ("{s}_self_att.self.", "attn."), ("{s}_self_att.output.dense.", "attn.out."),
    ("{s}_self_att.output.LayerNorm.", "attn_norm."), ("{s}_inter.dense.", "mlp.fc1."),
    ("{s}_output.dense.", "mlp.fc2."), ("{s}_output.LayerNorm.", "mlp_norm."),
]


def _activation(name) -> str:
    if name not in HF_ACTIVATIONS:
        raise ValueError(f"hidden_act={name!r} has no equivalent here; expected one of {list(HF_ACTIVATIONS)}")
    return HF_ACTIVATIONS[name]


def _layer_rules(theirs: str, ours: str, table) -> list[tuple[str, str]]:
    return [(theirs + a, ours + b) for a, b in table]


def _load_renamed(ours: nn.Module, theirs: dict, rules: list[tuple[str, str]], extra: dict | None = None):
    """Load into ``ours`` every tensor of ``theirs`` whose name starts with a rule's HF prefix (renamed
    to our prefix), plus ``extra``; strict, so any parameter of ours left out is an error."""
    state = dict(extra or {})
    for name, tensor in theirs.items():
        for their_prefix, our_prefix in rules:
            if name.startswith(their_prefix):
                state[our_prefix + name[len(their_prefix):]] = tensor
                break
    ours.load_state_dict(state, strict=True)
    return ours


def _check_type(name: str, model, class_name: str) -> None:
    if type(model).__name__ != class_name:
        raise ValueError(f"{name} must be a transformers {class_name}, got {type(model).__name__}")


def _common_options(c) -> dict:
    dropout = getattr(c, "hidden_dropout_prob", None)
    dropout = getattr(c, "attention_dropout", 0.0) if dropout is None else dropout  # CLIP names it so
    return dict(dim=c.hidden_size, num_heads=c.num_attention_heads, mlp_ratio=c.intermediate_size / c.hidden_size,
                dropout=dropout, activation=_activation(c.hidden_act))


@torch.no_grad()
def load_from_hf_visual_bert(hf_model) -> SingleStreamFusion:
    """``VisualBertModel`` -> ``SingleStreamFusion``. VisualBERT adds to every region the same position
    vector (``visual_position_embeddings[0]``) and the image type vector; both are constants, so they
    are folded into our image type embedding."""
    _check_type("hf_model", hf_model, "VisualBertModel")
    c = hf_model.config
    if c.bypass_transformer or hf_model.pooler is None:
        raise ValueError("hf_model must use bypass_transformer=False and have a pooler (add_pooling_layer=True)")
    ours = SingleStreamFusion(num_layers=c.num_hidden_layers, layer_norm_eps=c.layer_norm_eps,
                              max_text_len=c.max_position_embeddings, **_common_options(c))
    emb = hf_model.embeddings
    types = torch.stack([emb.token_type_embeddings.weight[0],
                         emb.visual_token_type_embeddings.weight[1] + emb.visual_position_embeddings.weight[0]])
    rules = [("embeddings.position_embeddings.", "position_embeddings."), ("embeddings.LayerNorm.", "embed_norm."),
             ("pooler.dense.", "pooler.dense.")]
    for i in range(c.num_hidden_layers):
        rules += _layer_rules(f"encoder.layer.{i}.", f"encoder.layers.{i}.", BERT_LAYER)
    return _load_renamed(ours, hf_model.state_dict(), rules, {"type_embeddings.weight": types})


@torch.no_grad()
def load_from_hf_lxmert(hf_model) -> CrossModalityFusion:
    """``LxmertModel`` -> ``CrossModalityFusion`` (l_layers / r_layers / x_layers = text / image / cross)."""
    _check_type("hf_model", hf_model, "LxmertModel")
    c = hf_model.config
    if c.x_layers < 1:
        raise ValueError(f"hf_model needs at least one cross-modality layer, got x_layers={c.x_layers}")
    ours = CrossModalityFusion(num_layers=c.x_layers, text_layers=c.l_layers, image_layers=c.r_layers,
                               layer_norm_eps=1e-12, **_common_options(c))  # LXMERT hard-codes eps 1e-12
    return _load_renamed(ours, hf_model.state_dict(), lxmert_fusion_rules(c.l_layers, c.r_layers, c.x_layers))


def lxmert_fusion_rules(l_layers: int, r_layers: int, x_layers: int) -> list[tuple[str, str]]:
    """``(HF LxmertModel prefix, CrossModalityFusion prefix)`` for every weight of the three encoders
    and the pooler (the visual feature encoder and the embeddings stay outside; see the table above).
    ``course_lib.models.lxmert`` reads them both ways (import and export)."""
    rules = [("pooler.dense.", "pooler.dense.")]
    for i in range(l_layers):
        rules += _layer_rules(f"encoder.layer.{i}.", f"text_encoder.{i}.", BERT_LAYER)
    for i in range(r_layers):
        rules += _layer_rules(f"encoder.r_layers.{i}.", f"image_encoder.{i}.", BERT_LAYER)
    for i in range(x_layers):
        theirs, mine = f"encoder.x_layers.{i}.", f"cross_encoder.{i}."
        rules += [(theirs + "visual_attention.att.", mine + "cross.attn."),
                  (theirs + "visual_attention.output.dense.", mine + "cross.attn.out."),
                  (theirs + "visual_attention.output.LayerNorm.", mine + "cross.norm.")]
        for stream, layer in (("lang", "text_layer."), ("visn", "image_layer.")):
            table = [(a.format(s=stream), b) for a, b in LXMERT_STREAM]
            rules += _layer_rules(theirs, mine + layer, table)
    return rules


def clip_tower_rules(text_layers: int, image_layers: int) -> list[tuple[str, str]]:
    """HF ``CLIPModel`` name prefixes -> ``TwoTowerFusion``'s, for the towers (one to one, both ways:
    ``course_lib.models.clip.to_transformers`` uses them in reverse)."""
    rules = [("text_model.final_layer_norm.", "text_encoder.final_norm."),
             ("text_projection.", "text_projection."), ("vision_model.pre_layrnorm.", "image_pre_norm."),
             ("vision_model.post_layernorm.", "image_encoder.final_norm."),
             ("visual_projection.", "image_projection.")]
    for i in range(text_layers):
        rules += _layer_rules(f"text_model.encoder.layers.{i}.", f"text_encoder.layers.{i}.", CLIP_LAYER)
    for i in range(image_layers):
        rules += _layer_rules(f"vision_model.encoder.layers.{i}.", f"image_encoder.layers.{i}.", CLIP_LAYER)
    return rules


@torch.no_grad()
def load_from_hf_clip(hf_model) -> TwoTowerFusion:
    """``CLIPModel`` -> ``TwoTowerFusion``. The towers may differ in width and heads (``image_dim``,
    ``image_heads``) but must share the MLP ratio, activation and LayerNorm eps (one config). HF's
    ``post_layernorm`` on the image [CLS] becomes our image tower's final LayerNorm (applied to every
    token, the same on [CLS])."""
    _check_type("hf_model", hf_model, "CLIPModel")
    tc, vc = hf_model.config.text_config, hf_model.config.vision_config
    for key in ("hidden_act", "layer_norm_eps"):
        if getattr(tc, key) != getattr(vc, key):
            raise ValueError(f"hf_model's text and vision configs must agree on {key}, got "
                             f"{getattr(tc, key)!r} and {getattr(vc, key)!r}")
    if tc.intermediate_size * vc.hidden_size != vc.intermediate_size * tc.hidden_size:
        raise ValueError("hf_model's text and vision configs must agree on intermediate_size / hidden_size, got "
                         f"{tc.intermediate_size}/{tc.hidden_size} and {vc.intermediate_size}/{vc.hidden_size}")
    ours = TwoTowerFusion(num_layers=tc.num_hidden_layers, image_layers=vc.num_hidden_layers,
                          layer_norm_eps=tc.layer_norm_eps, embed_dim=hf_model.config.projection_dim,
                          image_dim=vc.hidden_size, image_heads=vc.num_attention_heads, **_common_options(tc))
    rules = clip_tower_rules(tc.num_hidden_layers, vc.num_hidden_layers)
    return _load_renamed(ours, hf_model.state_dict(), rules)


def _check_blip_text(hf_model):
    _check_type("hf_model", hf_model, "BlipTextModel")
    c = hf_model.config
    if not c.is_decoder:
        raise ValueError("hf_model must be built with is_decoder=True (HF BLIP creates the cross-attention "
                         "layers only then); choose encoder or decoder mode at call time")
    if c.encoder_hidden_size != c.hidden_size:
        raise ValueError(f"hf_model's encoder_hidden_size={c.encoder_hidden_size} must equal hidden_size="
                         f"{c.hidden_size}: our image tokens have the text's width")
    return c


@torch.no_grad()
def load_from_hf_blip_text(hf_model) -> FusionEncoder:
    """``BlipTextModel`` -> ``FusionEncoder`` with cross-attention in every layer and no image encoder
    (BLIP's image-grounded text encoder: call HF with ``is_decoder=False`` and ``encoder_hidden_states``)."""
    c = _check_blip_text(hf_model)
    ours = FusionEncoder(num_layers=c.num_hidden_layers, fusion_layers=None, image_layers=0,
                         layer_norm_eps=c.layer_norm_eps, **_common_options(c))
    rules = []
    for i in range(c.num_hidden_layers):
        rules += _layer_rules(f"encoder.layer.{i}.", f"text_layers.{i}.", BERT_LAYER)
    return _load_renamed(ours, hf_model.state_dict(), rules)


@torch.no_grad()
def load_from_hf_blip_text_decoder(hf_model) -> EncoderDecoderFusion:
    """``BlipTextModel`` -> ``EncoderDecoderFusion`` without an image encoder (BLIP's image-grounded
    text decoder: call HF with ``is_decoder=True`` and ``encoder_hidden_states``)."""
    c = _check_blip_text(hf_model)
    ours = EncoderDecoderFusion(num_layers=c.num_hidden_layers, image_layers=0, layer_norm_eps=c.layer_norm_eps,
                                **_common_options(c))
    rules = []
    for i in range(c.num_hidden_layers):
        rules += _layer_rules(f"encoder.layer.{i}.", f"decoder.layers.{i}.", BERT_LAYER)
    return _load_renamed(ours, hf_model.state_dict(), rules)
