"""Webdataset shards: write (image, text, json) samples to tar files and stream them back.

A sample may carry numpy arrays instead of an image (``feats.npy``, ``boxes.npy``: the region
features of ``course_lib.data.region_shards``); ``ShardDataset`` reads image samples, and its
subclasses decode other kinds (see ``ShardDataset._decoder``).

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
from the first input item they do not cover. The writer checks that every image decodes (and
every ``txt`` / ``json`` field parses, and every ``.npy`` field loads) before it writes the
sample: an unusable one is skipped and counted in the manifest, never stored.

Reading skips what it cannot use and counts it by reason in ``ShardDataset.stats``: a shard
that cannot be opened or breaks off (``corrupt_shard``: cut short, a damaged header, data after
its end-of-archive blocks; its last sample, which may have lost fields, is dropped as
``truncated_sample``), a sample without an image (``missing_image``) or
without a caption (``missing_txt``), an image that does not decode (``corrupt_image``), a
caption or JSON that does not parse (``corrupt_txt``, ``corrupt_json``), a field twice in one
sample (``duplicate_field``). A caption is read up to ``max_text_bytes`` (1 MiB): the rest is
skipped without being held in memory.
"""

from __future__ import annotations

import collections
import functools
import glob
import io
import json
import logging
import os
import re
import tarfile
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
NPY_SUFFIX = "npy"  # a field named "npy" or "<name>.npy" holds one numpy array in .npy format
MAX_TEXT_BYTES = 1 << 20  # a caption is read up to 1 MiB; the model reads tens of tokens of it
TAR_END = bytes(1024)  # a complete tar ends with two zero blocks (POSIX end-of-archive)
TAIL_WINDOW = 4 * tarfile.RECORDSIZE  # more than tarfile reads ahead of the header it stops at


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


def check_image_bytes(data: bytes, where: str) -> None:
    """Raise ``SkipSample("corrupt_image")`` unless ``data`` decodes fully as an image.

    A full decode (``load``), not just the header: a truncated JPEG fails here, not at training time.
    """
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
    except Exception as exn:
        raise SkipSample("corrupt_image", f"{where}: image bytes do not decode ({exn})") from exn


def is_npy_field(name: str) -> bool:
    """True for ``"npy"`` and ``"<name>.npy"`` (e.g. ``"feats.npy"``): a field holding one numpy array."""
    return name == NPY_SUFFIX or name.endswith("." + NPY_SUFFIX)


def encode_npy(array: np.ndarray) -> bytes:
    """``.npy`` bytes of ``array`` (any shape, a numeric or bool dtype; object arrays are refused)."""
    if array.dtype.hasobject:
        raise ValueError(f"npy: an array of dtype {array.dtype} holds Python objects; expected a numeric dtype")
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def load_npy(data: bytes) -> np.ndarray:
    """The array in ``.npy`` bytes; ``ValueError`` (or ``OSError``/``EOFError``) when they do not load
    fully. Never unpickles: an object array is an error, not code run."""
    buffer = io.BytesIO(data)
    array = np.load(buffer, allow_pickle=False)
    if buffer.tell() != len(data):
        raise ValueError(f"{len(data) - buffer.tell()} bytes follow the array")
    return array


def _check_encoded_fields(out: dict, raw: dict) -> None:
    """The checks the reader makes, made before writing: images decode, txt is UTF-8, json parses,
    ``.npy`` fields load.

    Images and arrays the writer encoded itself (PIL, numpy) are known to decode; bytes given as
    they are are decoded once here.
    """
    key = out["__key__"]
    for name in IMAGE_FIELDS:
        if name in out and isinstance(raw.get(name), (bytes, bytearray, memoryview)):
            check_image_bytes(out[name], f"sample {key!r} field {name!r}")
    for name in out:
        if is_npy_field(name) and not isinstance(raw.get(name), np.ndarray):
            try:
                load_npy(out[name])
            except (ValueError, OSError, EOFError) as exn:
                raise SkipSample("corrupt_npy", f"sample {key!r} field {name!r}: not a loadable .npy ({exn})") from exn
    try:
        if "txt" in out:
            out["txt"].decode("utf-8")
        if "json" in out:
            json.loads(out["json"])
    except (UnicodeDecodeError, json.JSONDecodeError) as exn:
        reason = "corrupt_txt" if isinstance(exn, UnicodeDecodeError) else "corrupt_json"
        raise SkipSample(reason, f"sample {key!r}: {exn}") from exn


