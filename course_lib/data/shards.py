"""Webdataset shards: write (image, text, json) samples to tar files and stream them back.

A shard is a plain tar file whose members are grouped into samples by their name before the
first dot: ``000123.jpg``, ``000123.txt``, ``000123.json`` form the sample ``000123``
(the `webdataset <https://github.com/webdataset/webdataset>`_ format). Reading shards
sequentially from disk is what lets a GPU job stream millions of images without random
access to millions of small files.

On disk, ``write_shards`` produces::

    out_dir/prefix-000000.tar, prefix-000001.tar, ...   complete shards
    out_dir/prefix-manifest.json                          which shards are complete, with counts
    out_dir/prefix-000002.tar.tmp                         (only while a shard is being written)

A shard is written under a temporary name and renamed when it is complete, so a crash never
leaves half a shard under a final name; ``resume=True`` keeps the complete shards and goes on
from the first input item they do not cover.
"""

from __future__ import annotations

import functools
import glob
import io
import json
import logging
import os
import re
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import IterableDataset

from course_lib.utils import check_one_of

log = logging.getLogger(__name__)

SHARD_DIGITS = 6
TMP_SUFFIX = ".tmp"
MANIFEST_SUFFIX = "-manifest.json"
JPEG_QUALITY = 95
TAR_MTIME = 0.0  # fixed member times: the same samples always give byte-identical shards
IMAGE_FIELDS = ("jpg", "jpeg", "png", "webp")


class SkipSample(Exception):
    """Raised by a lazy sample (a zero-argument callable) whose input is unusable.

    ``write_shards`` counts it under ``reason`` (e.g. ``"missing_image"``) and goes on.
    """

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


# ----------------------------------------------------------------------------- writing


@dataclass
class ShardSummary:
    """What ``write_shards`` did. ``skipped`` counts unusable input items by reason."""

    out_dir: Path
    prefix: str
    shards: list[str]
    samples: int
    written: int
    consumed: int
    resumed_shards: int
    skipped: dict[str, int] = field(default_factory=dict)

    def __str__(self) -> str:
        skipped = ", ".join(f"{k} {v:,}" for k, v in sorted(self.skipped.items())) or "none"
        return (
            f"{self.prefix}: {len(self.shards)} shards, {self.samples:,} samples in {self.out_dir} "
            f"(written now {self.written:,}; kept {self.resumed_shards} complete shards from earlier runs); "
            f"input items read {self.consumed:,}; skipped: {skipped}"
        )


def shard_name(prefix: str, index: int) -> str:
    """``prefix-000042.tar``."""
    return f"{prefix}-{index:0{SHARD_DIGITS}d}.tar"


def manifest_path(out_dir: str | Path, prefix: str) -> Path:
    return Path(out_dir) / f"{prefix}{MANIFEST_SUFFIX}"


def read_manifest(out_dir: str | Path, prefix: str) -> dict | None:
    """The manifest of ``prefix`` in ``out_dir``, or ``None`` when there is none."""
    path = manifest_path(out_dir, prefix)
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exn:
        raise ValueError(f"shard manifest {path} is not valid JSON ({exn}); delete it to start over") from exn


def _save_manifest(out_dir: Path, prefix: str, manifest: dict) -> None:
    path = manifest_path(out_dir, prefix)
    tmp = path.with_name(path.name + TMP_SUFFIX)
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, path)  # atomic: the manifest is always either the old or the new one


