"""Momentum distillation (ALBEF: Li et al., NeurIPS 2021).

A momentum copy of the model (an exponential moving average of its weights) produces
pseudo-targets that are smoother than one-hot labels; noisy web captions then hurt less.
Its features also fill a queue of recent negatives, so the contrastive loss sees many more
than one batch. ALBEF: momentum 0.995, queue 65,536, alpha 0.4 (ramped up over epoch 0).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from course_lib.utils import check_shape


def momentum_copy(model: nn.Module) -> nn.Module:
    """A frozen deep copy of ``model`` to serve as its momentum encoder."""
    momentum_model = copy.deepcopy(model)
    for param in momentum_model.parameters():
        param.requires_grad_(False)
    return momentum_model


@torch.no_grad()
def momentum_update(model: nn.Module, momentum_model: nn.Module, m: float = 0.995) -> None:
    """In place: ``param_m = m * param_m + (1 - m) * param`` for every parameter pair."""
    if not 0.0 <= m <= 1.0:
        raise ValueError(f"m must be in [0, 1], got {m}")
    params = dict(model.named_parameters())
    params_m = dict(momentum_model.named_parameters())
    if params.keys() != params_m.keys():
        raise ValueError("momentum_model must have the same parameter names as model")
    for name, param in params.items():
        if params_m[name].shape != param.shape:
            raise ValueError(f"momentum_model.{name} has shape {tuple(params_m[name].shape)}, "
                             f"model.{name} has {tuple(param.shape)}")
        params_m[name].mul_(m).add_(param.detach(), alpha=1 - m)


class FeatureQueue(nn.Module):
    """Ring buffer of the last ``size`` feature vectors: ``queue`` is (size, dim).

    Starts as random unit vectors (as ALBEF does); ``dequeue_and_enqueue`` overwrites the oldest
    rows. Under DDP, gather the momentum features from all ranks before enqueuing them.
    """

    def __init__(self, dim: int, size: int, generator: torch.Generator | None = None):
        super().__init__()
        if dim < 1 or size < 1:
            raise ValueError(f"dim and size must be >= 1, got dim={dim}, size={size}")
        self.register_buffer("queue", F.normalize(torch.randn(size, dim, generator=generator), dim=1))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def dequeue_and_enqueue(self, features: torch.Tensor) -> None:
        """Write (n, dim) features over the n oldest rows (n <= size), wrapping around the end."""
        size, dim = self.queue.shape
        check_shape("features", features, (None, dim))
        if not 1 <= len(features) <= size:
            raise ValueError(f"features must hold between 1 and size={size} rows, got {len(features)}")
        rows = (self.ptr + torch.arange(len(features), device=self.queue.device)) % size
        self.queue[rows] = features.detach().to(self.queue.dtype)
        self.ptr.fill_((self.ptr.item() + len(features)) % size)


def distillation_targets(sim_momentum: torch.Tensor, alpha: float,
                         hard_targets: torch.Tensor | None = None) -> torch.Tensor:
    """ALBEF's soft targets: ``alpha * softmax(sim_m) + (1 - alpha) * hard``: (B, K) -> (B, K).

    ``sim_momentum`` are the momentum model's logits (already divided by the temperature) of
    B queries against K >= B keys, the batch's own keys first (then the queue). ``hard_targets``
    defaults to one-hot on the diagonal (query i matches key i).
    """
    check_shape("sim_momentum", sim_momentum, (None, None))
    batch, keys = sim_momentum.shape
    if keys < batch:
        raise ValueError(f"sim_momentum must have at least as many columns as rows, got {(batch, keys)}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if hard_targets is None:
        hard_targets = torch.eye(batch, keys, dtype=sim_momentum.dtype, device=sim_momentum.device)
    check_shape("hard_targets", hard_targets, (batch, keys))
    return alpha * F.softmax(sim_momentum.detach(), dim=1) + (1 - alpha) * hard_targets


def soft_cross_entropy(logits: torch.Tensor, soft_targets: torch.Tensor) -> torch.Tensor:
    """``-sum_k t_k log softmax(logits)_k``, mean over rows: (B, K), (B, K) -> scalar."""
    check_shape("logits", logits, (None, None))
    check_shape("soft_targets", soft_targets, logits.shape)
    sums = soft_targets.sum(1)
    if (soft_targets < 0).any() or not torch.allclose(sums, torch.ones_like(sums), atol=1e-4):
        raise ValueError("soft_targets must be non-negative and each row must sum to 1")
    return -(F.log_softmax(logits, dim=1) * soft_targets).sum(1).mean()
