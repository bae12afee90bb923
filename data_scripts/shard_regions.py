"""Bottom-up-attention region features (TSV) + captions (+ VQA questions) -> webdataset shards.

    python -m data_scripts.shard_regions --root data/lxmert/train2014_obj36.tsv \\
        --captions data/coco/annotations/captions_train2014.json --out shards/coco-regions --split train

The region-feature systems (VisualBERT, LXMERT, UNITER, ...) were trained on the features of
Anderson et al.'s Faster R-CNN (bottom-up attention): 10-100 (usually 36) regions x 2048-d per
image, with boxes, distributed as TSV files whose arrays are base64-encoded raw bytes. ``--root``
is one such ``.tsv`` or a directory whose ``*.tsv`` files are all read, in name order. Two
layouts, told apart by the number of tab-separated fields in a row (no header):

- LXMERT / UNITER (10 fields): ``img_id, img_h, img_w, objects_id, objects_conf, attrs_id,
  attrs_conf, num_boxes, boxes, features``; ``objects_id``, ``attrs_id``: int64 (N,);
  ``objects_conf``, ``attrs_conf``: float32 (N,); ``boxes``: float32 (N, 4) pixels x1, y1, x2, y2;
  ``features``: float32 (N, F).
- bottom-up-attention / VisualBERT / ViLBERT (6 fields): ``image_id, image_w, image_h,
  num_boxes, boxes, features`` (width before height; no object labels).

A row with another number of fields (``wrong_field_count``), a height / width / num_boxes that is
not a positive int (``bad_number``; 0 boxes: ``no_regions``), an array that is not base64
(``bad_base64``) or whose byte count is not N x its shape (``wrong_array_size``, e.g. features
of another width than ``--feat-dim``), features that overflow float16 or are not finite
(``non_finite``), a box that is not finite or has x2 < x1 or y2 < y1 (``bad_boxes``), an image
id seen before (``duplicate_image``) or an image without any caption or question (``no_text``) is
skipped and counted, never fatal.

Text: ``--captions`` (repeatable) is a COCO captions json (``{"images": [...], "annotations":
[{"image_id", "caption"}, ...]}``) or a ``.jsonl`` of ``{"image_id", "caption"}``;
``--vqa-questions`` with ``--vqa-annotations`` adds the VQA v2 questions (as ``shard_vqa``).
Image ids are matched after normalisation: an id made of digits, optionally after a COCO file
prefix (``COCO_val2014_000000391895``, ``"391895"``, ``391895``), becomes the int ``391895``;
any other id (e.g. a Visual Genome or Flickr name with letters) is matched as its exact string.

Sample, one per image: ``feats.npy`` (R, F) float16 (half the disk of float32: 36 x 2048 x 2 =
147 KB per image; relative rounding at most 2^-11, below what training resolves; the reader
returns float32); ``boxes.npy`` (R, 4) float32 x1, y1, x2, y2 divided by the width / height and
clipped to [0, 1]; ``labels.npy`` (R,) int64, the detector's top object class (``objects_id``)
or -1 for the 6-field layout; ``txt`` = the first caption (the first question if the image has
no caption); ``json`` = {dataset, split, image_id, width, height, num_boxes, captions,
questions (only with VQA)}. R is the TSV's ``num_boxes`` (all kept; the reader keeps the first
``max_regions``).
"""

from __future__ import annotations

import base64
import binascii
import csv
import functools
import json
import re
import sys
from collections import Counter, defaultdict
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from course_lib.data.shards import SkipSample
from data_scripts.common import cli, load_json, make_parser, require_file, run
from data_scripts.shard_vqa import vqa_records

LXMERT_FIELDS = ("img_id", "img_h", "img_w", "objects_id", "objects_conf", "attrs_id", "attrs_conf",
                 "num_boxes", "boxes", "features")
BUTD_FIELDS = ("image_id", "image_w", "image_h", "num_boxes", "boxes", "features")
LAYOUTS = {len(LXMERT_FIELDS): LXMERT_FIELDS, len(BUTD_FIELDS): BUTD_FIELDS}
SPLITS = ("train", "val", "minival", "nominival", "test")
DEFAULT_FEAT_DIM = 2048
FLOAT16_MAX = float(np.finfo(np.float16).max)  # 65504: larger features would become inf
COCO_ID = re.compile(r"(?:COCO_[A-Za-z]+\d*_)?0*(\d+)")

