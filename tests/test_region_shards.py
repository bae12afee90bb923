"""Region features for real data: bottom-up-attention TSVs -> region shards -> region batches -> pretraining.

The TSVs are written here, field by field, in the two published layouts (LXMERT/UNITER: 10 fields;
bottom-up-attention/VisualBERT: 6 fields, width before height), with numpy arrays as base64.
"""

import base64
import io
import json
import math
import tarfile
import warnings

import numpy as np
import pytest
import torch

from course_lib.data.region_shards import RegionBatches, RegionShardDataset, region_shard_texts
from course_lib.data.shards import ShardError, read_manifest, write_shards
from course_lib.features.text import train_tokenizer
from course_lib.models.registry import MODELS
from data_scripts import shard_regions
from data_scripts.shard_regions import normalize_image_id

F = 2048  # bottom-up-attention feature width
FLOAT16_RTOL = 2.0**-11  # float16 keeps 11 significant bits


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def b64(array: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(array).tobytes()).decode("ascii")


def image_arrays(seed: int, n: int, width: int, height: int, num_classes: int = 18) -> dict:
    """n regions: pixel boxes inside the image, non-negative features (ReLU outputs), labels, confidences."""
    rng = np.random.default_rng(seed)
    x1, y1 = rng.uniform(0, width / 2, n), rng.uniform(0, height / 2, n)
    boxes = np.stack([x1, y1, x1 + rng.uniform(1, width / 2, n), y1 + rng.uniform(1, height / 2, n)], 1)
    feats = np.maximum(rng.normal(0, 3, (n, F)), 0)
    return {"boxes": boxes.astype(np.float32), "feats": feats.astype(np.float32),
            "labels": rng.integers(0, num_classes, n).astype(np.int64), "conf": rng.uniform(0, 1, n).astype(np.float32)}


def lxmert_row(image_id, arrays: dict, width: int, height: int) -> list[str]:
    """img_id, img_h, img_w, objects_id, objects_conf, attrs_id, attrs_conf, num_boxes, boxes, features."""
    n = len(arrays["boxes"])
    return [str(image_id), str(height), str(width), b64(arrays["labels"]), b64(arrays["conf"]),
            b64(arrays["labels"] % 7), b64(arrays["conf"]), str(n), b64(arrays["boxes"]), b64(arrays["feats"])]


def butd_row(image_id, arrays: dict, width: int, height: int) -> list[str]:
    """image_id, image_w, image_h, num_boxes, boxes, features."""
    n = len(arrays["boxes"])
    return [str(image_id), str(width), str(height), str(n), b64(arrays["boxes"]), b64(arrays["feats"])]


def write_tsv(path, rows) -> None:
    path.write_text("".join("\t".join(row) + "\n" for row in rows))


def write_coco_captions(path, captions: dict) -> None:
    """COCO captions json: ``{"images": [...], "annotations": [{"image_id", "caption", "id"}]}``."""
    annotations = [{"image_id": i, "id": 100 * i + k, "caption": c}
                   for i, texts in captions.items() for k, c in enumerate(texts)]
    path.write_text(json.dumps({"images": [{"id": i} for i in captions], "annotations": annotations}))


def read(path, **kw) -> list[dict]:
    return list(RegionShardDataset(path, split_by_node=False, split_by_worker=False, **kw))


SIZES = {42: (640, 480), 7: (500, 375), 9: (320, 240), 11: (300, 400), 13: (200, 300), 15: (640, 427)}
COUNTS = {42: 36, 7: 10, 9: 40, 11: 5, 13: 1, 15: 36}
CAPTIONS = {i: [f"a photo number {i} of a red square.", f"caption two of {i}"] for i in SIZES}


@pytest.fixture
def coco(tmp_path):
    """An LXMERT-layout TSV of 6 COCO images (ids written as in the releases: 'COCO_val2014_…' or
    plain ints) and their captions json."""
    arrays = {i: image_arrays(i, COUNTS[i], *SIZES[i]) for i in SIZES}
    ids = {i: f"COCO_val2014_{i:012d}" if i % 2 else str(i) for i in SIZES}
    write_tsv(tmp_path / "val2014_obj36.tsv", [lxmert_row(ids[i], arrays[i], *SIZES[i]) for i in SIZES])
    write_coco_captions(tmp_path / "captions.json", CAPTIONS)
    return tmp_path, arrays


