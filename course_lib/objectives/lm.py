"""Causal and prefix language modelling (captioning losses of BLIP, SimVLM, CoCa).

Causal LM: token t is predicted from tokens < t (and the image). PrefixLM (SimVLM): the first
``prefix_len`` tokens see each other in both directions and are not predicted; the rest is
causal. Both use ``causal_lm_loss``, with ``prompt_lengths`` set to the prefix lengths for
PrefixLM or to the prompt length (BLIP's "a picture of ") for captioning.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from course_lib.utils import check_shape


def _lengths(name: str, lengths, batch: int, max_len: int, device) -> torch.Tensor:
    """An int or (B,) tensor of lengths as a (B,) long tensor with values in [0, max_len]."""
    lengths = torch.as_tensor(lengths, device=device)
    if lengths.dim() == 0:
        lengths = lengths.expand(batch)
    check_shape(name, lengths, (batch,))
    if lengths.is_floating_point() or ((lengths < 0) | (lengths > max_len)).any():
        raise ValueError(f"{name} must be integers in [0, {max_len}], got {lengths.tolist()}")
    return lengths.long()


def causal_lm_loss(logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   prompt_lengths=None, label_smoothing: float = 0.0) -> torch.Tensor:
    """Next-token cross-entropy: (B, L, V), (B, L), (B, L) -> scalar, mean over target tokens.

    ``logits[:, t]`` predicts ``input_ids[:, t + 1]``. A target token counts when
    ``attention_mask`` is 1 there and its position is >= its sample's prompt length
    (``prompt_lengths``: int or (B,); None: only the first token, e.g. [BOS], is unpredicted).
    ``label_smoothing`` as in ``F.cross_entropy`` (BLIP uses 0.1).
    """
    check_shape("logits", logits, (None, None, None))
    batch, length, _ = logits.shape
    check_shape("input_ids", input_ids, (batch, length))
    check_shape("attention_mask", attention_mask, (batch, length))
    if length < 2:
        raise ValueError(f"logits must cover at least 2 positions to predict a next token, got L={length}")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    prompt = _lengths("prompt_lengths", 0 if prompt_lengths is None else prompt_lengths,
                      batch, length, logits.device)
    positions = torch.arange(1, length, device=logits.device)                        # target positions
    is_target = attention_mask[:, 1:].bool() & (positions[None, :] >= prompt[:, None])  # (B, L-1)
    if not is_target.any():
        raise ValueError("no target token: attention_mask and prompt_lengths exclude every position")
    return F.cross_entropy(logits[:, :-1][is_target], input_ids[:, 1:][is_target],
                           label_smoothing=label_smoothing)


def prefix_lm_mask(prefix_lengths, total_len: int) -> torch.Tensor:
    """Attention mask for PrefixLM: (B,) prefix lengths -> (B, L, L) bool, True = may attend.

    Query i sees key j when j is in the prefix (j < prefix_len) or j <= i: bidirectional over
    the prefix, causal after it. A prefix length of 0 gives the plain causal mask. Same
    convention as ``scaled_dot_product_attention``'s boolean ``attn_mask``; combine it with a
    key-padding mask yourself.
    """
    if int(total_len) != total_len or total_len < 1:
        raise ValueError(f"total_len must be an integer >= 1, got {total_len}")
    prefix = torch.as_tensor(prefix_lengths)
    if prefix.dim() != 1:
        raise ValueError(f"prefix_lengths must have shape (B,), got {tuple(prefix.shape)}")
    prefix = _lengths("prefix_lengths", prefix, len(prefix), total_len, prefix.device)
    idx = torch.arange(total_len, device=prefix.device)
    causal = idx[None, :] <= idx[:, None]                                   # (L, L) key <= query
    in_prefix = idx[None, None, :] < prefix[:, None, None]                  # (B, 1, L) key in prefix
    return causal[None] | in_prefix
