"""Image-text pairs generated on the fly, as an endless stream of micro-batches for pretraining
(and the same stream read from webdataset shards, at the end).

No pre-rendered dataset: sample ``i`` of the stream is ShapeWorld scene ``i`` of the training
split (rendered at any resolution, with one of its captions), or random tensors for
throughput tests. The stream is cut the way the training loop consumes it: optimizer step
``s`` uses the ``global_batch`` samples ``s * global_batch ... (s + 1) * global_batch - 1``;
micro-batch ``m`` (of ``accumulation``) of process ``rank`` (of ``world_size``) takes the slice

    s * global_batch + (m * world_size + rank) * micro_batch + [0, micro_batch)

so every sample is used once, by one process, whatever the number of processes and DataLoader
workers. A DataLoader worker ``w`` of ``W`` produces this process's micro-batches
``w, w + W, w + 2W, ...``; the DataLoader hands them out round-robin, i.e. in order. As every
sample is a pure function of ``(seed, i)``, 1 process with accumulation 4 sees exactly the
batches of 4 processes, and a resumed run (``start_step``) those of an uninterrupted one.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from itertools import count

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from course_lib.data.shapeworld import ShapeWorld


def _check_int(name: str, value, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def micro_batch_indices(k: int, micro_batch: int, accumulation: int = 1, rank: int = 0, world_size: int = 1,
                        start_step: int = 0) -> range:
    """Global sample indices of this process's micro-batch number ``k`` (counted from ``start_step``)."""
    for name, value, low in (("k", k, 0), ("micro_batch", micro_batch, 1), ("accumulation", accumulation, 1),
                             ("world_size", world_size, 1), ("start_step", start_step, 0)):
        _check_int(name, value, low)
    if not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an int in [0, world_size={world_size}), got {rank!r}")
    step, m = divmod(k, accumulation)
    global_batch = micro_batch * accumulation * world_size
    first = (start_step + step) * global_batch + (m * world_size + rank) * micro_batch
    return range(first, first + micro_batch)


class MicroBatchStream(IterableDataset):
    """Endless micro-batches ``make_batch(indices)`` for one process; use with
    ``DataLoader(stream, batch_size=None, num_workers=W)``.

    make_batch: ``list[int] -> dict`` of tensors, a deterministic function of the indices
    (e.g. :class:`ShapeWorldPairs`, :class:`SyntheticPairs`); it is pickled into the workers.
    """

    def __init__(self, make_batch: Callable[[list[int]], dict], micro_batch: int, accumulation: int = 1,
                 rank: int = 0, world_size: int = 1, start_step: int = 0):
        super().__init__()
        if not callable(make_batch):
            raise ValueError(f"make_batch must be callable indices -> batch, got {type(make_batch).__name__}")
        micro_batch_indices(0, micro_batch, accumulation, rank, world_size, start_step)  # validates
        self.make_batch = make_batch
        self.micro_batch, self.accumulation = micro_batch, accumulation
        self.rank, self.world_size, self.start_step = rank, world_size, start_step

    def indices(self, k: int) -> list[int]:
        """The sample indices of this process's micro-batch number ``k``."""
        return list(micro_batch_indices(k, self.micro_batch, self.accumulation, self.rank, self.world_size,
                                        self.start_step))

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for k in count(worker, workers):
            yield self.make_batch(self.indices(k))


MAX_CHARS_PER_WORD = 128  # a longer "word" is cut by bound_text (WordPiece makes any word over 100 chars [UNK])


def bound_text(text: str, max_tokens: int) -> str:
    """The start of ``text`` that holds its first ``max_tokens`` tokens, however long ``text`` is.

    A tokenizer reads the whole string before it truncates: one 20 MB caption took 9.5 GiB and
    65 s, for a model that reads ``context_length`` tokens. Every word (a run of non-space
    characters) gives at least one token (WordPiece, BPE), so the first ``max_tokens`` words hold
    the first ``max_tokens`` tokens: those are kept, within at most
    ``max_tokens * MAX_CHARS_PER_WORD`` characters. Tokenizing the result gives the same first
    ``max_tokens`` tokens as the whole text, except for a text of words longer than that limit
    or made only of characters the tokenizer drops (control characters).
    """
    _check_int("max_tokens", max_tokens, 1)
    head = text[: max_tokens * MAX_CHARS_PER_WORD]
    for index, word in enumerate(re.finditer(r"\S+", head)):
        if index == max_tokens:
            return head[: word.start()]
    return head


def _tokenize(tokenizer, texts: Sequence[str], context_length: int) -> dict:
    """Pad every text to ``context_length`` tokens: fixed shapes, so ``torch.compile`` compiles once.

    Each text is first cut to the part that holds its first ``context_length`` tokens
    (:func:`bound_text`): memory and time stay flat whatever a caption holds.
    """
    texts = [bound_text(text, context_length) for text in texts]
    enc = tokenizer(texts, padding="max_length", truncation=True, max_length=context_length,
                    return_tensors="pt")
    return {"input_ids": enc["input_ids"].long(), "attention_mask": enc["attention_mask"].long()}


