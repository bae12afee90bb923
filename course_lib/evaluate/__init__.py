"""Downstream evaluation shared by every system of the course, one idea per module:

- ``retrieval``: image-text retrieval Recall@K (UNITER / ViLT) and its chance level;
- ``classification``: top-1 accuracy;
- ``vqa``: the VQA fine-tuning head (UNITER / LXMERT), its ``BCE * num_answers`` loss, soft targets
  and the VQA soft accuracy (ViLT ``VQAScore``, MMF ``VQAAccuracy``);
- ``boxes``: box IoU and grounding accuracy (IoU >= 0.5, X-VLM);
- ``captioning``: corpus BLEU-4 and CIDEr with pycocoevalcap (tokenised in Python, no Java) and the
  most-frequent-caption baseline;
- ``caption_truth``: whether a caption of ShapeWorld's grammar is true of its scene;
- ``fused``: retrieval, VQA fine-tuning and grounding by region scoring for fused models (an ITM head,
  a pooled output, one output per region);
- ``two_stage``: ALBEF's two-stage retrieval (ITC picks the top k, the ITM head re-ranks them);
- ``zero_shot``: zero-shot classification with prompt ensembles, the linear probe, and the binding test on
  attribute-swapped captions (CLIP, notebook 22);
- ``multitask``: 12-in-1's fine-tuning of one model on several tasks at once (task heads, round robin with
  stop-and-go) against one model per task (notebook 14; import it from ``course_lib.evaluate.multitask``).

Everything else public is importable from here: ``from course_lib.evaluate import recall_at_k``.
"""

from course_lib.evaluate.boxes import box_iou, grounding_accuracy
from course_lib.evaluate.caption_truth import caption_is_true, caption_truth_rate, parse_caption
from course_lib.evaluate.captioning import caption_metrics, most_frequent_caption, tokenize_caption
from course_lib.evaluate.classification import accuracy
from course_lib.evaluate.fused import (
    GroundingFineTuner,
    VQAFineTuner,
    fused_retrieval,
    grounding_chance,
    grounding_targets,
    match_matrix,
    pair_batch,
    plan_alignment,
    region_ious,
)
from course_lib.evaluate.retrieval import chance_recall_at_k, positives_matrix, recall_at_k
from course_lib.evaluate.two_stage import rerank_top_k, two_stage_retrieval, two_stage_scores
from course_lib.evaluate.zero_shot import (
    attribute_swap,
    binding_accuracy,
    description_retrieval,
    linear_probe,
    zero_shot_accuracy,
    zero_shot_weights,
)
from course_lib.evaluate.vqa import (
    VQAHead,
    vqa_loss,
    vqa_soft_accuracy,
    vqa_soft_targets,
    vqa_soft_targets_from_scores,
)

__all__ = [
    "GroundingFineTuner",
    "VQAFineTuner",
    "VQAHead",
    "fused_retrieval",
    "match_matrix",
    "pair_batch",
    "accuracy",
    "box_iou",
    "caption_is_true",
    "caption_metrics",
    "caption_truth_rate",
    "chance_recall_at_k",
    "grounding_accuracy",
    "grounding_chance",
    "grounding_targets",
    "most_frequent_caption",
    "parse_caption",
    "plan_alignment",
    "positives_matrix",
    "recall_at_k",
    "region_ious",
    "rerank_top_k",
    "tokenize_caption",
    "two_stage_retrieval",
    "two_stage_scores",
    "vqa_loss",
    "vqa_soft_accuracy",
    "vqa_soft_targets",
    "vqa_soft_targets_from_scores",
    "attribute_swap",
    "binding_accuracy",
    "description_retrieval",
    "linear_probe",
    "zero_shot_accuracy",
    "zero_shot_weights",
]
