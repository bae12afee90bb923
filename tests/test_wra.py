"""WRA by optimal transport: our IPOT against POT's exact ot.emd2 (the oracle).

Tolerances, with the measured values they cover (fp32 IPOT, float64 ot.emd2): relative error of
the OT cost 1% for cosine costs at any scale (measured at most 0.2% on these problems); 5% for
costs spanning six decades at 20x36 (measured 2.4%); 0.1% at 1000 iterations (measured 0.01%).
"""

import numpy as np
import ot
import pytest
import torch
from torch import nn

from course_lib.objectives.wra import (cosine_cost, emd_distance_pot, ipot, ot_distance,
                                       sinkhorn_distance_pot, wra_loss)


def make_problem(batch=6, m=9, n=14, dim=32, padded=False, seed=0):
    """Random embeddings; with ``padded``, random lengths (at least 2) and garbage on padding."""
    g = torch.Generator().manual_seed(seed)
    txt, img = torch.randn(batch, m, dim, generator=g), torch.randn(batch, n, dim, generator=g)
    if not padded:
        return txt, img, None, None
    txt_len = torch.randint(2, m + 1, (batch, 1), generator=g)
    img_len = torch.randint(2, n + 1, (batch, 1), generator=g)
    return txt, img, torch.arange(m)[None] < txt_len, torch.arange(n)[None] < img_len


@pytest.mark.parametrize("padded", [False, True])
def test_ipot_within_one_percent_of_exact_emd(padded):
    txt, img, tm, im = make_problem(padded=padded)
    exact = emd_distance_pot(txt, img, tm, im)
    ours = ot_distance(txt, img, tm, im)                       # UNITER defaults: beta 0.5, 50 it, k 1
    # Tolerance: the 1%; UNITER's IPOT lands about 0.2% above the exact cost at 50 it.
    assert ((ours - exact).abs() / exact).max() < 0.01
    assert (ours >= exact - 1e-5).all()                        # no plan beats the optimum


def test_ipot_converges_with_more_iterations():
    txt, img, tm, im = make_problem(padded=True, seed=1)
    exact = emd_distance_pot(txt, img, tm, im)
    ours = ot_distance(txt, img, tm, im, iterations=200)
    assert ((ours - exact).abs() / exact).max() < 1e-3         # 0.1% at 200 iterations (fp32)


def test_plan_marginals_and_padding():
    txt, img, tm, im = make_problem(padded=True, seed=2)
    plan = ipot(cosine_cost(txt, img), tm, im)
    rows, cols = tm.sum(1, keepdim=True), im.sum(1, keepdim=True)
    torch.testing.assert_close(plan.sum(2), tm / rows, atol=1e-6, rtol=0)     # rows: exact
    torch.testing.assert_close(plan.sum(1), im / cols, atol=1e-3, rtol=0)     # columns: approx.
    assert (plan[~(tm[:, :, None] & im[:, None, :])] == 0).all()
    # The padded problem gives the same plan as the problem with the padding cut off.
    i = 0
    sub = ipot(cosine_cost(txt[i:i + 1, tm[i]], img[i:i + 1, im[i]]))
    torch.testing.assert_close(plan[i][tm[i]][:, im[i]], sub[0], atol=1e-6, rtol=1e-5)
    # Padding is ignored, whatever it holds: NaN and inf there give the very same plan.
    cost = cosine_cost(txt, img)
    pad = ~(tm[:, :, None] & im[:, None, :])
    for junk in (float("nan"), float("inf"), -float("inf")):
        assert torch.equal(ipot(cost.masked_fill(pad, junk), tm, im), plan)


def test_gradient_flows_into_both_encoders():
    g = torch.Generator().manual_seed(3)
    text_encoder, image_encoder = nn.Linear(8, 16), nn.Linear(12, 16)
    words, regions = torch.randn(4, 5, 8, generator=g), torch.randn(4, 7, 12, generator=g)
    tm = torch.tensor([[1, 1, 1, 0, 0], [1] * 5, [1, 1, 0, 0, 0], [1] * 5]).bool()
    dist = ot_distance(text_encoder(words), image_encoder(regions), tm, None)
    loss = 0.1 * wra_loss(dist, torch.tensor([1, 0, 1, 0]))
    loss.backward()
    for encoder in (text_encoder, image_encoder):
        grad = encoder.weight.grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