class ShapeWorldPairs:
    """``indices -> {"images": uint8 (B, 3, H, W), "input_ids": (B, L), "attention_mask": (B, L), "index": (B,)}``.

    Sample ``i`` is scene ``i`` of ``world``'s training split rendered at ``image_size`` with
    caption number ``c`` drawn from the scene's own random stream, so it is the same in every
    process and worker. Images stay uint8 (4x less to copy to the GPU); the training loop
    scales them to [0, 1] on the device.
    """

    CAPTION_STREAM = 101  # a random stream of the scene that nothing else draws from

    def __init__(self, world: ShapeWorld, tokenizer, context_length: int, image_size: int | None = None):
        if not isinstance(world, ShapeWorld):
            raise ValueError(f"world must be a ShapeWorld, got {type(world).__name__}")
        _check_int("context_length", context_length, 2)
        self.world, self.tokenizer, self.context_length = world, tokenizer, context_length
        self.image_size = image_size or world.config.image_size
        _check_int("image_size", self.image_size, 16)

    def captions(self, scenes) -> list[str]:
        return [s.captions[int(s.rng(self.CAPTION_STREAM).integers(len(s.captions)))] for s in scenes]

    def __call__(self, indices: Sequence[int]) -> dict:
        scenes = self.world.scenes(indices, "train")
        pixels = self.world.render_batch(scenes, self.image_size)  # (B, H, W, 3) uint8
        images = torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous()  # (B, 3, H, W)
        return {"images": images, **_tokenize(self.tokenizer, self.captions(scenes), self.context_length),
                "index": torch.as_tensor(list(indices), dtype=torch.long)}


class SyntheticPairs:
    """Random uint8 images ``(B, 3, S, S)`` and random token ids ``(B, L)`` (every position real):
    the data of a throughput test, which must measure the model, not the data. Images are random
    8 x 8-pixel blocks (64x fewer random numbers than pixels: cheap enough for one DataLoader
    worker to feed a GPU). Sample ``i`` is a function of ``(seed, i)``, like a ShapeWorld sample."""

    BLOCK = 8

    def __init__(self, image_size: int, context_length: int, vocab_size: int, seed: int = 0):
        for name, value, low in (("image_size", image_size, 1), ("context_length", context_length, 2),
                                 ("vocab_size", vocab_size, 6), ("seed", seed, 0)):
            _check_int(name, value, low)
        self.image_size, self.context_length, self.vocab_size, self.seed = image_size, context_length, vocab_size, seed

    def __call__(self, indices: Sequence[int]) -> dict:
        n, s, length, b = len(indices), self.image_size, self.context_length, self.BLOCK
        blocks = torch.empty(n, 3, -(-s // b), -(-s // b), dtype=torch.uint8)  # (B, 3, ceil(S/8), ceil(S/8))
        input_ids = torch.empty(n, length, dtype=torch.long)
        g = torch.Generator()
        for row, i in enumerate(indices):
            g.manual_seed(int(np.random.SeedSequence((self.seed, int(i))).generate_state(1)[0]))
            blocks[row] = torch.randint(0, 256, blocks.shape[1:], dtype=torch.uint8, generator=g)
            input_ids[row] = torch.randint(5, self.vocab_size, (length,), generator=g)  # 0..4: special tokens
        h = blocks.shape[-1]
        images = blocks[:, :, :, None, :, None].expand(n, 3, h, b, h, b).reshape(n, 3, h * b, h * b)  # (B, 3, 8h, 8h)
        images = images[:, :, :s, :s].contiguous()
        return {"images": images, "input_ids": input_ids, "attention_mask": torch.ones(n, length, dtype=torch.long),
                "index": torch.as_tensor(list(indices), dtype=torch.long)}


class ShardBatches:
    """DataLoader ``collate_fn`` for ``course_lib.data.shards.ShardDataset`` samples ->
    ``{"images": (B, 3, H, W) float in [0, 1], "input_ids": (B, L), "attention_mask": (B, L)}``."""

    def __init__(self, tokenizer, context_length: int):
        _check_int("context_length", context_length, 2)
        self.tokenizer, self.context_length = tokenizer, context_length

    def __call__(self, samples: list[dict]) -> dict:
        if not samples:
            raise ValueError("samples is empty: nothing to collate")
        images = torch.stack([s["image"] for s in samples])  # (B, 3, H, W)
        return {"images": images, **_tokenize(self.tokenizer, [s["text"] for s in samples], self.context_length)}


def shard_micro_batches(shards, micro_batch: int, collate: Callable, skip: int = 0, **loader_kwargs):
    """Endless micro-batches of ``micro_batch`` samples streamed from webdataset ``shards``, epoch
    after epoch (``shards.set_epoch``), each process reading its own shards.

    A stream has no random access: a resumed run passes ``skip`` = the micro-batches already used,
    which are read and dropped (exact when the shards, processes and workers are the same).
    """
    _check_int("micro_batch", micro_batch, 1)
    _check_int("skip", skip, 0)
    # Workers must not persist: each epoch's workers copy the dataset with its new epoch number.
    loader_kwargs["persistent_workers"] = False
    loader = DataLoader(shards, batch_size=micro_batch, drop_last=True, collate_fn=collate, **loader_kwargs)
    produced = 0
    for epoch in count():
        shards.set_epoch(epoch)
        before = produced
        for batch in loader:
            produced += 1
            if produced > skip:
                yield batch
        if produced == before:
            raise ValueError(f"shards yield no full micro-batch of micro_batch={micro_batch} samples per process")
