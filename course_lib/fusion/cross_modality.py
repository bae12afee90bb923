"""Cross-modality encoder (LXMERT, Tan & Bansal 2019).

Three encoders, run in turn (the paper's sizes: 9 language, 5 object-relationship, 5 cross layers):

1. a language encoder: BERT layers over the text alone;
2. an object-relationship encoder: BERT layers over the image tokens alone;
3. a cross-modality encoder whose layer (``LXRTXLayer``) does, per stream,
   cross-attention -> self-attention -> feed-forward. The cross-attention module is **one module
   shared by both directions** (text queries over image keys, then image queries over text keys,
   both reading the layer's inputs); the self-attention and feed-forward are per stream.

``pooled = tanh(W text[:, 0] + b)`` (LXMERT's pooler, on the language [CLS]).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from course_lib.fusion.base import (CrossAttentionSublayer, FusionConfig, FusionModule, FusionOutput, Pooler,
                                    check_positive_int)
from course_lib.nn import TransformerLayer, init_weights


@dataclass(frozen=True)
class CrossModalityConfig(FusionConfig):
    text_layers: int | None = None  # language encoder depth (None: num_layers)
    image_layers: int | None = None  # object-relationship encoder depth (None: num_layers)
    # num_layers is the depth of the cross-modality encoder

    def __post_init__(self):
        super().__post_init__()
        for name in ("text_layers", "image_layers"):
            if getattr(self, name) is not None:
                check_positive_int(name, getattr(self, name), allow_zero=True)


class CrossModalityLayer(nn.Module):
    """``LXRTXLayer``: shared cross-attention both ways, then a self-attention + FFN layer per stream.

    ``forward(text (B, Lt, D), text_mask, image (B, Li, D), image_mask)`` -> ``(text, image, maps)``.
    """

    def __init__(self, c: FusionConfig):
        super().__init__()
        self.cross = CrossAttentionSublayer(c.dim, c.num_heads, c.dropout, c.layer_norm_eps)  # shared

        def layer():
            return TransformerLayer(c.dim, c.num_heads, c.mlp_ratio, c.dropout, layer_norm_eps=c.layer_norm_eps,
                                    activation=c.activation)

        self.text_layer, self.image_layer = layer(), layer()  # self-attention + FFN per stream

    def forward(self, text, text_mask, image, image_mask, return_attention: bool = False):
        new_text, t2i = self.cross(text, image, image_mask, return_attention)  # (B, Lt, D)
        new_image, i2t = self.cross(image, text, text_mask, return_attention)  # (B, Li, D), same weights
        text, text_maps = self.text_layer(new_text, key_mask=text_mask, return_attention=return_attention)
        image, image_maps = self.image_layer(new_image, key_mask=image_mask, return_attention=return_attention)
        maps = {"text_to_image": t2i, "image_to_text": i2t, "text_self": text_maps["self"],
                "image_self": image_maps["self"]}
        return text, image, maps


class CrossModalityFusion(FusionModule):
    """``forward(text, text_mask, image, image_mask)`` -> ``FusionOutput`` with ``text (B, Lt, D)``,
    ``image (B, Li, D)``, ``pooled (B, D)``; ``attentions``: the language layers' ``{"text_self"}``, the
    object layers' ``{"image_self"}``, then the cross layers' four maps."""

    config_class = CrossModalityConfig

    def __init__(self, config: CrossModalityConfig | None = None, **overrides):
        super().__init__(config, **overrides)
        c = self.config
        n_text = c.num_layers if c.text_layers is None else c.text_layers
        n_image = c.num_layers if c.image_layers is None else c.image_layers

        def layer():
            return TransformerLayer(c.dim, c.num_heads, c.mlp_ratio, c.dropout, layer_norm_eps=c.layer_norm_eps,
                                    activation=c.activation)

        self.text_encoder = nn.ModuleList(layer() for _ in range(n_text))
        self.image_encoder = nn.ModuleList(layer() for _ in range(n_image))
        self.cross_encoder = nn.ModuleList(CrossModalityLayer(c) for _ in range(c.num_layers))
        self.pooler = Pooler(c.dim, "tanh")
        init_weights(self)

    def forward(self, text, text_mask, image, image_mask, return_attention: bool = False) -> FusionOutput:
        text_mask, image_mask = self.check_inputs(text, text_mask, image, image_mask)
        maps = []
        for layer in self.text_encoder:
            text, m = layer(text, key_mask=text_mask, return_attention=return_attention)
            maps.append({"text_self": m["self"]})
        for layer in self.image_encoder:
            image, m = layer(image, key_mask=image_mask, return_attention=return_attention)
            maps.append({"image_self": m["self"]})
        for layer in self.cross_encoder:
            text, image, m = layer(text, text_mask, image, image_mask, return_attention)
            maps.append(m)
        return FusionOutput(text=text, image=image, pooled=self.pooler(text), attentions=maps)