def encode_sample(sample: dict, quality: int = JPEG_QUALITY) -> dict:
    """Turn a sample dict into the bytes a tar member holds.

    ``__key__``: str without dots (webdataset splits names at the first dot);
    ``jpg``: see ``encode_image``; ``txt``: str; ``json``: any JSON value (bytes/str pass
    through as already encoded); ``npy`` / ``<name>.npy``: a numpy array (saved with
    ``np.save``) or ``.npy`` bytes; other fields: bytes or str. No field is required: a sample
    may hold an image, or arrays, or only text. Raises ``SkipSample`` when image bytes do not
    decode (``corrupt_image``), txt / json bytes do not parse (``corrupt_txt``,
    ``corrupt_json``) or ``.npy`` bytes do not load (``corrupt_npy``): what the reader would skip
    is never written.
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
        elif is_npy_field(name) and isinstance(value, np.ndarray):
            out[name] = encode_npy(value)
        elif isinstance(value, str):
            out[name] = value.encode("utf-8")
        elif isinstance(value, (bytes, bytearray, memoryview)):
            out[name] = bytes(value)
        else:
            kinds = "a numpy array or bytes" if is_npy_field(name) else "str or bytes"
            raise ValueError(f"sample {key!r}: field {name!r} must be {kinds}, got {type(value).__name__}")
    _check_encoded_fields(out, sample)
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
    "txt": str, "json": dict, ...}`` (or with ``"feats.npy": array, ...`` instead of ``jpg``;
    see ``encode_sample``) or a zero-argument callable returning one; a callable may
    raise ``SkipSample(reason)`` to skip an unusable input item (counted, never fatal), and is
    only called when the item is written, so resuming does not reload skipped-over items.
    Image bytes that do not decode, txt / json that do not parse and ``.npy`` bytes that do not load
    are skipped the same way (``corrupt_image``, ``corrupt_txt``, ``corrupt_json``, ``corrupt_npy``):
    the manifest counts only readable samples.

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
                encoded = encode_sample(sample, jpeg_quality)
            except SkipSample as skip:
                sink.skip(skip.reason)
                log.debug("skipped input item %d: %s", consumed - 1, skip)
                continue
            sink.write(encoded, consumed)
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
    """A corrupt shard or sample, named with what is wrong (raised with ``handler="raise"``);
    ``reason`` is the name it is counted under when skipped (e.g. ``"missing_txt"``)."""

    def __init__(self, message: str, reason: str = "corrupt_sample"):
        super().__init__(message)
        self.message = message
        self.reason = reason

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
    is wrong. ``stats``: ``{"skipped": total, "last_error": str, "reasons": {reason: count}}``
    (a ``ShardError``'s ``reason``; ``"error"`` for anything else)."""

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
        reasons = self.stats.setdefault("reasons", {})
        reason = getattr(exn, "reason", None) or "error"
        reasons[reason] = reasons.get(reason, 0) + 1
        log.debug("skipped: %s", message)
        return True


def open_shards(source: Iterable[dict], handler: Callable[[BaseException], bool]):
    """``{"url"}`` -> ``{"url", "stream"}``; each file is closed once its shard has been read."""
    for item in source:
        try:
            stream = wds.gopen(item["url"])
        except Exception as exn:
            error = ShardError(f"{type(exn).__name__}: {exn} (shard {item['url']} cannot be opened)",
                               reason="corrupt_shard")
            if handler(error):
                continue
            break
        with stream:
            yield {**item, "stream": stream}


