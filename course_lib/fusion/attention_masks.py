"""Self-attention masks that decide *who sees whom* in one shared transformer (UniLM, Dong et al.
2019; Unified VLP, Zhou et al. 2020; SimVLM's PrefixLM).

A sequence is a **source** (its first ``source_len`` positions: ``[CLS] regions [SEP]`` in Unified
VLP) followed by a **target** (the caption and its final ``[SEP]``). Every mask here is a bool
``(B, N, N)`` tensor, True where query ``i`` may attend to key ``j``, for
``course_lib.nn.MultiHeadAttention(attn_mask=...)``; padding keys (``key_valid`` False) are never
visible:

- :func:`bidirectional_mask`: every position sees every real position (BERT, the understanding
  mode: VQA);
- :func:`seq2seq_mask`: every position sees the whole source; a target position also sees the
  target causally (itself and the positions before it); a source position never sees the target
  (the generation mode: captioning, one token at a time);
- :func:`unified_mask`: one of the two per sample, as Unified VLP pretrains (``s2s (B,)`` bool).

Row ``i`` of the seq2seq mask, for a source of 3 and a target of 3 (``x`` = visible)::

             source   target
    source   x x x    . . .
    target   x x x    x . .
             x x x    x x .
             x x x    x x x
"""

from __future__ import annotations

import torch

from course_lib.utils import check_shape


def _check_key_valid(key_valid) -> torch.Tensor:
    if not isinstance(key_valid, torch.Tensor):
        raise ValueError(f"key_valid must be a (B, N) tensor, True/1 for a real position, got "
                         f"{type(key_valid).__name__}")
    check_shape("key_valid", key_valid, (None, None))
    return key_valid.bool()


def _source_lengths(source_len, B: int, N: int, device) -> torch.Tensor:
    """``source_len`` (an int, or ``(B,)`` ints) as a ``(B, 1, 1)`` tensor, checked to lie in [0, N]."""
    if isinstance(source_len, torch.Tensor):
        check_shape("source_len", source_len, (B,))
        if source_len.dtype.is_floating_point or source_len.dtype == torch.bool:
            raise ValueError(f"source_len must hold integer lengths, got dtype {source_len.dtype}")
        lengths = source_len.to(device)
    elif isinstance(source_len, int) and not isinstance(source_len, bool):
        lengths = torch.full((B,), source_len, device=device)
    else:
        raise ValueError(f"source_len must be an int or a (B,) tensor of ints, got {type(source_len).__name__}")
    if lengths.device.type == "cpu" and lengths.numel() and (lengths.min() < 0 or lengths.max() > N):
        raise ValueError(f"source_len must lie in [0, N={N}] (the sequence length), got values in "
                         f"[{int(lengths.min())}, {int(lengths.max())}]")
    return lengths[:, None, None]


def bidirectional_mask(key_valid: torch.Tensor) -> torch.Tensor:
    """``key_valid (B, N)`` -> ``(B, N, N)`` bool: every query sees every real key."""
    valid = _check_key_valid(key_valid)
    B, N = valid.shape
    return valid[:, None, :].expand(B, N, N).clone()


def seq2seq_mask(key_valid: torch.Tensor, source_len) -> torch.Tensor:
    """``key_valid (B, N)``, ``source_len`` (int or ``(B,)``) -> ``(B, N, N)`` bool seq2seq mask.

    Query ``i`` sees key ``j`` when ``j`` is real and either ``j`` is in the source
    (``j < source_len``), or both are in the target and ``j <= i`` (causal). So the source is
    encoded bidirectionally and without the target, and target position ``i`` is predicted from
    the source and the target before it.
    """
    valid = _check_key_valid(key_valid)
    B, N = valid.shape
    source = _source_lengths(source_len, B, N, valid.device)  # (B, 1, 1)
    i = torch.arange(N, device=valid.device)[None, :, None]  # (1, N, 1) queries
    j = torch.arange(N, device=valid.device)[None, None, :]  # (1, 1, N) keys
    in_source = j < source  # (B, 1, N): the whole source is visible to everyone
    causal_target = (i >= source) & (j >= source) & (j <= i)  # (B, N, N)
    return (in_source | causal_target) & valid[:, None, :]


def unified_mask(key_valid: torch.Tensor, source_len, s2s: torch.Tensor) -> torch.Tensor:
    """Per sample, the seq2seq mask where ``s2s (B,)`` is True and the bidirectional one elsewhere."""
    valid = _check_key_valid(key_valid)
    check_shape("s2s", s2s, (valid.shape[0],))
    if s2s.dtype != torch.bool:
        raise ValueError(f"s2s must be a (B,) bool tensor (True: seq2seq mask), got dtype {s2s.dtype}")
    return torch.where(s2s[:, None, None], seq2seq_mask(valid, source_len), bidirectional_mask(valid))
