"""ALBEF (Li et al., NeurIPS 2021, "Align before Fuse: Vision and Language Representation Learning
with Momentum Distillation").

The figure of the paper, in code (``salesforce/ALBEF``, ``models/model_pretrain.py``):

- **features**: a ViT over image patches (``PatchEmbedding`` + a pre-LN transformer), BERT
  embeddings for the caption;
- **fusion**: a ``FusionEncoder``: the bottom ``text_layers`` BERT layers read the caption alone,
  the top ``fusion_layers`` add cross-attention to the image tokens (ALBEF-base: 6 + 6);
- **align before fuse**: ITC on the *unimodal* [CLS] outputs (image encoder, text layers),
  projected to ``embed_dim`` and L2-normalised, before any fusion;
- **ITM** on the fused [CLS] with **hard negatives**: for each text an image drawn from
  ``softmax(ITC logits)`` over the batch's other images, and a text for each image (B positives,
  2B negatives); **MLM** on the fused text (15%, 80/10/10), conditioned on the image;
- **momentum distillation**: a momentum copy of the encoders (EMA, ``momentum`` 0.995) gives ITC's
  keys, fills two feature queues (``queue_size`` recent image and text features: more negatives than
  one batch), and its soft predictions are mixed into the targets of ITC and MLM with weight
  ``alpha`` (0.4), ramped up linearly over the first ``alpha_warmup_steps`` training forwards
  (ALBEF: the first epoch).

``forward(batch)`` (``images (B, 3, H, W)`` float in [0, 1] or uint8, ``input_ids (B, L)``,
``attention_mask (B, L)``) returns ``{"loss", "itc", "itm", "mlm", "alpha", "temperature"}``;
``loss = itc_weight * itc + itm_weight * itm + mlm_weight * mlm`` (ALBEF: all 1). In training mode each
forward first updates the momentum encoders and, at its end, enqueues the momentum features; in
eval mode neither changes (so counting FLOPs or scoring a batch leaves the run's state alone). The
momentum encoders, the queues and the forward counter are buffers and frozen parameters of the
model, so a checkpoint holds them and a resumed run continues exactly.

Ablations are overrides: ``itc_weight=0.0`` is "without ITC" (the ITM negatives are then random
ones, the paper's MLM + ITM baseline), ``distill=False`` keeps the momentum keys and queues but uses
one-hot targets (``alpha = 0``), ``hard_negatives=False`` draws ITM negatives uniformly.

``caption_positives=True`` (ours, off by default; on in notebook 23's ShapeWorld protocol, whose captions
repeat) counts pairs with the same caption (same token ids, :func:`caption_key`) as positives of each
other: ITC's hard target spreads evenly over every such key of the batch and the queue (a third buffer,
``caption_queue``, holds the queued captions' keys), and ITM never draws one as a negative. ALBEF's
retrieval fine-tuning does the same with image ids, BLIP's pretraining with its ``idx``.

Evaluation: ``encode_image`` / ``encode_text`` / ``similarity`` (ITC, unimodal), ``match_scores``
(ITM logit of "matched": ``course_lib.evaluate.fused``), and the two-stage retrieval of ALBEF
(``course_lib.evaluate.two_stage``: ITC picks the top k, ITM re-ranks them).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from course_lib.features.patch import PatchEmbedding
from course_lib.features.text import CLS_ID, MASK_ID, PAD_ID, TextEmbeddings, mask_tokens
from course_lib.fusion.base import FusionOutput
from course_lib.fusion.fusion_encoder import FusionEncoder
from course_lib.nn import init_weights
from course_lib.objectives.distill import (FeatureQueue, distillation_targets, momentum_copy, momentum_update,
                                           soft_cross_entropy)
from course_lib.objectives.itc import gather_features
from course_lib.objectives.itm import itm_loss, sample_hard_negatives, sample_random_negatives
from course_lib.objectives.mlm import IGNORE_INDEX, MLMHead
from course_lib.presets import apply_overrides, get_preset
from course_lib.utils import check_one_of, check_shape

# Sizes per preset: (image_size, patch_size, dim, heads, image_layers, text_layers, fusion_layers,
# context_length, embed_dim, queue_size, vocab_size, init_std, alpha_warmup_steps).
# gpu-base is ALBEF-base: ViT-B/16 at 256 px, BERT-base split 6 + 6, embed 256, queue 65,536; one epoch
# of its 4M-image pretraining (512 per step) is about 7,800 steps, its alpha ramp. The CPU presets
# scale the queue down with the batch (ALBEF's queue holds 1,024 batches of 64) and use the larger
# init std of the course's tiny models (BERT's 0.02 is tuned for width 768; see region_bert).
ALBEF_SIZES = {
    "cpu-tiny": (32, 4, 64, 4, 2, 1, 1, 32, 64, 256, 256, 0.1, 50),
    "cpu-small": (64, 8, 128, 4, 4, 2, 2, 32, 128, 1024, 256, 0.07, 200),
    "gpu-small": (224, 16, 384, 6, 6, 3, 3, 32, 256, 16384, 30522, 0.02, 2000),
    "gpu-base": (256, 16, 768, 12, 12, 6, 6, 32, 256, 65536, 30522, 0.02, 7800),
}


@dataclass(frozen=True)
class ALBEFConfig:
    vocab_size: int = 256
    image_size: int = 32
    patch_size: int = 4
    dim: int = 64  # the width of the ViT and of BERT (768 in ALBEF-base, both)
    heads: int = 4
    image_layers: int = 2
    text_layers: int = 1  # BERT layers over the caption alone (ALBEF: 6)
    fusion_layers: int = 1  # BERT layers with cross-attention to the image (ALBEF: 6)
    context_length: int = 32
    embed_dim: int = 64  # ITC's projection (ALBEF: 256)
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    init_std: float = 0.1
    temperature: float = 0.07  # learnable, clamped to [0.001, 0.5] at each training forward
    learn_temperature: bool = True  # False: a fixed temperature (short CPU runs at a high learning rate)
    itc_keys: str = "momentum"  # ITC's in-batch keys: the momentum model's (ALBEF) or the batch's own ("batch")
    queue_size: int = 256  # ALBEF: 65,536
    momentum: float = 0.995
    distill: bool = True
    alpha: float = 0.4
    alpha_warmup_steps: int = 50  # alpha ramps linearly from 0 over these training forwards (0: no ramp)
    hard_negatives: bool = True
    hard_negative_eps: float = 0.0  # added to the sampling weights (ALBEF 0, BLIP 1e-4)
    # True: pairs whose captions are the same token ids are positives of each other: in ITC's targets (the
    # batch and the queue) and never drawn as ITM negatives (BLIP's idx positives; ALBEF's retrieval fine-tuning)
    caption_positives: bool = False
    mask_prob: float = 0.15
    itc_weight: float = 1.0
    itm_weight: float = 1.0
    mlm_weight: float = 1.0

    def __post_init__(self):
        for name in ("vocab_size", "image_size", "patch_size", "dim", "heads", "image_layers", "text_layers",
                     "fusion_layers", "context_length", "embed_dim", "queue_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        check_one_of("itc_keys", self.itc_keys, ("momentum", "batch"))
        for name in ("alpha_warmup_steps",):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size={self.image_size} must be a multiple of patch_size={self.patch_size}")
        if self.dim % self.heads:
            raise ValueError(f"dim={self.dim} must be a multiple of heads={self.heads}")
        if not 0.001 <= self.temperature <= 0.5:
            raise ValueError(f"temperature must be in [0.001, 0.5] (ALBEF's clamp), got {self.temperature!r}")
        for name in ("momentum", "alpha"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)!r}")
        if not 0.0 < self.mask_prob < 1.0:
            raise ValueError(f"mask_prob must be in (0, 1), got {self.mask_prob!r}")
        if self.hard_negative_eps < 0:
            raise ValueError(f"hard_negative_eps must be >= 0, got {self.hard_negative_eps!r}")
        weights = ("itc_weight", "itm_weight", "mlm_weight")
        for name in weights:
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if all(getattr(self, name) == 0 for name in weights):
            raise ValueError("itc_weight, itm_weight and mlm_weight are all 0: nothing would be learned")

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "ALBEFConfig":
        get_preset(name)  # an unknown name lists the valid ones
        (image, patch, dim, heads, image_layers, text_layers, fusion_layers, context, embed, queue, vocab, std,
         warmup) = ALBEF_SIZES[name]
        base = cls(vocab_size=vocab, image_size=image, patch_size=patch, dim=dim, heads=heads,
                   image_layers=image_layers, text_layers=text_layers, fusion_layers=fusion_layers,
                   context_length=context, embed_dim=embed, queue_size=queue, init_std=std,
                   alpha_warmup_steps=warmup)
        return apply_overrides(base, overrides)


def caption_key(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """A key per caption, equal for equal captions: ``(B, L)`` ids, ``(B, L)`` mask -> ``(B,)`` int64 in
    ``[0, 2^31 - 1)``, a polynomial hash of the real tokens (padding is skipped)."""
    prime, base = 2**31 - 1, 1_000_003 % (2**31 - 1)
    key = torch.zeros(input_ids.shape[0], dtype=torch.long, device=input_ids.device)
    for t in range(input_ids.shape[1]):  # (key * base + id) mod prime stays below 2^62: no overflow
        key = torch.where(attention_mask[:, t].bool(), (key * base + input_ids[:, t].long() + 1) % prime, key)
    return key


class ALBEFEncoders(nn.Module):
    """Everything ALBEF keeps a momentum copy of: the ViT, BERT (text + fusion layers, MLM head) and
    the two ITC projections (not the ITM head, not the temperature)."""

    def __init__(self, c: ALBEFConfig):
        super().__init__()
        self.patches = PatchEmbedding(c.image_size, c.patch_size, c.dim)  # (B, 1 + N, D), [CLS] first
        self.embeddings = TextEmbeddings(c.vocab_size, c.dim, max_positions=c.context_length, dropout=c.dropout)
        self.encoder = FusionEncoder(dim=c.dim, num_heads=c.heads, num_layers=c.text_layers + c.fusion_layers,
                                     fusion_layers=c.fusion_layers, image_layers=c.image_layers,
                                     mlp_ratio=c.mlp_ratio, dropout=c.dropout)
        self.vision_proj = nn.Linear(c.dim, c.embed_dim)
        self.text_proj = nn.Linear(c.dim, c.embed_dim)
        self.mlm_head = MLMHead(c.dim, c.vocab_size, tie_to=self.embeddings.word_embeddings, layer_norm_eps=1e-12)
        init_weights(self, c.init_std)

    def encode_image(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, 3, H, W)`` -> image tokens ``(B, 1 + N, D)`` and the normalised ITC feature ``(B, E)``."""
        tokens, _ = self.encoder.encode_image(self.patches(images))
        return tokens, F.normalize(self.vision_proj(tokens[:, 0]), dim=-1)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        """``(B, L)`` ids -> unimodal text tokens ``(B, L, D)`` and the normalised ITC feature ``(B, E)``."""
        tokens, _ = self.encoder.encode_text(self.embeddings(input_ids), attention_mask)
        return tokens, F.normalize(self.text_proj(tokens[:, 0]), dim=-1)

    def fuse(self, text_tokens, attention_mask, image_tokens, return_attention: bool = False):
        """Unimodal text ``(B, L, D)`` + image tokens ``(B, Li, D)`` -> fused text ``(B, L, D)`` and maps."""
        return self.encoder.fuse(text_tokens, attention_mask, image_tokens, None, return_attention)


