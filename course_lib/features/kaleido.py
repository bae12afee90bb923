"""Kaleido patches (Kaleido-BERT, Zhuge et al., 2021): the same image cut at several scales.

Level ``l`` splits the image into an ``l x l`` grid; levels 1..5 give 1 + 4 + 9 + 16 + 25 = 55
patches, from the whole image down to small details, so fine-grained (fashion) attributes and the
global look both get a token. Here every patch is encoded by one shared small encoder (the paper
used a CNN per patch); its token also gets a level embedding (which scale) and a learned position
embedding (which cell of that scale).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from course_lib.utils import check_shape


def _check_levels(levels) -> tuple[int, ...]:
    levels = tuple(levels)
    if not levels or any(not isinstance(l, int) or l < 1 for l in levels):
        raise ValueError(f"levels must be a non-empty tuple of positive ints, got {levels!r}")
    return levels


def kaleido_patches(images: torch.Tensor, levels=(1, 2, 3, 4, 5)) -> list[torch.Tensor]:
    """Images ``(B, C, H, W)`` -> one tensor ``(B, l*l, C, H/l, W/l)`` per level, raster order.

    ``H`` and ``W`` must be multiples of every level (60 px for levels 1..5).
    """
    levels = _check_levels(levels)
    check_shape("images", images, (None, None, None, None))
    B, C, H, W = images.shape
    lcm = math.lcm(*levels)
    if H % lcm or W % lcm:
        raise ValueError(f"images height and width must be multiples of {lcm} for levels {levels}, got {H} x {W}")
    out = []
    for l in levels:
        x = images.reshape(B, C, l, H // l, l, W // l)  # (B, C, l, H/l, l, W/l)
        x = x.permute(0, 2, 4, 1, 3, 5)  # (B, l, l, C, H/l, W/l)
        out.append(x.reshape(B, l * l, C, H // l, W // l))  # (B, l*l, C, H/l, W/l)
    return out


class KaleidoEmbedding(nn.Module):
    """Images ``(B, C, H, W)`` -> tokens ``(B, sum(l*l), D)``, level 1 first.

    Each patch is average-pooled to ``patch_resolution x patch_resolution`` pixels and projected
    by one shared linear layer; then ``+ level_embedding[level] + position_embedding[token]`` and
    LayerNorm. ``level_ids`` (buffer, ``(sum(l*l),)``) tells which level each token comes from.
    """

    def __init__(self, dim: int, levels=(1, 2, 3, 4, 5), patch_resolution: int = 8, in_channels: int = 3):
        super().__init__()
        self.levels = _check_levels(levels)
        self.patch_resolution, self.in_channels = patch_resolution, in_channels
        self.proj = nn.Linear(in_channels * patch_resolution**2, dim)
        self.num_tokens = sum(l * l for l in self.levels)
        self.level_embedding = nn.Embedding(len(self.levels), dim)
        self.position_embedding = nn.Embedding(self.num_tokens, dim)
        self.norm = nn.LayerNorm(dim)
        level_ids = [i for i, l in enumerate(self.levels) for _ in range(l * l)]
        self.register_buffer("level_ids", torch.tensor(level_ids), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        check_shape("images", images, (None, self.in_channels, None, None))
        B = images.shape[0]
        r = self.patch_resolution
        tokens = []
        for patches in kaleido_patches(images, self.levels):  # (B, l*l, C, H/l, W/l)
            n = patches.shape[1]
            x = F.adaptive_avg_pool2d(patches.flatten(0, 1), r)  # (B*l*l, C, r, r)
            tokens.append(self.proj(x.reshape(B, n, -1)))  # (B, l*l, D)
        x = torch.cat(tokens, dim=1)  # (B, num_tokens, D)
        x = x + self.level_embedding(self.level_ids) + self.position_embedding.weight
        return self.norm(x)
