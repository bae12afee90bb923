"""Webdataset shards: round trip, corrupt data skipped and counted, splitting, crash + resume."""

import io
import os
import tarfile
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from course_lib.data.shards import (
    ShardDataset,
    ShardError,
    SkipSample,
    collate_shards,
    read_manifest,
    verify_shards,
    write_shards,
)

# JPEG at quality 95 on smooth images: mean |error| < 0.01 and max |error| < 0.06 (in [0, 1] units).
JPEG_MEAN_TOL, JPEG_MAX_TOL = 0.01, 0.06


def smooth_image(i: int, h: int = 24, w: int = 32) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 5 + 3 * i, y * 9, np.full_like(x, (40 * i) % 256)], -1).astype(np.uint8)


def make_samples(n: int, start: int = 0) -> list[dict]:
    samples = []
    for i in range(start, start + n):
        image = smooth_image(i)
        if i % 3 == 1:
            image = Image.fromarray(image)  # PIL input
        elif i % 3 == 2:
            buffer = io.BytesIO()
            Image.fromarray(image).save(buffer, format="JPEG", quality=95)
            image = buffer.getvalue()  # already-encoded bytes
        samples.append({"__key__": f"s{i:04d}", "jpg": image, "txt": f"caption {i}: ünïcode ✓",
                        "json": {"i": i, "objects": [{"box": [1, 2, 3, 4]}], "name": f"n{i}"}})
    return samples


def read_all(path, **kw) -> list[dict]:
    return list(ShardDataset(path, split_by_node=False, split_by_worker=False, **kw))


def test_round_trip_images_texts_json_and_manifest(tmp_path):
    samples = make_samples(7)
    summary = write_shards(samples, tmp_path, "train", max_count=3)
    assert summary.shards == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    assert (summary.samples, summary.written, summary.consumed, summary.skipped) == (7, 7, 7, {})
    manifest = read_manifest(tmp_path, "train")
    assert [r["samples"] for r in manifest["shards"]] == [3, 3, 1] and manifest["complete"]
    assert sorted(os.listdir(tmp_path)) == summary.shards + ["train-manifest.json"]

    out = read_all(tmp_path)
    assert [o["key"] for o in out] == [s["__key__"] for s in samples]
    for o, s in zip(out, samples):
        assert o["text"] == s["txt"] and o["meta"] == s["json"]
        assert o["image"].dtype == torch.float32 and o["image"].shape == (3, 24, 32)
        reference = torch.from_numpy(smooth_image(int(s["__key__"][1:]))).permute(2, 0, 1).float() / 255
        error = (o["image"] - reference).abs()
        assert error.mean() < JPEG_MEAN_TOL and error.max() < JPEG_MAX_TOL
    assert ShardDataset(tmp_path).num_samples == 7