ImageId = int | str


def normalize_image_id(raw: object) -> ImageId:
    """``391895``, ``"391895"``, ``"000000391895"``, ``"COCO_val2014_000000391895"`` -> ``391895``;
    any other id -> its string, stripped (matched exactly)."""
    if isinstance(raw, bool):
        raise ValueError(f"image_id must be an int or a str, got {raw!r}")
    if isinstance(raw, int):
        return raw
    text = str(raw).strip()
    match = COCO_ID.fullmatch(text)
    return int(match.group(1)) if match else text


def sample_key(dataset: str, image_id: ImageId) -> str:
    """``coco_000000391895`` for an int id; other ids with every character outside [A-Za-z0-9_-] as ``_``."""
    if isinstance(image_id, int):
        return f"{dataset}_{image_id:012d}"
    return f"{dataset}_" + re.sub(r"[^A-Za-z0-9_-]", "_", image_id)


# ----------------------------------------------------------------------------- text


def _caption_pairs(path: Path) -> Iterator[tuple[object, object]]:
    """(image_id, caption) of a COCO captions json or a jsonl of ``{"image_id", "caption"}``."""
    if path.suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError as exn:
                    raise ValueError(f"{path} line {number} is not valid JSON ({exn})") from exn
                if not isinstance(entry, dict) or "image_id" not in entry or "caption" not in entry:
                    raise ValueError(f"{path} line {number}: expected {{\"image_id\": ..., \"caption\": ...}}, "
                                     f"got {line.strip()[:80]!r}")
                yield entry["image_id"], entry["caption"]
        return
    data = load_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise ValueError(f"{path} is not a COCO captions json: expected {{'annotations': [{{'image_id', "
                         f"'caption'}}, ...]}} (or give a .jsonl of {{'image_id', 'caption'}} lines)")
    for entry in data["annotations"]:
        yield entry.get("image_id"), entry.get("caption")


def load_captions(paths: Iterable[Path], dropped: Counter) -> dict[ImageId, list[str]]:
    """Normalised image id -> its captions (file order, stripped); empty or non-str captions are
    counted in ``dropped["bad_caption"]``."""
    captions: dict[ImageId, list[str]] = defaultdict(list)
    for path in paths:
        for image_id, caption in _caption_pairs(path):
            if not isinstance(caption, str) or not caption.strip() or image_id is None:
                dropped["bad_caption"] += 1
                continue
            captions[normalize_image_id(image_id)].append(caption.strip())
    return dict(captions)


def load_questions(questions: Path, annotations: Path, dropped: Counter) -> dict[ImageId, list[dict]]:
    """Normalised image id -> its VQA v2 questions (``shard_vqa.vqa_records``: answers, soft scores)."""
    records, vqa_dropped = vqa_records(questions, annotations)
    dropped.update(vqa_dropped)
    return {normalize_image_id(r["image_id"]): r["questions"] for r in records}


# ----------------------------------------------------------------------------- TSV


def _set_csv_field_limit() -> None:
    """A features field is ~400 KB of base64; csv's default limit is 128 KB."""
    try:
        csv.field_size_limit(sys.maxsize)
    except OverflowError:  # a C long of 32 bits (Windows)
        csv.field_size_limit(2**31 - 1)


def tsv_paths(root: Path) -> list[Path]:
    """``root`` if it is a file, else the ``*.tsv`` files in the directory ``root`` in name order."""
    if root.is_file():
        return [root]
    paths = sorted(root.glob("*.tsv"))
    if not paths:
        raise FileNotFoundError(f"--root {root} is a directory without .tsv files; give a region-feature "
                                "TSV or the directory that holds them")
    return paths


def tsv_rows(paths: Iterable[Path]) -> Iterator[list[str]]:
    """The rows of the TSV files, as lists of str fields (blank lines are not rows).

    Undecodable bytes become U+FFFD (and the row then fails as ``bad_base64`` or ``bad_number``
    instead of stopping the run).
    """
    _set_csv_field_limit()
    for path in paths:
        with open(path, encoding="utf-8", errors="replace", newline="") as f:
            for row in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE):
                if row:
                    yield row