def convert(root, out, *args):
    return shard_regions.main(["--root", str(root), "--out", str(out), *args])


def test_lxmert_tsv_round_trip_values_and_batch(coco, capsys):
    root, arrays = coco
    summary = convert(root / "val2014_obj36.tsv", root / "shards", "--captions", str(root / "captions.json"),
                      "--split", "val", "--shard-size", "4")
    assert (summary.samples, summary.skipped, summary.shards) == (
        6, {}, ["coco-regions-val-000000.tar", "coco-regions-val-000001.tar"])
    assert "coco-regions-val: 2 shards, 6 samples" in capsys.readouterr().out
    samples = read(root / "shards", max_regions=36)
    assert [s["key"] for s in samples] == [f"coco_{i:012d}" for i in SIZES]
    for sample, (i, a) in zip(samples, arrays.items()):
        width, height = SIZES[i]
        n = min(COUNTS[i], 36)  # the first 36 regions, in file order
        assert sample["feats"].dtype == torch.float32 and sample["feats"].shape == (n, F)
        np.testing.assert_allclose(sample["feats"].numpy(), a["feats"][:n], rtol=FLOAT16_RTOL, atol=1e-7)
        np.testing.assert_allclose(sample["boxes"].numpy(), a["boxes"][:n] / [width, height, width, height],
                                   rtol=1e-6)
        assert sample["labels"].tolist() == a["labels"][:n].tolist()
        assert sample["text"] == CAPTIONS[i][0]
        assert sample["meta"] == {"dataset": "coco", "split": "val", "image_id": i, "width": width, "height": height,
                                  "num_boxes": COUNTS[i], "captions": CAPTIONS[i]}

    tokenizer = train_tokenizer([c for texts in CAPTIONS.values() for c in texts], vocab_size=64)
    batch = RegionBatches(tokenizer, context_length=12, max_regions=36)(samples[:3])  # 36, 10, 40 regions
    assert batch["region_feats"].shape == (3, 36, F) and batch["region_boxes"].shape == (3, 36, 4)
    assert batch["region_mask"].sum(1).tolist() == [36, 10, 36] and batch["region_mask"].dtype == torch.bool
    assert (batch["region_feats"][1, 10:] == 0).all() and (batch["region_boxes"][1, 10:] == 0).all()
    assert (batch["region_labels"][1, 10:] == -1).all() and batch["region_labels"].dtype == torch.long
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (3, 12)
    assert "region_probs" not in batch and "images" not in batch
    assert batch["index"].shape == (3,) and len(set(batch["index"].tolist())) == 3
    again = RegionBatches(tokenizer, context_length=12, max_regions=36)(read(root / "shards")[:3])
    assert torch.equal(again["index"], batch["index"])  # a stable id per sample key
    assert read(root / "shards", max_regions=4)[0]["feats"].shape == (4, F)


def test_six_field_layout_has_width_first_and_no_labels(tmp_path):
    a = image_arrays(0, 3, 640, 480)
    write_tsv(tmp_path / "feats.tsv", [butd_row(391895, a, 640, 480)])
    (tmp_path / "captions.jsonl").write_text(json.dumps({"image_id": "391895", "caption": "a man on a bike"}) + "\n")
    summary = convert(tmp_path / "feats.tsv", tmp_path / "out", "--captions", str(tmp_path / "captions.jsonl"))
    assert summary.samples == 1
    [sample] = read(tmp_path / "out")
    np.testing.assert_allclose(sample["boxes"].numpy(), a["boxes"] / [640, 480, 640, 480], rtol=1e-6)
    assert sample["labels"].tolist() == [-1, -1, -1] and sample["text"] == "a man on a bike"
    assert (sample["meta"]["width"], sample["meta"]["height"], sample["meta"]["image_id"]) == (640, 480, 391895)


def test_image_ids_are_normalised_for_matching():
    assert normalize_image_id("COCO_val2014_000000391895") == normalize_image_id("000000391895") == 391895
    assert normalize_image_id("COCO_train2014_000000000009") == normalize_image_id(9) == 9
    assert normalize_image_id(" 2354786 ") == 2354786
    assert normalize_image_id("1000092795.jpg") == "1000092795.jpg"  # not a plain id: matched as a string
    assert normalize_image_id("n01440764_10026") == "n01440764_10026"


