"""VQA as classification over a fixed answer set: the fine-tuning head, its loss, its targets and
its metric.

Every system of the course answers a question the same way (UNITER, LXMERT, VisualBERT, Unified VLP,
ViLT): pool the fused sequence into one ``(B, D)`` vector, score all ``A`` answers with
:class:`VQAHead`, train with :func:`vqa_loss` (a sigmoid per answer against soft targets, not a
softmax, because several answers can be right), and report :func:`vqa_soft_accuracy`.

Soft targets: the VQA score of an answer is ``min(1, #annotators who gave it / 3)`` averaged over
the 10 leave-one-out subsets of the 10 annotators: 0, 0.3, 0.6, 0.9, 1.0 for 0, 1, 2, 3, >= 4 of
them. ShapeWorld has one exact answer per question, so its targets are one-hot
(:func:`vqa_soft_targets`); real VQA v2 data gives ``{answer: score}`` per question
(:func:`vqa_soft_targets_from_scores`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from numbers import Real

import torch
import torch.nn.functional as F
from torch import nn

from course_lib.nn import init_weights
from course_lib.utils import check_shape


def _check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


# --------------------------------------------------------------------------- head and loss


class VQAHead(nn.Module):
    """UNITER's ``vqa_output`` / LXMERT's ``logit_fc``: ``Linear(D, rD) -> GELU -> LayerNorm -> Linear(rD, A)``.

    Input: the pooled ``(B, D)`` vector of a fusion model (the [CLS] output, or the product of the
    two [CLS] outputs, ...). Output: ``(B, A)`` logits, one per answer, for :func:`vqa_loss`.
    ``hidden_ratio`` r is 2 in both papers. LayerNorm eps 1e-12 and N(0, 0.02) initialisation are
    BERT's, as both papers use.
    """

    def __init__(self, dim: int, num_answers: int, hidden_ratio: int = 2):
        super().__init__()
        self.dim = _check_positive_int("dim", dim)
        self.num_answers = _check_positive_int("num_answers", num_answers)
        hidden = _check_positive_int("hidden_ratio", hidden_ratio) * dim
        self.net = nn.Sequential(
            nn.Linear(dim, hidden),
            nn.GELU(),
            nn.LayerNorm(hidden, eps=1e-12),
            nn.Linear(hidden, num_answers),
        )
        init_weights(self.net)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        """``pooled (B, D)`` -> answer logits ``(B, A)``."""
        check_shape("pooled", pooled, (None, self.dim))
        return self.net(pooled)


def vqa_loss(logits: torch.Tensor, soft_targets: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy with logits, averaged over all ``B * A`` entries, times ``A``.

    logits: ``(B, A)`` from :class:`VQAHead`. soft_targets: ``(B, A)`` in [0, 1].
    Returns a scalar: the per-question sum over answers, averaged over the batch (UNITER's and
    Unified VLP's ``BCE(reduction="mean") * num_answers``), so its size does not shrink as the
    answer set grows.
    """
    check_shape("logits", logits, (None, None))
    check_shape("soft_targets", soft_targets, tuple(logits.shape))
    if logits.shape[0] == 0:
        raise ValueError("logits is empty (B = 0); the VQA loss is undefined")
    if not logits.is_floating_point():
        raise ValueError(f"logits must be a float tensor, got {logits.dtype}")
    if not ((soft_targets >= 0) & (soft_targets <= 1)).all():
        raise ValueError("soft_targets must lie in [0, 1]")
    targets = soft_targets.to(device=logits.device, dtype=logits.dtype)
    return F.binary_cross_entropy_with_logits(logits, targets) * logits.shape[1]


# --------------------------------------------------------------------------- targets


def vqa_soft_targets(answer_ids: torch.Tensor | Sequence[int], num_answers: int) -> torch.Tensor:
    """One-hot float targets ``(N, A)`` for one exact answer per question (ShapeWorld).

    answer_ids: ``(N,)`` integer answer classes in [0, num_answers), e.g. ``VQADataset``'s
    ``"answer"``. The result lives on ``answer_ids``' device when it is a tensor.
    """
    num_answers = _check_positive_int("num_answers", num_answers)
    ids = answer_ids if isinstance(answer_ids, torch.Tensor) else torch.as_tensor(list(answer_ids))
    if ids.dim() != 1 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise ValueError(
            f"answer_ids must be integer answer classes of shape (N,), got dtype {ids.dtype} "
            f"and shape {tuple(ids.shape)}"
        )
    if ids.numel() and (ids.min() < 0 or ids.max() >= num_answers):
        raise ValueError(
            f"answer_ids must be answer classes in [0, {num_answers}), got values in "
            f"[{int(ids.min())}, {int(ids.max())}]"
        )
    return F.one_hot(ids.long(), num_answers).float()


