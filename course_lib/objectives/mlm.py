"""Masked language modelling conditioned on the image (BERT's MLM inside a VLP encoder).

Some caption tokens are masked (``course_lib.features`` does the 15% / 80-10-10 masking); the
fusion encoder sees the masked caption *and* the image, and the head predicts the original
tokens. The image enters only through the encoder's hidden states, so the loss is plain
cross-entropy over the masked positions (UNITER, LXMERT, ALBEF, ViLT all do this).

UniLM and Unified VLP mask differently (:func:`mask_target_tokens`): only the caption (the *target*
of generation) and its final ``[SEP]``, a fixed number of tokens per caption, so that the same loss
trains generation under a seq2seq attention mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from course_lib.features.text import CLS_ID, MASK_ID, PAD_ID, SEP_ID, UNK_ID
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


def mask_target_tokens(input_ids: torch.Tensor, attention_mask: torch.Tensor, vocab_size: int,
                       mask_prob: float = 0.15, max_pred: int = 3,
                       generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """UniLM's and Unified VLP's masking of a caption (the *target* sequence): ``(B, L)`` ids and mask
    ``[CLS] w_1 ... w_n [SEP] [PAD]...`` -> ``(masked ids, labels)``, labels -100 where not predicted.

    Only the caption's words and its final ``[SEP]`` (the "stop" a generator must learn to write)
    are candidates. Each row predicts exactly ``n_pred = min(max_pred, max(1, round(mask_prob * n)))``
    of them (``n`` words; ``round`` halves to even, as Python's), chosen uniformly; a chosen token
    becomes ``[MASK]`` with probability 0.8, a random word with 0.1, and stays itself with 0.1
    (``VLP/vlp/seq2seq_loader.py``, ``Preprocess4Seq2seq``).
    """
    check_shape("input_ids", input_ids, (None, None))
    check_shape("attention_mask", attention_mask, tuple(input_ids.shape))
    if isinstance(max_pred, bool) or not isinstance(max_pred, int) or max_pred < 1:
        raise ValueError(f"max_pred must be an int >= 1, got {max_pred!r}")
    if not 0.0 < mask_prob <= 1.0:
        raise ValueError(f"mask_prob must be in (0, 1], got {mask_prob!r}")
    special = (PAD_ID, UNK_ID, CLS_ID, SEP_ID, MASK_ID)  # ids 0..4: every other id is a word
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size <= len(special):
        raise ValueError(f"vocab_size must be an int > {len(special)} (the special tokens), got {vocab_size!r}")
    B, L = input_ids.shape
    device = input_ids.device
    valid = attention_mask.bool()
    words = valid & ~torch.isin(input_ids, input_ids.new_tensor(special))  # (B, L) caption words
    last = L - 1 - valid.flip(1).int().argmax(1)  # (B,) the last real token: the final [SEP]
    candidates = words.clone()
    rows = torch.arange(B, device=device)
    candidates[rows, last] |= input_ids[rows, last] == SEP_ID
    n_pred = torch.round(mask_prob * words.sum(1).float()).clamp(min=1, max=max_pred).long()  # (B,)
    scores = torch.rand(B, L, generator=generator, device=device).masked_fill(~candidates, 2.0)
    rank = scores.argsort(1).argsort(1)  # (B, L): 0 for the lowest score
    chosen = (rank < n_pred[:, None]) & candidates
    action = torch.rand(B, L, generator=generator, device=device)
    random_ids = torch.randint(len(special), vocab_size, (B, L), generator=generator, device=device)
    masked = torch.where(chosen & (action < 0.8), torch.full_like(input_ids, MASK_ID), input_ids)
    masked = torch.where(chosen & (action >= 0.8) & (action < 0.9), random_ids.to(input_ids.dtype), masked)
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    return masked, labels
