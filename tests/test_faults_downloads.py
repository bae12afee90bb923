"""Fault suite, downloads: a loopback server (127.0.0.1, a free port) that misbehaves on purpose.

It cuts transfers, changes a file between two attempts, ignores ``If-Range``, sends no
validators, answers with the wrong range, and serves HTML error pages under data file names.
Whatever it does, a file under its final name is the whole of one version of the file, and
the registry's unpublished sizes and checksums are trusted on first use and checked after.
"""

import hashlib
import http.server
import io
import json
import re
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from data_scripts import download as dl  # noqa: E402
from data_scripts import registry  # noqa: E402
from data_scripts.registry import DatasetInfo, RemoteFile  # noqa: E402
from fixtures_datasets import loopback_server  # noqa: E402

HTML = b"<!DOCTYPE html><html><body><h1>503 Service Unavailable</h1></body></html>"


class FaultyHandler(http.server.BaseHTTPRequestHandler):
    """Serves ``server.files[path]``, with the faults listed in ``server.faults[path]``:

    ``cut`` (a count: announce the whole body, send half, hang up), ``change`` (after the first
    response, serve ``server.next[path]`` under a new ETag), ``ignore_if_range``,
    ``no_validators``, ``wrong_range`` (answer a Range with bytes from 0), ``html`` (an HTML page
    with Content-Type text/html), ``html_as_binary`` (the same page, sent as application/zip).
    """

    def do_GET(self):  # noqa: N802 (http.server's naming)
        server, path = self.server, self.path.lstrip("/")
        faults = server.faults.setdefault(path, {})
        server.requests.append((path, self.headers.get("Range"), self.headers.get("If-Range")))
        if path not in server.files:
            self.send_error(404)
            return
        data, version = server.files[path], server.versions.get(path, 1)
        etag, modified = f'"v{version}"', f"Mon, 0{version} Jan 2024 00:00:00 GMT"
        if faults.get("html") or faults.get("html_as_binary"):
            self._send(200, HTML, "text/html" if faults.get("html") else "application/zip", etag, modified, faults)
            return
        start = self._range_start(faults, etag, modified)
        if start is not None and start >= len(data):
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{len(data)}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if start is None:
            self._send(200, data, "application/octet-stream", etag, modified, faults)
        else:
            first = 0 if faults.get("wrong_range") else start
            self._send(206, data[first:], "application/octet-stream", etag, modified, faults,
                       content_range=f"bytes {first}-{len(data) - 1}/{len(data)}")
        if faults.get("change") and path in server.next:
            server.files[path] = server.next.pop(path)
            server.versions[path] = version + 1

    def _range_start(self, faults, etag, modified):
        """Where the body starts: None for the whole file (no Range, or a failed If-Range)."""
        asked = self.headers.get("Range")
        if not asked:
            return None
        if_range = self.headers.get("If-Range")
        if if_range and if_range not in (etag, modified) and not faults.get("ignore_if_range"):
            return None  # RFC 9110: the file changed, so send all of it
        return int(re.fullmatch(r"bytes=(\d+)-", asked).group(1))

    def _send(self, status, body, content_type, etag, modified, faults, content_range=None):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        if content_range:
            self.send_header("Content-Range", content_range)
        if not faults.get("no_validators"):
            self.send_header("ETag", etag)
            self.send_header("Last-Modified", modified)
        self.end_headers()
        if faults.get("cut", 0) > 0:
            faults["cut"] -= 1
            body = body[: len(body) // 2]
            self.close_connection = True
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server():
    with loopback_server(FaultyHandler, files={}, next={}, versions={}, faults={}, requests=[]) as httpd:
        yield httpd


def serve(server, name: str, data: bytes, **faults) -> str:
    server.files[name], server.faults[name] = data, dict(faults)
    server.versions.pop(name, None)
    return f"{server.base}/{name}"


def requests_for(server, name):
    return [(r, ir) for p, r, ir in server.requests if p == name]


def get(url, dest, **kw):
    return dl.download(url, dest, progress=False, backoff=0, **kw)


OLD, NEW = bytes(range(256)) * 64, bytes(reversed(range(256))) * 64  # two versions, 16 KiB each


# ----------------------------------------------------------------------------- cut transfers


def test_a_transfer_cut_three_times_resumes_with_if_range_to_the_exact_file(server, tmp_path):
    url = serve(server, "cut3.bin", OLD, cut=3)
    assert get(url, tmp_path / "cut3.bin", retries=3).read_bytes() == OLD
    sent = requests_for(server, "cut3.bin")
    assert sent[0] == (None, None) and all(ir == '"v1"' for _, ir in sent[1:]) and len(sent) == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut3.bin"]  # no .part, no .part.json left


# ----------------------------------------------------------------------------- changed between attempts


def test_a_file_changed_between_attempts_comes_back_whole_not_spliced(server, tmp_path):
    # The fault: Range without If-Range glued the new version's tail onto the old one's head,
    # and renamed the result into place (exit 0).
    url = serve(server, "changed.bin", OLD, cut=1, change=True)
    server.next["changed.bin"] = NEW
    assert get(url, tmp_path / "changed.bin", retries=1).read_bytes() == NEW
    assert requests_for(server, "changed.bin")[1] == (f"bytes={len(OLD) // 2}-", '"v1"')


def test_a_server_ignoring_if_range_is_caught_by_the_etag_of_its_answer(server, tmp_path):
    url = serve(server, "ignores.bin", OLD, cut=1, change=True, ignore_if_range=True)
    server.next["ignores.bin"] = NEW
    assert get(url, tmp_path / "ignores.bin", retries=2).read_bytes() == NEW
    assert [r for r, _ in requests_for(server, "ignores.bin")] == [None, f"bytes={len(OLD) // 2}-", None]


def test_without_validators_nor_checksum_the_file_is_fetched_again_from_the_start(server, tmp_path):
    url = serve(server, "novalid.bin", OLD, cut=1, change=True, no_validators=True)
    server.next["novalid.bin"] = NEW
    assert get(url, tmp_path / "novalid.bin", retries=1).read_bytes() == NEW
    assert [r for r, _ in requests_for(server, "novalid.bin")] == [None, None]  # nothing to tell a splice by


def test_with_a_checksum_a_splice_never_reaches_the_final_name(server, tmp_path):
    url = serve(server, "spliced.bin", OLD, cut=1, change=True, no_validators=True)
    server.next["spliced.bin"] = NEW
    with pytest.raises(ValueError, match=r"spliced.bin.part: sha256 is"):
        get(url, tmp_path / "spliced.bin", retries=1, sha256=hashlib.sha256(OLD).hexdigest())
    assert not list(tmp_path.iterdir())


def test_a_shorter_file_answered_with_416_is_fetched_again(server, tmp_path):
    url = serve(server, "shrunk.bin", OLD, cut=1, change=True, ignore_if_range=True)
    server.next["shrunk.bin"] = NEW[:1000]  # shorter than the half already fetched
    assert get(url, tmp_path / "shrunk.bin", retries=2).read_bytes() == NEW[:1000]


# ----------------------------------------------------------------------------- wrong ranges


def test_a_wrong_range_is_never_appended(server, tmp_path):
    url = serve(server, "wrong.bin", OLD, cut=1, wrong_range=True)
    assert get(url, tmp_path / "wrong.bin", retries=2).read_bytes() == OLD
    assert [r for r, _ in requests_for(server, "wrong.bin")] == [None, f"bytes={len(OLD) // 2}-", None]


# ----------------------------------------------------------------------------- HTML error pages


@pytest.mark.parametrize("name", ["page.zip", "page.tsv", "page.json"])
def test_an_html_error_page_is_refused_before_it_is_written(server, tmp_path, name):
    # The fault: a 200 HTML page was saved under the data file's name.
    url = serve(server, name, OLD, html=True)
    with pytest.raises(dl.DownloadError, match=r"HTML page \(Content-Type text/html\), not the"):
        get(url, tmp_path / name, retries=3)
    assert len(requests_for(server, name)) == 1 and not list(tmp_path.iterdir())  # not retried, nothing written


def test_an_html_page_sent_as_a_zip_is_caught_by_its_first_bytes(server, tmp_path):
    url = serve(server, "lying.zip", OLD, html_as_binary=True)
    with pytest.raises(ValueError, match=r"lying.zip.part is an HTML page, not a .zip file"):
        get(url, tmp_path / "lying.zip")
    assert not list(tmp_path.iterdir())


def test_an_html_page_in_the_middle_of_a_resume_keeps_the_bytes_fetched(server, tmp_path):
    url = serve(server, "login.zip", OLD, cut=1)
    with pytest.raises(dl.DownloadError):
        get(url, tmp_path / "login.zip", retries=0)
    server.faults["login.zip"]["html"] = True  # the session expired: a login page now
    with pytest.raises(dl.DownloadError, match="HTML page"):
        get(url, tmp_path / "login.zip", retries=0)
    assert (tmp_path / "login.zip.part").read_bytes() == OLD[: len(OLD) // 2]


# ----------------------------------------------------------------------------- trust on first use


def zip_bytes(text: str) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        zf.writestr("data.json", json.dumps({"text": text}))
    return buffer.getvalue()


@pytest.fixture()
def unpublished(server, monkeypatch):
    """A registry dataset whose files have no published size or checksum (like Karpathy's splits)."""
    serve(server, "tofu.zip", zip_bytes("first version"))
    serve(server, "tofu.tsv", b"a caption\thttp://127.0.0.1/x.jpg\n")
    files = (RemoteFile(url=f"{server.base}/tofu.zip", filename="tofu.zip", extract=True),
             RemoteFile(url=f"{server.base}/tofu.tsv", filename="tofu.tsv"))
    monkeypatch.setitem(registry.DATASETS, "tofu", DatasetInfo(name="tofu", files=files, format="-", license="-",
                                                                homepage="-", disk="-"))
    return server


def test_unpublished_checksums_are_recorded_at_first_download_and_checked_after(unpublished, tmp_path):
    # The fault: most registry entries have no size or checksum, so nothing was ever checked.
    root = tmp_path / "root"
    assert dl.fetch_dataset("tofu", root, progress=False) == {"tofu.zip": "downloaded", "tofu.tsv": "downloaded"}
    lock = json.loads((root / "download-lock.json").read_text())
    first = unpublished.files["tofu.zip"]
    assert lock["tofu.zip"]["size"] == len(first) and lock["tofu.zip"]["sha256"] == hashlib.sha256(first).hexdigest()
    assert dl.verify_dataset("tofu", root) == {"tofu.zip": "ok", "tofu.tsv": "ok"}

    unpublished.files["tofu.zip"] = zip_bytes("a second version, changed on the server")
    (root / "tofu.zip").unlink()  # e.g. deleted once unpacked; the marker says so
    assert dl.fetch_dataset("tofu", root, progress=False)["tofu.zip"] == "extracted earlier"
    (root / ".tofu.zip.extracted").unlink()
    with pytest.raises(ValueError, match=r"tofu.zip.part: size is .*download-lock.json, recorded at its first "
                                         r"download: the file changed on the server"):
        dl.fetch_dataset("tofu", root, progress=False)
    assert not (root / "tofu.zip").exists() and not (root / "tofu.zip.part").exists()

    (root / "tofu.tsv").write_bytes(b"a caption\thttp://127.0.0.1/y.jpg\n")  # same size, other bytes
    report = dl.verify_dataset("tofu", root)
    assert report["tofu.tsv"].startswith("BAD: ") and "sha256" in report["tofu.tsv"]


def test_verify_only_never_reports_ok_for_a_zip_that_does_not_open(unpublished, tmp_path, capsys):
    # The fault: a broken zip with no size or checksum to check was reported "ok".
    root = tmp_path / "root"
    root.mkdir()
    (root / "tofu.zip").write_bytes(b"PK\x03\x04" + b"\x00" * 100)  # a zip's magic, and nothing else
    (root / "tofu.tsv").write_bytes(HTML)  # an error page saved by some other tool
    report = dl.main(["tofu", "--root", str(root), "--verify-only"])
    assert report["tofu.zip"].startswith("BAD: ") and "does not open as a zip" in report["tofu.zip"]
    assert report["tofu.tsv"].startswith("BAD: ") and "is an HTML page" in report["tofu.tsv"]
    assert "tofu.zip: BAD" in capsys.readouterr().out
    (root / "tofu.zip").write_bytes(zip_bytes("placed by hand"))
    (root / "tofu.tsv").write_bytes(b"caption\turl\n")
    report = dl.verify_dataset("tofu", root)
    assert report["tofu.zip"].startswith("ok, unchecked: no size or checksum recorded")
