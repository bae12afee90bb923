"""Retrieval Recall@K and its chance level.

Recall@K follows UNITER / ViLT (``itm_eval``, ``compute_irtr_recall``): a query scores a hit when
ANY of its positives is among its top K candidates.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from course_lib.utils import check_shape


def positives_matrix(positives: torch.Tensor, num_images: int | None = None) -> torch.Tensor:
    """Bool ``(Ni, Nt)`` matrix of matching (image, text) pairs.

    ``positives`` is either that matrix already, or a LongTensor ``(Nt,)`` giving each text's image
    index (``num_images`` defaults to its max + 1).
    """
    if not isinstance(positives, torch.Tensor):
        raise ValueError(f"positives must be a torch.Tensor, got {type(positives).__name__}")
    if positives.dtype == torch.bool:
        check_shape("positives", positives, (None, None))
        if num_images is not None and positives.shape[0] != num_images:
            raise ValueError(f"positives has {positives.shape[0]} rows but there are {num_images} images")
        return positives
    if positives.dtype not in (torch.int64, torch.int32) or positives.dim() != 1:
        raise ValueError(
            "positives must be a bool (Ni, Nt) matrix or an integer (Nt,) tensor of image indices, "
            f"got dtype {positives.dtype} and shape {tuple(positives.shape)}"
        )
    if positives.numel() == 0:
        raise ValueError("positives is empty: there must be at least one text")
    num_images = int(positives.max()) + 1 if num_images is None else num_images
    if positives.min() < 0 or positives.max() >= num_images:
        raise ValueError(
            f"positives must hold image indices in [0, {num_images}), got values in "
            f"[{int(positives.min())}, {int(positives.max())}]"
        )
    matrix = torch.zeros(num_images, positives.numel(), dtype=torch.bool, device=positives.device)
    matrix[positives.long(), torch.arange(positives.numel(), device=positives.device)] = True
    return matrix


def _check_ks(ks) -> tuple[int, ...]:
    ks = (ks,) if isinstance(ks, int) else tuple(ks)
    if not ks or not all(isinstance(k, int) and not isinstance(k, bool) and k >= 1 for k in ks):
        raise ValueError(f"ks must be positive ints, got {ks!r}")
    return ks


def _ranks_of_best_positive(scores: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """For each row (query): how many negatives score >= its best positive (0 = ranked first).

    Ties count against the model, so a constant similarity gets recall 0, never a perfect score.
    Rows without any positive get rank -1 (and are left out of the recall).
    """
    best = scores.masked_fill(~positive, float("-inf")).max(dim=1).values  # (Nq,)
    ranks = ((scores >= best[:, None]) & ~positive).sum(dim=1)
    return torch.where(positive.any(dim=1), ranks, torch.full_like(ranks, -1))


def recall_at_k(
    similarity: torch.Tensor, positives: torch.Tensor, ks: Sequence[int] | int = (1, 5, 10)
) -> dict[str, float]:
    """Image->text and text->image Recall@K from a similarity matrix.

    similarity: ``(Ni, Nt)`` scores, higher = more similar.
    positives: bool ``(Ni, Nt)`` (several captions per image, or several matching images per text),
        or a LongTensor ``(Nt,)`` giving each text's image index.
    Returns ``{"i2t_R@1": ..., "t2i_R@1": ..., ..., "mean_recall": ...}`` as fractions in [0, 1];
    ``mean_recall`` is the mean of all of them (UNITER's ``r_mean``). An image with no positive text
    (a distractor) is a candidate for text->image but not an image->text query. K larger than the
    number of candidates counts every query as a hit.
    """
    check_shape("similarity", similarity, (None, None))
    if not similarity.is_floating_point():
        raise ValueError(f"similarity must be a float tensor, got {similarity.dtype}")
    if not torch.isfinite(similarity).all():
        raise ValueError("similarity contains NaN or inf values")
    pos = positives_matrix(positives, num_images=similarity.shape[0]).to(similarity.device)
    if pos.shape != similarity.shape:
        raise ValueError(f"positives has shape {tuple(pos.shape)} but similarity has {tuple(similarity.shape)}")
    ks = _check_ks(ks)
    results: dict[str, float] = {}
    for direction, scores, mask in (("i2t", similarity, pos), ("t2i", similarity.T, pos.T)):
        ranks = _ranks_of_best_positive(scores, mask)
        ranks = ranks[ranks >= 0]
        if ranks.numel() == 0:
            raise ValueError(f"positives has no positive pair at all, so {direction} recall is undefined")
        for k in ks:
            results[f"{direction}_R@{k}"] = (ranks < k).float().mean().item()
    results["mean_recall"] = sum(results.values()) / len(results)
    return results


def chance_recall_at_k(
    positives: torch.Tensor, k: Sequence[int] | int = (1, 5, 10), num_images: int | None = None
) -> dict[str, float]:
    """Expected Recall@K of a uniformly random ranking: the "chance level" line in the notebooks.

    A query with p positives among n candidates misses when its top K are all negatives:
    P(hit) = 1 - C(n - p, K) / C(n, K) = 1 - prod_{j<K} (n - p - j) / (n - j).
    Same keys as :func:`recall_at_k`; queries without a positive are left out, as there.
    """
    pos = positives_matrix(positives, num_images)
    ks = _check_ks(k)
    results: dict[str, float] = {}
    for direction, mask in (("i2t", pos), ("t2i", pos.T)):
        num_pos = mask.sum(dim=1).double()
        num_pos = num_pos[num_pos > 0]
        if num_pos.numel() == 0:
            raise ValueError(f"positives has no positive pair at all, so {direction} recall is undefined")
        n = mask.shape[1]
        for kk in ks:
            j = torch.arange(min(kk, n), dtype=torch.float64)
            p_miss = ((n - num_pos[:, None] - j) / (n - j)).clamp(min=0).prod(dim=1)
            results[f"{direction}_R@{kk}"] = (1 - p_miss).mean().item()
    results["mean_recall"] = sum(results.values()) / len(results)
    return results