class _TailReader:
    """A file wrapper for ``tarfile``'s stream mode that remembers the first bytes read and the
    last ``keep`` or more (with their position), so that where tarfile stopped can be checked."""

    def __init__(self, fileobj, keep: int = TAIL_WINDOW):
        self.fileobj, self.keep = fileobj, keep
        self.head = b""
        self.recent: collections.deque[bytes] = collections.deque()  # the last reads, not copied
        self.recent_bytes = 0
        self.position = 0  # bytes read so far; ``recent`` ends here

    def read(self, size: int = -1) -> bytes:
        data = self.fileobj.read(size)
        if len(self.head) < 4:
            self.head = (self.head + data)[:4]
        self.recent.append(data)
        self.recent_bytes += len(data)
        while self.recent_bytes - len(self.recent[0]) >= self.keep:
            self.recent_bytes -= len(self.recent.popleft())
        self.position += len(data)
        return data

    def _read_since(self, offset: int) -> bytes:
        """The bytes already read from ``offset`` on (those still kept)."""
        window = b"".join(self.recent)
        start = offset - (self.position - len(window))
        return window[max(0, start):] if offset < self.position else b""

    def end_problem(self, stop: int) -> str | None:
        """Read to the end; None if, from byte ``stop`` (where tarfile stopped reading headers), the
        file holds the end-of-archive blocks and only zeros after them; else what is wrong.

        tarfile stops quietly at a shard cut between two members, inside the zero padding of a
        member, or at a damaged header (a shard cut inside a header and zero-filled to its size,
        as a crash can leave it); the end-of-archive check is what tells. Compressed shards are
        checked by their decompressor instead.
        """
        if self.head.startswith((b"\x1f\x8b", b"BZh", b"\xfd7zXZ")):
            while self.read(1 << 16):
                pass
            return None
        zeros, first_data = self._zeros_from(self._read_since(stop), stop)
        if first_data is not None and zeros < len(TAR_END):
            return (f"the shard holds a damaged member header at byte {stop} (cut short and zero-filled, or "
                    "overwritten): the members from there on are lost")
        if first_data is not None:
            return (f"the shard holds data at byte {first_data}, after its end-of-archive blocks (a zeroed "
                    "region, or tars joined together): the members from there on are not read")
        if zeros < len(TAR_END):
            return "the shard ends without the tar end-of-archive blocks: it was cut short"
        return None

    def _zeros_from(self, seen: bytes, stop: int) -> tuple[int, int | None]:
        """(zero bytes from ``stop`` up to the first other byte, the position of that byte or None),
        reading the file to its end."""
        chunk, offset = seen, stop
        while chunk:
            leading = len(chunk) - len(chunk.lstrip(b"\0"))
            if leading < len(chunk):
                return offset + leading - stop, offset + leading
            offset += len(chunk)
            chunk = self.read(1 << 16)
        return offset - stop, None


def _read_members(fileobj, url: str, max_text_bytes: int, reading: dict):
    """The regular members of one tar as ``{"fname", "data", "__url__"}``; a ``txt`` member is read
    up to ``max_text_bytes`` (cut at a character boundary), the rest of it skipped unread.
    ``reading["fname"]`` names the member whose data is being read (None between members)."""
    reader = _TailReader(fileobj)
    stream = tarfile.open(fileobj=reader, mode="r|*")
    for info in stream:
        if not info.isreg() or re.match(r"__[^/]*__($|/)", info.name):
            continue
        reading["fname"] = info.name
        member = stream.extractfile(info)
        suffix = info.name.rsplit("/", 1)[-1].split(".", 1)[-1].lower()
        if suffix == "txt" and info.size > max_text_bytes:
            data = _utf8_prefix(member.read(max_text_bytes))
        else:
            data = member.read()
        reading["fname"] = None
        yield {"fname": info.name, "data": data, "__url__": url}
        stream.members = []  # tarfile keeps every TarInfo otherwise
    problem = reader.end_problem(stream.offset)
    if problem:
        raise tarfile.ReadError(problem)


def _utf8_prefix(data: bytes) -> bytes:
    """``data`` (UTF-8 cut at a byte count) without the multi-byte character cut at its end."""
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte < 0x80:  # ASCII: the last character is whole
            return data
        if byte >= 0xC0:  # the lead byte of the last character, which needs 2, 3 or 4 bytes
            need = 2 if byte < 0xE0 else 3 if byte < 0xF0 else 4
            return data if back >= need else data[:-back]
    return data


