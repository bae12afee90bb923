"""VQA v2 questions + answers on COCO images -> webdataset shards (one sample per image).

    python -m data_scripts.shard_vqa --root data/coco --out shards/vqa --split train

Reads ``ROOT/v2_OpenEnded_mscoco_{split}2014_questions.json`` (from v2_Questions_{Train,Val}_mscoco.zip:
``{"info", "task_type", "data_type", "license", "data_subtype", "questions": [{"image_id", "question",
"question_id"}]}``), ``ROOT/v2_mscoco_{split}2014_annotations.json`` (from
v2_Annotations_{Train,Val}_mscoco.zip: ``{"info", "license", "data_subtype", "data_type",
"annotations": [{"question_type", "multiple_choice_answer", "answers": [{"answer",
"answer_confidence", "answer_id"}] (10), "image_id", "answer_type", "question_id"}]}``) and the
images ``IMAGE_ROOT/{split}2014/COCO_{split}2014_<12-digit id>.jpg`` (``--image-root``, default
ROOT: download vqa_v2 into the same root as coco_captions and the images come once). A question
id is the image id x 1000 + k. ``answer_confidence`` (yes / maybe / no) is not used: the VQA
accuracy counts all 10 answers.

Sample (key ``vqa_<split>_<12-digit image id>``): ``jpg``; ``txt`` = the first question; ``json``
= {dataset, split, image_id (the COCO id), width, height, questions: [{question_id, question,
answers (10), answer_scores, multiple_choice_answer, answer_type, question_type}]}. One sample
per image rather than per question keeps the shards about 5x smaller; expand to questions in
the data loader.
"""

from __future__ import annotations

import functools
import re
from collections import Counter, defaultdict
from pathlib import Path

from data_scripts.common import (check_args, cli, load_jpeg, load_json, make_parser, require_file, require_keys,
                                 require_root, run, wrong_json)

SOFT_SCORE = {0: 0.0, 1: 0.3, 2: 0.6, 3: 0.9}  # 4 or more annotators: 1.0
QUESTION_KEYS = ("question_id", "image_id", "question")
ANNOTATION_KEYS = ("question_id", "answers")
EXPECTED = {
    "questions": "a VQA v2 questions file (v2_OpenEnded_mscoco_{train,val}2014_questions.json): "
                 "{'info', 'license', 'questions': [{'image_id', 'question', 'question_id'}], ...}",
    "annotations": "a VQA v2 annotations file (v2_mscoco_{train,val}2014_annotations.json): {'info', 'license', "
                   "'annotations': [{'question_id', 'image_id', 'answers': [{'answer', ...}], ...}], ...}",
}


def normalize_answer(answer: str) -> str:
    """Lower case, single spaces, no trailing period: the light part of the official
    normalisation (the full one also maps number words and drops articles and punctuation)."""
    return re.sub(r"\s+", " ", answer.lower()).strip().rstrip(".").strip()


def vqa_soft_scores(answers: list[str]) -> dict[str, float]:
    """Soft target per distinct answer: 0.3, 0.6, 0.9, 1.0 for 1, 2, 3, >= 4 annotators.

    This is the closed form of the VQA accuracy ``mean over the 10 leave-one-out subsets of
    min(1, #matches / 3)`` (Antol et al. 2015; Teney et al. 2018 train on it as soft labels).
    """
    if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
        raise ValueError(f"answers must be a list of str, got {answers!r}")
    counts = Counter(normalize_answer(a) for a in answers)
    return {answer: SOFT_SCORE.get(n, 1.0) for answer, n in counts.items() if answer}


def _entries(path: Path, key: str, first_keys: tuple[str, ...]) -> list:
    """``data[key]`` of a VQA file; ``ValueError`` saying what the file looks like when it is another one
    (none of its first entries has ``first_keys``)."""
    data = load_json(path)
    entries = data.get(key) if isinstance(data, dict) else None
    if not isinstance(entries, list) or (entries and not any(isinstance(e, dict) and all(k in e for k in first_keys)
                                                             for e in entries[:100])):
        raise wrong_json(path, data, EXPECTED[key])
    return entries


