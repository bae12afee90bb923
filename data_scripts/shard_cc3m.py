"""Conceptual Captions 3M -> webdataset shards, from img2dataset's output or from the TSV.

The TSVs, as the dataset's page gives them: ``Train_GCC-training.tsv`` (3,318,333 rows) and
``Validation_GCC-1.1.0-Validation.tsv`` (15,840 rows), ``caption<TAB>url`` per row, no header,
UTF-8 (captions and a few URLs hold non-ASCII characters). The names without the ``Train_`` /
``Validation_`` prefix (as the storage bucket names the objects) are accepted too; ``--tsv``
gives any other path. A header row ``caption<TAB>url`` (in either order, as img2dataset wants
it) is read as one.

At scale, fetch the images with img2dataset (parallel, resizing, retries) and re-shard its
output (verified images, our keys and json)::

    python -m data_scripts.shard_cc3m --root data/cc3m --out shards/cc3m --img2dataset data/cc3m/img2dataset-train

img2dataset writes ``00000.tar``, ``00000_stats.json``, ``00000.parquet``, ... (a tar holds the
images it fetched: ``<key>.jpg``, ``<key>.txt``, ``<key>.json``). Each tar's samples are counted
against its ``_stats.json`` ("successes"): samples a damaged or missing tar lacks are counted
(``img2dataset_missing_samples``), and img2dataset's own failures are reported beside the skips.

For a small subset, read the TSV and fetch each image with our downloader into
``ROOT/images/<split>/`` (kept, so a rerun does not fetch again); dead links and undecodable
images are skipped and counted. A URL with a space or a non-ASCII character is requested
percent-encoded, as a browser does (``urls_percent_encoded`` counts them)::

    python -m data_scripts.shard_cc3m --root data/cc3m --out shards/cc3m --max-samples 5000

Sample: ``jpg``; ``txt`` = the caption; ``json`` = {dataset, split, url (as the TSV gives it),
width, height}.
"""

from __future__ import annotations

import functools
import itertools
import json
import shlex
import warnings
from collections import Counter
from pathlib import Path

from course_lib.data.shards import ErrorPolicy, SkipSample, group_samples, list_shards, open_shards, tar_members
from data_scripts.common import (check_args, cli, jpeg_from_bytes, load_json, make_parser, require_file, require_root,
                                 run)
from data_scripts.download import DownloadError, download, quote_url

# The official names (the dataset's download page) first, then the storage bucket's object names.
TSV_NAMES = {"train": ("Train_GCC-training.tsv", "GCC-training.tsv"),
             "val": ("Validation_GCC-1.1.0-Validation.tsv", "GCC-1.1.0-Validation.tsv")}
DOWNLOAD_PAGE = "https://ai.google.com/research/ConceptualCaptions/download"
EXPECTED_TSV = "a CC3M TSV (Train_GCC-training.tsv, Validation_GCC-1.1.0-Validation.tsv): caption<TAB>url, no header"
ROWS_CHECKED = 100  # rows read to tell whether a TSV has the expected columns
STATS_KEYS = ("count", "successes", "failed_to_download", "failed_to_resize")


# ----------------------------------------------------------------------------- the TSV


def find_tsv(root: Path, split: str) -> Path | None:
    """The split's TSV in ``root`` under one of its names (``TSV_NAMES``), or None."""
    return next((root / name for name in TSV_NAMES[split] if (root / name).is_file()), None)


def require_tsv(root: Path, split: str, given: Path | None) -> Path:
    if given is not None:
        return require_file(given, "CC3M TSV (--tsv)", f"Give the path of {TSV_NAMES[split][0]} with --tsv.")
    found = find_tsv(root, split)
    if found is None:
        raise FileNotFoundError(
            f"CC3M TSV not found: none of {', '.join(TSV_NAMES[split])} is in {root}. Download "
            f"{TSV_NAMES[split][0]} from {DOWNLOAD_PAGE} (or: python -m data_scripts.download cc3m --root {root}), "
            f"or give its path with --tsv PATH")
    return found


def img2dataset_command(tsv: Path, root: Path, split: str) -> str:
    """The img2dataset command line for the whole of ``tsv`` (img2dataset wants a header row)."""
    with_header = root / f"cc3m_{split}_with_header.tsv"
    out = root / f"img2dataset-{split}"
    return (f"(printf 'caption\\turl\\n'; cat {shlex.quote(str(tsv))}) > {shlex.quote(str(with_header))} && "
            f"img2dataset --url_list {shlex.quote(str(with_header))} --input_format tsv --url_col url "
            f"--caption_col caption --output_format webdataset --output_folder {shlex.quote(str(out))} "
            f"--processes_count 16 --thread_count 64 --image_size 256 --resize_mode keep_ratio --enable_wandb False")


def is_url(text: str) -> bool:
    return text.strip().lower().startswith(("http://", "https://"))


def is_header(fields: list[str]) -> bool:
    """True for a header row ``caption<TAB>url`` (either order), as img2dataset wants it."""
    return sorted(field.strip().lower() for field in fields) == ["caption", "url"]


