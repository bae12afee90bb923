"""Pixel-BERT random pixel sampling (Huang et al., 2020).

Pixel-BERT feeds CNN grid features to the transformer, but during pretraining it keeps only a
random subset of ``k = 100`` feature-map positions per image: cheaper, and a regulariser (the
model cannot rely on any single cell). At evaluation every position is used. Positions are drawn
without replacement, independently per image; the kept indices come back sorted (raster order)
so they can be drawn on the image. (No official code is public; ViLT's random patch sampling,
``torch.multinomial(torch.ones(v), max_image_len)``, is the closest analogue.)
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from course_lib.utils import check_shape


class SampledPixels(NamedTuple):
    tokens: torch.Tensor  # (B, k, D) at train time, (B, N, D) at eval
    indices: torch.Tensor  # (B, k) or (B, N) long: positions in the h*w raster


class PixelSampler(nn.Module):
    """Grid tokens ``(B, N, D)`` (positions already embedded) -> :class:`SampledPixels`.

    Training mode: ``num_samples`` positions per image, drawn with ``generator`` (pass a seeded
    ``torch.Generator`` for repeatable draws). Eval mode: all ``N`` positions, in order.
    ``sample=True`` / ``False`` overrides the mode (Pixel-BERT samples in its pretraining step only,
    whatever the mode; fine-tuning and evaluation read every position).
    """

    def __init__(self, num_samples: int = 100):
        super().__init__()
        if not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
        self.num_samples = num_samples

    def forward(self, tokens: torch.Tensor, generator: torch.Generator | None = None,
                sample: bool | None = None) -> SampledPixels:
        check_shape("tokens", tokens, (None, None, None))
        B, N, D = tokens.shape
        if not (self.training if sample is None else sample):
            indices = torch.arange(N, device=tokens.device).expand(B, N)  # (B, N)
            return SampledPixels(tokens, indices)
        if self.num_samples > N:
            raise ValueError(
                f"num_samples={self.num_samples} is more than the {N} positions in tokens; "
                "use a larger image or fewer samples"
            )
        noise = torch.rand(B, N, generator=generator, device=generator.device if generator else None)
        indices = noise.argsort(dim=1)[:, : self.num_samples].sort(dim=1).values  # (B, k)
        indices = indices.to(tokens.device)
        picked = tokens.gather(1, indices[:, :, None].expand(B, self.num_samples, D))  # (B, k, D)
        return SampledPixels(picked, indices)
