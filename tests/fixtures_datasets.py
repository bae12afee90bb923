"""Tiny datasets in the published formats, and the loopback HTTP server the download tests use.

Each builder writes (or returns) a file the way its dataset publishes it, down to the keys and
their order, so that the scripts meet here what they meet on the real files:

- Karpathy's split json (``dataset_coco.json``, ``dataset_flickr30k.json``): ``sentids``, per
  sentence ``tokens`` / ``raw`` / ``imgid`` / ``sentid``; COCO entries carry ``filepath`` and
  ``cocoid`` (``restval`` images live in ``val2014/``), Flickr30k entries carry neither.
- COCO's own ``captions_train2014.json`` (for the wrong-file tests).
- VQA v2 questions / annotations: question ids ``image_id * 1000 + k``, 10 answers with
  confidences ``yes`` / ``maybe`` / ``no``, the ``info`` / ``license`` / ``data_subtype`` keys.
- Visual Genome ``region_descriptions.json`` v1.2 (boxes may run past the image border) and
  ``objects.json`` (for the wrong-file tests).
- CC3M TSVs under their official names (``Train_GCC-training.tsv``), ``caption<TAB>url``.
- img2dataset's webdataset output: ``NNNNN.tar`` (json with ``indent=4`` and all its keys, keys
  ``shard_id * 10**ceil(log10(number_sample_per_shard)) + i``), ``NNNNN_stats.json``,
  ``NNNNN.parquet`` (a placeholder: the scripts do not read it).

Nothing here touches the network: the server listens on 127.0.0.1 on a free port.
"""

from __future__ import annotations

import contextlib
import http.server
import io
import json
import math
import tarfile
import threading
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

CORRUPT = b"\xff\xd8\xff\xe0 truncated jpeg header and nothing else"
CC3M_TSV = {"train": "Train_GCC-training.tsv", "val": "Validation_GCC-1.1.0-Validation.tsv"}


# ----------------------------------------------------------------------------- loopback server


@contextlib.contextmanager
def loopback_server(handler: type[http.server.BaseHTTPRequestHandler], **state):
    """A threaded HTTP server on 127.0.0.1 (a free port) with ``state`` as attributes and ``base``
    (``http://127.0.0.1:PORT``); shut down on exit."""
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)  # port 0: a free port
    for name, value in state.items():
        setattr(httpd, name, value)
    httpd.base = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield httpd
    finally:
        httpd.shutdown()
        httpd.server_close()


# ----------------------------------------------------------------------------- files


def image_bytes(i: int, fmt: str = "JPEG", size=(32, 24), mode: str = "RGB") -> bytes:
    """A small gradient image; ``mode`` "L" (greyscale) and "CMYK" give JPEGs as a few COCO images are."""
    y, x = np.mgrid[0 : size[1], 0 : size[0]]
    array = np.stack([x * 4 + 5 * i, y * 6, np.full_like(x, 30 * i)], -1).astype(np.uint8)
    image = Image.fromarray(array).convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def write_zip(path: Path, members: dict) -> None:
    """A zip of ``members`` (bytes as they are, anything else as JSON), like the datasets' zips."""
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data if isinstance(data, bytes) else json.dumps(data))


# ----------------------------------------------------------------------------- Karpathy splits, COCO


class Karpathy:
    """Builds a Karpathy split json; ``imgid`` and ``sentid`` count up as in the real files."""

    def __init__(self, dataset: str):
        self.dataset, self.images, self.next_sentid = dataset, [], 0

    def add(self, filename: str, split: str, captions: list[str], filepath: str | None = None,
            cocoid: int | None = None) -> dict:
        imgid = len(self.images)
        sentids = list(range(self.next_sentid, self.next_sentid + len(captions)))
        self.next_sentid += len(captions)
        image = {"filepath": filepath} if filepath is not None else {}
        image.update({
            "sentids": sentids,
            "filename": filename,
            "imgid": imgid,
            "split": split,
            "sentences": [{"tokens": raw.lower().strip(" .").split(), "raw": raw, "imgid": imgid, "sentid": sid}
                          for raw, sid in zip(captions, sentids)],
        })
        if cocoid is not None:
            image["cocoid"] = cocoid
        self.images.append(image)
        return image

    def json(self) -> dict:
        return {"images": self.images, "dataset": self.dataset}


