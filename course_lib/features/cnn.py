"""A tiny convolutional backbone: images -> a feature map with a known stride.

Grid features (Pixel-BERT, CNN-GF), region features (RoIAlign on the map) and the ShapeWorld
detector all start from this map. Each stage halves the resolution with a stride-2 3x3 conv,
so ``stride = 2 ** len(channels)``: 32 px images with ``channels=(32, 64)`` give an 8 x 8 map.

GroupNorm instead of BatchNorm: the output of one image never depends on the rest of its batch,
and a frozen backbone behaves the same in ``train()`` and ``eval()``.
"""

from __future__ import annotations

import torch
from torch import nn

from course_lib.utils import check_shape


def conv_block(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    """3x3 conv (padding 1) -> GroupNorm -> ReLU."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False),
        nn.GroupNorm(min(8, out_channels), out_channels),
        nn.ReLU(inplace=True),
    )


class SmallCNN(nn.Module):
    """Images ``(B, in_channels, H, W)`` -> feature map ``(B, C, H/stride, W/stride)``.

    Attributes: ``stride`` (pixels per feature-map cell) and ``out_channels`` (C).
    ``blocks_per_stage`` extra stride-1 convs follow each downsampling conv.
    """

    def __init__(self, in_channels: int = 3, channels: tuple[int, ...] = (32, 64), blocks_per_stage: int = 1):
        super().__init__()
        if len(channels) == 0 or any(c < 1 for c in channels):
            raise ValueError(f"channels must be a non-empty tuple of positive ints, got {channels!r}")
        if blocks_per_stage < 0:
            raise ValueError(f"blocks_per_stage must be >= 0, got {blocks_per_stage}")
        layers, previous = [], in_channels
        for c in channels:
            layers.append(conv_block(previous, c, stride=2))
            layers += [conv_block(c, c, stride=1) for _ in range(blocks_per_stage)]
            previous = c
        self.layers = nn.Sequential(*layers)
        self.in_channels = in_channels
        self.out_channels = channels[-1]
        self.stride = 2 ** len(channels)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        check_shape("images", images, (None, self.in_channels, None, None))
        height, width = images.shape[-2:]
        if height % self.stride or width % self.stride:
            raise ValueError(
                f"images height and width must be multiples of the backbone stride {self.stride}, "
                f"got {height} x {width}"
            )
        return self.layers(images)  # (B, C, H/stride, W/stride)
