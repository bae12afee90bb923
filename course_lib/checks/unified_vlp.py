"""Check functions for notebook 11 (Unified VLP): the seq2seq self-attention mask and captioning by
left-to-right ``[MASK]`` prediction.

Each ``check_*`` calls the learner's function on fixed inputs, compares it with cases built by hand
and with the library, and prints ``PASS ...``, or raises
:class:`~course_lib.checks.verdict.ExerciseError` saying what to fix; the usual mistakes are named
(the image seeing the caption, a caption that cannot see the image, a token that cannot see itself,
visible padding, rows and columns swapped; a ``[MASK]`` that is not appended, a row that goes on
after its ``[SEP]``).

- ``check_seq2seq_mask(fn)``: ``fn(key_valid (B, N) bool, source_len int) -> (B, N, N)`` bool, vs
  ``fusion.attention_masks.seq2seq_mask``;
- ``check_mask_decoding(fn)``: ``fn(predict, batch_size, max_len) -> (B, T)`` greedy ids, run against
  a scripted ``predict``.
"""

from __future__ import annotations

import torch

from course_lib.checks.verdict import call_learner, check_callable, expect, passed
from course_lib.features.text import CLS_ID, MASK_ID, PAD_ID, SEP_ID
from course_lib.fusion.attention_masks import bidirectional_mask, seq2seq_mask


def _mask_cases():
    """``(key_valid, source_len)`` pairs: no padding, padded regions and text, a one-token target."""
    full = torch.ones(1, 6, dtype=torch.bool)
    padded = torch.tensor([[1, 1, 0, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1, 0, 0]], dtype=torch.bool)
    short = torch.tensor([[1, 1, 1, 1]], dtype=torch.bool)
    return [(full, 3), (padded, 4), (short, 3)]


def _by_hand(key_valid: torch.Tensor, source_len: int) -> torch.Tensor:
    """The seq2seq mask written with two loops, the definition itself."""
    B, N = key_valid.shape
    out = torch.zeros(B, N, N, dtype=torch.bool)
    for b in range(B):
        for i in range(N):
            for j in range(N):
                visible = j < source_len or (i >= source_len and j <= i)
                out[b, i, j] = visible and bool(key_valid[b, j])
    return out


def _mask_mistakes(key_valid: torch.Tensor, source_len: int) -> dict[str, torch.Tensor]:
    """Masks of the usual wrong answers, each with the hint that names it."""
    B, N = key_valid.shape
    valid = key_valid[:, None, :]
    i = torch.arange(N)[:, None]
    j = torch.arange(N)[None, :]
    right = seq2seq_mask(key_valid, source_len)
    return {
        "the image part sees the caption: source rows (i < source_len) may only attend to the source":
            right | ((i < source_len) & (j >= source_len) & valid),
        "a caption position cannot see the image: every row sees the whole source (j < source_len)":
            right & ~((i >= source_len) & (j < source_len)),
        "a caption token cannot see itself: the causal part is j <= i (the diagonal is True)":
            right & ~((i == j) & (i >= source_len)),
        "padding keys are visible: AND the mask with key_valid[:, None, :] (keys across)":
            seq2seq_mask(torch.ones_like(key_valid), source_len),
        "rows and columns are swapped: rows are queries i, columns keys j":
            right.transpose(1, 2),
        "the whole sequence is causal: the source is read bidirectionally (every source key visible to all)":
            torch.ones(N, N, dtype=torch.bool).tril()[None] & valid,
        "this is the bidirectional mask: the caption must be causal and hidden from the image":
            bidirectional_mask(key_valid),
        "True must mean 'may attend' (course_lib's convention); you built the blocked positions":
            ~right,
    }


def check_seq2seq_mask(fn) -> None:
    """Grade ``fn(key_valid (B, N) bool, source_len: int) -> (B, N, N)`` bool, True where query ``i``
    may attend to key ``j``: every query sees the real source keys (``j < source_len``), a target
    query also sees the real target keys ``j <= i``; a source query never sees the target. Exact,
    on three cases (with and without padding)."""
    check = "seq2seq_mask"
    check_callable("fn", fn, check)
    for key_valid, source_len in _mask_cases():
        B, N = key_valid.shape
        mask = call_learner(check, fn, key_valid.clone(), source_len)
        expect(isinstance(mask, torch.Tensor), check, f"return a torch.Tensor, got {type(mask).__name__}")
        expect(tuple(mask.shape) == (B, N, N), check, f"for key_valid of shape ({B}, {N}) the mask has shape "
               f"{tuple(mask.shape)}, expected ({B}, {N}, {N}): one (queries x keys) matrix per sample")
        expect(mask.dtype == torch.bool, check, f"return a bool tensor (True = may attend), got {mask.dtype}")
        expected = _by_hand(key_valid, source_len)
        if not torch.equal(mask, expected):
            for hint, wrong in _mask_mistakes(key_valid, source_len).items():
                expect(not torch.equal(mask, wrong), check, hint)
            b, i, j = (int(x) for x in (mask != expected).nonzero()[0])
            where = "source" if i < source_len else "target"
            expect(False, check, f"with source_len={source_len} and key_valid[{b}]={key_valid[b].int().tolist()}, "
                   f"query {i} (in the {where}) {'may' if expected[b, i, j] else 'may not'} attend to key {j}, "
                   f"but your mask says {bool(mask[b, i, j])}; expected row {i}: {expected[b, i].int().tolist()}")
    passed(check, "the source is seen by all and sees only itself, the target is causal, padding is hidden "
                  "(3 cases, equal to course_lib.fusion.attention_masks.seq2seq_mask)")


