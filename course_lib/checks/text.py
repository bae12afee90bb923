"""Check functions for notebook 01 (text features).

Each ``check_*`` calls the learner's function on fixed inputs, compares it with
``course_lib.features.text`` (or the trained ``tokenizers`` WordPiece model) and prints ``PASS ...``,
or raises :class:`~course_lib.checks.verdict.ExerciseError` with a message that says what to fix.

- ``check_mask_tokens(fn)``: BERT's masking recipe (15% chosen; 80% [MASK], 10% random, 10% kept);
- ``check_sinusoidal_positions(fn)``: the fixed position table of Vaswani et al. 2017;
- ``check_wordpiece(fn, tokenizer)``: greedy longest-match-first WordPiece on single words.
"""

from __future__ import annotations

import math

import torch

from course_lib.checks.verdict import (
    CheckArgumentError, call_learner, check_callable, expect, expect_close, passed, wrong,
)
from course_lib.features.text import CLS_ID, MASK_ID, PAD_ID, SEP_ID, UNK_ID, sinusoidal_positions

SPECIAL_IDS = (PAD_ID, UNK_ID, CLS_ID, SEP_ID, MASK_ID)


# --------------------------------------------------------------------------- masking


def _padded_batch(rows: int, length: int, vocab_size: int, seed: int) -> torch.Tensor:
    """``(rows, length)`` ids like a collated batch: [CLS] words [SEP] [PAD]..., a few [UNK]s."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(len(SPECIAL_IDS), vocab_size, (rows, length), generator=g)
    lengths = torch.randint(4, length + 1, (rows,), generator=g)
    for r, n in enumerate(lengths.tolist()):
        ids[r, 0], ids[r, n - 1] = CLS_ID, SEP_ID
        ids[r, n:] = PAD_ID
    unknown = torch.rand(rows, length, generator=g) < 0.02
    inner = (ids != PAD_ID) & (ids != CLS_ID) & (ids != SEP_ID)
    ids[unknown & inner] = UNK_ID
    return ids


def _rate_ok(check: str, what: str, got: float, want: float, tol: float) -> None:
    expect(abs(got - want) <= tol, check, f"{what} is {got:.3f}, expected about {want:.2f} (within {tol})")


def check_mask_tokens(fn) -> None:
    """Grade ``fn(input_ids, vocab_size, mask_token_id, special_token_ids, generator) -> (masked_ids, labels)``.

    On a batch of 256 x 128 ids (about 19,000 ordinary tokens) the rates must be BERT's within
    wide margins (about 8 standard deviations: a correct function never fails, a wrong rate does):
    15% +- 1.5% of ordinary tokens chosen; of those 80% +- 3% [MASK], 10% +- 3% random, 10% +- 3% kept.
    Special tokens are never chosen, labels are -100 except at chosen positions, the input is not
    modified, and the same seeded ``generator`` gives the same result.
    """
    check = "mask_tokens"
    check_callable("fn", fn, check)
    vocab_size = 60
    input_ids = _padded_batch(256, 128, vocab_size, seed=0)
    original = input_ids.clone()
    out = call_learner(check, fn, input_ids, vocab_size, MASK_ID, SPECIAL_IDS, torch.Generator().manual_seed(0))
    expect(isinstance(out, (tuple, list)) and len(out) == 2, check,
           f"return two tensors (masked_ids, labels), got {type(out).__name__}")
    masked, labels = out
    for name, t in (("masked_ids", masked), ("labels", labels)):
        expect(isinstance(t, torch.Tensor), check, f"{name} should be a torch.Tensor, got {type(t).__name__}")
        expect(tuple(t.shape) == tuple(input_ids.shape), check,
               f"{name} has shape {tuple(t.shape)}, expected the input's shape {tuple(input_ids.shape)}")
        expect(t.dtype == torch.int64, check, f"{name} should hold int64 token ids, got {t.dtype}")
    expect(torch.equal(input_ids, original), check,
           "input_ids was modified in place; work on a copy (input_ids.clone())")

    expect(not torch.equal(labels, input_ids), check,
           "labels must be -100 at every position that was not chosen (F.cross_entropy ignores -100), "
           "not a copy of input_ids")
    chosen = labels != -100
    expect(bool(chosen.any()), check, "no position was chosen (labels are all -100); choose 15% of the tokens")
    expect(torch.equal(labels[chosen], input_ids[chosen]), check,
           "labels must hold the ORIGINAL token id at every chosen position (what the model must predict)")
    special = torch.isin(input_ids, torch.tensor(SPECIAL_IDS))
    expect(not bool((chosen & special).any()), check,
           "special tokens ([PAD], [CLS], [SEP], [UNK], [MASK]) must never be chosen; "
           "choose only where the id is not in special_token_ids")
    expect(torch.equal(masked[~chosen], input_ids[~chosen]), check,
           "tokens that were not chosen must stay unchanged in masked_ids (and get label -100)")

    ordinary = ~special
    _rate_ok(check, "the fraction of ordinary tokens chosen", chosen[ordinary].float().mean().item(), 0.15, 0.015)
    became_mask = (masked == MASK_ID) & chosen
    kept = (masked == input_ids) & chosen
    replaced = chosen & ~became_mask & ~kept
    n = chosen.sum().item()
    _rate_ok(check, "the fraction of chosen tokens replaced by [MASK]", became_mask.sum().item() / n, 0.8, 0.03)
    # A random replacement draws the original token again 1 time in (vocab - specials): counted as kept.
    p_same = 0.1 / (vocab_size - len(SPECIAL_IDS))
    _rate_ok(check, "the fraction of chosen tokens replaced by a random token", replaced.sum().item() / n,
             0.1 - p_same, 0.03)
    _rate_ok(check, "the fraction of chosen tokens left unchanged", kept.sum().item() / n, 0.1 + p_same, 0.03)
    random_ids = masked[replaced]
    expect(bool(((random_ids >= 0) & (random_ids < vocab_size)).all()), check,
           f"random replacements must be ids in [0, vocab_size={vocab_size})")
    expect(not bool(torch.isin(random_ids, torch.tensor(SPECIAL_IDS)).any()), check,
           "random replacements must be ordinary tokens, never a special token such as [PAD] or [CLS]")

    again = call_learner(check, fn, input_ids, vocab_size, MASK_ID, SPECIAL_IDS, torch.Generator().manual_seed(0))
    expect(isinstance(again, (tuple, list)) and len(again) == 2 and all(isinstance(t, torch.Tensor) for t in again),
           check, "a second call returned something else than two tensors")
    expect(torch.equal(again[0], masked) and torch.equal(again[1], labels), check,
           "two calls with generators seeded alike gave different results; pass generator=generator "
           "to every random draw (torch.rand, torch.randint)")
    passed(check, f"{n} of {int(ordinary.sum())} ordinary tokens chosen ({n / int(ordinary.sum()):.1%}); "
           f"[MASK] {became_mask.sum().item() / n:.1%}, random {replaced.sum().item() / n:.1%}, "
           f"kept {kept.sum().item() / n:.1%}; specials never masked")


# --------------------------------------------------------------------------- positions


def _variants(num_positions: int, dim: int) -> dict[str, torch.Tensor]:
    """Common wrong tables, to name the mistake in the verdict."""
    p = torch.arange(num_positions, dtype=torch.float64)[:, None]
    i = torch.arange(0, dim, 2, dtype=torch.float64)
    right = p * torch.exp(-math.log(10000.0) * i / dim)  # angles (P, D/2)
    halved = p * torch.exp(-math.log(10000.0) * (i / 2) / dim)  # 10000^(i/d) instead of 10000^(2i/d)

    def interleave(sin, cos):
        out = torch.empty(num_positions, dim, dtype=torch.float64)
        out[:, 0::2], out[:, 1::2] = sin, cos
        return out.float()

    return {
        "sin and cos are swapped: even columns 2i hold sin, odd columns 2i+1 hold cos":
            interleave(torch.cos(right), torch.sin(right)),
        "the columns are [all sin | all cos]; interleave them: column 2i is sin, column 2i+1 is cos":
            torch.cat([torch.sin(right), torch.cos(right)], dim=1).float(),
        "the exponent is off by a factor 2: the frequency of pair i is 1 / 10000^(2i/d), "
        "with 2i = 0, 2, 4, ... the even column index":
            interleave(torch.sin(halved), torch.cos(halved)),
    }


def check_sinusoidal_positions(fn) -> None:
    """Grade ``fn(num_positions, dim) -> (num_positions, dim)`` against ``course_lib``'s table.

    Tolerance: atol 1e-5 (float32 rounding of sin/cos of angles up to ~100 rad).
    """
    check = "sinusoidal_positions"
    check_callable("fn", fn, check)
    for num_positions, dim in ((1, 2), (16, 8), (50, 64)):
        table = call_learner(check, fn, num_positions, dim)
        expected = sinusoidal_positions(num_positions, dim)
        if isinstance(table, torch.Tensor) and table.shape == expected.shape:
            if not torch.allclose(table.float(), expected, atol=1e-5):
                for hint, wrong in _variants(num_positions, dim).items():
                    expect(not torch.allclose(table.float(), wrong, atol=1e-5), check,
                           f"for num_positions={num_positions}, dim={dim}: {hint}")
        expect_close(table, expected, check, f"the table for num_positions={num_positions}, dim={dim}", atol=1e-5)
    passed(check, "matches course_lib.features.text.sinusoidal_positions for (1, 2), (16, 8) and (50, 64)")


# --------------------------------------------------------------------------- WordPiece

# Words of the corpus, words it never saw, and words with letters the vocabulary lacks.
WORDPIECE_WORDS = ("circle", "triangles", "magenta", "magentas", "cyanish", "purple", "hexagon",
                   "octagon", "biggest", "leftmost", "pink", "zzz", "x", "squareness")


def check_wordpiece(fn, tokenizer) -> None:
    """Grade ``fn(word, vocab) -> list[str]`` against the trained ``tokenizer`` on single words.

    ``vocab`` is ``tokenizer.get_vocab()`` (``{piece: id}``); the expected pieces are
    ``tokenizer.tokenize(word)`` (greedy longest match first, "##" on continuing pieces, the whole
    word ``[UNK]`` when some part of it matches no piece).
    """
    check = "wordpiece"
    check_callable("fn", fn, check)
    if not hasattr(tokenizer, "get_vocab") or not hasattr(tokenizer, "tokenize"):
        raise CheckArgumentError(check, "tokenizer must be the trained tokenizer (train_tokenizer), "
                                        f"got {type(tokenizer).__name__}")
    vocab = tokenizer.get_vocab()
    for word in WORDPIECE_WORDS:
        pieces = call_learner(check, fn, word, dict(vocab))
        expected = tokenizer.tokenize(word)
        expect(isinstance(pieces, (list, tuple)) and all(isinstance(p, str) for p in pieces), check,
               f"return a list of strings (the pieces), got {pieces!r} for {word!r}")
        pieces = list(pieces)
        if pieces == expected:
            continue
        hint = ""
        if expected == ["[UNK]"]:
            hint = (" Some part of this word matches no piece of the vocabulary: then the WHOLE word "
                    "becomes the single token [UNK].")
        elif any(p.startswith("##") for p in expected) and not any(p.startswith("##") for p in pieces):
            hint = " Pieces that continue a word are looked up with the '##' prefix."
        elif len(pieces) > len(expected):
            hint = " Take the LONGEST piece of the vocabulary that matches at each step."
        raise wrong(check, f"{word!r} should give {expected}, got {pieces}.{hint}")
    passed(check, f"your WordPiece gives the tokenizer's pieces for all {len(WORDPIECE_WORDS)} words")

