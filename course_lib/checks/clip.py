"""Check functions for notebook 22 (CLIP).

Each ``check_*`` calls the learner's function on fixed inputs, compares it with the library and
prints ``PASS ...``, or raises :class:`~course_lib.checks.verdict.ExerciseError` saying what to fix.

- ``check_prompt_ensemble(fn)``: CLIP's prompt ensemble, ``(C, T, E)`` prompt embeddings -> ``(C, E)``
  class embeddings (normalise each prompt, average over the templates, normalise again), vs
  ``evaluate.zero_shot.zero_shot_weights``'s rule;
- ``check_clamp_logit_scale(fn)``: CLIP's clamp, in place (returning the parameter), of the log scale to ``[0, ln 100]``, vs
  ``objectives.itc.ContrastiveLoss.clamp_``;
- ``check_binding_score(fn)``: the share of images closer to their true caption than to its
  attribute-swapped twin (a tie is no preference), vs ``evaluate.zero_shot.binding_accuracy``'s rule.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from course_lib.checks.verdict import call_learner, check_callable, expect, expect_close, passed
from course_lib.objectives.itc import ContrastiveLoss


def check_prompt_ensemble(fn) -> None:
    """Grade ``fn(prompt_emb (C, T, E))`` -> ``(C, E)``: unit-norm class embeddings, each the normalised
    mean over the T templates of the normalised prompt embeddings."""
    check = "prompt_ensemble"
    check_callable("fn", fn, check)
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(3, 4, 5, generator=g) * torch.tensor([1.0, 10.0, 0.1, 3.0]).view(1, 4, 1)  # unequal norms
    want = F.normalize(F.normalize(emb, dim=-1).mean(1), dim=-1)
    ours = call_learner(check, fn, emb.clone())
    expect(isinstance(ours, torch.Tensor), check, f"return a (C, E) tensor, got {type(ours).__name__}")
    expect(tuple(ours.shape) == (3, 5), check, f"the result should have shape (C, E) = (3, 5), got {tuple(ours.shape)} "
                                               "(average over the templates, dim 1)")
    unnormalised_first = F.normalize(emb.mean(1), dim=-1)
    if torch.allclose(ours, unnormalised_first, atol=1e-5):
        expect(False, check, "you averaged the raw prompt embeddings: a prompt with a larger norm then outweighs the "
                             "others. Normalise each prompt first (CLIP averages unit vectors)")
    expect(torch.allclose(ours.norm(dim=-1), torch.ones(3), atol=1e-4), check,
           "each class embedding should have norm 1: normalise the mean again (a mean of unit vectors is shorter)")
    expect_close(ours, want, check, "the class embeddings")
    passed(check, "normalise each prompt, average over the templates, normalise again")


def check_clamp_logit_scale(fn) -> None:
    """Grade ``fn(logit_scale: nn.Parameter, max_scale: float)`` -> the same parameter, clamped in place
    without autograd to ``[0, ln max_scale]`` (CLIP: max_scale 100, ln 100 = 4.6052)."""
    check = "clamp_logit_scale"
    check_callable("fn", fn, check)
    for start, max_scale in ((math.log(500.0), 100.0), (-1.0, 100.0), (math.log(20.0), 100.0), (3.0, 10.0)):
        param = torch.nn.Parameter(torch.tensor(start))
        reference = ContrastiveLoss(init_temperature=1.0, max_logit_scale=max_scale)
        with torch.no_grad():
            reference.logit_scale.fill_(start)
        reference.clamp_()
        out = call_learner(check, fn, param, max_scale)
        expect(out is param, check, "clamp the parameter in place (``logit_scale.clamp_(...)`` under "
                                    "``torch.no_grad()``) and return it: a new tensor would leave the optimizer's "
                                    "parameter unchanged")
        want = reference.logit_scale.item()
        if start > math.log(max_scale) and param.item() > math.log(max_scale) + 1e-6:
            expect(False, check, f"starting from {start:.4f} (a scale of {math.exp(start):.0f}), the parameter is still "
                                 f"{param.item():.4f}: the parameter is the scale's *log*, so its ceiling is "
                                 f"ln {max_scale} = {math.log(max_scale):.4f}, not {max_scale}")
        expect(abs(param.item() - want) < 1e-6, check,
               f"starting from {start:.4f} with max_scale={max_scale}, the parameter should be {want:.4f}, got "
               f"{param.item():.4f} (the range is [0, ln max_scale])")
    passed(check, "the log scale stays in [0, ln 100]: 1/temperature never exceeds 100")


def check_binding_score(fn) -> None:
    """Grade ``fn(image_emb (N, E), true_emb (N, E), swapped_emb (N, E))`` -> float: the share of rows
    whose image is strictly closer (dot product) to its true caption than to the swapped one."""
    check = "binding_score"
    check_callable("fn", fn, check)
    image = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [1.0, -1.0]]), dim=-1)
    true = F.normalize(torch.tensor([[1.0, 0.1], [1.0, 0.0], [0.0, 1.0], [1.0, -1.0]]), dim=-1)
    swapped = F.normalize(torch.tensor([[0.0, 1.0], [0.0, 1.0], [1.0, 0.0], [1.0, -1.0]]), dim=-1)
    ours = call_learner(check, fn, image.clone(), true.clone(), swapped.clone())
    if isinstance(ours, torch.Tensor):
        expect(ours.numel() == 1, check, f"return one number (a share), got a tensor of shape {tuple(ours.shape)}")
        ours = ours.item()
    expect(isinstance(ours, (int, float)), check, f"return a float, got {type(ours).__name__}")
    want = ((image * true).sum(1) > (image * swapped).sum(1)).float().mean().item()  # 0.25: rows 2, 3 are ties
    if abs(ours - 0.75) < 1e-6:
        expect(False, check, "rows 2 and 3 are ties (both captions score the same): a tie is no preference for the "
                             "true caption; count strictly greater only")
    if abs(ours - 0.375) < 1e-6:
        expect(False, check, "you compared every image with every caption: compare each image with its own two "
                             "captions, row by row ((image * true).sum(1))")
    expect(abs(ours - want) < 1e-6, check, f"expected {want:.2f} (only row 0 prefers its true caption), got {ours:.2f}")
    passed(check, "the share of images that prefer their true caption to the swapped one; chance is 0.5")
