"""Check functions for notebooks 05 (masked modelling: ``check_mrc_kl``) and 06 (matching and
contrast: ``check_info_nce``, ``check_hard_negative_weights``), the pretraining objectives.

Each ``check_*`` calls the learner's function on fixed inputs, compares it with
``course_lib.objectives`` and prints ``PASS ...``, or raises
:class:`~course_lib.checks.verdict.ExerciseError` saying what to fix. The usual mistakes are
recognised and named (one direction only, no normalisation, the reverse KL, ...).

- ``check_info_nce(fn)``: CLIP's symmetric InfoNCE, vs ``objectives.itc.contrastive_loss``;
- ``check_hard_negative_weights(fn)``: ALBEF's sampling weights for hard negatives, vs
  ``objectives.itm`` (the weights ``sample_hard_negatives`` draws from);
- ``check_mrc_kl(fn)``: UNITER's masked region classification with soft labels, vs
  ``objectives.mvm.region_class_loss_kl``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from course_lib.checks.verdict import (
    call_learner, check_callable, expect, expect_close, passed, wrong,
)
from course_lib.objectives.itc import contrastive_loss
from course_lib.objectives.itm import _negative_weights
from course_lib.objectives.mvm import region_class_loss_kl


def _scalar(check: str, value, what: str) -> torch.Tensor:
    expect(isinstance(value, torch.Tensor), check, f"{what} should be a torch.Tensor, got {type(value).__name__}")
    expect(value.numel() == 1, check, f"{what} should be one number (a scalar tensor), got shape {tuple(value.shape)}")
    expect(bool(torch.isfinite(value).all()), check, f"{what} is {value.item()}, not a finite number")
    return value.reshape(())


def _same(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-5) -> bool:
    return bool(torch.allclose(a.detach().float(), b.detach().float(), atol=tol, rtol=1e-4))


# --------------------------------------------------------------------------- ITC


def _info_nce_case(seed: int, batch: int = 6, dim: int = 8):
    g = torch.Generator().manual_seed(seed)
    # Not unit length, and with a shared offset, so forgetting to normalise changes the value.
    image = torch.randn(batch, dim, generator=g) * 3 + 1
    text = image + 0.8 * torch.randn(batch, dim, generator=g) * 3
    return image, text


def _info_nce_variants(image, text, scale) -> dict[str, torch.Tensor]:
    """Values of the usual wrong answers, to name the mistake."""
    img, txt = F.normalize(image, dim=-1), F.normalize(text, dim=-1)
    labels = torch.arange(len(img))
    logits = scale * img @ txt.T
    raw = scale * image @ text.T
    return {
        "only the image->text direction (rows); average it with text->image (the columns)":
            F.cross_entropy(logits, labels),
        "only the text->image direction; average it with image->text":
            F.cross_entropy(logits.T, labels),
        "the sum of the two directions; CLIP takes their mean (divide by 2)":
            F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels),
        "no L2 normalisation: divide each feature by its norm before the dot product":
            (F.cross_entropy(raw, labels) + F.cross_entropy(raw.T, labels)) / 2,
        "cosine similarities that are not multiplied by logit_scale (1 / temperature)":
            (F.cross_entropy(img @ txt.T, labels) + F.cross_entropy(txt @ img.T, labels)) / 2,
        "logits divided by logit_scale; logit_scale is already 1 / temperature, so multiply":
            (F.cross_entropy(logits / scale**2, labels) + F.cross_entropy(logits.T / scale**2, labels)) / 2,
    }


def check_info_nce(fn) -> None:
    """Grade ``fn(image_feats (B, D), text_feats (B, D), logit_scale) -> scalar`` (CLIP's ITC loss).

    The value must match ``course_lib.objectives.itc.contrastive_loss`` (atol 1e-5) on three
    batches (features of any length, ``logit_scale`` a float or a tensor), and the gradient with
    respect to both feature matrices must match autograd's gradient of the library loss.
    """
    check = "info_nce"
    check_callable("fn", fn, check)
    for seed, scale in ((0, 1 / 0.07), (1, 5.0), (2, torch.tensor(30.0))):
        image, text = _info_nce_case(seed)
        image.requires_grad_(True)
        text.requires_grad_(True)
        ours = _scalar(check, call_learner(check, fn, image, text, scale), "the loss")
        want = contrastive_loss(image, text, scale)
        if not _same(ours, want):
            for mistake, value in _info_nce_variants(image, text, float(scale)).items():
                expect(not _same(ours, value), check, f"your loss is {ours.item():.4f}, which is {mistake}")
        expect_close(ours, want, check, f"the loss (logit_scale={float(scale):.3g})")
        expect(ours.requires_grad, check, "the loss carries no gradient; do not detach or use .item() inside")
        g_ours = torch.autograd.grad(ours, (image, text))
        g_want = torch.autograd.grad(want, (image, text))
        for name, a, b in zip(("image_feats", "text_feats"), g_ours, g_want):
            expect_close(a, b, check, f"the gradient with respect to {name}")
    image, text = _info_nce_case(3, batch=1)
    one = _scalar(check, call_learner(check, fn, image, text, 10.0), "the loss")
    expect(abs(one.item()) < 1e-5, check,
           f"with a single pair there is nothing to contrast, so the loss must be 0, got {one.item():.4f}")
    passed(check, "matches course_lib's contrastive_loss (values and gradients) on 4 batches")


# --------------------------------------------------------------------------- ITM hard negatives


def _reference_weights(sim: torch.Tensor) -> torch.Tensor:
    eye = torch.eye(len(sim), dtype=torch.bool)
    weights = _negative_weights("sim", sim, eye, eps=0.0)
    return weights / weights.sum(1, keepdim=True)


def check_hard_negative_weights(fn) -> None:
    """Grade ``fn(sim (B, B)) -> weights (B, B)``: ALBEF's probability of drawing each negative.

    Row ``i`` must be ``softmax(sim[i])`` with the positive (the diagonal) set to 0 and the row
    renormalised to sum to 1: what ``course_lib.objectives.itm.sample_hard_negatives`` draws from
    (with ``eps=0``). Checked on three non-symmetric similarity matrices (atol 1e-5).
    """
    check = "hard_negative_weights"
    check_callable("fn", fn, check)
    g = torch.Generator().manual_seed(0)
    cases = [torch.randn(5, 5, generator=g) * 3,
             torch.randn(8, 8, generator=g) * 10 + torch.arange(8.0),      # large logits: softmax must be stable
             torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [4.0, 0.0, 1.0]])]
    for sim in cases:
        original = sim.clone()
        weights = call_learner(check, fn, sim)
        expect(isinstance(weights, torch.Tensor), check,
               f"return the (B, B) weights as a torch.Tensor, got {type(weights).__name__}")
        expect(tuple(weights.shape) == tuple(sim.shape), check,
               f"weights has shape {tuple(weights.shape)}, expected {tuple(sim.shape)}: one row per query")
        expect(torch.equal(sim, original), check, "sim was modified in place; work on a copy")
        expect(bool(torch.isfinite(weights).all()), check,
               "weights has NaN or inf; use F.softmax (it subtracts the row maximum) instead of exp by hand")
        diagonal = weights.diagonal().abs().max().item()
        expect(diagonal == 0, check,
               f"the diagonal must be exactly 0 (the positive pair is never a negative), got up to {diagonal:.3g}")
        want = _reference_weights(sim)
        if not _same(weights, want) and _same(weights, _reference_weights(sim.T).T):
            raise wrong(check, "You took the softmax over each column; row i holds "
                               "query i's candidates, so use softmax(sim, dim=1)")
        sums = weights.sum(1)
        expect(bool(torch.allclose(sums, torch.ones_like(sums), atol=1e-5)), check,
               f"each row must sum to 1 (renormalise after zeroing the diagonal), got row sums "
               f"{[round(v, 3) for v in sums.tolist()]}")
        uniform = (~torch.eye(len(sim), dtype=torch.bool)).float()
        expect(not _same(weights, uniform / uniform.sum(1, keepdim=True)), check,
               "your weights are uniform over the other items: that is a random negative; weight each "
               "candidate by softmax(sim) so that similar (hard) ones are drawn more often")
        expect_close(weights, want, check, "the weights")
    passed(check, "matches the weights sample_hard_negatives draws from, on 3 similarity matrices")


# --------------------------------------------------------------------------- MRC-kl


def _mrc_case(seed: int, batch: int = 3, regions: int = 4, classes: int = 6):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, regions, classes, generator=g) * 2
    probs = torch.softmax(torch.randn(batch, regions, classes, generator=g) * 2, -1)
    # Exact zeros, as a detector's clipped distribution has: 0 * log 0 must count as 0.
    probs[0, 0] = torch.tensor([0.0, 0.7, 0.0, 0.3, 0.0, 0.0])[:classes]
    probs[1, 2] = F.one_hot(torch.tensor(classes - 1), classes).float()
    masked = torch.zeros(batch, regions, dtype=torch.bool)
    masked[0, 0] = masked[1, 2] = masked[2, 1] = masked[2, 3] = True
    return logits, probs, masked


def _mrc_variants(logits, probs, masked) -> dict[str, torch.Tensor]:
    log_q = F.log_softmax(logits, -1)
    q = log_q.exp()
    per_region = F.kl_div(log_q, probs, reduction="none").sum(-1)            # (B, N)
    reverse = (q * (log_q - torch.log(probs.clamp_min(1e-12)))).sum(-1)
    return {
        "averaged over regions AND classes (UNITER's kl_div(...).mean()); sum over the classes, "
        "then average over the masked regions": per_region[masked].mean() / logits.shape[-1],
        "summed over the masked regions; average them": per_region[masked].sum(),
        "averaged over every region, masked or not; only masked regions count": per_region.mean(),
        "the reverse KL(model || detector); the detector's distribution p comes first: "
        "sum_c p_c (log p_c - log q_c)": reverse[masked].mean(),
        "the cross-entropy -sum_c p_c log q_c (KL minus the detector's entropy); add sum_c p_c log p_c":
            -(probs * log_q).sum(-1)[masked].mean(),
        "computed on softmax probabilities instead of log-probabilities; use log_softmax(logits)":
            F.kl_div(q[masked], probs[masked], reduction="batchmean"),
    }


def check_mrc_kl(fn) -> None:
    """Grade ``fn(logits (B, N, C+1), detector_probs (B, N, C+1), masked_positions (B, N) bool) -> scalar``.

    Must equal ``course_lib.objectives.mvm.region_class_loss_kl``: ``KL(p || softmax(logits))``
    summed over classes and averaged over the masked regions, with ``0 log 0 = 0`` (the cases hold
    exact zeros). Values and gradients, atol 1e-5, on two batches.
    """
    check = "mrc_kl"
    check_callable("fn", fn, check)
    for seed in (0, 1):
        logits, probs, masked = _mrc_case(seed)
        logits.requires_grad_(True)
        ours = call_learner(check, fn, logits, probs.clone(), masked.clone())
        expect(isinstance(ours, torch.Tensor), check, f"return a scalar tensor, got {type(ours).__name__}")
        if not bool(torch.isfinite(ours).all()):
            raise wrong(check, f"The loss is {ours.flatten()[0].item()}: the detector gives some "
                               "classes probability exactly 0, and 0 * log 0 must count as 0 (use torch.xlogy(p, p) "
                               "or F.kl_div, which do)")
        ours = _scalar(check, ours, "the loss")
        want = region_class_loss_kl(logits, probs, masked)
        if not _same(ours, want):
            for mistake, value in _mrc_variants(logits, probs, masked).items():
                expect(not _same(ours, value), check, f"your loss is {ours.item():.4f}: {mistake}")
        expect_close(ours, want, check, "the loss")
        expect(ours.requires_grad, check, "the loss carries no gradient; do not detach it")
        g_ours, = torch.autograd.grad(ours, logits)
        g_want, = torch.autograd.grad(want, logits)
        expect_close(g_ours, g_want, check, "the gradient with respect to logits")
        expect(bool((g_ours[~masked] == 0).all()), check, "regions that were not masked must get no gradient")
    logits, probs, masked = _mrc_case(2)
    same = _scalar(check, call_learner(check, fn, torch.log(probs.clamp_min(1e-30)), probs, masked), "the loss")
    expect(abs(same.item()) < 1e-4 and not math.isnan(same.item()), check,
           f"when the model's distribution equals the detector's the KL must be 0, got {same.item():.4g}")
    passed(check, "matches course_lib's region_class_loss_kl (values and gradients), zeros in p handled")
