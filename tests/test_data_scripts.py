"""data_scripts end to end against tiny fixtures in the published formats, served from 127.0.0.1.

The fixtures (``tests/fixtures_datasets.py``) follow the real files: Karpathy's split json with
``restval`` images in ``val2014/``, ``sentids`` and 6-7 captions, CMYK and greyscale JPEGs;
Flickr30k without ``filepath`` / ``cocoid``; VQA v2 question ids ``image_id * 1000 + k`` with
mixed answer confidences; Visual Genome boxes past the image border, images in both folders;
CC3M under its official name with non-ASCII captions and URLs; img2dataset's tars, json and
``_stats.json`` over several shards. Each dataset has a missing and a corrupt image, and the
tests check the shards' contents and every count exactly. No outside network is used.
"""

import hashlib
import http.server
import io
import json
import re
import subprocess
import sys
import urllib.parse
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # data_scripts is run as `python -m data_scripts.X` from the repo root
    sys.path.insert(0, str(REPO))

from course_lib.data.shards import ShardDataset, read_manifest, verify_shards  # noqa: E402
from data_scripts import common, registry, shard_cc3m, shard_coco, shard_flickr30k, shard_vg, shard_vqa  # noqa: E402
from data_scripts import download as dl  # noqa: E402
from data_scripts.registry import DatasetInfo, RemoteFile  # noqa: E402
from data_scripts.shard_vqa import vqa_soft_scores  # noqa: E402
from fixtures_datasets import (  # noqa: E402
    CC3M_TSV, CORRUPT, Karpathy, coco_captions_json, coco_file, image_bytes, loopback_server, member_offsets,
    vg_image, vg_objects_image, vg_region, vqa_annotation, vqa_annotations_file, vqa_question, vqa_questions_file,
    write_cc3m_tsv, write_img2dataset_output, write_zip,
)


# ----------------------------------------------------------------------------- loopback server