def unique_rows(rows: Iterable[list[str]], dropped: Counter) -> Iterator[list[str]]:
    """Rows whose (normalised) image id was not seen before; repeats counted as ``duplicate_image``
    (two samples with one key would merge into one in a shard)."""
    seen: set[ImageId] = set()
    for row in rows:
        image_id = normalize_image_id(row[0])
        if image_id in seen:
            dropped["duplicate_image"] += 1
            continue
        seen.add(image_id)
        yield row


def _int_field(fields: dict, name: str, minimum: int) -> int:
    """The int in field ``name``; ``SkipSample("bad_number")`` if it is not an int >= ``minimum``."""
    try:
        value = int(fields[name])
    except ValueError:
        value = None
    if value is None or value < minimum:
        raise SkipSample("bad_number", f"{name}={fields[name][:40]!r} is not an int >= {minimum}")
    return value


def row_layout(row: list[str]) -> tuple[str, ...]:
    """The field names of ``row``'s layout, told by its field count; ``SkipSample`` for another count."""
    if len(row) not in LAYOUTS:
        raise SkipSample("wrong_field_count", f"{len(row)} fields, expected one of {sorted(LAYOUTS)}")
    return LAYOUTS[len(row)]


def decode_array(text: str, dtype, shape: tuple[int, ...], name: str) -> np.ndarray:
    """A base64 field -> array of ``dtype`` and ``shape``; ``SkipSample`` (``bad_base64``,
    ``wrong_array_size``) naming the field when it is not that."""
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exn:
        raise SkipSample("bad_base64", f"{name}: {exn}") from exn
    expected = int(np.prod(shape)) * np.dtype(dtype).itemsize
    if len(data) != expected:
        raise SkipSample("wrong_array_size", f"{name}: {len(data)} bytes, expected {' x '.join(map(str, shape))} "
                                             f"{np.dtype(dtype).name} = {expected} bytes")
    return np.frombuffer(data, dtype=dtype).reshape(shape)


def parse_row(row: list[str], feat_dim: int) -> dict:
    """One TSV row (either layout) -> ``{"image_id", "width", "height", "feats": (N, F) float32,
    "boxes": (N, 4) float32 pixels, "labels": (N,) int64 (-1 without objects_id)}``."""
    fields = dict(zip(row_layout(row), row))
    width = _int_field(fields, "img_w" if "img_w" in fields else "image_w", 1)
    height = _int_field(fields, "img_h" if "img_h" in fields else "image_h", 1)
    n = _int_field(fields, "num_boxes", 0)
    if n == 0:
        raise SkipSample("no_regions", "num_boxes is 0")
    labels = (decode_array(fields["objects_id"], np.int64, (n,), "objects_id") if "objects_id" in fields
              else np.full(n, -1, dtype=np.int64))
    return {"image_id": normalize_image_id(row[0]), "width": width, "height": height,
            "boxes": decode_array(fields["boxes"], np.float32, (n, 4), "boxes"),
            "feats": decode_array(fields["features"], np.float32, (n, feat_dim), "features"),
            "labels": labels}


def normalize_boxes(boxes: np.ndarray, width: int, height: int) -> np.ndarray:
    """(N, 4) pixel x1, y1, x2, y2 -> divided by width, height, width, height, clipped to [0, 1];
    ``SkipSample("bad_boxes")`` for a box that is not finite or has x2 < x1 or y2 < y1."""
    if not np.isfinite(boxes).all() or (boxes[:, 2:] < boxes[:, :2]).any():
        raise SkipSample("bad_boxes", "a box is NaN / inf or has x2 < x1 or y2 < y1")
    scale = np.array([width, height, width, height], dtype=np.float32)
    return np.clip(boxes / scale, 0.0, 1.0).astype(np.float32)


def to_float16(feats: np.ndarray) -> np.ndarray:
    """(N, F) float32 -> float16; ``SkipSample("non_finite")`` if a value is NaN, inf or beyond 65504."""
    if not np.isfinite(feats).all() or np.abs(feats).max() > FLOAT16_MAX:
        raise SkipSample("non_finite", "features hold NaN / inf or values beyond float16's 65504")
    return feats.astype(np.float16)


