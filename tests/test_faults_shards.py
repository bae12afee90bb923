"""Fault suite, shards: every kind of damage a shard can carry, read back as a hostile user would.

Each damaged sample is skipped and counted under its own reason in ``ShardDataset.stats``; the
intact ones come through unchanged; ``handler="raise"`` and ``verify_shards`` name the first
fault. A caption of megabytes costs no more memory or time than a short one.
"""

import io
import tarfile
import time
import warnings

import numpy as np
import pytest
from PIL import Image

from course_lib.data.onthefly import MAX_CHARS_PER_WORD, ShardBatches, bound_text
from course_lib.data.shards import ShardDataset, ShardError, verify_shards, write_shards


def jpeg(i: int) -> bytes:
    y, x = np.mgrid[0:16, 0:16]
    pixels = np.stack([x * 9 + i, y * 9, np.full_like(x, 20 * i)], -1).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def good(key: str, i: int) -> dict:
    return {"__key__": key, "jpg": jpeg(i), "txt": f"caption {key}".encode(), "json": b'{"i": %d}' % i}


def raw_shard(path, samples, members=None) -> bytes:
    """Write a tar as given (no checks: what a broken writer or a bad copy leaves); return its bytes."""
    with tarfile.open(path, "w") as tar:
        for name, data in members or [(f"{s['__key__']}.{k}", v) for s in samples for k, v in s.items()
                                      if k != "__key__"]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path.read_bytes()


def member_offsets(data: bytes) -> dict:
    """{member name: (header offset, data offset)} of an uncompressed tar."""
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return {m.name: (m.offset, m.offset_data) for m in tar.getmembers()}


@pytest.fixture()
def damaged(tmp_path):
    """A directory of shards holding every kind of damage, and what reading it must give."""
    root = tmp_path / "shards"
    root.mkdir()
    sample_faults = [good("a0", 0), good("a1", 1), good("a2", 2), good("a3", 3), good("a4", 4), good("a5", 5),
                     good("a6", 6)]
    del sample_faults[1]["txt"]                      # a sample without its caption
    del sample_faults[2]["jpg"]                      # a sample without its image
    sample_faults[3]["jpg"] = jpeg(3)[:150]          # a JPEG cut short
    sample_faults[4]["txt"] = b"\xff\xfe caption"    # a caption that is not UTF-8
    sample_faults[5]["json"] = b"{not json"          # json that does not parse
    raw_shard(root / "a.tar", sample_faults)
    # A field twice in one sample: the first one is kept, the duplicate counted.
    raw_shard(root / "b.tar", [], members=[("b0.jpg", jpeg(7)), ("b0.txt", b"first"), ("b0.txt", b"second")])
    # Cut inside the data of c2's jpg: c0 and c1 come through; c2 is dropped as truncated.
    data = raw_shard(root / "c.tar", [good("c0", 8), good("c1", 9), good("c2", 10)])
    (root / "c.tar").write_bytes(data[: member_offsets(data)["c2.jpg"][1] + 100])
    # Cut cleanly between two members of d1 (tarfile reads it without error): d1 lost its caption and
    # json, and without the end-of-archive blocks the cut is found; d1 is dropped as truncated.
    data = raw_shard(root / "d.tar", [good("d0", 11), good("d1", 12)])
    (root / "d.tar").write_bytes(data[: member_offsets(data)["d1.txt"][0]])
    (root / "e.tar").write_bytes(b"<html><body>404 Not Found</body></html>")  # not a tar at all
    (root / "f.tar").write_bytes(b"")                                          # an empty file
    return {
        "root": root,
        "keys": ["a0", "a6", "b0", "c0", "c1", "d0"],
        "reasons": {"missing_txt": 1, "missing_image": 1, "corrupt_image": 1, "corrupt_txt": 1, "corrupt_json": 1,
                    "duplicate_field": 1, "corrupt_shard": 4, "truncated_sample": 2},
    }


