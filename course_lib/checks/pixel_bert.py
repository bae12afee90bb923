"""Check functions for notebook 21 (Pixel-BERT).

Each ``check_*`` calls the learner's function on fixed inputs, compares it with the library and
prints ``PASS ...``, or raises :class:`~course_lib.checks.verdict.ExerciseError` saying what to fix.

- ``check_sample_pixels(fn)``: random pixel sampling, ``num_samples`` distinct cells per image drawn
  independently, sorted, gathered from the tokens (``features.pixel_sampling.PixelSampler``);
- ``check_layer_flops(fn)``: the forward FLOPs of one transformer layer over ``n`` tokens, against
  PyTorch's FLOP counter on ``course_lib.nn.TransformerLayer`` (what sampling saves).
"""

from __future__ import annotations

import torch

from course_lib.checks.verdict import as_number, call_learner, check_callable, expect, expect_close, passed


def check_sample_pixels(fn) -> None:
    """Grade ``fn(tokens (B, N, D), num_samples k, generator)`` -> ``(picked (B, k, D), indices (B, k) long)``:
    for each image, ``k`` distinct cells drawn uniformly at random with ``generator``, independently per image,
    their indices sorted (raster order), ``picked[b, j] = tokens[b, indices[b, j]]``."""
    check = "sample_pixels"
    check_callable("fn", fn, check)
    B, N, D, k = 64, 16, 3, 5
    tokens = torch.randn(B, N, D, generator=torch.Generator().manual_seed(0))
    out = call_learner(check, fn, tokens.clone(), k, torch.Generator().manual_seed(1))
    expect(isinstance(out, (tuple, list)) and len(out) == 2, check,
           f"return a pair (picked, indices), got {type(out).__name__}")
    picked, indices = out
    expect(isinstance(picked, torch.Tensor) and tuple(picked.shape) == (B, k, D), check,
           f"picked should have shape (B, k, D) = {(B, k, D)}, got {tuple(getattr(picked, 'shape', ()))}")
    expect(isinstance(indices, torch.Tensor) and tuple(indices.shape) == (B, k), check,
           f"indices should have shape (B, k) = {(B, k)}, got {tuple(getattr(indices, 'shape', ()))}")
    expect(not indices.is_floating_point(), check, f"indices should be integer positions, got {indices.dtype}")
    expect(bool(((indices >= 0) & (indices < N)).all()), check, f"indices must lie in [0, N = {N})")
    distinct = torch.tensor([row.unique().numel() == k for row in indices])
    if not distinct.all():
        expect(False, check, f"image {int((~distinct).nonzero()[0])} got the same cell twice: draw without "
                             "replacement (argsort of random noise, or randperm)")
    expect(bool((indices[:, 1:] > indices[:, :-1]).all()), check,
           "indices should be sorted in each row (raster order), so the kept cells can be drawn on the image")
    expect_close(picked, tokens.gather(1, indices.long()[..., None].expand(B, k, D)), check,
                 "picked (the tokens at the drawn indices)")
    expect(len({tuple(row.tolist()) for row in indices}) > B // 2, check,
           "almost every image got the same cells: draw a separate set for each image (noise of shape (B, N))")
    counts = torch.bincount(indices.flatten(), minlength=N).float()
    expect(bool((counts > 0).all()), check, f"cells {(counts == 0).nonzero().flatten().tolist()} were never drawn in "
                                            f"{B} images: every cell should be equally likely")
    again = call_learner(check, fn, tokens.clone(), k, torch.Generator().manual_seed(1))
    expect(torch.equal(again[1], indices), check, "the same generator seed gave other cells: draw with the generator "
                                                  "you are given (torch.rand(..., generator=generator))")
    passed(check, f"{k} distinct cells of {N} per image, drawn independently, sorted and gathered")


def check_layer_flops(fn) -> None:
    """Grade ``fn(n, dim, mlp_ratio)`` -> the forward FLOPs of one transformer layer over ``n`` tokens (one
    sample): the four ``dim x dim`` projections and the two MLP matrices on every token, ``Q K^T`` and the
    attention-weighted sum of ``V`` (2 FLOPs per multiply-add), against ``torch``'s FLOP counter."""
    from course_lib.flops import count_forward_flops
    from course_lib.nn import TransformerLayer

    check = "layer_flops"
    check_callable("fn", fn, check)
    for n, dim, ratio in ((10, 16, 4.0), (37, 32, 2.0), (120, 64, 2.0)):
        torch.manual_seed(0)
        want = count_forward_flops(TransformerLayer(dim, 4, ratio), (torch.randn(1, n, dim),))
        ours = as_number(check, call_learner(check, fn, n, dim, ratio), "the FLOPs")
        linear = 2 * n * (4 + 2 * ratio) * dim * dim
        if abs(ours - linear) < 1e-6 * want:
            expect(False, check, f"n={n}, dim={dim}: {ours:.0f} counts the projections and the MLP only; attention "
                                 f"adds Q K^T and the weighted sum of V, 2 n^2 dim multiply-adds, which grow with n^2")
        if abs(ours - want / 2) < 1e-6 * want:
            expect(False, check, f"n={n}, dim={dim}: {ours:.0f} is half the FLOPs: a multiply-add is 2 FLOPs")
        expect_close(torch.tensor(float(ours)), torch.tensor(float(want)), check,
                     f"FLOPs of a layer with n={n}, dim={dim}, mlp_ratio={ratio}", atol=0.5, rtol=1e-9)
    passed(check, "2 n (4 + 2 r) d^2 for the matrices + 4 n^2 d for attention, as PyTorch counts them")
