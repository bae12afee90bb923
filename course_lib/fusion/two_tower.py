"""Two-tower (CLIP, ALIGN; Radford et al. 2021): no fusion layer at all.

Each modality has its own encoder; they interact only through the dot product of their pooled,
projected embeddings (the contrastive loss lives in ``course_lib.objectives.itc``). The towers are
CLIP's (pre-LN transformers, LayerNorm eps 1e-5), and this module *is* the towers of
``course_lib.models.clip.CLIP``, which adds only the pixel and token embeddings and the loss:

- text: causal self-attention, final LayerNorm, the embedding read at the *last real token*
  (CLIP's end-of-text token), then ``text_projection`` (no bias);
- image: ``ln_pre``, self-attention, final LayerNorm, the embedding read at the *first token*
  (the class token of ``PatchEmbedding``), then ``image_projection`` (no bias). With
  ``image_layers=0`` and ``image_pool="mean"`` the image "tower" is only ``ln_pre``, a mean over the
  tokens and the projection (CLIP's ResNet variant pools a CNN's grid; ours: ``vision="cnn"``).

The image tower may be wider than the text tower (CLIP ViT-B/16: 768 vs 512): ``image_dim`` and
``image_heads`` (``None``: the text tower's ``dim`` and ``num_heads``).

``pooled`` is the pair ``(text_embedding (B, E), image_embedding (B, E))``, not normalised.
``grad_checkpointing = True`` recomputes each layer's activations in backward instead of storing
them (Chen et al. 2016; open_clip's ``--grad-checkpointing``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from course_lib.fusion.base import FusionConfig, FusionModule, FusionOutput, check_positive_int, last_real_index
from course_lib.nn import TransformerEncoder
from course_lib.utils import check_one_of


@dataclass(frozen=True)
class TwoTowerConfig(FusionConfig):
    layer_norm_eps: float = 1e-5  # CLIP's
    image_layers: int | None = None  # image tower depth (None: num_layers, the text tower's depth; 0: none)
    embed_dim: int | None = None  # joint embedding size (None: dim)
    causal_text: bool = True  # CLIP's text tower is causal
    image_dim: int | None = None  # image tower width (None: dim)
    image_heads: int | None = None  # image tower heads (None: num_heads)
    image_pool: str = "first"  # "first" (the class token) or "mean" (over the image tokens)

    def __post_init__(self):
        super().__post_init__()
        if self.image_layers is not None:
            check_positive_int("image_layers", self.image_layers, allow_zero=True)
        for name in ("embed_dim", "image_dim", "image_heads"):
            if getattr(self, name) is not None:
                check_positive_int(name, getattr(self, name))
        width, heads = self.image_dim or self.dim, self.image_heads or self.num_heads
        if width % heads:
            raise ValueError(f"image_dim={width} must be a multiple of image_heads={heads}")
        check_one_of("image_pool", self.image_pool, ("first", "mean"))


def run_encoder(encoder: nn.Module, x: torch.Tensor, key_mask: torch.Tensor | None,
                return_attention: bool = False, grad_checkpointing: bool = False):
    """``encoder(x, key_mask)`` -> ``(hidden (B, N, D), maps)``; with ``grad_checkpointing`` (while
    gradients are on and no attention map is asked for) each layer is recomputed in backward."""
    if isinstance(encoder, nn.Identity):
        return x, []
    if not (grad_checkpointing and torch.is_grad_enabled() and not return_attention):
        return encoder(x, key_mask=key_mask, return_attention=return_attention)
    for layer in encoder.layers:
        x, _ = checkpoint(layer, x, key_mask, use_reentrant=False)  # (B, N, D)
    return encoder.final_norm(x), []


class TwoTowerFusion(FusionModule):
    """``forward(text, text_mask, image, image_mask)`` -> ``FusionOutput`` with the towers' tokens
    ``text (B, Lt, D)``, ``image (B, Li, Di)``, ``pooled = (text_emb (B, E), image_emb (B, E))`` and
    ``{"text_self"}`` then ``{"image_self"}`` maps per layer."""

    config_class = TwoTowerConfig

    def __init__(self, config: TwoTowerConfig | None = None, **overrides):
        super().__init__(config, **overrides)
        c = self.config
        embed_dim = c.embed_dim or c.dim
        self.image_dim = c.image_dim or c.dim
        image_layers = c.num_layers if c.image_layers is None else c.image_layers
        self.grad_checkpointing = False
        common = dict(mlp_ratio=c.mlp_ratio, dropout=c.dropout, norm_first=True, layer_norm_eps=c.layer_norm_eps,
                      activation=c.activation)
        self.text_encoder = TransformerEncoder(c.num_layers, c.dim, c.num_heads, causal=c.causal_text, **common)
        self.text_projection = nn.Linear(c.dim, embed_dim, bias=False)
        self.image_pre_norm = nn.LayerNorm(self.image_dim, eps=c.layer_norm_eps)  # CLIP's ln_pre
        self.image_encoder = (TransformerEncoder(image_layers, self.image_dim, c.image_heads or c.num_heads, **common)
                              if image_layers else nn.Identity())
        self.image_projection = nn.Linear(self.image_dim, embed_dim, bias=False)

    def encode_text(self, text, text_mask, return_attention: bool = False):
        """``(B, Lt, D)``, bool ``(B, Lt)`` -> tokens ``(B, Lt, D)``, embedding ``(B, E)``, maps."""
        x, maps = run_encoder(self.text_encoder, text, text_mask, return_attention, self.grad_checkpointing)
        eot = x[torch.arange(len(x), device=x.device), last_real_index(text_mask)]  # (B, D)
        return x, self.text_projection(eot), maps

    def encode_image(self, image, image_mask, return_attention: bool = False):
        """``(B, Li, Di)``, bool ``(B, Li)`` or ``None`` -> tokens ``(B, Li, Di)``, embedding ``(B, E)``, maps."""
        x, maps = run_encoder(self.image_encoder, self.image_pre_norm(image), image_mask, return_attention,
                              self.grad_checkpointing)
        if self.config.image_pool == "first":
            pooled = x[:, 0]  # (B, Di)
        elif image_mask is None:
            pooled = x.mean(1)
        else:
            weights = image_mask.to(x.dtype).unsqueeze(-1)  # (B, Li, 1)
            pooled = (x * weights).sum(1) / weights.sum(1)
        return x, self.image_projection(pooled), maps

    def forward(self, text, text_mask, image, image_mask, return_attention: bool = False) -> FusionOutput:
        text_mask, image_mask = self.check_inputs(text, text_mask, image, image_mask)
        text, text_emb, text_maps = self.encode_text(text, text_mask, return_attention)
        image, image_emb, image_maps = self.encode_image(image, image_mask, return_attention)
        maps = [{"text_self": m["self"]} for m in text_maps] + [{"image_self": m["self"]} for m in image_maps]
        return FusionOutput(text=text, image=image, pooled=(text_emb, image_emb), attentions=maps)