@pytest.mark.parametrize("seed", range(12))
def test_gradient_converges_to_the_exact_plans_gradient(seed):
    # Our gradient is that of <C, T> with the IPOT plan T fixed; POT's is that of the exact cost,
    # i.e. <C, T*> with the exact plan. They agree once T = T* (the envelope theorem), not before.
    txt, img, _, _ = make_problem(batch=2, m=5, n=7, dim=8, seed=seed)
    txt64 = txt.double().requires_grad_()
    emd_distance_pot(txt64, img.double()).sum().backward()

    def gap(iterations):
        txt32 = txt.clone().requires_grad_()
        ot_distance(txt32, img, iterations=iterations).sum().backward()
        return ((txt32.grad.double() - txt64.grad).norm() / txt64.grad.norm()).item()

    # 50 iterations (UNITER): documented 0.4-17% over these 12 seeds; 20% bound. The uniform
    # plan's gradient is 74-94% off on these seeds.
    assert gap(50) < 0.2
    # 2000 iterations: measured at most 2e-5 over the seeds (fp32 plan).
    assert gap(2000) < 1e-4


def test_wra_loss_hand_computed():
    dist = torch.tensor([1.0, 2.0, 3.0, 4.0])
    # matched: 1 and 3, mismatched: 2 and 4 -> (1 + 3 - 2 - 4) / 4 = -0.5
    assert wra_loss(dist, torch.tensor([True, False, True, False])).item() == -0.5
    assert wra_loss(dist, torch.tensor([1, 1, 1, 1])).item() == 2.5


def test_pot_sinkhorn_paths_agree_and_approach_exact():
    txt, img, tm, im = make_problem(padded=True, seed=5)
    exact = emd_distance_pot(txt, img, tm, im)
    batched = sinkhorn_distance_pot(txt, img, tm, im, reg=0.01)
    per_pair = sinkhorn_distance_pot(txt, img, tm, im, reg=0.01, batched=False)
    torch.testing.assert_close(batched, per_pair, atol=1e-4, rtol=0)
    assert ((batched - exact) / exact).max() < 0.01           # entropic bias < 1% at reg 0.01
    assert (batched >= exact - 1e-5).all()


def test_half_precision_inputs_run_in_fp32():
    txt, img, _, _ = make_problem(batch=2, seed=6)
    out = ot_distance(txt.bfloat16(), img.bfloat16())
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ot_distance(txt, img), atol=2e-2, rtol=0)   # bf16 rounding of inputs


def test_bad_inputs():
    txt, img, tm, im = make_problem(padded=True)
    tm[1] = False
    with pytest.raises(ValueError, match="txt_mask"):
        ot_distance(txt, img, tm, im)
    with pytest.raises(ValueError, match="img_mask"):
        emd_distance_pot(txt, img, None, torch.zeros(img.shape[:2], dtype=torch.bool))
    with pytest.raises(ValueError, match="y_mask"):
        ipot(cosine_cost(txt, img), None, torch.zeros(img.shape[:2]))
    with pytest.raises(ValueError, match="img"):
        ot_distance(txt, img[:3])                              # mismatched batch sizes
    with pytest.raises(ValueError, match="beta"):
        ot_distance(txt, img, beta=0)
    with pytest.raises(ValueError, match="reg"):
        sinkhorn_distance_pot(txt, img, reg=0.0)
    with pytest.raises(ValueError, match="is_matched"):
        wra_loss(torch.ones(4), torch.ones(3))
    with pytest.raises(ValueError, match="is_matched"):
        wra_loss(torch.ones(2), torch.tensor([0.5, 1.0]))
    cost = cosine_cost(txt, img)
    for bad in (float("nan"), float("inf"), -1.0):
        with pytest.raises(ValueError, match="beta"):
            ipot(cost, beta=bad)
    for bad in (0.0, -1.0, float("inf"), "max"):
        with pytest.raises(ValueError, match="cost_scale"):
            ipot(cost, cost_scale=bad)
    cost[2, 0, 0] = float("nan")                               # a real entry (no masks: all real)
    with pytest.raises(ValueError, match=r"cost holds NaN or inf .* rows \[2\]"):
        ipot(cost)


SOLVERS = {
    "ipot": ot_distance,
    "emd": emd_distance_pot,
    "sinkhorn batched": sinkhorn_distance_pot,
    "sinkhorn per pair": lambda *args: sinkhorn_distance_pot(*args, batched=False),
}


@pytest.mark.parametrize("solver", SOLVERS.values(), ids=SOLVERS.keys())
def test_every_solver_rejects_non_finite_features_and_ignores_padding(solver):
    txt, img, tm, im = make_problem(batch=3, padded=True, seed=7)
    clean = solver(txt, img, tm, im)
    for junk in (float("nan"), float("inf")):
        # On padding: ignored, the same distances as with the random padding.
        dirty_txt, dirty_img = txt.masked_fill(~tm[:, :, None], junk), img.masked_fill(~im[:, :, None], junk)
        torch.testing.assert_close(solver(dirty_txt, dirty_img, tm, im), clean, atol=0, rtol=0)
        # On a real token: the same ValueError from every solver, naming the input and the pair.
        bad_txt, bad_img = txt.clone(), img.clone()
        bad_txt[1, 0, 3] = junk
        bad_img[2, 1, 0] = -junk
        with pytest.raises(ValueError, match=r"txt holds NaN or inf .* rows \[1\]"):
            solver(bad_txt, img, tm, im)
        with pytest.raises(ValueError, match=r"img holds NaN or inf .* rows \[2\]"):
            solver(txt, bad_img, tm, im)