class _Scripted:
    """A ``predict(ids (B, t + 2)) -> logits (B, V)`` that writes ``script[b][t]`` at step ``t``,
    and records what it was given."""

    def __init__(self, script, vocab: int = 16):
        self.script, self.vocab, self.inputs = script, vocab, []

    def __call__(self, ids):
        self.inputs.append(ids.clone() if isinstance(ids, torch.Tensor) else ids)
        step = len(self.inputs) - 1
        logits = torch.zeros(len(self.script), self.vocab)
        for b, words in enumerate(self.script):
            logits[b, words[min(step, len(words) - 1)]] = 5.0
        return logits


def check_mask_decoding(fn) -> None:
    """Grade ``fn(predict, batch_size, max_len) -> (B, T)`` long: greedy captioning by ``[MASK]`` prediction.

    Step ``t`` (from 0) calls ``predict(ids)`` with ``ids (B, t + 2)`` = ``[CLS] w_1 ... w_t [MASK]`` (the words
    written so far), takes the arg-max of the returned logits ``(B, V)`` as ``w_{t+1}``; a row that has
    written ``[SEP]`` writes ``[PAD]`` afterwards; decoding stops when every row has written ``[SEP]`` or
    after ``max_len`` steps. The result holds the written words, ``[CLS]`` excluded.
    """
    check = "mask_decoding"
    check_callable("fn", fn, check)
    w = [5, 6, 7, 8, 9, 10]
    cases = [([[w[0], w[1], SEP_ID], [w[2], SEP_ID], [w[3], w[4], w[5], SEP_ID]], 8,
              [[w[0], w[1], SEP_ID, PAD_ID], [w[2], SEP_ID, PAD_ID, PAD_ID], [w[3], w[4], w[5], SEP_ID]]),
             ([[w[1], w[2], w[3], w[4], SEP_ID]], 3, [[w[1], w[2], w[3]]])]
    for script, max_len, want in cases:
        predict = _Scripted(script)
        ids = call_learner(check, fn, predict, len(script), max_len)
        expect(isinstance(ids, torch.Tensor), check, f"return a (B, T) tensor of token ids, got {type(ids).__name__}")
        expect(len(predict.inputs) > 0, check, "predict was never called: call it once per step")
        first = predict.inputs[0]
        expect(isinstance(first, torch.Tensor) and first.dim() == 2, check,
               "call predict with a (B, t + 2) tensor of ids: [CLS], the words so far, [MASK]")
        expect(first.shape[1] == 2 and bool((first[:, 0] == CLS_ID).all()), check,
               f"the first call should get [[CLS], [MASK]] per row (ids {CLS_ID}, {MASK_ID}), got "
               f"{first.tolist()}")
        for t, step_ids in enumerate(predict.inputs):
            expect(step_ids.shape[1] == t + 2, check, f"step {t} should give predict t + 2 = {t + 2} tokens "
                   f"([CLS], {t} words, [MASK]), got {step_ids.shape[1]}")
            expect(bool((step_ids[:, -1] == MASK_ID).all()), check, f"step {t}: the last token given to predict "
                   f"must be [MASK] (id {MASK_ID}), the position whose word is predicted; got "
                   f"{step_ids[:, -1].tolist()}")
        expect(len(predict.inputs) <= max_len, check, f"predict was called {len(predict.inputs)} times with "
               f"max_len={max_len}: stop after max_len steps")
        if len(predict.inputs) > len(want[0]):
            expect(False, check, f"decoding ran {len(predict.inputs)} steps, but every row had written [SEP] "
                   f"(id {SEP_ID}) after {len(want[0])}: stop as soon as all rows are done")
        expect(tuple(ids.shape) == (len(want), len(want[0])), check, f"the result has shape {tuple(ids.shape)}, "
               f"expected {(len(want), len(want[0]))}: one row per image, one column per step, [CLS] left out")
        for t, step_ids in enumerate(predict.inputs[1:], start=1):
            expect(torch.equal(step_ids[:, 1:-1].long(), ids[:, :t].long()), check, f"step {t}: predict should "
                   f"see the words written so far, {ids[:, :t].tolist()}, between [CLS] and [MASK]; got "
                   f"{step_ids[:, 1:-1].tolist()}")
        if ids.tolist() != want:
            after_sep = any(PAD_ID not in row[row.index(SEP_ID) + 1:] and row.index(SEP_ID) + 1 < len(row)
                            for row in ids.tolist() if SEP_ID in row)
            expect(not after_sep, check, "a row that has written [SEP] must write [PAD] (id 0) from then on")
            expect(False, check, f"expected {want}, got {ids.tolist()}")
    passed(check, "[CLS] + words + [MASK] at each step, the arg-max written in order, [PAD] after [SEP], "
                  "stops when all rows are done or at max_len")
