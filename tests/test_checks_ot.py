"""Tests of course_lib.checks.ot: a correct exercise passes, each typical mistake fails with a
message that names it. The correct answers are course_lib's own functions or a plain rewrite.

Tolerances are those of the check functions (atol 1e-5)."""

import pytest
import torch
import torch.nn.functional as F

from course_lib.checks.ot import check_cosine_cost, check_ipot_step
from course_lib.checks.verdict import ExerciseError
from course_lib.objectives.wra import cosine_cost

# --------------------------------------------------------------------------- cosine cost


def cosine_cost_rewrite(x, y):
    x = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-5)
    y = y / y.norm(dim=-1, keepdim=True).clamp_min(1e-5)
    return 1 - torch.einsum("bmd,bnd->bmn", x, y)


def test_cosine_cost_accepts_the_library_and_a_rewrite(capsys):
    check_cosine_cost(cosine_cost)
    check_cosine_cost(cosine_cost_rewrite)
    assert capsys.readouterr().out.count("PASS cosine_cost") == 2


def _in_place(x, y):
    x /= x.norm(dim=-1, keepdim=True).clamp_min(1e-5)
    return cosine_cost(x, y)


@pytest.mark.parametrize("wrong, message", [
    (lambda x, y: 1 - cosine_cost(x, y), "cosine similarity"),
    (lambda x, y: 1 - x @ y.transpose(1, 2), "not normalised"),
    (lambda x, y: cosine_cost(y, x), "shape"),
    (lambda x, y: 1 - F.normalize(x, dim=1) @ F.normalize(y, dim=1).transpose(1, 2), "dim=-1"),
    (lambda x, y: 1 - (x / x.norm(dim=-1, keepdim=True)) @ (y / y.norm(dim=-1, keepdim=True)).transpose(1, 2),
     "zero vector gives NaN"),
    (lambda x, y: 2 * cosine_cost(x, y), "differs from the expected"),
    (_in_place, "modified in place"),
    (lambda x, y: cosine_cost(x, y).tolist(), "torch.Tensor"),
])
def test_cosine_cost_names_the_mistake(wrong, message):
    with pytest.raises(ExerciseError, match=message):
        check_cosine_cost(wrong)


# --------------------------------------------------------------------------- IPOT step


def ipot_step(cost, plan, a, x_mask, y_mask, beta):
    xm, ym = x_mask.float(), y_mask.float()
    mu, nu = xm / xm.sum(1, keepdim=True), ym / ym.sum(1, keepdim=True)
    q = torch.exp(-cost / beta) * xm[:, :, None] * ym[:, None, :] * plan
    col = torch.einsum("bm,bmn->bn", a, q)
    b = torch.where(y_mask, nu / torch.where(y_mask, col, 1.0), 0.0)
    row = torch.einsum("bmn,bn->bm", q, b)
    a = torch.where(x_mask, mu / torch.where(x_mask, row, 1.0), 0.0)
    return a[:, :, None] * q * b[:, None, :], a


def test_ipot_step_accepts_a_correct_step(capsys):
    check_ipot_step(ipot_step)
    assert capsys.readouterr().out.startswith("PASS ipot_step")


def _no_padding_guard(cost, plan, a, x_mask, y_mask, beta):
    xm, ym = x_mask.float(), y_mask.float()
    mu, nu = xm / xm.sum(1, keepdim=True), ym / ym.sum(1, keepdim=True)
    q = torch.exp(-cost / beta) * xm[:, :, None] * ym[:, None, :] * plan
    b = nu / torch.einsum("bm,bmn->bn", a, q)
    a = mu / torch.einsum("bmn,bn->bm", q, b)
    return a[:, :, None] * q * b[:, None, :], a


def _columns_last(cost, plan, a, x_mask, y_mask, beta):
    # the right updates in the wrong order: rows first, then columns
    xm, ym = x_mask.float(), y_mask.float()
    mu, nu = xm / xm.sum(1, keepdim=True), ym / ym.sum(1, keepdim=True)
    q = torch.exp(-cost / beta) * xm[:, :, None] * ym[:, None, :] * plan
    b = torch.ones_like(nu) * ym
    a = torch.where(x_mask, mu / torch.where(x_mask, (q * b[:, None, :]).sum(2), 1.0), 0.0)
    b = torch.where(y_mask, nu / torch.where(y_mask, (a[:, :, None] * q).sum(1), 1.0), 0.0)
    return a[:, :, None] * q * b[:, None, :], a


def _kernel_not_masked(cost, plan, a, x_mask, y_mask, beta):
    new_plan, a = ipot_step(cost, plan, a, x_mask, y_mask, beta)
    return new_plan + 1e-3 * ~(x_mask[:, :, None] & y_mask[:, None, :]), a


def _no_proximal_term(cost, plan, a, x_mask, y_mask, beta):
    # plain Sinkhorn: forgets to multiply the kernel by the previous plan
    return ipot_step(cost, torch.ones_like(plan), a, x_mask, y_mask, beta)


@pytest.mark.parametrize("wrong, message", [
    (_no_padding_guard, "0 / 0 = NaN"),
    (_columns_last, "update b first"),
    (_kernel_not_masked, "exactly 0 on padded"),
    (_no_proximal_term, "plain Sinkhorn"),
    (lambda *args: ipot_step(*args)[0], "pair"),
    (lambda cost, plan, a, xm, ym, beta: ipot_step(cost, plan, a, xm, ym, 2 * beta), "differs"),
])
def test_ipot_step_names_the_mistake(wrong, message):
    with pytest.raises(ExerciseError, match=message):
        check_ipot_step(wrong)


def test_checks_reject_non_callables():
    with pytest.raises(ValueError, match="fn"):
        check_cosine_cost(None)
    with pytest.raises(ValueError, match="fn"):
        check_ipot_step(42)
