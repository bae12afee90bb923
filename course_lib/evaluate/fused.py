"""Downstream evaluation of *fused* models (one encoder over both modalities: VisualBERT, UNITER,
ALBEF's fusion...), on region batches (``course_lib.data.regions``) or any batch whose image keys
can be paired with any caption.

- **retrieval** with a fused model has no embeddings to compare: every image is scored with every
  caption by the model's ``match_scores(batch) -> (B,)`` (its ITM head), ``N x N`` forward passes,
  chunked (UNITER's ``itm_eval``);
- **VQA** fine-tunes a :class:`~course_lib.evaluate.vqa.VQAHead` on the model's pooled output
  (``model.encode(batch).pooled``), the question in place of the caption (UNITER, LXMERT).
"""

from __future__ import annotations

import torch
from torch import nn

from course_lib.evaluate.retrieval import recall_at_k
from course_lib.evaluate.vqa import VQAHead, vqa_loss, vqa_soft_accuracy, vqa_soft_targets

TEXT_KEYS = ("input_ids", "attention_mask", "token_box", "index")


def pair_batch(batch: dict, image_rows: torch.Tensor, text_rows: torch.Tensor) -> dict:
    """A batch of pairs (image ``image_rows[k]``, caption ``text_rows[k]``) from the rows of ``batch``.

    A caption's box references (``token_box``, B2T2) keep their region index when the image has
    that region, as for the ITM negatives of pretraining (``region_bert.swap_images``).
    """
    pairs = {k: (v[text_rows] if k in TEXT_KEYS else v[image_rows]) for k, v in batch.items()
             if torch.is_tensor(v)}
    if "token_box" in pairs:
        refs = pairs["token_box"]
        valid = pairs["region_mask"].bool().gather(1, refs.clamp(min=0)) & (refs >= 0)
        pairs["token_box"] = refs.masked_fill(~valid, -1)
    return pairs


@torch.no_grad()
def match_matrix(model: nn.Module, batch: dict, chunk: int = 512) -> torch.Tensor:
    """``(N_images, N_texts)`` scores ``model.match_scores`` of every image of ``batch`` with every caption."""
    if not hasattr(model, "match_scores"):
        raise ValueError(f"model {type(model).__name__} has no match_scores(batch); retrieval by a fused model "
                         "needs an ITM head")
    n = batch["input_ids"].shape[0]
    images, texts = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    images, texts = images.flatten(), texts.flatten()
    was_training = model.training
    model.eval()
    scores = torch.cat([model.match_scores(pair_batch(batch, images[i:i + chunk], texts[i:i + chunk]))
                        for i in range(0, n * n, chunk)])
    model.train(was_training)
    return scores.view(n, n)


def fused_retrieval(model: nn.Module, batch: dict, ks=(1, 5)) -> dict[str, float]:
    """Recall@K of image <-> caption retrieval over the ``N`` pairs of ``batch`` (row i's caption is
    the positive of row i's image)."""
    scores = match_matrix(model, batch)
    return recall_at_k(scores, torch.arange(scores.shape[0]), ks)


class VQAFineTuner(nn.Module):
    """A pretrained fused model + a fresh ``VQAHead`` on its pooled output.

    ``forward(batch)`` with the question as ``input_ids``/``attention_mask`` and ``answers (B,)``
    -> ``{"loss"}`` (``BCE x num_answers``); ``logits(batch) -> (B, A)``.
    """

    def __init__(self, model: nn.Module, num_answers: int, dim: int | None = None):
        super().__init__()
        if not hasattr(model, "encode"):
            raise ValueError(f"model {type(model).__name__} has no encode(batch) giving a pooled output")
        self.model = model
        self.num_answers = num_answers
        self.head = VQAHead(dim or model.config.dim, num_answers)

    def logits(self, batch: dict) -> torch.Tensor:
        return self.head(self.model.encode(batch).pooled)

    def forward(self, batch: dict) -> dict:
        if "answers" not in batch:
            raise ValueError("batch has no 'answers' (B,): the answer class of each question")
        targets = vqa_soft_targets(batch["answers"], self.num_answers).to(batch["answers"].device)
        return {"loss": vqa_loss(self.logits(batch), targets)}

    @torch.no_grad()
    def accuracy(self, batch: dict) -> float:
        """VQA accuracy (single-answer ShapeWorld: exact-match accuracy) on ``batch``."""
        was_training = self.training
        self.eval()
        logits = self.logits(batch)
        self.train(was_training)
        return vqa_soft_accuracy(logits, vqa_soft_targets(batch["answers"], self.num_answers))