def tar_members(sources: Iterable[dict], handler: Callable[[BaseException], bool],
                max_text_bytes: int = MAX_TEXT_BYTES):
    """``{"url", "stream"}`` -> one ``{"fname", "data", "__url__"}`` per tar member, then ``{}``
    at the end of each shard.

    A shard that breaks off (cut short, or not a tar at all) goes to ``handler`` as a
    ``ShardError`` (reason ``corrupt_shard``) naming it, and ends with
    ``{"__broken__": url, "fname": the member being read, or None}`` instead of ``{}``, so that
    :func:`group_samples` drops the sample that was being read.
    """
    for source in sources:
        url, reading = source["url"], {"fname": None}
        try:
            yield from _read_members(source["stream"], url, max_text_bytes, reading)
        except Exception as exn:  # tarfile.ReadError, EOFError, OSError, zlib.error, ...
            if not handler(ShardError(f"{type(exn).__name__}: {exn} (shard {url} is corrupt or cut short)",
                                      reason="corrupt_shard")):
                return
            yield {"__broken__": url, "fname": reading["fname"]}
            continue
        yield {}


def group_samples(members: Iterable[dict], handler: Callable[[BaseException], bool]):
    """Tar members -> raw samples ``{"__key__", "__url__", field: bytes}``: consecutive members
    whose names share the part before the first dot form one sample.

    The sample being read when a shard broke off may lack fields that were in the lost part:
    it is dropped (reason ``truncated_sample``): the sample of the member whose data broke off,
    or, when the break falls between members, the last sample begun. A field twice in one
    sample keeps its first value (reason ``duplicate_field``).
    """
    current = None
    for member in members:
        if "__broken__" in member:
            broken_key = wds.tariterators.base_plus_ext(member["fname"])[0] if member["fname"] else None
            if current is not None and broken_key is not None and broken_key != current["__key__"]:
                yield current  # complete: the break came in the next sample
                current = None
            if current is None and broken_key is not None:
                current = {"__key__": broken_key, "__url__": member["__broken__"]}
            if current is not None:
                error = ShardError(f"sample {current['__key__']!r} in {current['__url__']} was being read when the "
                                   "shard broke off; dropped, as it may be incomplete", reason="truncated_sample")
                current = None
                if not handler(error):
                    return
            continue
        if member == {}:  # the end of a shard
            if current is not None:
                yield current
            current = None
            continue
        key, suffix = wds.tariterators.base_plus_ext(member["fname"])
        if key is None:
            continue
        suffix = suffix.lower()
        if current is not None and key != current["__key__"]:
            yield current
            current = None
        if current is None:
            current = {"__key__": key, "__url__": member["__url__"]}
        if suffix in current:
            error = ShardError(f"sample {key!r} in {member['__url__']} has the field {suffix!r} twice; "
                               "the first one is kept", reason="duplicate_field")
            if not handler(error):
                return
            continue
        current[suffix] = member["data"]
    if current is not None:
        yield current


def _open_image(data: bytes, where: str) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
        return image.convert("RGB")
    except Exception as exn:
        raise ShardError(f"{where}: image bytes are not a decodable image ({exn})", reason="corrupt_image") from exn


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


def decode_sample(sample: dict, decode: str = "tensor", image_size=None, require_text: bool = True) -> dict:
    """Raw shard sample -> ``{"image", "text", "meta", "key", "shard"}``.

    image: (3, H, W) float in [0, 1] (``decode="tensor"``) or a PIL RGB image (``"rgb"``).
    Raises ``ShardError`` (a ``ValueError``) naming the sample and shard, with a ``reason``,
    when the image is missing or does not decode, when the caption is missing (with
    ``require_text``: a sample without ``txt`` is not an image-text pair) or is not UTF-8, or
    when the json does not parse. A sample without json gets ``meta == {}``.
    """
    key, shard = sample.get("__key__"), sample.get("__url__")
    where = f"sample {key!r} in {shard}"
    fields = sorted(k for k in sample if not k.startswith("__"))
    field_name = next((name for name in IMAGE_FIELDS if name in sample), None)
    if field_name is None:
        raise ShardError(f"{where} has no image (fields: {fields})", reason="missing_image")
    if require_text and "txt" not in sample:
        raise ShardError(f"{where} has no caption: no .txt member (fields: {fields})", reason="missing_txt")
    image = _open_image(sample[field_name], where)
    if image_size is not None:
        image = _resize(image, image_size)
    text, meta = decode_text_fields(sample, where)
    return {
        "image": image_to_tensor(image) if decode == "tensor" else image,
        "text": text,
        "meta": meta,
        "key": key,
        "shard": shard,
    }


