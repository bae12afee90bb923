"""Dual-stream co-attention (ViLBERT, Lu et al. 2019; 12-in-1).

Each modality keeps its own stream of transformer layers. They meet in *co-attention* blocks
(``BertConnectionLayer``): the text stream's queries attend to the image stream's keys and values,
and the image stream's queries to the text's, both computed from the streams' inputs at once::

    t' = LN(t + MHA_t(Q=t, K=V=v))        v' = LN(v + MHA_v(Q=v, K=V=t))      (no self-attention here)
    t'' = LN(t' + FFN_t(t'))              v'' = LN(v' + FFN_v(v'))

Each co-attention block is followed by one ordinary transformer layer per stream, and the text
stream may start with ``text_only_layers`` layers of its own (ViLBERT-base: 6 text layers first, then
6 x [co-attention, image layer, text layer]). The pooled output is ViLBERT's ``fusion_method="mul"``:
``ReLU(W_t t[:, 0]) * ReLU(W_v v[:, 0])``.

The two streams may have different widths (ViLBERT-base: text 768-d with 12 heads and a 3072-d
feed-forward, image 1024-d with 8 heads and a 1024-d feed-forward, co-attention in 1024 dimensions
with 8 heads, both pooled into 1024): ``image_dim``, ``image_heads``, ``image_mlp_ratio``, ``bi_dim``
and ``bi_heads`` (``None``: the text stream's). ``dim``, ``num_heads`` and ``mlp_ratio`` are the text
stream's; ``num_layers`` is the number of co-attention blocks (= image layers).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from course_lib.fusion.base import (CrossAttentionSublayer, FusionConfig, FusionModule, FusionOutput, Pooler,
                                    check_positive_int)
from course_lib.nn import FeedForward, TransformerLayer, init_weights


@dataclass(frozen=True)
class DualStreamConfig(FusionConfig):
    text_only_layers: int = 0  # text layers before the first co-attention block
    image_dim: int | None = None  # the image stream's width (None: dim)
    image_heads: int | None = None  # its heads (None: num_heads)
    image_mlp_ratio: float | None = None  # its feed-forward width / image_dim (None: mlp_ratio)
    bi_dim: int | None = None  # the co-attention's width, and the pooled output's (None: dim)
    bi_heads: int | None = None  # the co-attention's heads (None: num_heads)

    def __post_init__(self):
        super().__post_init__()
        check_positive_int("text_only_layers", self.text_only_layers, allow_zero=True)
        for name in ("image_dim", "image_heads", "bi_dim", "bi_heads"):
            if getattr(self, name) is not None:
                check_positive_int(name, getattr(self, name))
        for width, heads in (("image_dim", "image_heads"), ("bi_dim", "bi_heads")):
            w, h = getattr(self, width) or self.dim, getattr(self, heads) or self.num_heads
            if w % h:
                raise ValueError(f"{width}={w} must be a multiple of {heads}={h}")
        if self.image_mlp_ratio is not None and not self.image_mlp_ratio > 0:
            raise ValueError(f"image_mlp_ratio must be positive, got {self.image_mlp_ratio!r}")

    @property
    def sizes(self) -> tuple[int, int, float, int, int]:
        """``(image_dim, image_heads, image_mlp_ratio, bi_dim, bi_heads)`` with the defaults filled in."""
        return (self.image_dim or self.dim, self.image_heads or self.num_heads,
                self.image_mlp_ratio if self.image_mlp_ratio is not None else self.mlp_ratio,
                self.bi_dim or self.dim, self.bi_heads or self.num_heads)


class CoAttentionLayer(nn.Module):
    """ViLBERT's connection layer: cross-attention each way, then a feed-forward per stream (post-LN).

    ``forward(text (B, Lt, D), text_mask, image (B, Li, Dv), image_mask)`` ->
    ``(text, image, {"text_to_image": (B, H, Lt, Li), "image_to_text": (B, H, Li, Lt)})``. The attention
    runs in ``bi_dim`` with ``bi_heads`` heads (``BertBiAttention``); its output is projected back to each
    stream's width before the residual (``BertBiOutput``).
    """

    def __init__(self, c: FusionConfig):
        super().__init__()
        image_dim, _, image_mlp_ratio, bi_dim, bi_heads = (c.sizes if isinstance(c, DualStreamConfig)
                                                           else (c.dim, c.num_heads, c.mlp_ratio, c.dim, c.num_heads))
        self.text_to_image = CrossAttentionSublayer(c.dim, bi_heads, c.dropout, c.layer_norm_eps,
                                                    context_dim=image_dim, inner_dim=bi_dim)
        self.image_to_text = CrossAttentionSublayer(image_dim, bi_heads, c.dropout, c.layer_norm_eps,
                                                    context_dim=c.dim, inner_dim=bi_dim)
        self.text_mlp = FeedForward(c.dim, int(c.dim * c.mlp_ratio), c.dropout, c.activation)
        self.image_mlp = FeedForward(image_dim, int(image_dim * image_mlp_ratio), c.dropout, c.activation)
        self.text_norm = nn.LayerNorm(c.dim, eps=c.layer_norm_eps)
        self.image_norm = nn.LayerNorm(image_dim, eps=c.layer_norm_eps)

    def forward(self, text, text_mask, image, image_mask, return_attention: bool = False):
        # Both directions read the *inputs* of the block (not each other's outputs).
        new_text, t2i = self.text_to_image(text, image, image_mask, return_attention)  # (B, Lt, D)
        new_image, i2t = self.image_to_text(image, text, text_mask, return_attention)  # (B, Li, D)
        new_text = self.text_norm(new_text + self.text_mlp(new_text))
        new_image = self.image_norm(new_image + self.image_mlp(new_image))
        return new_text, new_image, {"text_to_image": t2i, "image_to_text": i2t}


class DualStreamFusion(FusionModule):
    """``forward(text, text_mask, image, image_mask)`` -> ``FusionOutput`` with ``text (B, Lt, D)``,
    ``image (B, Li, Dv)``, ``pooled (B, Db)`` (product of the two streams' pooled vectors) and per
    block ``{"text_to_image", "image_to_text", "text_self", "image_self"}`` maps (``Dv = image_dim``,
    ``Db = bi_dim``, both ``D`` by default)."""

    config_class = DualStreamConfig

    def __init__(self, config: DualStreamConfig | None = None, **overrides):
        super().__init__(config, **overrides)
        c = self.config
        image_dim, image_heads, image_mlp_ratio, bi_dim, _ = c.sizes
        self.image_dim, self.pooled_dim = image_dim, bi_dim

        def layer(dim, heads, mlp_ratio):
            return TransformerLayer(dim, heads, mlp_ratio, c.dropout, layer_norm_eps=c.layer_norm_eps,
                                    activation=c.activation)

        self.text_only = nn.ModuleList(layer(c.dim, c.num_heads, c.mlp_ratio) for _ in range(c.text_only_layers))
        self.co_attention = nn.ModuleList(CoAttentionLayer(c) for _ in range(c.num_layers))
        self.text_layers = nn.ModuleList(layer(c.dim, c.num_heads, c.mlp_ratio) for _ in range(c.num_layers))
        self.image_layers = nn.ModuleList(layer(image_dim, image_heads, image_mlp_ratio)
                                          for _ in range(c.num_layers))
        self.text_pooler = Pooler(c.dim, "relu", out_dim=bi_dim)
        self.image_pooler = Pooler(image_dim, "relu", out_dim=bi_dim)
        init_weights(self)

    def forward(self, text, text_mask, image, image_mask, return_attention: bool = False) -> FusionOutput:
        text_mask, image_mask = self.check_inputs(text, text_mask, image, image_mask)
        maps = []
        for layer in self.text_only:
            text, m = layer(text, key_mask=text_mask, return_attention=return_attention)
            maps.append({"text_self": m["self"]})
        for co, text_layer, image_layer in zip(self.co_attention, self.text_layers, self.image_layers):
            text, image, m = co(text, text_mask, image, image_mask, return_attention)
            image, image_maps = image_layer(image, key_mask=image_mask, return_attention=return_attention)
            text, text_maps = text_layer(text, key_mask=text_mask, return_attention=return_attention)
            maps.append({**m, "text_self": text_maps["self"], "image_self": image_maps["self"]})
        pooled = self.text_pooler(text) * self.image_pooler(image)  # (B, Db)
        return FusionOutput(text=text, image=image, pooled=pooled, attentions=maps)
