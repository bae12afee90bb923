"""Scene-graph prediction (ERNIE-ViL: Yu et al., AAAI 2021).

The caption's words are tagged with their scene-graph role (object, attribute, relation);
masking the words of one role forces the model to recover that kind of knowledge from the
image: "a [MASK] circle left of a blue square" can only be completed by looking. ERNIE-ViL
masks 30% of the nodes of the selected role; its pretraining code is not public.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from course_lib.utils import check_one_of, check_shape

IGNORE_INDEX = -100
ROLES = {"object": 1, "attribute": 2, "relation": 3}   # 0: a word with no scene-graph role


def _check_roles(word_roles: torch.Tensor, shape) -> None:
    check_shape("word_roles", word_roles, shape)
    if word_roles.is_floating_point() or ((word_roles < 0) | (word_roles > 3)).any():
        raise ValueError("word_roles must be integers in {0 none, 1 object, 2 attribute, 3 relation}")


def scene_graph_mask(token_ids: torch.Tensor, word_roles: torch.Tensor, role: str,
                     generator: torch.Generator | None = None, *, mask_token_id: int,
                     prob: float = 0.3) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask the tokens of one role: (B, L), (B, L) -> (masked_ids (B, L), labels (B, L)).

    Each token with ``word_roles == ROLES[role]`` is replaced by ``mask_token_id`` with
    probability ``prob``; a sample that has such tokens but drew none gets one masked at random.
    ``labels`` holds the original id there and -100 elsewhere; a sample without any token of
    that role is left unmasked (all -100).
    """
    check_shape("token_ids", token_ids, (None, None))
    _check_roles(word_roles, token_ids.shape)
    check_one_of("role", role, ROLES)
    if not 0.0 < prob <= 1.0:
        raise ValueError(f"prob must be in (0, 1], got {prob}")
    candidates = word_roles == ROLES[role]                                      # (B, L)
    draw = torch.rand(token_ids.shape, generator=generator, device=token_ids.device)
    masked = (draw < prob) & candidates
    scores = torch.rand(token_ids.shape, generator=generator, device=token_ids.device)
    fallback = scores.masked_fill(~candidates, -1).argmax(1)                    # (B,)
    needs_one = candidates.any(1) & ~masked.any(1)
    masked[needs_one, fallback[needs_one]] = True
    labels = token_ids.masked_fill(~masked, IGNORE_INDEX)
    return token_ids.masked_fill(masked, mask_token_id), labels


def scene_graph_loss(logits: torch.Tensor, labels: torch.Tensor,
                     word_roles: torch.Tensor) -> dict[str, torch.Tensor]:
    """Cross-entropy per role: (B, L, V), (B, L), (B, L) -> {"object", "attribute", "relation", "total"}.

    Each role's entry is the mean over its masked tokens, or 0 (still attached to the graph)
    when the batch masked none of that role. ``total`` is the mean over all masked tokens.
    """
    check_shape("logits", logits, (None, None, None))
    check_shape("labels", labels, logits.shape[:2])
    _check_roles(word_roles, logits.shape[:2])
    predicted = labels != IGNORE_INDEX
    if not predicted.any():
        raise ValueError("labels has no masked token (all -100)")
    token_losses = F.cross_entropy(logits[predicted], labels[predicted], reduction="none")
    roles = word_roles[predicted]
    losses = {}
    for name, value in ROLES.items():
        chosen = roles == value
        losses[name] = token_losses[chosen].mean() if chosen.any() else token_losses.sum() * 0.0
    losses["total"] = token_losses.mean()
    return losses