def test_bad_rows_are_skipped_and_counted_never_fatal(tmp_path, capsys):
    good = [image_arrays(i, 4, 100, 80) for i in range(8)]
    rows = [lxmert_row(0, good[0], 100, 80)]
    rows.append(lxmert_row(1, good[1], 100, 80)[:9])  # a field lost: 9 fields
    bad = lxmert_row(2, good[2], 100, 80)
    bad[9] = bad[9][:-8] + "!!not=b6"
    rows.append(bad)  # features are not base64
    small = dict(good[3], feats=good[3]["feats"][:, :1024])
    rows.append(lxmert_row(3, small, 100, 80))  # 1024-d features where 2048 are expected
    rows.append(lxmert_row(4, dict(good[4], labels=good[4]["labels"][:3]), 100, 80))  # 3 labels for 4 boxes
    rows.append(lxmert_row(5, good[5], 100, 80))  # no caption for image 5
    no_height = lxmert_row(6, good[6], 100, 80)
    no_height[1] = "n/a"
    rows.append(no_height)
    rows.append(lxmert_row(0, good[7], 100, 80))  # image 0 again
    flipped = dict(good[6], boxes=good[6]["boxes"][:, [2, 1, 0, 3]].copy())
    rows.append(lxmert_row(8, flipped, 100, 80))  # x2 < x1
    rows.append(butd_row(7, good[7], 100, 80))  # a good 6-field row in the same file
    write_tsv(tmp_path / "f.tsv", rows)
    write_coco_captions(tmp_path / "c.json", {i: [f"image {i}"] for i in (0, 1, 2, 3, 4, 6, 7, 8)})
    summary = convert(tmp_path / "f.tsv", tmp_path / "out", "--captions", str(tmp_path / "c.json"))
    assert summary.skipped == {"wrong_field_count": 1, "bad_base64": 1, "wrong_array_size": 2, "no_text": 1,
                               "bad_number": 1, "duplicate_image": 1, "bad_boxes": 1}
    assert [s["key"] for s in read(tmp_path / "out")] == ["coco_000000000000", "coco_000000000007"]
    assert "skipped: bad_base64 1, bad_boxes 1, bad_number 1, duplicate_image 1" in capsys.readouterr().out


def test_resume_after_an_interruption_keeps_complete_shards(coco, monkeypatch):
    root, _ = coco
    args = [root / "val2014_obj36.tsv", root / "shards", "--captions", str(root / "captions.json"), "--shard-size", "2"]
    built, real = [], shard_regions.build_region_sample

    def crash_at_the_fourth(row, **kw):
        built.append(row[0])
        if len(built) == 4:
            raise KeyboardInterrupt
        return real(row, **kw)

    monkeypatch.setattr(shard_regions, "build_region_sample", crash_at_the_fourth)
    with pytest.raises(KeyboardInterrupt):
        convert(*args)
    assert [r["samples"] for r in read_manifest(root / "shards", "coco-regions-train")["shards"]] == [2]
    assert (root / "shards" / "coco-regions-train-000001.tar.tmp").exists()

    built.clear()
    monkeypatch.setattr(shard_regions, "build_region_sample", lambda row, **kw: built.append(row[0]) or real(row, **kw))
    summary = convert(*args)
    assert (summary.resumed_shards, summary.written, summary.samples) == (1, 4, 6)
    assert len(built) == 4  # the rows of the kept shard are not decoded again
    assert [s["key"] for s in read(root / "shards")] == [f"coco_{i:012d}" for i in SIZES]
    with pytest.raises(ValueError, match="feat_dim=1024 differs from 2048"):
        convert(*args, "--feat-dim", "1024")


