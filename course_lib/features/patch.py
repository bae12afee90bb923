"""Patch features (ViT-PF): cut the image into ``p x p`` patches, project each linearly.

ViT (Dosovitskiy et al., 2021), CLIP, ViLT, ALBEF, BLIP... all start here. ``patchify`` spells the
cut out with reshapes; :class:`PatchEmbedding` does the same with a ``p x p`` convolution of
stride ``p`` (one matrix product per patch), the form every library uses. The two are equal when
the linear layer's weight is the conv kernel flattened in ``(channel, row, column)`` order.
"""

from __future__ import annotations

import torch
from torch import nn

from course_lib.utils import check_shape


def _pair(size) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else tuple(size)


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Images ``(B, C, H, W)`` -> patches ``(B, N, C*p*p)``, ``N = (H/p) * (W/p)`` in raster order.

    Each patch is flattened channel first, then row, then column (the layout of a
    ``Conv2d`` kernel ``(D, C, p, p)``).
    """
    check_shape("images", images, (None, None, None, None))
    B, C, H, W = images.shape
    p = patch_size
    if p < 1 or H % p or W % p:
        raise ValueError(f"images height and width must be multiples of patch_size={p}, got {H} x {W}")
    x = images.reshape(B, C, H // p, p, W // p, p)  # (B, C, gh, p, gw, p)
    x = x.permute(0, 2, 4, 1, 3, 5)  # (B, gh, gw, C, p, p)
    return x.reshape(B, (H // p) * (W // p), C * p * p)  # (B, N, C*p*p)


def unpatchify(patches: torch.Tensor, patch_size: int, image_size) -> torch.Tensor:
    """Inverse of :func:`patchify`: ``(B, N, C*p*p)`` -> images ``(B, C, H, W)``."""
    H, W = _pair(image_size)
    p = patch_size
    if p < 1 or H % p or W % p:
        raise ValueError(f"image_size {H} x {W} must be a multiple of patch_size={p}")
    gh, gw = H // p, W // p
    check_shape("patches", patches, (None, gh * gw, None))
    B, N, F = patches.shape
    if F % (p * p):
        raise ValueError(f"patches last dim must be C*{p}*{p}, got {F}")
    C = F // (p * p)
    x = patches.reshape(B, gh, gw, C, p, p)  # (B, gh, gw, C, p, p)
    x = x.permute(0, 3, 1, 4, 2, 5)  # (B, C, gh, p, gw, p)
    return x.reshape(B, C, H, W)  # (B, C, H, W)


class PatchEmbedding(nn.Module):
    """Images ``(B, C, H, W)`` -> tokens ``(B, 1 + N, D)`` (or ``(B, N, D)`` without ``cls_token``).

    ``patch_embedding(x)`` (a stride-``p`` conv) + learned ``position_embedding``; a learned
    ``class_embedding`` is prepended when ``cls_token``. Parameter names follow Hugging Face's
    ``CLIPVisionEmbeddings``: with ``bias=False`` its ``state_dict`` loads as is.
    """

    def __init__(self, image_size, patch_size: int, dim: int, in_channels: int = 3,
                 cls_token: bool = True, bias: bool = True):
        super().__init__()
        self.image_size = _pair(image_size)
        H, W = self.image_size
        if patch_size < 1 or H % patch_size or W % patch_size:
            raise ValueError(f"image_size {H} x {W} must be a multiple of patch_size={patch_size}")
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.num_patches = (H // patch_size) * (W // patch_size)
        self.patch_embedding = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size, bias=bias)
        self.class_embedding = nn.Parameter(0.02 * torch.randn(dim)) if cls_token else None
        self.num_positions = self.num_patches + int(cls_token)
        self.position_embedding = nn.Embedding(self.num_positions, dim)
        nn.init.normal_(self.position_embedding.weight, std=0.02)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        check_shape("images", images, (None, self.in_channels, *self.image_size))
        x = self.patch_embedding(images)  # (B, D, H/p, W/p)
        x = x.flatten(2).transpose(1, 2)  # (B, N, D)
        if self.class_embedding is not None:
            cls = self.class_embedding.expand(x.shape[0], 1, -1)  # (B, 1, D)
            x = torch.cat([cls, x], dim=1)  # (B, 1 + N, D)
        return x + self.position_embedding.weight  # (B, num_positions, D)
