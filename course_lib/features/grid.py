"""Grid features (CNN-GF): every cell of a CNN feature map becomes a visual token.

Pixel-BERT, SOHO and "In Defense of Grid Features" (Jiang et al., 2020) drop the detector and
feed the whole ``h x w`` map to the transformer. A cell at row ``r``, column ``c`` gets a
factorised 2-d position embedding ``row[r] + col[c]``:

    token[r, c] = LayerNorm(W f[:, r, c] + row[r] + col[c])
"""

from __future__ import annotations

import torch
from torch import nn

from course_lib.utils import check_shape


class GridFeatures(nn.Module):
    """Images ``(B, 3, H, W)`` -> tokens ``(B, h*w, D)`` in raster order (row by row).

    ``backbone`` maps images to ``(B, C, h, w)`` and has an ``out_channels`` attribute
    (e.g. :class:`~course_lib.features.cnn.SmallCNN`). ``max_grid`` is the size of the row and
    column position tables: maps larger than that are an error.
    """

    def __init__(self, backbone: nn.Module, dim: int, max_grid: int = 32):
        super().__init__()
        if not hasattr(backbone, "out_channels"):
            raise ValueError("backbone must have an out_channels attribute (the C of its (B, C, h, w) map)")
        self.backbone = backbone
        self.proj = nn.Linear(backbone.out_channels, dim)
        self.row_embedding = nn.Embedding(max_grid, dim)
        self.col_embedding = nn.Embedding(max_grid, dim)
        self.norm = nn.LayerNorm(dim)
        self.max_grid = max_grid

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.embed_map(self.backbone(images))

    def embed_map(self, feature_map: torch.Tensor) -> torch.Tensor:
        """Feature map ``(B, C, h, w)`` -> tokens ``(B, h*w, D)``."""
        check_shape("feature_map", feature_map, (None, self.proj.in_features, None, None))
        h, w = feature_map.shape[-2:]
        if h > self.max_grid or w > self.max_grid:
            raise ValueError(
                f"feature_map is {h} x {w} cells but the position tables hold max_grid={self.max_grid} "
                "rows/columns; build GridFeatures with a larger max_grid"
            )
        x = self.proj(feature_map.flatten(2).transpose(1, 2))  # (B, h*w, D)
        rows = self.row_embedding.weight[:h, None, :]  # (h, 1, D)
        cols = self.col_embedding.weight[None, :w, :]  # (1, w, D)
        positions = (rows + cols).reshape(h * w, -1)  # (h*w, D), raster order like x
        return self.norm(x + positions)  # (B, h*w, D)
