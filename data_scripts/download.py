"""Resumable, verified downloads (stdlib ``urllib`` + ``tqdm`` only).

``download(url, dest)`` writes to ``dest.part``, continues an interrupted ``.part`` with an
HTTP ``Range`` request, checks the size and checksum, and only then renames it to ``dest``
(atomically), so a file under its final name is always complete.

Command line::

    python -m data_scripts.download --list
    python -m data_scripts.download coco_captions --root data/coco [--base-url URL] [--only FILE ...]
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import os
import sys
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

from tqdm import tqdm

from data_scripts.registry import DATASETS, DatasetInfo, RemoteFile, get_dataset

CHUNK = 1 << 20
USER_AGENT = "vlp-course-data-scripts/0.1 (+https://github.com/rom1504/img2dataset compatible)"
PERMANENT_HTTP_ERRORS = {400, 401, 403, 404, 405, 410, 451}


class DownloadError(OSError):
    """A download that failed for good (after its retries); the message names the URL."""


def file_digest(path: str | Path, algorithm: str) -> str:
    """Hex digest of a file (``"sha256"`` or ``"md5"``), read in 1 MiB chunks."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def verify_file(path: str | Path, expected_size: int | None = None, sha256: str | None = None,
                md5: str | None = None) -> None:
    """Raise ``ValueError`` naming ``path`` and the mismatch unless size and checksums match."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    size = path.stat().st_size
    if expected_size is not None and size != expected_size:
        raise ValueError(f"{path}: size is {size:,} bytes, expected_size is {expected_size:,}")
    for algorithm, expected in (("sha256", sha256), ("md5", md5)):
        if expected is not None:
            actual = file_digest(path, algorithm)
            if actual != expected.lower():
                raise ValueError(f"{path}: {algorithm} is {actual}, expected {algorithm} {expected}")


def _check_download_args(url, expected_size, sha256, md5, retries) -> None:
    if not isinstance(url, str) or not url.startswith(("http://", "https://", "file:")):
        raise ValueError(f"url must be an http(s):// or file: URL, got {url!r}")
    if expected_size is not None and (not isinstance(expected_size, int) or expected_size < 0):
        raise ValueError(f"expected_size must be None or a byte count >= 0, got {expected_size!r}")
    for name, value, length in (("sha256", sha256, 64), ("md5", md5, 32)):
        if value is not None and (len(value) != length or any(c not in "0123456789abcdefABCDEF" for c in value)):
            raise ValueError(f"{name} must be {length} hex digits, got {value!r}")
    if not isinstance(retries, int) or retries < 0:
        raise ValueError(f"retries must be an int >= 0, got {retries!r}")


def _fetch(url: str, part: Path, timeout: float, bar: tqdm) -> None:
    """One request: append to ``part`` from its current size (HTTP Range) until the body ends.

    Raises ``ConnectionError`` when the server sends fewer bytes than it announced.
    """
    offset = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": USER_AGENT}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    request = urllib.request.Request(url, headers=headers)
    with urllib.request.urlopen(request, timeout=timeout) as response:
        if offset and response.status == 206:
            content_range = response.headers.get("Content-Range", "")
            if not content_range.startswith(f"bytes {offset}-"):
                raise ConnectionError(f"{url}: asked for bytes {offset}- but got Content-Range {content_range!r}")
            mode = "ab"
        else:  # a fresh download, or a server that ignores Range: start over
            offset, mode = 0, "wb"
        length = response.headers.get("Content-Length")
        expected_end = offset + int(length) if length is not None else None
        if expected_end is not None:
            bar.total = expected_end
        bar.n = offset
        bar.refresh()
        received = offset
        with open(part, mode) as f:
            while chunk := response.read(CHUNK):
                f.write(chunk)
                received += len(chunk)
                bar.update(len(chunk))
    if expected_end is not None and received < expected_end:
        raise ConnectionError(f"{url}: connection closed after {received:,} of {expected_end:,} bytes")


def download(url: str, dest: str | Path, expected_size: int | None = None, sha256: str | None = None,
             retries: int = 3, md5: str | None = None, timeout: float = 60.0, backoff: float = 1.0,
             progress: bool = True) -> Path:
    """Download ``url`` to ``dest``; resume, verify, rename atomically. Returns ``dest``.

    A complete ``dest`` is verified and kept (no request). Bytes already in ``dest.part`` are
    kept and the rest is requested with ``Range: bytes=N-``; a failed attempt is retried
    ``retries`` times (waiting ``backoff * 2**k`` s), and a download that still fails raises
    ``DownloadError`` with the ``.part`` left in place for the next run. A ``.part`` whose
    size or checksum is wrong once complete is deleted and ``ValueError`` names the mismatch.
    """
    _check_download_args(url, expected_size, sha256, md5, retries)
    dest = Path(dest)
    if dest.exists():
        verify_file(dest, expected_size, sha256, md5)
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    disable = None if progress else True  # None: only on a terminal
    with tqdm(total=expected_size, unit="B", unit_scale=True, desc=dest.name, disable=disable) as bar:
        for attempt in range(retries + 1):
            have = part.stat().st_size if part.exists() else 0
            if expected_size is not None and have > expected_size:
                part.unlink()  # longer than the file can be: not a prefix of it
            elif expected_size is not None and have == expected_size and have > 0:
                break
            try:
                _fetch(url, part, timeout, bar)
                break
            except urllib.error.HTTPError as exn:
                if exn.code == 416 and have > 0:
                    break  # nothing left to fetch: the .part is complete; verified below
                if exn.code in PERMANENT_HTTP_ERRORS:
                    raise DownloadError(f"{url}: HTTP {exn.code} {exn.reason}") from exn
                error: Exception = exn
            except (urllib.error.URLError, http.client.HTTPException, OSError) as exn:
                error = exn
            if attempt < retries:
                time.sleep(backoff * 2**attempt)
        else:
            kept = part.stat().st_size if part.exists() else 0
            raise DownloadError(
                f"could not download {url} after {retries + 1} attempts ({error}); {part} keeps the "
                f"{kept:,} bytes fetched so far and the next run resumes from there"
            )
    try:
        verify_file(part, expected_size, sha256, md5)
    except ValueError:
        part.unlink()
        raise
    os.replace(part, dest)
    return dest


# ----------------------------------------------------------------------------- datasets


def extraction_marker(root: Path, file: RemoteFile) -> Path:
    return root / f".{file.filename}.extracted"


def extract(archive: Path, root: Path) -> None:
    """Unzip ``archive`` into ``root`` and leave a marker so a later run skips it.

    An interrupted extraction has no marker and is simply redone (files are overwritten).
    """
    try:
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(root)  # zipfile drops absolute paths and '..' from member names
    except zipfile.BadZipFile as exn:
        raise ValueError(f"{archive} is not a valid zip file ({exn}); delete it and download again") from exn
    (root / f".{archive.name}.extracted").touch()


def fetch_dataset(name: str, root: str | Path, base_url: str | None = None, only: list[str] | None = None,
                  extract_archives: bool = True, retries: int = 3, backoff: float = 1.0,
                  progress: bool = True) -> dict[str, str]:
    """Download (and unzip) every file of registry dataset ``name`` into ``root``.

    ``base_url`` replaces each file's URL by ``base_url/filename`` (a private mirror, or a
    local test server). Returns ``{filename: "downloaded" | "present" | "extracted earlier"}``.
    """
    info: DatasetInfo = get_dataset(name)
    root = Path(root)
    files = list(info.files)
    if only:
        known = {f.filename for f in files}
        unknown = sorted(set(only) - known)
        if unknown:
            raise ValueError(f"only={unknown} are not files of {name}; expected some of {sorted(known)}")
        files = [f for f in files if f.filename in only]
    root.mkdir(parents=True, exist_ok=True)
    status = {}
    for file in files:
        dest = root / file.filename
        if file.extract and extraction_marker(root, file).exists() and not dest.exists():
            status[file.filename] = "extracted earlier"  # the archive may be deleted once unpacked
            continue
        was_there = dest.exists()
        urls = [f"{base_url.rstrip('/')}/{file.filename}"] if base_url else [file.url, *file.mirrors]
        errors = []
        for url in urls:
            try:
                download(url, dest, file.size, file.sha256, retries=retries, md5=file.md5,
                         backoff=backoff, progress=progress)
                break
            except DownloadError as exn:
                errors.append(str(exn))
        else:
            raise DownloadError(f"{file.filename}: every source failed: " + " | ".join(errors))
        status[file.filename] = "present" if was_there else "downloaded"
        if file.extract and extract_archives and not extraction_marker(root, file).exists():
            extract(dest, root)
    return status


def verify_dataset(name: str, root: str | Path) -> dict[str, str]:
    """``{filename: "ok" | "missing" | "extracted earlier" | error}`` for the files of ``name``."""
    info, root = get_dataset(name), Path(root)
    report = {}
    for file in info.files:
        path = root / file.filename
        if not path.exists():
            report[file.filename] = "extracted earlier" if extraction_marker(root, file).exists() else "missing"
            continue
        try:
            verify_file(path, file.size, file.sha256, file.md5)
            report[file.filename] = "ok"
        except ValueError as exn:
            report[file.filename] = f"BAD: {exn}"
    return report


def list_datasets() -> str:
    lines = []
    for info in DATASETS.values():
        lines.append(f"{info.name}: {info.homepage}\n  format: {info.format}\n  licence: {info.license}\n"
                     f"  disk: {info.disk}")
        for file in info.files:
            size = f"{file.size:,} B" if file.size else "size unknown"
            check = "sha256" if file.sha256 else "md5" if file.md5 else "no checksum"
            lines.append(f"    {file.filename:36s} {size:>20s}  {check:11s} {file.url}")
        if info.manual:
            lines.append(f"  by hand: {info.manual}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, str]:
    parser = argparse.ArgumentParser(prog="python -m data_scripts.download", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", nargs="?", help=f"one of {sorted(DATASETS)}")
    parser.add_argument("--root", help="directory the files go to (and are unzipped in)")
    parser.add_argument("--base-url", help="fetch every file from BASE_URL/<filename> instead")
    parser.add_argument("--only", nargs="+", metavar="FILE", help="fetch only these files of the dataset")
    parser.add_argument("--no-extract", action="store_true", help="do not unzip archives")
    parser.add_argument("--retries", type=int, default=3)
    parser.add_argument("--verify-only", action="store_true", help="check the files already there, fetch nothing")
    parser.add_argument("--list", action="store_true", help="print the registry and exit")
    args = parser.parse_args(argv)
    if args.list:
        print(list_datasets())
        return {}
    if not args.dataset or not args.root:
        parser.error("give a dataset and --root (or --list)")
    info = get_dataset(args.dataset)
    if args.verify_only:
        report = verify_dataset(args.dataset, args.root)
    else:
        report = fetch_dataset(args.dataset, args.root, base_url=args.base_url, only=args.only,
                               extract_archives=not args.no_extract, retries=args.retries)
    for filename, state in report.items():
        print(f"{filename}: {state}")
    if info.manual:
        print(f"by hand: {info.manual}")
    if info.next_step:
        print(f"next: {info.next_step.replace('ROOT', str(args.root))}")
    return report


if __name__ == "__main__":
    try:
        report = main()
    except (DownloadError, FileNotFoundError, ValueError) as exn:
        print(f"error: {exn}", file=sys.stderr)
        sys.exit(1)
    sys.exit(1 if any(v.startswith(("BAD", "missing")) for v in report.values()) else 0)
