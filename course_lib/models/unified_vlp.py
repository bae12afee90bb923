"""Unified VLP (Zhou et al. 2020, "Unified Vision-Language Pre-Training for Image Captioning and VQA").

The figure of the paper, in code:

- **one shared transformer** (BERT, ``course_lib.nn.TransformerEncoder``) over
  ``[CLS] r_1 ... r_R [SEP] w_1 ... w_n [SEP]``: no separate encoder and decoder;
- **features**: each region slot's word embedding is replaced by an MLP of its detector feature and
  its position embedding by a projection of its box geometry and the detector's class distribution
  (``course_lib.features.region.VLPRegionEmbedding``); text tokens have BERT's word and position
  embeddings (positions run on through the whole sequence);
- **two self-attention masks, chosen per sample** (``course_lib.fusion.attention_masks``): the
  *seq2seq* mask (share ``s2s_prob``, 0.75: everyone sees ``[CLS]`` + regions + ``[SEP]``, the caption
  sees itself causally, the image never sees the caption) and the *bidirectional* mask (``bi_prob``,
  0.25). The **segment ids tell the model which mask is in use**: 4/5 (image/text) for seq2seq, 0/1 for
  bidirectional, the paper's ``--new_segment_ids`` (``mode_segments=False`` gives 0/1 to both);
- **one objective**: masked-token prediction on the caption only
  (``course_lib.objectives.mlm.mask_target_tokens``: ``n_pred = min(3, max(1, round(0.15 n)))``,
  80/10/10). Under the seq2seq mask it is the cloze *generation* objective, under the bidirectional
  one BERT's MLM. ``forward(batch)`` returns ``{"loss", "mlm_s2s", "mlm_bi"}``: the mean over every
  masked token of the batch (the paper's loss) and the same mean over each mask's samples;
- **captioning** (``generate``): append ``[MASK]``, predict it under the seq2seq mask, write the
  prediction in its place, repeat (greedy over the words and ``[SEP]``) until ``[SEP]`` or ``max_len``.
  Without a key/value cache: each step reruns the sequence, which under the seq2seq mask gives exactly the outputs the
  paper's incremental decoder (``BertModelIncr``) computes from cached states;
- **VQA from the same weights**: the bidirectional mask, and the elementwise product of the final
  ``[CLS]`` and of the ``[SEP]`` after the regions (``encode(batch).pooled``) into
  ``course_lib.evaluate.VQAHead`` (``course_lib.evaluate.VQAFineTuner`` does the fine-tuning).

Where the course deviates (to fit a CPU and ShapeWorld): boxes come normalised by the image size
(the paper divides by the largest box coordinate, an estimate of it); without ``region_probs``
(region shards from the TSV releases keep only the top class) the class distribution is the one-hot
top class with confidence 1; the feature MLP's first layer is learned from scratch (the paper starts
it from Detectron's fc7); ``max_regions`` slots (6 on ShapeWorld, the paper's 100 at the GPU presets;
region shards hold 36: ``--model.max_regions=36``), padded slots hidden by the key mask; no UniLM
initialisation, no Selfie-like region pretext (off in the paper too), no SCST stage.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from course_lib.features.region import VLPRegionEmbedding
from course_lib.features.text import CLS_ID, MASK_ID, PAD_ID, SEP_ID, UNK_ID
from course_lib.fusion.attention_masks import unified_mask
from course_lib.fusion.base import FusionOutput
from course_lib.models.region_bert import REGION_SIZES, check_region_batch
from course_lib.nn import TransformerEncoder, init_weights
from course_lib.objectives.mlm import IGNORE_INDEX, MLMHead, mask_target_tokens, masked_lm_loss
from course_lib.presets import apply_overrides, get_preset
from course_lib.utils import check_shape

# Region slots per preset: ShapeWorld's detections at the CPU presets, the paper's 100 boxes at the GPU ones.
MAX_REGIONS = {"cpu-tiny": 6, "cpu-small": 6, "gpu-small": 100, "gpu-base": 100}
# Segment ids (image part, text part) per mask, the paper's --new_segment_ids; 2/3 (UniLM's left-to-right
# LM) are unused, so the table has 6 rows as the paper's.
SEGMENTS = {"bi": (0, 1), "s2s": (4, 5)}
NUM_SEGMENTS = 6
MODES = ("bi", "s2s")


@dataclass(frozen=True)
class UnifiedVLPConfig:
    vocab_size: int = 256
    context_length: int = 32  # caption tokens, [CLS] and [SEP] included
    dim: int = 64
    layers: int = 2
    heads: int = 4
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    layer_norm_eps: float = 1e-12
    init_std: float = 0.1
    region_feat_dim: int = 108
    num_region_classes: int = 19  # detector classes + "no object"
    max_regions: int = 6  # region slots (the position table has max_regions + context_length + 1 rows)
    s2s_prob: float = 0.75  # share of samples trained with the seq2seq mask...
    bi_prob: float = 0.25  # ...and with the bidirectional mask (the two add up to 1)
    mask_prob: float = 0.15  # caption tokens predicted per sample: min(max_pred, max(1, round(mask_prob n)))
    max_pred: int = 3
    mode_segments: bool = True  # segment ids 4/5 for seq2seq samples, 0/1 for bidirectional ones
    max_decode_len: int = 20  # generated tokens, [SEP] included (the paper's 20; at most context_length - 1)

    def __post_init__(self):
        for name in ("vocab_size", "context_length", "dim", "layers", "heads", "region_feat_dim", "max_regions",
                     "max_pred", "max_decode_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if self.dim % self.heads:
            raise ValueError(f"dim={self.dim} must be a multiple of heads={self.heads}")
        if self.vocab_size <= MASK_ID + 1:
            raise ValueError(f"vocab_size must be > {MASK_ID + 1} (the special tokens), got {self.vocab_size}")
        if self.context_length < 3:
            raise ValueError(f"context_length must be >= 3 ([CLS], a word, [SEP]), got {self.context_length}")
        if self.num_region_classes < 2:
            raise ValueError(f"num_region_classes must be >= 2 (classes + 'no object'), got {self.num_region_classes}")
        for name in ("s2s_prob", "bi_prob"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {value!r}")
        if abs(self.s2s_prob + self.bi_prob - 1.0) > 1e-6:
            raise ValueError(f"s2s_prob + bi_prob must be 1 (each sample gets one of the two masks), got "
                             f"{self.s2s_prob} + {self.bi_prob}")
        if not 0.0 < self.mask_prob <= 1.0:
            raise ValueError(f"mask_prob must be in (0, 1], got {self.mask_prob!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if not isinstance(self.mode_segments, bool):
            raise ValueError(f"mode_segments must be True or False, got {self.mode_segments!r}")

    @classmethod
    def from_preset(cls, name: str, **overrides):
        get_preset(name)  # an unknown name lists the valid ones
        dim, layers, heads, context, feat, classes, std, vocab = REGION_SIZES[name]
        base = cls(dim=dim, layers=layers, heads=heads, context_length=context, region_feat_dim=feat,
                   num_region_classes=classes, init_std=std, vocab_size=vocab, max_regions=MAX_REGIONS[name])
        return apply_overrides(base, overrides)


class UnifiedVLP(nn.Module):
    """``forward(region batch)`` -> ``{"loss", "mlm_s2s", "mlm_bi"}``; ``generate(batch)`` -> caption ids;
    ``encode(batch, mode="bi").pooled`` -> the VQA input. See the module docstring."""

    config_class = UnifiedVLPConfig
    inputs = "regions"  # course_lib.pretrain feeds it region batches

    def __init__(self, config: UnifiedVLPConfig):
        super().__init__()
        if not isinstance(config, self.config_class):
            raise ValueError(f"config must be a {self.config_class.__name__}, got {type(config).__name__}")
        c = self.config = config
        self.word_embeddings = nn.Embedding(c.vocab_size, c.dim, padding_idx=PAD_ID)
        self.position_embeddings = nn.Embedding(c.max_regions + c.context_length + 1, c.dim)
        self.segment_embeddings = nn.Embedding(NUM_SEGMENTS, c.dim)
        self.region_embedding = VLPRegionEmbedding(c.region_feat_dim, c.num_region_classes, c.dim, c.dropout)
        self.embed_norm = nn.LayerNorm(c.dim, eps=c.layer_norm_eps)
        self.embed_dropout = nn.Dropout(c.dropout)
        self.encoder = TransformerEncoder(c.layers, c.dim, c.heads, c.mlp_ratio, c.dropout,
                                          layer_norm_eps=c.layer_norm_eps)
        self.mlm_head = MLMHead(c.dim, c.vocab_size, tie_to=self.word_embeddings, layer_norm_eps=c.layer_norm_eps)
        self.grad_checkpointing = False
        init_weights(self, std=c.init_std)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each transformer layer in backward instead of storing its activations."""
        if not isinstance(enable, bool):
            raise ValueError(f"enable must be True or False, got {enable!r}")
        self.grad_checkpointing = enable

    # ------------------------------------------------------------------ the input sequence

    def check_batch(self, batch: dict, words: bool = True) -> None:
        """A clear ``ValueError`` naming the key unless ``batch`` is a region batch this model reads
        (``region_bert.check_region_batch``) whose captions start with ``[CLS]``. ``words=False`` allows
        a caption without a word (``[CLS] [MASK]``, where decoding starts)."""
        if not isinstance(batch, dict):
            raise ValueError(f"batch must be a dict of tensors (a region batch), got {type(batch).__name__}")
        if words:
            check_region_batch(batch, self.config)
        else:
            self.check_images(batch)
            ids = batch.get("input_ids")
            check_shape("input_ids", ids, (batch["region_feats"].shape[0], None))
            check_shape("attention_mask", batch.get("attention_mask"), tuple(ids.shape))
            if ids.shape[1] > self.config.context_length:
                raise ValueError(f"input_ids has {ids.shape[1]} tokens; the model's context_length is "
                                 f"{self.config.context_length}")
        ids = batch["input_ids"]
        if ids.device.type == "cpu" and not (ids[:, 0] == CLS_ID).all():
            raise ValueError(f"input_ids must start with [CLS] (id {CLS_ID}) in every row: "
                             "[CLS] caption [SEP] [PAD]...")

    def check_images(self, batch: dict) -> None:
        """The region keys of ``batch`` checked as ``check_region_batch`` does (a caption is not needed)."""
        if not isinstance(batch, dict) or "region_feats" not in batch:
            raise ValueError("batch must be a region batch (region_feats, region_boxes, region_mask, ...)")
        feats = batch["region_feats"]
        check_shape("region_feats", feats, (None, None, self.config.region_feat_dim))
        probe = torch.tensor([[CLS_ID, MASK_ID + 1, SEP_ID]], device=feats.device).expand(feats.shape[0], -1)
        check_region_batch({**batch, "input_ids": probe, "attention_mask": torch.ones_like(probe)}, self.config)

    def modes(self, mode, batch_size: int, device) -> torch.Tensor:
        """``mode``: ``"bi"``, ``"s2s"`` or a ``(B,)`` bool tensor (True: seq2seq) -> ``(B,)`` bool."""
        if isinstance(mode, torch.Tensor):
            if mode.shape != (batch_size,) or mode.dtype != torch.bool:
                raise ValueError(f"mode as a tensor must be ({batch_size},) bool (True: seq2seq), got "
                                 f"{tuple(mode.shape)} {mode.dtype}")
            return mode.to(device)
        if mode not in MODES:
            raise ValueError(f"mode must be 'bi', 's2s' or a (B,) bool tensor, got {mode!r}")
        return torch.full((batch_size,), mode == "s2s", dtype=torch.bool, device=device)

    def sample_modes(self, batch_size: int, device, generator: torch.Generator | None = None) -> torch.Tensor:
        """``(B,)`` bool, True for the samples that get the seq2seq mask: each with probability ``s2s_prob``
        (the paper's ``random.choices``). With both masks on, a batch of 2 or more holds at least one
        sample of each (the first or last is flipped if the draw gave none), so both losses exist."""
        c = self.config
        s2s = torch.rand(batch_size, generator=generator, device=device) < c.s2s_prob
        if 0 < c.s2s_prob < 1:
            if batch_size < 2:
                raise ValueError("a batch of at least 2 samples is needed while both masks are in use "
                                 "(s2s_prob and bi_prob > 0), so that both losses are defined")
            s2s[0] |= not bool(s2s.any())
            s2s[-1] &= not bool(s2s.all())
        return s2s

    def segment_ids(self, s2s: torch.Tensor, source_len: int, text_len: int) -> torch.Tensor:
        """``(B, source_len + text_len)``: the image-part and text-part segment of each sample's mask."""
        bi_image, bi_text = SEGMENTS["bi"]
        s2s_image, s2s_text = SEGMENTS["s2s"] if self.config.mode_segments else SEGMENTS["bi"]
        image = torch.where(s2s, s2s_image, bi_image)[:, None].expand(-1, source_len)
        text = torch.where(s2s, s2s_text, bi_text)[:, None].expand(-1, text_len)
        return torch.cat([image, text], dim=1)

    def region_probs(self, batch: dict) -> torch.Tensor:
        """The detector's class distribution ``(B, R, C + 1)``; without ``region_probs`` the one-hot top
        class (``region_labels``, "no object" where -1) or, with neither, "no object" everywhere."""
        if "region_probs" in batch:
            return batch["region_probs"]
        C = self.config.num_region_classes
        labels = batch.get("region_labels")
        if labels is None:
            labels = torch.full(batch["region_mask"].shape, -1, device=batch["region_feats"].device)
        labels = torch.where(labels >= 0, labels, C - 1)
        return F.one_hot(labels.long(), C).to(batch["region_feats"].dtype)

    def embed(self, batch: dict, input_ids: torch.Tensor, s2s: torch.Tensor):
        """``[CLS] regions [SEP] caption`` embedded: ``(x (B, N, D), key_valid (B, N), source_len)`` with
        ``N = R + L + 1`` and ``source_len = R + 2``. ``input_ids (B, L)`` is ``[CLS] caption [SEP] [PAD]...``."""
        feats = batch["region_feats"]
        B, R, _ = feats.shape
        L = input_ids.shape[1]
        if R > self.config.max_regions:
            raise ValueError(f"region_feats has {R} region slots but the model has max_regions="
                             f"{self.config.max_regions} (its position table); set --model.max_regions={R}")
        content, geometry = self.region_embedding(feats, batch["region_boxes"], self.region_probs(batch))
        words = self.word_embeddings(input_ids)  # (B, L, D)
        pos = self.position_embeddings.weight  # positions run on: [CLS] 0, regions 1..R, [SEP] R+1, caption R+2..
        sep = self.word_embeddings.weight[SEP_ID].expand(B, 1, -1)
        x = torch.cat([words[:, :1] + pos[0],  # [CLS]
                       content + geometry,  # regions: the geometry replaces the position embedding
                       sep + pos[R + 1],  # [SEP] after the regions
                       words[:, 1:] + pos[R + 2:R + L + 1]], dim=1)  # the caption and its [SEP]
        source_len = R + 2
        x = x + self.segment_embeddings(self.segment_ids(s2s, source_len, L - 1))
        ones = torch.ones(B, 1, dtype=torch.bool, device=feats.device)
        key_valid = torch.cat([ones, batch["region_mask"].bool(), ones, batch["attention_mask"][:, 1:].bool()], 1)
        return self.embed_dropout(self.embed_norm(x)), key_valid, source_len

    def _encode(self, batch: dict, input_ids: torch.Tensor, s2s: torch.Tensor,
                return_attention: bool = False) -> FusionOutput:
        x, key_valid, source_len = self.embed(batch, input_ids, s2s)
        attn_mask = unified_mask(key_valid, source_len, s2s)  # (B, N, N)
        if self.grad_checkpointing and torch.is_grad_enabled() and not return_attention:
            for layer in self.encoder.layers:
                x, _ = checkpoint(layer, x, attn_mask=attn_mask, use_reentrant=False)
            h, maps = self.encoder.final_norm(x), [{"self": None} for _ in self.encoder.layers]
        else:
            h, maps = self.encoder(x, attn_mask=attn_mask, return_attention=return_attention)
        R = source_len - 2
        return FusionOutput(text=torch.cat([h[:, :1], h[:, source_len:]], dim=1),  # aligned with input_ids
                            image=h[:, 1:R + 1], pooled=h[:, 0] * h[:, R + 1],
                            attentions=[{"self": m["self"]} for m in maps],
                            extras={"hidden": h, "attn_mask": attn_mask, "source_len": torch.tensor(source_len)})

    def encode(self, batch: dict, input_ids: torch.Tensor | None = None, mode="bi",
               return_attention: bool = False) -> FusionOutput:
        """The fused sequence under ``mode`` (``"bi"``, ``"s2s"`` or a ``(B,)`` bool tensor, True: seq2seq),
        for ``input_ids`` (default: the batch's; a caption may be only ``[CLS] [MASK]``, a decoding step):
        ``text (B, L, D)`` aligned with ``input_ids`` (``[CLS]`` first), ``image (B, R, D)``, ``pooled (B, D)``
        = final ``[CLS]`` * final ``[SEP]`` after the regions (the VQA input), ``attentions``,
        ``extras["hidden"] (B, N, D)`` (the whole sequence) and ``extras["attn_mask"] (B, N, N)``."""
        ids = batch.get("input_ids") if input_ids is None else input_ids
        self.check_batch({**batch, "input_ids": ids}, words=False)
        return self._encode(batch, ids, self.modes(mode, ids.shape[0], ids.device), return_attention)

    # ------------------------------------------------------------------ pretraining

    def forward(self, batch: dict) -> dict:
        c = self.config
        self.check_batch(batch)
        ids = batch["input_ids"]
        s2s = self.sample_modes(ids.shape[0], ids.device)
        masked, labels = mask_target_tokens(ids, batch["attention_mask"], c.vocab_size, c.mask_prob, c.max_pred)
        out = self._encode(batch, masked, s2s)
        picked = labels != IGNORE_INDEX  # (B, L): a few caption tokens per sample
        logits = self.mlm_head(out.text[picked])  # (M, V), only where a token is predicted
        targets = labels[picked]
        losses = {"loss": masked_lm_loss(logits[None], targets[None])}
        rows = picked.nonzero()[:, 0]  # (M,) the sample of each prediction
        for name, chosen in (("mlm_s2s", s2s), ("mlm_bi", ~s2s)):
            if (c.s2s_prob if name == "mlm_s2s" else c.bi_prob) > 0:
                keep = chosen[rows]
                losses[name] = masked_lm_loss(logits[keep][None], targets[keep][None])
        return losses

    # ------------------------------------------------------------------ captioning

    @torch.no_grad()
    def generate(self, batch: dict, max_len: int | None = None, min_len: int = 1) -> torch.Tensor:
        """Greedy captions of the images of ``batch`` (its region keys; a caption is not needed):
        ``(B, T)`` token ids, each row ``w_1 ... [SEP] [PAD]...`` (``T <= max_len``, default
        ``config.max_decode_len`` or ``context_length - 1`` if less; a row that reaches ``max_len`` has
        no ``[SEP]``).

        Step ``t`` appends ``[MASK]`` after ``[CLS] w_1 ... w_{t-1}``, reads its prediction under the
        seq2seq mask and writes it in place of the ``[MASK]``; a row stops at ``[SEP]``. Only words and
        ``[SEP]`` are written (``[PAD] [UNK] [CLS] [MASK]`` never), and ``[SEP]`` not before ``min_len``
        words (the paper's decoder has the same ``min_len`` switch), so no caption is empty.
        """
        c = self.config
        max_len = min(c.max_decode_len, c.context_length - 1) if max_len is None else max_len
        if isinstance(max_len, bool) or not isinstance(max_len, int) or not 1 <= max_len <= c.context_length - 1:
            raise ValueError(f"max_len must be an int in [1, context_length - 1 = {c.context_length - 1}], got "
                             f"{max_len!r}")
        if isinstance(min_len, bool) or not isinstance(min_len, int) or not 0 <= min_len <= max_len:
            raise ValueError(f"min_len must be an int in [0, max_len = {max_len}], got {min_len!r}")
        self.check_images(batch)
        B, device = batch["region_feats"].shape[0], batch["region_feats"].device
        was_training = self.training
        self.eval()
        ids = torch.full((B, 1), CLS_ID, dtype=torch.long, device=device)
        done = torch.zeros(B, dtype=torch.bool, device=device)
        s2s = torch.ones(B, dtype=torch.bool, device=device)
        never = torch.tensor([PAD_ID, UNK_ID, CLS_ID, MASK_ID], device=device)
        for t in range(max_len):
            step = torch.cat([ids, torch.full((B, 1), MASK_ID, dtype=torch.long, device=device)], dim=1)
            out = self._encode({**batch, "attention_mask": (step != PAD_ID).long()}, step, s2s)
            logits = self.mlm_head(out.text[:, -1])  # (B, V) the prediction at [MASK]
            logits[:, never] = float("-inf")
            if t < min_len:
                logits[:, SEP_ID] = float("-inf")
            word = logits.argmax(-1).masked_fill(done, PAD_ID)  # (B,)
            ids = torch.cat([ids, word[:, None]], dim=1)
            done |= word == SEP_ID
            if done.all():
                break
        self.train(was_training)
        return ids[:, 1:]

    def generate_captions(self, batch: dict, tokenizer, max_len: int | None = None, min_len: int = 1) -> list[str]:
        """``generate`` decoded to text: the tokens before the first ``[SEP]``, special tokens dropped."""
        return decode_captions(self.generate(batch, max_len, min_len), tokenizer)


def decode_captions(ids: torch.Tensor, tokenizer) -> list[str]:
    """``(B, T)`` generated ids -> ``B`` strings (cut at the first ``[SEP]``, special tokens dropped)."""
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        raise ValueError(f"ids must be a (B, T) tensor of token ids, got {getattr(ids, 'shape', type(ids).__name__)}")
    captions = []
    for row in ids.tolist():
        row = row[:row.index(SEP_ID)] if SEP_ID in row else row
        captions.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    return captions