def decode_text_fields(sample: dict, where: str) -> tuple[str, dict]:
    """(caption, meta) of a raw sample: ``txt`` as str (``""`` if absent), ``json`` parsed (``{}`` if
    absent); ``ShardError`` (``corrupt_txt``, ``corrupt_json``) naming ``where`` when they do not parse."""
    try:
        text = sample["txt"].decode("utf-8") if "txt" in sample else ""
    except UnicodeDecodeError as exn:
        raise ShardError(f"{where}: txt field is not valid UTF-8 ({exn})", reason="corrupt_txt") from exn
    try:
        meta = json.loads(sample["json"]) if "json" in sample else {}
    except (UnicodeDecodeError, json.JSONDecodeError) as exn:
        raise ShardError(f"{where}: json field is not valid JSON ({exn})", reason="corrupt_json") from exn
    return text, meta


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
    (``{"skipped": n, "last_error": str, "reasons": {reason: n}}``, reasons as in the module
    docstring; with DataLoader workers each worker counts its own); ``"raise"`` raises a
    ``ValueError`` naming the shard/sample.
    image_size: None keeps sizes; an int gives square images (shorter side resized, centre
    crop); (H, W) resizes.
    require_text: skip samples without a ``txt`` caption (``missing_txt``); False gives them ``""``.
    max_text_bytes: a caption is read up to this many bytes (the rest is skipped unread).

    A subclass reads other kinds of samples (e.g. ``course_lib.data.region_shards``) by
    overriding ``_decoder``; everything else (splitting, shuffling, skipping and counting) is shared.
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
        require_text: bool = True,
        max_text_bytes: int = MAX_TEXT_BYTES,
    ):
        super().__init__()
        check_one_of("decode", decode, ("tensor", "rgb"))
        if not isinstance(require_text, bool):
            raise ValueError(f"require_text must be True or False, got {require_text!r}")
        if not isinstance(max_text_bytes, int) or isinstance(max_text_bytes, bool) or max_text_bytes < 1:
            raise ValueError(f"max_text_bytes must be an int >= 1, got {max_text_bytes!r}")
        if image_size is not None:
            ok_int = isinstance(image_size, int) and image_size > 0
            ok_pair = isinstance(image_size, tuple) and len(image_size) == 2 and all(
                isinstance(s, int) and s > 0 for s in image_size)
            if not (ok_int or ok_pair):
                raise ValueError(f"image_size must be None, a positive int or (H, W), got {image_size!r}")
        if not isinstance(shuffle, int) or shuffle < 0:
            raise ValueError(f"shuffle must be a buffer size >= 0 (0 = no shuffling), got {shuffle!r}")
        self.urls = list_shards(urls_or_dir)
        self.decode, self.image_size, self.require_text = decode, image_size, require_text
        self.stats = {"skipped": 0, "last_error": None, "reasons": {}}
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
            wds.pipelinefilter(tar_members)(handler=policy, max_text_bytes=max_text_bytes),
            wds.pipelinefilter(group_samples)(handler=policy),
        ]
        if shuffle:
            self._shufflers.append(wds.detshuffle(shuffle, initial=min(shuffle, 100), seed=seed))
            stages.append(self._shufflers[-1])
        stages.append(wds.map(self._decoder(), handler=policy))
        self.pipeline = wds.DataPipeline(*stages)

    def _decoder(self) -> Callable[[dict], dict]:
        """Raw sample (``{"__key__", "__url__", field: bytes}``) -> the sample this dataset yields.

        It raises ``ShardError`` (with a ``reason``) for a sample to skip. It is pickled into
        DataLoader workers: return a module-level function or a ``functools.partial`` of one.
        """
        return functools.partial(decode_sample, decode=self.decode, image_size=self.image_size,
                                 require_text=self.require_text)

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


def verify_shards(urls_or_dir, require_text: bool = True) -> dict:
    """Read every sample of every shard; return ``{"shards": n, "samples": n}``.

    Raises ``ValueError`` naming the first corrupt shard or sample (or, with ``require_text``,
    sample without a caption), or a shard whose sample count differs from its manifest.
    """
    dataset = ShardDataset(urls_or_dir, handler="raise", split_by_node=False, split_by_worker=False,
                           require_text=require_text)
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
