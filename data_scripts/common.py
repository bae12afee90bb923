"""What every shard script shares: the command line, image loading with skip counts, summaries.

Each script turns its dataset's annotation files into a list of records (one per image) and
a function ``build(record) -> sample dict``; ``run`` writes them with
``course_lib.data.shards.write_shards`` (resumable) and prints what was written and skipped.

The annotation files are checked before a shard is written: a file that is not the one expected
(``describe_json`` says what it looks like, and ``KNOWN_FILES`` names it when it is another file of
the datasets), or a record without a key the script needs, is one ``error:`` line naming the file,
the record and the key; a run that writes no sample at all is an error too.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import io
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Callable, Iterable, Sequence

from PIL import Image

from course_lib.data.shards import JPEG_QUALITY, TMP_SUFFIX, ShardSummary, SkipSample, write_shards


def make_parser(prog: str, description: str, splits: Sequence[str], default_split: str, images: bool = True,
                root_help: str = "the dataset as downloaded (and unzipped)") -> argparse.ArgumentParser:
    """The options every shard script takes (``images=False``: no ``--image-size``, for scripts
    whose samples hold no image, e.g. region features)."""
    parser = argparse.ArgumentParser(prog=f"python -m data_scripts.{prog}", description=description)
    parser.add_argument("--root", required=True, type=Path, help=root_help)
    parser.add_argument("--out", required=True, type=Path, help="directory for the .tar shards")
    parser.add_argument("--split", default=default_split, choices=list(splits))
    parser.add_argument("--max-samples", type=int, default=None,
                        help="use only the first N records (images); unusable ones are skipped, "
                             "so the shards may hold fewer")
    parser.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    if images:
        parser.add_argument("--image-size", type=int, default=None,
                            help="shrink images so the shorter side is at most N px (JPEG re-encoded); "
                                 "default: keep bytes")
    parser.add_argument("--no-resume", action="store_true", help="rewrite every shard instead of keeping complete ones")
    return parser


def check_args(args: argparse.Namespace) -> argparse.Namespace:
    """The shared options' values, checked before any file is read; ``ValueError`` naming the option."""
    for option in ("max_samples", "shard_size", "image_size"):
        value = getattr(args, option, None)
        if value is not None and value < 1:
            raise ValueError(f"--{option.replace('_', '-')} must be >= 1, got {value}")
    return args


def require_file(path: Path, what: str, hint: str) -> Path:
    """``path`` if it exists, else ``FileNotFoundError`` naming it, what it is and how to get it."""
    if not path.exists():
        raise FileNotFoundError(f"{what} not found: {path} does not exist. {hint}")
    return path


def require_root(root: Path, dataset: str) -> Path:
    hint = f"Fetch it with: python -m data_scripts.download {dataset} --root {root}"
    return require_file(root, f"{dataset} root", hint)


def load_json(path: Path) -> object:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as exn:
        raise ValueError(f"{path} is not valid JSON ({exn}); download it again") from exn


# ----------------------------------------------------------------------------- is it the expected file?


def _first_item(data: object, key: str | None) -> object:
    """``data[key][0]`` (``data[0]`` for ``key=None``), or None when there is no such item."""
    items = data if key is None else data.get(key) if isinstance(data, dict) else None
    return items[0] if isinstance(items, list) and items else None


def _first_has(key: str | None, *fields: str) -> Callable[[object], bool]:
    def test(data: object) -> bool:
        item = _first_item(data, key)
        return isinstance(item, dict) and all(f in item for f in fields)
    return test


