"""Tests of course_lib.checks.text: a correct exercise passes, each typical mistake fails with a
message that names it. The correct answers are course_lib's own functions (or a plain WordPiece)."""

import math

import pytest
import torch

from course_lib.checks.text import check_mask_tokens, check_sinusoidal_positions, check_wordpiece
from course_lib.checks.verdict import ExerciseError
from course_lib.data.shapeworld import ShapeWorld, WorldConfig
from course_lib.features.text import mask_tokens, sinusoidal_positions, train_tokenizer


# --------------------------------------------------------------------------- mask_tokens


def library_mask(input_ids, vocab_size, mask_token_id, special_token_ids, generator):
    return mask_tokens(input_ids, vocab_size, mask_token_id, special_token_ids, generator=generator)


def test_mask_tokens_accepts_the_library(capsys):
    check_mask_tokens(library_mask)
    assert capsys.readouterr().out.startswith("PASS mask_tokens")


def test_mask_tokens_accepts_a_different_but_correct_draw_order(capsys):
    def other_order(input_ids, vocab_size, mask_token_id, special_token_ids, generator):
        special = torch.isin(input_ids, torch.tensor(list(special_token_ids)))
        u = torch.rand(input_ids.shape, generator=generator)
        chosen = (torch.rand(input_ids.shape, generator=generator) < 0.15) & ~special
        random_ids = torch.randint(5, vocab_size, input_ids.shape, generator=generator)
        masked = input_ids.clone()
        masked[chosen & (u < 0.1)] = random_ids[chosen & (u < 0.1)]
        masked[chosen & (u >= 0.2)] = mask_token_id
        return masked, torch.where(chosen, input_ids, -100)

    check_mask_tokens(other_order)
    assert "PASS" in capsys.readouterr().out


@pytest.mark.parametrize("wrong, message", [
    (lambda ids, V, m, sp, g: mask_tokens(ids, V, m, sp, mask_prob=0.3, generator=g), "ordinary tokens chosen"),
    (lambda ids, V, m, sp, g: mask_tokens(ids, V, m, (), generator=g), "special tokens"),
    (lambda ids, V, m, sp, g: mask_tokens(ids, V, m, sp, replace_prob=1.0, random_prob=0.0, generator=g),
     r"replaced by \[MASK\]"),
    (lambda ids, V, m, sp, g: mask_tokens(ids, V, m, sp, replace_prob=0.8, random_prob=0.0, generator=g),
     "random token"),
    (lambda ids, V, m, sp, g: (mask_tokens(ids, V, m, sp, generator=g)[0], ids.clone()), "labels must be -100"),
    (lambda ids, V, m, sp, g: (mask_tokens(ids, V, m, sp, generator=g)[0], torch.where(ids > 4, ids + 1, -100)),
     "labels must hold"),
    (lambda ids, V, m, sp, g: mask_tokens(ids, V, m, sp), "generator"),  # ignores the generator
    (lambda ids, V, m, sp, g: (ids, torch.full_like(ids, -100)), "no position was chosen"),
    (lambda ids, V, m, sp, g: mask_tokens(ids, V, m, sp, generator=g)[0], "two tensors"),
])
def test_mask_tokens_names_the_mistake(wrong, message):
    with pytest.raises(ExerciseError, match=message):
        check_mask_tokens(wrong)


def test_mask_tokens_rejects_in_place_edits():
    def in_place(input_ids, vocab_size, mask_token_id, special_token_ids, generator):
        masked, labels = mask_tokens(input_ids, vocab_size, mask_token_id, special_token_ids, generator=generator)
        input_ids.copy_(masked)
        return masked, labels

    with pytest.raises(ExerciseError, match="in place"):
        check_mask_tokens(in_place)


def test_mask_tokens_random_ids_must_not_be_special():
    def special_random(input_ids, vocab_size, mask_token_id, special_token_ids, generator):
        masked, labels = mask_tokens(input_ids, vocab_size, mask_token_id, special_token_ids, generator=generator)
        swapped = (labels != -100) & (masked != mask_token_id) & (masked != input_ids)
        masked[swapped] = 0  # [PAD] as the "random" word
        return masked, labels

    with pytest.raises(ExerciseError, match="never a special token"):
        check_mask_tokens(special_random)


