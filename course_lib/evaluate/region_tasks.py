"""The downstream tasks a pretrained region system is scored on, on ShapeWorld, with one budget for all:
what the UNITER objective ablation (notebook 12, ``benchmarks/uniter_ablation.py``) measures, for any
``RegionBert`` system (an ITM head, ``encode(batch)`` with pooled and per-region outputs).

Each task fine-tunes a *copy* of the pretrained model for the same number of steps (as the paper
fine-tunes every pretrained checkpoint the same way) and scores it on held-out (``val``) scenes:

- **retrieval**: ITM alone (half the pairs given another image of the batch, nothing masked), then
  ``fused_retrieval`` over ``retrieval_pairs`` validation pairs: R@1, mean of both directions;
- **VQA**: ``VQAFineTuner`` (a fresh head on the pooled output) on ShapeWorld's questions: accuracy;
- **grounding**: ``GroundingFineTuner`` (a fresh linear scorer on each region's fused output) on the
  referring phrases of scenes with at least two objects, so that the phrase must pick the object:
  acc@0.5 of the chosen detected box.

:func:`shapeworld_region_tasks` builds the data, :func:`downstream_scores` runs the three, and
:func:`chance_levels` gives what a model without information scores.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from course_lib.evaluate.fused import GroundingFineTuner, VQAFineTuner, fused_retrieval, grounding_chance
from course_lib.evaluate.retrieval import chance_recall_at_k
from course_lib.objectives.itm import itm_loss


@dataclass
class RegionTaskData:
    """Region batches (``course_lib.data.regions``) for pretraining and the three downstream tasks."""

    pretrain: dict  # training scenes with their descriptions
    val: dict  # validation scenes with their descriptions
    retrieval: dict  # the first validation scenes: image i with caption i
    qa_train: dict  # ShapeWorldRegions.questions of training scenes
    qa_val: dict
    ground_train: dict  # ShapeWorldRegions.phrases (scenes with >= 2 objects)
    ground_val: dict
    num_answers: int


def shapeworld_region_tasks(world, tokenizer, context_length: int = 20, max_regions: int = 4,
                            train_scenes: int = 3000, val_scenes: int = 300, qa_scenes: int = 1000,
                            retrieval_pairs: int = 50, grounding_scenes: int = 1000) -> RegionTaskData:
    """The pools: ``train_scenes`` training scenes (descriptions) to pretrain on, ``val_scenes``
    validation scenes, the first ``retrieval_pairs`` of them for retrieval, the questions of ``qa_scenes`` training and
    ``val_scenes`` validation scenes, the phrases of the scenes with two objects or more among
    ``grounding_scenes`` training and ``val_scenes`` validation scenes."""
    from course_lib.data.language import answer_vocabulary
    from course_lib.data.regions import ShapeWorldRegions

    for name, value in (("train_scenes", train_scenes), ("val_scenes", val_scenes), ("qa_scenes", qa_scenes),
                        ("retrieval_pairs", retrieval_pairs), ("grounding_scenes", grounding_scenes)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 2:
            raise ValueError(f"{name} must be an int >= 2, got {value!r}")
    if retrieval_pairs > val_scenes:
        raise ValueError(f"retrieval_pairs ({retrieval_pairs}) must be <= val_scenes ({val_scenes})")

    def source(split):
        return ShapeWorldRegions(world, tokenizer, context_length, max_regions=max_regions, split=split,
                                 caption="description")

    train, val = source("train"), source("val")
    val_pairs = val(range(val_scenes))
    return RegionTaskData(pretrain=train(range(train_scenes)), val=val_pairs,
                          retrieval=rows(val_pairs, torch.arange(retrieval_pairs)),
                          qa_train=train.questions(range(qa_scenes)), qa_val=val.questions(range(val_scenes)),
                          ground_train=train.phrases(range(grounding_scenes), min_objects=2),
                          ground_val=val.phrases(range(val_scenes), min_objects=2),
                          num_answers=len(answer_vocabulary(world.config)))


def rows(data: dict, index) -> dict:
    """The rows ``index`` of every tensor of a batch."""
    return {k: v[index] for k, v in data.items() if torch.is_tensor(v)}


def batch_sampler(data: dict, batch_size: int, seed: int):
    """``step -> batch``: ``batch_size`` random rows of ``data``, the same for the same (seed, step)."""
    n = len(data["input_ids"])
    return lambda step: rows(data, torch.randint(n, (batch_size,), generator=torch.Generator().manual_seed(
        seed * 100_003 + step)))


def itm_finetune_loss(model: nn.Module, batch: dict, itm_prob: float = 0.5) -> dict:
    """ITM alone, for retrieval fine-tuning: a share ``itm_prob`` of the pairs get the regions of another
    image of the batch (at least one pair of each kind), nothing is masked, 2-way cross-entropy on the
    model's ITM head. Works for any model with ``itm_logits(batch)``."""
    from course_lib.models.region_bert import draw_mismatched, swap_images

    B = batch["input_ids"].shape[0]
    if B < 2:
        raise ValueError("ITM fine-tuning needs a batch of at least 2 pairs")
    swapped = draw_mismatched(B, itm_prob, batch["input_ids"].device)
    return {"loss": itm_loss(model.itm_logits(swap_images(batch, swapped)), (~swapped).long())}


