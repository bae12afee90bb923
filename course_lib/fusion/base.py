"""What every fusion style shares: its config fields, its output record, input checks, and the
small sub-blocks several styles reuse (a pooler, a residual cross-attention, an image encoder).

The common interface (see ``course_lib.fusion.registry`` for the list of styles)::

    style = build_fusion("single_stream", dim=64, num_heads=4, num_layers=2)
    out = style(text, text_mask, image, image_mask, return_attention=False)   # -> FusionOutput

``text (B, Lt, D)`` and ``image (B, Li, D)`` are already-embedded token sequences (any text or image
extractor); the masks are ``(B, Lt)`` / ``(B, Li)`` with True/1 for a real token (``None``: all real).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from course_lib.nn import ACTIVATIONS, MultiHeadAttention, TransformerEncoder
from course_lib.presets import apply_overrides
from course_lib.utils import check_shape, count_parameters


@dataclass(frozen=True)
class FusionConfig:
    """Sizes every fusion style has. ``num_layers`` is the depth of each stack the style builds
    (a style with several stacks, e.g. LXMERT, can set them one by one)."""

    dim: int = 64
    num_heads: int = 4
    num_layers: int = 2
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    layer_norm_eps: float = 1e-12
    activation: str = "gelu"

    def __post_init__(self):
        for name in ("dim", "num_heads", "num_layers"):
            check_positive_int(name, getattr(self, name))
        if self.dim % self.num_heads:
            raise ValueError(f"dim={self.dim} must be a multiple of num_heads={self.num_heads}")
        if not self.mlp_ratio > 0:
            raise ValueError(f"mlp_ratio must be positive, got {self.mlp_ratio!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if not self.layer_norm_eps > 0:
            raise ValueError(f"layer_norm_eps must be positive, got {self.layer_norm_eps!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation={self.activation!r} is not valid; expected one of {list(ACTIVATIONS)}")


def check_positive_int(name: str, value, allow_zero: bool = False) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` is an int >= 1 (>= 0 with ``allow_zero``)."""
    low = 0 if allow_zero else 1
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


@dataclass
class FusionOutput:
    """What a fusion style returns.

    - ``text (B, Lt, D)`` / ``image (B, Li, D)``: contextualised tokens (``None`` where the style has none);
    - ``pooled``: the joint ``(B, D)`` summary ([CLS]-like); for two-tower the pair
      ``(text_embedding (B, E), image_embedding (B, E))``;
    - ``attentions``: one dict per layer, in the order the layers run, e.g. ``{"self": (B, H, L, L)}``
      or ``{"text_to_image": (B, H, Lt, Li), ...}``; the values are ``None`` unless
      ``return_attention=True``;
    - ``extras``: style-specific tensors (UNIMO's unimodal streams, for example).
    """

    text: torch.Tensor | None
    image: torch.Tensor | None
    pooled: torch.Tensor | tuple[torch.Tensor, torch.Tensor]
    attentions: list[dict]
    extras: dict[str, torch.Tensor] = field(default_factory=dict)


class FusionModule(nn.Module):
    """Base class: resolves the config, checks the four inputs, reports parameters and FLOPs."""

    config_class = FusionConfig

    def __init__(self, config: FusionConfig | None = None, **overrides):
        super().__init__()
        if config is None:
            config = self.config_class()
        if not isinstance(config, self.config_class):
            raise ValueError(f"config must be a {self.config_class.__name__}, got {type(config).__name__}")
        self.config = apply_overrides(config, overrides)
        self.dim = self.config.dim
        self.image_dim = self.dim  # the image tokens' width (two-tower's image tower may be wider)

    # ------------------------------------------------------------------ inputs

    def check_inputs(self, text, text_mask, image, image_mask) -> tuple[torch.Tensor, torch.Tensor]:
        """Validate shapes; return boolean masks ``(B, Lt)`` and ``(B, Li)`` (all True when ``None``)."""
        D = self.dim
        check_shape("text", text, (None, None, D))
        B, Lt, _ = text.shape
        check_shape("image", image, (B, None, self.image_dim))
        Li = image.shape[1]
        for name, x in (("text", text), ("image", image)):
            if not x.is_floating_point():
                raise ValueError(f"{name} must be a floating-point tensor of embeddings, got dtype {x.dtype}")
            if x.shape[1] == 0:
                raise ValueError(f"{name} must hold at least one token, got shape {tuple(x.shape)}")
        text_mask = self._check_mask("text_mask", text_mask, B, Lt, text.device)
        image_mask = self._check_mask("image_mask", image_mask, B, Li, image.device)
        return text_mask, image_mask

    @staticmethod
    def _check_mask(name: str, mask, B: int, L: int, device) -> torch.Tensor:
        if mask is None:
            return torch.ones(B, L, dtype=torch.bool, device=device)
        check_shape(name, mask, (B, L))
        if mask.dtype != torch.bool:
            if mask.device.type == "cpu" and not ((mask == 0) | (mask == 1)).all():
                raise ValueError(f"{name} must hold 0/1 (or bool) values, 1 for a real token")
            mask = mask.bool()
        if mask.device.type == "cpu":
            empty = (~mask.any(dim=1)).nonzero().flatten()
            if len(empty):
                raise ValueError(f"{name} row {int(empty[0])} has no real token; every sequence needs at "
                                 "least one (its [CLS])")
        return mask

    # ------------------------------------------------------------------ reports

    def num_parameters(self) -> int:
        """Number of parameters of this fusion module (input extractors not included)."""
        return count_parameters(self)

    def example_inputs(self, batch_size: int = 1, text_len: int = 16, image_len: int = 65,
                       generator: torch.Generator | None = None) -> tuple[torch.Tensor, ...]:
        """Random ``(text (B, Lt, D), text_mask (B, Lt), image (B, Li, D), image_mask (B, Li))``, no padding."""
        for name, value in (("batch_size", batch_size), ("text_len", text_len), ("image_len", image_len)):
            check_positive_int(name, value)
        device = next(self.parameters()).device
        text = torch.randn(batch_size, text_len, self.dim, generator=generator).to(device)
        image = torch.randn(batch_size, image_len, self.image_dim, generator=generator).to(device)
        text_mask = torch.ones(batch_size, text_len, dtype=torch.bool, device=device)
        image_mask = torch.ones(batch_size, image_len, dtype=torch.bool, device=device)
        return text, text_mask, image, image_mask

    def flops(self, batch_size: int = 1, text_len: int = 16, image_len: int = 65) -> int:
        """Forward FLOPs (matrix products, 2 per multiply-add) for inputs of the given size."""
        from course_lib.fusion.flops import count_flops

        return count_flops(self, *self.example_inputs(batch_size, text_len, image_len))