def coco_file(split: str, image_id: int) -> str:
    return f"COCO_{split}2014_{image_id:012d}.jpg"


def coco_captions_json(images: dict[int, tuple[str, list[str]]]) -> dict:
    """COCO's own ``annotations/captions_*2014.json``: {image id: (file name, captions)}."""
    annotations = [{"image_id": image_id, "id": 1000 * image_id + k, "caption": caption}
                   for image_id, (_, captions) in images.items() for k, caption in enumerate(captions)]
    return {
        "info": {"description": "COCO 2014 Dataset", "version": "1.0", "year": 2014},
        "images": [{"license": 3, "file_name": name, "coco_url": f"http://images.cocodataset.org/train2014/{name}",
                    "height": 24, "width": 32, "date_captured": "2013-11-14 16:28:13",
                    "flickr_url": "http://farm1.staticflickr.com/1/1.jpg", "id": image_id}
                   for image_id, (name, _) in images.items()],
        "licenses": [{"url": "http://creativecommons.org/licenses/by-nc-sa/2.0/", "id": 1, "name": "BY-NC-SA"}],
        "annotations": annotations,
    }


# ----------------------------------------------------------------------------- VQA v2


VQA_INFO = {"description": "This is v2.0 of the VQA dataset.", "url": "http://visualqa.org", "version": "2.0",
            "year": 2017, "contributor": "VQA Team", "date_created": "2017-04-26 17:07:13"}
VQA_LICENSE = {"url": "http://creativecommons.org/licenses/by/4.0/", "name": "Creative Commons Attribution 4.0"}
CONFIDENCES = ("yes", "maybe", "no")


def vqa_question(image_id: int, k: int, question: str) -> dict:
    return {"image_id": image_id, "question": question, "question_id": image_id * 1000 + k}


def vqa_annotation(image_id: int, k: int, answers: list[str], answer_type: str = "other",
                   question_type: str = "what color is the") -> dict:
    return {
        "question_type": question_type,
        "multiple_choice_answer": Counter(answers).most_common(1)[0][0],
        "answers": [{"answer": a, "answer_confidence": CONFIDENCES[j % 3], "answer_id": j + 1}
                    for j, a in enumerate(answers)],
        "image_id": image_id,
        "answer_type": answer_type,
        "question_id": image_id * 1000 + k,
    }


def vqa_questions_file(questions: list[dict], subtype: str = "train2014") -> dict:
    return {"info": VQA_INFO, "task_type": "Open-Ended", "data_type": "mscoco", "license": VQA_LICENSE,
            "data_subtype": subtype, "questions": questions}


def vqa_annotations_file(annotations: list[dict], subtype: str = "train2014") -> dict:
    return {"info": VQA_INFO, "license": VQA_LICENSE, "data_subtype": subtype, "annotations": annotations,
            "data_type": "mscoco"}


# ----------------------------------------------------------------------------- Visual Genome


def vg_region(region_id: int, image_id: int, phrase: str, x: int, y: int, w: int, h: int) -> dict:
    """A region of region_descriptions.json v1.2, its keys in the file's order."""
    return {"region_id": region_id, "width": w, "height": h, "image_id": image_id, "phrase": phrase, "y": y, "x": x}


def vg_image(image_id: int, regions: list[dict]) -> dict:
    return {"regions": regions, "id": image_id}


def vg_objects_image(image_id: int) -> dict:
    """An entry of VG's objects.json (another file of the dataset)."""
    return {"image_id": image_id, "objects": [{"object_id": 10 * image_id, "x": 1, "y": 2, "w": 5, "h": 6,
                                               "names": ["square"], "synsets": ["square.n.01"]}],
            "image_url": f"https://cs.stanford.edu/people/rak248/VG_100K/{image_id}.jpg"}


