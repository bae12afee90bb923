"""Check functions for notebook 07 (optimal transport and word-region alignment).

Each ``check_*`` calls the learner's function on fixed inputs, compares it with
``course_lib.objectives.wra`` and prints ``PASS ...``, or raises
:class:`~course_lib.checks.verdict.ExerciseError` saying what to fix.

- ``check_cosine_cost(fn)``: the batched cosine-distance cost matrix, vs ``wra.cosine_cost``;
- ``check_ipot_step(fn)``: one outer iteration of IPOT on a padded batch, vs ``wra.ipot``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from course_lib.checks.verdict import (
    call_learner, check_callable, expect, expect_close, passed, wrong,
)
from course_lib.objectives.wra import cosine_cost, ipot


def _tensor(check: str, value, what: str, shape: tuple) -> torch.Tensor:
    expect(isinstance(value, torch.Tensor), check, f"{what} should be a torch.Tensor, got {type(value).__name__}")
    expect(tuple(value.shape) == tuple(shape), check, f"{what} has shape {tuple(value.shape)}, expected {tuple(shape)}")
    return value


def _same(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-5) -> bool:
    return tuple(a.shape) == tuple(b.shape) and bool(torch.allclose(a.float(), b.float(), atol=tol, rtol=1e-4))


# --------------------------------------------------------------------------- cosine cost


def check_cosine_cost(fn) -> None:
    """Grade ``fn(x (B, M, D), y (B, N, D)) -> cost (B, M, N)`` with ``cost = 1 - cos(x_i, y_j)``.

    Must match ``course_lib.objectives.wra.cosine_cost`` (atol 1e-5) on a random batch with
    M != N, on the same batch rescaled (the cost ignores lengths), and stay finite when a vector
    is all zeros (padding often is): there its cost is 1.
    """
    check = "cosine_cost"
    check_callable("fn", fn, check)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(2, 5, 8, generator=g) * 3 + 1, torch.randn(2, 3, 8, generator=g)
    original = (x.clone(), y.clone())
    ours = _tensor(check, call_learner(check, fn, x, y), "the cost", (2, 5, 3))
    expect(torch.equal(x, original[0]) and torch.equal(y, original[1]), check,
           "x or y was modified in place; work on copies")
    want = cosine_cost(x, y)
    if not _same(ours, want):
        xn, yn = F.normalize(x, dim=-1), F.normalize(y, dim=-1)
        similarity = xn @ yn.transpose(1, 2)
        expect(not _same(ours, similarity), check,
               "you returned the cosine similarity; the cost is 1 - similarity (similar = cheap to move)")
        expect(not _same(ours, 1 - x @ y.transpose(1, 2)), check,
               "the dot products are not normalised: divide each vector by its L2 norm first")
        expect(not _same(ours, (1 - xn @ yn.transpose(1, 2)).transpose(1, 2)), check,
               "the result is transposed: cost[b, i, j] compares x[b, i] with y[b, j]")
        expect(not _same(ours, 1 - F.normalize(x, dim=1) @ F.normalize(y, dim=1).transpose(1, 2)), check,
               "normalise over the feature dimension (dim=-1), not over the tokens")
    expect_close(ours, want, check, "the cost")
    scaled = _tensor(check, call_learner(check, fn, 10 * x, 0.1 * y), "the cost", (2, 5, 3))
    expect_close(scaled, want, check, "the cost of the rescaled inputs (10 x, 0.1 y)")
    x_zero = x.clone()
    x_zero[1, 4] = 0
    zero = _tensor(check, call_learner(check, fn, x_zero, y), "the cost", (2, 5, 3))
    if not bool(torch.isfinite(zero).all()):
        raise wrong(check, "A zero vector gives NaN: its norm is 0. Clamp the norm "
                           "(F.normalize(v, dim=-1, eps=1e-5) does) so a zero vector costs 1 against everything")
    expect_close(zero, cosine_cost(x_zero, y), check, "the cost with a zero vector in x")
    passed(check, "matches course_lib's cosine_cost, scale-invariant, finite on zero vectors")


# --------------------------------------------------------------------------- IPOT step


def _ipot_case(seed: int):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(3, 6, 16, generator=g), torch.randn(3, 5, 16, generator=g)
    cost = cosine_cost(x, y)
    x_mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 0, 0]], dtype=torch.bool)
    y_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    cost = cost.masked_fill(~(x_mask[:, :, None] & y_mask[:, None, :]), 7.0)  # garbage on padding
    return cost, x_mask, y_mask


def _run(check: str, fn, cost, x_mask, y_mask, beta: float, steps: int):
    plan = torch.ones_like(cost)
    a = x_mask.float() / x_mask.float().sum(1, keepdim=True)
    for step in range(steps):
        out = call_learner(check, fn, cost, plan, a, x_mask, y_mask, beta)
        expect(isinstance(out, (tuple, list)) and len(out) == 2, check,
               f"return the pair (plan, a), got {type(out).__name__}")
        plan, a = out
        _tensor(check, plan, "plan", tuple(cost.shape))
        _tensor(check, a, "a", tuple(x_mask.shape))
        if not bool(torch.isfinite(plan).all()):
            raise wrong(check, f"After step {step + 1} the plan holds NaN or inf. On padding the "
                               "kernel is 0, so Q b and a^T Q are 0 there and 0 / 0 = NaN: divide only where the "
                               "token is real (e.g. add 1 to the denominator on padding, or use torch.where)")
    return plan, a


def check_ipot_step(fn) -> None:
    """Grade ``fn(cost, plan, a, x_mask, y_mask, beta) -> (plan, a)``: one IPOT outer step (k = 1).

    ``cost``, ``plan``: (B, M, N); ``a``: (B, M), the row scaling kept from the previous step
    (start: ``x_mask / x_mask.sum(1)``); masks True on real tokens. Run from ``plan = 1`` it must
    reproduce ``course_lib.objectives.wra.ipot(cost, x_mask, y_mask, beta, iterations=t)`` after
    t = 1 and t = 50 steps (atol 1e-5), with zero mass on padding and exact row sums.
    """
    check = "ipot_step"
    check_callable("fn", fn, check)
    cost, x_mask, y_mask = _ipot_case(0)
    pad = ~(x_mask[:, :, None] & y_mask[:, None, :])
    for steps, beta in ((1, 0.5), (50, 0.5), (20, 0.2)):
        plan, _ = _run(check, fn, cost.clone(), x_mask, y_mask, beta, steps)
        expect(bool((plan[pad] == 0).all()), check,
               f"the plan must be exactly 0 on padded rows and columns, got up to {plan[pad].abs().max().item():.3g} "
               "(zero the kernel exp(-C / beta) there)")
        rows = plan.sum(2)
        want_rows = x_mask.float() / x_mask.float().sum(1, keepdim=True)
        if not _same(rows, want_rows, 1e-5):
            cols = plan.sum(1)
            want_cols = y_mask.float() / y_mask.float().sum(1, keepdim=True)
            expect(not _same(cols, want_cols, 1e-5), check,
                   "the columns sum to b exactly but the rows do not: update b first (from a), then a "
                   "(from the new b), as UNITER does, so the last scaling fixes the rows")
            expect(False, check, f"after {steps} step(s) each real row must carry mass 1/m (m = real words), "
                                 f"got row sums {[[round(v, 3) for v in r] for r in rows.tolist()]}")
        want = ipot(cost, x_mask, y_mask, beta=beta, iterations=steps)
        if steps > 1 and not _same(plan, want):
            # Forgetting the previous plan gives plain Sinkhorn: one outer step, `steps` scalings.
            sinkhorn = ipot(cost, x_mask, y_mask, beta=beta, iterations=1, k=steps)
            expect(not _same(plan, sinkhorn, 1e-4), check,
                   "your plan is plain Sinkhorn's (entropic, biased by beta): multiply the kernel "
                   "exp(-C / beta) by the previous plan (Q = K * T), which makes IPOT converge to exact OT")
        expect_close(plan, want, check, f"the plan after {steps} step(s) with beta={beta}")
    passed(check, "reproduces course_lib's ipot after 1, 20 and 50 steps on a padded batch")
