"""Encoder-decoder (BLIP's image-grounded text decoder, CoCa's multimodal decoder, SimVLM).

An image encoder (a pre-LN ViT stack) reads the image tokens; a text *decoder* reads the caption
left to right: causal self-attention (token t sees tokens <= t), then cross-attention to the whole
image, then a feed-forward, post-LN as BERT (BLIP's ``BertLMHeadModel``)::

    t = LN(t + CausalSelfAttn(t));  t = LN(t + CrossAttn(Q=t, K=V=image));  t = LN(t + FFN(t))

So ``text[:, t]`` depends on the image and on the text tokens ``<= t`` only: a language-model head on
it predicts token ``t + 1``. ``pooled`` is the state of the last real text token, which has seen
the whole caption and the image (CoCa reads its [CLS] at the end for the same reason).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from course_lib.fusion.base import (FusionConfig, FusionModule, FusionOutput, build_image_encoder,
                                    check_positive_int, last_real_index, run_image_encoder)
from course_lib.nn import TransformerDecoder, init_weights


@dataclass(frozen=True)
class EncoderDecoderConfig(FusionConfig):
    image_layers: int | None = None  # ViT layers over the image tokens (None: num_layers; 0: none)
    image_layer_norm_eps: float = 1e-6  # timm's ViT

    def __post_init__(self):
        super().__post_init__()
        if self.image_layers is not None:
            check_positive_int("image_layers", self.image_layers, allow_zero=True)


class EncoderDecoderFusion(FusionModule):
    """``forward(text, text_mask, image, image_mask)`` -> ``FusionOutput`` with the decoder states
    ``text (B, Lt, D)``, the encoder's ``image (B, Li, D)``, ``pooled (B, D)`` and maps
    ``{"image_self"}`` per encoder layer, then ``{"text_self" (causal), "text_to_image"}``."""

    config_class = EncoderDecoderConfig

    def __init__(self, config: EncoderDecoderConfig | None = None, **overrides):
        super().__init__(config, **overrides)
        c = self.config
        self.image_encoder = build_image_encoder(c, c.num_layers if c.image_layers is None else c.image_layers,
                                                 c.image_layer_norm_eps)
        self.decoder = TransformerDecoder(c.num_layers, c.dim, c.num_heads, c.mlp_ratio, c.dropout,
                                          layer_norm_eps=c.layer_norm_eps, activation=c.activation)
        init_weights(self)

    def forward(self, text, text_mask, image, image_mask, return_attention: bool = False) -> FusionOutput:
        text_mask, image_mask = self.check_inputs(text, text_mask, image, image_mask)
        image, maps = run_image_encoder(self.image_encoder, image, image_mask, return_attention)
        text, text_maps = self.decoder(text, text_mask, image, image_mask, return_attention)
        maps += [{"text_self": m["self"], "text_to_image": m["cross"]} for m in text_maps]
        pooled = text[torch.arange(len(text), device=text.device), last_real_index(text_mask)]  # (B, D)
        return FusionOutput(text=text, image=image, pooled=pooled, attentions=maps)
