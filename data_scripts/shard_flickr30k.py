"""Flickr30k with the Karpathy splits -> webdataset shards (same format and code as COCO).

    python -m data_scripts.shard_flickr30k --root data/flickr30k --out shards/flickr30k --split train

Reads ``ROOT/dataset_flickr30k.json`` (Karpathy's split json, from caption_datasets.zip: the COCO
format without ``filepath`` and ``cocoid``; 29,000 train / 1,014 val / 1,000 test images) and
the images ``ROOT/flickr30k-images/<Flickr photo id>.jpg``, which must be requested by hand (see
README).

Sample (key ``flickr30k_<Flickr photo id>``): as ``shard_coco``, with ``image_id`` = the Flickr
photo id (the number in the file name; the string when the name is not a number) and ``imgid``
= Karpathy's index of the image in the json (0 to 31,013).
"""

from __future__ import annotations

from pathlib import Path

from data_scripts.common import check_args, cli, make_parser, require_file, require_root
from data_scripts.shard_coco import KARPATHY_SPLITS, shard_karpathy


def flickr_photo_id(image: dict) -> int | str:
    """The Flickr photo id of a Karpathy entry: its file name without ``.jpg`` (an int when it is digits)."""
    stem = Path(image["filename"]).stem
    return int(stem) if stem.isdigit() else stem


def main(argv: list[str] | None = None):
    parser = make_parser("shard_flickr30k", "Flickr30k (Karpathy splits) -> webdataset shards",
                         KARPATHY_SPLITS, "train")
    parser.add_argument("--karpathy-json", type=Path, help="default: ROOT/dataset_flickr30k.json")
    parser.add_argument("--images", type=Path, help="default: ROOT/flickr30k-images")
    args = check_args(parser.parse_args(argv))
    root = require_root(args.root, "flickr30k")
    images = require_file(args.images or root / "flickr30k-images", "Flickr30k image directory",
                          "The images need a request form: see data_scripts/README.md (flickr30k).")
    return shard_karpathy(
        args, "flickr30k", "flickr30k", args.karpathy_json or root / "dataset_flickr30k.json",
        image_path=lambda image: images / image["filename"], image_id=flickr_photo_id, key_digits=0,
    )


if __name__ == "__main__":
    cli(main)
