"""Visual Genome region descriptions -> webdataset shards (one sample per image).

    python -m data_scripts.shard_vg --root data/vg --out shards/vg

Reads ``ROOT/region_descriptions.json`` (v1.2, from region_descriptions.json.zip: ``[{"regions":
[{"region_id", "width", "height", "image_id", "phrase", "y", "x"}], "id"}]``) and the images
``ROOT/VG_100K/<id>.jpg`` or ``ROOT/VG_100K_2/<id>.jpg`` (images.zip, images2.zip).

Sample (key ``vg_<id>``): ``jpg``; ``txt`` = the first phrase; ``json`` = {dataset, image_id
(VG's image id), width, height, regions: [{region_id, phrase, box: [x, y, w, h]}]}, boxes in
pixels of the stored image (scaled when ``--image-size`` shrinks it). Boxes are kept as the
dataset gives them: some run past the image border (x + w > width, or y + h > height); where a
model needs boxes inside the image, clip them with ``clip_box``. Regions without a phrase or
with an empty box are dropped (``regions_dropped``). VG has no official split: everything is
``train`` (drop images that are in your evaluation sets).
"""

from __future__ import annotations

import functools
from collections import Counter
from pathlib import Path

from course_lib.data.shards import SkipSample
from data_scripts.common import (check_args, cli, load_jpeg, load_json, make_parser, require_file, require_keys,
                                 require_root, run, wrong_json)

IMAGE_DIRS = ("VG_100K", "VG_100K_2")
EXPECTED = ("Visual Genome's region_descriptions.json (v1.2, in region_descriptions.json.zip): "
            "[{'id', 'regions': [{'region_id', 'image_id', 'phrase', 'x', 'y', 'width', 'height'}]}]")


def clip_box(box: list[float], width: float, height: float) -> list[float] | None:
    """``[x, y, w, h]`` cut to the image ``width`` x ``height``; None when nothing of it is inside."""
    x0, y0 = max(0.0, float(box[0])), max(0.0, float(box[1]))
    x1, y1 = min(float(width), float(box[0] + box[2])), min(float(height), float(box[1] + box[3]))
    if x1 <= x0 or y1 <= y0:
        return None
    return [x0, y0, x1 - x0, y1 - y0]


def clean_regions(regions: list[dict]) -> tuple[list[dict], int]:
    """Regions with a phrase and a positive-area box (x, y, w, h); and how many were dropped."""
    kept = []
    for region in regions:
        if not isinstance(region, dict):
            continue
        phrase = str(region.get("phrase", "")).strip()
        box = [region.get(k) for k in ("x", "y", "width", "height")]
        if phrase and all(isinstance(v, (int, float)) for v in box) and box[2] > 0 and box[3] > 0:
            kept.append({"region_id": region.get("region_id"), "phrase": phrase, "box": box})
    return kept, len(regions) - len(kept)


def vg_image_id(entry: dict, index: int, json_path: Path) -> int | str:
    """An entry's image id: ``id`` (v1.2), or ``image_id`` (other releases)."""
    for key in ("id", "image_id"):
        if key in entry:
            return entry[key]
    raise ValueError(f"{json_path}: entry [{index}] has no key 'id' (nor 'image_id'); its keys: "
                     f"{sorted(map(str, entry))}")


def vg_records(json_path: Path) -> tuple[list[dict], Counter]:
    """One record per image with usable regions; ``ValueError`` when the file is another VG file
    (e.g. objects.json), an entry lacks its id or regions, or no region at all is usable."""
    data = load_json(json_path)
    if not isinstance(data, list) or not any(isinstance(e, dict) and "regions" in e for e in data[:100]):
        raise wrong_json(json_path, data, EXPECTED)
    records, dropped = [], Counter()
    for index, entry in enumerate(data):
        image_id = vg_image_id(require_keys(entry, ("regions",), json_path, f"entry [{index}]"), index, json_path)
        if not isinstance(entry["regions"], list):
            raise ValueError(f"{json_path}: entry [{index}] (id {image_id!r}): 'regions' is a "
                             f"{type(entry['regions']).__name__}, expected a list")
        regions, bad = clean_regions(entry["regions"])
        dropped["regions_dropped"] += bad
        if not regions:
            dropped["no_regions"] += 1
            continue
        records.append({"image_id": image_id, "regions": regions})
    if not records:
        raise ValueError(f"{json_path} has no region with a phrase and a box of positive size in its "
                         f"{len(data):,} entries; expected {EXPECTED}")
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
    parser.add_argument("--regions-json", type=Path, help="default: ROOT/region_descriptions.json")
    args = check_args(parser.parse_args(argv))
    root = require_root(args.root, "visual_genome")
    json_path = require_file(args.regions_json or root / "region_descriptions.json", "VG region descriptions",
                             f"Fetch it with: python -m data_scripts.download visual_genome --root {root}")
    records, dropped = vg_records(json_path)
    build = functools.partial(build_vg, root=root, max_side=args.image_size)
    return run("visual_genome", records, build, args, prefix=f"vg-{args.split}", skipped_before=dropped)


if __name__ == "__main__":
    cli(main)
