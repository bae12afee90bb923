"""data_scripts end to end against tiny fixtures served from 127.0.0.1 (no outside network).

The fixtures are built here (PIL images, Karpathy / VG / VQA json zipped like the real files,
a CC3M TSV, an img2dataset-style tar); each dataset has one missing and one corrupt image,
and the tests check the shards' contents and the skip counts exactly.
"""

import hashlib
import http.server
import io
import json
import re
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # data_scripts is run as `python -m data_scripts.X` from the repo root
    sys.path.insert(0, str(REPO))

from course_lib.data.shards import ShardDataset, read_manifest  # noqa: E402
from data_scripts import registry, shard_cc3m, shard_coco, shard_flickr30k, shard_vg, shard_vqa  # noqa: E402
from data_scripts import download as dl  # noqa: E402
from data_scripts.registry import DatasetInfo, RemoteFile  # noqa: E402
from data_scripts.shard_vqa import vqa_soft_scores  # noqa: E402

CORRUPT = b"\xff\xd8\xff\xe0 truncated jpeg header and nothing else"


# ----------------------------------------------------------------------------- loopback server


class RangeHandler(http.server.BaseHTTPRequestHandler):
    """Serves ``server.root``; honours ``Range: bytes=N-``; can cut a response short once."""

    def do_GET(self):  # noqa: N802 (http.server's naming)
        server = self.server
        path = self.path.lstrip("/")
        byte_range = self.headers.get("Range")
        server.requests.append((path, byte_range))
        file = server.root / path
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
        self.wfile.write(body)
        server.sent.append((path, len(body)))

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("www")
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), RangeHandler)
    httpd.root, httpd.requests, httpd.sent = root, [], []
    httpd.truncate_once, httpd.ignore_range = set(), set()
    httpd.base = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def requests_for(server, path):
    return [r for p, r in server.requests if p == path]


# ----------------------------------------------------------------------------- fixtures


def image_bytes(i: int, fmt: str = "JPEG", size=(32, 24)) -> bytes:
    y, x = np.mgrid[0 : size[1], 0 : size[0]]
    array = np.stack([x * 4 + 5 * i, y * 6, np.full_like(x, 30 * i)], -1).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def write_zip(path: Path, members: dict) -> None:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data if isinstance(data, bytes) else json.dumps(data))


def served(server, name: str, extract: bool = False, checksum: str = "sha256", url=None, mirrors=()) -> RemoteFile:
    """A registry entry for a file in the server root, with its true size and checksum."""
    data = (server.root / name).read_bytes()
    digest = {checksum: hashlib.new(checksum, data).hexdigest()}
    return RemoteFile(url=url or f"{server.base}/{name}", filename=name, size=len(data), extract=extract,
                      mirrors=mirrors, **digest)


def fake_dataset(name, files) -> DatasetInfo:
    return DatasetInfo(name=name, files=tuple(files), format="fixture", license="fixture", homepage="-",
                       disk="-", next_step=f"python -m data_scripts.shard_x --root ROOT")


def coco_file(split, i):
    return f"COCO_{split}2014_{i:012d}.jpg"


def sentences(*texts):
    return [{"raw": t, "tokens": t.lower().split()} for t in texts]


