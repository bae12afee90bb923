"""Attention and transformer blocks shared by every model of the course.

Mask convention everywhere: ``key_mask`` is ``(B, Nk)`` with True/1 for a real token and False/0 for
padding (like Hugging Face's ``attention_mask``). A per-sample ``attn_mask`` ``(B, Nq, Nk)`` bool, True
where query i may attend to key j, says *who sees whom* beyond padding (Unified VLP's seq2seq and
bidirectional masks, chosen per sample; ``course_lib.fusion.attention_masks``); it is combined with
``key_mask`` and ``causal`` by AND. Attention uses the fused
``F.scaled_dot_product_attention`` unless the caller asks for the attention map, then the readable
``softmax(Q K^T / sqrt(d)) V`` path; both give the same numbers (tested).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from course_lib.utils import check_one_of, check_shape


class MultiHeadAttention(nn.Module):
    r"""Multi-head (self- or cross-) attention, Vaswani et al. 2017.

    .. math:: \mathrm{head}_h = \mathrm{softmax}\!\left(Q_h K_h^\top / \sqrt{d_h}\right) V_h,
              \qquad \mathrm{out} = [\mathrm{head}_1; \dots; \mathrm{head}_H]\, W_O

    Queries come from ``x (B, Nq, D)``; keys and values from ``context (B, Nk, Dc)`` (cross-attention)
    or from ``x`` itself. ``dropout`` is applied to the attention probabilities. ``query_dim``: the width
    ``Dq`` of ``x`` when it differs from the attention's inner width ``dim`` (ViLBERT's co-attention:
    768-d words attend to 1024-d regions in 1024 dimensions); the output is mapped back to ``Dq``.
    """

    def __init__(self, dim: int, num_heads: int, dropout: float = 0.0, context_dim: int | None = None,
                 bias: bool = True, query_dim: int | None = None):
        super().__init__()
        if dim < 1 or num_heads < 1 or dim % num_heads:
            raise ValueError(f"dim={dim} must be a positive multiple of num_heads={num_heads}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.context_dim = context_dim or dim
        self.query_dim = query_dim or dim
        self.dropout = dropout
        self.query = nn.Linear(self.query_dim, dim, bias=bias)
        self.key = nn.Linear(self.context_dim, dim, bias=bias)
        self.value = nn.Linear(self.context_dim, dim, bias=bias)
        self.out = nn.Linear(dim, self.query_dim, bias=bias)

    def _project(self, x: torch.Tensor, context: torch.Tensor):
        """``(query(x), key(context), value(context))``, each ``(B, N, D)``, in as few matrix products
        as possible: self-attention (``context is x``) multiplies by ``[W_q; W_k; W_v]`` once (one read
        of ``x``, one GEMM three times as wide: what ``nn.MultiheadAttention``'s ``in_proj`` and
        open_clip do), cross-attention by ``W_q`` and ``[W_k; W_v]``. The parameters keep their names
        (``query``, ``key``, ``value``), so state dicts load as before; the outputs are views."""
        layers = (self.query, self.key, self.value) if context is x else (self.key, self.value)
        weight = torch.cat([layer.weight for layer in layers])  # (n * D, Din)
        bias = None if self.query.bias is None else torch.cat([layer.bias for layer in layers])
        fused = F.linear(context, weight, bias).split(self.dim, dim=-1)  # n x (B, N, D)
        return tuple(fused) if context is x else (self.query(x), *fused)

    def _split_heads(self, t: torch.Tensor) -> torch.Tensor:
        B, N, _ = t.shape
        return t.view(B, N, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, N, hd)

    def _allowed(self, key_mask, causal: bool, Nq: int, Nk: int, device, attn_mask=None) -> torch.Tensor | None:
        """Boolean ``(B, 1, Nq, Nk)`` (or ``(Nq, Nk)``) mask, True where a query may attend to a key."""
        allowed = None
        if key_mask is not None:
            allowed = key_mask.bool()[:, None, None, :]  # (B, 1, 1, Nk)
        if causal:
            future_ok = torch.ones(Nq, Nk, dtype=torch.bool, device=device).tril()  # (Nq, Nk)
            allowed = future_ok if allowed is None else allowed & future_ok  # (B, 1, Nq, Nk)
        if attn_mask is not None:
            per_sample = attn_mask[:, None]  # (B, 1, Nq, Nk), the same for every head
            allowed = per_sample if allowed is None else allowed & per_sample
        return allowed

    def forward(self, x, context=None, key_mask=None, causal: bool = False, return_attention: bool = False,
                attn_mask=None):
        """``x (B, Nq, D)``, ``context (B, Nk, Dc) | None``, ``key_mask (B, Nk) | None`` ->
        ``(out (B, Nq, D), attn (B, H, Nq, Nk) | None)``. ``causal``: query t sees keys <= t.
        ``attn_mask (B, Nq, Nk) | None`` bool: True where query i may attend to key j (per sample)."""
        check_shape("x", x, (None, None, self.query_dim))
        B, Nq, _ = x.shape
        if context is None:
            if self.context_dim != self.query_dim:
                raise ValueError(f"context is required: this attention was built with context_dim={self.context_dim}")
            context = x
        check_shape("context", context, (B, None, self.context_dim))
        Nk = context.shape[1]
        if key_mask is not None:
            check_shape("key_mask", key_mask, (B, Nk))
        if causal and Nq != Nk:
            raise ValueError(f"causal=True needs as many queries as keys, got Nq={Nq}, Nk={Nk}")
        if attn_mask is not None:
            check_shape("attn_mask", attn_mask, (B, Nq, Nk))
            if attn_mask.dtype != torch.bool:
                raise ValueError(f"attn_mask must be a bool tensor (True: query i may attend to key j), "
                                 f"got dtype {attn_mask.dtype}")

        q, k, v = (self._split_heads(t) for t in self._project(x, context))  # (B, H, Nq | Nk, hd) each

        allowed = self._allowed(key_mask, causal, Nq, Nk, x.device, attn_mask)
        has_key = None
        if key_mask is not None or attn_mask is not None:
            # A query whose keys are all hidden would softmax over nothing (NaN). Let it attend to
            # every key, then zero its output, so the row is finite and carries no information.
            has_key = allowed.any(dim=-1, keepdim=True)  # (B, 1, Nq, 1)
            allowed = allowed | ~has_key

        p_drop = self.dropout if self.training else 0.0
        attn = None
        if return_attention:
            scores = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)  # (B, H, Nq, Nk)
            if allowed is not None:
                scores = scores.masked_fill(~allowed, float("-inf"))
            attn = scores.softmax(dim=-1)  # (B, H, Nq, Nk), rows sum to 1
            if has_key is not None:
                attn = attn * has_key  # fully masked rows -> all-zero weights
            y = F.dropout(attn, p_drop, self.training) @ v  # (B, H, Nq, hd)
        else:
            if key_mask is None and attn_mask is None and causal:
                y = F.scaled_dot_product_attention(q, k, v, dropout_p=p_drop, is_causal=True)  # (B, H, Nq, hd)
            else:
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=p_drop)  # (B, H, Nq, hd)
            if has_key is not None:
                y = y * has_key
        y = y.transpose(1, 2).reshape(B, Nq, self.dim)  # (B, Nq, H * hd) = (B, Nq, D)
        return self.out(y), attn


class QuickGELU(nn.Module):
    """CLIP's sigmoid approximation of GELU: ``x * sigmoid(1.702 x)``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {
    "gelu": nn.GELU,  # exact erf GELU: BERT, ViT
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"),  # GPT-2
    "quick_gelu": QuickGELU,  # OpenAI CLIP
    "relu": nn.ReLU,  # the original Transformer
}


