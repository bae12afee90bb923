"""Video features: per-frame tokens with time embeddings, and VideoBERT's visual words.

Two ways a video becomes a sequence:

- :class:`FrameFeatures`: encode each frame with an image encoder, pool it to a vector, and add a
  learned *temporal* embedding (which frame) - the video analogue of a word's position.
- VideoBERT (Sun et al., 2019) makes video *discrete*, so BERT's MLM applies unchanged: clip
  features are clustered by hierarchical k-means, and each clip becomes the id of its leaf
  cluster, a "visual word". The paper used ``branching=12, depth=4`` -> 12**4 = 20736 words.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from course_lib.utils import check_shape


class FrameFeatures(nn.Module):
    """Videos ``(B, T, C, H, W)`` -> tokens ``(B, T, D)``.

    ``image_encoder`` maps ``(B*T, C, H, W)`` to a map ``(B*T, F, h, w)`` (average-pooled here) or
    a vector ``(B*T, F)``. ``feature_dim`` (F) defaults to ``image_encoder.out_channels``.
    token[t] = LayerNorm(W pooled(frame_t) + time[t]); more than ``max_frames`` frames is an error.
    """

    def __init__(self, image_encoder: nn.Module, dim: int, max_frames: int, feature_dim: int | None = None):
        super().__init__()
        feature_dim = feature_dim or getattr(image_encoder, "out_channels", None)
        if feature_dim is None:
            raise ValueError("feature_dim is required when image_encoder has no out_channels attribute")
        self.image_encoder = image_encoder
        self.proj = nn.Linear(feature_dim, dim)
        self.temporal_embedding = nn.Embedding(max_frames, dim)
        self.norm = nn.LayerNorm(dim)
        self.max_frames = max_frames

    def forward(self, videos: torch.Tensor) -> torch.Tensor:
        check_shape("videos", videos, (None, None, None, None, None))
        B, T = videos.shape[:2]
        if T > self.max_frames:
            raise ValueError(f"videos has {T} frames but the temporal embedding holds max_frames={self.max_frames}")
        x = self.image_encoder(videos.flatten(0, 1))  # (B*T, F, h, w) or (B*T, F)
        if x.dim() == 4:
            x = x.mean(dim=(2, 3))  # (B*T, F)
        x = self.proj(x.reshape(B, T, -1))  # (B, T, D)
        return self.norm(x + self.temporal_embedding.weight[:T])  # (B, T, D)


def clip_features(frame_features: torch.Tensor, clip_length: int) -> torch.Tensor:
    """Average ``clip_length`` consecutive frames: ``(B, T, F)`` -> ``(B, T / clip_length, F)``."""
    check_shape("frame_features", frame_features, (None, None, None))
    B, T, F = frame_features.shape
    if clip_length < 1 or T % clip_length:
        raise ValueError(f"frame_features has {T} frames, not a multiple of clip_length={clip_length}")
    return frame_features.reshape(B, T // clip_length, clip_length, F).mean(2)  # (B, T/L, F)


def kmeans(points: torch.Tensor, k: int, iterations: int = 20, generator: torch.Generator | None = None) -> torch.Tensor:
    """Lloyd's k-means with k-means++ seeding: ``points (n, D)`` (n >= k) -> centroids ``(k, D)``.

    A cluster that loses all its points keeps its previous centroid.
    """
    n = points.shape[0]
    first = torch.randint(n, (1,), generator=generator)
    centroids = points[first]  # (1, D)
    for _ in range(k - 1):  # k-means++: next seed with probability proportional to squared distance
        d2 = torch.cdist(points, centroids).min(dim=1).values ** 2  # (n,)
        weights = d2 if d2.sum() > 0 else torch.ones_like(d2)  # all points identical: any will do
        pick = torch.multinomial(weights, 1, generator=generator)
        centroids = torch.cat([centroids, points[pick]])  # (i + 1, D)
    for _ in range(iterations):
        labels = torch.cdist(points, centroids).argmin(dim=1)  # (n,)
        sums = torch.zeros_like(centroids).index_add_(0, labels, points)  # (k, D)
        counts = torch.bincount(labels, minlength=k)  # (k,)
        filled = counts > 0
        centroids[filled] = sums[filled] / counts[filled, None]
    return centroids


@dataclass
class HierarchicalCodebook:
    """A tree of centroids: ``centroids[l]`` is ``(branching**(l+1), D)``; node ``i`` at level ``l``
    has children ``i*branching .. i*branching + branching - 1`` at level ``l + 1``. ``valid[l]``
    marks real centroids (a node with fewer points than ``branching`` has fewer children).
    """

    centroids: list[torch.Tensor]
    valid: list[torch.Tensor]
    branching: int
    depth: int

    @property
    def num_words(self) -> int:
        return self.branching**self.depth

    @property
    def leaf_centroids(self) -> torch.Tensor:
        """``(num_words, D)``; rows of unused words are zero (see ``valid[-1]``)."""
        return self.centroids[-1]

    def assign(self, features: torch.Tensor) -> torch.Tensor:
        """Features ``(N, D)`` -> visual word ids ``(N,)`` in ``[0, num_words)``, descending the tree
        greedily (nearest valid child at each level)."""
        check_shape("features", features, (None, self.centroids[0].shape[1]))
        node = torch.zeros(len(features), dtype=torch.long, device=features.device)
        for level in range(self.depth):
            centroids, valid = self.centroids[level].to(features.device), self.valid[level].to(features.device)
            node = descend(features.to(centroids.dtype), node, centroids, valid, self.branching)
        return node


def descend(features: torch.Tensor, node: torch.Tensor, centroids: torch.Tensor, valid: torch.Tensor,
            branching: int, chunk: int = 8192) -> torch.Tensor:
    """Move each point from its ``node (N,)`` to the nearest valid child -> child ids ``(N,)``."""
    out = []
    for x, parent in zip(features.split(chunk), node.split(chunk)):
        children = parent[:, None] * branching + torch.arange(branching, device=x.device)  # (n, b)
        d2 = ((x[:, None, :] - centroids[children]) ** 2).sum(-1)  # (n, b)
        d2 = d2.masked_fill(~valid[children], float("inf"))
        out.append(children.gather(1, d2.argmin(dim=1, keepdim=True))[:, 0])  # (n,)
    return torch.cat(out)


def hierarchical_kmeans(features: torch.Tensor, branching: int = 12, depth: int = 4, iterations: int = 20,
                        generator: torch.Generator | None = None) -> HierarchicalCodebook:
    """VideoBERT's visual vocabulary: k-means with ``k = branching`` on all features, then again
    inside every cluster, ``depth`` levels deep. ``features``: ``(N, D)`` clip features; the
    clustering runs on the CPU in float32 (``generator`` must be a CPU generator)."""
    check_shape("features", features, (None, None))
    if len(features) == 0 or not torch.isfinite(features).all():
        raise ValueError("features must be a non-empty (N, D) tensor of finite values")
    if branching < 2 or depth < 1 or iterations < 1:
        raise ValueError(f"need branching >= 2, depth >= 1, iterations >= 1; got {branching}, {depth}, {iterations}")
    features = features.detach().float().cpu()
    node = torch.zeros(len(features), dtype=torch.long)
    centroids, valid = [], []
    for level in range(depth):
        level_centroids = features.new_zeros(branching ** (level + 1), features.shape[1])
        level_valid = torch.zeros(branching ** (level + 1), dtype=torch.bool)
        order = node.argsort(stable=True)
        counts = torch.bincount(node, minlength=branching**level).tolist()
        for parent, points in enumerate(features[order].split(counts)):
            first, n = parent * branching, len(points)
            if n == 0:
                continue  # an empty node has no children
            if n <= branching:  # too few points to cluster: each point is its own child
                level_centroids[first : first + n] = points
                level_valid[first : first + n] = True
            else:
                level_centroids[first : first + branching] = kmeans(points, branching, iterations, generator)
                level_valid[first : first + branching] = True
        centroids.append(level_centroids)
        valid.append(level_valid)
        node = descend(features, node, level_centroids, level_valid, branching)
    return HierarchicalCodebook(centroids, valid, branching, depth)