# ----------------------------------------------------------------------------- CC3M


def write_cc3m_tsv(path: Path, rows: list[tuple[str, str] | str]) -> Path:
    """``caption<TAB>url`` lines, no header, UTF-8, as Train_GCC-training.tsv; a str row is
    written as it is (a malformed line)."""
    lines = [row if isinstance(row, str) else "\t".join(row) for row in rows]
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- img2dataset


def img2dataset_key(shard_id: int, index: int, number_sample_per_shard: int, oom_shard_count: int = 5) -> str:
    """img2dataset's sample key (``compute_key``): shard id and index, zero-padded."""
    oom_sample = math.ceil(math.log10(number_sample_per_shard))
    return f"{shard_id * 10**oom_sample + index:0{oom_sample + oom_shard_count}d}"


def image_size_of(data: bytes) -> tuple[int | None, int | None]:
    """(width, height) of image bytes; (None, None) for bytes that do not open (damaged on disk)."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.size
    except OSError:
        return None, None


def write_img2dataset_output(folder: Path, rows: list[tuple[str, str, bytes | str]], number_sample_per_shard: int,
                             oom_shard_count: int = 5) -> list[Path]:
    """img2dataset's webdataset output for ``rows`` of (caption, url, outcome): image bytes (a
    success; written as given, so corrupt bytes stand for a file damaged after img2dataset wrote it),
    ``"failed_to_download"`` or ``"failed_to_resize"``; returns the tar paths.

    As img2dataset writes it: only successes go into the tar, with ``txt`` (the caption) and
    ``json`` (``json.dumps(meta, indent=4)``: caption, url, key, status, error_message, width,
    height, original_width, original_height, exif, sha256); ``NNNNN_stats.json`` counts every row.
    """
    folder.mkdir(parents=True, exist_ok=True)
    tars = []
    for shard_id, start in enumerate(range(0, len(rows), number_sample_per_shard)):
        name = f"{shard_id:0{oom_shard_count}d}"
        counts, status_dict = Counter(), Counter()
        with wds.TarWriter(str(folder / f"{name}.tar")) as tar:
            for index, (caption, url, outcome) in enumerate(rows[start : start + number_sample_per_shard]):
                key = img2dataset_key(shard_id, index, number_sample_per_shard, oom_shard_count)
                status = outcome if isinstance(outcome, str) else "success"
                counts[status] += 1
                status_dict["success" if status == "success" else f"{status}: fixture error"] += 1
                if status != "success":
                    continue
                width, height = image_size_of(outcome)
                meta = {"caption": caption, "url": url, "key": key, "status": "success", "error_message": None,
                        "width": width, "height": height, "original_width": width and 2 * width,
                        "original_height": height and 2 * height,
                        "exif": "{}", "sha256": f"{shard_id:032d}{index:032d}"}
                tar.write({"__key__": key, "jpg": outcome, "txt": caption, "json": json.dumps(meta, indent=4)})
        stats = {"count": sum(counts.values()), "successes": counts["success"],
                 "failed_to_download": counts["failed_to_download"], "failed_to_resize": counts["failed_to_resize"],
                 "duration": 1.5, "start_time": 1700000000.0, "end_time": 1700000001.5,
                 "status_dict": dict(status_dict)}
        (folder / f"{name}_stats.json").write_text(json.dumps(stats, indent=4))
        (folder / f"{name}.parquet").write_bytes(b"PAR1 placeholder: not read by the scripts PAR1")
        tars.append(folder / f"{name}.tar")
    return tars


def member_offsets(path: Path) -> dict[str, tuple[int, int]]:
    """{member name: (header offset, data offset)} of an uncompressed tar."""
    with tarfile.open(path) as tar:
        return {m.name: (m.offset, m.offset_data) for m in tar.getmembers()}