def vqa_soft_targets_from_scores(
    answer_scores: Sequence[Mapping[int | str, float]],
    answers: int | Sequence[str],
    drop_unknown: bool = False,
) -> torch.Tensor:
    """Soft targets ``(N, A)`` from one ``{answer: VQA score}`` dict per question (VQA v2).

    answers: the answer classes, either their number ``A`` (then the dict keys are class ids in
    [0, A)) or the ``A`` answer strings in class order (then the keys are those strings).
    drop_unknown: an answer outside the classes raises, unless True: then it is left out, as the
    usual top-3129 answer set does with rare answers (the question keeps its other answers, or gets
    all-zero targets). Scores must lie in [0, 1]; answers not in a dict score 0.
    """
    index = _answer_index(answers)
    if isinstance(answer_scores, (str, Mapping)) or not isinstance(answer_scores, Sequence):
        raise ValueError(
            f"answer_scores must be a sequence of {{answer: score}} dicts, one per question, "
            f"got {type(answer_scores).__name__}"
        )
    targets = torch.zeros(len(answer_scores), len(index))
    for row, scores in enumerate(answer_scores):
        if not isinstance(scores, Mapping):
            raise ValueError(f"answer_scores[{row}] must be a {{answer: score}} dict, got {type(scores).__name__}")
        for answer, score in scores.items():
            if isinstance(score, bool) or not (isinstance(score, Real) and 0.0 <= score <= 1.0):
                raise ValueError(f"answer_scores[{row}][{answer!r}] must be a score in [0, 1], got {score!r}")
            if answer in index:
                targets[row, index[answer]] = float(score)
            elif not drop_unknown:
                raise ValueError(
                    f"answer_scores[{row}] has answer {answer!r}, which is not one of the {len(index)} answer "
                    "classes; pass drop_unknown=True to leave such answers out"
                )
    return targets


def _answer_index(answers: int | Sequence[str]) -> dict[int | str, int]:
    """``{key: class id}`` for the dict keys :func:`vqa_soft_targets_from_scores` accepts."""
    if isinstance(answers, int) and not isinstance(answers, bool):
        return {i: i for i in range(_check_positive_int("answers", answers))}
    if isinstance(answers, str) or not isinstance(answers, Sequence) or not answers:
        raise ValueError(
            f"answers must be the number of answer classes or a non-empty sequence of answer strings, "
            f"got {answers!r}"
        )
    if not all(isinstance(a, str) for a in answers) or len(set(answers)) != len(answers):
        raise ValueError("answers must be distinct strings (the answer classes in order)")
    return {a: i for i, a in enumerate(answers)}


# --------------------------------------------------------------------------- metric


def vqa_soft_accuracy(logits: torch.Tensor, soft_targets: torch.Tensor) -> float:
    """VQA accuracy: mean soft score of the arg-max answer.

    logits: ``(N, A)`` answer scores. soft_targets: ``(N, A)`` in [0, 1], the VQA score of every
    answer, min(1, #annotators who gave it / 3) averaged over leave-one-out subsets, i.e.
    0, 0.3, 0.6, 0.9, 1.0 for 0, 1, 2, 3, >=4 of the 10 annotators.
    """
    check_shape("logits", logits, (None, None))
    check_shape("soft_targets", soft_targets, tuple(logits.shape))
    if logits.shape[0] == 0:
        raise ValueError("logits is empty (N = 0); accuracy is undefined")
    if not ((soft_targets >= 0) & (soft_targets <= 1)).all():
        raise ValueError("soft_targets must lie in [0, 1]")
    chosen = logits.argmax(dim=1, keepdim=True)  # (N, 1)
    return soft_targets.to(logits.device).gather(1, chosen).float().mean().item()
