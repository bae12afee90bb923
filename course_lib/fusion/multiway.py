"""Multiway transformer / mixture of modality experts (VLMo, Bao et al. 2022; BEiT-3).

One sequence ``[text; image]`` (text first, as VLMo) with **shared self-attention**, but the
feed-forward is a per-modality *expert*: text tokens go through the text FFN, image tokens
through the image FFN. In the top ``vl_layers`` layers a third, vision-language expert takes
every token when both modalities are present. VLMo's block (pre-LN with layer scale ``gamma``,
init 0.1; ``vlmo/modules/multiway_transformer.py: Block``)::

    x = x + gamma_1 * Attn(LN_1(x))                    # shared by all tokens
    x_m = x_m + gamma_2 * FFN_m(LN_2m(x_m))            # m = text / image / vl expert

Type embeddings mark the modalities; ``pooled = tanh(W h[:, 0] + b)`` on the text [CLS].
The same weights also run as two towers (``encode(x, mask, "text" | "image")``): VLMo's
retrieval mode, where each modality uses its own expert in every layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from course_lib.fusion.base import FusionConfig, FusionModule, FusionOutput, Pooler, check_positive_int
from course_lib.nn import FeedForward, MultiHeadAttention, init_weights
from course_lib.utils import check_one_of, check_shape

MODALITIES = ("text", "image")


@dataclass(frozen=True)
class MultiwayConfig(FusionConfig):
    layer_norm_eps: float = 1e-6  # VLMo (timm)
    vl_layers: int = 0  # top layers with a vision-language expert (VLMo-base: 2 of 12)
    layer_scale: float = 0.1  # initial gamma (VLMo); 0: no layer scale

    def __post_init__(self):
        super().__post_init__()
        check_positive_int("vl_layers", self.vl_layers, allow_zero=True)
        if self.vl_layers > self.num_layers:
            raise ValueError(f"vl_layers={self.vl_layers} must be <= num_layers={self.num_layers}")
        if not self.layer_scale >= 0:
            raise ValueError(f"layer_scale must be >= 0 (0: no layer scale), got {self.layer_scale!r}")


class Expert(nn.Module):
    """A pre-LN feed-forward expert ``FFN(LN(x))``: ``(B, N, D) -> (B, N, D)``."""

    def __init__(self, c: FusionConfig):
        super().__init__()
        self.norm = nn.LayerNorm(c.dim, eps=c.layer_norm_eps)
        self.mlp = FeedForward(c.dim, int(c.dim * c.mlp_ratio), c.dropout, c.activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.norm(x))


class MultiwayLayer(nn.Module):
    """Shared self-attention, then the text / image (/ vision-language) expert.

    ``forward(x (B, L, D), key_mask (B, L), num_text)``: the first ``num_text`` tokens are text, the
    rest image (``num_text = L``: text only; ``0``: image only) -> ``(x, {"self": (B, H, L, L)})``.
    """

    def __init__(self, c: MultiwayConfig, with_vl_expert: bool):
        super().__init__()
        self.attn_norm = nn.LayerNorm(c.dim, eps=c.layer_norm_eps)
        self.attn = MultiHeadAttention(c.dim, c.num_heads, c.dropout)
        self.dropout = nn.Dropout(c.dropout)
        self.text_expert = Expert(c)
        self.image_expert = Expert(c)
        self.vl_expert = Expert(c) if with_vl_expert else None
        scale = c.layer_scale
        self.gamma_1 = nn.Parameter(torch.full((c.dim,), scale)) if scale else None
        self.gamma_2 = nn.Parameter(torch.full((c.dim,), scale)) if scale else None

    def _scaled(self, gamma, y):
        return y if gamma is None else gamma * y

    def forward(self, x, key_mask, num_text: int, return_attention: bool = False):
        out, attn = self.attn(self.attn_norm(x), key_mask=key_mask, return_attention=return_attention)
        x = x + self._scaled(self.gamma_1, self.dropout(out))
        L = x.shape[1]
        if self.vl_expert is not None and 0 < num_text < L:
            y = self.vl_expert(x)  # both modalities present: the vision-language expert takes all tokens
        else:
            y = torch.cat([self.text_expert(x[:, :num_text]), self.image_expert(x[:, num_text:])], dim=1)
        return x + self._scaled(self.gamma_2, y), {"self": attn}


class MultiwayFusion(FusionModule):
    """``forward(text, text_mask, image, image_mask)`` -> ``FusionOutput`` with ``text (B, Lt, D)``,
    ``image (B, Li, D)``, ``pooled (B, D)``, ``attentions[l]["self"] (B, H, Lt + Li, Lt + Li)``."""

    config_class = MultiwayConfig

    def __init__(self, config: MultiwayConfig | None = None, **overrides):
        super().__init__(config, **overrides)
        c = self.config
        self.type_embeddings = nn.Embedding(2, c.dim)  # 0 = text, 1 = image
        self.layers = nn.ModuleList(MultiwayLayer(c, with_vl_expert=i >= c.num_layers - c.vl_layers)
                                    for i in range(c.num_layers))
        self.final_norm = nn.LayerNorm(c.dim, eps=c.layer_norm_eps)
        self.pooler = Pooler(c.dim, "tanh")
        init_weights(self)  # leaves the layer-scale gammas at their initial value

    def _run(self, x, mask, num_text: int, return_attention: bool):
        maps = []
        for layer in self.layers:
            x, m = layer(x, mask, num_text, return_attention)
            maps.append(m)
        return self.final_norm(x), maps

    def encode(self, x: torch.Tensor, mask: torch.Tensor | None, modality: str, return_attention: bool = False):
        """One modality alone (VLMo as two towers): ``(B, L, D)``, ``(B, L)`` -> ``(B, L, D)``, maps."""
        check_one_of("modality", modality, MODALITIES)
        check_shape("x", x, (None, None, self.dim))
        mask = self._check_mask("mask", mask, x.shape[0], x.shape[1], x.device)
        x = x + self.type_embeddings.weight[MODALITIES.index(modality)]
        num_text = x.shape[1] if modality == "text" else 0
        return self._run(x, mask, num_text, return_attention)

    def forward(self, text, text_mask, image, image_mask, return_attention: bool = False) -> FusionOutput:
        text_mask, image_mask = self.check_inputs(text, text_mask, image, image_mask)
        Lt = text.shape[1]
        x = torch.cat([text + self.type_embeddings.weight[0], image + self.type_embeddings.weight[1]], dim=1)
        h, maps = self._run(x, torch.cat([text_mask, image_mask], dim=1), Lt, return_attention)
        return FusionOutput(text=h[:, :Lt], image=h[:, Lt:], pooled=self.pooler(h), attentions=maps)