@pytest.fixture(scope="module")
def fixtures(server):
    www = server.root
    # COCO 2014 zips: image 3 corrupt, image 4 referenced by the json but absent.
    write_zip(www / "train2014.zip", {
        f"train2014/{coco_file('train', 1)}": image_bytes(1),
        f"train2014/{coco_file('train', 2)}": image_bytes(2),
        f"train2014/{coco_file('train', 3)}": CORRUPT,
    })
    write_zip(www / "val2014.zip", {f"val2014/{coco_file('val', 10)}": image_bytes(10),
                                    f"val2014/{coco_file('val', 11)}": image_bytes(11)})
    karpathy_coco = {"dataset": "coco", "images": [
        {"filepath": "train2014", "filename": coco_file("train", 1), "cocoid": 1, "imgid": 0, "split": "train",
         "sentences": sentences("A red square on grey. ", "A square.")},
        {"filepath": "train2014", "filename": coco_file("train", 2), "cocoid": 2, "imgid": 1, "split": "restval",
         "sentences": sentences("Two blue circles.")},
        {"filepath": "train2014", "filename": coco_file("train", 3), "cocoid": 3, "imgid": 2, "split": "train",
         "sentences": sentences("corrupt")},
        {"filepath": "train2014", "filename": coco_file("train", 4), "cocoid": 4, "imgid": 3, "split": "train",
         "sentences": sentences("missing")},
        {"filepath": "train2014", "filename": coco_file("train", 5), "cocoid": 5, "imgid": 4, "split": "train",
         "sentences": []},
        {"filepath": "val2014", "filename": coco_file("val", 10), "cocoid": 10, "imgid": 5, "split": "val",
         "sentences": sentences("A val image.")},
        {"filepath": "val2014", "filename": coco_file("val", 11), "cocoid": 11, "imgid": 6, "split": "test",
         "sentences": sentences("A test image.")},
    ]}
    karpathy_flickr = {"dataset": "flickr30k", "images": [
        {"filename": "1000.jpg", "imgid": 0, "split": "train", "sentences": sentences("A dog runs.", "A dog.")},
        {"filename": "1001.jpg", "imgid": 1, "split": "train", "sentences": sentences("missing")},
        {"filename": "1002.jpg", "imgid": 2, "split": "test", "sentences": sentences("A cat sits.")},
    ]}
    write_zip(www / "caption_datasets.zip", {"dataset_coco.json": karpathy_coco,
                                             "dataset_flickr30k.json": karpathy_flickr})
    # Visual Genome: image 1 in VG_100K, 2 in VG_100K_2, 3 without regions, 4 missing, 5 corrupt.
    region = lambda rid, image_id, phrase, x, y, w, h: {  # noqa: E731
        "region_id": rid, "image_id": image_id, "phrase": phrase, "x": x, "y": y, "width": w, "height": h}
    write_zip(www / "region_descriptions.json.zip", {"region_descriptions.json": [
        {"id": 1, "regions": [region(11, 1, "a red square", 2, 4, 10, 8), region(12, 1, "", 0, 0, 5, 5),
                              region(13, 1, "grey background", 0, 0, 32, 24)]},
        {"id": 2, "regions": [region(21, 2, "a blue circle", 6, 2, 8, 8)]},
        {"id": 3, "regions": []},
        {"id": 4, "regions": [region(41, 4, "missing", 1, 1, 2, 2)]},
        {"id": 5, "regions": [region(51, 5, "corrupt", 1, 1, 2, 2)]},
    ]})
    write_zip(www / "images.zip", {"VG_100K/1.jpg": image_bytes(1), "VG_100K/5.jpg": CORRUPT})
    write_zip(www / "images2.zip", {"VG_100K_2/2.jpg": image_bytes(2)})
    # VQA v2 on the COCO train2014 images above (image 3 corrupt, 4 missing).
    question = lambda qid, image_id, text: {"question_id": qid, "image_id": image_id, "question": text}  # noqa: E731

    def annotation(qid, image_id, answers):
        return {"question_id": qid, "image_id": image_id, "question_type": "what color", "answer_type": "other",
                "multiple_choice_answer": answers[0],
                "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": k + 1}
                            for k, a in enumerate(answers)]}

    questions = [question(101, 1, "How many squares?"), question(100, 1, "What color is the square?"),
                 question(102, 2, "Is it a circle?"), question(103, 4, "missing?"), question(104, 3, "corrupt?"),
                 question(105, 2, "No annotation?")]
    annotations = [annotation(100, 1, ["red"] * 4 + ["dark red"] * 3 + ["maroon"] * 2 + ["Red."]),
                   annotation(101, 1, ["two"] * 9 + ["2"]),
                   annotation(102, 2, ["yes"] * 10), annotation(103, 4, ["no"] * 10), annotation(104, 3, ["no"] * 10)]
    info = {"description": "fixture"}
    write_zip(www / "v2_Questions_Train_mscoco.zip", {"v2_OpenEnded_mscoco_train2014_questions.json": {
        "info": info, "task_type": "Open-Ended", "data_type": "mscoco", "data_subtype": "train2014",
        "questions": questions}})
    write_zip(www / "v2_Annotations_Train_mscoco.zip", {"v2_mscoco_train2014_annotations.json": {
        "info": info, "data_type": "mscoco", "data_subtype": "train2014", "annotations": annotations}})
    # CC3M: a TSV (caption<TAB>url, no header) pointing at this server.
    (www / "cc3m").mkdir()
    (www / "cc3m" / "a.jpg").write_bytes(image_bytes(1))
    (www / "cc3m" / "b.png").write_bytes(image_bytes(2, fmt="PNG"))
    (www / "cc3m" / "c.jpg").write_bytes(CORRUPT)
    (www / "cc3m" / "d.jpg").write_bytes(image_bytes(4, size=(40, 20)))
    rows = [("a photo of a red square", "cc3m/a.jpg"), ("a png drawing", "cc3m/b.png"),
            ("a broken file", "cc3m/c.jpg"), ("a dead link", "cc3m/gone.jpg"), ("a wide picture", "cc3m/d.jpg")]
    lines = [f"{caption}\t{server.base}/{path}" for caption, path in rows]
    lines.insert(2, "a row without a url")
    (www / "GCC-training.tsv").write_text("\n".join(lines) + "\n")
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
        "cc3m": [served(server, "GCC-training.tsv")],
    }
    for name, files in entries.items():
        monkeypatch.setitem(registry.DATASETS, name, fake_dataset(name, files))
    return entries