def exact_costs(cost):
    """ot.emd2 per problem on float64 numpy arrays: (B, M, N) -> (B,) float64."""
    out = []
    for c in cost.double().numpy():
        out.append(ot.emd2(np.full(c.shape[0], 1 / c.shape[0]), np.full(c.shape[1], 1 / c.shape[1]), c))
    return torch.tensor(out)


def relative_errors(cost, plan):
    exact = exact_costs(cost)
    return ((cost.double() * plan.double()).sum(dim=(1, 2)) - exact).abs() / exact


def uniter_ipot(cost, beta=0.5, iterations=50):
    """UNITER's IPOT as published (beta in the cost's units), one unpadded problem, float64."""
    m, n = cost.shape
    mu, nu = torch.full((m,), 1 / m, dtype=cost.dtype), torch.full((n,), 1 / n, dtype=cost.dtype)
    kernel, plan, a = torch.exp(-cost / beta), torch.ones_like(cost), mu.clone()
    for _ in range(iterations):
        q = kernel * plan
        b = nu / (q.T @ a)
        a = mu / (q @ b)
        plan = a[:, None] * q * b[None, :]
    return plan


def test_cosine_costs_keep_uniters_beta():
    # "auto" measures a unit of 1 on cosine costs, so the plans are UNITER's with beta = 0.5.
    for seed, (m, n, dim) in enumerate([(9, 14, 32), (12, 3, 64), (20, 36, 768), (5, 7, 8)]):
        txt, img, _, _ = make_problem(batch=4, m=m, n=n, dim=dim, seed=seed)
        cost = cosine_cost(txt, img)
        ours = ipot(cost)
        for i in range(4):
            torch.testing.assert_close(ours[i], uniter_ipot(cost[i].double()).float(), atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("factor", [1e-6, 1e-4, 1e-2, 1.0, 1e2, 1e3])
def test_accuracy_does_not_depend_on_the_cost_scale(factor):
    txt, img, _, _ = make_problem(batch=8, seed=8)
    cost = cosine_cost(txt, img) * factor
    assert relative_errors(cost, ipot(cost)).max() < 0.01     # measured at most 0.16%
    if factor != 1.0:
        # beta fixed in the cost's units (UNITER's recipe) is the bug this replaces.
        try:
            fixed = relative_errors(cost, ipot(cost, cost_scale=1.0)).max()
        except ValueError:                                     # diverges: large costs
            fixed = float("inf")
        assert fixed > 0.01
    # Powers of two are exact in floating point: the same plan, bit for bit.
    assert torch.equal(ipot(cost * 2.0**-20), ipot(cost))


@pytest.mark.parametrize("low, high", [(-3, 3), (-6, 0)])
def test_costs_spanning_six_decades(low, high):
    g = torch.Generator().manual_seed(9)
    cost = 10 ** (low + (high - low) * torch.rand(8, 20, 36, generator=g))   # log-uniform
    assert relative_errors(cost, ipot(cost)).max() < 0.05      # measured at most 2.4%
    small = 10 ** (low + (high - low) * torch.rand(8, 9, 14, generator=g))
    assert relative_errors(small, ipot(small, iterations=1000)).max() < 1e-3   # measured 7e-5


def test_large_cost_range_does_not_underflow():
    cost = torch.tensor([[[0.0, 500.0], [500.0, 900.0]]])      # exp(-900 / 0.5) = 0 in fp32
    # Rows and columns are reduced to a 0 minimum first, so even beta = 0.5 in the cost's own
    # units solves it. Diagonal costs (0 + 900) / 2 = 450 < anti-diagonal (500 + 500) / 2.
    for cost_scale in ("auto", 1.0):
        torch.testing.assert_close(ipot(cost, cost_scale=cost_scale),
                                   torch.tensor([[[0.5, 0.0], [0.0, 0.5]]]), atol=1e-4, rtol=0)
    # A kernel exp(-C / (beta s)) so sharp that its support admits no plan is an error, not NaN.
    txt, img, _, _ = make_problem()
    with pytest.raises(ValueError, match="diverged.*beta"):
        ipot(1000 * cosine_cost(txt, img), cost_scale=1.0)