def _answers(annotation: dict, path: Path, where: str) -> list[str]:
    if not isinstance(annotation["answers"], list):
        raise ValueError(f"{path}: {where}: 'answers' is a {type(annotation['answers']).__name__}, expected a list")
    return [require_keys(a, ("answer",), path, f"{where} answers[{k}]")["answer"]
            for k, a in enumerate(annotation["answers"])]


def vqa_records(questions_path: Path, annotations_path: Path) -> tuple[list[dict], Counter]:
    """Questions joined with their annotations, grouped by image (sorted by image id).

    ``ValueError`` naming the file, the entry and the key when an entry lacks a key it needs
    (``question_id``, ``image_id``, ``question``; ``question_id``, ``answers``, ``answer``).
    """
    questions = _entries(questions_path, "questions", ("question_id", "question"))
    annotations = _entries(annotations_path, "annotations", ("question_id", "answers"))
    by_question = {}
    for index, a in enumerate(annotations):
        where = f"annotations[{index}]" + (f" (question_id {a.get('question_id')!r})" if isinstance(a, dict) else "")
        require_keys(a, ANNOTATION_KEYS, annotations_path, where)
        by_question[a["question_id"]] = (a, where)
    by_image, dropped = defaultdict(list), Counter()
    for index, q in enumerate(questions):
        where = f"questions[{index}]" + (f" (question_id {q.get('question_id')!r})" if isinstance(q, dict) else "")
        require_keys(q, QUESTION_KEYS, questions_path, where)
        if q["question_id"] not in by_question:
            dropped["questions_without_answers"] += 1
            continue
        annotation, annotation_where = by_question[q["question_id"]]
        answers = _answers(annotation, annotations_path, annotation_where)
        by_image[q["image_id"]].append({
            "question_id": q["question_id"],
            "question": q["question"],
            "answers": answers,
            "answer_scores": vqa_soft_scores(answers),
            "multiple_choice_answer": annotation.get("multiple_choice_answer"),
            "answer_type": annotation.get("answer_type"),
            "question_type": annotation.get("question_type"),
        })
    records = [{"image_id": image_id, "questions": sorted(qs, key=lambda q: q["question_id"])}
               for image_id, qs in sorted(by_image.items())]
    return records, dropped


def build_vqa(record: dict, image_dir: Path, split: str, max_side: int | None) -> dict:
    image_id = record["image_id"]
    path = image_dir / f"COCO_{split}2014_{image_id:012d}.jpg"
    jpeg, (width, height), _ = load_jpeg(path, max_side)
    return {
        "__key__": f"vqa_{split}_{image_id:012d}",
        "jpg": jpeg,
        "txt": record["questions"][0]["question"],
        "json": {"dataset": "vqa_v2", "split": split, "image_id": image_id, "width": width, "height": height,
                 "questions": record["questions"]},
    }


def main(argv: list[str] | None = None):
    parser = make_parser("shard_vqa", "VQA v2 -> webdataset shards", ("train", "val"), "train")
    parser.add_argument("--image-root", type=Path, help="directory holding train2014/ and val2014/ (default ROOT)")
    args = check_args(parser.parse_args(argv))
    root = require_root(args.root, "vqa_v2")
    hint = f"Fetch it with: python -m data_scripts.download vqa_v2 --root {root}"
    questions = require_file(root / f"v2_OpenEnded_mscoco_{args.split}2014_questions.json", "VQA questions", hint)
    annotations = require_file(root / f"v2_mscoco_{args.split}2014_annotations.json", "VQA annotations", hint)
    image_dir = require_file((args.image_root or root) / f"{args.split}2014", "COCO image directory", hint)
    records, dropped = vqa_records(questions, annotations)
    if not records:
        raise ValueError(f"no question of {questions} has an answer in {annotations} "
                         f"({dropped['questions_without_answers']:,} questions): are they of the same split?")
    build = functools.partial(build_vqa, image_dir=image_dir, split=args.split, max_side=args.image_size)
    return run("vqa_v2", records, build, args, prefix=f"vqa-{args.split}", skipped_before=dropped)


if __name__ == "__main__":
    cli(main)
