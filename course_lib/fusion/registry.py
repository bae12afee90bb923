"""Every fusion style by name, and the interface they share.

Where and how do the two modalities interact? Each style answers differently:

===================  ======================================================  ==========================
name                 interaction                                             systems
===================  ======================================================  ==========================
``single_stream``    one transformer over ``[text; image]`` (merged attn)   VisualBERT, UNITER, VL-BERT
``dual_stream``      co-attention: each stream's queries, other's K/V       ViLBERT, 12-in-1
``cross_modality``   text + image encoders, then shared cross-attention     LXMERT
``two_tower``        none: a dot product of pooled embeddings               CLIP, ALIGN
``fusion_encoder``   cross-attention layers inside the text encoder         ALBEF, BLIP (ITM)
``multiway``         shared attention, a feed-forward expert per modality   VLMo, BEiT-3
``encoder_decoder``  causal text decoder cross-attending to the image       BLIP (LM), CoCa
``three_stream``     one encoder run on text, image, and the pair           UNIMO
===================  ======================================================  ==========================

**Common interface.** ``build_fusion(name, **options)`` returns an ``nn.Module`` (a
``FusionModule``) whose options are the fields of its config dataclass (``dim``, ``num_heads``,
``num_layers``, ``mlp_ratio``, ``dropout``, ``layer_norm_eps``, ``activation`` for all, plus the
style's own, e.g. ``vl_layers`` for ``multiway``); an unknown option is an error listing the valid
ones. Every style's forward is::

    out = style(text, text_mask, image, image_mask, return_attention=False)

- ``text (B, Lt, D)``, ``image (B, Li, D)``: already-embedded tokens (any extractor; ``D = dim``);
- ``text_mask (B, Lt)``, ``image_mask (B, Li)``: True/1 for a real token, or ``None`` (all real);
- ``out`` is a ``FusionOutput``: ``text (B, Lt, D)``, ``image (B, Li, D)``, ``pooled (B, D)``
  (two-tower: the pair ``(text_emb, image_emb)``), ``attentions`` (one dict per layer, values
  ``None`` unless ``return_attention``), ``extras`` (style-specific tensors).

Attention-map keys: ``"self"`` (merged, ``(B, H, L, L)``), ``"text_self"``, ``"image_self"``,
``"text_to_image"`` (text queries over image keys, ``(B, H, Lt, Li)``), ``"image_to_text"``
``(B, H, Li, Lt)``, ``"joint"`` (UNIMO's ``[image; text]``).

Each style reports ``num_parameters()`` and ``flops(batch_size, text_len, image_len)``;
``course_lib.fusion.flops.compare_fusion_styles`` puts them side by side.
"""

from __future__ import annotations

from course_lib.fusion.base import FusionModule
from course_lib.fusion.cross_modality import CrossModalityFusion
from course_lib.fusion.dual_stream import DualStreamFusion
from course_lib.fusion.encoder_decoder import EncoderDecoderFusion
from course_lib.fusion.fusion_encoder import FusionEncoder
from course_lib.fusion.multiway import MultiwayFusion
from course_lib.fusion.single_stream import SingleStreamFusion
from course_lib.fusion.three_stream import ThreeStreamFusion
from course_lib.fusion.two_tower import TwoTowerFusion

FUSION_STYLES: dict[str, type[FusionModule]] = {
    "single_stream": SingleStreamFusion,
    "dual_stream": DualStreamFusion,
    "cross_modality": CrossModalityFusion,
    "two_tower": TwoTowerFusion,
    "fusion_encoder": FusionEncoder,
    "multiway": MultiwayFusion,
    "encoder_decoder": EncoderDecoderFusion,
    "three_stream": ThreeStreamFusion,
}


def get_fusion_class(name: str) -> type[FusionModule]:
    """The class of the fusion style called ``name``; an unknown name lists the valid ones."""
    if not isinstance(name, str) or name not in FUSION_STYLES:
        raise ValueError(f"name={name!r} is not a fusion style; valid names are {list(FUSION_STYLES)}")
    return FUSION_STYLES[name]


def build_fusion(name: str, **options) -> FusionModule:
    """Build the fusion style ``name`` with config ``options``, e.g.
    ``build_fusion("multiway", dim=64, num_heads=4, num_layers=2, vl_layers=1)``."""
    return get_fusion_class(name)(**options)
