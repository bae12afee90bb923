"""Resumable, verified downloads (stdlib ``urllib`` + ``tqdm`` only).

``download(url, dest)`` writes to ``dest.part``, continues an interrupted ``.part`` with an
HTTP ``Range`` request, checks the size and checksum, and only then renames it to ``dest``
(atomically), so a file under its final name is always complete.

A resumed request carries ``If-Range`` with the ETag (or Last-Modified) of the response the
``.part`` came from (kept in ``dest.part.json``): a file that changed on the server in between
comes back whole, never spliced onto the old bytes. An HTML page (an error or login page) is
refused when a ``.zip``, ``.tsv``, ``.json``... was asked for, by its Content-Type and its
first bytes. Registry files without a published size or checksum are trusted on first use, as
package managers do: ``fetch_dataset`` records the size and SHA-256 of what it downloaded in
``ROOT/download-lock.json`` and checks every later download and ``--verify-only`` against it.

Command line::

    python -m data_scripts.download --list
    python -m data_scripts.download coco_captions --root data/coco [--base-url URL] [--only FILE ...]
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import http.client
import json
import os
import re
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path

from tqdm import tqdm

from data_scripts.registry import DATASETS, DatasetInfo, RemoteFile, get_dataset

CHUNK = 1 << 20
LOCK_NAME = "download-lock.json"  # beside the data: {filename: {"size", "sha256", "url", "recorded"}}
# What the first bytes of a file must be, by its name's ending (a saved HTML error page is not).
MAGIC = {".zip": (b"PK\x03\x04", b"PK\x05\x06"), ".gz": (b"\x1f\x8b",), ".tgz": (b"\x1f\x8b",)}
TEXT_SUFFIXES = (".json", ".tsv", ".csv", ".txt", ".jsonl")
HTML_STARTS = (b"<!doctype html", b"<html", b"<head", b"<body", b"<?xml")
USER_AGENT = "vlp-course-data-scripts/0.1 (+https://github.com/rom1504/img2dataset compatible)"
PERMANENT_HTTP_ERRORS = {400, 401, 403, 404, 405, 410, 451}


# Characters a URL may hold as they are (RFC 3986 reserved ones, and '%' of escapes already there).
URL_SAFE = {"userinfo": "%:!$&'()*+,;=~", "path": "/%:@!$&'()*+,;=~", "query": "/?%:@!$&'()*+,;=~"}


def _ascii_netloc(netloc: str) -> str:
    """``user@host:port`` with a non-ASCII host name in IDNA form and the user part percent-encoded."""
    if netloc.isascii():
        return netloc
    userinfo, at, hostport = netloc.rpartition("@")
    host, colon, port = hostport.partition(":")
    try:
        host = host.encode("idna").decode("ascii")
    except UnicodeError:
        pass  # not a valid international host name: the request fails and is counted as such
    return urllib.parse.quote(userinfo, safe=URL_SAFE["userinfo"]) + at + host + colon + port


def quote_url(url: str) -> str:
    """``url`` as a browser sends it: spaces, control and non-ASCII characters of the path and
    query percent-encoded as UTF-8, a non-ASCII host name in IDNA (``xn--``) form, the fragment
    (never sent) dropped. A URL without such characters comes back unchanged, and escapes
    already there are kept (``%20`` stays ``%20``)."""
    if url.isascii() and not re.search(r"[\x00-\x20\x7f]", url):
        return url
    parts = urllib.parse.urlsplit(url.strip())
    netloc = _ascii_netloc(parts.netloc)
    return urllib.parse.urlunsplit((parts.scheme, netloc, urllib.parse.quote(parts.path, safe=URL_SAFE["path"]),
                                    urllib.parse.quote(parts.query, safe=URL_SAFE["query"]), ""))


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


def _suffix(name: str) -> str:
    """``"images.zip"`` -> ``".zip"``; ``"x.tar.gz"`` -> ``".gz"``; no suffix -> ``""``."""
    return Path(name).suffix.lower()


def expects_no_html(name: str) -> bool:
    """True for file names whose content is never an HTML page (archives and data files)."""
    return _suffix(name) in MAGIC or _suffix(name) in TEXT_SUFFIXES


def check_file_kind(path: str | Path, name: str | None = None) -> None:
    """Raise ``ValueError`` when ``path`` is not the kind of file its name says.

    ``name`` (default: the path's own) decides: a ``.zip`` / ``.gz`` must start with its magic
    bytes, a ``.json`` with ``{`` or ``[``, and no data file may be an HTML page (what a server
    sends for an error, a login or a terms page, often with status 200).
    """
    path = Path(path)
    suffix = _suffix(name or path.name)
    with open(path, "rb") as f:
        head = f.read(512)
    start = head.lstrip(b"\xef\xbb\xbf \t\r\n")  # a UTF-8 byte-order mark and blank lines
    if suffix in TEXT_SUFFIXES or suffix in MAGIC:
        if start.lower().startswith(HTML_STARTS):
            raise ValueError(f"{path} is an HTML page, not a {suffix} file: the server sent an error, login "
                             "or terms page instead of the data (open it in a browser to read it)")
    if suffix in MAGIC and head and not head.startswith(MAGIC[suffix]):
        raise ValueError(f"{path} is not a {suffix} file: it starts with {head[:8]!r}, expected one of "
                         f"{list(MAGIC[suffix])}")
    if suffix == ".json" and start and start[:1] not in (b"{", b"["):
        raise ValueError(f"{path} is not JSON: it starts with {start[:20]!r}")


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


class _StartOver(ConnectionError):
    """The bytes in the ``.part`` cannot be continued (wrong range, changed file): fetch it whole."""


def _state_path(part: Path) -> Path:
    return part.with_name(part.name + ".json")


def _read_state(part: Path) -> dict:
    """What the ``.part``'s bytes came from: ``{"url", "etag", "last_modified", "total"}`` ({} if unknown)."""
    try:
        state = json.loads(_state_path(part).read_text())
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}


def _drop_part(part: Path) -> None:
    """Delete a ``.part`` and its state file."""
    part.unlink(missing_ok=True)
    _state_path(part).unlink(missing_ok=True)


def _version(headers) -> dict:
    """The validators that name this version of the file: a strong ETag, Last-Modified."""
    etag = headers.get("ETag")
    return {"etag": etag if etag and not etag.startswith("W/") else None,
            "last_modified": headers.get("Last-Modified")}


def _range_headers(url: str, part: Path, offset: int, checked: bool) -> dict:
    """``Range`` (+ ``If-Range``) to continue ``part``, or ``{}`` to fetch the whole file again.

    Without a validator from the first response, only a checksum (``checked``) could tell a
    spliced file: then the bytes are continued; otherwise they are fetched again.
    """
    state = _read_state(part)
    validator = (state.get("etag") or state.get("last_modified")) if state.get("url") == url else None
    if not offset or not (validator or checked):
        return {}
    return {"Range": f"bytes={offset}-", **({"If-Range": validator} if validator else {})}


def _refuse_html(url: str, response, name: str) -> None:
    """Refuse an HTML page sent for a data file, before a byte of it is written."""
    if expects_no_html(name) and response.headers.get_content_type() == "text/html":
        raise DownloadError(f"{url}: the server sent an HTML page (Content-Type text/html), not the "
                            f"{_suffix(name)} file {name}: an error, login or terms page? Open the URL in a "
                            "browser; nothing was written")


def _continues(url: str, response, part: Path, offset: int) -> bool:
    """True if ``response`` (206) carries exactly the rest of the file the ``.part`` holds the start of."""
    if response.status != 206:
        return False
    match = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+|\*)", response.headers.get("Content-Range", "").strip())
    if not match or int(match.group(1)) != offset:
        raise _StartOver(f"{url}: asked for bytes {offset}- but got Content-Range "
                         f"{response.headers.get('Content-Range')!r}; fetching the whole file again")
    state, now = _read_state(part), _version(response.headers)
    changed = [k for k in ("etag", "last_modified") if state.get(k) and now[k] and state[k] != now[k]]
    total = state.get("total")
    if changed or (total is not None and match.group(3) != "*" and int(match.group(3)) != total):
        raise _StartOver(f"{url}: the file changed on the server since the first bytes were fetched "
                         f"({', '.join(changed) or 'size'} differs); fetching the whole file again")
    return True


def _fetch(url: str, part: Path, timeout: float, bar: tqdm, checked: bool = False) -> None:
    """One request: append to ``part`` from its current size (HTTP Range) until the body ends.

    Raises ``ConnectionError`` when the server sends fewer bytes than it announced, and
    ``_StartOver`` (after deleting ``part``) when its bytes cannot be continued.
    """
    offset = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": USER_AGENT, **_range_headers(url, part, offset, checked)}
    request = urllib.request.Request(url, headers=headers)
    with urllib.request.urlopen(request, timeout=timeout) as response:
        _refuse_html(url, response, part.name[: -len(".part")])
        try:
            resumed = "Range" in headers and _continues(url, response, part, offset)
        except _StartOver:
            _drop_part(part)
            raise
        if response.status == 206 and not resumed:
            raise ConnectionError(f"{url}: the server sent part of the file (206) to a request for all of it")
        offset, mode = (offset, "ab") if resumed else (0, "wb")  # 200: the whole (perhaps new) file
        length = response.headers.get("Content-Length")
        expected_end = offset + int(length) if length is not None else None
        if not resumed:
            _state_path(part).write_text(json.dumps({"url": url, **_version(response.headers), "total": expected_end}))
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
    kept and the rest is requested with ``Range: bytes=N-`` and ``If-Range`` (the first
    response's ETag or Last-Modified, kept in ``dest.part.json``): a file changed on the server
    comes back whole, and a server answering with the wrong range is asked for the whole file.
    Without such a validator (and without a checksum to catch a splice) the ``.part`` is
    fetched again from the start. A failed attempt is retried ``retries`` times (waiting
    ``backoff * 2**k`` s), and a download that still fails raises ``DownloadError`` with the
    ``.part`` left in place for the next run; an HTML page sent for a data file
    (``check_file_kind``) fails at once. A ``.part`` whose size, checksum or kind is wrong
    once complete is deleted and ``ValueError`` names the mismatch.
    """
    _check_download_args(url, expected_size, sha256, md5, retries)
    dest = Path(dest)
    if dest.exists():
        verify_file(dest, expected_size, sha256, md5)
        check_file_kind(dest)
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    disable = None if progress else True  # None: only on a terminal
    with tqdm(total=expected_size, unit="B", unit_scale=True, desc=dest.name, disable=disable) as bar:
        _fetch_with_retries(url, part, expected_size, bool(sha256 or md5), retries, timeout, backoff, bar)
    try:
        verify_file(part, expected_size, sha256, md5)
        check_file_kind(part, dest.name)
    except ValueError:
        _drop_part(part)
        raise
    os.replace(part, dest)
    _state_path(part).unlink(missing_ok=True)
    return dest


def _fetch_with_retries(url: str, part: Path, expected_size: int | None, checked: bool, retries: int,
                        timeout: float, backoff: float, bar: tqdm) -> None:
    """``_fetch`` until ``part`` is complete, ``retries`` more times at most; ``DownloadError`` after."""
    error: Exception | None = None
    for attempt in range(retries + 1):
        have = part.stat().st_size if part.exists() else 0
        if expected_size is not None and have > expected_size:
            _drop_part(part)  # longer than the file can be: not a prefix of it
        elif expected_size is not None and have == expected_size and have > 0:
            return
        try:
            _fetch(url, part, timeout, bar, checked)
            return
        except DownloadError:
            raise  # an HTML page instead of the file: asking again gets the same page
        except urllib.error.HTTPError as exn:
            if exn.code == 416 and have > 0 and _read_state(part).get("total") == have:
                return  # nothing left to fetch: the .part holds all the announced bytes; verified next
            if exn.code == 416:
                _drop_part(part)  # the server's file is shorter than our bytes: not what they came from
            elif exn.code in PERMANENT_HTTP_ERRORS:
                raise DownloadError(f"{url}: HTTP {exn.code} {exn.reason}") from exn
            error = exn
        except (urllib.error.URLError, http.client.HTTPException, OSError) as exn:
            error = exn
        if attempt < retries:
            time.sleep(backoff * 2**attempt)
    kept = part.stat().st_size if part.exists() else 0
    raise DownloadError(
        f"could not download {url} after {retries + 1} attempts ({error}); {part} keeps the "
        f"{kept:,} bytes fetched so far and the next run resumes from there"
    )


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


def read_lock(root: str | Path) -> dict:
    """``ROOT/download-lock.json``: ``{filename: {"size", "sha256", "url", "recorded"}}`` ({} if none)."""
    path = Path(root) / LOCK_NAME
    if not path.exists():
        return {}
    try:
        lock = json.loads(path.read_text())
    except ValueError as exn:
        raise ValueError(f"{path} is not valid JSON ({exn}); it records what the first download of each file "
                         "was: restore it from a backup, or delete it to trust the files there now") from None
    if not isinstance(lock, dict) or not all(isinstance(v, dict) for v in lock.values()):
        raise ValueError(f"{path} must map file names to {{size, sha256, url, recorded}}, got {type(lock).__name__}")
    return lock


def _record_in_lock(root: Path, filename: str, path: Path, url: str) -> None:
    """Trust on first use: add the size and SHA-256 of ``path`` to the lock (written atomically)."""
    lock = read_lock(root)
    lock[filename] = {"size": path.stat().st_size, "sha256": file_digest(path, "sha256"), "url": url,
                      "recorded": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    tmp = root / f".{LOCK_NAME}.tmp"
    tmp.write_text(json.dumps(lock, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, root / LOCK_NAME)


def expected_of(file: RemoteFile, root: Path) -> tuple[int | None, str | None, str]:
    """(size, sha256, where from) that ``file`` must have: the registry's, else the lock's."""
    locked = read_lock(root).get(file.filename, {})
    if file.sha256 and locked.get("sha256") and locked["sha256"] != file.sha256:
        raise ValueError(f"{root / LOCK_NAME} records sha256 {locked['sha256']} for {file.filename}, the registry "
                         f"{file.sha256}; the registry is right: remove the file's entry from the lock")
    size = file.size if file.size is not None else locked.get("size")
    sha256 = file.sha256 or locked.get("sha256")
    sources = ["the registry"] if (file.size is not None or file.sha256 or file.md5) else []
    if locked and (file.size is None or file.sha256 is None):
        sources.append(f"{root / LOCK_NAME}, recorded at its first download: the file changed on the server or "
                       "this copy is damaged; if its publisher changed it on purpose, delete its entry there "
                       "and fetch it again")
    return size, sha256, " and ".join(sources) or "nothing: a first download"


def fetch_dataset(name: str, root: str | Path, base_url: str | None = None, only: list[str] | None = None,
                  extract_archives: bool = True, retries: int = 3, backoff: float = 1.0,
                  progress: bool = True) -> dict[str, str]:
    """Download (and unzip) every file of registry dataset ``name`` into ``root``.

    ``base_url`` replaces each file's URL by ``base_url/filename`` (a private mirror, or a
    local test server). Returns ``{filename: "downloaded" | "present" | "extracted earlier"}``.
    A file the registry gives no size or checksum for is recorded in ``ROOT/download-lock.json``
    at its first download, and checked against it ever after (trust on first use).
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
        size, sha256, source = expected_of(file, root)
        errors = []
        for url in urls:
            try:
                download(url, dest, size, sha256, retries=retries, md5=file.md5, backoff=backoff, progress=progress)
                break
            except DownloadError as exn:
                errors.append(str(exn))
            except ValueError as exn:
                raise ValueError(f"{exn} (expected values from {source})") from None
        else:
            raise DownloadError(f"{file.filename}: every source failed: " + " | ".join(errors))
        if file.filename not in read_lock(root):
            _record_in_lock(root, file.filename, dest, url)
        status[file.filename] = "present" if was_there else "downloaded"
        if file.extract and extract_archives and not extraction_marker(root, file).exists():
            extract(dest, root)
    return status


def check_zip_opens(path: Path) -> None:
    """Raise ``ValueError`` unless ``path`` opens as a zip (its central directory reads)."""
    try:
        with zipfile.ZipFile(path) as zf:
            zf.infolist()
    except (zipfile.BadZipFile, OSError) as exn:
        raise ValueError(f"{path} does not open as a zip file ({exn}); delete it and download it again") from None


def verify_file_of(file: RemoteFile, root: Path) -> str:
    """``"ok"`` (or ``"ok, unchecked: ..."``) for one present file, else ``ValueError`` naming the fault.

    Size and checksums against the registry or the lock, the kind of file its name says, and a
    zip must open.
    """
    path = root / file.filename
    size, sha256, source = expected_of(file, root)
    try:
        verify_file(path, size, sha256, file.md5)
    except ValueError as exn:
        raise ValueError(f"{exn} (expected values from {source})") from None
    check_file_kind(path)
    if file.extract or _suffix(file.filename) == ".zip":
        check_zip_opens(path)
    if size is None and sha256 is None and file.md5 is None:
        return f"ok, unchecked: no size or checksum recorded (not downloaded by this script; no {LOCK_NAME} entry)"
    return "ok"


def verify_dataset(name: str, root: str | Path) -> dict[str, str]:
    """``{filename: "ok" | "missing" | "extracted earlier" | "BAD: ..."}`` for the files of ``name``."""
    info, root = get_dataset(name), Path(root)
    report = {}
    for file in info.files:
        path = root / file.filename
        if not path.exists():
            report[file.filename] = "extracted earlier" if extraction_marker(root, file).exists() else "missing"
            continue
        try:
            report[file.filename] = verify_file_of(file, root)
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