def test_same_samples_give_byte_identical_shards(tmp_path):
    write_shards(make_samples(4), tmp_path / "a", "x", max_count=2)
    write_shards(make_samples(4), tmp_path / "b", "x", max_count=2)
    for name in ("x-000000.tar", "x-000001.tar"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_decode_rgb_resize_and_collate(tmp_path):
    write_shards(make_samples(4), tmp_path, "t", max_count=10)
    pil = read_all(tmp_path, decode="rgb")
    assert isinstance(pil[0]["image"], Image.Image) and pil[0]["image"].size == (32, 24)
    square = read_all(tmp_path, image_size=16)
    assert square[0]["image"].shape == (3, 16, 16)
    rect = read_all(tmp_path, image_size=(8, 12))
    assert rect[0]["image"].shape == (3, 8, 12)
    loader = DataLoader(ShardDataset(tmp_path, image_size=16), batch_size=3, collate_fn=collate_shards)
    batches = list(loader)
    assert batches[0]["image"].shape == (3, 3, 16, 16) and batches[1]["image"].shape == (1, 3, 16, 16)
    assert batches[0]["text"][1] == "caption 1: ünïcode ✓" and batches[1]["meta"][0]["i"] == 3


def raw_shard(path, samples) -> None:
    """A shard written as it is given (bytes only, nothing checked): what a broken writer leaves."""
    with tarfile.open(path, "w") as tar:
        for sample in samples:
            for name, data in sample.items():
                if name != "__key__":
                    info = tarfile.TarInfo(f"{sample['__key__']}.{name}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))


def jpeg(i: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(smooth_image(i)).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def test_corrupt_samples_are_skipped_and_counted(tmp_path):
    samples = [{"__key__": f"s{i:04d}", "jpg": jpeg(i), "txt": b"a caption", "json": b"{}"} for i in range(5)]
    samples[1]["jpg"] = b"\xff\xd8 this is not a jpeg"
    samples[3]["json"] = b"{not json"
    raw_shard(tmp_path / "t-000000.tar", samples)
    dataset = ShardDataset(tmp_path, split_by_node=False, split_by_worker=False)
    with pytest.warns(UserWarning, match="skipping a corrupt sample"):
        keys = [o["key"] for o in dataset]
    assert keys == ["s0000", "s0002", "s0004"]
    assert dataset.stats["skipped"] == 2
    assert dataset.stats["reasons"] == {"corrupt_image": 1, "corrupt_json": 1}
    assert "s0003" in dataset.stats["last_error"] and "JSON" in dataset.stats["last_error"]
    with pytest.raises(ShardError, match="sample 's0001'.*not a decodable image"):
        read_all(tmp_path, handler="raise")


def test_writer_checks_each_sample_before_writing_it(tmp_path):
    # The fault: invalid JPEG bytes were stored, and counted in the manifest as a sample.
    samples = make_samples(6)
    samples[1]["jpg"] = b"\xff\xd8 this is not a jpeg"
    samples[2]["jpg"] = jpeg(2)[:200]  # a JPEG cut short: its header opens, its pixels do not decode
    samples[3]["txt"] = b"\xff\xfe not utf-8"
    samples[4]["json"] = b"{not json"
    summary = write_shards(samples, tmp_path, "t", max_count=10)
    assert (summary.samples, summary.written) == (2, 2)
    assert summary.skipped == {"corrupt_image": 2, "corrupt_txt": 1, "corrupt_json": 1}
    assert read_manifest(tmp_path, "t")["shards"][0]["skipped"] == summary.skipped
    assert [o["key"] for o in read_all(tmp_path)] == ["s0000", "s0005"]
    assert verify_shards(tmp_path) == {"shards": 1, "samples": 2}  # the manifest's count is the readable one


def test_a_sample_without_its_caption_is_skipped_and_counted(tmp_path):
    # The fault: it was yielded with an empty caption, and not counted.
    samples = [{"__key__": f"s{i}", "jpg": jpeg(i), "txt": f"caption {i}".encode()} for i in range(3)]
    del samples[1]["txt"]
    raw_shard(tmp_path / "t-000000.tar", samples)
    dataset = ShardDataset(tmp_path, split_by_node=False, split_by_worker=False)
    with pytest.warns(UserWarning, match="s1.*has no caption"):
        assert [o["text"] for o in dataset] == ["caption 0", "caption 2"]
    assert dataset.stats["reasons"] == {"missing_txt": 1}
    assert [o["text"] for o in read_all(tmp_path, require_text=False)] == ["caption 0", "", "caption 2"]
    with pytest.raises(ShardError, match="sample 's1'.*no caption"):
        verify_shards(tmp_path)


def test_corrupt_and_truncated_shards_are_named(tmp_path):
    write_shards(make_samples(6), tmp_path, "t", max_count=3)
    (tmp_path / "garbage.tar").write_bytes(b"definitely not a tar file" * 50)
    dataset = ShardDataset(tmp_path, split_by_node=False, split_by_worker=False)
    with pytest.warns(UserWarning):
        assert len(list(dataset)) == 6
    assert dataset.stats["skipped"] == 1 and "garbage.tar" in dataset.stats["last_error"]
    with pytest.raises(ShardError, match="invalid header.*garbage.tar"):
        verify_shards(tmp_path)
    os.remove(tmp_path / "garbage.tar")
    assert verify_shards(tmp_path) == {"shards": 2, "samples": 6}

    shard = tmp_path / "t-000001.tar"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])  # a shard cut short (e.g. a copy that died)
    with pytest.raises(ShardError, match="t-000001.tar"):
        verify_shards(tmp_path)


def test_two_dataloader_workers_cover_every_sample_once(tmp_path):
    samples = make_samples(10)
    write_shards(samples, tmp_path, "t", max_count=3)  # 4 shards: 3, 3, 3, 1
    loader = DataLoader(ShardDataset(tmp_path, image_size=8), batch_size=None, num_workers=2)
    keys = [o["key"] for o in loader]
    assert sorted(keys) == [s["__key__"] for s in samples]  # each exactly once


def test_split_by_node_uses_rank_and_world_size(tmp_path, monkeypatch):
    write_shards(make_samples(10), tmp_path, "t", max_count=2)
    per_rank = []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        per_rank.append({o["key"] for o in ShardDataset(tmp_path, split_by_worker=False)})
    assert per_rank[0].isdisjoint(per_rank[1])
    assert sorted(per_rank[0] | per_rank[1]) == [f"s{i:04d}" for i in range(10)]
    assert len(per_rank[0]) == 6 and len(per_rank[1]) == 4  # shards 0, 2, 4 and 1, 3


def test_shuffle_is_seeded_and_keeps_every_sample(tmp_path):
    write_shards(make_samples(12), tmp_path, "t", max_count=3)
    first = [o["key"] for o in read_all(tmp_path, shuffle=5, seed=1)]
    again = [o["key"] for o in read_all(tmp_path, shuffle=5, seed=1)]
    assert first == again and sorted(first) == [f"s{i:04d}" for i in range(12)]
    assert first != sorted(first)
    dataset = ShardDataset(tmp_path, shuffle=5, seed=1, split_by_node=False, split_by_worker=False)
    dataset.set_epoch(1)
    assert [o["key"] for o in dataset] != first


def crashing(samples, after):
    for i, sample in enumerate(samples):
        if i == after:
            raise RuntimeError("simulated crash")
        yield sample


def test_resume_after_crash_loses_and_duplicates_nothing(tmp_path):
    samples = make_samples(11)
    with pytest.raises(RuntimeError, match="simulated crash"):
        write_shards(crashing(samples, after=7), tmp_path, "t", max_count=3)
    # shards 0 and 1 are complete; shard 2 holds one sample under its temporary name only
    assert (tmp_path / "t-000002.tar.tmp").exists() and not (tmp_path / "t-000002.tar").exists()
    assert [r["samples"] for r in read_manifest(tmp_path, "t")["shards"]] == [3, 3]
    assert [o["key"] for o in ShardDataset(tmp_path, split_by_node=False)] == [f"s{i:04d}" for i in range(6)]
    kept = {name: (tmp_path / name).stat().st_mtime_ns for name in ("t-000000.tar", "t-000001.tar")}

    summary = write_shards(samples, tmp_path, "t", max_count=3, resume=True)
    assert (summary.resumed_shards, summary.written, summary.samples) == (2, 5, 11)
    assert {name: (tmp_path / name).stat().st_mtime_ns for name in kept} == kept  # not rewritten
    assert not list(tmp_path.glob("*.tmp"))
    assert [o["key"] for o in read_all(tmp_path)] == [s["__key__"] for s in samples]
    clean = tmp_path / "clean"
    write_shards(make_samples(11), clean, "t", max_count=3)
    for name in summary.shards:
        assert (tmp_path / name).read_bytes() == (clean / name).read_bytes()


def test_resume_skips_lazy_items_already_written_and_counts_skips(tmp_path):
    calls = []

    def lazy(i):
        def build():
            calls.append(i)
            if i in (2, 5):
                raise SkipSample("missing_image", f"image {i}")
            return make_samples(1, start=i)[0]
        return build

    with pytest.raises(RuntimeError):
        write_shards(crashing([lazy(i) for i in range(9)], after=6), tmp_path, "t", max_count=2)
    first = read_manifest(tmp_path, "t")["shards"]
    assert [r["consumed"] for r in first] == [2, 5]  # a full shard is completed at once: items 0-4
    assert [r["skipped"] for r in first] == [{}, {"missing_image": 1}]
    calls.clear()
    summary = write_shards([lazy(i) for i in range(9)], tmp_path, "t", max_count=2, resume=True)
    assert calls == [5, 6, 7, 8]  # items 0-4 were not rebuilt
    assert summary.skipped == {"missing_image": 2} and summary.samples == 7 and summary.consumed == 9
    keys = [o["key"] for o in read_all(tmp_path)]
    assert keys == [f"s{i:04d}" for i in range(9) if i not in (2, 5)]


def test_resume_rejects_different_settings_and_fresh_start_replaces(tmp_path):
    write_shards(make_samples(4), tmp_path, "t", max_count=2)
    with pytest.raises(ValueError, match="max_count=3 differs"):
        write_shards(make_samples(4), tmp_path, "t", max_count=3, resume=True)
    with pytest.raises(ValueError, match="image_size=64 differs"):
        write_shards(make_samples(4), tmp_path, "t", max_count=2, resume=True, config={"image_size": 64})
    with pytest.raises(ValueError, match="samples: resuming needs at least the 4 input items"):
        write_shards(make_samples(3), tmp_path, "t", max_count=2, resume=True)
    summary = write_shards(make_samples(1), tmp_path, "t", max_count=2)  # resume=False: start over
    assert summary.shards == ["t-000000.tar"] and sorted(p.name for p in tmp_path.glob("*.tar")) == summary.shards


def test_resume_rewrites_from_a_damaged_shard(tmp_path):
    write_shards(make_samples(6), tmp_path, "t", max_count=2)
    (tmp_path / "t-000001.tar").write_bytes(b"damaged")
    summary = write_shards(make_samples(6), tmp_path, "t", max_count=2, resume=True)
    assert summary.resumed_shards == 1 and summary.written == 4
    assert verify_shards(tmp_path) == {"shards": 3, "samples": 6}


def test_bad_inputs_name_the_argument(tmp_path):
    with pytest.raises(FileNotFoundError, match="urls_or_dir: .*nowhere does not exist"):
        ShardDataset(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no .tar shards in directory .*empty"):
        ShardDataset(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="no shards match"):
        ShardDataset(str(tmp_path / "x-*.tar"))
    with pytest.raises(FileNotFoundError, match="do not exist"):
        ShardDataset(str(tmp_path / "x-{000000..000002}.tar"))
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "t-000000.tar.tmp").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="unfinished t-000000.tar.tmp"):
        ShardDataset(tmp_path / "half")
    write_shards(make_samples(1), tmp_path / "ok", "t")
    with pytest.raises(ValueError, match="decode="):
        ShardDataset(tmp_path / "ok", decode="bgr")
    with pytest.raises(ValueError, match="handler="):
        ShardDataset(tmp_path / "ok", handler="ignore")
    with pytest.raises(ValueError, match="image_size"):
        ShardDataset(tmp_path / "ok", image_size=0)
    with pytest.raises(ValueError, match="shuffle"):
        ShardDataset(tmp_path / "ok", shuffle=-1)
    with pytest.raises(ValueError, match="max_count"):
        write_shards(make_samples(1), tmp_path / "w", "t", max_count=0)
    with pytest.raises(ValueError, match="prefix"):
        write_shards(make_samples(1), tmp_path / "w", "a.b")
    with pytest.raises(ValueError, match="__key__"):
        write_shards([{"__key__": "has.dot", "txt": "x"}], tmp_path / "w", "t")
    with pytest.raises(ValueError, match="jpg"):
        write_shards([{"__key__": "k", "jpg": np.zeros((4, 4, 3), np.float32)}], tmp_path / "w", "t")
    with pytest.raises(ValueError, match="field 'txt' must be str or bytes"):
        write_shards([{"__key__": "k", "txt": 3}], tmp_path / "w", "t")


def test_too_few_shards_for_the_readers_warns(tmp_path, monkeypatch):
    write_shards(make_samples(2), tmp_path, "t")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert len(list(ShardDataset(tmp_path, split_by_worker=False))) == 2
    assert any("1 shards for 2 readers" in str(w.message) for w in caught)
