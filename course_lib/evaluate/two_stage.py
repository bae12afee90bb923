"""Two-stage retrieval (ALBEF, BLIP: ``Retrieval.py: evaluation``): a cheap similarity picks the
candidates, an expensive matcher re-ranks them.

1. ``similarity (Ni, Nt)``: ITC's dot products of unimodal embeddings (one encoder pass per image
   and per text);
2. for each image its top ``k`` texts by similarity, and for each text its top ``k`` images, are
   re-scored by the fused model's ITM head (``model.match_scores(batch)``; ``2 k N`` fused passes
   instead of the ``N^2`` of :func:`course_lib.evaluate.fused.match_matrix`);
3. Recall@K ranks each query's candidates: the re-scored ones first, by ITM score; the others below
   them, in ITC order (ALBEF fills them with -100, which ties them; keeping ITC's order only matters for
   K > k).

Image->text recall is read from the image rows' matrix, text->image recall from the text rows'
(ALBEF's ``score_matrix_i2t`` and ``score_matrix_t2i``).
"""

from __future__ import annotations

import torch
from torch import nn

from course_lib.evaluate.fused import pair_batch
from course_lib.evaluate.retrieval import recall_at_k
from course_lib.utils import check_shape


def _check_k(k) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an int >= 1 (candidates re-ranked per query), got {k!r}")
    return k


def rerank_top_k(similarity: torch.Tensor, rescore, k: int) -> torch.Tensor:
    """``(Nq, Nc)`` scores: each row's top ``k`` candidates by ``similarity`` get ``rescore(rows, cols)``
    ``-> (n,)`` (all pairs at once), the others ``min(rescored) - 3 + similarity`` (below every
    re-scored one, in similarity order; ``similarity`` is a cosine in [-1, 1])."""
    check_shape("similarity", similarity, (None, None))
    k = min(_check_k(k), similarity.shape[1])
    top = similarity.topk(k, dim=1).indices  # (Nq, k)
    rows = torch.arange(similarity.shape[0], device=similarity.device)[:, None].expand_as(top)
    scores = rescore(rows.flatten(), top.flatten()).float()  # (Nq * k,)
    if scores.shape != (top.numel(),):
        raise ValueError(f"rescore must return one score per pair, shape ({top.numel()},), got {tuple(scores.shape)}")
    out = scores.min() - 3.0 + similarity.float().clamp(-1, 1)
    out[rows.flatten(), top.flatten()] = scores
    return out


@torch.no_grad()
def two_stage_scores(model: nn.Module, batch: dict, k: int, chunk: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """``(i2t (Ni, Nt), t2i (Nt, Ni))`` score matrices of the ``N`` pairs of ``batch`` (row i's caption
    is the positive of row i's image): ITC similarity (``model.similarity``), then the top ``k`` per
    query re-scored by ``model.match_scores``."""
    for name in ("similarity", "match_scores"):
        if not hasattr(model, name):
            raise ValueError(f"model {type(model).__name__} has no {name}(); two-stage retrieval needs ITC "
                             "(similarity) and an ITM head (match_scores)")
    was_training = model.training
    model.eval()
    try:
        sim = model.similarity(batch["images"], batch["input_ids"], batch["attention_mask"])  # (N, N)

        def itm(image_rows, text_rows):
            return torch.cat([model.match_scores(pair_batch(batch, image_rows[i:i + chunk], text_rows[i:i + chunk]))
                              for i in range(0, len(image_rows), chunk)])

        i2t = rerank_top_k(sim, itm, k)
        t2i = rerank_top_k(sim.T, lambda texts, images: itm(images, texts), k)
    finally:
        model.train(was_training)
    return i2t, t2i


def two_stage_retrieval(model: nn.Module, batch: dict, k: int = 16, ks=(1, 5),
                        positives: torch.Tensor | None = None) -> dict[str, float]:
    """Recall@K of ALBEF's two-stage retrieval over the ``N`` pairs of ``batch`` (keys as
    :func:`course_lib.evaluate.retrieval.recall_at_k`: ``i2t_R@K``, ``t2i_R@K``, ``mean_recall``).
    ``positives``: bool ``(N, N)``, image i matches text j (default: the diagonal, row i's own caption)."""
    i2t, t2i = two_stage_scores(model, batch, k)
    n = i2t.shape[0]
    if positives is None:
        positives = torch.eye(n, dtype=torch.bool)
    check_shape("positives", positives, (n, n))
    positives = positives.bool().to(i2t.device)
    out = {key: v for key, v in recall_at_k(i2t, positives, ks).items() if key.startswith("i2t")}
    # t2i's rows are the texts: recall_at_k's "i2t" of that matrix is text -> image recall
    out.update({"t2i" + key[3:]: v for key, v in recall_at_k(t2i, positives.T, ks).items() if key.startswith("i2t")})
    out["mean_recall"] = sum(out.values()) / len(out)
    return out
