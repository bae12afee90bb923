"""Scene-graph prediction (ERNIE-ViL: Yu et al., AAAI 2021).

The caption's words are tagged with their scene-graph role (object, attribute, relation);
masking the words of one role forces the model to recover that kind of knowledge from the
image: "a [MASK] circle left of a blue square" can only be completed by looking. ERNIE-ViL
masks 30% of the nodes of each role (``mask_scene_graph_nodes``, with BERT's 80/10/10); its pretraining code is
not public.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from course_lib.features.text import CLS_ID, MASK_ID, PAD_ID, SEP_ID, UNK_ID
from course_lib.utils import check_one_of, check_shape

IGNORE_INDEX = -100
ROLES = {"object": 1, "attribute": 2, "relation": 3}   # 0: a word with no scene-graph role
SPECIAL_IDS = (PAD_ID, UNK_ID, CLS_ID, SEP_ID, MASK_ID)


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


def mask_scene_graph_nodes(token_ids: torch.Tensor, word_roles: torch.Tensor, word_nodes: torch.Tensor,
                           vocab_size: int, *, mask_token_id: int = MASK_ID, special_ids=SPECIAL_IDS,
                           probs: dict[str, float] | float = 0.3, replace_prob: float = 0.8, random_prob: float = 0.1,
                           at_least_one: bool = True, generator: torch.Generator | None = None
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """ERNIE-ViL's scene-graph masking: whole *nodes* chosen at each role's rate, then BERT's 80/10/10.

    token_ids, word_roles (0 none, 1 object, 2 attribute, 3 relation), word_nodes (the node index of
    each token in its caption's graph, -1 for none): ``(B, L)`` -> ``(masked_ids (B, L), labels (B, L))``.

    Every node of a caption is chosen with the probability of its role (``probs``: one rate for all,
    or ``{"object": .., "attribute": .., "relation": ..}``; the paper: 30% of the objects, of the
    object-attribute pairs and of the relations), every token of a chosen node with it (``"left of"``
    is masked whole). ``at_least_one``: a caption with nodes of which none was drawn gets one node,
    drawn uniformly. One draw per chosen node decides its tokens' fate: ``[MASK]`` with probability
    ``replace_prob``, random non-special tokens with ``random_prob``, unchanged otherwise. ``labels``
    holds the original id at the chosen tokens, -100 elsewhere.
    """
    check_shape("token_ids", token_ids, (None, None))
    _check_roles(word_roles, token_ids.shape)
    check_shape("word_nodes", word_nodes, token_ids.shape)
    if isinstance(probs, (int, float)):
        probs = {name: float(probs) for name in ROLES}
    if not isinstance(probs, dict) or set(probs) != set(ROLES) or not all(0.0 <= p <= 1.0 for p in probs.values()):
        raise ValueError(f"probs must be a rate in [0, 1] or a dict of one per role {list(ROLES)}, got {probs!r}")
    if not (0 <= replace_prob and 0 <= random_prob and replace_prob + random_prob <= 1):
        raise ValueError(f"replace_prob and random_prob must be >= 0 with a sum <= 1, got {replace_prob}, {random_prob}")
    nodes = word_nodes.long()
    if ((nodes >= 0) != (word_roles > 0)).any():
        raise ValueError("word_nodes must be >= 0 exactly where word_roles is not 0 (a token of a node has a role)")
    B, device = token_ids.shape[0], token_ids.device
    N = max(int(nodes.max()) + 1, 1)
    on_node = nodes >= 0
    where = nodes.clamp(min=0)
    present = torch.zeros(B, N, device=device).scatter_add_(1, where, on_node.float()) > 0  # (B, N) nodes
    node_role = torch.zeros(B, N, dtype=torch.long, device=device).scatter_reduce_(
        1, where, word_roles.long() * on_node, reduce="amax")  # (B, N)
    rate = torch.tensor([0.0, probs["object"], probs["attribute"], probs["relation"]], device=device)[node_role]
    chosen = (torch.rand(B, N, generator=generator, device=device) < rate) & present  # (B, N)
    if at_least_one:
        scores = torch.rand(B, N, generator=generator, device=device).masked_fill(~present, -1.0)
        empty = present.any(1) & ~chosen.any(1)
        chosen[empty, scores.argmax(1)[empty]] = True
    action = torch.rand(B, N, generator=generator, device=device)  # one per node
    token_chosen = chosen.gather(1, where) & on_node  # (B, L)
    token_action = action.gather(1, where)
    normal = torch.tensor([i for i in range(vocab_size) if i not in set(int(s) for s in special_ids)], device=device)
    random_ids = normal[torch.randint(len(normal), token_ids.shape, generator=generator, device=device)]
    masked = token_ids.masked_fill(token_chosen & (token_action < replace_prob), mask_token_id)
    to_random = token_chosen & (token_action >= replace_prob) & (token_action < replace_prob + random_prob)
    masked = torch.where(to_random, random_ids.to(token_ids.dtype), masked)
    return masked, token_ids.masked_fill(~token_chosen, IGNORE_INDEX)