def test_captions_jsonl_and_vqa_questions(tmp_path):
    write_tsv(tmp_path / "f.tsv", [lxmert_row(f"COCO_val2014_{i:012d}", image_arrays(i, 2, 50, 40), 50, 40)
                                   for i in (1, 2, 3)])
    (tmp_path / "c.jsonl").write_text(json.dumps({"image_id": 1, "caption": " two dogs. "}) + "\n\n")
    (tmp_path / "q.json").write_text(json.dumps({"questions": [
        {"question_id": 10, "image_id": 1, "question": "How many dogs?"},
        {"question_id": 20, "image_id": 2, "question": "What colour is the cat?"}]}))
    (tmp_path / "a.json").write_text(json.dumps({"annotations": [
        {"question_id": q, "image_id": i, "multiple_choice_answer": a, "answer_type": "other", "question_type": "x",
         "answers": [{"answer": a}] * 10} for q, i, a in ((10, 1, "2"), (20, 2, "black"))]}))
    summary = convert(tmp_path / "f.tsv", tmp_path / "out", "--captions", str(tmp_path / "c.jsonl"),
                      "--vqa-questions", str(tmp_path / "q.json"), "--vqa-annotations", str(tmp_path / "a.json"))
    assert (summary.samples, summary.skipped) == (2, {"no_text": 1})
    first, second = read(tmp_path / "out")
    assert first["text"] == "two dogs." and first["meta"]["questions"][0]["answer_scores"] == {"2": 1.0}
    assert second["text"] == "What colour is the cat?" and second["meta"]["captions"] == []
    assert list(region_shard_texts(tmp_path / "out")) == ["two dogs.", "How many dogs?", "What colour is the cat?"]
    with pytest.raises(ValueError, match="--vqa-questions and --vqa-annotations go together"):
        convert(tmp_path / "f.tsv", tmp_path / "o2", "--vqa-questions", str(tmp_path / "q.json"))
    with pytest.raises(ValueError, match="no text: give --captions"):
        convert(tmp_path / "f.tsv", tmp_path / "o2")


