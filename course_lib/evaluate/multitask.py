"""12-in-1 (Lu et al., CVPR 2020): one ViLBERT trained on several tasks at once, with a head per task
group and the paper's schedule (recipe: ``vilbert-multi-task`` ``train_tasks.py``, ``vilbert/vilbert.py``;
``reference/RECIPES-2.md`` section 5).

Heads, on the shared ViLBERT (``course_lib.models.vilbert``), reusing the shared evaluation's heads:

==============  ===========================================================  ===========================
task            head and loss                                                score
==============  ===========================================================  ===========================
``retrieval``   the ITM head on the pooled product, half the pairs given      R@1 (``fused_retrieval``),
                another image (``region_tasks.itm_finetune_loss``)            mean of both directions
``vqa``         ``VQAFineTuner``: an MLP on the pooled product, BCE x A       accuracy
``grounding``   ``GroundingFineTuner``: a linear score per region output,     acc@0.5
                cross-entropy over the regions (12-in-1's ``vision_logit``)
``nlvr``        the statement with each image, the two pooled vectors         accuracy
                side by side, ``Linear-GELU-LN-Linear`` -> 2 (12-in-1's NLVR2
                classifier)
==============  ===========================================================  ===========================

**Schedule** (:func:`train_tasks`): every iteration loops over the tasks, each with its own batch,
forward, backward and optimizer step; **dynamic stop-and-go** (:class:`StopAndGo`, 12-in-1's
``MultiTaskStopOnPlateau``): a task whose validation score has not improved by a relative 0.1% for more
than ``patience`` evaluations is *stopped*, trained only every ``gap`` (4) iterations, and goes again when
its score falls 0.5% below its best. One model per task is the same loop with one task.

Deviations: retrieval trains the 2-way ITM head (12-in-1: a 4-way cross-entropy over the true pair, a
random caption, a random image and a hard caption, with ``vil_logit``); no task tokens
(``--task_specific_tokens``); the per-task loss multipliers are 1; no cooldown after a stop.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from course_lib.data.multitask import right_image
from course_lib.evaluate.fused import GroundingFineTuner, VQAFineTuner, fused_retrieval
from course_lib.evaluate.region_tasks import itm_finetune_loss

TASKS = ("retrieval", "vqa", "grounding", "nlvr")


class NLVRHead(nn.Module):
    """12-in-1's NLVR2 classifier: ``[p_left; p_right] (B, 2D)`` -> ``Linear(2D, 2D)``, GELU, LayerNorm,
    ``Linear(2D, 2)`` -> logits ``(B, 2)`` (1 = the statement is true of both images)."""

    def __init__(self, dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2 * dim, 2 * dim), nn.GELU(), nn.LayerNorm(2 * dim), nn.Linear(2 * dim, 2))

    def forward(self, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([left, right], dim=-1))


class MultiTaskModel(nn.Module):
    """A ViLBERT (any model with ``encode``, ``itm_logits``, ``pooled_dim``) and the heads of ``tasks``.

    ``loss(task, batch)`` -> scalar; ``score(task, batch)`` -> the task's metric in [0, 1];
    ``match_scores(batch)`` (retrieval) is the model's. The heads share ``self.model``.
    """

    def __init__(self, model: nn.Module, num_answers: int, tasks: Sequence[str] = TASKS):
        super().__init__()
        unknown = [t for t in tasks if t not in TASKS]
        if unknown or not tasks:
            raise ValueError(f"tasks must be a non-empty subset of {list(TASKS)}, got {list(tasks)}")
        self.tasks = tuple(tasks)
        self.model = model
        self.vqa = VQAFineTuner(model, num_answers) if "vqa" in tasks else None
        self.grounding = GroundingFineTuner(model) if "grounding" in tasks else None
        self.nlvr = NLVRHead(getattr(model, "pooled_dim", model.config.dim)) if "nlvr" in tasks else None

    def _check(self, task: str) -> None:
        if task not in self.tasks:
            raise ValueError(f"task {task!r} has no head here; this model's tasks are {list(self.tasks)}")

    def nlvr_logits(self, batch: dict) -> torch.Tensor:
        """``(B, 2)`` logits of "true of both" for NLVR-like rows (``data.multitask.nlvr_pairs``)."""
        return self.nlvr(self.model.encode(batch).pooled, self.model.encode(right_image(batch)).pooled)

    def loss(self, task: str, batch: dict) -> torch.Tensor:
        self._check(task)
        if task == "retrieval":
            return itm_finetune_loss(self.model, batch)["loss"]
        if task == "vqa":
            return self.vqa(batch)["loss"]
        if task == "grounding":
            return self.grounding(batch)["loss"]
        if "label" not in batch:
            raise ValueError("an NLVR batch needs 'label' (B,): 1 when the statement is true of both images")
        return F.cross_entropy(self.nlvr_logits(batch), batch["label"])

    @torch.no_grad()
    def score(self, task: str, batch: dict) -> float:
        self._check(task)
        was_training = self.training
        self.eval()
        try:
            if task == "retrieval":
                recall = fused_retrieval(self.model, batch, (1,))
                return (recall["i2t_R@1"] + recall["t2i_R@1"]) / 2
            if task == "vqa":
                return self.vqa.accuracy(batch)
            if task == "grounding":
                return self.grounding.accuracy(batch)
            return (self.nlvr_logits(batch).argmax(1) == batch["label"]).float().mean().item()
        finally:
            self.train(was_training)

    def match_scores(self, batch: dict) -> torch.Tensor:
        return self.model.match_scores(batch)


@dataclass
class StopAndGo:
    """12-in-1's dynamic stop-and-go (``MultiTaskStopOnPlateau``, mode max): ``update(task, score)`` after
    each evaluation; ``active(task, iteration)`` says whether the task trains at that iteration."""

    tasks: Sequence[str]
    patience: int = 1
    threshold: float = 0.001  # relative improvement that counts
    continue_threshold: float = 0.005  # relative drop below the best that restarts a stopped task
    gap: int = 4  # a stopped task still trains every gap iterations
    best: dict = field(default_factory=dict)
    bad: dict = field(default_factory=dict)
    stopped: dict = field(default_factory=dict)

    def __post_init__(self):
        for name in ("patience", "gap"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        for t in self.tasks:
            self.best.setdefault(t, float("-inf"))
            self.bad.setdefault(t, 0)
            self.stopped.setdefault(t, False)

    def update(self, task: str, score: float) -> None:
        if score > self.best[task] * (1 + self.threshold) if self.best[task] > 0 else score > self.best[task]:
            self.best[task], self.bad[task] = score, 0
        else:
            self.bad[task] += 1
        if self.stopped[task]:
            if score < self.best[task] * (1 - self.continue_threshold):
                self.stopped[task], self.bad[task] = False, 0
        elif self.bad[task] > self.patience:
            self.stopped[task] = True

    def active(self, task: str, iteration: int) -> bool:
        return not self.stopped[task] or iteration % self.gap == 0


@dataclass(frozen=True)
class MultiTaskBudget:
    """Iterations (each loops over the tasks), batch size, AdamW learning rate after a linear warmup, and
    how often (iterations) the validation scores drive stop-and-go (0: never, every task always trains)."""

    iterations: int = 100
    batch_size: int = 32
    lr: float = 1e-3
    warmup: int = 10
    eval_every: int = 10


def train_tasks(model: MultiTaskModel, train: Mapping[str, dict], val: Mapping[str, dict] | None = None,
                budget: MultiTaskBudget = MultiTaskBudget(), seed: int = 0,
                log: Callable[[int, dict], None] | None = None, stop_and_go: bool | None = None) -> dict:
    """12-in-1's loop (module docstring) over ``model.tasks``; ``train[task]`` / ``val[task]`` are that
    task's rows. ``stop_and_go`` (default: with more than one task) lets the validation scores stop and
    restart tasks; without it they are only recorded. Returns ``{"steps": {task: optimizer steps}, "stopped": {task: evaluations stopped},
    "scores": [(iteration, {task: val score})]}``."""
    from course_lib.evaluate.region_tasks import rows

    missing = [t for t in model.tasks if t not in train]
    if missing:
        raise ValueError(f"train has no rows for the tasks {missing}")
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=budget.lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: min(1.0, (it + 1) / max(budget.warmup, 1)))
    control = StopAndGo(model.tasks)
    stop_and_go = len(model.tasks) > 1 if stop_and_go is None else stop_and_go
    gen = torch.Generator().manual_seed(seed)
    report = {"steps": dict.fromkeys(model.tasks, 0), "stopped": dict.fromkeys(model.tasks, 0), "scores": []}
    model.train()
    for it in range(budget.iterations):
        for task in model.tasks:
            if not control.active(task, it):
                continue
            n = len(train[task]["input_ids"])
            batch = rows(train[task], torch.randint(n, (min(budget.batch_size, n),), generator=gen))
            loss = model.loss(task, batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            report["steps"][task] += 1
        schedule.step()  # once per iteration, as 12-in-1
        if val is not None and budget.eval_every and (it + 1) % budget.eval_every == 0:
            scores = {t: model.score(t, val[t]) for t in model.tasks}
            for t, s in scores.items():
                if stop_and_go:
                    control.update(t, s)
                report["stopped"][t] += int(control.stopped[t])
            report["scores"].append((it + 1, scores))
            if log is not None:
                log(it + 1, scores)
    model.eval()
    return report


def compare_multitask(pretrained: nn.Module, train: Mapping[str, dict], val: Mapping[str, dict],
                      test: Mapping[str, dict], num_answers: int, budget: MultiTaskBudget = MultiTaskBudget(),
                      seed: int = 0, tasks: Sequence[str] = TASKS) -> dict:
    """12-in-1's comparison from one pretrained model: one multi-task model (the loop over ``tasks``,
    stop-and-go) and one model per task (the same loop with that task alone, the same iterations), each a
    copy of ``pretrained``, scored on ``test``. Returns ``{"multi": {task: score}, "single": {task: score},
    "multi_steps": {task: optimizer steps}}``."""
    import copy

    torch.manual_seed(seed)  # the heads' initialisation
    multi = MultiTaskModel(copy.deepcopy(pretrained), num_answers, tasks)
    report = train_tasks(multi, train, val, budget, seed)
    out = {"multi": {t: multi.score(t, test[t]) for t in tasks}, "single": {}, "multi_steps": report["steps"]}
    for task in tasks:
        torch.manual_seed(seed)
        single = MultiTaskModel(copy.deepcopy(pretrained), num_answers, (task,))
        train_tasks(single, train, val, budget, seed)
        out["single"][task] = single.score(task, test[task])
    return out
