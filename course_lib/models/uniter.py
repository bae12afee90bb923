"""UNITER (Chen et al., ECCV 2020, "UNITER: UNiversal Image-TExt Representation Learning").

The figure of the paper, in code (recipes: ``ChenRocks/UNITER`` ``model/pretrain.py``, ``data/*.py``,
``config/pretrain-indomain-base-8gpu.json``; ``reference/RECIPES.md`` sections 1.1, 2.2, 2.12):

- **features**: detected regions, each its detector vector and its **7-d geometry**
  (x1, y1, x2, y2, w, h, w*h), each projected and LayerNorm-ed, summed and LayerNorm-ed again
  (``RegionEmbedding(F, D, "7d")``); a masked region has its features zeroed and a learned mask
  vector added in feature space (UNITER's ``mask_embedding``), before the projection;
- **fusion**: one BERT over ``[text; regions]`` (``SingleStreamFusion``);
- **objectives**, one *task* per batch, drawn from the **task mix** (UNITER's ``MetaLoader``; the
  paper's mix is ITM 2 : MLM 2 : MRFR 1 : MRC-kl 1), with **conditional masking**: a task masks one
  modality and keeps the other whole, so a masked word is predicted from the whole image and a
  masked region from the whole caption:

  ========  =====================================  ======================================  ==========
  task      input                                   loss                                    weight
  ========  =====================================  ======================================  ==========
  ``mlm``   15% of the words masked (>= 1 per       cross-entropy on the masked words        1
            caption), regions whole
  ``mrfr``  15% of the regions masked (>= 1 per     L2 to the original feature (the head is  1
            image), words whole                     tied to the input projection)
  ``mrc``   the same                                cross-entropy to the detector's top      1
                                                    class
  ``mrckl`` the same                                KL from the detector's distribution      1
  ``itm``   half the pairs get another image,       2-way cross-entropy on ``[CLS]``, plus   1, and 0.1
            nothing masked                          **WRA**: the IPOT transport distance     for WRA
                                                    between the fused word and region
                                                    outputs, pulled down for matched pairs
                                                    and pushed up for mismatched ones
  ========  =====================================  ======================================  ==========

  MLM and the region tasks see matched pairs only (UNITER's MLM and MRM datasets hold no
  negatives).

``forward(batch)`` draws one task (``torch.multinomial`` on the global CPU RNG: deterministic under
``seed_everything``, and resumed exactly by ``course_lib.pretrain``, which saves that RNG) and returns
``{"loss", <that task's losses>}``: ``{"loss", "itm", "wra"}`` on an ITM batch, ``{"loss", "mlm"}`` on an
MLM batch... ``sample_tasks=False`` runs every enabled task on every batch instead (one forward pass
each) and sums them with their weights. ``conditional_masking=False`` masks both modalities in the
MLM and region tasks, the paper's "w/o cond. mask" ablation (its Table 2, line 12).

An objective is on when its weight is > 0 (``mlm_weight``, ``itm_weight``, ``mrfr_weight``,
``mrc_weight``, ``mrckl_weight``, ``wra_weight``); ``mix_<task>`` says how often its task is drawn.
The paper's ablation is one override per line: ``build_model("uniter", mrfr_weight=0.0,
mrckl_weight=0.0, wra_weight=0.0)`` is "MLM + ITM". Region shards (the TSV releases) keep only each
region's top class, not its distribution: on ``--data=region_shards`` train MRC instead of MRC-kl
(``--model.mrckl_weight=0.0 --model.mrc_weight=1.0``).

Deviations: MRC-kl is a true KL summed over classes (``region_class_loss_kl``; UNITER's
``kl_div(...).mean()`` also divides by the number of classes); text and image tokens share the
fusion's embedding LayerNorm (UNITER has one per modality) and the region embedding has its own
LayerNorm before the type vector is added; under DDP every parameter joins the loss with weight 0, so
that a task that leaves a head unused does not stall the gradient all-reduce.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import torch
from torch import nn

from course_lib.distributed import is_distributed
from course_lib.features.region import RegionEmbedding
from course_lib.models.region_bert import (RegionBert, RegionBertConfig, check_region_batch, draw_mismatched,
                                          mask_caption, swap_images)
from course_lib.objectives.itm import itm_loss
from course_lib.objectives.mlm import MLMHead, masked_lm_loss
from course_lib.objectives.mvm import (RegressionHead, feature_regression_loss, mask_regions,
                                       region_class_loss_kl)
from course_lib.objectives.wra import ot_distance, wra_loss

TASKS = ("mlm", "itm", "mrfr", "mrc", "mrckl")  # WRA rides on the ITM batches, as in UNITER
REGION_TASKS = ("mrfr", "mrc", "mrckl")


@dataclass(frozen=True)
class UniterConfig(RegionBertConfig):
    mrc_weight: float = 0.0  # MRC with hard labels (the paper's best setting uses MRC-kl instead)
    mrfr_weight: float = 1.0
    mrckl_weight: float = 1.0
    wra_weight: float = 0.1  # UNITER's itm_ot_lambda
    mix_mlm: float = 2.0  # how often each task is drawn (UNITER: itm 2, mlm 2, mrfr 1, mrckl 1)
    mix_itm: float = 2.0
    mix_mrfr: float = 1.0
    mix_mrc: float = 1.0
    mix_mrckl: float = 1.0
    sample_tasks: bool = True  # False: every enabled task on every batch, summed
    conditional_masking: bool = True  # False: the MLM and region tasks mask both modalities
    wra_beta: float = 0.5  # IPOT's proximal step, in cosine-cost units (UNITER's)
    wra_iterations: int = 50
    OBJECTIVES: ClassVar[tuple[str, ...]] = ("mlm", "itm", "mrfr", "mrc", "mrckl", "wra")

    def __post_init__(self):
        super().__post_init__()
        if self.mrc_target != "hard":
            raise ValueError(f"UNITER's mrc_target is 'hard' (got {self.mrc_target!r}); its soft-label variant is "
                             "MRC-kl: set mrckl_weight")
        if self.wra_weight > 0 and self.itm_weight == 0:
            raise ValueError("wra_weight > 0 needs itm_weight > 0: WRA is computed on ITM's batches (matched and "
                             "mismatched pairs); set wra_weight=0.0 or switch ITM on")
        for task in TASKS:
            if getattr(self, f"mix_{task}") < 0:
                raise ValueError(f"mix_{task} must be >= 0, got {getattr(self, f'mix_{task}')!r}")
            if self.sample_tasks and getattr(self, f"{task}_weight") > 0 and getattr(self, f"mix_{task}") == 0:
                raise ValueError(f"{task}_weight > 0 but mix_{task} = 0: the task would never be drawn; give it a "
                                 f"share of the mix or set {task}_weight=0.0")
        if not self.wra_beta > 0:
            raise ValueError(f"wra_beta must be > 0, got {self.wra_beta!r}")
        if isinstance(self.wra_iterations, bool) or not isinstance(self.wra_iterations, int) or self.wra_iterations < 1:
            raise ValueError(f"wra_iterations must be an int >= 1, got {self.wra_iterations!r}")
        for name in ("sample_tasks", "conditional_masking"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")

    @property
    def tasks(self) -> tuple[str, ...]:
        """The tasks switched on (weight > 0), in ``TASKS`` order."""
        return tuple(t for t in TASKS if getattr(self, f"{t}_weight") > 0)

    @property
    def task_mix(self) -> dict[str, float]:
        """``{task: probability of being drawn}`` over the enabled tasks."""
        ratios = {t: float(getattr(self, f"mix_{t}")) for t in self.tasks}
        total = sum(ratios.values())
        return {t: r / total for t, r in ratios.items()}


class TaskInputs(NamedTuple):
    """What one task's forward pass reads: the (possibly swapped) batch, the caption ids (masked for
    MLM), the MLM labels (-100 where not predicted; None when no word is masked), the hidden regions
    ``(B, R)`` bool (None when none is), and which pairs are matched ``(B,)`` bool."""

    batch: dict
    input_ids: torch.Tensor
    mlm_labels: torch.Tensor | None
    hidden: torch.Tensor | None
    matched: torch.Tensor


class Uniter(RegionBert):
    """``forward(region batch)`` -> ``{"loss", <the drawn task's losses>}``; see the module docstring."""

    config_class = UniterConfig

    def __init__(self, config: UniterConfig):
        super().__init__(config)
        c = config
        self.region_embedding = RegionEmbedding(c.region_feat_dim, c.dim, "7d")
        self.region_mask_embedding = nn.Parameter(torch.zeros(c.region_feat_dim))  # added to a masked region
        if self.mrc_head is None and c.mrckl_weight > 0:  # MRC and MRC-kl share UNITER's region classifier
            self.mrc_head = MLMHead(c.dim, c.num_region_classes, layer_norm_eps=c.layer_norm_eps)
        self.mrfr_head = (RegressionHead(c.dim, c.region_feat_dim, tie_to=self.region_embedding.feature_proj,
                                         layer_norm_eps=c.layer_norm_eps) if c.mrfr_weight > 0 else None)
        self.init()
        with torch.no_grad():
            self.region_mask_embedding.normal_(0.0, c.init_std)
        self.last_task: str | None = None  # the task of the latest forward pass (for inspection)

    # ------------------------------------------------------------------ features
    def embed(self, batch, input_ids, hidden_regions):
        feats = batch["region_feats"]
        if hidden_regions is not None:  # zeroed, plus the learned mask vector (UNITER's mask_embedding)
            hidden = hidden_regions[..., None]
            feats = feats.masked_fill(hidden, 0.0) + hidden * self.region_mask_embedding
        image = self.region_embedding(feats, batch["region_boxes"])  # 7-d geometry
        return self.word_embeddings(input_ids), image, batch["region_mask"]

    # ------------------------------------------------------------------ tasks
    def sample_task(self) -> str:
        """One task drawn from the mix, on the global CPU RNG."""
        mix = self.config.task_mix
        index = int(torch.multinomial(torch.tensor(list(mix.values())), 1))
        return list(mix)[index]

    def hide_regions(self, region_mask: torch.Tensor) -> torch.Tensor:
        """UNITER's region masking ``(B, R)`` -> ``(B, R)`` bool: each real region with probability
        ``region_mask_prob``, at least one per image (``_get_img_mask``)."""
        mask = region_mask.bool()
        _, hidden = mask_regions(mask.float()[..., None], mask, self.config.region_mask_prob, at_least_one=True)
        return hidden

    def mask_for_task(self, batch: dict, task: str) -> TaskInputs:
        """The inputs of ``task`` for ``batch`` (see the module docstring): conditional masking masks the
        words for ``mlm``, the regions for the region tasks, nothing for ``itm``."""
        c = self.config
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; UNITER's tasks are {list(TASKS)}")
        B = batch["input_ids"].shape[0]
        device = batch["input_ids"].device
        matched = torch.ones(B, dtype=torch.bool, device=device)
        if task == "itm":
            if B < 2:
                raise ValueError("ITM needs a batch of at least 2 pairs to draw a mismatched image from")
            swapped = draw_mismatched(B, c.itm_prob, device)
            return TaskInputs(swap_images(batch, swapped), batch["input_ids"], None, None, ~swapped)
        mask_words = task == "mlm" or not c.conditional_masking
        mask_image = task in REGION_TASKS or not c.conditional_masking
        ids, labels, hidden = batch["input_ids"], None, None
        if mask_words:
            ids, labels = mask_caption(batch["input_ids"], batch["attention_mask"], matched, c.vocab_size, c.mask_prob,
                                       every_row=True)
        if mask_image:
            hidden = self.hide_regions(batch["region_mask"])
        return TaskInputs(batch, ids, labels, hidden, matched)

    def task_losses(self, batch: dict, task: str) -> dict[str, torch.Tensor]:
        """The unweighted losses of ``task`` on ``batch``: one forward pass."""
        inputs = self.mask_for_task(batch, task)
        b = inputs.batch
        out = self.encode(b, inputs.input_ids, inputs.hidden)
        if task == "mlm":
            return {"mlm": masked_lm_loss(self.mlm_head(out.text), inputs.mlm_labels)}
        if task == "itm":
            losses = {"itm": itm_loss(self.itm_from_output(out), inputs.matched.long())}
            if self.config.wra_weight > 0:
                losses["wra"] = wra_loss(self.wra_distances(out, b), inputs.matched)
            return losses
        hidden = inputs.hidden
        if task == "mrfr":
            return {"mrfr": feature_regression_loss(self.mrfr_head(out.image), b["region_feats"], hidden)}
        if task == "mrc":
            return {"mrc": self.region_class_loss(out.image, b, hidden)}
        if "region_probs" not in b:
            raise ValueError("MRC-kl needs region_probs (B, R, C + 1) in the batch: the detector's class "
                             "distribution per region. Region shards keep only each region's top class: train "
                             "MRC instead (--model.mrckl_weight=0.0 --model.mrc_weight=1.0)")
        return {"mrckl": region_class_loss_kl(self.mrc_head(out.image), b["region_probs"], hidden)}

    def wra_distances(self, out, batch: dict) -> torch.Tensor:
        """``(B,)`` IPOT transport distances between the fused text tokens (``[CLS]`` and ``[SEP]``
        included, as UNITER) and the fused region tokens, in fp32, UNITER's beta and iterations."""
        c = self.config
        return ot_distance(out.text, out.image, batch["attention_mask"].bool(), batch["region_mask"].bool(),
                           beta=c.wra_beta, iterations=c.wra_iterations, cost_scale=1.0)

    def transport_plans(self, batch: dict) -> torch.Tensor:
        """``(B, L, R)`` IPOT plans between the fused words and regions of ``batch`` as given (nothing
        masked): where WRA moves each word's mass."""
        from course_lib.objectives.wra import cosine_cost, ipot

        c = self.config
        with torch.no_grad():
            out = self.encode(batch)
            return ipot(cosine_cost(out.text.float(), out.image.float()), batch["attention_mask"].bool(),
                        batch["region_mask"].bool(), beta=c.wra_beta, iterations=c.wra_iterations, cost_scale=1.0)

    def forward(self, batch: dict) -> dict:
        c = self.config
        check_region_batch(batch, c)
        tasks = [self.sample_task()] if c.sample_tasks else list(c.tasks)
        self.last_task = tasks[0] if len(tasks) == 1 else None
        losses = {}
        for task in tasks:
            losses.update(self.task_losses(batch, task))
        total = sum(getattr(c, f"{name}_weight") * loss for name, loss in losses.items())
        if is_distributed():  # DDP: every parameter in the graph, with weight 0
            total = total + 0.0 * sum(p.sum() for p in self.parameters() if p.requires_grad)
        return {"loss": total, **losses}
