"""Tests of course_lib.features.text: tokenizer, embeddings (parity with HF BertEmbeddings) and masking."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import math

import pytest
import torch
from transformers import BertConfig
from transformers.models.bert.modeling_bert import BertEmbeddings

from course_lib.features.text import (
    SPECIAL_TOKENS,
    TextEmbeddings,
    encode,
    load_tokenizer,
    mask_tokens,
    save_tokenizer,
    sinusoidal_positions,
    train_tokenizer,
)

torch.set_num_threads(1)

COLOURS, SHAPES = ["red", "green", "blue", "yellow"], ["circle", "square", "triangle"]
RELATIONS = ["left of", "right of", "above", "below"]
CAPTIONS = [
    f"a {c1} {s1} {rel} a {c2} {s2}"
    for c1 in COLOURS for s1 in SHAPES for rel in RELATIONS for c2, s2 in [("blue", "square"), ("red", "circle")]
]


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(CAPTIONS, vocab_size=80)


# --------------------------------------------------------------------------- tokenizer


def test_special_tokens_have_ids_0_to_4(tokenizer):
    assert [tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    assert (tokenizer.pad_token_id, tokenizer.unk_token_id, tokenizer.cls_token_id,
            tokenizer.sep_token_id, tokenizer.mask_token_id) == (0, 1, 2, 3, 4)
    assert len(tokenizer) <= 80


def test_encoding_adds_cls_sep_and_decodes_back(tokenizer):
    text = "A Red Circle left of a blue square"
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == 2 and ids[-1] == 3 and 1 not in ids  # [CLS] ... [SEP], no [UNK]
    assert tokenizer.convert_ids_to_tokens(ids)[1:4] == ["a", "red", "circle"]  # lower-cased words
    assert tokenizer.decode(ids, skip_special_tokens=True) == text.lower()
    pair = tokenizer("a red circle", "a blue square")
    assert pair["input_ids"].count(3) == 2 and pair["token_type_ids"] == [0] * 5 + [1] * 4


def test_training_is_deterministic(tokenizer):
    # The library's trainer alone learns one of several vocabularies at random (hash-map order).
    for _ in range(4):
        assert train_tokenizer(CAPTIONS, vocab_size=80).get_vocab() == tokenizer.get_vocab()


def test_save_load_round_trip(tokenizer, tmp_path):
    save_tokenizer(tokenizer, tmp_path / "tok")
    loaded = load_tokenizer(tmp_path / "tok")
    batch = CAPTIONS[:7] + ["a purple hexagon"]  # unseen letters -> [UNK]
    for key in ("input_ids", "attention_mask"):
        assert torch.equal(encode(loaded, batch)[key], encode(tokenizer, batch)[key])
    assert loaded.mask_token == "[MASK]" and loaded.pad_token_id == 0


def test_load_missing_directory_says_how_to_create_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="directory .*save_tokenizer"):
        load_tokenizer(tmp_path / "nope")


@pytest.mark.parametrize("bad", [[], ["", "   "], "a red circle"])
def test_train_rejects_empty_corpus(bad):
    with pytest.raises(ValueError, match="texts"):
        train_tokenizer(bad)


def test_encode_pads_to_longest_and_truncates(tokenizer):
    batch = encode(tokenizer, ["a red circle", "a blue square left of a red circle"])
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids.dtype == mask.dtype == torch.long and ids.shape == mask.shape
    lengths = mask.sum(1).tolist()
    assert lengths[1] == ids.shape[1] and lengths[0] < lengths[1]
    assert (ids[0, lengths[0]:] == 0).all() and ids[0, lengths[0] - 1] == 3  # [SEP] then [PAD]s
    short = encode(tokenizer, ["a blue square left of a red circle"], max_length=5)["input_ids"]
    assert short.shape == (1, 5) and short[0, 0] == 2 and short[0, -1] == 3
    assert encode(tokenizer, "a red circle")["input_ids"].shape[0] == 1


def test_encode_rejects_blank_text(tokenizer):
    with pytest.raises(ValueError, match=r"texts\[1\]"):
        encode(tokenizer, ["a red circle", "  "])
    with pytest.raises(ValueError, match="max_length"):
        encode(tokenizer, ["a red circle"], max_length=1)


# --------------------------------------------------------------------------- embeddings


def test_sinusoidal_values_by_hand():
    table = sinusoidal_positions(10, 4)  # frequencies 1 and 1/100
    assert table.shape == (10, 4)
    torch.testing.assert_close(table[0], torch.tensor([0.0, 1.0, 0.0, 1.0]), atol=0, rtol=0)
    expected = [math.sin(7), math.cos(7), math.sin(0.07), math.cos(0.07)]
    torch.testing.assert_close(table[7], torch.tensor(expected), atol=1e-7, rtol=0)  # float32 rounding
    with pytest.raises(ValueError, match="dim"):
        sinusoidal_positions(10, 5)


def test_text_embeddings_match_hf_bert_embeddings():
    config = BertConfig(vocab_size=50, hidden_size=32, max_position_embeddings=16, type_vocab_size=2,
                        hidden_dropout_prob=0.0)
    torch.manual_seed(0)
    hf = BertEmbeddings(config).eval()
    with torch.no_grad():
        hf.LayerNorm.weight.normal_(1.0, 0.2)
        hf.LayerNorm.bias.normal_(0.0, 0.2)
    ours = TextEmbeddings(50, 32, max_positions=16, num_types=2).eval()
    ours.load_state_dict(hf.state_dict())  # same parameter names, strict
    ids = torch.randint(0, 50, (3, 9))
    types = torch.randint(0, 2, (3, 9))
    # Same operations: equal within 1e-6.
    torch.testing.assert_close(ours(ids), hf(ids), atol=1e-6, rtol=0)
    torch.testing.assert_close(ours(ids, token_type_ids=types), hf(ids, token_type_ids=types), atol=1e-6, rtol=0)
    positions = torch.arange(9).flip(0)[None].expand(3, 9)
    torch.testing.assert_close(ours(ids, position_ids=positions), hf(ids, position_ids=positions), atol=1e-6, rtol=0)


def test_sinusoidal_embeddings_use_a_fixed_buffer():
    emb = TextEmbeddings(20, 8, max_positions=12, positions="sinusoidal")
    assert "position_embeddings" not in dict(emb.named_parameters())
    assert "position_embeddings.weight" not in emb.state_dict()
    ids = torch.tensor([[2, 7, 9, 3]])
    x = emb.word_embeddings(ids) + emb.token_type_embeddings(torch.zeros_like(ids)) + sinusoidal_positions(12, 8)[:4]
    expected = torch.nn.functional.layer_norm(x, (8,), emb.LayerNorm.weight, emb.LayerNorm.bias, 1e-12)
    torch.testing.assert_close(emb(ids), expected, atol=1e-6, rtol=0)


def test_embedding_errors_name_the_argument():
    emb = TextEmbeddings(20, 8, max_positions=4)
    with pytest.raises(ValueError, match="input_ids .*max_positions"):
        emb(torch.ones(1, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="input_ids"):
        emb(torch.full((1, 3), 20))
    with pytest.raises(ValueError, match="token_type_ids"):
        emb(torch.ones(1, 3, dtype=torch.long), token_type_ids=torch.full((1, 3), 2))
    with pytest.raises(ValueError, match="learned.*sinusoidal"):
        TextEmbeddings(20, 8, positions="rotary")


# --------------------------------------------------------------------------- masking


def _batch(generator):
    """(512, 64) ids from a 1000-token vocabulary: [CLS] words [SEP] [PAD]... with varying lengths."""
    ids = torch.randint(5, 1000, (512, 64), generator=generator)
    lengths = torch.randint(8, 64, (512,), generator=generator)
    pos = torch.arange(64)[None]
    ids[:, 0] = 2
    ids[pos == lengths[:, None] - 1] = 3
    ids[pos >= lengths[:, None]] = 0
    return ids


def test_mask_tokens_follows_bert_recipe():
    ids = _batch(torch.Generator().manual_seed(0))
    masked, labels = mask_tokens(ids, 1000, mask_token_id=4, generator=torch.Generator().manual_seed(1))
    special = ids < 5
    chosen = labels != -100
    assert not chosen[special].any() and torch.equal(masked[special], ids[special])  # specials and [PAD] untouched
    assert torch.equal(labels[chosen], ids[chosen]) and torch.equal(masked[~chosen], ids[~chosen])
    rate = chosen.sum() / (~special).sum()
    assert abs(rate.item() - 0.15) < 0.01  # about 7,000 chosen of 47,000: tolerance 1%
    n = chosen.sum()
    as_mask = (masked[chosen] == 4).sum() / n
    as_random = ((masked[chosen] != 4) & (masked[chosen] != ids[chosen])).sum() / n
    kept = (masked[chosen] == ids[chosen]).sum() / n
    assert abs(as_mask.item() - 0.8) < 0.02 and abs(as_random.item() - 0.1) < 0.02 and abs(kept.item() - 0.1) < 0.02
    assert (masked[chosen & (masked != 4)] >= 5).all()  # random replacements are never special tokens


def test_mask_tokens_is_deterministic_given_generator():
    ids = _batch(torch.Generator().manual_seed(0))
    first = mask_tokens(ids, 1000, 4, generator=torch.Generator().manual_seed(7))
    second = mask_tokens(ids, 1000, 4, generator=torch.Generator().manual_seed(7))
    other = mask_tokens(ids, 1000, 4, generator=torch.Generator().manual_seed(8))
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert not torch.equal(first[1], other[1])


def test_mask_tokens_validates_probabilities():
    ids = torch.tensor([[2, 10, 11, 3]])
    with pytest.raises(ValueError, match="mask_prob"):
        mask_tokens(ids, 20, 4, mask_prob=1.5)
    with pytest.raises(ValueError, match="replace_prob \\+ random_prob"):
        mask_tokens(ids, 20, 4, replace_prob=0.8, random_prob=0.3)
    with pytest.raises(ValueError, match="mask_token_id"):
        mask_tokens(ids, 20, 20)
    with pytest.raises(ValueError, match="input_ids"):
        mask_tokens(ids.float(), 20, 4)
