"""Conceptual Captions 3M -> webdataset shards, from img2dataset's output or from the TSV.

At scale, fetch the images with img2dataset (parallel, resizing, retries) and re-shard its
output (verified images, our keys and json)::

    python -m data_scripts.shard_cc3m --root data/cc3m --out shards/cc3m --img2dataset data/cc3m/img2dataset-train

For a small subset, read the TSV (caption<TAB>url, no header) and fetch each image with our
downloader into ``ROOT/images/<split>/`` (kept, so a rerun does not fetch again); dead links
and undecodable images are skipped and counted::

    python -m data_scripts.shard_cc3m --root data/cc3m --out shards/cc3m --max-samples 5000

Sample: ``jpg``; ``txt`` = the caption; ``json`` = {dataset, split, url, width, height}.
"""

from __future__ import annotations

import functools
import json
from collections import Counter
from pathlib import Path

import webdataset as wds

from course_lib.data.shards import ErrorPolicy, SkipSample, group_samples, list_shards, open_shards, tar_members
from data_scripts.common import cli, jpeg_from_bytes, make_parser, require_file, require_root, run
from data_scripts.download import DownloadError, download

TSV_NAMES = {"train": "GCC-training.tsv", "val": "GCC-1.1.0-Validation.tsv"}


def img2dataset_command(root: Path, split: str) -> str:
    """The img2dataset command line for the full split (img2dataset wants a header row)."""
    tsv = root / TSV_NAMES[split]
    with_header = root / f"cc3m_{split}_with_header.tsv"
    return (f"(printf 'caption\\turl\\n'; cat {tsv}) > {with_header} && "
            f"img2dataset --url_list {with_header} --input_format tsv --url_col url --caption_col caption "
            f"--output_format webdataset --output_folder {root}/img2dataset-{split} --processes_count 16 "
            f"--thread_count 64 --image_size 256 --resize_mode keep_ratio --enable_wandb False")


def tsv_records(tsv_path: Path, dropped: Counter):
    """(row index, caption, url) per TSV row; a header row is skipped, malformed rows counted."""
    with open(tsv_path, encoding="utf-8") as f:
        for index, line in enumerate(f):
            fields = line.rstrip("\n").split("\t")
            if index == 0 and [c.lower() for c in fields] == ["caption", "url"]:
                continue
            if len(fields) != 2 or not fields[1].startswith(("http://", "https://")):
                dropped["bad_tsv_rows"] += 1
                continue
            yield index, fields[0].strip(), fields[1].strip()


def build_from_url(record: tuple, cache_dir: Path, split: str, max_side: int | None, retries: int,
                   timeout: float) -> dict:
    index, caption, url = record
    path = cache_dir / f"{index:09d}"
    try:
        download(url, path, retries=retries, timeout=timeout, backoff=0.5, progress=False)
    except (DownloadError, ValueError) as exn:
        raise SkipSample("download_failed", f"{url}: {exn}") from exn
    jpeg, (width, height), _ = jpeg_from_bytes(path.read_bytes(), url, max_side)
    return {"__key__": f"cc3m_{split}_{index:09d}", "jpg": jpeg, "txt": caption,
            "json": {"dataset": "cc3m", "split": split, "url": url, "width": width, "height": height}}


def img2dataset_samples(directory: Path, dropped: Counter):
    """Raw samples of img2dataset's tar shards; unreadable shards/entries counted, not fatal."""
    stats = {"skipped": 0, "last_error": None, "reasons": {}}
    policy = ErrorPolicy("skip", stats)
    pipeline = wds.DataPipeline(
        wds.SimpleShardList(list_shards(directory)),
        wds.pipelinefilter(open_shards)(handler=policy),
        wds.pipelinefilter(tar_members)(handler=policy),  # a cut-short shard drops its partial last sample
        wds.pipelinefilter(group_samples)(handler=policy),
    )
    yield from pipeline
    for reason, count in stats["reasons"].items():
        dropped[f"img2dataset_{reason}"] += count


def build_from_img2dataset(sample: dict, split: str, max_side: int | None) -> dict:
    key = sample["__key__"]
    if "jpg" not in sample:
        raise SkipSample("missing_image", f"img2dataset sample {key} has no jpg")
    if "txt" not in sample:
        raise SkipSample("missing_txt", f"img2dataset sample {key} has no txt caption")
    jpeg, (width, height), _ = jpeg_from_bytes(sample["jpg"], f"img2dataset sample {key}", max_side)
    try:
        caption = sample.get("txt", b"").decode("utf-8").strip()
        meta = json.loads(sample["json"]) if "json" in sample else {}
    except (UnicodeDecodeError, json.JSONDecodeError) as exn:
        raise SkipSample("corrupt_text", f"img2dataset sample {key}: {exn}") from exn
    return {"__key__": f"cc3m_{split}_{key}", "jpg": jpeg, "txt": caption,
            "json": {"dataset": "cc3m", "split": split, "url": meta.get("url"), "width": width, "height": height}}


def main(argv: list[str] | None = None):
    parser = make_parser("shard_cc3m", "CC3M -> webdataset shards", tuple(TSV_NAMES), "train")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--img2dataset", type=Path, help="img2dataset --output_format webdataset output directory")
    source.add_argument("--tsv", type=Path, help="caption<TAB>url file (default ROOT/GCC-training.tsv or the val one)")
    parser.add_argument("--download-dir", type=Path, help="where TSV images are cached (default ROOT/images/SPLIT)")
    parser.add_argument("--retries", type=int, default=1, help="retries per image URL")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per image request")
    args = parser.parse_args(argv)
    root = require_root(args.root, "cc3m")
    print(f"at scale, fetch the images with img2dataset:\n  {img2dataset_command(root, args.split)}")
    dropped: Counter = Counter()
    if args.img2dataset:
        records = img2dataset_samples(require_file(args.img2dataset, "img2dataset output", "Run the command above."),
                                      dropped)
        build = functools.partial(build_from_img2dataset, split=args.split, max_side=args.image_size)
    else:
        tsv = require_file(args.tsv or root / TSV_NAMES[args.split], "CC3M TSV",
                           f"Fetch it with: python -m data_scripts.download cc3m --root {root}")
        records = tsv_records(tsv, dropped)
        build = functools.partial(build_from_url, cache_dir=args.download_dir or root / "images" / args.split,
                                  split=args.split, max_side=args.image_size, retries=args.retries,
                                  timeout=args.timeout)
    return run("cc3m", records, build, args, prefix=f"cc3m-{args.split}", skipped_before=dropped,
               extra_config={"source": "img2dataset" if args.img2dataset else "tsv"})


if __name__ == "__main__":
    cli(main)
