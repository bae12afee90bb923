"""Two-tower (CLIP, ALIGN; Radford et al. 2021): no fusion layer at all.

Each modality has its own encoder; they interact only through the dot product of their pooled,
projected embeddings (the contrastive loss lives in ``course_lib.objectives.itc``). The towers are
CLIP's, the same stacks as ``course_lib.models.clip`` (pre-LN transformers, LayerNorm eps 1e-5):

- text: causal self-attention, final LayerNorm, the embedding read at the *last real token*
  (CLIP's end-of-text token), then ``text_projection`` (no bias);
- image: ``ln_pre``, self-attention, final LayerNorm, the embedding read at the *first token*
  (the class token of ``PatchEmbedding``), then ``image_projection`` (no bias).

``pooled`` is the pair ``(text_embedding (B, E), image_embedding (B, E))``, not normalised.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from course_lib.fusion.base import FusionConfig, FusionModule, FusionOutput, check_positive_int, last_real_index
from course_lib.nn import TransformerEncoder


@dataclass(frozen=True)
class TwoTowerConfig(FusionConfig):
    layer_norm_eps: float = 1e-5  # CLIP's
    image_layers: int | None = None  # image tower depth (None: num_layers, the text tower's depth)
    embed_dim: int | None = None  # joint embedding size (None: dim)
    causal_text: bool = True  # CLIP's text tower is causal

    def __post_init__(self):
        super().__post_init__()
        if self.image_layers is not None:
            check_positive_int("image_layers", self.image_layers)
        if self.embed_dim is not None:
            check_positive_int("embed_dim", self.embed_dim)


class TwoTowerFusion(FusionModule):
    """``forward(text, text_mask, image, image_mask)`` -> ``FusionOutput`` with the towers' tokens
    ``text (B, Lt, D)``, ``image (B, Li, D)``, ``pooled = (text_emb (B, E), image_emb (B, E))`` and
    ``{"text_self"}`` then ``{"image_self"}`` maps per layer."""

    config_class = TwoTowerConfig

    def __init__(self, config: TwoTowerConfig | None = None, **overrides):
        super().__init__(config, **overrides)
        c = self.config
        embed_dim = c.embed_dim or c.dim
        common = dict(dim=c.dim, num_heads=c.num_heads, mlp_ratio=c.mlp_ratio, dropout=c.dropout,
                      norm_first=True, layer_norm_eps=c.layer_norm_eps, activation=c.activation)
        self.text_encoder = TransformerEncoder(c.num_layers, causal=c.causal_text, **common)
        self.text_projection = nn.Linear(c.dim, embed_dim, bias=False)
        self.image_pre_norm = nn.LayerNorm(c.dim, eps=c.layer_norm_eps)  # CLIP's ln_pre
        self.image_encoder = TransformerEncoder(c.image_layers or c.num_layers, **common)
        self.image_projection = nn.Linear(c.dim, embed_dim, bias=False)

    def encode_text(self, text, text_mask, return_attention: bool = False):
        """``(B, Lt, D)``, bool ``(B, Lt)`` -> tokens ``(B, Lt, D)``, embedding ``(B, E)``, maps."""
        x, maps = self.text_encoder(text, key_mask=text_mask, return_attention=return_attention)
        eot = x[torch.arange(len(x), device=x.device), last_real_index(text_mask)]  # (B, D)
        return x, self.text_projection(eot), maps

    def encode_image(self, image, image_mask, return_attention: bool = False):
        """``(B, Li, D)``, bool ``(B, Li)`` -> tokens ``(B, Li, D)``, embedding ``(B, E)``, maps."""
        x, maps = self.image_encoder(self.image_pre_norm(image), key_mask=image_mask,
                                     return_attention=return_attention)
        return x, self.image_projection(x[:, 0]), maps

    def forward(self, text, text_mask, image, image_mask, return_attention: bool = False) -> FusionOutput:
        text_mask, image_mask = self.check_inputs(text, text_mask, image, image_mask)
        text, text_emb, text_maps = self.encode_text(text, text_mask, return_attention)
        image, image_emb, image_maps = self.encode_image(image, image_mask, return_attention)
        maps = [{"text_self": m["self"]} for m in text_maps] + [{"image_self": m["self"]} for m in image_maps]
        return FusionOutput(text=text, image=image, pooled=(text_emb, image_emb), attentions=maps)