def encode_image(image: Any, quality: int = JPEG_QUALITY) -> bytes:
    """JPEG bytes of a PIL image or a uint8 array of shape (H, W) or (H, W, 3); bytes pass through."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image)
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3)):
            raise ValueError(
                f"jpg: a numpy image must be uint8 with shape (H, W) or (H, W, 3), "
                f"got {image.dtype} {image.shape}"
            )
        image = Image.fromarray(image)
    if not isinstance(image, Image.Image):
        raise ValueError(f"jpg must be JPEG bytes, a PIL image or a uint8 numpy array, got {type(image).__name__}")
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def encode_sample(sample: dict, quality: int = JPEG_QUALITY) -> dict:
    """Turn a sample dict into the bytes a tar member holds.

    ``__key__``: str without dots (webdataset splits names at the first dot);
    ``jpg``: see ``encode_image``; ``txt``: str; ``json``: any JSON value (bytes/str pass
    through as already encoded); other fields: bytes or str.
    """
    if not isinstance(sample, dict):
        raise ValueError(f"samples must be dicts, got {type(sample).__name__}")
    key = sample.get("__key__")
    if not isinstance(key, str) or not key or "." in key:
        raise ValueError(f"__key__ must be a non-empty str without '.', got {key!r}")
    out = {"__key__": key}
    for name, value in sample.items():
        if name == "__key__":
            continue
        if name.startswith("_"):
            raise ValueError(f"sample {key!r}: field names starting with '_' are reserved, got {name!r}")
        if name == "jpg":
            out[name] = encode_image(value, quality)
        elif name == "json" and not isinstance(value, (bytes, str)):
            out[name] = json.dumps(value, ensure_ascii=False).encode("utf-8")
        elif isinstance(value, str):
            out[name] = value.encode("utf-8")
        elif isinstance(value, (bytes, bytearray, memoryview)):
            out[name] = bytes(value)
        else:
            raise ValueError(f"sample {key!r}: field {name!r} must be str or bytes, got {type(value).__name__}")
    return out


def _shard_files(out_dir: Path, prefix: str) -> list[Path]:
    pattern = re.compile(re.escape(prefix) + r"-\d{%d}\.tar(%s)?$" % (SHARD_DIGITS, re.escape(TMP_SUFFIX)))
    return [p for p in out_dir.iterdir() if pattern.match(p.name)]


def _kept_shards(out_dir: Path, manifest: dict) -> list[dict]:
    """The manifest's shards up to the first one missing on disk or of the wrong size."""
    kept = []
    for record in manifest.get("shards", []):
        path = out_dir / record["name"]
        if not path.exists() or path.stat().st_size != record["bytes"]:
            log.warning("shard %s is missing or changed; rewriting from there", path)
            break
        kept.append(record)
    return kept


def _start_state(out_dir: Path, prefix: str, resume: bool, config: dict) -> dict:
    manifest = read_manifest(out_dir, prefix) if resume else None
    if manifest is None:
        manifest = {"prefix": prefix, "config": config, "shards": []}
    else:
        for name in sorted(set(config) | set(manifest["config"])):
            if manifest["config"].get(name) != config.get(name):
                raise ValueError(
                    f"{name}={config.get(name)!r} differs from {manifest['config'].get(name)!r} used for the "
                    f"shards already in {out_dir}; pass the same {name} to resume, or resume=False to start over"
                )
        manifest["shards"] = _kept_shards(out_dir, manifest)
    kept = {record["name"] for record in manifest["shards"]}
    for path in _shard_files(out_dir, prefix):  # unfinished or stale shards of this prefix
        if path.name not in kept:
            path.unlink()
    manifest["complete"] = False
    return manifest


class _ShardSink:
    """A ``wds.ShardWriter`` that renames complete shards and records them in the manifest.

    Bookkeeping for resuming: each complete shard records ``consumed``, the number of input
    items up to its last sample, and the skips among them; skips after the last written
    sample (``tail``) belong to the next shard.
    """

    def __init__(self, out_dir: Path, prefix: str, manifest: dict, max_count: int, start_shard: int):
        self.out_dir, self.prefix, self.manifest, self.max_count = out_dir, prefix, manifest, max_count
        self.done = manifest["shards"]
        self.first_shard = start_shard + len(self.done)
        self.consumed_at_write = self.done[-1]["consumed"] if self.done else 0
        self.span, self.tail = Counter(), Counter()
        self.writer: wds.ShardWriter | None = None
        self.written = 0

    def skip(self, reason: str) -> None:
        self.tail[reason] += 1

    def write(self, encoded: dict, consumed: int) -> None:
        if self.writer is None:  # opened lazily: no input, no empty shard
            pattern = str(self.out_dir / f"{self.prefix}-%0{SHARD_DIGITS}d.tar{TMP_SUFFIX}")
            self.writer = wds.ShardWriter(pattern, maxcount=self.max_count, post=self._complete,
                                          start_shard=self.first_shard, verbose=0, encoder=False, mtime=TAR_MTIME)
        self.writer.write(encoded)  # may complete the previous shard first (size limit)
        self.span.update(self.tail)
        self.tail.clear()
        self.consumed_at_write = consumed
        self.written += 1
        if self.writer.count >= self.max_count:
            self.writer.finish()  # complete it now, so a crash cannot cost a full shard

    def _complete(self, tmp_name: str) -> None:
        final = Path(tmp_name[: -len(TMP_SUFFIX)])
        os.replace(tmp_name, final)
        self.done.append({"name": final.name, "samples": self.writer.count, "bytes": final.stat().st_size,
                          "consumed": self.consumed_at_write, "skipped": dict(self.span)})
        self.span = Counter()
        _save_manifest(self.out_dir, self.prefix, self.manifest)

    def close(self) -> Counter:
        """Complete the last shard; return the skip counts of the whole input."""
        if self.writer is not None:
            self.writer.close()
        self.manifest["complete"] = True
        _save_manifest(self.out_dir, self.prefix, self.manifest)
        skipped = Counter()
        for record in self.done:
            skipped.update(record["skipped"])
        return skipped + self.span + self.tail

    def abandon(self) -> None:
        """Close an interrupted shard's file without renaming it: it stays a ``.tmp``."""
        if self.writer is not None and self.writer.tarstream is not None:
            self.writer.post = None
            self.writer.tarstream.close()
            self.writer.tarstream = None


