"""Text features: a WordPiece tokenizer, BERT's embeddings and BERT's masking recipe.

The three steps every text encoder of the course starts with:

1. ``train_tokenizer`` / ``encode``: captions -> token ids ``(B, L)`` and a padding mask ``(B, L)``;
2. ``TextEmbeddings``: ids -> word + position + token-type vectors ``(B, L, D)`` (BERT, Devlin et al. 2019);
3. ``mask_tokens``: BERT's masked-language-modelling corruption (15% chosen; 80% [MASK], 10% random, 10% kept).

The tokenizer comes from the ``tokenizers`` library (the reference implementation), wrapped as a
``transformers`` fast tokenizer so it saves and loads like any Hugging Face tokenizer.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import torch
from torch import nn
from transformers import PreTrainedTokenizerFast

from course_lib.utils import check_one_of, check_shape

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
PAD_ID, UNK_ID, CLS_ID, SEP_ID, MASK_ID = range(len(SPECIAL_TOKENS))
POSITION_KINDS = ("learned", "sinusoidal")


# --------------------------------------------------------------------------- tokenizer


def _check_texts(texts, allow_single: bool = False) -> list[str]:
    """Return ``texts`` as a list of non-blank strings, or raise ``ValueError`` naming the bad one."""
    if isinstance(texts, str):
        if not allow_single:
            raise ValueError("texts must be a list of strings, got a single string (wrap it in a list)")
        texts = [texts]
    if not isinstance(texts, Sequence) or len(texts) == 0:
        raise ValueError(f"texts must be a non-empty list of strings, got {texts!r}")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise ValueError(f"texts[{i}] must be a string, got {type(text).__name__}")
        if not text.strip():
            raise ValueError(f"texts[{i}] is empty or blank; every text needs at least one word")
    return list(texts)


def _bert_pipeline(model):
    """A ``tokenizers.Tokenizer`` around ``model`` that lower-cases, strips accents and splits on
    whitespace and punctuation, as BERT does."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers

    tokenizer = Tokenizer(model)
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    return tokenizer


def _learn_wordpiece_vocab(texts: list[str], vocab_size: int, min_frequency: int) -> dict[str, int]:
    """WordPiece vocabulary ``{token: id}`` learned by the ``tokenizers`` trainer, made deterministic.

    The trainer numbers the first pieces of a word ("##e", "##d", ...) in hash-map order, and breaks
    ties between equally frequent pairs by those numbers, so two runs on the same corpus can learn
    different vocabularies. A first pass with no merges collects the initial pieces; the second pass
    registers them up front in sorted order, which fixes every id and every tie.
    """
    from tokenizers import models, trainers

    def run_trainer(size: int, first_tokens: list[str]) -> dict[str, int]:
        tokenizer = _bert_pipeline(models.WordPiece(unk_token="[UNK]"))
        trainer = trainers.WordPieceTrainer(
            vocab_size=size, min_frequency=min_frequency, special_tokens=first_tokens, show_progress=False
        )
        tokenizer.train_from_iterator(texts, trainer=trainer)
        return tokenizer.get_vocab(with_added_tokens=False)

    initial_pieces = sorted(set(run_trainer(0, SPECIAL_TOKENS)) - set(SPECIAL_TOKENS))
    return run_trainer(vocab_size, SPECIAL_TOKENS + initial_pieces)


