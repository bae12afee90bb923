"""COCO captions with the Karpathy splits -> webdataset shards (one sample per image).

    python -m data_scripts.shard_coco --root data/coco --out shards/coco --split train

Reads ``ROOT/dataset_coco.json`` (from caption_datasets.zip) and ``ROOT/train2014``,
``ROOT/val2014``. ``--split train`` is Karpathy's train + restval (113,287 images).
Sample: ``jpg``; ``txt`` = the first caption; ``json`` = {dataset, split, image_id,
filename, captions (all five), width, height}. Flickr30k uses the same json format and code.
"""

from __future__ import annotations

import argparse
import functools
from collections import Counter
from pathlib import Path
from typing import Callable

from data_scripts.common import cli, load_jpeg, load_json, make_parser, require_file, require_root, run

KARPATHY_SPLITS = {"train": ("train", "restval"), "val": ("val",), "test": ("test",)}


def karpathy_records(json_path: Path, splits: tuple[str, ...]) -> tuple[list[dict], Counter]:
    """The image entries of a Karpathy-format json in ``splits``, and counts of dropped ones."""
    data = load_json(json_path)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise ValueError(f"{json_path} is not a Karpathy split json: expected {{'images': [...]}}")
    records, dropped = [], Counter()
    for image in data["images"]:
        if image.get("split") not in splits:
            continue
        if not image.get("sentences"):
            dropped["no_captions"] += 1
            continue
        records.append(image)
    return records, dropped


def build_karpathy(image: dict, dataset: str, image_path: Callable[[dict], Path], image_id: Callable[[dict], str],
                   max_side: int | None) -> dict:
    """One Karpathy json image entry -> a shard sample (``SkipSample`` if the image is unusable)."""
    jpeg, (width, height), _ = load_jpeg(image_path(image), max_side)
    captions = [sentence["raw"].strip() for sentence in image["sentences"]]
    return {
        "__key__": f"{dataset}_{image_id(image)}",
        "jpg": jpeg,
        "txt": captions[0],
        "json": {"dataset": dataset, "split": image["split"], "image_id": image.get("cocoid", image.get("imgid")),
                 "filename": image["filename"], "captions": captions, "width": width, "height": height},
    }


def shard_karpathy(args: argparse.Namespace, dataset: str, registry_name: str, json_path: Path,
                   image_path: Callable[[dict], Path], image_id: Callable[[dict], str]):
    require_file(json_path, "Karpathy split json",
                 f"It is in caption_datasets.zip: python -m data_scripts.download {registry_name} --root {args.root}")
    records, dropped = karpathy_records(json_path, KARPATHY_SPLITS[args.split])
    build = functools.partial(build_karpathy, dataset=dataset, image_path=image_path, image_id=image_id,
                              max_side=args.image_size)
    return run(dataset, records, build, args, prefix=f"{dataset}-{args.split}", skipped_before=dropped)


def main(argv: list[str] | None = None):
    parser = make_parser("shard_coco", "COCO captions (Karpathy splits) -> webdataset shards",
                         KARPATHY_SPLITS, "train")
    parser.add_argument("--karpathy-json", type=Path, help="default: ROOT/dataset_coco.json")
    args = parser.parse_args(argv)
    root = require_root(args.root, "coco_captions")
    return shard_karpathy(
        args, "coco", "coco_captions", args.karpathy_json or root / "dataset_coco.json",
        image_path=lambda image: root / image["filepath"] / image["filename"],
        image_id=lambda image: f"{image['cocoid']:012d}",
    )


if __name__ == "__main__":
    cli(main)
