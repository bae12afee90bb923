"""Fine-grained evaluation on ShapeWorld: what a caption-level score hides (ERNIE-ViL, notebook 16).

A retrieval R@1 or a VQA accuracy can be high for a model that knows *which* objects are in the image
and not *how* they look or *where* they are. Two measures look closer:

- **VQA accuracy per question type** (``exist``, ``count``, ``color``, ``shape``, ``relation``:
  ``course_lib.data.language.QUESTION_TYPES``), each beside its own chance level, the accuracy of always
  giving that type's most frequent training answer (:func:`accuracy_by_type`, :func:`chance_by_type`);
- **near-miss retrieval**: each validation image with its own caption and with a *near miss*, the same
  caption with one scene-graph node changed so that it is false of the image: an **object** (the shape
  word), an **attribute** (a colour, size or count word) or a **relation** (``"left of"`` ->
  ``"above"``) (:func:`near_miss`, built on the caption's parsed scene graph,
  ``course_lib.data.scene_graph``, and checked false by ``caption_is_true``). Scored by the model's match
  score (its ITM head): the share of pairs where the own caption scores higher, per kind; chance 0.5
  (:func:`near_miss_ranking`). The ARO benchmark (Yuksekgonul et al. 2023) asks the same of real models.

:func:`shapeworld_fine_grained_tasks` builds the data (scene-graph annotated pretraining batches
included) and :func:`fine_grained_scores` fine-tunes copies of a pretrained model with one budget and
returns every number.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from course_lib.data.language import NUMBER_WORDS, QUESTION_TYPES
from course_lib.data.scene_graph import parse_scene_graph
from course_lib.evaluate.caption_truth import caption_is_true
from course_lib.evaluate.fused import VQAFineTuner, fused_retrieval
from course_lib.evaluate.region_tasks import FinetuneBudget, _finetune, itm_finetune_loss
from course_lib.utils import check_shape

NEAR_MISS_KINDS = ("object", "attribute", "relation")


# --------------------------------------------------------------------------- VQA per question type


def accuracy_by_type(logits: torch.Tensor, answers: torch.Tensor, question_types: torch.Tensor) -> dict[str, float]:
    """``logits (N, A)``, ``answers (N,)``, ``question_types (N,)`` (indices of ``QUESTION_TYPES``) ->
    ``{type: accuracy}`` for every type present, and ``"all"``."""
    check_shape("logits", logits, (None, None))
    check_shape("answers", answers, (logits.shape[0],))
    check_shape("question_types", question_types, (logits.shape[0],))
    if logits.shape[0] == 0:
        raise ValueError("logits is empty: no question to score")
    right = (logits.argmax(1) == answers).float()
    out = {t: right[question_types == k].mean().item() for k, t in enumerate(QUESTION_TYPES)
           if (question_types == k).any()}
    out["all"] = right.mean().item()
    return out


def chance_by_type(train: dict, val: dict) -> dict[str, float]:
    """Per question type, the validation accuracy of always giving that type's most frequent training
    answer (and ``"all"``: one most frequent answer overall); ``train``/``val`` have ``answers`` and
    ``question_types`` (``ShapeWorldRegions.questions``)."""
    out = {}
    for k, t in enumerate(QUESTION_TYPES):
        seen, asked = train["question_types"] == k, val["question_types"] == k
        if asked.any():
            if not seen.any():
                raise ValueError(f"question type {t!r} is in val but not in train: no majority answer")
            majority = train["answers"][seen].mode().values
            out[t] = (val["answers"][asked] == majority).float().mean().item()
    out["all"] = (val["answers"] == train["answers"].mode().values).float().mean().item()
    return out


# --------------------------------------------------------------------------- near misses


def _replacements(kind: str, word: str, config) -> list[str]:
    if kind == "object":
        return [s for s in config.shapes if s != word]
    if word in config.colors:
        return [c for c in config.colors if c != word]
    if word in config.sizes:
        return [s for s in config.sizes if s != word]
    return [n for n in NUMBER_WORDS[1:config.max_objects + 1] if n != word]


def near_miss(scene, caption: str, kind: str, rng: np.random.Generator) -> str | None:
    """``caption`` (true of ``scene``) with one node of kind ``kind`` (``NEAR_MISS_KINDS``) replaced by
    another word of its kind, so that the caption is false of the scene; None when no replacement of that
    kind makes it false (a caption with no relation has no relation near miss).

    The near miss stays in the grammar (a count caption's noun keeps its plural, ``"a"``/``"an"`` follows
    the new word, a count that would break the agreement, "one objects", is not offered); relations are
    replaced by another of ShapeWorld's six.
    """
    from course_lib.data.language import article
    from course_lib.data.shapeworld import RELATIONS

    if kind not in NEAR_MISS_KINDS:
        raise ValueError(f"kind={kind!r} is not valid; expected one of {list(NEAR_MISS_KINDS)}")
    graph = parse_scene_graph(caption)
    if kind == "relation":
        spans = [(r.predicate, [p for p in RELATIONS if p != r.predicate.text]) for r in graph.relations]
    elif kind == "object":  # a count caption's noun may be plural ("circles"): the new one is too
        spans = [(o.span, [w + o.span.text[len(o.name):] for w in _replacements("object", o.name, scene.config)])
                 for o in graph.objects if o.name != "object"]
    else:
        spans = [(a, _replacements("attribute", a.text, scene.config)) for o in graph.objects for a in o.attributes]
    candidates = []
    for span, words in spans:
        for word in words:
            text = _fix_article(caption[:span.start] + word + caption[span.end:], span.start, article)
            if parse_scene_graph(text, strict=False).template != "none" and not caption_is_true(text, scene):
                candidates.append(text)  # still a caption of the grammar ("one objects" is not), and false
    if not candidates:
        return None
    return candidates[int(rng.integers(len(candidates)))]


def _fix_article(text: str, start: int, article) -> str:
    """Make the article before the word at ``start`` agree with it ("a" / "an")."""
    before = text[:start].rstrip()
    for old in ("an", "a"):
        if before.endswith(" " + old) or before == old:
            cut = len(before) - len(old)
            word = text[start:].split(" ")[0]
            return text[:cut] + article(word) + text[cut + len(old):]
    return text


@dataclass
class FineGrainedData:
    """Region batches for pretraining and the fine-grained evaluation."""

    pretrain: dict  # training scenes with one caption each (list, relation or count) and sg_roles / sg_nodes
    retrieval: dict  # validation scenes with their captions (image i with caption i)
    qa_train: dict  # ShapeWorldRegions.questions (answers, question_types)
    qa_val: dict
    near_own: dict  # validation images with their own caption, one row per near miss
    near_miss: dict  # the same images with the near misses
    near_kinds: torch.Tensor  # (N,) index of NEAR_MISS_KINDS
    num_answers: int


def shapeworld_fine_grained_tasks(world, tokenizer, context_length: int = 20, max_regions: int = 4,
                                  train_scenes: int = 3000, val_scenes: int = 300, qa_scenes: int = 1000,
                                  retrieval_pairs: int = 100, seed: int = 0) -> FineGrainedData:
    """The pools: ``train_scenes`` training scenes, each with its one drawn caption and scene-graph
    annotations; retrieval over the first ``retrieval_pairs`` validation scenes; questions of
    ``qa_scenes`` training and ``val_scenes`` validation scenes; for every validation scene's caption,
    one near miss of each kind it allows (drawn with ``seed``)."""
    from course_lib.data.language import answer_vocabulary
    from course_lib.data.regions import ShapeWorldRegions
    from course_lib.data.scene_graph import ShapeWorldSceneGraphs
    from course_lib.evaluate.region_tasks import rows

    for name, value in (("train_scenes", train_scenes), ("val_scenes", val_scenes), ("qa_scenes", qa_scenes),
                        ("retrieval_pairs", retrieval_pairs)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 2:
            raise ValueError(f"{name} must be an int >= 2, got {value!r}")
    if retrieval_pairs > val_scenes:
        raise ValueError(f"retrieval_pairs ({retrieval_pairs}) must be <= val_scenes ({val_scenes})")

    def source(split):
        return ShapeWorldRegions(world, tokenizer, context_length, max_regions=max_regions, split=split)

    train, val = source("train"), source("val")
    val_batch = ShapeWorldSceneGraphs(val)(range(val_scenes))
    scenes = world.scenes(range(val_scenes), "val")
    captions = val.captions(scenes)
    rng = np.random.default_rng(seed)
    image_rows, texts, kinds = [], [], []
    for i, (scene, caption) in enumerate(zip(scenes, captions)):
        for k, kind in enumerate(NEAR_MISS_KINDS):
            text = near_miss(scene, caption, kind, rng)
            if text is not None:
                image_rows.append(i)
                texts.append(text)
                kinds.append(k)
    if not texts:
        raise ValueError("no validation caption allows a near miss")
    image_rows = torch.tensor(image_rows)
    own = rows(val_batch, image_rows)
    near = dict(own)
    near.update(val.text(texts))
    for key in ("token_box", "sg_roles", "sg_nodes"):
        near.pop(key, None)
        own.pop(key, None)
    return FineGrainedData(pretrain=ShapeWorldSceneGraphs(train)(range(train_scenes)),
                           retrieval=rows(val_batch, torch.arange(retrieval_pairs)),
                           qa_train=train.questions(range(qa_scenes)), qa_val=val.questions(range(val_scenes)),
                           near_own=own, near_miss=near, near_kinds=torch.tensor(kinds),
                           num_answers=len(answer_vocabulary(world.config)))


@torch.no_grad()
def near_miss_ranking(model: nn.Module, own: dict, near: dict, kinds: torch.Tensor) -> dict[str, float]:
    """Per near-miss kind (and ``"all"``), the share of rows where ``model.match_scores`` ranks the
    image's own caption (``own``) above its near miss (``near``); a tie counts half. Chance 0.5."""
    if not hasattr(model, "match_scores"):
        raise ValueError(f"model {type(model).__name__} has no match_scores(batch): near-miss ranking needs an ITM head")
    check_shape("kinds", kinds, (own["input_ids"].shape[0],))
    if near["input_ids"].shape[0] != own["input_ids"].shape[0]:
        raise ValueError(f"own has {own['input_ids'].shape[0]} rows but near has {near['input_ids'].shape[0]}")
    was_training = model.training
    model.eval()
    wins = torch.cat([(model.match_scores(_chunk(own, i)) - model.match_scores(_chunk(near, i))).sign()
                      for i in range(0, len(kinds), 256)])
    model.train(was_training)
    share = (wins + 1) / 2  # 1 win, 0.5 tie, 0 loss
    out = {kind: share[kinds == k].mean().item() for k, kind in enumerate(NEAR_MISS_KINDS) if (kinds == k).any()}
    out["all"] = share.mean().item()
    return out


