"""Masked language modelling conditioned on the image (BERT's MLM inside a VLP encoder).

Some caption tokens are masked (``course_lib.features`` does the 15% / 80-10-10 masking); the
fusion encoder sees the masked caption *and* the image, and the head predicts the original
tokens. The image enters only through the encoder's hidden states, so the loss is plain
cross-entropy over the masked positions (UNITER, LXMERT, ALBEF, ViLT all do this).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from course_lib.utils import check_shape

IGNORE_INDEX = -100


def masked_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over masked positions: (B, L, V), (B, L) -> scalar.

    ``labels`` holds the original token id at masked positions and -100 elsewhere. A batch
    with no masked position is an error (its mean would be 0/0 = NaN).
    """
    check_shape("logits", logits, (None, None, None))
    check_shape("labels", labels, logits.shape[:2])
    predicted = labels != IGNORE_INDEX
    if not predicted.any():
        raise ValueError("labels has no masked position (all -100); mask at least one token")
    vocab = logits.shape[-1]
    bad = predicted & ((labels < 0) | (labels >= vocab))
    if bad.any():
        raise ValueError(f"labels must be -100 or a token id in [0, {vocab}); "
                         f"got {labels[bad][0].item()}")
    return F.cross_entropy(logits[predicted], labels[predicted])


class MLMHead(nn.Module):
    """BERT's prediction head: Linear -> GELU -> LayerNorm -> Linear(dim, vocab): (..., dim) -> (..., vocab).

    ``tie_to`` (an ``nn.Embedding`` or a (vocab, dim) parameter) shares the output weight with
    the word embeddings, as BERT does; the output bias stays separate. ``layer_norm_eps``: BERT's
    is 1e-12 (what a transformers checkpoint needs for parity).
    """

    def __init__(self, dim: int, vocab: int, tie_to: nn.Embedding | nn.Parameter | None = None,
                 layer_norm_eps: float = 1e-5):
        super().__init__()
        if dim < 1 or vocab < 1:
            raise ValueError(f"dim and vocab must be >= 1, got dim={dim}, vocab={vocab}")
        self.transform = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.LayerNorm(dim, eps=layer_norm_eps))
        self.decoder = nn.Linear(dim, vocab)
        if tie_to is not None:
            weight = tie_to.weight if isinstance(tie_to, nn.Embedding) else tie_to
            if not isinstance(weight, nn.Parameter) or tuple(weight.shape) != (vocab, dim):
                raise ValueError(f"tie_to must be an nn.Embedding or parameter of shape ({vocab}, {dim}), "
                                 f"got {tuple(getattr(weight, 'shape', ()))}")
            self.decoder.weight = weight

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.transform(hidden))
