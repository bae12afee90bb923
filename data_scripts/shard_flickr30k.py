"""Flickr30k with the Karpathy splits -> webdataset shards (same format and code as COCO).

    python -m data_scripts.shard_flickr30k --root data/flickr30k --out shards/flickr30k --split train

Reads ``ROOT/dataset_flickr30k.json`` (from caption_datasets.zip) and the images in
``ROOT/flickr30k-images/<id>.jpg``, which must be requested by hand (see README).
"""

from __future__ import annotations

from pathlib import Path

from data_scripts.common import cli, make_parser, require_file, require_root
from data_scripts.shard_coco import KARPATHY_SPLITS, shard_karpathy


def main(argv: list[str] | None = None):
    parser = make_parser("shard_flickr30k", "Flickr30k (Karpathy splits) -> webdataset shards",
                         KARPATHY_SPLITS, "train")
    parser.add_argument("--karpathy-json", type=Path, help="default: ROOT/dataset_flickr30k.json")
    parser.add_argument("--images", type=Path, help="default: ROOT/flickr30k-images")
    args = parser.parse_args(argv)
    root = require_root(args.root, "flickr30k")
    images = require_file(args.images or root / "flickr30k-images", "Flickr30k image directory",
                          "The images need a request form: see data_scripts/README.md (flickr30k).")
    return shard_karpathy(
        args, "flickr30k", "flickr30k", args.karpathy_json or root / "dataset_flickr30k.json",
        image_path=lambda image: images / image["filename"],
        image_id=lambda image: Path(image["filename"]).stem,
    )


if __name__ == "__main__":
    cli(main)