# ---------------------------------------------------------------------- shared sub-blocks


class Pooler(nn.Module):
    """``act(dense(x[:, index]))``: BERT's pooler (tanh) or ViLBERT/UNIMO's (ReLU). ``(B, L, D) -> (B, Do)``,
    ``Do = out_dim`` (default ``D``; ViLBERT pools both streams into its co-attention width)."""

    def __init__(self, dim: int, activation: str = "tanh", out_dim: int | None = None):
        super().__init__()
        acts = {"tanh": nn.Tanh, "relu": nn.ReLU}
        if activation not in acts:
            raise ValueError(f"activation={activation!r} is not valid; expected one of {list(acts)}")
        self.dense = nn.Linear(dim, out_dim or dim)
        self.act = acts[activation]()

    def forward(self, x: torch.Tensor, index: int = 0) -> torch.Tensor:
        return self.act(self.dense(x[:, index]))  # (B, D)


class CrossAttentionSublayer(nn.Module):
    """Post-LN residual cross-attention: ``LN(x + dropout(MHA(x, context)))``, BERT's
    ``BertAttention`` used across streams (ViLBERT's ``BertBiAttention`` half, LXMERT's
    ``BertCrossattLayer``). ``x (B, N, D)``, ``context (B, Nc, Dc)`` -> ``(B, N, D)``, map ``(B, H, N, Nc)``.
    ``context_dim`` (``Dc``, default ``D``) and ``inner_dim`` (the attention's width, default ``D``) let
    two streams of different widths meet (ViLBERT: ``bi_hidden_size`` 1024 between 768 and 1024)."""

    def __init__(self, dim: int, num_heads: int, dropout: float = 0.0, layer_norm_eps: float = 1e-12,
                 context_dim: int | None = None, inner_dim: int | None = None):
        super().__init__()
        self.attn = MultiHeadAttention(inner_dim or dim, num_heads, dropout, context_dim=context_dim or dim,
                                       query_dim=dim)
        self.norm = nn.LayerNorm(dim, eps=layer_norm_eps)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x, context, context_mask=None, return_attention: bool = False):
        out, attn = self.attn(x, context, key_mask=context_mask, return_attention=return_attention)
        return self.norm(x + self.dropout(out)), attn


def last_real_index(mask: torch.Tensor) -> torch.Tensor:
    """Index ``(B,)`` of the last True in each row of ``mask (B, L)`` (CLIP's end-of-text position)."""
    L = mask.shape[1]
    return L - 1 - mask.flip(1).int().argmax(dim=1)


def build_image_encoder(config: FusionConfig, num_layers: int, layer_norm_eps: float) -> nn.Module:
    """A pre-LN ViT stack over the image tokens (ALBEF/BLIP's image encoder), or ``Identity`` for 0 layers."""
    if num_layers == 0:
        return nn.Identity()
    c = config
    return TransformerEncoder(num_layers, c.dim, c.num_heads, c.mlp_ratio, c.dropout, norm_first=True,
                              layer_norm_eps=layer_norm_eps, activation=c.activation)


def run_image_encoder(encoder: nn.Module, image, image_mask, return_attention: bool):
    """Apply ``build_image_encoder``'s module: ``(B, Li, D)`` -> ``(B, Li, D)`` and its per-layer maps."""
    if isinstance(encoder, nn.Identity):
        return image, []
    image, maps = encoder(image, key_mask=image_mask, return_attention=return_attention)
    return image, [{"image_self": m["self"]} for m in maps]