def train_tokenizer(texts: Sequence[str], vocab_size: int = 256, min_frequency: int = 1) -> PreTrainedTokenizerFast:
    """Train a BERT-style WordPiece tokenizer on ``texts`` (deterministic for the same corpus).

    Lower-cases and strips accents (``BertNormalizer``), splits on whitespace and punctuation
    (``BertPreTokenizer``), learns at most ``vocab_size`` WordPiece tokens, and wraps every encoding as
    ``[CLS] A [SEP]`` (pairs: ``[CLS] A [SEP] B [SEP]`` with token type 1 for ``B``). The special tokens
    ``[PAD] [UNK] [CLS] [SEP] [MASK]`` get ids 0..4.
    """
    from tokenizers import decoders, models, processors

    if isinstance(texts, str) or not isinstance(texts, Sequence):
        raise ValueError(f"texts must be a list of strings, got {type(texts).__name__}")
    if not any(isinstance(t, str) and t.strip() for t in texts):
        raise ValueError("texts is empty or holds only blank strings; the tokenizer needs a corpus of captions")
    texts = _check_texts(texts)
    if not isinstance(vocab_size, int) or vocab_size <= len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must be an int > {len(SPECIAL_TOKENS)} (the special tokens), got {vocab_size!r}")
    if not isinstance(min_frequency, int) or min_frequency < 1:
        raise ValueError(f"min_frequency must be a positive int, got {min_frequency!r}")

    vocab = _learn_wordpiece_vocab(texts, vocab_size, min_frequency)
    tokenizer = _bert_pipeline(models.WordPiece(vocab, unk_token="[UNK]", continuing_subword_prefix="##"))
    tokenizer.add_special_tokens(SPECIAL_TOKENS)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", CLS_ID), ("[SEP]", SEP_ID)],
    )
    tokenizer.decoder = decoders.WordPiece(prefix="##")
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_input_names=["input_ids", "token_type_ids", "attention_mask"],
    )


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, directory: str | Path) -> Path:
    """Save ``tokenizer`` into ``directory`` (created if needed) with ``save_pretrained``; returns the path."""
    if not hasattr(tokenizer, "save_pretrained"):
        raise ValueError(f"tokenizer must be a transformers tokenizer, got {type(tokenizer).__name__}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(directory))
    return directory


def load_tokenizer(directory: str | Path) -> PreTrainedTokenizerFast:
    """Load a tokenizer saved by ``save_tokenizer`` from the local ``directory`` (never from the Hub)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(
            f"directory {str(directory)!r} does not exist; create it with "
            "save_tokenizer(train_tokenizer(captions), directory)"
        )
    return PreTrainedTokenizerFast.from_pretrained(str(directory), local_files_only=True)


def encode(tokenizer: PreTrainedTokenizerFast, texts: Sequence[str] | str, max_length: int | None = None) -> dict:
    """Tokenize ``texts`` (B strings, or one string for B = 1) into padded id tensors.

    Returns ``{"input_ids": LongTensor (B, L), "attention_mask": LongTensor (B, L)}`` with
    ``[CLS] ... [SEP]`` around each text, padded with ``[PAD]`` to the longest text, or truncated to
    ``max_length`` tokens (the ``[SEP]`` is kept). ``attention_mask`` is 1 for real tokens, 0 for padding.
    """
    texts = _check_texts(texts, allow_single=True)
    if max_length is not None and (not isinstance(max_length, int) or max_length < 2):
        raise ValueError(f"max_length must be None or an int >= 2 (room for [CLS] and [SEP]), got {max_length!r}")
    batch = tokenizer(
        texts,
        padding="longest",
        truncation=max_length is not None,
        max_length=max_length,
        return_tensors="pt",
    )
    return {"input_ids": batch["input_ids"].long(), "attention_mask": batch["attention_mask"].long()}


# --------------------------------------------------------------------------- embeddings


def sinusoidal_positions(num_positions: int, dim: int) -> torch.Tensor:
    r"""Fixed sinusoidal position table ``(num_positions, dim)`` of Vaswani et al. 2017, section 3.5.

    .. math:: PE_{(p, 2i)} = \sin(p / 10000^{2i/d}), \qquad PE_{(p, 2i+1)} = \cos(p / 10000^{2i/d})
    """
    if not isinstance(num_positions, int) or num_positions < 1:
        raise ValueError(f"num_positions must be a positive int, got {num_positions!r}")
    if not isinstance(dim, int) or dim < 2 or dim % 2:
        raise ValueError(f"dim must be a positive even int (sin and cos pairs), got {dim!r}")
    position = torch.arange(num_positions, dtype=torch.float64)[:, None]  # (P, 1)
    inv_freq = torch.exp(-math.log(10000.0) * torch.arange(0, dim, 2, dtype=torch.float64) / dim)  # (D/2,)
    angles = position * inv_freq  # (P, D/2)
    table = torch.empty(num_positions, dim, dtype=torch.float64)
    table[:, 0::2] = torch.sin(angles)
    table[:, 1::2] = torch.cos(angles)
    return table.float()


class TextEmbeddings(nn.Module):
    """BERT's input embeddings: word + position + token type, then LayerNorm and dropout.

    ``forward(input_ids (B, L), token_type_ids (B, L) | None, position_ids (B, L) | (L,) | None) -> (B, L, D)``.
    Submodule names match ``transformers``' ``BertEmbeddings`` so its ``state_dict`` loads directly
    (learned positions). With ``positions="sinusoidal"`` the position table is a fixed buffer.
    """

    def __init__(
        self,
        vocab_size: int,
        dim: int,
        max_positions: int = 64,
        num_types: int = 2,
        positions: str = "learned",
        dropout: float = 0.0,
        layer_norm_eps: float = 1e-12,
    ):
        super().__init__()
        check_one_of("positions", positions, POSITION_KINDS)
        for name, value in [("vocab_size", vocab_size), ("dim", dim), ("max_positions", max_positions),
                            ("num_types", num_types)]:
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.vocab_size, self.max_positions, self.num_types = vocab_size, max_positions, num_types
        self.positions = positions
        self.word_embeddings = nn.Embedding(vocab_size, dim, padding_idx=PAD_ID)
        if positions == "learned":
            self.position_embeddings = nn.Embedding(max_positions, dim)
        else:
            self.register_buffer("position_embeddings", sinusoidal_positions(max_positions, dim), persistent=False)
        self.token_type_embeddings = nn.Embedding(num_types, dim)
        self.LayerNorm = nn.LayerNorm(dim, eps=layer_norm_eps)  # BERT's name, so HF weights load as they are
        self.dropout = nn.Dropout(dropout)

    def _check_ids(self, name: str, ids: torch.Tensor, high: int) -> None:
        if ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"{name} must hold integer ids (torch.long), got dtype {ids.dtype}")
        # Value checks need a device sync, so they run on CPU only (the notebooks); on a GPU an
        # out-of-range id still fails inside nn.Embedding.
        if ids.device.type == "cpu" and ids.numel() and (ids.min() < 0 or ids.max() >= high):
            raise ValueError(f"{name} must lie in [0, {high}), got values in [{ids.min()}, {ids.max()}]")

    def forward(self, input_ids: torch.Tensor, token_type_ids=None, position_ids=None) -> torch.Tensor:
        check_shape("input_ids", input_ids, (None, None))
        self._check_ids("input_ids", input_ids, self.vocab_size)
        B, L = input_ids.shape
        if L > self.max_positions:
            raise ValueError(f"input_ids has length {L} > max_positions={self.max_positions}; "
                             "truncate the text (encode(..., max_length=...)) or build a larger table")
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        check_shape("token_type_ids", token_type_ids, (B, L))
        self._check_ids("token_type_ids", token_type_ids, self.num_types)
        if position_ids is None:
            position_ids = torch.arange(L, device=input_ids.device)  # (L,)
        if position_ids.shape not in ((L,), (1, L), (B, L)):
            raise ValueError(f"position_ids must have shape (L,), (1, L) or (B, L) with L={L}, "
                             f"got {tuple(position_ids.shape)}")
        self._check_ids("position_ids", position_ids, self.max_positions)

        if self.positions == "learned":
            pos = self.position_embeddings(position_ids)  # (..., L, D)
        else:
            pos = self.position_embeddings[position_ids]  # (..., L, D), fixed table
        x = self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids) + pos  # (B, L, D)
        return self.dropout(self.LayerNorm(x))


# --------------------------------------------------------------------------- sentence pairs


def pack_pair(ids_a: torch.Tensor, mask_a: torch.Tensor, ids_b: torch.Tensor,
              mask_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """BERT's sentence pair from two padded batches: ``[CLS] A [SEP]`` ``(B, La)`` and ``B [SEP]``
    ``(B, Lb)`` (each with its 0/1 mask) -> ``(ids, mask, token_type_ids)``, each ``(B, La + Lb)``.

    Each row's second sentence starts right after the first one's last real token, and the padding
    of both goes to the end, as a tokenizer lays out a pair (``[CLS] A [SEP] B [SEP] [PAD]...``):
    positions count on without a gap. ``token_type_ids`` is BERT's segment: 0 for A (with its
    ``[CLS]`` and ``[SEP]``), 1 for B, 0 at padding.
    """
    check_shape("ids_a", ids_a, (None, None))
    check_shape("mask_a", mask_a, tuple(ids_a.shape))
    check_shape("ids_b", ids_b, (ids_a.shape[0], None))
    check_shape("mask_b", mask_b, tuple(ids_b.shape))
    ids = torch.cat([ids_a, ids_b], dim=1)  # (B, La + Lb)
    mask = torch.cat([mask_a, mask_b], dim=1).bool()
    types = torch.cat([torch.zeros_like(ids_a), torch.ones_like(ids_b)], dim=1)
    order = torch.argsort((~mask).int(), dim=1, stable=True)  # real tokens first, each sentence in order
    mask = mask.gather(1, order)
    ids = ids.gather(1, order).masked_fill(~mask, PAD_ID)
    types = types.gather(1, order).masked_fill(~mask, 0)
    return ids, mask.long(), types


# --------------------------------------------------------------------------- masking


def _check_probability(name: str, value: float) -> None:
    if not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {value!r}")


def mask_tokens(
    input_ids: torch.Tensor,
    vocab_size: int,
    mask_token_id: int,
    special_token_ids: Sequence[int] = (PAD_ID, UNK_ID, CLS_ID, SEP_ID, MASK_ID),
    mask_prob: float = 0.15,
    replace_prob: float = 0.8,
    random_prob: float = 0.1,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's masked-language-modelling corruption (Devlin et al. 2019, section 3.1; ALBEF's tensor form).

    Each non-special token is chosen with probability ``mask_prob``. A chosen token becomes ``[MASK]``
    with probability ``replace_prob``, a random non-special token with probability ``random_prob``,
    and stays unchanged otherwise. Special tokens (which include ``[PAD]``) are never chosen.

    Args:
        input_ids: ``(B, L)`` (any shape) integer ids.
        generator: the random stream; the same seed gives the same corruption.
    Returns:
        ``masked_ids`` (same shape as ``input_ids``) and ``labels``: the original id at chosen
        positions and ``-100`` (ignored by ``F.cross_entropy``) elsewhere. A row may have no chosen
        token (UNITER forces at least one; BERT and ALBEF do not).
    """
    if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in (torch.int64, torch.int32):
        got = getattr(input_ids, "dtype", type(input_ids).__name__)
        raise ValueError(f"input_ids must be an integer tensor of token ids, got {got}")
    if not isinstance(vocab_size, int) or vocab_size < 1:
        raise ValueError(f"vocab_size must be a positive int, got {vocab_size!r}")
    if not isinstance(mask_token_id, int) or not 0 <= mask_token_id < vocab_size:
        raise ValueError(f"mask_token_id must be an int in [0, vocab_size={vocab_size}), got {mask_token_id!r}")
    for name, p in [("mask_prob", mask_prob), ("replace_prob", replace_prob), ("random_prob", random_prob)]:
        _check_probability(name, p)
    if replace_prob + random_prob > 1.0 + 1e-9:
        raise ValueError(f"replace_prob + random_prob must be <= 1, got {replace_prob} + {random_prob}")
    special_set = {int(i) for i in special_token_ids}
    special = torch.tensor(sorted(special_set), dtype=input_ids.dtype, device=input_ids.device)
    normal_ids = torch.tensor([i for i in range(vocab_size) if i not in special_set], device=input_ids.device)
    if random_prob > 0 and len(normal_ids) == 0:
        raise ValueError(f"random_prob={random_prob} needs a non-special token in the vocabulary; special_token_ids "
                         f"cover all {vocab_size} ids")

    shape, device = input_ids.shape, input_ids.device
    can_choose = ~torch.isin(input_ids, special)
    chosen = (torch.rand(shape, generator=generator, device=device) < mask_prob) & can_choose
    action = torch.rand(shape, generator=generator, device=device)  # one draw decides [MASK] / random / keep
    to_mask = chosen & (action < replace_prob)
    to_random = chosen & (action >= replace_prob) & (action < replace_prob + random_prob)

    masked_ids = input_ids.clone()
    masked_ids[to_mask] = mask_token_id
    if len(normal_ids):
        random_ids = normal_ids[torch.randint(len(normal_ids), shape, generator=generator, device=device)]
        masked_ids[to_random] = random_ids[to_random].to(input_ids.dtype)
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, -100))
    return masked_ids, labels