class ALBEF(nn.Module):
    """``forward(batch)`` -> ``{"loss", "itc", "itm", "mlm", "alpha", "temperature"}`` (see the module doc)."""

    inputs = "images"

    def __init__(self, config: ALBEFConfig):
        super().__init__()
        if not isinstance(config, ALBEFConfig):
            raise ValueError(f"config must be an ALBEFConfig, got {type(config).__name__}")
        c = self.config = config
        self.encoders = ALBEFEncoders(c)
        self.momentum_encoders = momentum_copy(self.encoders)  # frozen; follows by EMA
        self.itm_head = nn.Linear(c.dim, 2)
        init_weights(self.itm_head, c.init_std)
        # ALBEF learns the temperature itself (not its log, as CLIP): at ALBEF's lr 1e-4 it moves ~1e-4 a step
        self.temp = nn.Parameter(torch.tensor(c.temperature), requires_grad=c.learn_temperature)
        generator = torch.Generator().manual_seed(0)
        self.image_queue = FeatureQueue(c.embed_dim, c.queue_size, generator)
        self.text_queue = FeatureQueue(c.embed_dim, c.queue_size, generator)
        # a key of each queued caption (caption_key; -1: an initial random row, never a positive)
        self.register_buffer("caption_queue", torch.full((c.queue_size,), -1, dtype=torch.long))
        self.register_buffer("forwards", torch.zeros((), dtype=torch.long))  # training forwards so far

    # ------------------------------------------------------------------ inputs

    def _check_batch(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if not isinstance(batch, dict):
            raise ValueError(f"batch must be a dict with images, input_ids and attention_mask, got "
                             f"{type(batch).__name__}")
        for key in ("images", "input_ids", "attention_mask"):
            if key not in batch:
                raise ValueError(f"batch has no {key!r}; ALBEF reads images (B, 3, H, W), input_ids (B, L) "
                                 "and attention_mask (B, L)")
        images = self._check_images(batch["images"])
        ids, mask = self._check_text(batch["input_ids"], batch["attention_mask"])
        if len(ids) != len(images):
            raise ValueError(f"input_ids has {len(ids)} captions but images has {len(images)} images")
        return images, ids, mask

    def _check_images(self, images) -> torch.Tensor:
        c = self.config
        check_shape("images", images, (None, 3, c.image_size, c.image_size))
        if images.dtype == torch.uint8:
            return images.float() / 255.0
        if not images.is_floating_point():
            raise ValueError(f"images must be float in [0, 1] or uint8, got dtype {images.dtype}")
        return images

    def _check_text(self, ids, mask) -> tuple[torch.Tensor, torch.Tensor]:
        check_shape("input_ids", ids, (None, None))
        check_shape("attention_mask", mask, tuple(ids.shape))
        if ids.shape[1] > self.config.context_length:
            raise ValueError(f"input_ids has {ids.shape[1]} tokens; the context length is {self.config.context_length}")
        if ids.device.type == "cpu" and not mask.bool().any(1).all():
            raise ValueError("attention_mask has a row with no real token: every caption needs its [CLS]")
        return ids, mask.bool()

    # ------------------------------------------------------------------ evaluation interface

    @torch.no_grad()
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` -> ITC features ``(B, E)``, L2-normalised (the unimodal image encoder)."""
        return self.encoders.encode_image(self._check_images(images))[1]

    @torch.no_grad()
    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``(B, L)``, ``(B, L)`` -> ITC features ``(B, E)``, L2-normalised (the text layers alone)."""
        return self.encoders.encode_text(*self._check_text(input_ids, attention_mask))[1]

    @torch.no_grad()
    def similarity(self, images, input_ids, attention_mask, batch_size: int = 256) -> torch.Tensor:
        """ITC cosine similarity ``(N_images, N_texts)``, encoded in chunks of ``batch_size``."""
        img = torch.cat([self.encode_image(images[i:i + batch_size]) for i in range(0, len(images), batch_size)])
        txt = torch.cat([self.encode_text(input_ids[i:i + batch_size], attention_mask[i:i + batch_size])
                         for i in range(0, len(input_ids), batch_size)])
        return img @ txt.T

    def encode(self, batch: dict, return_attention: bool = False) -> FusionOutput:
        """The fused encoding of ``batch``: ``text (B, L, D)`` fused, ``image (B, Li, D)``, ``pooled``
        the fused [CLS] (ITM's input), ``attentions`` the fusion layers' maps."""
        images, ids, mask = self._check_batch(batch)
        image_tokens, _ = self.encoders.encode_image(images)
        text_tokens, _ = self.encoders.encode_text(ids, mask)
        fused, maps = self.encoders.fuse(text_tokens, mask, image_tokens, return_attention)
        return FusionOutput(text=fused, image=image_tokens, pooled=fused[:, 0], attentions=maps)

    def match_scores(self, batch: dict) -> torch.Tensor:
        """ITM logit of "matched" for each pair of ``batch``: ``(B,)`` (ALBEF's ``itm_head(...)[:, 1]``)."""
        return self.itm_head(self.encode(batch).pooled)[:, 1]

    # ------------------------------------------------------------------ pretraining

    def current_alpha(self) -> float:
        """The distillation weight now: ``alpha * min(1, forwards / alpha_warmup_steps)`` (0 without distill)."""
        c = self.config
        if not c.distill:
            return 0.0
        if c.alpha_warmup_steps == 0:
            return c.alpha
        return c.alpha * min(1.0, int(self.forwards) / c.alpha_warmup_steps)

    def forward(self, batch: dict) -> dict:
        c = self.config
        images, ids, mask = self._check_batch(batch)
        B = images.shape[0]
        if B < 2:
            raise ValueError(f"ALBEF needs a batch of at least 2 pairs (ITC and ITM negatives), got {B}")
        if self.training:
            with torch.no_grad():
                self.temp.clamp_(0.001, 0.5)
        alpha = self.current_alpha()
        enc, mom = self.encoders, self.momentum_encoders

        image_tokens, image_feat = enc.encode_image(images)  # (B, Li, D), (B, E)
        text_tokens, text_feat = enc.encode_text(ids, mask)  # (B, L, D), (B, E)

        # ---- ITC against the momentum keys and the queues, soft targets from the momentum model
        with torch.no_grad():
            if self.training:
                momentum_update(enc, mom, c.momentum)
            image_tokens_m, image_feat_m = mom.encode_image(images)
            _, text_feat_m = mom.encode_text(ids, mask)
            image_all = torch.cat([image_feat_m, self.image_queue.queue.clone()])  # (B + Q, E)
            text_all = torch.cat([text_feat_m, self.text_queue.queue.clone()])
            if c.caption_positives:  # every key with the same caption as query i is a positive of it
                keys = caption_key(ids, mask)
                same = keys[:, None] == torch.cat([keys, self.caption_queue])[None]  # (B, B + Q)
                hard = same.float() / same.sum(1, keepdim=True)
            else:
                hard = torch.eye(B, len(text_all), device=images.device)
            if alpha > 0:
                target_i2t = distillation_targets(image_feat_m @ text_all.T / self.temp, alpha, hard)
                target_t2i = distillation_targets(text_feat_m @ image_all.T / self.temp, alpha, hard)
            else:
                target_i2t = target_t2i = hard
        if c.itc_keys == "batch":  # the batch's own features, with gradient (CLIP), then the queue
            text_all = torch.cat([text_feat, text_all[B:]])
            image_all = torch.cat([image_feat, image_all[B:]])
        sim_i2t = image_feat @ text_all.T / self.temp  # (B, B + Q)
        sim_t2i = text_feat @ image_all.T / self.temp
        loss_itc = (soft_cross_entropy(sim_i2t.float(), target_i2t.float())
                    + soft_cross_entropy(sim_t2i.float(), target_t2i.float())) / 2

        # ---- ITM: B positives, a hard negative image per text and a hard negative text per image
        fused_pos, _ = enc.fuse(text_tokens, mask, image_tokens)
        if c.hard_negatives and c.itc_weight > 0:
            neg_image, neg_text = sample_hard_negatives(sim_i2t[:, :B].detach(), sim_t2i[:, :B].detach(),
                                                        same_image=same[:, :B] if c.caption_positives else None,
                                                        eps=c.hard_negative_eps)
        else:  # random negatives (without ITC the similarity is untrained: the paper's MLM + ITM baseline)
            neg_image = sample_random_negatives(B, device=images.device)
            neg_text = sample_random_negatives(B, device=images.device)
        text_neg = torch.cat([text_tokens, text_tokens[neg_text]])  # (2B, L, D): [text_pos | text_neg]
        mask_neg = torch.cat([mask, mask[neg_text]])
        image_neg = torch.cat([image_tokens[neg_image], image_tokens])  # [image_neg | image_pos]
        fused_neg, _ = enc.fuse(text_neg, mask_neg, image_neg)
        logits = self.itm_head(torch.cat([fused_pos[:, 0], fused_neg[:, 0]]))  # (3B, 2)
        labels = torch.cat([torch.ones(B, dtype=torch.long), torch.zeros(2 * B, dtype=torch.long)]).to(logits.device)
        loss_itm = itm_loss(logits.float(), labels)

        # ---- MLM on the fused caption, with the momentum model's predictions as soft targets
        masked_ids, mlm_labels = mask_tokens(ids, c.vocab_size, MASK_ID, special_token_ids=(PAD_ID, CLS_ID),
                                             mask_prob=c.mask_prob)
        chosen = mlm_labels != IGNORE_INDEX
        hidden, _ = enc.fuse(enc.encode_text(masked_ids, mask)[0], mask, image_tokens)
        logits_mlm = enc.mlm_head(hidden[chosen]).float()  # (M, V)
        if chosen.any():
            loss_mlm = F.cross_entropy(logits_mlm, mlm_labels[chosen])
            if alpha > 0:
                with torch.no_grad():
                    hidden_m, _ = mom.fuse(mom.encode_text(masked_ids, mask)[0], mask, image_tokens_m)
                    soft = F.softmax(mom.mlm_head(hidden_m[chosen]).float(), dim=-1)
                loss_mlm = (1 - alpha) * loss_mlm + alpha * soft_cross_entropy(logits_mlm, soft)
        else:  # no token drawn in the whole batch (tiny batches): nothing to predict
            loss_mlm = logits_mlm.sum() * 0.0

        if self.training:
            with torch.no_grad():
                image_m, text_m = gather_features(image_feat_m, text_feat_m, local_loss=True, gather_with_grad=False)
                if c.caption_positives:
                    key_m = gather_features(*[keys[:, None].double()] * 2, local_loss=True, gather_with_grad=False)[0]
                    rows = (self.text_queue.ptr + torch.arange(len(key_m[-c.queue_size:]), device=key_m.device))
                    self.caption_queue[rows % c.queue_size] = key_m[-c.queue_size:, 0].long()
                self.image_queue.dequeue_and_enqueue(image_m[-c.queue_size:])
                self.text_queue.dequeue_and_enqueue(text_m[-c.queue_size:])
                self.forwards += 1
        loss = c.itc_weight * loss_itc + c.itm_weight * loss_itm + c.mlm_weight * loss_mlm
        device = loss.device
        return {"loss": loss, "itc": loss_itc.detach(), "itm": loss_itm.detach(), "mlm": loss_mlm.detach(),
                "alpha": torch.tensor(alpha, device=device), "temperature": self.temp.detach().clone()}

    def num_parameters(self) -> int:
        """Trainable parameters (the momentum encoders are a frozen copy, not counted)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)