class FeedForward(nn.Module):
    """Position-wise MLP ``fc2(act(fc1(x)))`` then dropout: ``(B, N, D) -> (B, N, D)``."""

    def __init__(self, dim: int, hidden_dim: int, dropout: float = 0.0, activation: str = "gelu"):
        super().__init__()
        check_one_of("activation", activation, ACTIVATIONS)
        if dim < 1 or hidden_dim < 1:
            raise ValueError(f"dim and hidden_dim must be positive, got dim={dim}, hidden_dim={hidden_dim}")
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = ACTIVATIONS[activation]()
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.fc2(self.act(self.fc1(x))))


class TransformerLayer(nn.Module):
    """One transformer layer: self-attention, [cross-attention], feed-forward; each with a residual.

    ``norm_first=False`` is post-LN (BERT: ``x = LN(x + f(x))``); ``norm_first=True`` is pre-LN
    (GPT-2, ViT, CLIP: ``x = x + f(LN(x))``). With ``cross_attention`` the queries attend to ``context``
    (B, Nc, context_dim) between the two, as in BERT's decoder, ALBEF's fusion layers and BLIP.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0,
                 cross_attention: bool = False, context_dim: int | None = None, causal: bool = False,
                 norm_first: bool = False, layer_norm_eps: float = 1e-12, activation: str = "gelu"):
        super().__init__()
        if mlp_ratio <= 0:
            raise ValueError(f"mlp_ratio must be positive, got {mlp_ratio!r}")
        self.causal, self.norm_first, self.has_cross = causal, norm_first, cross_attention
        self.attn = MultiHeadAttention(dim, num_heads, dropout)
        self.attn_norm = nn.LayerNorm(dim, eps=layer_norm_eps)
        if cross_attention:
            self.cross_attn = MultiHeadAttention(dim, num_heads, dropout, context_dim=context_dim)
            self.cross_norm = nn.LayerNorm(dim, eps=layer_norm_eps)
        self.mlp = FeedForward(dim, int(dim * mlp_ratio), dropout, activation)
        self.mlp_norm = nn.LayerNorm(dim, eps=layer_norm_eps)
        self.dropout = nn.Dropout(dropout)  # on each attention block's output, before the residual

    def _residual(self, x, norm, block):
        """Add ``block``'s output to ``x`` with the LayerNorm before (pre-LN) or after (post-LN)."""
        if self.norm_first:
            out, attn = block(norm(x))
            return x + out, attn
        out, attn = block(x)
        return norm(x + out), attn

    def forward(self, x, key_mask=None, context=None, context_mask=None, return_attention: bool = False,
                attn_mask=None):
        """``x (B, N, D)``, ``key_mask (B, N)``, ``context (B, Nc, Dc)``, ``context_mask (B, Nc)`` ->
        ``(x (B, N, D), {"self": (B, H, N, N) | None[, "cross": (B, H, N, Nc) | None]})``.
        ``attn_mask (B, N, N)`` bool restricts the self-attention per sample (True: may attend)."""
        if self.has_cross and context is None:
            raise ValueError("context is required: this layer was built with cross_attention=True")
        if not self.has_cross and (context is not None or context_mask is not None):
            raise ValueError("context/context_mask given, but this layer was built with cross_attention=False")

        def self_block(h):
            out, attn = self.attn(h, key_mask=key_mask, causal=self.causal, return_attention=return_attention,
                                  attn_mask=attn_mask)
            return self.dropout(out), attn

        def cross_block(h):
            out, attn = self.cross_attn(h, context, key_mask=context_mask, return_attention=return_attention)
            return self.dropout(out), attn

        maps = {}
        x, maps["self"] = self._residual(x, self.attn_norm, self_block)
        if self.has_cross:
            x, maps["cross"] = self._residual(x, self.cross_norm, cross_block)
        x, _ = self._residual(x, self.mlp_norm, lambda h: (self.mlp(h), None))
        return x, maps


