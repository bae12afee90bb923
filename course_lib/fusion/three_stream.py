"""Three-stream unified-modal encoder (UNIMO, Li et al. 2021).

One transformer (post-LN, BERT-like) whose weights serve three streams: text alone, image alone,
and the pair. UNIMO trains on text-only corpora, image-only collections and image-text pairs with
the same encoder, and its cross-modal contrastive loss compares the *unimodal* streams' pooled
vectors. As in UNIMO's ``_gen_input``, each modality gets its own input LayerNorm, there is no
type embedding, and the joint sequence puts the image first: ``[image; text]``.

Pooling follows UNIMO: ``text_pooled = ReLU(W_t h_text[:, 0])``, ``image_pooled = ReLU(W_v h_image[:, 0])``,
and the joint summary is their product (``get_match_output(mode="mul")``) taken on the joint stream.
The unimodal streams are in ``extras``: ``text_only (B, Lt, D)``, ``image_only (B, Li, D)``,
``text_pooled (B, D)``, ``image_pooled (B, D)``.
"""

from __future__ import annotations

import torch
from torch import nn

from course_lib.fusion.base import FusionConfig, FusionModule, FusionOutput, Pooler
from course_lib.nn import TransformerEncoder, init_weights


class ThreeStreamFusion(FusionModule):
    """``forward(text, text_mask, image, image_mask)`` -> ``FusionOutput`` with the joint stream's
    ``text (B, Lt, D)`` and ``image (B, Li, D)``, ``pooled (B, D)``, the unimodal streams in ``extras``
    and per layer ``{"joint": (B, H, Li + Lt, Li + Lt), "text_self": ..., "image_self": ...}``."""

    config_class = FusionConfig

    def __init__(self, config: FusionConfig | None = None, **overrides):
        super().__init__(config, **overrides)
        c = self.config
        self.text_norm = nn.LayerNorm(c.dim, eps=c.layer_norm_eps)
        self.image_norm = nn.LayerNorm(c.dim, eps=c.layer_norm_eps)
        self.encoder = TransformerEncoder(c.num_layers, c.dim, c.num_heads, c.mlp_ratio, c.dropout,
                                          layer_norm_eps=c.layer_norm_eps, activation=c.activation)
        self.text_pooler = Pooler(c.dim, "relu")
        self.image_pooler = Pooler(c.dim, "relu")
        init_weights(self)

    def forward(self, text, text_mask, image, image_mask, return_attention: bool = False) -> FusionOutput:
        text_mask, image_mask = self.check_inputs(text, text_mask, image, image_mask)
        Li = image.shape[1]
        text, image = self.text_norm(text), self.image_norm(image)
        joint, joint_maps = self.encoder(torch.cat([image, text], dim=1), torch.cat([image_mask, text_mask], dim=1),
                                         return_attention=return_attention)
        text_only, text_maps = self.encoder(text, text_mask, return_attention=return_attention)
        image_only, image_maps = self.encoder(image, image_mask, return_attention=return_attention)
        joint_text, joint_image = joint[:, Li:], joint[:, :Li]
        maps = [{"joint": j["self"], "text_self": t["self"], "image_self": i["self"]}
                for j, t, i in zip(joint_maps, text_maps, image_maps)]
        extras = {"text_only": text_only, "image_only": image_only,
                  "text_pooled": self.text_pooler(text_only), "image_pooled": self.image_pooler(image_only)}
        pooled = self.text_pooler(joint_text) * self.image_pooler(joint_image)  # (B, D)
        return FusionOutput(text=joint_text, image=joint_image, pooled=pooled, attentions=maps, extras=extras)
