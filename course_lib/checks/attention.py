"""Check functions for notebook 02 (attention and the transformer block).

Each ``check_*`` runs the learner's function on fixed random inputs, compares it with
``course_lib.nn.MultiHeadAttention`` (or a slow, obvious reference) and prints ``PASS ...``, or raises
:class:`~course_lib.checks.verdict.ExerciseError` with a message that says what to fix.

- ``check_attention(fn)``: scaled dot-product attention with a key padding mask;
- ``check_causal_mask(fn)``: the lower-triangular "no peeking at the future" mask;
- ``check_split_merge_heads(split_fn, merge_fn)``: the reshapes of multi-head attention.
"""

from __future__ import annotations

import math

import torch

from course_lib.checks.verdict import (
    call_learner, check_callable, expect, expect_close, passed, wrong,
)
from course_lib.nn import MultiHeadAttention


# --------------------------------------------------------------------------- attention


@torch.no_grad()
def library_attention(q, k, v, key_mask=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of per-head ``q (B, H, Nq, d)``, ``k, v (B, H, Nk, d)`` computed by course_lib.

    A ``MultiHeadAttention`` whose projections are identities (keys and values read the two halves of
    ``context = [k | v]``) computes exactly ``softmax(q k^T / sqrt(d)) v`` per head. Returns
    ``(out (B, H, Nq, d), weights (B, H, Nq, Nk))``.
    """
    B, H, Nq, d = q.shape
    Nk, D = k.shape[2], H * d
    mha = MultiHeadAttention(D, H, context_dim=2 * D)
    eye, zero = torch.eye(D), torch.zeros(D, D)
    mha.query.weight.copy_(eye)
    mha.out.weight.copy_(eye)
    mha.key.weight.copy_(torch.cat([eye, zero], dim=1))
    mha.value.weight.copy_(torch.cat([zero, eye], dim=1))
    for layer in (mha.query, mha.key, mha.value, mha.out):
        layer.bias.zero_()
    merge = lambda t: t.transpose(1, 2).reshape(B, t.shape[2], D)  # noqa: E731  (B, H, N, d) -> (B, N, D)
    out, weights = mha(merge(q), context=torch.cat([merge(k), merge(v)], dim=-1), key_mask=key_mask,
                       return_attention=True)
    return out.view(B, Nq, H, d).transpose(1, 2), weights


def _attention_hints(q, k, v, key_mask) -> dict[str, torch.Tensor]:
    """Outputs of common mistakes, to name the one the learner made."""
    d = q.shape[-1]
    scores = q @ k.transpose(-2, -1)
    allowed = key_mask.bool()[:, None, None, :] if key_mask is not None else torch.ones_like(scores, dtype=torch.bool)
    hints = {
        "divide the scores by sqrt(d) (d = the last dimension of q): softmax(q k^T / sqrt(d))":
            scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v,
        "take the softmax over the KEYS (the last dimension, dim=-1), so each query's weights sum to 1":
            (scores / math.sqrt(d)).masked_fill(~allowed, float("-inf")).softmax(-2) @ v,
    }
    if key_mask is not None:
        hints["padding keys must get zero weight: set their scores to -inf (masked_fill where key_mask is "
              "False) BEFORE the softmax"] = (scores / math.sqrt(d)).softmax(-1) @ v
    return hints


def _attention_cases():
    g = torch.Generator().manual_seed(0)
    B, H = 3, 2
    # (name, Nq, Nk, d, key lengths or None)
    for name, Nq, Nk, d, lengths in (
        ("self-attention, no mask", 5, 5, 8, None),
        ("self-attention with padding", 6, 6, 16, [6, 3, 1]),
        ("cross-attention (Nq != Nk) with padding", 4, 7, 8, [7, 2, 5]),
    ):
        q, k, v = (torch.randn(B, H, n, d, generator=g) for n in (Nq, Nk, Nk))
        key_mask = None if lengths is None else torch.arange(Nk)[None, :] < torch.tensor(lengths)[:, None]
        yield name, q, k, v, key_mask


def check_attention(fn) -> None:
    """Grade ``fn(q, k, v, key_mask=None) -> (out, weights)`` against course_lib's attention.

    ``q (B, H, Nq, d)``, ``k, v (B, H, Nk, d)``, ``key_mask (B, Nk)`` bool, True for real tokens.
    ``out (B, H, Nq, d)``, ``weights (B, H, Nq, Nk)``. Tolerance: atol 1e-5, rtol 1e-4 (float32).
    """
    check = "attention"
    check_callable("fn", fn, check)
    for name, q, k, v, key_mask in _attention_cases():
        result = call_learner(check, fn, q.clone(), k.clone(), v.clone(), key_mask=key_mask)
        expect(isinstance(result, (tuple, list)) and len(result) == 2, check,
               f"return (out, weights), two tensors; got {type(result).__name__}")
        out, weights = result
        expected_out, expected_weights = library_attention(q, k, v, key_mask)
        if isinstance(out, torch.Tensor) and out.shape == expected_out.shape:
            if not torch.allclose(out, expected_out, atol=1e-5, rtol=1e-4):
                for hint, wrong in _attention_hints(q, k, v, key_mask).items():
                    expect(not torch.allclose(out, wrong, atol=1e-5, rtol=1e-4), check, f"{name}: {hint}")
        expect_close(out, expected_out, check, f"{name}: out")
        expect_close(weights, expected_weights, check, f"{name}: weights")
    passed(check, "matches course_lib.nn.MultiHeadAttention on self- and cross-attention, with and without "
                  "padding masks")


# --------------------------------------------------------------------------- causal mask


def check_causal_mask(fn) -> None:
    """Grade ``fn(n) -> (n, n)`` bool, True where query i may attend to key j (j <= i).

    Also runs course_lib's attention with the learner's mask and compares it with
    ``MultiHeadAttention(..., causal=True)`` (atol 1e-5).
    """
    check = "causal_mask"
    check_callable("fn", fn, check)
    for n in (4, 7, 1):
        mask = call_learner(check, fn, n)
        expect(isinstance(mask, torch.Tensor), check, f"return a torch.Tensor, got {type(mask).__name__}")
        expect(tuple(mask.shape) == (n, n), check, f"causal_mask({n}) has shape {tuple(mask.shape)}, "
               f"expected ({n}, {n}): queries down, keys across")
        expect(mask.dtype == torch.bool, check, f"return a bool tensor (True = may attend), got {mask.dtype}")
        expected = torch.ones(n, n, dtype=torch.bool).tril()
        if not torch.equal(mask, expected):
            expect(not torch.equal(mask, ~expected), check, "True must mean 'may attend' (course_lib's convention, "
                   "like attention_mask = 1 for real tokens); you built the blocked positions")
            expect(not torch.equal(mask, expected.T), check, "rows are queries and columns are keys: query i may "
                   "see keys j <= i (lower triangle, torch.tril), you built the upper one")
            expect(not torch.equal(mask, expected.tril(-1)), check, "a token may attend to itself: the diagonal "
                   "must be True")
        expect(torch.equal(mask, expected), check,
               f"causal_mask({n}) should be {expected.int().tolist()}, got {mask.int().tolist()}")

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 7, 8, generator=g)
    mha = MultiHeadAttention(8, 2)
    with torch.no_grad():
        expected_out, _ = mha(x, causal=True)
        q, k, v = (_naive_split(proj(x), 2) for proj in (mha.query, mha.key, mha.value))  # (B, H, N, hd)
        allowed = call_learner(check, fn, 7)  # (7, 7), checked above
        scores = (q @ k.transpose(-2, -1) / math.sqrt(mha.head_dim)).masked_fill(~allowed, float("-inf"))
        y = (scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 7, 8)
    expect_close(mha.out(y), expected_out, check, "attention with your mask vs MultiHeadAttention(causal=True)")
    passed(check, "lower-triangular for n = 4, 7, 1; attention with it equals course_lib's causal attention")


# --------------------------------------------------------------------------- heads


def _naive_split(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Head h takes features ``h * hd .. (h + 1) * hd - 1`` of every token: a slow, obvious loop."""
    hd = x.shape[-1] // num_heads
    return torch.stack([x[:, :, h * hd:(h + 1) * hd] for h in range(num_heads)], dim=1)  # (B, H, N, hd)


def check_split_merge_heads(split_fn, merge_fn) -> None:
    """Grade ``split_fn(x (B, N, D), num_heads) -> (B, H, N, D/H)`` and its inverse
    ``merge_fn((B, H, N, hd)) -> (B, N, H * hd)``; then rebuild course_lib's multi-head attention with
    them and compare outputs (atol 1e-5)."""
    check = "split_merge_heads"
    check_callable("split_fn", split_fn, check)
    check_callable("merge_fn", merge_fn, check)
    g = torch.Generator().manual_seed(0)
    B, N, D, H = 2, 5, 12, 3
    x = torch.randn(B, N, D, generator=g)
    heads = call_learner(check, split_fn, x, H)
    expected = _naive_split(x, H)
    if isinstance(heads, torch.Tensor) and heads.shape == expected.shape and not torch.equal(heads, expected):
        expect(not torch.equal(heads, x.reshape(B, H, N, D // H)), check,
               "view x as (B, N, H, hd) first, then transpose(1, 2); a direct view to (B, H, N, hd) "
               "mixes different tokens into one head")
    expect_close(heads, expected, check, f"split_fn(x (B={B}, N={N}, D={D}), num_heads={H}), "
                 "head h should hold features h*hd .. (h+1)*hd-1 of every token", atol=0, rtol=0)

    y = torch.randn(B, H, N, D // H, generator=g)
    merged = call_learner(check, merge_fn, y)
    expect_close(merged, torch.cat(y.unbind(1), dim=-1), check,
                 "merge_fn(y (B, H, N, hd)), heads side by side: (B, N, H * hd)", atol=0, rtol=0)
    round_trip = call_learner(check, merge_fn, call_learner(check, split_fn, x, H))
    expect_close(round_trip, x, check, "merge_fn(split_fn(x)) == x", atol=0, rtol=0)

    mha = MultiHeadAttention(D, H)
    with torch.no_grad():
        expected_out, _ = mha(x)
        q, k, v = (call_learner(check, split_fn, proj(x), H) for proj in (mha.query, mha.key, mha.value))
        attn = (q @ k.transpose(-2, -1) / math.sqrt(D // H)).softmax(-1)  # (B, H, N, N)
        out = mha.out(call_learner(check, merge_fn, attn @ v))
    expect_close(out, expected_out, check, "multi-head attention built with your split/merge vs course_lib's")
    passed(check, "split and merge are inverse, put features h*hd..(h+1)*hd-1 in head h, and rebuild "
                  "course_lib.nn.MultiHeadAttention exactly")