def test_every_kind_of_damage_is_skipped_and_counted_by_reason(damaged):
    dataset = ShardDataset(damaged["root"], split_by_node=False, split_by_worker=False)
    with pytest.warns(UserWarning, match="skipping a corrupt sample or shard"):
        samples = list(dataset)
    assert [s["key"] for s in samples] == damaged["keys"]
    assert dataset.stats["reasons"] == damaged["reasons"]
    assert dataset.stats["skipped"] == sum(damaged["reasons"].values())
    assert {s["key"]: s["text"] for s in samples}["b0"] == "first"
    assert all(s["text"] == f"caption {s['key']}" for s in samples if s["key"] != "b0")


def test_a_shard_cut_anywhere_never_yields_a_partial_sample(tmp_path):
    # The fault: the partial last sample of a truncated tar came through (empty caption, no json).
    full = raw_shard(tmp_path / "full.tar", [good(f"k{i}", i) for i in range(3)])
    ends = sorted(data + size for data, size in
                  ((m.offset_data, m.size) for m in tarfile.open(fileobj=io.BytesIO(full)).getmembers()))
    for cut in list(range(0, len(full), 61)) + ends:
        (tmp_path / "cut.tar").write_bytes(full[:cut])
        dataset = ShardDataset(tmp_path / "cut.tar", split_by_node=False, split_by_worker=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            samples = list(dataset)
        for sample in samples:  # every sample that comes through is whole
            i = int(sample["key"][1:])
            assert (sample["text"], sample["meta"]) == (f"caption k{i}", {"i": i}), (cut, sample["key"])
        if cut < ends[-1]:  # some member's data is missing: the cut must be found
            assert dataset.stats["reasons"].get("corrupt_shard") == 1 and len(samples) < 3, cut


def test_a_shard_cut_inside_a_header_and_zero_filled_is_found(tmp_path):
    # The fault: a crash can leave a file of its full size whose end is zeros. tarfile stops quietly
    # at the damaged header, and the file ends in zeros as a complete tar does: z2 was lost unseen.
    full = raw_shard(tmp_path / "full.tar", [good(f"z{i}", i) for i in range(3)])
    header = member_offsets(full)["z2.jpg"][0]
    (tmp_path / "z.tar").write_bytes(full[: header + 100] + bytes(len(full) - header - 100))
    dataset = ShardDataset(tmp_path / "z.tar", split_by_node=False, split_by_worker=False)
    with pytest.warns(UserWarning, match=f"damaged member header at byte {header}"):
        samples = list(dataset)
    assert [s["key"] for s in samples] == ["z0"]  # z1 came last before the break: dropped, as it may be incomplete
    assert dataset.stats["reasons"] == {"corrupt_shard": 1, "truncated_sample": 1}
    with pytest.raises(ShardError, match=f"damaged member header at byte {header}"):
        verify_shards(tmp_path / "z.tar")


def test_members_after_the_end_of_archive_blocks_are_reported(tmp_path):
    first = raw_shard(tmp_path / "first.tar", [good("j0", 0)])
    second = raw_shard(tmp_path / "second.tar", [good("j1", 1)])
    (tmp_path / "joined.tar").write_bytes(first + second)  # two tars joined: tarfile reads only the first
    with pytest.raises(ShardError, match=f"data at byte {len(first)}, after its end-of-archive blocks"):
        verify_shards(tmp_path / "joined.tar")
    (tmp_path / "padded.tar").write_bytes(first + bytes(4096))  # zeros after the end: a complete tar
    assert verify_shards(tmp_path / "padded.tar", require_text=True) == {"shards": 1, "samples": 1}


@pytest.mark.parametrize("shard, message", [
    ("a.tar", r"sample 'a1' .* has no caption"),
    ("b.tar", r"sample 'b0' .* field 'txt' twice"),
    ("c.tar", r"ReadError: unexpected end of data \(shard .*c.tar is corrupt or cut short\)"),
    ("d.tar", r"ends without the tar end-of-archive blocks: it was cut short \(shard .*d.tar"),
    ("e.tar", r"shard .*e.tar is corrupt or cut short"),
    ("f.tar", r"shard .*f.tar is corrupt or cut short"),
])
def test_raise_mode_names_the_first_fault_of_each_shard(damaged, shard, message):
    with pytest.raises(ShardError, match=message):
        verify_shards(damaged["root"] / shard)


def test_the_writer_never_stores_what_the_reader_would_skip(tmp_path):
    samples = [good(f"w{i}", i) for i in range(5)]
    samples[1]["jpg"] = b"\xff\xd8 not a jpeg"
    samples[2]["jpg"] = jpeg(2)[:150]
    samples[3]["txt"] = b"\xff\xfe"
    samples[4]["json"] = b"{"
    summary = write_shards(samples, tmp_path, "w")
    assert summary.samples == 1 and summary.skipped == {"corrupt_image": 2, "corrupt_txt": 1, "corrupt_json": 1}
    assert verify_shards(tmp_path) == {"shards": 1, "samples": 1}


class SpyTokenizer:
    """Records the length of every text it is asked to tokenize, then tokenizes it."""

    def __init__(self, tokenizer):
        self.tokenizer, self.lengths = tokenizer, []

    def __call__(self, texts, **kwargs):
        self.lengths += [len(t) for t in texts]
        return self.tokenizer(texts, **kwargs)


@pytest.fixture(scope="module")
def tokenizer():
    from course_lib.features.text import train_tokenizer
    return train_tokenizer(["a red circle and a blue square", "two green triangles", "caption of a shape"])


def test_a_caption_of_megabytes_is_bounded_before_tokenizing(tmp_path, tokenizer):
    # The fault: one 20 MB caption took 9.5 GiB and 65 s per step; the model reads 16 tokens of it.
    # (2 MB here; benchmarks/bench_shards.py measures the 20 MB case.)
    huge = "a red circle and a blue square " * 70_000  # about 2.2 MB
    write_shards([{"__key__": "big", "jpg": jpeg(0), "txt": huge}, {"__key__": "small", "jpg": jpeg(1),
                  "txt": "two green triangles"}], tmp_path, "t")
    spy = SpyTokenizer(tokenizer)
    started = time.perf_counter()
    samples = list(ShardDataset(tmp_path, split_by_node=False, split_by_worker=False))
    batch = ShardBatches(spy, context_length=16)(samples)
    seconds = time.perf_counter() - started
    assert max(spy.lengths) <= 16 * MAX_CHARS_PER_WORD  # what reaches the tokenizer is bounded
    assert batch["input_ids"].shape == (2, 16)
    full = tokenizer([huge[:10_000]], truncation=True, max_length=16)["input_ids"][0]
    assert batch["input_ids"][0].tolist() == full  # the same 16 tokens as the whole caption gives
    assert seconds < 20, seconds  # reading 2 MB and 16 tokens: well under a second on a quiet machine


def test_a_caption_is_read_up_to_max_text_bytes_cut_at_a_character(tmp_path):
    write_shards([{"__key__": "k", "jpg": jpeg(0), "txt": "é" * 1000}], tmp_path, "t")  # 2 bytes per character
    [sample] = ShardDataset(tmp_path, split_by_node=False, split_by_worker=False, max_text_bytes=101)
    assert sample["text"] == "é" * 50  # 101 bytes cut inside the 51st character: 50 whole ones kept


@pytest.mark.parametrize("text, kept", [
    ("a short caption", "a short caption"),
    ("one two three four five", "one two three "),
    ("x" * 10_000, "x" * 3 * MAX_CHARS_PER_WORD),
    ("", ""),
])
def test_bound_text_keeps_the_first_words(text, kept):
    assert bound_text(text, 3) == kept
