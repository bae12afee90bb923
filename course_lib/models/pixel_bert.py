"""Pixel-BERT (Huang et al., 2020, "Pixel-BERT: Aligning Image Pixels with Text by Deep Multi-Modal
Transformers"): no detector, a CNN over the pixels trained end to end with BERT.

The figure of the paper, in code:

- **visual features**: a CNN (``features.cnn.SmallCNN``; the paper's ResNet-50) turns the image into
  an ``h x w`` feature map; every cell is a "pixel feature", projected to the model width
  (``features.grid.GridFeatures``: ``LN(W f + row + col)``);
- **random pixel sampling** (``features.pixel_sampling.PixelSampler``): in the *pretraining step*
  only ``num_samples`` cells per image (the paper's 100), drawn at random at every step, go to the
  transformer: cheaper, and a regulariser (no single cell can be relied on). Fine-tuning and
  evaluation read every cell. ``num_samples=0`` switches sampling off (the ablation);
- **visual embedding**: a learned *semantic embedding* ``s_v`` added to every pixel feature (the
  fusion's image type vector) and ``s_w`` + positions added to the words, as in the paper;
- **fusion**: one BERT over ``[text; pixels]`` (``fusion.single_stream.SingleStreamFusion``);
- **objectives**: masked language modelling (BERT's 15%, 80/10/10) conditioned on the pixels, and
  image-text matching on the pooled ``[CLS]``: a share ``itm_prob`` of the pairs get another image of
  the batch (the paper samples as many negatives as positives). As for the region systems
  (``models.region_bert``), every caption is masked alike and MLM is scored on matched pairs only.

The CNN, the grid projection and BERT receive gradients from both losses: the image encoder is
learned for the task, the paper's point against frozen detector features.

``forward(batch)`` is the pretraining step and returns ``{"loss", "mlm", "itm"}``; it samples pixels
whenever ``num_samples > 0``, in train *and* eval mode, so a validation loss and the FLOPs that
``course_lib.pretrain`` counts (in eval mode) are those of the pretraining step. ``encode``,
``itm_logits`` and ``match_scores`` (fine-tuning, retrieval, VQA through ``course_lib.evaluate``)
read every cell unless ``sample=True``.

A batch is an image-text batch (``course_lib.data.onthefly.ShapeWorldPairs``, image-text shards) or a
region batch (``course_lib.data.regions``, which carries the ``images``): only ``images (B, 3, S, S)``
(uint8, or float in [0, 1]), ``input_ids (B, L)`` and ``attention_mask (B, L)`` are read.

Deviations (notebook 21 says so): the CNN is the course's small GroupNorm CNN trained from scratch
(the paper: an ImageNet-pretrained ResNet-50 or ResNeXt-152 on 800-px images, BERT from its weights);
the pixel features keep ``GridFeatures``' row and column embeddings (the paper adds only ``s_v``; a
tiny CNN's receptive field cannot tell where a cell is, and ShapeWorld asks "left of").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from course_lib.features.cnn import SmallCNN
from course_lib.features.grid import GridFeatures
from course_lib.features.pixel_sampling import PixelSampler
from course_lib.features.text import PAD_ID
from course_lib.fusion.base import FusionOutput
from course_lib.fusion.single_stream import SingleStreamFusion
from course_lib.models.region_bert import SPECIAL_IDS, itm_negatives, mask_caption
from course_lib.nn import init_weights
from course_lib.objectives.itm import itm_loss
from course_lib.objectives.mlm import MLMHead, masked_lm_loss
from course_lib.presets import apply_overrides, get_preset
from course_lib.utils import check_shape

# Sizes per preset: (image_size, cnn_channels, cnn_blocks, dim, layers, heads, context_length, init_std,
# vocab_size). Every preset's map has 16 x 16 = 256 cells and samples 100 of them (39%), the paper's 100.
# cpu-tiny: ShapeWorld's 32-px images through a 1-stage CNN (stride 2); cpu-small: 64 px, 2 stages (stride 4);
# gpu-base: BERT-base over a 5-stage CNN of ResNet-50's stride 32 and about its size (19M parameters; ResNet-50's
# trunk has 23.5M) on 512-px images.
PIXEL_SIZES = {
    "cpu-tiny": (32, (32,), 1, 64, 2, 4, 32, 0.1, 256),
    "cpu-small": (64, (32, 64), 1, 128, 4, 4, 32, 0.07, 256),
    "gpu-small": (256, (32, 64, 128, 256), 1, 384, 6, 6, 64, 0.02, 30522),
    "gpu-base": (512, (64, 128, 256, 512, 1024), 1, 768, 12, 12, 64, 0.02, 30522),  # BERT-base sizes and vocab
}


@dataclass(frozen=True)
class PixelBertConfig:
    vocab_size: int = 256
    context_length: int = 32
    image_size: int = 32
    cnn_channels: tuple = (32,)  # one stride-2 stage each: stride 2 ** len(cnn_channels)
    cnn_blocks: int = 1  # extra stride-1 convs per stage
    dim: int = 64
    layers: int = 2
    heads: int = 4
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    layer_norm_eps: float = 1e-12
    init_std: float = 0.1
    num_samples: int = 100  # cells per image in the pretraining step; 0: every cell (no sampling)
    mask_prob: float = 0.15
    itm_prob: float = 0.5
    mlm_weight: float = 1.0
    itm_weight: float = 1.0

    def __post_init__(self):
        for name in ("vocab_size", "context_length", "image_size", "dim", "layers", "heads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        for name, low in (("num_samples", 0), ("cnn_blocks", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        channels = self.cnn_channels
        if not isinstance(channels, tuple) or not channels or not all(
                isinstance(c, int) and not isinstance(c, bool) and c >= 1 for c in channels):
            raise ValueError(f"cnn_channels must be a non-empty tuple of positive ints, got {channels!r}")
        if self.image_size % self.stride:
            raise ValueError(f"image_size={self.image_size} must be a multiple of the CNN stride {self.stride} "
                             f"(2 ** len(cnn_channels))")
        if self.num_samples > self.cells:
            raise ValueError(f"num_samples={self.num_samples} is more than the {self.cells} cells of the "
                             f"{self.grid} x {self.grid} feature map; use fewer samples or a larger image_size")
        for name in ("mask_prob", "itm_prob"):
            if not 0.0 < getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in (0, 1), got {getattr(self, name)!r}")
        for name in ("mlm_weight", "itm_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if self.mlm_weight == 0 and self.itm_weight == 0:
            raise ValueError("mlm_weight and itm_weight are both 0: nothing would be learned")

    @property
    def stride(self) -> int:
        return 2 ** len(self.cnn_channels)

    @property
    def grid(self) -> int:
        """Side of the feature map (cells)."""
        return self.image_size // self.stride

    @property
    def cells(self) -> int:
        return self.grid ** 2

    @property
    def image_tokens(self) -> int:
        """Pixel tokens the transformer reads in a pretraining step."""
        return self.num_samples or self.cells

    @classmethod
    def from_preset(cls, name: str, **overrides):
        get_preset(name)  # an unknown name lists the valid ones
        size, channels, blocks, dim, layers, heads, context, std, vocab = PIXEL_SIZES[name]
        base = cls(image_size=size, cnn_channels=channels, cnn_blocks=blocks, dim=dim, layers=layers, heads=heads,
                   context_length=context, init_std=std, vocab_size=vocab)
        return apply_overrides(base, overrides)


def check_pixel_batch(batch: dict, config: PixelBertConfig) -> None:
    """Raise ``ValueError`` naming the key and what was expected unless ``batch`` holds ``images
    (B, 3, S, S)`` with ``S = config.image_size``, ``input_ids (B, L)`` and ``attention_mask (B, L)``."""
    if not isinstance(batch, dict):
        raise ValueError(f"batch must be a dict of tensors (an image-text batch), got {type(batch).__name__}")
    missing = [k for k in ("images", "input_ids", "attention_mask") if k not in batch]
    if missing:
        raise ValueError(f"batch is missing {missing}; Pixel-BERT reads images (B, 3, H, W), input_ids and "
                         "attention_mask (course_lib.data.onthefly.ShapeWorldPairs, or a region batch)")
    ids, images = batch["input_ids"], batch["images"]
    check_shape("input_ids", ids, (None, None))
    B, L = ids.shape
    check_shape("attention_mask", batch["attention_mask"], (B, L))
    check_shape("images", images, (B, 3, None, None))
    if tuple(images.shape[-2:]) != (config.image_size, config.image_size):
        raise ValueError(f"images are {images.shape[-2]} x {images.shape[-1]} pixels; the model's image_size is "
                         f"{config.image_size} (its position tables and num_samples depend on it)")
    if images.dtype != torch.uint8 and not images.is_floating_point():
        raise ValueError(f"images must be uint8 or float in [0, 1], got {images.dtype}")
    if L > config.context_length:
        raise ValueError(f"input_ids has {L} tokens; the model's context_length is {config.context_length}")
    if ids.is_floating_point():
        raise ValueError(f"input_ids must be integer token ids, got {ids.dtype}")
    if ids.device.type != "cpu":
        return  # the value checks below need a device sync
    if ids.numel() and (ids.min() < 0 or ids.max() >= config.vocab_size):
        raise ValueError(f"input_ids must lie in [0, vocab_size={config.vocab_size}), got values in "
                         f"[{int(ids.min())}, {int(ids.max())}]")
    real_words = (batch["attention_mask"].bool() & ~torch.isin(ids, ids.new_tensor(SPECIAL_IDS))).sum(1)
    if (real_words == 0).any():
        raise ValueError(f"caption {int((real_words == 0).nonzero()[0])} of input_ids is empty (only special "
                         "tokens); every caption needs at least one word")
    if images.is_floating_point() and not torch.isfinite(images).all():
        raise ValueError("images hold NaN or inf values")


class PixelBert(nn.Module):
    """``forward(batch)`` -> ``{"loss", "mlm", "itm"}``; see the module docstring."""

    config_class = PixelBertConfig
    inputs = "images"  # course_lib.pretrain feeds it image-text batches

    def __init__(self, config: PixelBertConfig):
        super().__init__()
        if not isinstance(config, PixelBertConfig):
            raise ValueError(f"config must be a PixelBertConfig, got {type(config).__name__}")
        c = self.config = config
        self.pixels = GridFeatures(SmallCNN(3, c.cnn_channels, c.cnn_blocks), c.dim, max_grid=c.grid)  # (B, h*w, D)
        self.sampler = PixelSampler(c.num_samples) if c.num_samples else None
        self.word_embeddings = nn.Embedding(c.vocab_size, c.dim, padding_idx=PAD_ID)
        self.fusion = SingleStreamFusion(dim=c.dim, num_heads=c.heads, num_layers=c.layers, mlp_ratio=c.mlp_ratio,
                                         dropout=c.dropout, layer_norm_eps=c.layer_norm_eps,
                                         max_text_len=c.context_length)
        self.mlm_head = MLMHead(c.dim, c.vocab_size, tie_to=self.word_embeddings, layer_norm_eps=c.layer_norm_eps)
        self.itm_head = nn.Linear(c.dim, 2)
        init_weights(self, std=c.init_std)  # Linear / Embedding / LayerNorm; the convolutions keep Kaiming's

    def pixel_tokens(self, images: torch.Tensor, sample: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Images ``(B, 3, S, S)`` (uint8 or float in [0, 1]) -> ``(tokens (B, N, D), indices (B, N))``:
        every cell of the map in raster order (``N = h * w``), or ``num_samples`` random cells per image
        (sorted) with ``sample=True``."""
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images
        tokens = self.pixels((x - 0.5) / 0.25)  # (B, h*w, D), roughly zero-centred pixels
        if sample and self.sampler is not None:
            return tuple(self.sampler(tokens, sample=True))
        return tokens, torch.arange(tokens.shape[1], device=tokens.device).expand(tokens.shape[:2])

    def encode(self, batch: dict, input_ids: torch.Tensor | None = None, sample: bool = False,
               return_attention: bool = False) -> FusionOutput:
        """Fused tokens: ``text (B, L, D)``, ``image (B, N, D)`` (the pixel tokens read), ``pooled (B, D)``.

        ``input_ids`` replaces the batch's (the masked caption); ``sample=True`` reads ``num_samples``
        random cells (the pretraining step), else every cell.
        """
        check_pixel_batch(batch, self.config)
        ids = batch["input_ids"] if input_ids is None else input_ids
        image, _ = self.pixel_tokens(batch["images"], sample)
        image_mask = torch.ones(image.shape[:2], dtype=torch.bool, device=image.device)  # (B, N)
        return self.fusion(self.word_embeddings(ids), batch["attention_mask"], image, image_mask,
                           return_attention=return_attention)

    def itm_logits(self, batch: dict, sample: bool = False) -> torch.Tensor:
        """``(B, 2)`` "mismatched / matched" logits of the pairs as given (no masking)."""
        return self.itm_head(self.encode(batch, sample=sample).pooled)

    def match_scores(self, batch: dict) -> torch.Tensor:
        """``(B,)`` log-odds that caption i matches image i (every cell read): what retrieval ranks by."""
        logits = self.itm_logits(batch)
        return logits[:, 1] - logits[:, 0]

    def forward(self, batch: dict) -> dict:
        c = self.config
        check_pixel_batch(batch, c)
        batch, matched = itm_negatives(batch, c.itm_weight, c.itm_prob)  # swapped rows get other rows' images
        ids, labels = batch["input_ids"], None
        if c.mlm_weight > 0:
            ids, labels = mask_caption(batch["input_ids"], batch["attention_mask"], matched, c.vocab_size,
                                       c.mask_prob)
        out = self.encode(batch, ids, sample=True)
        losses = {}
        if c.mlm_weight > 0:
            losses["mlm"] = masked_lm_loss(self.mlm_head(out.text), labels)
        if c.itm_weight > 0:
            losses["itm"] = itm_loss(self.itm_head(out.pooled), matched.long())
        total = c.mlm_weight * losses.get("mlm", 0.0) + c.itm_weight * losses.get("itm", 0.0)
        return {"loss": total, **losses}