class RangeHandler(http.server.BaseHTTPRequestHandler):
    """Serves ``server.root``; honours ``Range: bytes=N-``; can cut a response short once.

    ``server.requests`` records each request's path as sent (percent-encoded) and its Range.
    """

    def do_GET(self):  # noqa: N802 (http.server's naming)
        server = self.server
        path = self.path.lstrip("/")
        byte_range = self.headers.get("Range")
        server.requests.append((path, byte_range))
        file = server.root / urllib.parse.unquote(path)
        if not file.is_file():
            self.send_error(404)
            return
        data = file.read_bytes()
        start = 0
        if byte_range and path not in server.ignore_range:
            start = int(re.fullmatch(r"bytes=(\d+)-", byte_range).group(1))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if path in server.truncate_once:  # announce everything, send half, hang up
            server.truncate_once.discard(path)
            body = body[: len(body) // 2]
            self.close_connection = True
        server.sent.append((path, len(body)))  # before writing: the client may finish before a later append
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with loopback_server(RangeHandler, root=tmp_path_factory.mktemp("www"), requests=[], sent=[],
                         truncate_once=set(), ignore_range=set()) as httpd:
        yield httpd


def requests_for(server, path):
    return [r for p, r in server.requests if p == path]


# ----------------------------------------------------------------------------- fixtures


def served(server, name: str, extract: bool = False, checksum: str = "sha256", url=None, mirrors=()) -> RemoteFile:
    """A registry entry for a file in the server root, with its true size and checksum."""
    data = (server.root / name).read_bytes()
    digest = {checksum: hashlib.new(checksum, data).hexdigest()}
    return RemoteFile(url=url or f"{server.base}/{name}", filename=name, size=len(data), extract=extract,
                      mirrors=mirrors, **digest)


def fake_dataset(name, files) -> DatasetInfo:
    return DatasetInfo(name=name, files=tuple(files), format="fixture", license="fixture", homepage="-",
                       disk="-", next_step="python -m data_scripts.shard_x --root ROOT")


def karpathy_coco() -> dict:
    """Train: 1 (6 captions), 12 (restval, in val2014/, 7 captions), 2 (greyscale), 3 (corrupt),
    4 (missing), 5 (no caption), 6 (CMYK); val: 10; test: 11."""
    k = Karpathy("coco")
    k.add(coco_file("train", 1), "train", ["A red square on grey. ", "A square.", "Red on grey.", "A shape.",
                                             "One square.", "A red box in the middle."], "train2014", 1)
    k.add(coco_file("val", 12), "restval", [f"A restval image, caption {n}." for n in range(7)], "val2014", 12)
    k.add(coco_file("train", 2), "train", ["A grey picture."] * 5, "train2014", 2)
    k.add(coco_file("train", 3), "train", ["corrupt"] * 5, "train2014", 3)
    k.add(coco_file("train", 4), "train", ["missing"] * 5, "train2014", 4)
    k.add(coco_file("train", 5), "train", [], "train2014", 5)
    k.add(coco_file("train", 6), "train", ["A CMYK picture."] * 5, "train2014", 6)
    k.add(coco_file("val", 10), "val", ["A val image."] * 5, "val2014", 10)
    k.add(coco_file("val", 11), "test", ["A test image."] * 5, "val2014", 11)
    return k.json()


def karpathy_flickr() -> dict:
    k = Karpathy("flickr30k")
    k.add("1000092795.jpg", "train", ["Two young guys with shaggy hair look at their hands .", "A dog runs ."] * 3)
    k.add("10002456.jpg", "train", ["missing"] * 5)
    k.add("1000268201.jpg", "test", ["A child in a pink dress ."] * 5)
    return k.json()


def vqa_files() -> tuple[dict, dict]:
    """Questions on COCO train images 1, 2 (good), 3 (corrupt), 4 (missing); 2001 has no annotation."""
    questions = [vqa_question(1, 1, "How many squares?"), vqa_question(1, 0, "What color is the square?"),
                 vqa_question(2, 0, "Is it a circle?"), vqa_question(4, 0, "missing?"),
                 vqa_question(3, 0, "corrupt?"), vqa_question(2, 1, "No annotation?")]
    annotations = [vqa_annotation(1, 0, ["red"] * 4 + ["dark red"] * 3 + ["maroon"] * 2 + ["Red."]),
                   vqa_annotation(1, 1, ["two"] * 9 + ["2"], "number", "how many"),
                   vqa_annotation(2, 0, ["yes"] * 10, "yes/no", "is it a"), vqa_annotation(4, 0, ["no"] * 10),
                   vqa_annotation(3, 0, ["no"] * 10)]
    return vqa_questions_file(questions), vqa_annotations_file(annotations)


CC3M_ROWS = [  # (caption, path on the server); the third row has no URL
    ("a photo of a red square", "cc3m/a.jpg"), ("a png drawing", "cc3m/b.png"), ("a row without a url", None),
    ("a broken file", "cc3m/c.jpg"), ("a dead link", "cc3m/gone.jpg"), ("a wide picture", "cc3m/d.jpg"),
    ("un café à Paris, l'été", "cc3m/café à paris.jpg"), ("a url with a space", "cc3m/two words.jpg"),
]


@pytest.fixture(scope="module")
def fixtures(server):
    www = server.root
    # COCO 2014 zips: train 2 greyscale, 3 corrupt, 4 referenced by the json but absent, 6 CMYK.
    write_zip(www / "train2014.zip", {
        f"train2014/{coco_file('train', 1)}": image_bytes(1),
        f"train2014/{coco_file('train', 2)}": image_bytes(2, mode="L"),
        f"train2014/{coco_file('train', 3)}": CORRUPT,
        f"train2014/{coco_file('train', 6)}": image_bytes(6, mode="CMYK"),
    })
    write_zip(www / "val2014.zip", {f"val2014/{coco_file('val', i)}": image_bytes(i) for i in (10, 11, 12)})
    write_zip(www / "caption_datasets.zip", {"dataset_coco.json": karpathy_coco(),
                                             "dataset_flickr30k.json": karpathy_flickr()})
    # Visual Genome: image 1 in VG_100K (a box past its border), 2 in VG_100K_2, 3 without regions,
    # 4 missing, 5 corrupt.
    write_zip(www / "region_descriptions.json.zip", {"region_descriptions.json": [
        vg_image(1, [vg_region(11, 1, "a red square", 2, 4, 10, 8), vg_region(12, 1, "", 0, 0, 5, 5),
                     vg_region(13, 1, "grey background", 20, 10, 20, 20)]),
        vg_image(2, [vg_region(21, 2, "a blue circle", 6, 2, 8, 8)]),
        vg_image(3, []),
        vg_image(4, [vg_region(41, 4, "missing", 1, 1, 2, 2)]),
        vg_image(5, [vg_region(51, 5, "corrupt", 1, 1, 2, 2)]),
    ]})
    write_zip(www / "images.zip", {"VG_100K/1.jpg": image_bytes(1), "VG_100K/5.jpg": CORRUPT})
    write_zip(www / "images2.zip", {"VG_100K_2/2.jpg": image_bytes(2)})
    # VQA v2 on the COCO train2014 images above.
    questions, annotations = vqa_files()
    write_zip(www / "v2_Questions_Train_mscoco.zip", {"v2_OpenEnded_mscoco_train2014_questions.json": questions})
    write_zip(www / "v2_Annotations_Train_mscoco.zip", {"v2_mscoco_train2014_annotations.json": annotations})
    # CC3M: images on this server, a TSV under its official name pointing at them.
    (www / "cc3m").mkdir()
    (www / "cc3m" / "a.jpg").write_bytes(image_bytes(1))
    (www / "cc3m" / "b.png").write_bytes(image_bytes(2, fmt="PNG"))
    (www / "cc3m" / "c.jpg").write_bytes(CORRUPT)
    (www / "cc3m" / "d.jpg").write_bytes(image_bytes(4, size=(40, 20)))
    (www / "cc3m" / "café à paris.jpg").write_bytes(image_bytes(5))
    (www / "cc3m" / "two words.jpg").write_bytes(image_bytes(6, mode="L"))
    rows = [(caption, f"{server.base}/{path}") if path else caption for caption, path in CC3M_ROWS]
    write_cc3m_tsv(www / CC3M_TSV["train"], rows)
    return www


@pytest.fixture()
def registry_for(server, fixtures, monkeypatch):
    """Point the registry's datasets at the loopback files (true sizes and checksums)."""
    entries = {
        "coco_captions": [served(server, "caption_datasets.zip", True), served(server, "train2014.zip", True, "md5"),
                          served(server, "val2014.zip", True)],
        "flickr30k": [served(server, "caption_datasets.zip", True)],
        "visual_genome": [served(server, "region_descriptions.json.zip", True),
                          served(server, "images.zip", True), served(server, "images2.zip", True)],
        "vqa_v2": [served(server, "v2_Questions_Train_mscoco.zip", True),
                   served(server, "v2_Annotations_Train_mscoco.zip", True),
                   served(server, "train2014.zip", True, "md5")],
        "cc3m": [served(server, CC3M_TSV["train"])],
    }
    for name, files in entries.items():
        monkeypatch.setitem(registry.DATASETS, name, fake_dataset(name, files))
    return entries


def read_shards(path):
    return list(ShardDataset(path, split_by_node=False, split_by_worker=False))


def as_rgb_array(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float32) / 255


# ----------------------------------------------------------------------------- download()


def test_download_resumes_with_range_within_one_call(server, tmp_path):
    data = bytes(range(256)) * 400
    (server.root / "blob1.bin").write_bytes(data)
    server.truncate_once.add("blob1.bin")
    dest = dl.download(f"{server.base}/blob1.bin", tmp_path / "blob1.bin", expected_size=len(data),
                       sha256=hashlib.sha256(data).hexdigest(), retries=2, backoff=0, progress=False)
    assert dest.read_bytes() == data and not (tmp_path / "blob1.bin.part").exists()
    assert requests_for(server, "blob1.bin") == [None, f"bytes={len(data) // 2}-"]


def test_interrupted_download_resumes_in_the_next_run_keeping_its_bytes(server, tmp_path):
    data = bytes(range(251)) * 300
    (server.root / "blob2.bin").write_bytes(data)
    server.truncate_once.add("blob2.bin")
    url, dest, sha = f"{server.base}/blob2.bin", tmp_path / "blob2.bin", hashlib.sha256(data).hexdigest()
    with pytest.raises(dl.DownloadError, match="blob2.bin.part keeps the 37,650 bytes.*resumes"):
        dl.download(url, dest, expected_size=len(data), sha256=sha, retries=0, progress=False)
    part = tmp_path / "blob2.bin.part"
    assert not dest.exists() and part.read_bytes() == data[: len(data) // 2]
    dl.download(url, dest, expected_size=len(data), sha256=sha, retries=0, progress=False)
    assert dest.read_bytes() == data and not part.exists()
    assert requests_for(server, "blob2.bin") == [None, f"bytes={len(data) // 2}-"]
    assert [n for p, n in server.sent if p == "blob2.bin"] == [len(data) // 2, len(data) - len(data) // 2]
    dl.download(url, dest, expected_size=len(data), sha256=sha, progress=False)  # complete: no request
    assert len(requests_for(server, "blob2.bin")) == 2


def test_server_ignoring_range_restarts_cleanly(server, tmp_path):
    data = b"0123456789" * 1000
    (server.root / "blob3.bin").write_bytes(data)
    server.ignore_range.add("blob3.bin")
    (tmp_path / "blob3.bin.part").write_bytes(b"stale bytes")
    dl.download(f"{server.base}/blob3.bin", tmp_path / "blob3.bin", sha256=hashlib.sha256(data).hexdigest(),
                progress=False)
    assert (tmp_path / "blob3.bin").read_bytes() == data


def test_download_errors_are_clear(server, tmp_path):
    data = b"payload" * 100
    (server.root / "blob4.bin").write_bytes(data)
    url = f"{server.base}/blob4.bin"
    with pytest.raises(ValueError, match=r"blob4.bin.part: sha256 is [0-9a-f]{64}, expected sha256 0{64}"):
        dl.download(url, tmp_path / "blob4.bin", sha256="0" * 64, progress=False)
    assert not list(tmp_path.iterdir())  # neither a final file nor a bad .part left
    with pytest.raises(ValueError, match="size is 700 bytes, expected_size is 701"):
        dl.download(url, tmp_path / "blob4.bin", expected_size=701, progress=False)
    with pytest.raises(dl.DownloadError, match="missing.bin: HTTP 404"):
        dl.download(f"{server.base}/missing.bin", tmp_path / "m.bin", retries=3, backoff=0, progress=False)
    assert len(requests_for(server, "missing.bin")) == 1  # a 404 is not retried
    with pytest.raises(ValueError, match="sha256 must be 64 hex digits"):
        dl.download(url, tmp_path / "x", sha256="abc")
    with pytest.raises(ValueError, match="url must be"):
        dl.download("ftp://example.org/x", tmp_path / "x")
    with pytest.raises(ValueError, match="retries"):
        dl.download(url, tmp_path / "x", retries=-1)


def test_mirror_is_used_when_the_main_url_fails(server, tmp_path, monkeypatch):
    (server.root / "mirrored.bin").write_bytes(b"mirror me" * 10)
    file = served(server, "mirrored.bin", url=f"{server.base}/dead/mirrored.bin",
                  mirrors=(f"{server.base}/mirrored.bin",))
    monkeypatch.setitem(registry.DATASETS, "mirrored", fake_dataset("mirrored", [file]))
    assert dl.fetch_dataset("mirrored", tmp_path, progress=False) == {"mirrored.bin": "downloaded"}
    assert (tmp_path / "mirrored.bin").read_bytes() == b"mirror me" * 10


def test_cli_list_and_unknown_dataset(tmp_path):
    out = subprocess.run([sys.executable, "-m", "data_scripts.download", "--list"], cwd=REPO, capture_output=True,
                         text=True, check=True).stdout
    for name in ("coco_captions", "flickr30k", "cc3m", "visual_genome", "vqa_v2"):
        assert name in out
    assert "0da8c0bd3d6becc4dcb32757491aca88" not in out and "md5" in out
    with pytest.raises(ValueError, match="dataset='imagenet' is not in the registry"):
        dl.main(["imagenet", "--root", str(tmp_path)])


def test_real_registry_entries_are_well_formed():
    for name, info in registry.DATASETS.items():
        assert info.name == name and info.files and info.license and info.format
        for file in info.files:
            assert file.url.startswith(("http://", "https://"))
            assert file.filename.endswith(file.url.rsplit("/", 1)[-1])  # CC3M: Train_ + the bucket's object name
            assert file.md5 is None or len(file.md5) == 32
            assert file.sha256 is None or len(file.sha256) == 64
    assert "form" in registry.DATASETS["flickr30k"].manual
    assert [f.filename for f in registry.DATASETS["cc3m"].files] == [CC3M_TSV["train"], CC3M_TSV["val"]]


@pytest.mark.parametrize("url, quoted", [
    ("http://example.org/a.jpg?x=1", "http://example.org/a.jpg?x=1"),  # nothing to do: unchanged
    ("http://example.org/two words.jpg", "http://example.org/two%20words.jpg"),
    ("http://example.org/caf\u00e9.jpg?q=\u00e9t\u00e9", "http://example.org/caf%C3%A9.jpg?q=%C3%A9t%C3%A9"),
    ("http://example.org/50%25 off.jpg", "http://example.org/50%25%20off.jpg"),  # escapes kept as they are
    ("https://b\u00fccher.de:8080/x y#top", "https://xn--bcher-kva.de:8080/x%20y"),  # IDNA host, no fragment
])
def test_quote_url_encodes_as_a_browser_does(url, quoted):
    assert dl.quote_url(url) == quoted


# ----------------------------------------------------------------------------- datasets end to end


def test_coco_download_extract_shard_and_resume(server, registry_for, tmp_path, capsys):
    root, out = tmp_path / "coco", tmp_path / "shards"
    report = dl.main(["coco_captions", "--root", str(root), "--base-url", server.base])
    assert report == {"caption_datasets.zip": "downloaded", "train2014.zip": "downloaded", "val2014.zip": "downloaded"}
    assert (root / "dataset_coco.json").exists() and (root / "train2014" / coco_file("train", 1)).exists()
    assert "next: python -m data_scripts.shard_x" in capsys.readouterr().out
    assert dl.verify_dataset("coco_captions", root) == dict.fromkeys(report, "ok")

    first = shard_coco.main(["--root", str(root), "--out", str(out), "--shard-size", "1", "--max-samples", "2"])
    assert (first.written, first.shards) == (2, ["coco-train-000000.tar", "coco-train-000001.tar"])
    kept = {n: (out / n).stat().st_mtime_ns for n in first.shards}
    summary = shard_coco.main(["--root", str(root), "--out", str(out), "--shard-size", "1"])
    assert (summary.resumed_shards, summary.written, summary.samples) == (2, 2, 4)
    assert {n: (out / n).stat().st_mtime_ns for n in kept} == kept
    assert summary.skipped == {"corrupt_image": 1, "missing_image": 1, "no_captions": 1}
    printed = capsys.readouterr().out
    assert "coco-train: 4 shards, 4 samples" in printed and "missing_image 1" in printed

    samples = read_shards(out)  # train + restval (from val2014/), in the json's order
    assert [s["key"] for s in samples] == ["coco_000000000001", "coco_000000000012", "coco_000000000002",
                                           "coco_000000000006"]
    assert samples[0]["text"] == "A red square on grey."
    assert samples[0]["meta"] == {
        "dataset": "coco", "split": "train", "image_id": 1, "imgid": 0, "sentids": [0, 1, 2, 3, 4, 5],
        "filename": coco_file("train", 1), "width": 32, "height": 24,
        "captions": ["A red square on grey.", "A square.", "Red on grey.", "A shape.", "One square.",
                     "A red box in the middle."]}
    restval = samples[1]["meta"]
    assert (restval["split"], restval["image_id"], restval["imgid"], len(restval["captions"])) == ("restval", 12, 1, 7)
    assert restval["sentids"] == list(range(6, 13))
    assert np.allclose(samples[0]["image"].permute(1, 2, 0).numpy(), as_rgb_array(image_bytes(1)), atol=1e-6)
    for sample, mode, i in ((samples[2], "L", 2), (samples[3], "CMYK", 6)):  # kept as they are, read as RGB
        assert sample["image"].shape == (3, 24, 32), mode
        assert np.allclose(sample["image"].permute(1, 2, 0).numpy(), as_rgb_array(image_bytes(i, mode=mode)), atol=1e-6)
    assert verify_shards(out) == {"shards": 4, "samples": 4}

    test = shard_coco.main(["--root", str(root), "--out", str(out), "--split", "test"])
    assert test.samples == 1 and read_shards(out / "coco-test-000000.tar")[0]["key"] == "coco_000000000011"


def test_flickr30k_uses_the_karpathy_code_and_the_flickr_ids(server, registry_for, tmp_path):
    root = tmp_path / "flickr"
    assert dl.main(["flickr30k", "--root", str(root), "--base-url", server.base]) == {
        "caption_datasets.zip": "downloaded"}
    with pytest.raises(FileNotFoundError, match="Flickr30k image directory not found.*request form"):
        shard_flickr30k.main(["--root", str(root), "--out", str(tmp_path / "s")])
    (root / "flickr30k-images").mkdir()  # the by-hand step: images from the request form, not there yet
    with pytest.raises(ValueError, match=r"flickr30k-train: no sample was written \(skipped: missing_image 2\)"):
        shard_flickr30k.main(["--root", str(root), "--out", str(tmp_path / "s")])
    (root / "flickr30k-images" / "1000092795.jpg").write_bytes(image_bytes(7))
    (root / "flickr30k-images" / "1000268201.jpg").write_bytes(image_bytes(8))
    summary = shard_flickr30k.main(["--root", str(root), "--out", str(tmp_path / "s")])
    assert (summary.samples, summary.skipped) == (1, {"missing_image": 1})
    [sample] = read_shards(tmp_path / "s")
    assert sample["key"] == "flickr30k_1000092795"
    assert (sample["meta"]["image_id"], sample["meta"]["imgid"]) == (1000092795, 0)  # Flickr's id; Karpathy's index
    assert sample["meta"]["captions"][:2] == ["Two young guys with shaggy hair look at their hands .", "A dog runs ."]


def test_visual_genome_keeps_boxes_as_given(server, registry_for, tmp_path):
    root = tmp_path / "vg"
    dl.main(["visual_genome", "--root", str(root), "--base-url", server.base])
    summary = shard_vg.main(["--root", str(root), "--out", str(tmp_path / "s")])
    assert summary.samples == 2
    assert summary.skipped == {"missing_image": 1, "corrupt_image": 1, "no_regions": 1, "regions_dropped": 1}
    first, second = read_shards(tmp_path / "s")  # image 1 from VG_100K/, image 2 from VG_100K_2/
    assert (first["key"], first["text"], second["key"]) == ("vg_1", "a red square", "vg_2")
    assert first["meta"]["regions"] == [{"region_id": 11, "phrase": "a red square", "box": [2, 4, 10, 8]},
                                        {"region_id": 13, "phrase": "grey background", "box": [20, 10, 20, 20]}]
    width, height = first["meta"]["width"], first["meta"]["height"]
    assert (width, height) == (32, 24)  # the second box runs past the border, as the dataset gives it
    assert [shard_vg.clip_box(r["box"], width, height) for r in first["meta"]["regions"]] == [
        [2.0, 4.0, 10.0, 8.0], [20.0, 10.0, 12.0, 14.0]]
    assert shard_vg.clip_box([40, 0, 5, 5], width, height) is None  # wholly outside
    small = shard_vg.main(["--root", str(root), "--out", str(tmp_path / "small"), "--image-size", "12"])
    assert small.samples == 2
    sample = read_shards(tmp_path / "small")[0]
    assert sample["image"].shape == (3, 12, 16) and (sample["meta"]["width"], sample["meta"]["height"]) == (16, 12)
    assert sample["meta"]["regions"][0]["box"] == [1.0, 2.0, 5.0, 4.0]  # scaled by 1/2 with the image


def test_vqa_soft_scores_match_the_leave_one_out_accuracy():
    answers = ["red"] * 4 + ["dark red"] * 3 + ["maroon"] * 2 + ["pink"]
    scores = vqa_soft_scores(answers)
    for answer, score in scores.items():  # naive official form: mean over 10 subsets of 9 annotators
        naive = np.mean([min(1.0, [a for j, a in enumerate(answers) if j != k].count(answer) / 3) for k in range(10)])
        assert score == pytest.approx(naive, abs=1e-12)
    assert scores == {"red": 1.0, "dark red": 0.9, "maroon": 0.6, "pink": 0.3}
    with pytest.raises(ValueError, match="answers must be a list of str"):
        vqa_soft_scores("red")


def test_vqa_on_the_coco_root(server, registry_for, tmp_path):
    root = tmp_path / "coco"
    dl.main(["coco_captions", "--root", str(root), "--base-url", server.base, "--only", "train2014.zip"])
    before = len(requests_for(server, "train2014.zip"))
    report = dl.main(["vqa_v2", "--root", str(root), "--base-url", server.base])
    assert report["train2014.zip"] == "present" and len(requests_for(server, "train2014.zip")) == before
    summary = shard_vqa.main(["--root", str(root), "--out", str(tmp_path / "s")])
    assert summary.samples == 2
    assert summary.skipped == {"missing_image": 1, "corrupt_image": 1, "questions_without_answers": 1}
    first, second = read_shards(tmp_path / "s")
    assert (first["key"], second["key"]) == ("vqa_train_000000000001", "vqa_train_000000000002")
    q1000, q1001 = first["meta"]["questions"]
    assert (q1000["question_id"], q1001["question_id"]) == (1000, 1001)  # image id x 1000 + k
    assert first["text"] == "What color is the square?" and q1001["question"] == "How many squares?"
    assert q1000["answer_scores"] == {"red": 1.0, "dark red": 0.9, "maroon": 0.6}  # "Red." counts as "red"
    assert q1001["answer_scores"] == {"two": 1.0, "2": 0.3} and len(q1000["answers"]) == 10
    assert (q1001["answer_type"], q1001["multiple_choice_answer"]) == ("number", "two")
    with pytest.raises(FileNotFoundError, match="VQA questions not found.*val2014_questions.json"):
        shard_vqa.main(["--root", str(root), "--out", str(tmp_path / "s"), "--split", "val"])


# ----------------------------------------------------------------------------- CC3M


def test_cc3m_from_tsv_downloads_quotes_urls_and_counts_failures(server, registry_for, tmp_path, capsys):
    root = tmp_path / "cc3m"
    assert dl.main(["cc3m", "--root", str(root), "--base-url", server.base]) == {CC3M_TSV["train"]: "downloaded"}
    summary = shard_cc3m.main(["--root", str(root), "--out", str(tmp_path / "s"), "--retries", "0"])
    printed = capsys.readouterr().out
    assert f"cat {root / CC3M_TSV['train']})" in printed and "img2dataset --url_list" in printed
    assert summary.samples == 5
    assert summary.skipped == {"download_failed": 1, "corrupt_image": 1, "bad_tsv_rows": 1}
    assert summary.notes == {"urls_percent_encoded": 2} and "also counted: urls_percent_encoded 2" in printed
    samples = read_shards(tmp_path / "s")
    assert [s["text"] for s in samples] == ["a photo of a red square", "a png drawing", "a wide picture",
                                           "un café à Paris, l'été", "a url with a space"]
    assert samples[1]["meta"]["url"] == f"{server.base}/cc3m/b.png"  # PNG re-encoded as JPEG
    assert samples[2]["image"].shape == (3, 20, 40)
    assert samples[3]["meta"]["url"] == f"{server.base}/cc3m/café à paris.jpg"  # the URL as the TSV gives it
    assert len(requests_for(server, "cc3m/caf%C3%A9%20%C3%A0%20paris.jpg")) == 1  # requested percent-encoded
    assert len(requests_for(server, "cc3m/two%20words.jpg")) == 1
    assert len(requests_for(server, "cc3m/gone.jpg")) == 1
    again = shard_cc3m.main(["--root", str(root), "--out", str(tmp_path / "s"), "--retries", "0"])
    assert again.written == 0 and again.samples == 5


def test_cc3m_tsv_names_the_official_and_bucket_names_and_tsv(server, fixtures, tmp_path, capsys):
    root = tmp_path / "cc3m"
    root.mkdir()
    with pytest.raises(FileNotFoundError, match=r"none of Validation_GCC-1.1.0-Validation.tsv, "
                                                r"GCC-1.1.0-Validation.tsv is in .*--tsv PATH"):
        shard_cc3m.main(["--root", str(root), "--out", str(tmp_path / "s"), "--split", "val"])
    (root / "GCC-training.tsv").write_bytes((fixtures / CC3M_TSV["train"]).read_bytes())  # the bucket's name
    summary = shard_cc3m.main(["--root", str(root), "--out", str(tmp_path / "s"), "--max-samples", "1"])
    assert summary.samples == 1 and f"cat {root / 'GCC-training.tsv'})" in capsys.readouterr().out
    given = tmp_path / "my rows.tsv"  # --tsv: the printed img2dataset command uses it
    write_cc3m_tsv(given, [("caption", "url"), ("a header row first", f"{server.base}/cc3m/a.jpg")])
    summary = shard_cc3m.main(["--root", str(root), "--out", str(tmp_path / "t"), "--tsv", str(given)])
    assert summary.samples == 1 and "cat '" + str(given) + "')" in capsys.readouterr().out
    with pytest.raises(FileNotFoundError, match=r"CC3M TSV \(--tsv\) not found: .*nowhere.tsv"):
        shard_cc3m.main(["--root", str(root), "--out", str(tmp_path / "s"), "--tsv", str(tmp_path / "nowhere.tsv")])


def img2dataset_rows(n_shards: int = 3):
    """Three shards of three rows: shard 0 has a failed download and a corrupt image, shard 1 a failed resize."""
    outcomes = [image_bytes(0), "failed_to_download", CORRUPT, image_bytes(10), image_bytes(11, mode="L"),
                "failed_to_resize", image_bytes(20), image_bytes(21), image_bytes(22)]
    return [(f"légende {i} — été", f"http://example.org/ümlaut {i}.jpg", outcome)
            for i, outcome in enumerate(outcomes[: 3 * n_shards])]


def test_cc3m_from_img2dataset_output(tmp_path, capsys):
    root, source = tmp_path / "cc3m", tmp_path / "img2dataset"
    root.mkdir()
    write_img2dataset_output(source, img2dataset_rows(), number_sample_per_shard=3)
    summary = shard_cc3m.main(["--root", str(root), "--out", str(tmp_path / "s"), "--img2dataset", str(source)])
    assert (summary.samples, summary.skipped) == (6, {"corrupt_image": 1})
    assert summary.notes == {"img2dataset_failed_to_download": 1, "img2dataset_failed_to_resize": 1}
    assert "img2dataset_failed_to_download 1" in capsys.readouterr().out
    samples = read_shards(tmp_path / "s")
    assert [s["key"] for s in samples] == ["cc3m_train_000000", "cc3m_train_000010", "cc3m_train_000011",
                                           "cc3m_train_000020", "cc3m_train_000021", "cc3m_train_000022"]
    assert samples[1]["text"] == "légende 3 — été"
    assert samples[1]["meta"]["url"] == "http://example.org/ümlaut 3.jpg"
    assert samples[2]["image"].shape == (3, 24, 32)  # greyscale, read as RGB


def test_cc3m_img2dataset_tar_cut_inside_a_member_header_is_counted(tmp_path):
    # The fault: a tar cut inside a header lost its last sample silently ("skipped: none").
    root, source = tmp_path / "cc3m", tmp_path / "img2dataset"
    root.mkdir()
    tars = write_img2dataset_output(source, img2dataset_rows(), number_sample_per_shard=3)
    data = tars[2].read_bytes()
    cut = member_offsets(tars[2])["000022.jpg"][0] + 100  # inside the header of the last sample's first member
    tars[2].write_bytes(data[:cut])
    with pytest.warns(UserWarning) as caught:
        summary = shard_cc3m.main(["--root", str(root), "--out", str(tmp_path / "s"), "--img2dataset", str(source)])
    assert any("00002.tar is corrupt or cut short" in str(w.message) for w in caught)
    # 000021 is dropped (the break came after it: it may have lost fields), 000022 is counted as missing
    assert summary.samples == 4
    assert summary.skipped == {"corrupt_image": 1, "img2dataset_corrupt_shard": 1, "img2dataset_truncated_sample": 1,
                               "img2dataset_missing_samples": 1}
    assert [s["key"] for s in read_shards(tmp_path / "s")] == ["cc3m_train_000000", "cc3m_train_000010",
                                                               "cc3m_train_000011", "cc3m_train_000020"]


def test_cc3m_img2dataset_damage_the_tar_cannot_show_is_found_by_its_stats(tmp_path):
    root, source = tmp_path / "cc3m", tmp_path / "img2dataset"
    root.mkdir()
    tars = write_img2dataset_output(source, img2dataset_rows(), number_sample_per_shard=3)
    data = tars[2].read_bytes()
    cut = member_offsets(tars[2])["000022.jpg"][0]  # cut at a sample's start, zero-filled: a valid shorter tar
    tars[2].write_bytes(data[:cut] + bytes(len(data) - cut))
    tars[1].unlink()  # a tar gone, its _stats.json left
    (source / "00000_stats.json").unlink()  # a shard img2dataset did not finish
    with pytest.warns(UserWarning) as caught:
        summary = shard_cc3m.main(["--root", str(root), "--out", str(tmp_path / "s"), "--img2dataset", str(source)])
    warned = sorted(str(w.message) for w in caught)
    assert len(warned) == 2 and re.search(r"00001_stats.json says img2dataset wrote 2 samples to .*00001.tar, which "
                                          r"does not exist: 2 missing", warned[0])
    assert re.search(r"00002_stats.json .* wrote 3 samples .*00002.tar, which holds 2: 1 missing", warned[1])
    assert summary.samples == 3
    assert summary.skipped == {"corrupt_image": 1, "img2dataset_missing_samples": 3}
    assert summary.notes == {"img2dataset_failed_to_resize": 1, "img2dataset_shards_without_stats": 1}


# ----------------------------------------------------------------------------- the wrong file, a missing key


def test_the_wrong_file_says_what_it_looks_like_and_what_was_expected(tmp_path):
    (tmp_path / "captions_train2014.json").write_text(json.dumps(coco_captions_json(
        {1: (coco_file("train", 1), ["A red square."]), 2: (coco_file("train", 2), ["Two circles."])})))
    with pytest.raises(ValueError, match=r"captions_train2014.json is not the file expected: it looks like a COCO "
                                         r"captions file .*images\[0\] is an object with keys \[coco_url, .*Expected "
                                         r"Karpathy's dataset_coco.json"):
        shard_coco.main(["--root", str(tmp_path), "--out", str(tmp_path / "s"),
                         "--karpathy-json", str(tmp_path / "captions_train2014.json")])
    (tmp_path / "objects.json").write_text(json.dumps([vg_objects_image(1), vg_objects_image(2)]))
    with pytest.raises(ValueError, match=r"objects.json is not the file expected: it looks like Visual Genome's "
                                         r"objects.json: a list of 2 items.*Expected Visual Genome's "
                                         r"region_descriptions.json"):
        shard_vg.main(["--root", str(tmp_path), "--out", str(tmp_path / "s"),
                       "--regions-json", str(tmp_path / "objects.json")])
    swapped = write_cc3m_tsv(tmp_path / CC3M_TSV["train"], [("http://example.org/a.jpg", "a caption"),
                                                            ("http://example.org/b.jpg", "another caption")])
    with pytest.raises(ValueError, match=r"Train_GCC-training.tsv is not the file expected: .*the columns are "
                                         r"swapped, url<TAB>caption\)\. Expected a CC3M TSV .*caption<TAB>url"):
        shard_cc3m.main(["--root", str(tmp_path), "--out", str(tmp_path / "s"), "--tsv", str(swapped)])
    questions, annotations = vqa_files()  # the two VQA files given the other way round
    (tmp_path / "v2_OpenEnded_mscoco_train2014_questions.json").write_text(json.dumps(annotations))
    (tmp_path / "v2_mscoco_train2014_annotations.json").write_text(json.dumps(questions))
    (tmp_path / "train2014").mkdir()
    with pytest.raises(ValueError, match=r"questions.json is not the file expected: it looks like a VQA v2 "
                                         r"annotations file"):
        shard_vqa.main(["--root", str(tmp_path), "--out", str(tmp_path / "s")])
    assert not (tmp_path / "s").exists()  # found before anything was written


def test_a_missing_key_is_one_error_line_naming_the_file_record_and_key(tmp_path):
    questions, annotations = vqa_files()
    del annotations["annotations"][1]["answers"]
    (tmp_path / "v2_OpenEnded_mscoco_train2014_questions.json").write_text(json.dumps(questions))
    (tmp_path / "v2_mscoco_train2014_annotations.json").write_text(json.dumps(annotations))
    (tmp_path / "train2014").mkdir()
    done = subprocess.run([sys.executable, "-m", "data_scripts.shard_vqa", "--root", str(tmp_path), "--out",
                           str(tmp_path / "s")], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    [line] = done.stderr.strip().splitlines()
    assert re.fullmatch(r"error: .*v2_mscoco_train2014_annotations.json: annotations\[1\] \(question_id 1001\) has "
                        r"no key 'answers' \(its keys: .*\)", line), line

    karpathy = karpathy_coco()
    del karpathy["images"][1]["sentences"][2]["raw"]
    (tmp_path / "dataset_coco.json").write_text(json.dumps(karpathy))
    with pytest.raises(ValueError, match=r"dataset_coco.json: images\[1\] \(imgid 1, filename "
                                         r"'COCO_val2014_000000000012.jpg'\) sentences\[2\] has no key 'raw'"):
        shard_coco.main(["--root", str(tmp_path), "--out", str(tmp_path / "s")])
    assert not list(tmp_path.glob("s/*.tmp"))


def test_a_key_missing_while_writing_leaves_no_temporary_shard(tmp_path):
    records = [{"id": 0}, {"id": 1}, {"id": 2}, {"oops": 3}]

    def build(record):
        return {"__key__": f"k{record['id']}", "jpg": image_bytes(record["id"]), "txt": "a caption"}

    args = Namespace(out=tmp_path, split="train", max_samples=None, shard_size=2, image_size=None, no_resume=False)
    with pytest.raises(common.RecordError, match=r"input record 3 has no key 'id': \{'oops': 3\}"):
        common.run("fixture", records, build, args, prefix="fixture-train")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fixture-train-000000.tar", "fixture-train-manifest.json"]


def test_missing_inputs_name_the_path_and_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="coco_captions root not found: .*nowhere.*data_scripts.download "
                                                "coco_captions"):
        shard_coco.main(["--root", str(tmp_path / "nowhere"), "--out", str(tmp_path / "s")])
    with pytest.raises(FileNotFoundError, match="Karpathy split json not found: .*dataset_coco.json"):
        shard_coco.main(["--root", str(tmp_path), "--out", str(tmp_path / "s")])
    with pytest.raises(FileNotFoundError, match="VG region descriptions not found"):
        shard_vg.main(["--root", str(tmp_path), "--out", str(tmp_path / "s")])
    with pytest.raises(FileNotFoundError, match="CC3M TSV not found: none of Train_GCC-training.tsv"):
        shard_cc3m.main(["--root", str(tmp_path), "--out", str(tmp_path / "s")])
    (tmp_path / "dataset_coco.json").write_text("{not json")
    with pytest.raises(ValueError, match="dataset_coco.json is not valid JSON"):
        shard_coco.main(["--root", str(tmp_path), "--out", str(tmp_path / "s")])
    (tmp_path / "dataset_coco.json").write_text('{"images": []}')
    with pytest.raises(ValueError, match="--max-samples must be >= 1"):
        shard_coco.main(["--root", str(tmp_path), "--out", str(tmp_path / "s"), "--max-samples", "0"])
    with pytest.raises(ValueError, match=r"is not the file expected: it is an object with keys \[images\]"):
        shard_coco.main(["--root", str(tmp_path), "--out", str(tmp_path / "s")])
    (tmp_path / "dataset_coco.json").write_text(json.dumps(karpathy_flickr()))
    with pytest.raises(ValueError, match=r"has no image in split val; its images are in \{'train': 2, 'test': 1\}"):
        shard_coco.main(["--root", str(tmp_path), "--out", str(tmp_path / "s"), "--split", "val"])
    assert read_manifest(tmp_path / "s", "coco-train") is None