def _split_row(raw: bytes) -> list[str] | None:
    """The fields of one TSV line, or None when it is not UTF-8."""
    try:
        return raw.decode("utf-8").rstrip("\r\n").split("\t")
    except UnicodeDecodeError:
        return None


def describe_rows(rows: list[list[str] | None]) -> str:
    """What the first rows of a file look like, for an error message."""
    first = next((row for row in rows if row is not None), None)
    if first is None:
        return "its first rows are not UTF-8 text"
    shown = "<TAB>".join(field[:40] for field in first[:4])
    text = f"its first row has {len(first)} field{'s' if len(first) != 1 else ''}: {shown!r}"
    if len(first) == 2 and is_url(first[0]) and not is_url(first[1]):
        text += " (a URL, then text: the columns are swapped, url<TAB>caption)"
    return text


def tsv_layout(tsv_path: Path) -> tuple[int, int, bool]:
    """(caption column, url column, has a header row) of a CC3M TSV, told by its first rows.

    ``ValueError`` saying what the file looks like when none of them has a URL where
    ``caption<TAB>url`` puts it (a file with swapped columns, another dataset's file).
    """
    with open(tsv_path, "rb") as f:
        rows = [_split_row(raw) for raw in itertools.islice(f, ROWS_CHECKED)]
    rows = [row for row in rows if row is None or any(field.strip() for field in row)]
    header = bool(rows) and rows[0] is not None and is_header(rows[0])
    names = [field.strip().lower() for field in rows[0]] if header else []
    caption_col, url_col = (names.index("caption"), names.index("url")) if header else (0, 1)
    data_rows = rows[1:] if header else rows
    if any(row is not None and len(row) == 2 and is_url(row[url_col]) for row in data_rows):
        return caption_col, url_col, header
    looks = describe_rows(data_rows or rows) if rows else "it is empty"
    raise ValueError(f"{tsv_path} is not the file expected: {looks}. Expected {EXPECTED_TSV}")


def tsv_records(tsv_path: Path, dropped: Counter, notes: Counter | None = None,
                layout: tuple[int, int, bool] | None = None):
    """(row index, caption, url, the url to request) per TSV row; a header row is skipped,
    malformed rows counted (``bad_tsv_rows``), URLs that need percent-encoding counted in ``notes``
    (``urls_percent_encoded``). ``layout``: ``tsv_layout(tsv_path)``, found when not given."""
    caption_col, url_col, header = layout or tsv_layout(tsv_path)
    notes = Counter() if notes is None else notes
    with open(tsv_path, "rb") as f:
        for index, raw in enumerate(f):
            fields = _split_row(raw)
            if header and fields is not None and is_header(fields):
                continue
            if fields is None or len(fields) != 2 or not is_url(fields[url_col]):
                dropped["bad_tsv_rows"] += 1
                continue
            caption, url = fields[caption_col].strip(), fields[url_col].strip()
            request_url = quote_url(url)
            if request_url != url:
                notes["urls_percent_encoded"] += 1
            yield index, caption, url, request_url


def build_from_url(record: tuple, cache_dir: Path, split: str, max_side: int | None, retries: int,
                   timeout: float) -> dict:
    index, caption, url, request_url = record
    path = cache_dir / f"{index:09d}"
    try:
        download(request_url, path, retries=retries, timeout=timeout, backoff=0.5, progress=False)
    except (DownloadError, ValueError) as exn:
        raise SkipSample("download_failed", f"{url}: {exn}") from exn
    jpeg, (width, height), _ = jpeg_from_bytes(path.read_bytes(), url, max_side)
    return {"__key__": f"cc3m_{split}_{index:09d}", "jpg": jpeg, "txt": caption,
            "json": {"dataset": "cc3m", "split": split, "url": url, "width": width, "height": height}}


# ----------------------------------------------------------------------------- img2dataset's output


def img2dataset_stats(tar: Path) -> dict | None:
    """img2dataset's ``NNNNN_stats.json`` beside ``NNNNN.tar`` (None when there is none)."""
    path = tar.with_name(f"{tar.stem}_stats.json")
    if not path.is_file():
        return None
    stats = load_json(path)
    if not isinstance(stats, dict) or not all(isinstance(stats.get(k), int) for k in STATS_KEYS):
        raise ValueError(f"{path} is not img2dataset's per-shard stats: expected integer {list(STATS_KEYS)}; "
                         "delete it to shard without checking the tar against it")
    return stats


def _shard_samples(tar: Path, dropped: Counter):
    """Raw samples of one tar; what cannot be read is counted in ``dropped`` (``img2dataset_<reason>``).
    Returns (samples yielded, samples dropped as truncated)."""
    stats = {"skipped": 0, "last_error": None, "reasons": {}}
    policy = ErrorPolicy("skip", stats)
    members = tar_members(open_shards([{"url": str(tar)}], handler=policy), handler=policy)
    read = 0
    for sample in group_samples(members, handler=policy):  # a cut-short shard drops its partial last sample
        read += 1
        yield sample
    for reason, count in stats["reasons"].items():
        dropped[f"img2dataset_{reason}"] += count
    return read, stats["reasons"].get("truncated_sample", 0)


