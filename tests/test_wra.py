"""WRA by optimal transport: our IPOT against POT's exact ot.emd2 (the oracle)."""

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


def test_gradient_is_the_envelope_gradient_of_the_exact_cost():
    # d(OT)/dC is the optimal plan, so our gradient should approach POT's exact one.
    txt, img, _, _ = make_problem(batch=2, m=5, n=7, dim=8, seed=4)
    txt64 = txt.double().requires_grad_()
    emd_distance_pot(txt64, img.double()).sum().backward()
    txt32 = txt.clone().requires_grad_()
    ot_distance(txt32, img, iterations=200).sum().backward()
    # Tolerance 0.1% of the gradient's norm (measured 1e-4 at 200 iterations; the uniform plan's
    # gradient is 83% off, so the check has teeth).
    assert (txt32.grad.double() - txt64.grad).norm() < 1e-3 * txt64.grad.norm()


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


def test_ipot_underflow_is_an_error_not_nan():
    cost = torch.tensor([[[0.0, 500.0], [500.0, 900.0]]])      # exp(-900 / 0.5) = 0 in fp32
    with pytest.raises(ValueError, match="beta"):
        ipot(cost, beta=0.5)
    plan = ipot(cost / 1000, beta=0.5, iterations=200)         # rescaled: fine
    # diagonal costs (0 + 0.9) / 2 = 0.45 < anti-diagonal (0.5 + 0.5) / 2: the plan is diagonal
    torch.testing.assert_close(plan, torch.tensor([[[0.5, 0.0], [0.0, 0.5]]]), atol=1e-3, rtol=0)