def build_region_sample(row: list[str], captions: dict, questions: dict, dataset: str, split: str,
                        feat_dim: int) -> dict:
    """One TSV row -> a shard sample (``SkipSample`` when the row or its text is unusable)."""
    row_layout(row)
    image_id = normalize_image_id(row[0])  # the text is checked first: cheaper than decoding 300 KB of base64
    image_captions, image_questions = captions.get(image_id, []), questions.get(image_id, [])
    if not image_captions and not image_questions:
        raise SkipSample("no_text", f"image {row[0][:40]!r} has no caption or question")
    parsed = parse_row(row, feat_dim)
    meta = {"dataset": dataset, "split": split, "image_id": parsed["image_id"], "width": parsed["width"],
            "height": parsed["height"], "num_boxes": len(parsed["feats"]), "captions": image_captions}
    if image_questions:
        meta["questions"] = image_questions
    return {
        "__key__": sample_key(dataset, parsed["image_id"]),
        "feats.npy": to_float16(parsed["feats"]),
        "boxes.npy": normalize_boxes(parsed["boxes"], parsed["width"], parsed["height"]),
        "labels.npy": parsed["labels"].astype(np.int64),
        "txt": image_captions[0] if image_captions else image_questions[0]["question"],
        "json": meta,
    }


# ----------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None):
    parser = make_parser("shard_regions", "bottom-up-attention region features (TSV) + captions -> webdataset shards",
                         SPLITS, "train", images=False,
                         root_help="a region-feature .tsv (LXMERT/UNITER or bottom-up-attention layout), "
                                   "or a directory whose *.tsv files are all read")
    parser.add_argument("--captions", type=Path, action="append", default=[],
                        help="COCO captions json or .jsonl of {image_id, caption}; repeat for several files")
    parser.add_argument("--vqa-questions", type=Path, help="VQA v2 questions json (with --vqa-annotations)")
    parser.add_argument("--vqa-annotations", type=Path, help="VQA v2 annotations json (with --vqa-questions)")
    parser.add_argument("--feat-dim", type=int, default=DEFAULT_FEAT_DIM, help="feature width F of the TSV")
    parser.add_argument("--dataset", default="coco", help="name in the keys, prefix and json (letters, digits, _)")
    args = parser.parse_args(argv)
    if args.feat_dim < 1:
        raise ValueError(f"--feat-dim must be >= 1, got {args.feat_dim}")
    if not re.fullmatch(r"[A-Za-z0-9_]+", args.dataset):
        raise ValueError(f"--dataset must be letters, digits and _, got {args.dataset!r}")
    if (args.vqa_questions is None) != (args.vqa_annotations is None):
        raise ValueError("--vqa-questions and --vqa-annotations go together: give both or neither")
    if not args.captions and args.vqa_questions is None:
        raise ValueError("no text: give --captions (COCO captions json or .jsonl) and/or "
                         "--vqa-questions with --vqa-annotations")
    paths = tsv_paths(require_file(args.root, "region-feature TSV", "Give the .tsv of the features "
                                   "(e.g. LXMERT's train2014_obj36.tsv) or its directory."))
    text_files = [*args.captions] + ([args.vqa_questions, args.vqa_annotations] if args.vqa_questions else [])
    for path in text_files:
        require_file(path, "text file", "Check the path given to --captions / --vqa-questions / --vqa-annotations.")
    dropped = Counter()
    captions = load_captions(args.captions, dropped)
    questions = load_questions(args.vqa_questions, args.vqa_annotations, dropped) if args.vqa_questions else {}
    build = functools.partial(build_region_sample, captions=captions, questions=questions, dataset=args.dataset,
                              split=args.split, feat_dim=args.feat_dim)
    config = {"feat_dim": args.feat_dim, "tsv": [p.name for p in paths], "text": [p.name for p in text_files]}
    return run(args.dataset, unique_rows(tsv_rows(paths), dropped), build, args,
               prefix=f"{args.dataset}-regions-{args.split}", skipped_before=dropped, extra_config=config)


if __name__ == "__main__":
    cli(main)