def _npy(array) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def _write_tar(path, samples: list[dict]) -> None:
    with tarfile.open(path, "w") as tar:
        for sample in samples:
            for name, data in sample.items():
                if name == "__key__":
                    continue
                info = tarfile.TarInfo(f"{sample['__key__']}.{name}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_a_corrupt_npy_in_a_shard_is_skipped_and_counted(tmp_path):
    def sample(key, **fields):
        good = {"feats.npy": _npy(np.ones((3, 8), np.float16)), "boxes.npy": _npy(np.zeros((3, 4), np.float32)),
                "labels.npy": _npy(np.arange(3)), "txt": b"a caption"}
        return {"__key__": key, **{k: v for k, v in {**good, **fields}.items() if v is not None}}

    _write_tar(tmp_path / "r-000000.tar", [
        sample("ok0"),
        sample("garbage", **{"feats.npy": b"\x93NUMPY this is not an array"}),
        sample("cut", **{"feats.npy": _npy(np.ones((3, 8), np.float16))[:-10]}),
        sample("shape", **{"boxes.npy": _npy(np.zeros((2, 4), np.float32))}),
        sample("nan", **{"feats.npy": _npy(np.full((3, 8), np.nan, np.float16))}),
        sample("nolabels", **{"labels.npy": None}),
        sample("ok1"),
    ])
    dataset = RegionShardDataset(tmp_path, split_by_node=False, split_by_worker=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert [s["key"] for s in dataset] == ["ok0", "ok1"]
    assert dataset.stats["reasons"] == {"corrupt_npy": 4, "missing_npy": 1}
    with pytest.raises(ShardError, match=r"sample 'garbage' in .*r-000000.tar: feats.npy is not a loadable"):
        read(tmp_path, handler="raise")

    summary = write_shards([sample("w0"), sample("w1", **{"feats.npy": b"not npy"}),
                            {"__key__": "w2", "feats.npy": np.zeros((2, 3), np.float16), "txt": "x"}],
                           tmp_path / "written", "w")
    assert (summary.samples, summary.skipped) == (2, {"corrupt_npy": 1})  # the writer checks before writing
    with pytest.raises(ValueError, match="field 'feats.npy' must be a numpy array or bytes"):
        write_shards([{"__key__": "k", "feats.npy": [1, 2]}], tmp_path / "w2", "w")


# ----------------------------------------------------------------------------- pretraining on region shards

needs_visualbert = pytest.mark.skipif("visualbert" not in MODELS, reason="no region model registered yet")
REGION_MODELS = [name for name, entry in MODELS.items() if getattr(entry.model, "inputs", "images") == "regions"]


@pytest.fixture
def vg_shards(coco):
    """The 6 COCO images with Visual Genome-sized labels (1600 classes), as region shards."""
    root, _ = coco
    arrays = {i: image_arrays(i, 3, *SIZES[i], num_classes=1600) for i in SIZES}
    arrays[42]["labels"][0] = 1599
    write_tsv(root / "vg.tsv", [lxmert_row(i, arrays[i], *SIZES[i]) for i in SIZES])
    convert(root / "vg.tsv", root / "vg", "--captions", str(root / "captions.json"), "--shard-size", "3")
    return root / "vg"


def pretrain_args(data_path, out_dir, *extra, model="visualbert"):
    return [f"--model={model}", "--data=region_shards", f"--data_path={data_path}", "--steps=3",
            "--global_batch=4", "--model.region_feat_dim=2048", "--num_workers=0", f"--out_dir={out_dir}",
            "--log_every=1", *extra]


@needs_visualbert
@pytest.mark.parametrize("model", REGION_MODELS)
def test_region_models_pretrain_on_region_shards(vg_shards, tmp_path, model):
    # python -m course_lib.pretrain --model=visualbert --data=region_shards --data_path=... --steps=3
    #   --global_batch=4 --model.region_feat_dim=2048 --num_workers=0 (VG labels need 1601 classes)
    from course_lib.pretrain import parse_args, pretrain

    from course_lib.models.registry import build_config

    extra = ["--model.num_region_classes=1601"]
    if hasattr(build_config(model), "tag_names_file"):  # object tags (Oscar): the detector's class names
        names = tmp_path / "objects_vocab.txt"
        names.write_text("\n".join(f"object{i}" for i in range(1600)) + "\n")
        extra.append(f"--model.tag_names_file={names}")
    if getattr(build_config(model), "mrckl_weight", 0.0) > 0:  # ViLBERT's MRC-kl needs the class distribution,
        extra += ["--model.mrckl_weight=0.0", "--model.mrc_weight=1.0"]  # which shards don't keep (README)
    argv = pretrain_args(vg_shards, tmp_path / "run", *extra, model=model)
    result = pretrain(parse_args(argv))
    assert result.history.steps == [1, 2, 3]
    assert all(math.isfinite(loss) for loss in result.history.losses)
    assert (tmp_path / "run" / "tokenizer" / "tokenizer.json").is_file()  # learned from the shards' captions


@needs_visualbert
def test_a_region_model_on_shapeworld_reads_detected_regions(tmp_path, monkeypatch):
    import course_lib.data.regions as regions
    from course_lib.pretrain import parse_args, pretrain

    batches = []

    class Recorded(regions.ShapeWorldRegions):
        def __call__(self, indices):
            batches.append(super().__call__(indices))
            return batches[-1]

    monkeypatch.setattr(regions, "ShapeWorldRegions", Recorded)
    result = pretrain(parse_args(["--model=visualbert", "--data=shapeworld", "--steps=2", "--global_batch=4",
                                  "--num_workers=0", f"--out_dir={tmp_path}"]))
    assert all(math.isfinite(loss) for loss in result.history.losses)
    assert batches and batches[0]["region_feats"].shape[-1] == 108  # RoIAlign pixels, not images


@needs_visualbert
@pytest.mark.parametrize("extra, message", [
    ([], r"region labels up to 1599.*pass --model.num_region_classes=1601"),
    (["--model.num_region_classes=1601", "--model.region_feat_dim=108"],
     r"region features of width 2048.*region_feat_dim=108; pass --model.region_feat_dim=2048"),
])
def test_region_data_that_does_not_fit_the_model_names_the_option(vg_shards, tmp_path, extra, message):
    from course_lib.pretrain import parse_args, pretrain

    with pytest.raises(ValueError, match=message):
        pretrain(parse_args(pretrain_args(vg_shards, tmp_path / "run", *extra)))


@needs_visualbert
@pytest.mark.parametrize("argv, message", [
    (["--model=clip", "--data=region_shards", "--data_path=x"],
     r"--data=region_shards gives region features, but model 'clip' reads images; use --data=shapeworld"),
    (["--model=visualbert", "--data=shards", "--data_path=x"],
     r"--data=shards gives images, but model 'visualbert' reads regions; use --data=shapeworld or "
     r"--data=region_shards"),
    (["--model=visualbert", "--data=synthetic"], r"--data=synthetic gives images"),
    (["--model=visualbert", "--data=region_shards"], r"data='region_shards' needs data_path"),
])
def test_data_source_and_model_inputs_must_agree(argv, message):
    from course_lib.pretrain import parse_args

    with pytest.raises(ValueError, match=message):
        parse_args(argv)