# The dataset files a script may be given by mistake, most specific first: (what it is, a test on its json).
KNOWN_FILES: tuple[tuple[str, Callable[[object], bool]], ...] = (
    ("a Karpathy split json (dataset_coco.json / dataset_flickr30k.json)", _first_has("images", "sentences", "split")),
    ("a COCO captions file (annotations/captions_train2014.json or captions_val2014.json)",
     _first_has("annotations", "caption", "image_id")),
    ("a COCO instances file (annotations/instances_*2014.json)", _first_has("annotations", "bbox", "category_id")),
    ("a VQA v2 questions file (v2_OpenEnded_mscoco_*2014_questions.json)", _first_has("questions", "question")),
    ("a VQA v2 annotations file (v2_mscoco_*2014_annotations.json)", _first_has("annotations", "answers")),
    ("Visual Genome's region_descriptions.json", _first_has(None, "regions")),
    ("Visual Genome's objects.json", _first_has(None, "objects")),
    ("Visual Genome's attributes.json", _first_has(None, "attributes")),
    ("Visual Genome's relationships.json", _first_has(None, "relationships")),
    ("Visual Genome's question_answers.json", _first_has(None, "qas")),
    ("Visual Genome's image_data.json", _first_has(None, "url", "width", "height")),
)


def _keys(item: object, limit: int = 10) -> str:
    if not isinstance(item, dict):
        return f"a {type(item).__name__}"
    names = sorted(map(str, item))
    more = f", ... ({len(names)} keys)" if len(names) > limit else ""
    return "an object with keys [" + ", ".join(names[:limit]) + more + "]"


def describe_json(data: object) -> str:
    """What a parsed JSON file looks like, in a phrase: its top-level shape and its first record's keys."""
    if isinstance(data, list):
        first = f", the first {_keys(data[0])}" if data else ""
        return f"a list of {len(data):,} item{'s' if len(data) != 1 else ''}{first}"
    if isinstance(data, dict):
        text = _keys(data)
        lists = [k for k, v in data.items() if isinstance(v, list) and v]
        if lists:
            text += f"; {lists[0]}[0] is {_keys(data[lists[0]][0])}"
        return text
    return f"a JSON {type(data).__name__}"


def wrong_json(path: Path, data: object, expected: str) -> ValueError:
    """The error for a json that is not the expected file: what it looks like, and what was expected."""
    guess = next((name for name, test in KNOWN_FILES if test(data)), None)
    looks = f"it looks like {guess}: " if guess else "it is "
    return ValueError(f"{path} is not the file expected: {looks}{describe_json(data)}. Expected {expected}")


def require_keys(record: object, keys: Sequence[str], path: Path, where: str) -> dict:
    """``record`` if it is a dict with every key of ``keys``; else ``ValueError`` naming the file,
    the record (``where``, e.g. ``"images[12] (imgid 12)"``) and the first missing key."""
    if not isinstance(record, dict):
        raise ValueError(f"{path}: {where} is a {type(record).__name__}, expected an object with keys {list(keys)}")
    for key in keys:
        if key not in record:
            raise ValueError(f"{path}: {where} has no key {key!r} (its keys: {sorted(map(str, record))}; "
                             f"expected {list(keys)})")
    return record


# ----------------------------------------------------------------------------- images


def jpeg_from_bytes(data: bytes, source: str, max_side: int | None = None
                    ) -> tuple[bytes, tuple[int, int], tuple[int, int]]:
    """Check that ``data`` decodes; return (JPEG bytes, their (w, h), the original (w, h)).

    Original JPEG bytes are kept unless ``max_side`` asks for a smaller image (shorter side at
    most ``max_side``); other formats are re-encoded. Undecodable data raises
    ``SkipSample("corrupt_image")``.
    """
    try:
        image = Image.open(io.BytesIO(data))
        image.load()  # a full decode: a truncated file fails here, not at training time
    except Exception as exn:
        raise SkipSample("corrupt_image", f"{source}: {exn}") from exn
    original = image.size
    if max_side is not None and min(image.size) > max_side:
        scale = max_side / min(image.size)
        image = image.convert("RGB").resize((round(image.width * scale), round(image.height * scale)),
                                            Image.BICUBIC)
    elif image.format == "JPEG":
        return data, original, original
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue(), image.size, original