def cross_check(tar: Path, held: int, dropped: Counter, notes: Counter) -> None:
    """Count what ``tar`` lacks of the samples its ``_stats.json`` says img2dataset wrote
    (``img2dataset_missing_samples``); add img2dataset's own failures to ``notes``."""
    stats = img2dataset_stats(tar)
    if stats is None:
        notes["img2dataset_shards_without_stats"] += 1
        return
    notes["img2dataset_failed_to_download"] += stats["failed_to_download"]
    notes["img2dataset_failed_to_resize"] += stats["failed_to_resize"]
    missing = stats["successes"] - held
    if missing > 0:
        dropped["img2dataset_missing_samples"] += missing
        state = "does not exist" if not tar.exists() else f"holds {held}"
        warnings.warn(f"{tar.stem}_stats.json says img2dataset wrote {stats['successes']} samples to {tar}, which "
                      f"{state}: {missing} missing (the tar was cut short, damaged or deleted)", stacklevel=2)


def img2dataset_samples(directory: Path, dropped: Counter, notes: Counter | None = None):
    """Raw samples of img2dataset's tar shards, shard by shard; unreadable shards and entries are
    counted, not fatal, and each shard is checked against its ``_stats.json`` (``cross_check``)."""
    notes = Counter() if notes is None else notes
    tars = [Path(url) for url in list_shards(directory)]
    for tar in tars:
        read, truncated = yield from _shard_samples(tar, dropped)
        cross_check(tar, read + truncated, dropped, notes)
    for stats_path in sorted(directory.glob("*_stats.json")):  # shards whose tar is gone
        tar = stats_path.with_name(stats_path.name[: -len("_stats.json")] + ".tar")
        if tar not in tars:
            cross_check(tar, 0, dropped, notes)


def build_from_img2dataset(sample: dict, split: str, max_side: int | None) -> dict:
    key = sample["__key__"]
    if "jpg" not in sample:
        raise SkipSample("missing_image", f"img2dataset sample {key} has no jpg")
    if "txt" not in sample:
        raise SkipSample("missing_txt", f"img2dataset sample {key} has no txt caption")
    jpeg, (width, height), _ = jpeg_from_bytes(sample["jpg"], f"img2dataset sample {key}", max_side)
    try:
        caption = sample["txt"].decode("utf-8").strip()
        meta = json.loads(sample["json"]) if "json" in sample else {}
    except (UnicodeDecodeError, json.JSONDecodeError) as exn:
        raise SkipSample("corrupt_text", f"img2dataset sample {key}: {exn}") from exn
    return {"__key__": f"cc3m_{split}_{key}", "jpg": jpeg, "txt": caption,
            "json": {"dataset": "cc3m", "split": split, "url": meta.get("url") if isinstance(meta, dict) else None,
                     "width": width, "height": height}}


# ----------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None):
    parser = make_parser("shard_cc3m", "CC3M -> webdataset shards", tuple(TSV_NAMES), "train")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--img2dataset", type=Path, help="img2dataset --output_format webdataset output directory")
    source.add_argument("--tsv", type=Path, help="caption<TAB>url file (default: ROOT/Train_GCC-training.tsv, "
                                                 "or ROOT/Validation_GCC-1.1.0-Validation.tsv for --split val)")
    parser.add_argument("--download-dir", type=Path, help="where TSV images are cached (default ROOT/images/SPLIT)")
    parser.add_argument("--retries", type=int, default=1, help="retries per image URL")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per image request")
    args = check_args(parser.parse_args(argv))
    root = require_root(args.root, "cc3m")
    dropped, notes = Counter(), Counter()
    if args.img2dataset:
        directory = require_file(args.img2dataset, "img2dataset output",
                                 "Run img2dataset first (the command: see data_scripts/README.md, CC3M).")
        records = img2dataset_samples(directory, dropped, notes)
        build = functools.partial(build_from_img2dataset, split=args.split, max_side=args.image_size)
    else:
        tsv = require_tsv(root, args.split, args.tsv)
        layout = tsv_layout(tsv)  # before anything is written: is it a caption<TAB>url file?
        print(f"at scale, fetch the images with img2dataset:\n  {img2dataset_command(tsv, root, args.split)}")
        records = tsv_records(tsv, dropped, notes, layout)
        build = functools.partial(build_from_url, cache_dir=args.download_dir or root / "images" / args.split,
                                  split=args.split, max_side=args.image_size, retries=args.retries,
                                  timeout=args.timeout)
    return run("cc3m", records, build, args, prefix=f"cc3m-{args.split}", skipped_before=dropped,
               extra_config={"source": "img2dataset" if args.img2dataset else "tsv"}, notes=notes)


if __name__ == "__main__":
    cli(main)
