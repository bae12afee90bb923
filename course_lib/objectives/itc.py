"""Image-text contrastive loss (ITC): CLIP's symmetric InfoNCE, open_clip style.

For a batch of B matched pairs with L2-normalised features, the logits are
``s * img @ txt^T`` (B, B) with ``s = exp(logit_scale) = 1 / temperature``; the loss is the
mean of the cross-entropies image->text and text->image with the diagonal as targets
(Radford et al., 2021). Across processes, every rank gathers all features with an
autograd-aware ``all_gather``, so each image is contrasted with the texts of all ranks.

Gradients under ``torch.distributed``: every rank computes the same global loss and the
gather's backward sums the ranks' contributions, so each rank's feature gradient is
``world_size`` times the single-process one; DDP's gradient averaging divides that back out,
so parameter gradients equal the single-process full-batch gradients exactly (also with
``local_loss=True``). A plain gather without gradient would give them divided by world_size.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
import torch.nn.functional as F
from torch import nn

from course_lib.utils import check_shape


def _check_features(image_feats: torch.Tensor, text_feats: torch.Tensor) -> None:
    check_shape("image_feats", image_feats, (None, None))
    check_shape("text_feats", text_feats, (image_feats.shape[0], image_feats.shape[1]))
    if image_feats.shape[0] == 0:
        raise ValueError("image_feats must hold at least one pair")


def _check_enough_pairs(pairs: int) -> None:
    """Refuse a contrastive batch of fewer than 2 pairs (over all processes).

    With one pair, the only candidate for the image is its own caption: the softmax is 1, the
    loss is exactly 0 and its gradient is 0, so a run "trains" at loss 0 and learns nothing.
    """
    if pairs < 2:
        raise ValueError(
            f"a contrastive batch needs at least 2 image-text pairs, got {pairs}: with a single pair "
            "there are no negatives, the loss is exactly 0 and nothing is learned; use a batch "
            "(global_batch) of 2 or more"
        )


def _symmetric_ce(logits_per_image: torch.Tensor, logits_per_text: torch.Tensor,
                  labels: torch.Tensor) -> torch.Tensor:
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


def contrastive_loss(image_feats: torch.Tensor, text_feats: torch.Tensor,
                     logit_scale: float | torch.Tensor) -> torch.Tensor:
    """Single-process symmetric InfoNCE: (B, D), (B, D), scale -> scalar.

    ``logit_scale`` is the multiplier ``1 / temperature`` (already exponentiated, as open_clip's
    model returns it) and must be > 0. Features are L2-normalised here. A single pair gives the
    loss's true value, 0 (there is nothing to contrast; ``course_lib.checks`` grades exactly
    this); the training module :class:`ContrastiveLoss` refuses such a batch instead.
    """
    _check_features(image_feats, text_feats)
    scale = torch.as_tensor(logit_scale)
    if scale.numel() != 1 or not scale.item() > 0:
        raise ValueError(f"logit_scale must be a positive scalar (1 / temperature), got {logit_scale}")
    return _single_process_loss(F.normalize(image_feats, dim=-1), F.normalize(text_feats, dim=-1),
                                logit_scale)


def _single_process_loss(img: torch.Tensor, txt: torch.Tensor, scale) -> torch.Tensor:
    logits = scale * img @ txt.T                                          # (B, B)
    labels = torch.arange(len(img), device=img.device)
    return _symmetric_ce(logits, logits.T, labels)


def _world() -> tuple[int, int]:
    """(rank, world_size) of the default process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_features(image_feats: torch.Tensor, text_feats: torch.Tensor, local_loss: bool = False,
                    gather_with_grad: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate every rank's (B, D) features into (world_size * B, D), rank order.

    ``gather_with_grad`` uses ``torch.distributed.nn.functional.all_gather`` (autograd-aware).
    Otherwise the gather carries no gradient, and unless ``local_loss`` the local slice is put
    back so gradients at least reach this rank's own features (open_clip's recipe).
    All ranks must pass the same B.
    """
    _check_features(image_feats, text_feats)
    rank, world_size = _world()
    if world_size == 1:
        return image_feats, text_feats
    if gather_with_grad:
        return torch.cat(dist_fn.all_gather(image_feats)), torch.cat(dist_fn.all_gather(text_feats))
    all_img = [torch.zeros_like(image_feats) for _ in range(world_size)]
    all_txt = [torch.zeros_like(text_feats) for _ in range(world_size)]
    dist.all_gather(all_img, image_feats.detach())
    dist.all_gather(all_txt, text_feats.detach())
    if not local_loss:
        all_img[rank], all_txt[rank] = image_feats, text_feats
    return torch.cat(all_img), torch.cat(all_txt)


class ContrastiveLoss(nn.Module):
    """CLIP's ITC loss with its temperature: ``forward(image_feats (B, D), text_feats (B, D))``.

    Holds ``logit_scale = log(1 / init_temperature)`` (a parameter when ``learnable``). Call
    ``clamp_()`` after each optimizer step, as CLIP's training loop does, to keep
    ``exp(logit_scale)`` in [1, max_logit_scale]. When ``torch.distributed`` is initialised with
    more than one process, features are gathered across ranks (see the module docstring);
    ``local_loss=True`` scores only the local rows against all columns: O(B * world * B) memory.
    A batch of fewer than 2 pairs over all processes raises ``ValueError``: it has no negatives,
    so its loss is exactly 0 and a training run would learn nothing without noticing.
    """

    def __init__(self, init_temperature: float = 0.07, max_logit_scale: float = 100.0,
                 learnable: bool = True, gather_with_grad: bool = True, local_loss: bool = False):
        super().__init__()
        if not init_temperature > 0:
            raise ValueError(f"init_temperature must be > 0, got {init_temperature}")
        if not max_logit_scale >= 1:
            raise ValueError(f"max_logit_scale must be >= 1, got {max_logit_scale}")
        if not 1 / init_temperature <= max_logit_scale:
            raise ValueError(f"init_temperature={init_temperature} gives a scale above "
                             f"max_logit_scale={max_logit_scale}")
        value = torch.tensor(math.log(1 / init_temperature))
        if learnable:
            self.logit_scale = nn.Parameter(value)
        else:
            self.register_buffer("logit_scale", value)
        self.max_logit_scale = max_logit_scale
        self.gather_with_grad = gather_with_grad
        self.local_loss = local_loss

    @torch.no_grad()
    def clamp_(self) -> None:
        """Clamp ``logit_scale`` in place to [0, log(max_logit_scale)] (CLIP: ln 100 = 4.6052)."""
        self.logit_scale.clamp_(0, math.log(self.max_logit_scale))

    @property
    def temperature(self) -> float:
        return float(torch.exp(-self.logit_scale.detach()))

    def forward(self, image_feats: torch.Tensor, text_feats: torch.Tensor) -> torch.Tensor:
        _check_features(image_feats, text_feats)
        rank, world_size = _world()
        _check_enough_pairs(world_size * image_feats.shape[0])  # every rank holds the same B
        scale = self.logit_scale.exp()
        img, txt = F.normalize(image_feats, dim=-1), F.normalize(text_feats, dim=-1)
        if world_size == 1:
            return _single_process_loss(img, txt, scale)
        all_img, all_txt = gather_features(img, txt, self.local_loss, self.gather_with_grad)
        if self.local_loss:
            logits_per_image = scale * img @ all_txt.T                    # (B, world * B)
            logits_per_text = scale * txt @ all_img.T
            labels = torch.arange(len(img), device=img.device) + rank * len(img)
        else:
            logits_per_image = scale * all_img @ all_txt.T                # (world * B, world * B)
            logits_per_text = logits_per_image.T
            labels = torch.arange(len(all_img), device=img.device)
        return _symmetric_ce(logits_per_image, logits_per_text, labels)