def read_shards(path):
    return list(ShardDataset(path, split_by_node=False, split_by_worker=False))


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
            assert file.url.startswith(("http://", "https://")) and file.url.endswith(file.filename)
            assert file.md5 is None or len(file.md5) == 32
            assert file.sha256 is None or len(file.sha256) == 64
    assert "form" in registry.DATASETS["flickr30k"].manual


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
    assert (summary.resumed_shards, summary.written, summary.samples) == (2, 0, 2)
    assert {n: (out / n).stat().st_mtime_ns for n in kept} == kept
    assert summary.skipped == {"corrupt_image": 1, "missing_image": 1, "no_captions": 1}
    printed = capsys.readouterr().out
    assert "coco-train: 2 shards, 2 samples" in printed and "missing_image 1" in printed

    samples = read_shards(out)
    assert [s["key"] for s in samples] == ["coco_000000000001", "coco_000000000002"]
    assert samples[0]["text"] == "A red square on grey."
    assert samples[0]["meta"] == {"dataset": "coco", "split": "train", "image_id": 1, "filename": coco_file("train", 1),
                                  "captions": ["A red square on grey.", "A square."], "width": 32, "height": 24}
    assert samples[1]["meta"]["split"] == "restval" and samples[0]["image"].shape == (3, 24, 32)
    original = np.asarray(Image.open(io.BytesIO(image_bytes(1))), dtype=np.float32) / 255
    assert np.allclose(samples[0]["image"].permute(1, 2, 0).numpy(), original, atol=1e-6)  # bytes kept as is

    test = shard_coco.main(["--root", str(root), "--out", str(out), "--split", "test"])
    assert test.samples == 1 and read_shards(out / "coco-test-000000.tar")[0]["key"] == "coco_000000000011"


def test_flickr30k_uses_the_karpathy_code(server, registry_for, tmp_path):
    root = tmp_path / "flickr"
    assert dl.main(["flickr30k", "--root", str(root), "--base-url", server.base]) == {
        "caption_datasets.zip": "downloaded"}
    with pytest.raises(FileNotFoundError, match="Flickr30k image directory not found.*request form"):
        shard_flickr30k.main(["--root", str(root), "--out", str(tmp_path / "s")])
    (root / "flickr30k-images").mkdir()  # the by-hand step: images from the request form
    (root / "flickr30k-images" / "1000.jpg").write_bytes(image_bytes(7))
    (root / "flickr30k-images" / "1002.jpg").write_bytes(image_bytes(8))
    summary = shard_flickr30k.main(["--root", str(root), "--out", str(tmp_path / "s")])
    assert (summary.samples, summary.skipped) == (1, {"missing_image": 1})
    [sample] = read_shards(tmp_path / "s")
    assert sample["key"] == "flickr30k_1000" and sample["meta"]["captions"] == ["A dog runs.", "A dog."]


def test_visual_genome_regions(server, registry_for, tmp_path):
    root = tmp_path / "vg"
    dl.main(["visual_genome", "--root", str(root), "--base-url", server.base])
    summary = shard_vg.main(["--root", str(root), "--out", str(tmp_path / "s")])
    assert summary.samples == 2
    assert summary.skipped == {"missing_image": 1, "corrupt_image": 1, "no_regions": 1, "regions_dropped": 1}
    first, second = read_shards(tmp_path / "s")
    assert (first["key"], first["text"], second["key"]) == ("vg_1", "a red square", "vg_2")
    assert first["meta"]["regions"] == [{"region_id": 11, "phrase": "a red square", "box": [2, 4, 10, 8]},
                                        {"region_id": 13, "phrase": "grey background", "box": [0, 0, 32, 24]}]
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
    q100, q101 = first["meta"]["questions"]
    assert first["text"] == "What color is the square?" and q101["question"] == "How many squares?"
    assert q100["answer_scores"] == {"red": 1.0, "dark red": 0.9, "maroon": 0.6}  # "Red." counts as "red"
    assert q101["answer_scores"] == {"two": 1.0, "2": 0.3} and len(q100["answers"]) == 10
    with pytest.raises(FileNotFoundError, match="VQA questions not found.*val2014_questions.json"):
        shard_vqa.main(["--root", str(root), "--out", str(tmp_path / "s"), "--split", "val"])


