"""Check functions for notebook 23 (ALBEF).

Each ``check_*`` calls the learner's function on fixed inputs, compares it with the library and
prints ``PASS ...``, or raises :class:`~course_lib.checks.verdict.ExerciseError` saying what to fix.

- ``check_ema(fn)``: the momentum model's update, ``m * param_m + (1 - m) * param`` for each pair
  (``objectives.distill.momentum_update``);
- ``check_soft_targets(fn)``: ITC's targets under momentum distillation, ``alpha * softmax(sim_m) +
  (1 - alpha) * one-hot`` over [batch; queue] (``objectives.distill.distillation_targets``).
"""

from __future__ import annotations

import torch
from torch import nn

from course_lib.checks.verdict import call_learner, check_callable, expect, expect_close, passed
from course_lib.objectives.distill import distillation_targets, momentum_update


def check_ema(fn) -> None:
    """Grade ``fn(params_m: list[Tensor], params: list[Tensor], m: float)`` -> ``list[Tensor]``: the
    momentum parameters after one update, ``m * param_m + (1 - m) * param`` (new tensors or updated in
    place, returned either way)."""
    check = "ema"
    check_callable("fn", fn, check)
    g = torch.Generator().manual_seed(0)
    student, momentum = nn.Linear(3, 2), nn.Linear(3, 2)
    with torch.no_grad():
        for p in list(student.parameters()) + list(momentum.parameters()):
            p.copy_(torch.randn(p.shape, generator=g))
    params = [p.detach().clone() for p in student.parameters()]
    params_m = [p.detach().clone() for p in momentum.parameters()]
    momentum_update(student, momentum, 0.9)
    want = [p.detach() for p in momentum.parameters()]
    ours = call_learner(check, fn, [p.clone() for p in params_m], [p.clone() for p in params], 0.9)
    expect(isinstance(ours, (list, tuple)) and len(ours) == 2, check,
           f"return a list with one tensor per parameter (2 here: weight and bias), got {type(ours).__name__}")
    swapped = [0.9 * p + 0.1 * pm for p, pm in zip(params, params_m)]
    if all(isinstance(o, torch.Tensor) and o.shape == s.shape and torch.allclose(o, s) for o, s in zip(ours, swapped)):
        expect(False, check, "m weighs the momentum model's own parameter (it keeps 99.5% of itself in ALBEF): "
                             "m * param_m + (1 - m) * param, not m * param + (1 - m) * param_m")
    for name, o, w in zip(("weight", "bias"), ours, want):
        expect_close(o, w, check, f"the updated momentum {name}")
    passed(check, "param_m <- m * param_m + (1 - m) * param: the momentum model trails the model by ~1/(1 - m) steps")


def check_soft_targets(fn) -> None:
    """Grade ``fn(sim_m (B, K), alpha)`` -> ``(B, K)``: ``alpha * softmax(sim_m, dim=1) + (1 - alpha) *
    one-hot``, the one-hot on the diagonal (query i's own key is key i; keys B..K-1 are the queue)."""
    check = "soft_targets"
    check_callable("fn", fn, check)
    g = torch.Generator().manual_seed(1)
    sim_m = torch.randn(3, 7, generator=g) * 5
    ours = call_learner(check, fn, sim_m.clone(), 0.4)
    want = distillation_targets(sim_m, 0.4)
    expect(isinstance(ours, torch.Tensor), check, f"return a tensor (B, K), got {type(ours).__name__}")
    expect(tuple(ours.shape) == (3, 7), check, f"the targets have one row per query and one column per key "
                                               f"(3, 7), got {tuple(ours.shape)}")
    if torch.allclose(ours.float(), 0.4 * torch.softmax(sim_m, 0) + 0.6 * torch.eye(3, 7)):
        expect(False, check, "the softmax runs over each query's keys: dim=1 (the row), not dim=0")
    if torch.allclose(ours.float(), 0.6 * torch.softmax(sim_m, 1) + 0.4 * torch.eye(3, 7)):
        expect(False, check, "alpha weighs the momentum model's softmax (0.4 in ALBEF), 1 - alpha the one-hot")
    expect(torch.allclose(ours.float().sum(1), torch.ones(3), atol=1e-5), check,
           "each row of the targets must sum to 1 (a distribution over the keys)")
    expect_close(ours, want, check, "the soft targets")
    passed(check, "alpha * softmax(sim_m) + (1 - alpha) * one-hot: the momentum model's guess softens the labels")