class TransformerEncoder(nn.Module):
    """A stack of ``num_layers`` ``TransformerLayer``s (final LayerNorm when ``norm_first``), BERT-initialised.

    ``forward(x (B, N, D), key_mask (B, N), context (B, Nc, Dc), context_mask (B, Nc), attn_mask (B, N, N))``
    -> ``(hidden (B, N, D), [per-layer {"self": ..., "cross": ...} attention maps])``; ``attn_mask``
    (bool, True: query i may attend to key j) applies to every layer's self-attention.
    """

    def __init__(self, num_layers: int, dim: int, num_heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0,
                 cross_attention: bool = False, context_dim: int | None = None, causal: bool = False,
                 norm_first: bool = False, layer_norm_eps: float = 1e-12, activation: str = "gelu"):
        super().__init__()
        if not isinstance(num_layers, int) or num_layers < 1:
            raise ValueError(f"num_layers must be a positive int, got {num_layers!r}")
        self.layers = nn.ModuleList(
            TransformerLayer(dim, num_heads, mlp_ratio, dropout, cross_attention, context_dim, causal,
                             norm_first, layer_norm_eps, activation)
            for _ in range(num_layers)
        )
        self.final_norm = nn.LayerNorm(dim, eps=layer_norm_eps) if norm_first else nn.Identity()
        init_weights(self)

    def forward(self, x, key_mask=None, context=None, context_mask=None, return_attention: bool = False,
                attn_mask=None):
        maps = []
        for layer in self.layers:
            x, layer_maps = layer(x, key_mask, context, context_mask, return_attention, attn_mask=attn_mask)
            maps.append(layer_maps)
        return self.final_norm(x), maps


class TransformerDecoder(TransformerEncoder):
    """``TransformerEncoder`` with causal self-attention and cross-attention to ``context`` by default."""

    def __init__(self, num_layers: int, dim: int, num_heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0,
                 cross_attention: bool = True, context_dim: int | None = None, causal: bool = True,
                 norm_first: bool = False, layer_norm_eps: float = 1e-12, activation: str = "gelu"):
        super().__init__(num_layers, dim, num_heads, mlp_ratio, dropout, cross_attention, context_dim, causal,
                         norm_first, layer_norm_eps, activation)


@torch.no_grad()
def init_weights(module: nn.Module, std: float = 0.02) -> nn.Module:
    """BERT/GPT initialisation of every submodule: Linear and Embedding weights ~ N(0, std), biases 0,
    the padding row of an Embedding 0, LayerNorm weight 1 and bias 0. Returns ``module``."""
    if not isinstance(module, nn.Module):
        raise ValueError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    if not std > 0:
        raise ValueError(f"std must be positive, got {std!r}")
    for m in module.modules():
        if isinstance(m, nn.Linear):
            m.weight.normal_(0.0, std)
            if m.bias is not None:
                m.bias.zero_()
        elif isinstance(m, nn.Embedding):
            m.weight.normal_(0.0, std)
            if m.padding_idx is not None:
                m.weight[m.padding_idx].zero_()
        elif isinstance(m, nn.LayerNorm):
            if m.weight is not None:
                m.weight.fill_(1.0)
            if m.bias is not None:
                m.bias.zero_()
    return module
