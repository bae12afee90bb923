"""COCO captions with the Karpathy splits -> webdataset shards (one sample per image).

    python -m data_scripts.shard_coco --root data/coco --out shards/coco --split train

Reads ``ROOT/dataset_coco.json`` (Karpathy's split json, from caption_datasets.zip) and the
images ``ROOT/<filepath>/<filename>``: ``train2014/COCO_train2014_<12-digit id>.jpg`` and
``val2014/COCO_val2014_<12-digit id>.jpg``. ``--split train`` is Karpathy's train + restval
(113,287 images; the 30,504 restval images are in ``val2014/``).

The json: ``{"images": [{"filepath", "sentids", "filename", "imgid", "split", "sentences":
[{"tokens", "raw", "imgid", "sentid"}], "cocoid"}], "dataset": "coco"}``; ``split`` is one of
train / restval / val / test; an image has 5 captions, a few have 6 or 7.

Sample (key ``coco_<12-digit cocoid>``): ``jpg``; ``txt`` = the first caption; ``json`` =
{dataset, split, image_id (the COCO id, ``cocoid``), imgid (Karpathy's index of the image in the
json), sentids (Karpathy's caption ids), filename, captions (all, stripped), width, height}.
Flickr30k uses the same json format and code (``shard_flickr30k``).
"""

from __future__ import annotations

import argparse
import functools
from collections import Counter
from pathlib import Path
from typing import Callable, Sequence

from data_scripts.common import (check_args, cli, load_jpeg, load_json, make_parser, require_file, require_keys,
                                 require_root, run, wrong_json)

KARPATHY_SPLITS = {"train": ("train", "restval"), "val": ("val",), "test": ("test",)}
KARPATHY_FORMAT = ("{'images': [{'split', 'filename', 'imgid', 'sentences': [{'raw', 'sentid', ...}], ...}], "
                   "'dataset'}")
IMAGE_KEYS = ("split", "filename", "sentences")  # what every dataset's image entry needs


def karpathy_data(json_path: Path, expected: str) -> list:
    """The ``images`` list of a Karpathy split json; ``ValueError`` saying what the file looks like
    when it is another file (``expected`` names the one wanted)."""
    data = load_json(json_path)
    images = data.get("images") if isinstance(data, dict) else None
    if not isinstance(images, list) or not any(isinstance(i, dict) and "sentences" in i and "split" in i
                                                for i in images):
        raise wrong_json(json_path, data, expected)
    return images


def check_image(image: object, index: int, json_path: Path, keys: Sequence[str]) -> dict:
    """``image`` if it has ``keys`` and each sentence a ``raw`` caption; else ``ValueError`` naming it."""
    where = f"images[{index}]"
    if isinstance(image, dict):
        where += f" (imgid {image.get('imgid')!r}, filename {image.get('filename')!r})"
    require_keys(image, keys, json_path, where)
    if not isinstance(image["sentences"], list):
        raise ValueError(f"{json_path}: {where}: 'sentences' is a {type(image['sentences']).__name__}, expected a list")
    for k, sentence in enumerate(image["sentences"]):
        require_keys(sentence, ("raw",), json_path, f"{where} sentences[{k}]")
    return image


def karpathy_records(json_path: Path, splits: tuple[str, ...], image_keys: Sequence[str] = (),
                     expected: str = "Karpathy's split json") -> tuple[list[dict], Counter]:
    """The image entries of a Karpathy-format json in ``splits``, and counts of dropped ones.

    Each entry of those splits must have ``split``, ``filename``, ``sentences`` (each with ``raw``)
    and ``image_keys``; images without a caption are dropped (``no_captions``).
    """
    images = karpathy_data(json_path, f"{expected}: {KARPATHY_FORMAT}")
    records, dropped, found = [], Counter(), Counter()
    for index, image in enumerate(images):
        found[image.get("split") if isinstance(image, dict) else None] += 1
        if not isinstance(image, dict) or image.get("split") not in splits:
            continue
        check_image(image, index, json_path, (*IMAGE_KEYS, *image_keys))
        if not image["sentences"]:
            dropped["no_captions"] += 1
            continue
        records.append(image)
    if not records and not dropped:
        raise ValueError(f"{json_path} has no image in split {' + '.join(splits)}; its images are in "
                         f"{dict(found)}")
    return records, dropped


def sample_key(dataset: str, image_id: int | str, digits: int) -> str:
    """``coco_000000391895`` (``digits=12``), ``flickr30k_1000092795`` (``digits=0``)."""
    return f"{dataset}_{image_id:0{digits}d}" if isinstance(image_id, int) else f"{dataset}_{image_id}"


def build_karpathy(image: dict, dataset: str, image_path: Callable[[dict], Path],
                   image_id: Callable[[dict], int | str], key_digits: int, max_side: int | None) -> dict:
    """One Karpathy json image entry -> a shard sample (``SkipSample`` if the image is unusable)."""
    jpeg, (width, height), _ = load_jpeg(image_path(image), max_side)
    captions = [sentence["raw"].strip() for sentence in image["sentences"]]
    dataset_id = image_id(image)
    return {
        "__key__": sample_key(dataset, dataset_id, key_digits),
        "jpg": jpeg,
        "txt": captions[0],
        "json": {"dataset": dataset, "split": image["split"], "image_id": dataset_id, "imgid": image.get("imgid"),
                 "sentids": [s.get("sentid") for s in image["sentences"]], "filename": image["filename"],
                 "captions": captions, "width": width, "height": height},
    }


def shard_karpathy(args: argparse.Namespace, dataset: str, registry_name: str, json_path: Path,
                   image_path: Callable[[dict], Path], image_id: Callable[[dict], int | str], key_digits: int,
                   image_keys: Sequence[str] = ()):
    json_name = f"dataset_{dataset}.json"
    require_file(json_path, "Karpathy split json",
                 f"It is {json_name} in caption_datasets.zip: python -m data_scripts.download {registry_name} "
                 f"--root {args.root} (or give it with --karpathy-json)")
    records, dropped = karpathy_records(json_path, KARPATHY_SPLITS[args.split], image_keys,
                                        f"Karpathy's {json_name} (from caption_datasets.zip; --karpathy-json)")
    build = functools.partial(build_karpathy, dataset=dataset, image_path=image_path, image_id=image_id,
                              key_digits=key_digits, max_side=args.image_size)
    return run(dataset, records, build, args, prefix=f"{dataset}-{args.split}", skipped_before=dropped)


def main(argv: list[str] | None = None):
    parser = make_parser("shard_coco", "COCO captions (Karpathy splits) -> webdataset shards",
                         KARPATHY_SPLITS, "train")
    parser.add_argument("--karpathy-json", type=Path, help="default: ROOT/dataset_coco.json")
    args = check_args(parser.parse_args(argv))
    root = require_root(args.root, "coco_captions")
    return shard_karpathy(
        args, "coco", "coco_captions", args.karpathy_json or root / "dataset_coco.json",
        image_path=lambda image: root / image["filepath"] / image["filename"],
        image_id=lambda image: image["cocoid"], key_digits=12, image_keys=("filepath", "cocoid"),
    )


if __name__ == "__main__":
    cli(main)