def test_stub_and_non_callable():
    def stub(*args):
        raise NotImplementedError

    with pytest.raises(ExerciseError, match="NotImplementedError"):
        check_mask_tokens(stub)
    with pytest.raises(ValueError, match="fn"):
        check_mask_tokens("mask_tokens")


# --------------------------------------------------------------------------- positions


def _table(num, dim, layout="interleave", sin_first=True, exponent_scale=1.0):
    p = torch.arange(num, dtype=torch.float64)[:, None]
    angles = p / 10000 ** (exponent_scale * torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    a, b = (torch.sin(angles), torch.cos(angles)) if sin_first else (torch.cos(angles), torch.sin(angles))
    if layout == "concat":
        return torch.cat([a, b], dim=1).float()
    return torch.stack([a, b], dim=-1).reshape(num, dim).float()


def test_sinusoidal_accepts_the_library_and_a_hand_written_table(capsys):
    check_sinusoidal_positions(sinusoidal_positions)
    check_sinusoidal_positions(_table)  # pow instead of exp-log: the same numbers within 1e-5
    assert capsys.readouterr().out.count("PASS") == 2


@pytest.mark.parametrize("wrong, message", [
    (lambda n, d: _table(n, d, sin_first=False), "swapped"),
    (lambda n, d: _table(n, d, layout="concat"), "interleave"),
    (lambda n, d: _table(n, d, exponent_scale=0.5), "factor 2"),
    (lambda n, d: _table(n, d)[:, : d // 2], "shape"),
    (lambda n, d: _table(n, d) + 1e-3, "differs"),
])
def test_sinusoidal_names_the_mistake(wrong, message):
    with pytest.raises(ExerciseError, match=message):
        check_sinusoidal_positions(wrong)


def test_hand_made_table_matches_the_formula():
    # PE(p, 2i) = sin(p / 10000^(2i/d)): position 3, dim 4 -> sin(3), cos(3), sin(3/100), cos(3/100)
    expected = torch.tensor([math.sin(3), math.cos(3), math.sin(0.03), math.cos(0.03)])
    torch.testing.assert_close(_table(4, 4)[3], expected, atol=1e-6, rtol=0)


# --------------------------------------------------------------------------- WordPiece


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(ShapeWorld(WorldConfig()).corpus(300), vocab_size=256)


def greedy_wordpiece(word, vocab, shortest=False, prefix="##", unk_whole_word=True):
    pieces, start = [], 0
    while start < len(word):
        ends = range(start + 1, len(word) + 1) if shortest else range(len(word), start, -1)
        for end in ends:
            piece = word[start:end] if start == 0 else prefix + word[start:end]
            if piece in vocab:
                pieces.append(piece)
                start = end
                break
        else:
            return ["[UNK]"] if unk_whole_word else pieces + ["[UNK]"]
    return pieces


def test_wordpiece_accepts_greedy_longest_match(tokenizer, capsys):
    check_wordpiece(greedy_wordpiece, tokenizer)
    assert "PASS wordpiece" in capsys.readouterr().out


def test_wordpiece_reference_on_hand_picked_words(tokenizer):
    # 'k' is not a letter of any ShapeWorld word, so "pink" is unknown as a whole.
    assert tokenizer.tokenize("pink") == ["[UNK]"]
    assert tokenizer.tokenize("circle") == ["circle"]
    assert tokenizer.tokenize("purple")[0] == "p" and all(p.startswith("##") for p in tokenizer.tokenize("purple")[1:])


@pytest.mark.parametrize("kwargs, message", [
    (dict(shortest=True), "LONGEST"),
    (dict(prefix=""), "##"),
    (dict(unk_whole_word=False), "WHOLE word"),
])
def test_wordpiece_names_the_mistake(tokenizer, kwargs, message):
    with pytest.raises(ExerciseError, match=message):
        check_wordpiece(lambda w, v: greedy_wordpiece(w, v, **kwargs), tokenizer)


def test_wordpiece_bad_arguments(tokenizer):
    with pytest.raises(ValueError, match="tokenizer"):
        check_wordpiece(greedy_wordpiece, {"a": 0})
    with pytest.raises(ExerciseError, match="list of strings"):
        check_wordpiece(lambda w, v: w, tokenizer)