def test_cc3m_from_tsv_downloads_and_counts_failures(server, registry_for, tmp_path, capsys):
    root = tmp_path / "cc3m"
    dl.main(["cc3m", "--root", str(root), "--base-url", server.base])
    summary = shard_cc3m.main(["--root", str(root), "--out", str(tmp_path / "s"), "--retries", "0"])
    assert "img2dataset --url_list" in capsys.readouterr().out
    assert summary.samples == 3
    assert summary.skipped == {"download_failed": 1, "corrupt_image": 1, "bad_tsv_rows": 1}
    samples = read_shards(tmp_path / "s")
    assert [s["text"] for s in samples] == ["a photo of a red square", "a png drawing", "a wide picture"]
    assert samples[1]["meta"]["url"] == f"{server.base}/cc3m/b.png"  # PNG re-encoded as JPEG
    assert samples[2]["image"].shape == (3, 20, 40)
    assert len(requests_for(server, "cc3m/gone.jpg")) == 1
    again = shard_cc3m.main(["--root", str(root), "--out", str(tmp_path / "s"), "--retries", "0"])
    assert again.written == 0 and again.samples == 3


def test_cc3m_from_img2dataset_output(server, registry_for, tmp_path):
    root, source = tmp_path / "cc3m", tmp_path / "img2dataset"
    root.mkdir()
    source.mkdir()
    with wds.TarWriter(str(source / "00000.tar")) as tar:
        for key, jpg in (("000000000", image_bytes(1)), ("000000001", CORRUPT), ("000000002", image_bytes(2))):
            tar.write({"__key__": key, "jpg": jpg, "txt": f"caption {key}",
                       "json": {"url": f"http://example.org/{key}.jpg", "key": key, "status": "success"}})
    (source / "00000.parquet").write_bytes(b"not read")
    summary = shard_cc3m.main(["--root", str(root), "--out", str(tmp_path / "s"), "--img2dataset", str(source)])
    assert (summary.samples, summary.skipped) == (2, {"corrupt_image": 1})
    samples = read_shards(tmp_path / "s")
    assert [s["key"] for s in samples] == ["cc3m_train_000000000", "cc3m_train_000000002"]
    assert samples[1]["text"] == "caption 000000002" and samples[1]["meta"]["url"] == "http://example.org/000000002.jpg"


def test_cc3m_from_a_cut_short_img2dataset_shard_drops_the_partial_sample(tmp_path):
    # The fault: the partial last sample of a truncated tar came through with an empty caption.
    root, source = tmp_path / "cc3m", tmp_path / "img2dataset"
    root.mkdir()
    source.mkdir()
    with wds.TarWriter(str(source / "00000.tar")) as tar:
        for key in ("000000000", "000000001", "000000002"):
            tar.write({"__key__": key, "jpg": image_bytes(int(key)), "txt": f"caption {key}",
                       "json": {"url": f"http://example.org/{key}.jpg"}})
    data = (source / "00000.tar").read_bytes()
    cut = data.index(b"000000002.txt")  # the header of the last caption: sample 2 has only its jpg
    (source / "00000.tar").write_bytes(data[:cut])
    with pytest.warns(UserWarning, match="00000.tar is corrupt or cut short"):
        summary = shard_cc3m.main(["--root", str(root), "--out", str(tmp_path / "s"), "--img2dataset", str(source)])
    assert summary.samples == 2
    assert summary.skipped == {"img2dataset_corrupt_shard": 1, "img2dataset_truncated_sample": 1}
    assert [s["text"] for s in read_shards(tmp_path / "s")] == ["caption 000000000", "caption 000000001"]


def test_missing_inputs_name_the_path_and_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="coco_captions root not found: .*nowhere.*data_scripts.download "
                                                "coco_captions"):
        shard_coco.main(["--root", str(tmp_path / "nowhere"), "--out", str(tmp_path / "s")])
    with pytest.raises(FileNotFoundError, match="Karpathy split json not found: .*dataset_coco.json"):
        shard_coco.main(["--root", str(tmp_path), "--out", str(tmp_path / "s")])
    with pytest.raises(FileNotFoundError, match="VG region descriptions not found"):
        shard_vg.main(["--root", str(tmp_path), "--out", str(tmp_path / "s")])
    with pytest.raises(FileNotFoundError, match="CC3M TSV not found"):
        shard_cc3m.main(["--root", str(tmp_path), "--out", str(tmp_path / "s")])
    (tmp_path / "dataset_coco.json").write_text("{not json")
    with pytest.raises(ValueError, match="dataset_coco.json is not valid JSON"):
        shard_coco.main(["--root", str(tmp_path), "--out", str(tmp_path / "s")])
    with pytest.raises(ValueError, match="--max-samples must be >= 1"):
        (tmp_path / "dataset_coco.json").write_text('{"images": []}')
        shard_coco.main(["--root", str(tmp_path), "--out", str(tmp_path / "s"), "--max-samples", "0"])
    assert read_manifest(tmp_path / "s", "coco-train") is None
