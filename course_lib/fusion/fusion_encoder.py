"""Fusion encoder (ALBEF, Li et al. 2021; BLIP's image-grounded text encoder, Li et al. 2022).

Unimodal encoders first, then fusion *inside the text encoder*: some of its BERT layers get a
cross-attention block between self-attention and the feed-forward, whose queries are the text
tokens and whose keys/values are the image encoder's output::

    t = LN(t + SelfAttn(t));  t = LN(t + CrossAttn(Q=t, K=V=image));  t = LN(t + FFN(t))

ALBEF: a 12-layer BERT whose top 6 layers have cross-attention (``fusion_layers=6``);
BLIP: every layer has it (``fusion_layers=None``). The image encoder is a pre-LN ViT stack
(``image_layers``; 0 means the image tokens are used as given). ``pooled`` is the fused text
[CLS] state, the input of ALBEF's and BLIP's ITM heads (no extra pooler).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from course_lib.fusion.base import (FusionConfig, FusionModule, FusionOutput, build_image_encoder,
                                    check_positive_int, run_image_encoder)
from course_lib.nn import TransformerLayer, init_weights


@dataclass(frozen=True)
class FusionEncoderConfig(FusionConfig):
    fusion_layers: int | None = None  # top text layers with cross-attention (None: all, as BLIP)
    image_layers: int | None = None  # ViT layers over the image tokens (None: num_layers; 0: none)
    image_layer_norm_eps: float = 1e-6  # timm's ViT

    def __post_init__(self):
        super().__post_init__()
        if self.fusion_layers is not None:
            check_positive_int("fusion_layers", self.fusion_layers)
            if self.fusion_layers > self.num_layers:
                raise ValueError(f"fusion_layers={self.fusion_layers} must be <= num_layers={self.num_layers}")
        if self.image_layers is not None:
            check_positive_int("image_layers", self.image_layers, allow_zero=True)


class FusionEncoder(FusionModule):
    """``forward(text, text_mask, image, image_mask)`` -> ``FusionOutput`` with the fused
    ``text (B, Lt, D)``, the image encoder's ``image (B, Li, D)``, ``pooled = text[:, 0]`` and maps
    ``{"image_self"}`` per image layer, then ``{"text_self"[, "text_to_image" (B, H, Lt, Li)]}``."""

    config_class = FusionEncoderConfig

    def __init__(self, config: FusionEncoderConfig | None = None, **overrides):
        super().__init__(config, **overrides)
        c = self.config
        n_fusion = c.num_layers if c.fusion_layers is None else c.fusion_layers
        n_image = c.num_layers if c.image_layers is None else c.image_layers
        self.image_encoder = build_image_encoder(c, n_image, c.image_layer_norm_eps)
        self.text_layers = nn.ModuleList(
            TransformerLayer(c.dim, c.num_heads, c.mlp_ratio, c.dropout, cross_attention=i >= c.num_layers - n_fusion,
                             layer_norm_eps=c.layer_norm_eps, activation=c.activation)
            for i in range(c.num_layers)
        )
        init_weights(self)

    def forward(self, text, text_mask, image, image_mask, return_attention: bool = False) -> FusionOutput:
        text_mask, image_mask = self.check_inputs(text, text_mask, image, image_mask)
        image, maps = self.encode_image(image, image_mask, return_attention)
        text, text_maps = self.encode_text(text, text_mask, return_attention)
        text, fusion_maps = self.fuse(text, text_mask, image, image_mask, return_attention)
        return FusionOutput(text=text, image=image, pooled=text[:, 0], attentions=maps + text_maps + fusion_maps)

    # The three stages one by one (ALBEF aligns the unimodal outputs with ITC before it fuses them).
    # They take checked inputs: ``forward`` checks them, and a model calling them checks its own batch.

    def encode_image(self, image, image_mask=None, return_attention: bool = False):
        """The image encoder alone: ``(B, Li, D)`` -> ``((B, Li, D), [{"image_self"}] per layer)``."""
        return run_image_encoder(self.image_encoder, image, image_mask, return_attention)

    def encode_text(self, text, text_mask=None, return_attention: bool = False):
        """The text layers without cross-attention (the bottom ``num_layers - fusion_layers``; none
        when every layer fuses, as BLIP's): ``(B, Lt, D)`` -> ``((B, Lt, D), [{"text_self"}] per layer)``."""
        maps = []
        for layer in self.text_layers:
            if layer.has_cross:
                break
            text, m = layer(text, text_mask, return_attention=return_attention)
            maps.append({"text_self": m["self"]})
        return text, maps

    def fuse(self, text, text_mask, image, image_mask=None, return_attention: bool = False):
        """The cross-attention layers over ``encode_text``'s output ``(B, Lt, D)`` and the encoded
        image ``(B, Li, D)`` -> ``((B, Lt, D), [{"text_self", "text_to_image"}] per layer)``."""
        maps = []
        for layer in self.text_layers:
            if layer.has_cross:
                text, m = layer(text, text_mask, image, image_mask, return_attention)
                maps.append({"text_self": m["self"], "text_to_image": m["cross"]})
        return text, maps
