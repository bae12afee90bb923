"""ERNIE-ViL (Yu et al., AAAI 2021, "ERNIE-ViL: Knowledge Enhanced Vision-Language Representations
through Scene Graphs").

ViLBERT's two streams and objectives (``course_lib.models.vilbert``: words and regions joined by
co-attention; MLM, MRC-kl and ITM), with one change, in what the words' masking chooses:
**scene-graph prediction** (SGP). Each caption's scene graph (its objects, their attributes, the
relations between them; ``course_lib.data.scene_graph``, ShapeWorld's grammar standing in for the
paper's SPICE parser) tags every word with its node, and

==================  ==========================================================================
``object``          30% of the object nodes masked ("a red [MASK] is left of a blue square")
``attribute``       30% of the object-attribute pairs: their attribute words masked
``relation``        30% of the relation nodes masked, all their words ("a red circle is
                    [MASK] [MASK] a blue square")
==================  ==========================================================================

(``mask_scene_graph_nodes``: whole nodes, BERT's 80/10/10 per node; a caption with nodes gets at
least one). Each prediction is a cross-entropy over its masked words through the MLM head, from the
image and the rest of the caption. Ordinary random MLM (15%, ViLBERT's ``mask_text``) masks words as
before; a masked word is scored in its role's loss when that role's prediction is on (``"mlm"``
keeps the words with no role), so ``forward(batch)`` returns ``{"loss", "mlm", "object",
"attribute", "relation", "mrckl", "itm"}``.

The paper's ablation is one override per line: ``object_weight=0.0, attribute_weight=0.0,
relation_weight=0.0`` is the same model with plain random MLM (ViLBERT); switching the three on one by
one is its Table 5.

The scene graph travels in the batch: ``sg_roles (B, L)`` and ``sg_nodes (B, L)``
(``course_lib.data.scene_graph.ShapeWorldSceneGraphs`` adds them to a region batch). A batch without
them (real region shards, or ``course_lib.pretrain``'s plain ShapeWorld region batches) falls back to
plain random MLM with a warning, the documented fallback of a parser that found nothing; a caption
outside the grammar has an empty graph and is masked the same way.

Deviations: the paper pretrains from ERNIE 2.0's weights on CC + SBU with a real parser (its
pretraining code is not released; the 30% rates and the 80/10/10 rule are the paper's, not verified
in code); the rest is ViLBERT's deviations.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import ClassVar

import torch

from course_lib.models.vilbert import ViLBERT, ViLBERTConfig
from course_lib.objectives.mlm import IGNORE_INDEX
from course_lib.objectives.scene_graph import ROLES, mask_scene_graph_nodes, scene_graph_loss
from course_lib.utils import check_shape

SGP_TASKS = tuple(ROLES)  # ("object", "attribute", "relation")


@dataclass(frozen=True)
class ErnieViLConfig(ViLBERTConfig):
    object_weight: float = 1.0
    attribute_weight: float = 1.0
    relation_weight: float = 1.0
    object_mask_prob: float = 0.3  # share of the object nodes masked (the paper's 30%)
    attribute_mask_prob: float = 0.3  # share of the object-attribute pairs whose attribute is masked
    relation_mask_prob: float = 0.3  # share of the relation nodes masked
    OBJECTIVES: ClassVar[tuple[str, ...]] = ("mlm", "itm", "mrc", "mrckl", *SGP_TASKS)

    def __post_init__(self):
        super().__post_init__()
        for task in SGP_TASKS:
            p = getattr(self, f"{task}_mask_prob")
            if not 0.0 < p <= 1.0:
                raise ValueError(f"{task}_mask_prob must be in (0, 1], got {p!r}")
        if self.scene_graph_tasks and self.mlm_weight == 0:
            raise ValueError("scene-graph prediction masks words through MLM's masking and head: it needs "
                             "mlm_weight > 0 (or set object_weight, attribute_weight and relation_weight to 0)")

    @property
    def scene_graph_tasks(self) -> tuple[str, ...]:
        """The scene-graph predictions switched on (weight > 0)."""
        return tuple(t for t in SGP_TASKS if getattr(self, f"{t}_weight") > 0)


def check_scene_graph_keys(batch: dict) -> None:
    """``sg_roles``/``sg_nodes`` must be ``(B, L)`` integers like ``input_ids``, nodes where roles are."""
    shape = tuple(batch["input_ids"].shape)
    for key in ("sg_roles", "sg_nodes"):
        if key not in batch:
            raise ValueError(f"batch has {'sg_nodes' if key == 'sg_roles' else 'sg_roles'} but no {key}; both come "
                             "from course_lib.data.scene_graph (ShapeWorldSceneGraphs)")
        check_shape(key, batch[key], shape)
        if batch[key].is_floating_point():
            raise ValueError(f"{key} must be an integer tensor, got {batch[key].dtype}")


class ErnieViL(ViLBERT):
    """ViLBERT whose text masking is scene-graph prediction; see the module docstring."""

    config_class = ErnieViLConfig
    needs_scene_graphs = True  # its batches should carry sg_roles / sg_nodes (ShapeWorldSceneGraphs)

    def __init__(self, config: ErnieViLConfig):
        super().__init__(config)
        self._warned = False

    def scene_graph_active(self, batch: dict) -> bool:
        """Whether this batch is masked by scene graph: some prediction is on and the batch has a graph."""
        if not self.config.scene_graph_tasks:
            return False
        if "sg_roles" in batch or "sg_nodes" in batch:
            check_scene_graph_keys(batch)
            return True
        if not self._warned:
            warnings.warn("ERNIE-ViL got a batch without sg_roles/sg_nodes (no scene graph): masking it with plain "
                          "random MLM. Wrap the region source in course_lib.data.scene_graph.ShapeWorldSceneGraphs",
                          stacklevel=3)
            self._warned = True
        return False

    def predicted_roles(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """``(roles (B, L), nodes (B, L))``: the batch's scene graph with the roles whose prediction is off
        set to 0 (none) and their nodes to -1."""
        roles, nodes = batch["sg_roles"].long(), batch["sg_nodes"].long()
        on = torch.zeros_like(roles, dtype=torch.bool)
        for task in self.config.scene_graph_tasks:
            on |= roles == ROLES[task]
        return roles * on, nodes.masked_fill(~on, -1)

    def mask_text(self, batch: dict, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ViLBERT's random MLM, then the scene-graph nodes on top (``mask_scene_graph_nodes`` at each
        role's rate); every row is masked alike, the labels kept on ``rows (B,)`` only."""
        ids, labels = super().mask_text(batch, rows)
        if not self.scene_graph_active(batch):
            return ids, labels
        c = self.config
        roles, nodes = self.predicted_roles(batch)
        probs = {task: getattr(c, f"{task}_mask_prob") for task in SGP_TASKS}
        sg_ids, sg_labels = mask_scene_graph_nodes(batch["input_ids"], roles, nodes, c.vocab_size, probs=probs)
        chosen = sg_labels != IGNORE_INDEX
        ids = torch.where(chosen, sg_ids, ids)
        labels = torch.where(chosen & rows[:, None], sg_labels, labels)
        return ids, labels

    def objective_losses(self, out, batch, labels, targets, matched) -> dict[str, torch.Tensor]:
        """ViLBERT's losses; with a scene graph, the masked words of each predicted role leave ``"mlm"``
        for their own loss (``scene_graph_loss``: the mean over that role's masked words, 0 when the
        batch masked none)."""
        losses = super().objective_losses(out, batch, labels, targets, matched)
        if labels is None or self.config.mlm_weight == 0 or not self.scene_graph_active(batch):
            return losses
        roles, _ = self.predicted_roles(batch)
        logits = self.mlm_head(out.text)  # (B, L, V)
        graph = roles > 0
        rest = labels.masked_fill(graph, IGNORE_INDEX)
        scored = rest != IGNORE_INDEX
        losses["mlm"] = (torch.nn.functional.cross_entropy(logits[scored], rest[scored]) if scored.any()
                         else logits.sum() * 0.0)
        graph_labels = labels.masked_fill(~graph, IGNORE_INDEX)
        if (graph_labels != IGNORE_INDEX).any():
            by_role = scene_graph_loss(logits, graph_labels, roles)
        else:
            by_role = {task: logits.sum() * 0.0 for task in SGP_TASKS}
        losses.update({task: by_role[task] for task in self.config.scene_graph_tasks})
        return losses
