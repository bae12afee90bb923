"""CLIP (Radford et al., 2021, "Learning Transferable Visual Models From Natural Language Supervision").

The figure of the paper, in code:
- features: a patch ViT (or a small CNN) for images, a causal text transformer for captions;
- fusion: none; two towers meet only in the dot product of their L2-normalised embeddings;
- objective: symmetric InfoNCE over the (B, B) similarity matrix with a learnable temperature
  (``course_lib.objectives.itc.ContrastiveLoss``), clamped at 100 after each step.

The text tower is CLIP's: causal self-attention, the sentence embedding read at the end-of-text
token (our ``[SEP]``, the last real token), then a linear projection.

For pretraining at scale (``course_lib.pretrain``): ``set_grad_checkpointing()`` recomputes each
transformer layer's activations during backward instead of storing them (less memory, about
one more forward of compute), and ``forward(batch, embeddings_only=True)`` +
``loss_from_embeddings`` let the training loop accumulate gradients over micro-batches while
keeping the contrastive loss of the whole global batch (open_clip's ``--accum-freq``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.utils.checkpoint import checkpoint

from course_lib.features.cnn import SmallCNN
from course_lib.features.patch import PatchEmbedding
from course_lib.nn import TransformerEncoder
from course_lib.objectives.itc import ContrastiveLoss
from course_lib.presets import apply_overrides, get_preset
from course_lib.utils import check_one_of, check_shape


@dataclass(frozen=True)
class CLIPConfig:
    vocab_size: int = 256
    image_size: int = 32
    patch_size: int = 4
    vision: str = "vit"  # "vit" (patches) or "cnn" (grid features, pooled)
    vision_width: int = 64
    vision_layers: int = 2
    vision_heads: int = 4
    text_width: int = 64
    text_layers: int = 2
    text_heads: int = 4
    context_length: int = 32
    embed_dim: int = 64
    mlp_ratio: float = 4.0
    init_temperature: float = 0.07
    dropout: float = 0.0

    def __post_init__(self):
        check_one_of("vision", self.vision, ("vit", "cnn"))

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "CLIPConfig":
        size = get_preset(name)
        base = cls(**{k: getattr(size, k) for k in (
            "image_size", "patch_size", "vision_width", "vision_layers", "vision_heads", "text_width",
            "text_layers", "text_heads", "context_length", "embed_dim", "mlp_ratio")})
        return apply_overrides(base, overrides)


def run_encoder(encoder: TransformerEncoder, x: torch.Tensor, key_mask: torch.Tensor | None = None,
                return_attention: bool = False, grad_checkpointing: bool = False):
    """``encoder(x, key_mask)`` -> ``(hidden (B, N, D), maps)``; with ``grad_checkpointing`` (while
    gradients are on and no attention map is asked for) each layer's activations are recomputed
    in backward instead of stored (Chen et al. 2016, "Training Deep Nets with Sublinear Memory Cost")."""
    if not (grad_checkpointing and torch.is_grad_enabled() and not return_attention):
        return encoder(x, key_mask=key_mask, return_attention=return_attention)
    for layer in encoder.layers:
        x, _ = checkpoint(layer, x, key_mask, use_reentrant=False)  # (B, N, D)
    return encoder.final_norm(x), []


class VisionTower(nn.Module):
    """Images (B, 3, H, W) -> tokens (B, N, D) and a pooled embedding (B, embed_dim)."""

    def __init__(self, c: CLIPConfig):
        super().__init__()
        self.kind = c.vision
        self.grad_checkpointing = False  # recompute the ViT layers in backward (``CLIP.set_grad_checkpointing``)
        if c.vision == "vit":
            self.embed = PatchEmbedding(c.image_size, c.patch_size, c.vision_width)
            self.pre_norm = nn.LayerNorm(c.vision_width)  # CLIP's ln_pre
            self.encoder = TransformerEncoder(c.vision_layers, c.vision_width, c.vision_heads, c.mlp_ratio,
                                              c.dropout, norm_first=True, layer_norm_eps=1e-5)
        else:
            self.cnn = SmallCNN(channels=(32, 64, c.vision_width))
        self.proj = nn.Linear(c.vision_width, c.embed_dim, bias=False)

    def forward(self, images: torch.Tensor, return_attention: bool = False):
        if self.kind == "cnn":
            grid = self.cnn(images).flatten(2).transpose(1, 2)  # (B, h*w, D)
            return grid, self.proj(grid.mean(1)), []
        x = self.pre_norm(self.embed(images))  # (B, 1 + N, D)
        x, maps = run_encoder(self.encoder, x, None, return_attention, self.grad_checkpointing)
        return x, self.proj(x[:, 0]), maps  # pooled at the class token


class TextTower(nn.Module):
    """Token ids (B, L) + mask (B, L) -> tokens (B, L, D) and a pooled embedding (B, embed_dim)."""

    def __init__(self, c: CLIPConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(c.vocab_size, c.text_width)
        self.position_embedding = nn.Parameter(0.01 * torch.randn(c.context_length, c.text_width))
        self.encoder = TransformerEncoder(c.text_layers, c.text_width, c.text_heads, c.mlp_ratio, c.dropout,
                                          causal=True, norm_first=True, layer_norm_eps=1e-5)
        self.proj = nn.Linear(c.text_width, c.embed_dim, bias=False)
        self.context_length = c.context_length
        self.grad_checkpointing = False  # recompute the layers in backward (``CLIP.set_grad_checkpointing``)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, return_attention: bool = False):
        check_shape("input_ids", input_ids, (None, None))
        check_shape("attention_mask", attention_mask, tuple(input_ids.shape))
        length = input_ids.shape[1]
        if length > self.context_length:
            raise ValueError(f"input_ids has {length} tokens; the context length is {self.context_length}")
        x = self.token_embedding(input_ids) + self.position_embedding[:length]  # (B, L, D)
        x, maps = run_encoder(self.encoder, x, attention_mask.bool(), return_attention, self.grad_checkpointing)
        last = attention_mask.sum(1).long() - 1  # index of [SEP], CLIP's end-of-text token
        # The row index is made on x's device: a CPU index tensor would be copied to the GPU with a
        # blocking copy, a host-device synchronisation inside every training step.
        pooled = x[torch.arange(len(x), device=x.device), last]  # (B, D)
        return x, self.proj(pooled), maps


class CLIP(nn.Module):
    """``forward(batch)`` with ``images``, ``input_ids``, ``attention_mask`` -> ``{"loss", "temperature"}``.

    ``forward(batch, embeddings_only=True)`` -> ``{"image_emb": (B, E), "text_emb": (B, E)}``
    (L2-normalised), to be scored by ``loss_from_embeddings``.
    """

    def __init__(self, config: CLIPConfig):
        super().__init__()
        self.config = config
        self.visual = VisionTower(config)
        self.text = TextTower(config)
        self.itc = ContrastiveLoss(init_temperature=config.init_temperature)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, embed_dim), L2-normalised."""
        return F.normalize(self.visual(images)[1], dim=-1)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, L), (B, L) -> (B, embed_dim), L2-normalised."""
        return F.normalize(self.text(input_ids, attention_mask)[1], dim=-1)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing in both towers' transformer layers (open_clip's name)."""
        if not isinstance(enable, bool):
            raise ValueError(f"enable must be True or False, got {enable!r}")
        self.visual.grad_checkpointing = enable
        self.text.grad_checkpointing = enable

    def forward(self, batch: dict, embeddings_only: bool = False) -> dict:
        if self.training:
            self.itc.clamp_()  # CLIP clamps 1/temperature at 100 after every step; before each is the same
        image_emb = self.encode_image(batch["images"])
        text_emb = self.encode_text(batch["input_ids"], batch["attention_mask"])
        if embeddings_only:
            return {"image_emb": image_emb, "text_emb": text_emb}
        return self.loss_from_embeddings(image_emb, text_emb)

    def loss_from_embeddings(self, image_emb: torch.Tensor, text_emb: torch.Tensor,
                             learn_temperature: bool = True) -> dict:
        """ITC loss of ``image_emb (B, E)`` against ``text_emb (B, E)`` -> ``{"loss", "temperature"}``.

        ``learn_temperature=False`` scores with a detached temperature: gradient accumulation
        over k micro-batches evaluates the global-batch loss k times and must differentiate it
        with respect to the temperature once only.
        """
        if learn_temperature:
            loss = self.itc(image_emb, text_emb)
        else:
            loss = functional_call(self.itc, {"logit_scale": self.itc.logit_scale.detach()}, (image_emb, text_emb))
        # A tensor, not a float: reading it needs no host-device sync (and no graph break).
        return {"loss": loss, "temperature": self.itc.logit_scale.detach().neg().exp()}

    @torch.no_grad()
    def similarity(self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   batch_size: int = 256) -> torch.Tensor:
        """Cosine similarity (N_images, N_texts), encoded in chunks of ``batch_size``."""
        img = torch.cat([self.encode_image(images[i:i + batch_size]) for i in range(0, len(images), batch_size)])
        txt = torch.cat([self.encode_text(input_ids[i:i + batch_size], attention_mask[i:i + batch_size])
                         for i in range(0, len(input_ids), batch_size)])
        return img @ txt.T