def _chunk(batch: dict, start: int, size: int = 256) -> dict:
    return {k: v[start:start + size] for k, v in batch.items() if torch.is_tensor(v)}


def fine_grained_scores(model: nn.Module, data: FineGrainedData, budget: FinetuneBudget = FinetuneBudget(),
                        seed: int = 0, device=None) -> dict[str, float]:
    """Every fine-grained number of ``model`` (unchanged; each task tunes a copy, as
    ``region_tasks.downstream_scores``): ``"VQA <type>"`` and ``"VQA all"`` after VQA fine-tuning,
    ``"near miss <kind>"`` / ``"near miss all"`` and ``"retrieval R@1"`` after ITM fine-tuning."""
    torch.manual_seed(seed)
    tuner = VQAFineTuner(copy.deepcopy(model), data.num_answers)
    _finetune(tuner, data.qa_train, budget.vqa_steps, budget, seed + 7, device)
    tuner.eval()
    with torch.no_grad():
        logits = tuner.logits(data.qa_val)
    scores = {f"VQA {t}": v for t, v in accuracy_by_type(logits, data.qa_val["answers"],
                                                           data.qa_val["question_types"]).items()}
    tuned = copy.deepcopy(model)
    _finetune(tuned, data.pretrain, budget.retrieval_steps, budget, seed + 11, device, loss_fn=itm_finetune_loss)
    tuned.eval()
    scores.update({f"near miss {k}": v for k, v in near_miss_ranking(tuned, data.near_own, data.near_miss,
                                                                       data.near_kinds).items()})
    recall = fused_retrieval(tuned, data.retrieval, (1,))
    scores["retrieval R@1"] = (recall["i2t_R@1"] + recall["t2i_R@1"]) / 2
    return scores


def fine_grained_chance(data: FineGrainedData) -> dict[str, float]:
    """The chance level of every number :func:`fine_grained_scores` gives."""
    from course_lib.evaluate.retrieval import chance_recall_at_k

    out = {f"VQA {t}": v for t, v in chance_by_type(data.qa_train, data.qa_val).items()}
    out.update({f"near miss {kind}": 0.5 for k, kind in enumerate(NEAR_MISS_KINDS) if (data.near_kinds == k).any()})
    out["near miss all"] = 0.5
    out["retrieval R@1"] = chance_recall_at_k(torch.arange(len(data.retrieval["input_ids"])), (1,))["i2t_R@1"]
    return out