@dataclass(frozen=True)
class FinetuneBudget:
    """Fine-tuning steps per task (the whole model, AdamW at ``lr`` after ``warmup_steps``), batch size."""

    retrieval_steps: int = 80
    vqa_steps: int = 300
    grounding_steps: int = 30
    batch_size: int = 64
    lr: float = 2e-3
    warmup_steps: int = 10

    def __post_init__(self):
        for name in ("retrieval_steps", "vqa_steps", "grounding_steps", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")


def _finetune(module: nn.Module, data: dict, steps: int, budget: FinetuneBudget, seed: int, device,
              loss_fn=None) -> None:
    from course_lib.train import TrainConfig, train

    torch.manual_seed(seed)
    train(module, batch_sampler(data, budget.batch_size, seed), TrainConfig(
        steps=steps, lr=budget.lr, warmup_steps=min(budget.warmup_steps, steps), seed=seed,
        progress=False, log_every=0, device=device), loss_fn=loss_fn)
    module.cpu()


def finetune_retrieval(model: nn.Module, data: RegionTaskData, budget: FinetuneBudget = FinetuneBudget(),
                       seed: int = 0, device=None) -> dict[str, float]:
    """Recall@1 and @5 in both directions, and ``"R@1"`` their mean at 1, after ITM fine-tuning of a copy
    of ``model``."""
    tuned = copy.deepcopy(model)
    _finetune(tuned, data.pretrain, budget.retrieval_steps, budget, seed + 11, device, loss_fn=itm_finetune_loss)
    recall = fused_retrieval(tuned.eval(), data.retrieval, (1, 5))
    return {**recall, "R@1": (recall["i2t_R@1"] + recall["t2i_R@1"]) / 2}


def finetune_vqa(model: nn.Module, data: RegionTaskData, budget: FinetuneBudget = FinetuneBudget(),
                 seed: int = 0, device=None) -> float:
    """VQA accuracy on the validation questions after fine-tuning a copy of ``model`` with a fresh head."""
    torch.manual_seed(seed)
    tuner = VQAFineTuner(copy.deepcopy(model), data.num_answers)
    _finetune(tuner, data.qa_train, budget.vqa_steps, budget, seed + 7, device)
    return tuner.accuracy(data.qa_val)


def finetune_grounding(model: nn.Module, data: RegionTaskData, budget: FinetuneBudget = FinetuneBudget(),
                       seed: int = 0, device=None) -> float:
    """Grounding acc@0.5 on the validation phrases after fine-tuning a copy of ``model`` with a fresh
    region scorer."""
    torch.manual_seed(seed)
    tuner = GroundingFineTuner(copy.deepcopy(model))
    _finetune(tuner, data.ground_train, budget.grounding_steps, budget, seed + 13, device)
    return tuner.accuracy(data.ground_val)


def downstream_scores(model: nn.Module, data: RegionTaskData, budget: FinetuneBudget = FinetuneBudget(),
                      seed: int = 0, device=None) -> dict[str, float]:
    """``{"retrieval R@1", "VQA", "grounding"}`` of ``model`` (unchanged; each task tunes a copy)."""
    return {"retrieval R@1": finetune_retrieval(model, data, budget, seed, device)["R@1"],
            "VQA": finetune_vqa(model, data, budget, seed, device),
            "grounding": finetune_grounding(model, data, budget, seed, device)}


def chance_levels(data: RegionTaskData) -> dict[str, float]:
    """What a model without information scores: a random caption (R@1 = 1 / pairs), the most frequent
    training answer, a random detected region."""
    majority = torch.bincount(data.qa_train["answers"], minlength=data.num_answers).argmax()
    return {"retrieval R@1": chance_recall_at_k(torch.arange(len(data.retrieval["input_ids"])), (1,))["i2t_R@1"],
            "VQA": (data.qa_val["answers"] == majority).float().mean().item(),
            "grounding": grounding_chance(data.ground_val)}