def write_shards(
    samples: Iterable[dict | Callable[[], dict]],
    out_dir: str | Path,
    prefix: str,
    max_count: int = 1000,
    start_shard: int = 0,
    resume: bool = False,
    config: dict | None = None,
    jpeg_quality: int = JPEG_QUALITY,
) -> ShardSummary:
    """Write samples into ``out_dir/prefix-000000.tar, ...`` with at most ``max_count`` per shard.

    Each sample is a dict ``{"__key__": str, "jpg": bytes | PIL.Image | uint8 array,
    "txt": str, "json": dict, ...}`` or a zero-argument callable returning one; a callable may
    raise ``SkipSample(reason)`` to skip an unusable input item (counted, never fatal), and is
    only called when the item is written, so resuming does not reload skipped-over items.

    ``resume=True`` keeps the complete shards listed in ``prefix-manifest.json`` and skips the
    input items they cover (the input must come in the same order as before); ``resume=False``
    replaces any shards already written under ``prefix``. ``config`` (JSON values, e.g. the
    image size) is stored in the manifest and must match when resuming.
    """
    if not isinstance(max_count, int) or max_count < 1:
        raise ValueError(f"max_count must be a positive int, got {max_count!r}")
    if not isinstance(start_shard, int) or start_shard < 0:
        raise ValueError(f"start_shard must be a non-negative int, got {start_shard!r}")
    if not isinstance(prefix, str) or not prefix or "/" in prefix or "." in prefix:
        raise ValueError(f"prefix must be a non-empty name without '/' or '.', got {prefix!r}")
    if not 1 <= jpeg_quality <= 100:
        raise ValueError(f"jpeg_quality must be in [1, 100], got {jpeg_quality}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = {"max_count": max_count, "start_shard": start_shard, **(config or {})}
    manifest = _start_state(out_dir, prefix, resume, config)
    sink = _ShardSink(out_dir, prefix, manifest, max_count, start_shard)
    resumed, already = len(sink.done), sink.consumed_at_write
    consumed = already
    iterator = iter(samples)
    try:
        for _ in range(already):  # items covered by complete shards: not materialised again
            next(iterator)
        for consumed, item in enumerate(iterator, start=already + 1):
            try:
                sample = item() if callable(item) else item
            except SkipSample as skip:
                sink.skip(skip.reason)
                log.debug("skipped input item %d: %s", consumed - 1, skip)
                continue
            sink.write(encode_sample(sample, jpeg_quality), consumed)
    except StopIteration:
        raise ValueError(
            f"samples: resuming needs at least the {already} input items the kept shards cover; "
            f"the input is shorter (pass resume=False to start over)"
        ) from None
    except BaseException:
        sink.abandon()
        raise
    skipped = sink.close()
    return ShardSummary(
        out_dir=out_dir, prefix=prefix, shards=[r["name"] for r in sink.done],
        samples=sum(r["samples"] for r in sink.done), written=sink.written, consumed=consumed,
        resumed_shards=resumed, skipped=dict(skipped),
    )


# ----------------------------------------------------------------------------- reading


def _is_remote(url: str) -> bool:
    return "://" in url or url.startswith("pipe:")


def list_shards(urls_or_dir: str | Path | Iterable[str | Path]) -> list[str]:
    """Shard paths from a directory (all ``*.tar``), a glob, a brace pattern
    (``dir/train-{000000..000009}.tar``), one file, or a list of these.

    Raises ``FileNotFoundError`` naming the path when it does not exist or holds no shards.
    """
    if isinstance(urls_or_dir, (list, tuple)):
        if not urls_or_dir:
            raise ValueError("urls_or_dir is an empty list; expected shard paths")
        return [url for item in urls_or_dir for url in list_shards(item)]
    if not isinstance(urls_or_dir, (str, Path)):
        raise ValueError(f"urls_or_dir must be a path, a pattern or a list of them, got {type(urls_or_dir).__name__}")
    spec = str(urls_or_dir)
    if _is_remote(spec):
        return wds.shardlists.expand_urls(spec)
    if "{" in spec:
        urls = wds.shardlists.expand_urls(spec)
        missing = [u for u in urls if not os.path.isfile(u)]
        if missing:
            raise FileNotFoundError(f"urls_or_dir: {len(missing)} shards of {spec!r} do not exist, e.g. {missing[0]}")
        return urls
    if glob.has_magic(spec):
        urls = sorted(glob.glob(spec))
        if not urls:
            raise FileNotFoundError(f"urls_or_dir: no shards match {spec!r}")
        return urls
    path = Path(spec)
    if not path.exists():
        raise FileNotFoundError(f"urls_or_dir: {path} does not exist")
    if path.is_file():
        return [str(path)]
    urls = sorted(str(p) for p in path.glob("*.tar"))
    if not urls:
        unfinished = sorted(p.name for p in path.glob(f"*.tar{TMP_SUFFIX}"))
        hint = f" (only unfinished {unfinished[0]}...; finish it with resume=True)" if unfinished else ""
        raise FileNotFoundError(f"urls_or_dir: no .tar shards in directory {path}{hint}")
    return urls


class ShardError(ValueError):
    """A corrupt shard or sample, named with what is wrong (raised with ``handler="raise"``)."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:  # webdataset appends context to args; the message already names it
        return self.message


def describe_error(exn: BaseException) -> str:
    """One line naming what failed and where (webdataset appends the shard to ``exn.args``)."""
    if isinstance(exn, ShardError):
        return str(exn)
    args = getattr(exn, "args", ())
    first = str(args[0]) if args else str(exn)
    opened = re.search(r" @ <_io\.\w+ name='([^']+)'>", first)
    shards = [opened.group(1)] if opened else [a for a in args[1:] if isinstance(a, str) and a.endswith(".tar")]
    first = first[: opened.start()] if opened else first
    where = f" (shard {shards[-1]})" if shards and shards[-1] not in first else ""
    return f"{type(exn).__name__}: {first}{where}"


class ErrorPolicy:
    """A webdataset handler: ``"skip"`` counts the error in ``stats`` and goes on,
    ``"raise"`` raises a ``ShardError`` (a ``ValueError``) naming the shard or sample and what
    is wrong."""

    def __init__(self, mode: str, stats: dict):
        check_one_of("handler", mode, ("skip", "raise"))
        self.mode = mode
        self.stats = stats

    def __call__(self, exn: BaseException) -> bool:
        message = describe_error(exn)
        if self.mode == "raise":
            if isinstance(exn, ShardError):
                raise exn
            raise ShardError(message) from exn
        if self.stats["skipped"] == 0:
            warnings.warn(f"skipping a corrupt sample or shard ({message}); further skips are "
                          f"counted in dataset.stats", stacklevel=2)
        self.stats["skipped"] += 1
        self.stats["last_error"] = message
        log.debug("skipped: %s", message)
        return True


def open_shards(source: Iterable[dict], handler: Callable[[BaseException], bool]):
    """``{"url"}`` -> ``{"url", "stream"}``; each file is closed once its shard has been read."""
    for item in source:
        try:
            stream = wds.gopen(item["url"])
        except Exception as exn:
            exn.args = exn.args + (item["url"],)
            if handler(exn):
                continue
            break
        with stream:
            yield {**item, "stream": stream}


def _open_image(data: bytes, where: str) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
        return image.convert("RGB")
    except Exception as exn:
        raise ShardError(f"{where}: image bytes are not a decodable image ({exn})") from exn


def _resize(image: Image.Image, image_size: int | tuple[int, int]) -> Image.Image:
    """An int gives a square: shorter side to ``image_size``, then a centre crop; (H, W) resizes."""
    if isinstance(image_size, tuple):
        height, width = image_size
        return image.resize((width, height), Image.BICUBIC)
    scale = image_size / min(image.size)
    w, h = max(image_size, round(image.width * scale)), max(image_size, round(image.height * scale))
    image = image.resize((w, h), Image.BICUBIC)
    left, top = (w - image_size) // 2, (h - image_size) // 2
    return image.crop((left, top, left + image_size, top + image_size))


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB image -> float tensor (3, H, W) in [0, 1]."""
    array = np.asarray(image, dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)


def decode_sample(sample: dict, decode: str = "tensor", image_size=None) -> dict:
    """Raw shard sample -> ``{"image", "text", "meta", "key", "shard"}``.

    image: (3, H, W) float in [0, 1] (``decode="tensor"``) or a PIL RGB image (``"rgb"``).
    Raises ``ValueError`` naming the sample and shard when a field cannot be decoded.
    """
    key, shard = sample.get("__key__"), sample.get("__url__")
    where = f"sample {key!r} in {shard}"
    field_name = next((name for name in IMAGE_FIELDS if name in sample), None)
    if field_name is None:
        fields = sorted(k for k in sample if not k.startswith("__"))
        raise ShardError(f"{where} has no image (fields: {fields})")
    image = _open_image(sample[field_name], where)
    if image_size is not None:
        image = _resize(image, image_size)
    try:
        text = sample["txt"].decode("utf-8") if "txt" in sample else ""
        meta = json.loads(sample["json"]) if "json" in sample else {}
    except (UnicodeDecodeError, json.JSONDecodeError) as exn:
        raise ShardError(f"{where}: txt/json field is not valid UTF-8/JSON ({exn})") from exn
    return {
        "image": image_to_tensor(image) if decode == "tensor" else image,
        "text": text,
        "meta": meta,
        "key": key,
        "shard": shard,
    }


def collate_shards(batch: list[dict]) -> dict:
    """DataLoader ``collate_fn``: images stacked to (B, 3, H, W), the rest as lists."""
    if not batch:
        raise ValueError("batch is empty")
    images = [s["image"] for s in batch]
    if isinstance(images[0], torch.Tensor):
        shapes = {tuple(i.shape) for i in images}
        if len(shapes) > 1:
            raise ValueError(f"batch images have different shapes {sorted(shapes)}; set image_size")
        images = torch.stack(images)
    return {"image": images, **{k: [s[k] for s in batch] for k in ("text", "meta", "key", "shard")}}


class ShardDataset(IterableDataset):
    """Stream ``{"image", "text", "meta", "key", "shard"}`` samples from webdataset shards.

    Built on ``webdataset``: shard list -> split by process (``torch.distributed`` rank and
    world size, or ``RANK``/``WORLD_SIZE``) -> split by DataLoader worker -> tar reading ->
    optional shuffle buffer -> decoding. Shards are the unit of splitting, so use at least
    (processes x workers) shards. Shuffling is seeded: every process shuffles the shard
    list identically (seed + epoch, see ``set_epoch``) before splitting.

    handler: ``"skip"`` skips corrupt samples and shards and counts them in ``self.stats``
    (``{"skipped": n, "last_error": str}``; with DataLoader workers each worker counts its
    own); ``"raise"`` raises a ``ValueError`` naming the shard/sample.
    image_size: None keeps sizes; an int gives square images (shorter side resized, centre
    crop); (H, W) resizes.
    """

    def __init__(
        self,
        urls_or_dir,
        decode: str = "tensor",
        image_size: int | tuple[int, int] | None = None,
        shuffle: int = 0,
        split_by_node: bool = True,
        split_by_worker: bool = True,
        handler: str = "skip",
        seed: int = 0,
    ):
        super().__init__()
        check_one_of("decode", decode, ("tensor", "rgb"))
        if image_size is not None:
            ok_int = isinstance(image_size, int) and image_size > 0
            ok_pair = isinstance(image_size, tuple) and len(image_size) == 2 and all(
                isinstance(s, int) and s > 0 for s in image_size)
            if not (ok_int or ok_pair):
                raise ValueError(f"image_size must be None, a positive int or (H, W), got {image_size!r}")
        if not isinstance(shuffle, int) or shuffle < 0:
            raise ValueError(f"shuffle must be a buffer size >= 0 (0 = no shuffling), got {shuffle!r}")
        self.urls = list_shards(urls_or_dir)
        self.stats = {"skipped": 0, "last_error": None}
        self.split_by_node, self.split_by_worker = split_by_node, split_by_worker
        policy = ErrorPolicy(handler, self.stats)
        self._shufflers = []
        stages: list = [wds.SimpleShardList(self.urls)]
        if shuffle:
            self._shufflers.append(wds.detshuffle(len(self.urls), initial=len(self.urls), seed=seed))
            stages.append(self._shufflers[-1])
        if split_by_node:
            stages.append(wds.split_by_node)
        if split_by_worker:
            stages.append(wds.split_by_worker)
        stages += [
            wds.pipelinefilter(open_shards)(handler=policy),
            wds.pipelinefilter(wds.tariterators.tar_file_expander)(handler=policy),
            wds.pipelinefilter(wds.tariterators.group_by_keys)(handler=policy),
        ]
        if shuffle:
            self._shufflers.append(wds.detshuffle(shuffle, initial=min(shuffle, 100), seed=seed))
            stages.append(self._shufflers[-1])
        stages.append(wds.map(functools.partial(decode_sample, decode=decode, image_size=image_size),
                              handler=policy))
        self.pipeline = wds.DataPipeline(*stages)

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle for ``epoch`` (call before each epoch, as with ``DistributedSampler``)."""
        for shuffler in self._shufflers:
            shuffler.epoch = epoch - 1  # detshuffle adds one when it starts

    @property
    def num_samples(self) -> int | None:
        """Total samples according to the writers' manifests, or None if a shard is not listed."""
        counts = {}
        for directory in {os.path.dirname(u) for u in self.urls if not _is_remote(u)}:
            for path in glob.glob(os.path.join(glob.escape(directory), f"*{MANIFEST_SUFFIX}")):
                with open(path) as f:
                    for record in json.load(f).get("shards", []):
                        counts[os.path.join(directory, record["name"])] = record["samples"]
        if not all(u in counts for u in self.urls):
            return None
        return sum(counts[u] for u in self.urls)

    def _warn_if_starved(self) -> None:
        rank, world, worker, workers = wds.utils.pytorch_worker_info()
        readers = (world if self.split_by_node else 1) * (workers if self.split_by_worker else 1)
        if len(self.urls) < readers and worker == 0 and rank == 0:
            warnings.warn(f"{len(self.urls)} shards for {readers} readers (processes x workers): "
                          f"some read nothing; write more, smaller shards", stacklevel=3)

    def __iter__(self):
        self._warn_if_starved()
        return iter(self.pipeline)


def verify_shards(urls_or_dir) -> dict:
    """Read every sample of every shard; return ``{"shards": n, "samples": n}``.

    Raises ``ValueError`` naming the first corrupt shard or sample, or a shard whose sample
    count differs from its manifest.
    """
    dataset = ShardDataset(urls_or_dir, handler="raise", split_by_node=False, split_by_worker=False)
    expected = {}
    for directory in {os.path.dirname(u) for u in dataset.urls}:
        for path in glob.glob(os.path.join(glob.escape(directory), f"*{MANIFEST_SUFFIX}")):
            with open(path) as f:
                expected.update({os.path.join(directory, r["name"]): r["samples"]
                                 for r in json.load(f).get("shards", [])})
    counts = Counter(sample["shard"] for sample in dataset)
    for url in dataset.urls:
        if url in expected and counts[url] != expected[url]:
            raise ShardError(f"shard {url} holds {counts[url]} readable samples; its manifest lists {expected[url]}")
    return {"shards": len(dataset.urls), "samples": sum(counts.values())}
