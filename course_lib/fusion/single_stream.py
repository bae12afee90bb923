"""Single-stream fusion (VisualBERT, UNITER, VL-BERT, Pixel-BERT): concatenate, one transformer.

Text and image tokens are joined into one sequence ``[text; image]`` and every layer's
self-attention is *merged attention*: each token attends to every token of both modalities.
A learned type (segment) embedding tells the two modalities apart; the text also gets a learned
position table. As in VisualBERT (Li et al. 2019, ``VisualBertEmbeddings``)::

    x_text  = text  + type[0] + pos[0..Lt)          x_image = image + type[1]
    h = BERT( LayerNorm([x_text; x_image]) )        pooled = tanh(W h[:, 0] + b)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from course_lib.fusion.base import FusionConfig, FusionModule, FusionOutput, Pooler, check_positive_int
from course_lib.nn import TransformerEncoder, init_weights


@dataclass(frozen=True)
class SingleStreamConfig(FusionConfig):
    max_text_len: int = 64  # rows of the text position table
    text_positions: bool = True  # False when the text extractor already added positions

    def __post_init__(self):
        super().__post_init__()
        check_positive_int("max_text_len", self.max_text_len)


class SingleStreamFusion(FusionModule):
    """``forward(text (B, Lt, D), text_mask, image (B, Li, D), image_mask)`` -> ``FusionOutput`` with
    ``text (B, Lt, D)``, ``image (B, Li, D)``, ``pooled (B, D)``, ``attentions[l]["self"] (B, H, L, L)``
    where ``L = Lt + Li``."""

    config_class = SingleStreamConfig

    def __init__(self, config: SingleStreamConfig | None = None, **overrides):
        super().__init__(config, **overrides)
        c = self.config
        self.type_embeddings = nn.Embedding(2, c.dim)  # 0 = text, 1 = image
        self.position_embeddings = nn.Embedding(c.max_text_len, c.dim) if c.text_positions else None
        self.embed_norm = nn.LayerNorm(c.dim, eps=c.layer_norm_eps)
        self.embed_dropout = nn.Dropout(c.dropout)
        self.encoder = TransformerEncoder(c.num_layers, c.dim, c.num_heads, c.mlp_ratio, c.dropout,
                                          layer_norm_eps=c.layer_norm_eps, activation=c.activation)
        self.pooler = Pooler(c.dim, "tanh")
        init_weights(self)

    def embed(self, text: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """``(B, Lt, D)``, ``(B, Li, D)`` -> the merged input ``(B, Lt + Li, D)``."""
        Lt = text.shape[1]
        text = text + self.type_embeddings.weight[0]
        if self.position_embeddings is not None:
            if Lt > self.config.max_text_len:
                raise ValueError(f"text has {Lt} tokens but the position table holds max_text_len="
                                 f"{self.config.max_text_len}; truncate the text or build with a larger max_text_len")
            text = text + self.position_embeddings.weight[:Lt]
        image = image + self.type_embeddings.weight[1]
        return self.embed_dropout(self.embed_norm(torch.cat([text, image], dim=1)))  # (B, Lt + Li, D)

    def forward(self, text, text_mask, image, image_mask, return_attention: bool = False) -> FusionOutput:
        text_mask, image_mask = self.check_inputs(text, text_mask, image, image_mask)
        Lt = text.shape[1]
        x = self.embed(text, image)  # (B, Lt + Li, D)
        mask = torch.cat([text_mask, image_mask], dim=1)  # (B, Lt + Li)
        h, maps = self.encoder(x, key_mask=mask, return_attention=return_attention)
        return FusionOutput(text=h[:, :Lt], image=h[:, Lt:], pooled=self.pooler(h),
                            attentions=[{"self": m["self"]} for m in maps])