def load_jpeg(path: Path, max_side: int | None = None) -> tuple[bytes, tuple[int, int], tuple[int, int]]:
    """``jpeg_from_bytes`` of an image file; ``SkipSample("missing_image")`` if it is not there."""
    if not path.is_file():
        raise SkipSample("missing_image", str(path))
    return jpeg_from_bytes(path.read_bytes(), str(path), max_side)


@dataclasses.dataclass
class RunSummary(ShardSummary):
    """``ShardSummary`` and ``notes``: counts worth reporting that are not skipped input items (e.g.
    URLs that had to be percent-encoded, the downloads img2dataset itself reports as failed)."""

    notes: dict[str, int] = dataclasses.field(default_factory=dict)

    def __str__(self) -> str:
        notes = ", ".join(f"{k} {v:,}" for k, v in sorted(self.notes.items()))
        return super().__str__() + (f"; also counted: {notes}" if notes else "")


class RecordError(ValueError):
    """A record without a key (or of a shape) that ``build`` needs, found while writing."""


def _build_checked(build: Callable[[object], dict], record: object, index: int) -> dict:
    """``build(record)``, with a ``KeyError`` turned into a ``RecordError`` naming the record."""
    try:
        return build(record)
    except KeyError as exn:
        shown = repr(record)
        shown = shown if len(shown) <= 200 else shown[:200] + "..."
        raise RecordError(f"input record {index} has no key {exn.args[0]!r}: {shown}") from exn


def remove_unfinished(out: Path, prefix: str) -> None:
    """Delete the ``prefix-*.tar.tmp`` a failed run leaves (never resumed from: a rerun rewrites them)."""
    for path in Path(out).glob(f"{prefix}-*.tar{TMP_SUFFIX}"):
        path.unlink()


def run(name: str, records: Iterable, build: Callable[[object], dict], args: argparse.Namespace,
        prefix: str, skipped_before: Counter | None = None, extra_config: dict | None = None,
        notes: Counter | None = None) -> RunSummary:
    """Write ``build(record)`` for each record into ``args.out/prefix-*.tar``; print a summary.

    ``build`` runs lazily inside ``write_shards`` (so resuming does not reload skipped-over
    images) and may raise ``SkipSample``. ``skipped_before`` adds counts of records the script
    dropped while reading its annotations (it may still be filled while ``records`` is read);
    ``notes`` (filled the same way) are counts reported beside the skips. ``extra_config`` joins
    the settings a resumed run must share with the first one. An input error (``ValueError``,
    or a record without a key ``build`` needs) ends the run without leaving a ``.tar.tmp``; a
    run that writes no sample at all is a ``ValueError`` quoting the skip counts.
    """
    check_args(args)
    image_size = getattr(args, "image_size", None)  # None: the script stores no images
    records = itertools.islice(records, args.max_samples)
    try:
        summary = write_shards(
            (functools.partial(_build_checked, build, record, index) for index, record in enumerate(records)),
            args.out, prefix, max_count=args.shard_size, resume=not args.no_resume,
            config={"dataset": name, "split": args.split, "image_size": image_size, **(extra_config or {})},
        )
    except ValueError:
        remove_unfinished(args.out, prefix)
        raise
    summary = RunSummary(**vars(summary), notes={k: v for k, v in (notes or {}).items() if v})
    if skipped_before:
        summary.skipped = dict(Counter(summary.skipped) + skipped_before)
    print(summary)
    if summary.samples == 0:
        skipped = ", ".join(f"{k} {v:,}" for k, v in sorted(summary.skipped.items())) or "none"
        raise ValueError(f"{prefix}: no sample was written (skipped: {skipped}); check the files given "
                         "(data_scripts/README.md says what each script expects)")
    return summary


def cli(main: Callable[[list[str] | None], object]) -> None:
    """Run a script's ``main``; print a clean one-line error instead of a traceback."""
    try:
        main(None)
    except (FileNotFoundError, ValueError) as exn:
        print(f"error: {exn}", file=sys.stderr)
        sys.exit(1)
