"""What every shard script shares: the command line, image loading with skip counts, summaries.

Each script turns its dataset's annotation files into a list of records (one per image) and
a function ``build(record) -> sample dict``; ``run`` writes them with
``course_lib.data.shards.write_shards`` (resumable) and prints what was written and skipped.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import io
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Callable, Iterable, Sequence

from PIL import Image

from course_lib.data.shards import JPEG_QUALITY, ShardSummary, SkipSample, write_shards


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


def run(name: str, records: Iterable, build: Callable[[object], dict], args: argparse.Namespace,
        prefix: str, skipped_before: Counter | None = None, extra_config: dict | None = None) -> ShardSummary:
    """Write ``build(record)`` for each record into ``args.out/prefix-*.tar``; print a summary.

    ``build`` runs lazily inside ``write_shards`` (so resuming does not reload skipped-over
    images) and may raise ``SkipSample``. ``skipped_before`` adds counts of records the script
    dropped while reading its annotations (it may still be filled while ``records`` is read).
    ``extra_config`` joins the settings a resumed run must share with the first one.
    """
    image_size = getattr(args, "image_size", None)  # None: the script stores no images
    if args.max_samples is not None and args.max_samples < 1:
        raise ValueError(f"--max-samples must be >= 1, got {args.max_samples}")
    if args.shard_size < 1:
        raise ValueError(f"--shard-size must be >= 1, got {args.shard_size}")
    if image_size is not None and image_size < 1:
        raise ValueError(f"--image-size must be >= 1, got {image_size}")
    records = itertools.islice(records, args.max_samples)
    summary = write_shards(
        (functools.partial(build, record) for record in records),
        args.out, prefix, max_count=args.shard_size, resume=not args.no_resume,
        config={"dataset": name, "split": args.split, "image_size": image_size, **(extra_config or {})},
    )
    if skipped_before:
        summary.skipped = dict(Counter(summary.skipped) + skipped_before)
    print(summary)
    return summary


def cli(main: Callable[[list[str] | None], object]) -> None:
    """Run a script's ``main``; print a clean one-line error instead of a traceback."""
    try:
        main(None)
    except (FileNotFoundError, ValueError) as exn:
        print(f"error: {exn}", file=sys.stderr)
        sys.exit(1)
