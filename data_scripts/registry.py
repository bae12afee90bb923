"""Where each real dataset comes from: URLs, sizes, checksums, formats and licences.

Sizes and checksums are the ones published or confirmed by several independent downloads;
where we do not know them for sure they are ``None``: the first download's size and SHA-256 are
then recorded in ``ROOT/download-lock.json`` and every later download or ``--verify-only`` is
checked against them (trust on first use). ``python -m data_scripts.download --list`` prints
this table.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class RemoteFile:
    """One file to fetch. ``extract``: unzip it into the dataset root after download."""

    url: str
    filename: str
    size: int | None = None
    sha256: str | None = None
    md5: str | None = None
    extract: bool = False
    mirrors: tuple[str, ...] = ()


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    files: tuple[RemoteFile, ...]
    format: str
    license: str
    homepage: str
    disk: str  # rough disk needs, downloads + extracted
    manual: str = ""  # steps a person must do (request forms, terms to accept)
    next_step: str = ""  # the command that turns the download into shards
    notes: list[str] = field(default_factory=list)


KARPATHY_SPLITS = RemoteFile(
    # Karpathy & Fei-Fei (2015) splits of COCO / Flickr8k / Flickr30k, tokenised captions.
    # Holds dataset_coco.json, dataset_flickr8k.json, dataset_flickr30k.json at its top level.
    url="https://cs.stanford.edu/people/karpathy/deepimagesent/caption_datasets.zip",
    filename="caption_datasets.zip",
    extract=True,  # size/checksum: not published -> None
)

# md5s as listed by Salesforce LAVIS's COCO builders; sizes as served by images.cocodataset.org
# (Content-Length seen in many independent download logs).
COCO_TRAIN2014 = RemoteFile(
    url="http://images.cocodataset.org/zips/train2014.zip",
    filename="train2014.zip",
    size=13_510_573_713,
    md5="0da8c0bd3d6becc4dcb32757491aca88",
    extract=True,
)
COCO_VAL2014 = RemoteFile(
    url="http://images.cocodataset.org/zips/val2014.zip",
    filename="val2014.zip",
    size=6_645_013_297,
    md5="a3d79f5ed8d289b7a7554ce06a5782b3",
    extract=True,
)

VQA_BASE = "https://s3.amazonaws.com/cvmlp/vqa/mscoco/vqa"
VG_BASE = "https://visualgenome.org/static/data/dataset"
VG_MIRROR = "https://homes.cs.washington.edu/~ranjay/visualgenome/data/dataset"
CC3M_BASE = "https://storage.googleapis.com/gcc-data"

DATASETS: dict[str, DatasetInfo] = {
    "coco_captions": DatasetInfo(
        name="coco_captions",
        files=(KARPATHY_SPLITS, COCO_TRAIN2014, COCO_VAL2014),
        format="COCO 2014 JPEGs in train2014/ and val2014/; Karpathy split json dataset_coco.json "
               "(113,287 train incl. restval / 5,000 val / 5,000 test images, 5 captions each)",
        license="images: Flickr terms of use (COCO); captions: CC BY 4.0; Karpathy split json: no "
                "licence stated, redistributed by its author for research",
        homepage="https://cocodataset.org/#download",
        disk="about 20 GB of zips + 20 GB extracted; train shards roughly 18 GB at original size "
             "(about 160 kB per image), a few GB with --image-size 384",
        next_step="python -m data_scripts.shard_coco --root ROOT --out OUT --split train",
    ),
    "flickr30k": DatasetInfo(
        name="flickr30k",
        files=(KARPATHY_SPLITS,),
        format="Karpathy split json dataset_flickr30k.json (29,000 train / 1,014 val / 1,000 test "
               "images, 5 captions each); images in flickr30k-images/<id>.jpg",
        license="images: Flickr terms of use, non-commercial research only (request form); "
                "captions: research use per the Flickr30k terms",
        homepage="https://shannon.cs.illinois.edu/DenotationGraph/",
        disk="about 4.5 GB of images; shards about 4.5 GB",
        manual="The images are not public: request them with the form linked from "
               "https://shannon.cs.illinois.edu/DenotationGraph/ (you receive a link to "
               "flickr30k-images.tar.gz), then extract it so that ROOT/flickr30k-images/<id>.jpg exists.",
        next_step="python -m data_scripts.shard_flickr30k --root ROOT --out OUT --split train",
    ),
    "cc3m": DatasetInfo(
        name="cc3m",
        files=(
            # Google publishes these behind a terms page (ai.google.com/research/ConceptualCaptions);
            # the direct bucket links below are the ones that page points to. Saved under the names
            # the page's downloads get (bucket folder + "_" + object name). Size/checksum: None.
            RemoteFile(url=f"{CC3M_BASE}/Train/GCC-training.tsv", filename="Train_GCC-training.tsv"),
            RemoteFile(url=f"{CC3M_BASE}/Validation/GCC-1.1.0-Validation.tsv",
                       filename="Validation_GCC-1.1.0-Validation.tsv"),
        ),
        format="Train_GCC-training.tsv, Validation_GCC-1.1.0-Validation.tsv: TSV without header, "
               "caption<TAB>image URL (3,318,333 train / 15,840 val rows); "
               "images fetched from the original hosts; a growing share of links is dead (over 12% by 2021)",
        license="captions: free to use with acknowledgement of Google LLC; images belong to their "
                "owners (only URLs are distributed)",
        homepage="https://ai.google.com/research/ConceptualCaptions/download",
        disk="TSVs about 0.6 GB; images at 256 px roughly 25 kB each, so about 70 GB for the ~2.9M "
             "that still download (img2dataset --image_size 256)",
        manual="Accept the terms on the homepage. At scale fetch the images with img2dataset "
               "(see data_scripts/README.md); shard_cc3m reads its output.",
        next_step="python -m data_scripts.shard_cc3m --root ROOT --out OUT --img2dataset IMG2DATASET_DIR",
    ),
    "visual_genome": DatasetInfo(
        name="visual_genome",
        files=(
            RemoteFile(url=f"{VG_BASE}/region_descriptions.json.zip", filename="region_descriptions.json.zip",
                       extract=True, mirrors=(f"{VG_MIRROR}/region_descriptions.json.zip",)),
            # The two image archives extract to VG_100K/ and VG_100K_2/. Size/checksum: None.
            RemoteFile(url="https://cs.stanford.edu/people/rak248/VG_100K_2/images.zip",
                       filename="images.zip", extract=True),
            RemoteFile(url="https://cs.stanford.edu/people/rak248/VG_100K_2/images2.zip",
                       filename="images2.zip", extract=True),
        ),
        format="108,077 JPEGs in VG_100K/ and VG_100K_2/ named <image_id>.jpg; "
               "region_descriptions.json: [{id, regions: [{region_id, phrase, x, y, width, height}]}] (v1.2)",
        license="CC BY 4.0",
        homepage="https://visualgenome.org/",
        disk="about 15 GB of zips + 15 GB extracted; region json about 0.7 GB extracted",
        next_step="python -m data_scripts.shard_vg --root ROOT --out OUT",
        notes=["About 51k VG images are also COCO images: drop those in your COCO/Flickr test "
               "splits before pretraining (as UNITER does)."],
    ),
    "vqa_v2": DatasetInfo(
        name="vqa_v2",
        files=(
            RemoteFile(url=f"{VQA_BASE}/v2_Questions_Train_mscoco.zip", filename="v2_Questions_Train_mscoco.zip",
                       extract=True),
            RemoteFile(url=f"{VQA_BASE}/v2_Questions_Val_mscoco.zip", filename="v2_Questions_Val_mscoco.zip",
                       extract=True),
            RemoteFile(url=f"{VQA_BASE}/v2_Annotations_Train_mscoco.zip",
                       filename="v2_Annotations_Train_mscoco.zip", extract=True),
            RemoteFile(url=f"{VQA_BASE}/v2_Annotations_Val_mscoco.zip", filename="v2_Annotations_Val_mscoco.zip",
                       extract=True),
            COCO_TRAIN2014,
            COCO_VAL2014,
        ),
        format="v2_OpenEnded_mscoco_{train,val}2014_questions.json + v2_mscoco_{train,val}2014_annotations.json "
               "(443,757 train / 214,354 val questions, 10 answers each) on COCO 2014 images",
        license="annotations: CC BY 4.0; images: Flickr terms of use (COCO)",
        homepage="https://visualqa.org/download.html",
        disk="about 0.1 GB of json zips + the COCO 2014 images (use the same --root as coco_captions "
             "and they are downloaded once)",
        next_step="python -m data_scripts.shard_vqa --root ROOT --out OUT --split train",
    ),
}


def get_dataset(name: str) -> DatasetInfo:
    """The registry entry ``name``; ``ValueError`` naming the valid choices otherwise."""
    if name not in DATASETS:
        raise ValueError(f"dataset={name!r} is not in the registry; expected one of {sorted(DATASETS)}")
    return DATASETS[name]
