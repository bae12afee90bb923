"""Visual Genome region descriptions -> webdataset shards (one sample per image).

    python -m data_scripts.shard_vg --root data/vg --out shards/vg

Reads ``ROOT/region_descriptions.json`` (v1.2: ``[{"id", "regions": [{"region_id", "phrase",
"x", "y", "width", "height"}]}]``) and the images ``ROOT/VG_100K/<id>.jpg`` or
``ROOT/VG_100K_2/<id>.jpg``. Sample: ``jpg``; ``txt`` = the first phrase; ``json`` =
{dataset, image_id, width, height, regions: [{region_id, phrase, box: [x, y, w, h]}]}, boxes
in pixels of the stored image (scaled when ``--image-size`` shrinks it). VG has no official
split: everything is ``train`` (drop images that are in your evaluation sets).
"""

from __future__ import annotations

import functools
from collections import Counter
from pathlib import Path

from course_lib.data.shards import SkipSample
from data_scripts.common import cli, load_jpeg, load_json, make_parser, require_file, require_root, run

IMAGE_DIRS = ("VG_100K", "VG_100K_2")


def clean_regions(regions: list[dict]) -> tuple[list[dict], int]:
    """Regions with a phrase and a positive-area box (x, y, w, h); and how many were dropped."""
    kept = []
    for region in regions:
        phrase = str(region.get("phrase", "")).strip()
        box = [region.get(k) for k in ("x", "y", "width", "height")]
        if phrase and all(isinstance(v, (int, float)) for v in box) and box[2] > 0 and box[3] > 0:
            kept.append({"region_id": region.get("region_id"), "phrase": phrase, "box": box})
    return kept, len(regions) - len(kept)


def vg_records(json_path: Path) -> tuple[list[dict], Counter]:
    data = load_json(json_path)
    if not isinstance(data, list):
        raise ValueError(f"{json_path} is not VG region_descriptions.json: expected a list of images")
    records, dropped = [], Counter()
    for entry in data:
        regions, bad = clean_regions(entry.get("regions", []))
        dropped["regions_dropped"] += bad
        if not regions:
            dropped["no_regions"] += 1
            continue
        records.append({"image_id": entry.get("id", entry.get("image_id")), "regions": regions})
    return records, dropped


def build_vg(record: dict, root: Path, max_side: int | None) -> dict:
    image_id = record["image_id"]
    path = next((root / d / f"{image_id}.jpg" for d in IMAGE_DIRS if (root / d / f"{image_id}.jpg").is_file()), None)
    if path is None:
        raise SkipSample("missing_image", f"{image_id}.jpg in {root}/{{{','.join(IMAGE_DIRS)}}}")
    jpeg, (width, height), (orig_w, orig_h) = load_jpeg(path, max_side)
    sx, sy = width / orig_w, height / orig_h
    regions = [
        {**r, "box": [r["box"][0] * sx, r["box"][1] * sy, r["box"][2] * sx, r["box"][3] * sy]}
        if (sx, sy) != (1.0, 1.0) else r
        for r in record["regions"]
    ]
    return {
        "__key__": f"vg_{image_id}",
        "jpg": jpeg,
        "txt": regions[0]["phrase"],
        "json": {"dataset": "visual_genome", "image_id": image_id, "width": width, "height": height,
                 "regions": regions},
    }


def main(argv: list[str] | None = None):
    parser = make_parser("shard_vg", "Visual Genome regions -> webdataset shards", ("train",), "train")
    args = parser.parse_args(argv)
    root = require_root(args.root, "visual_genome")
    json_path = require_file(root / "region_descriptions.json", "VG region descriptions",
                             f"Fetch it with: python -m data_scripts.download visual_genome --root {root}")
    records, dropped = vg_records(json_path)
    build = functools.partial(build_vg, root=root, max_side=args.image_size)
    return run("visual_genome", records, build, args, prefix=f"vg-{args.split}", skipped_before=dropped)


if __name__ == "__main__":
    cli(main)
