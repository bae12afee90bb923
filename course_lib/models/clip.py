"""CLIP (Radford et al., 2021, "Learning Transferable Visual Models From Natural Language Supervision").

The figure of the paper, in code:
- features: a patch ViT (``features.patch.PatchEmbedding``, no conv bias, as CLIP) or a small CNN
  (``vision="cnn"``: its grid, mean-pooled) for images; token + learned position embeddings for
  captions;
- fusion: none; the two towers are ``course_lib.fusion.two_tower.TwoTowerFusion`` (the same block
  notebook 04 compares with the other fusion styles), meeting only in the dot product of their
  L2-normalised embeddings;
- objective: symmetric InfoNCE over the (B, B) similarity matrix with a learnable temperature
  (``course_lib.objectives.itc.ContrastiveLoss``), its scale clamped at 100 before every training
  step (``clamp_logit_scale``; False shows what the clamp prevents, notebook 22).

The text tower is CLIP's: causal self-attention, the sentence embedding read at the end-of-text
token (our ``[SEP]``, the last real token), then a linear projection.

Hugging Face interop: ``from_transformers(CLIPModel)`` and ``to_transformers(CLIP)`` copy every
weight (the names map one to one), so a model trained here is a ``CLIPModel`` with the same
embeddings (tested in ``tests/test_clip.py``).

For pretraining at scale (``course_lib.pretrain``): ``set_grad_checkpointing()`` recomputes each
transformer layer's activations during backward instead of storing them (less memory, about
one more forward of compute), and ``forward(batch, embeddings_only=True)`` +
``loss_from_embeddings`` let the training loop accumulate gradients over micro-batches while
keeping the contrastive loss of the whole global batch (open_clip's ``--accum-freq``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from course_lib.features.cnn import SmallCNN
from course_lib.features.patch import PatchEmbedding
from course_lib.features.text import CLS_ID, PAD_ID, SEP_ID
from course_lib.fusion.hf_import import clip_tower_rules, load_from_hf_clip
from course_lib.fusion.two_tower import TwoTowerFusion
from course_lib.objectives.itc import ContrastiveLoss
from course_lib.presets import apply_overrides, get_preset
from course_lib.utils import check_one_of, check_shape


@dataclass(frozen=True)
class CLIPConfig:
    vocab_size: int = 256
    image_size: int = 32
    patch_size: int = 4
    vision: str = "vit"  # "vit" (patches) or "cnn" (grid features, pooled)
    vision_width: int = 64
    vision_layers: int = 2
    vision_heads: int = 4
    text_width: int = 64
    text_layers: int = 2
    text_heads: int = 4
    context_length: int = 32
    embed_dim: int = 64
    mlp_ratio: float = 4.0
    init_temperature: float = 0.07
    max_logit_scale: float = 100.0  # CLIP's clamp of 1 / temperature
    clamp_logit_scale: bool = True  # False: no clamp (what it prevents, notebook 22)
    dropout: float = 0.0

    def __post_init__(self):
        check_one_of("vision", self.vision, ("vit", "cnn"))
        for name in ("vocab_size", "image_size", "patch_size", "vision_width", "vision_layers", "vision_heads",
                     "text_width", "text_layers", "text_heads", "context_length", "embed_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not self.max_logit_scale >= 1 / self.init_temperature:
            raise ValueError(f"max_logit_scale={self.max_logit_scale} must be >= 1 / init_temperature "
                             f"= {1 / self.init_temperature:.4g}")

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "CLIPConfig":
        size = get_preset(name)
        base = cls(**{k: getattr(size, k) for k in (
            "image_size", "patch_size", "vision_width", "vision_layers", "vision_heads", "text_width",
            "text_layers", "text_heads", "context_length", "embed_dim", "mlp_ratio")})
        return apply_overrides(base, overrides)


class TextEmbedding(nn.Module):
    """CLIP's text input: ``token_embedding(ids) + position_embedding`` (no LayerNorm, no segments).
    ``input_ids (B, L)`` -> ``(B, L, D)``; names follow HF's ``CLIPTextEmbeddings``."""

    def __init__(self, vocab_size: int, dim: int, context_length: int):
        super().__init__()
        self.token_embedding = nn.Embedding(vocab_size, dim)
        self.position_embedding = nn.Embedding(context_length, dim)
        nn.init.normal_(self.position_embedding.weight, std=0.01)
        self.context_length = context_length

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        length = input_ids.shape[1]
        if length > self.context_length:
            raise ValueError(f"input_ids has {length} tokens; the context length is {self.context_length}")
        return self.token_embedding(input_ids) + self.position_embedding.weight[:length]  # (B, L, D)


class TowerView(nn.Module):
    """One tower of a ``CLIP`` as a module of its own (``clip.visual`` / ``clip.text``), for FLOP
    counts and hooks: ``forward`` -> ``(tokens (B, N, D), embedding (B, E) not normalised, maps)``.
    It owns no weights; they stay in the ``CLIP``."""

    def __init__(self, model: "CLIP", which: str):
        super().__init__()
        self.model, self.which = model, which

    def forward(self, *inputs, return_attention: bool = False):
        if self.which == "image":
            return self.model.image_features(*inputs, return_attention=return_attention)
        return self.model.text_features(*inputs, return_attention=return_attention)


class CLIP(nn.Module):
    """``forward(batch)`` with ``images (B, 3, H, W)``, ``input_ids (B, L)``, ``attention_mask (B, L)``
    -> ``{"loss", "temperature"}``.

    ``forward(batch, embeddings_only=True)`` -> ``{"image_emb": (B, E), "text_emb": (B, E)}``
    (L2-normalised), to be scored by ``loss_from_embeddings``.
    """

    def __init__(self, config: CLIPConfig):
        super().__init__()
        if not isinstance(config, CLIPConfig):
            raise ValueError(f"config must be a CLIPConfig, got {type(config).__name__}")
        c = self.config = config
        if c.vision == "vit":
            self.image_embed = PatchEmbedding(c.image_size, c.patch_size, c.vision_width, bias=False)
        else:
            self.image_embed = SmallCNN(channels=(32, 64, c.vision_width))
        self.text_embed = TextEmbedding(c.vocab_size, c.text_width, c.context_length)
        self.towers = TwoTowerFusion(
            dim=c.text_width, num_heads=c.text_heads, num_layers=c.text_layers, mlp_ratio=c.mlp_ratio,
            dropout=c.dropout, embed_dim=c.embed_dim, image_dim=c.vision_width, image_heads=c.vision_heads,
            image_layers=c.vision_layers if c.vision == "vit" else 0,
            image_pool="first" if c.vision == "vit" else "mean")
        self.itc = ContrastiveLoss(init_temperature=c.init_temperature, max_logit_scale=c.max_logit_scale)

    # ------------------------------------------------------------------ the towers

    def image_features(self, images: torch.Tensor, return_attention: bool = False):
        """``images (B, 3, H, W)`` -> tokens ``(B, N, Dv)``, embedding ``(B, E)`` (not normalised), maps."""
        tokens = self.image_embed(images)
        if self.config.vision == "cnn":
            tokens = tokens.flatten(2).transpose(1, 2)  # (B, h*w, Dv)
        return self.towers.encode_image(tokens, None, return_attention)

    def text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, return_attention: bool = False):
        """``input_ids (B, L)``, ``attention_mask (B, L)`` (1: real token) -> tokens ``(B, L, Dt)``,
        embedding ``(B, E)`` read at the last real token ([SEP]), maps."""
        check_shape("input_ids", input_ids, (None, None))
        if input_ids.is_floating_point():
            raise ValueError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
        check_shape("attention_mask", attention_mask, tuple(input_ids.shape))
        B, L = input_ids.shape
        mask = self.towers._check_mask("attention_mask", attention_mask, B, L, input_ids.device)
        return self.towers.encode_text(self.text_embed(input_ids), mask, return_attention)

    @property
    def visual(self) -> TowerView:
        """The image tower as a module: ``clip.visual(images)``."""
        return TowerView(self, "image")

    @property
    def text(self) -> TowerView:
        """The text tower as a module: ``clip.text(input_ids, attention_mask)``."""
        return TowerView(self, "text")

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, embed_dim), L2-normalised."""
        return F.normalize(self.image_features(images)[1], dim=-1)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, L), (B, L) -> (B, embed_dim), L2-normalised."""
        return F.normalize(self.text_features(input_ids, attention_mask)[1], dim=-1)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing in both towers' transformer layers (open_clip's name)."""
        if not isinstance(enable, bool):
            raise ValueError(f"enable must be True or False, got {enable!r}")
        self.towers.grad_checkpointing = enable

    # ------------------------------------------------------------------ the loss

    def forward(self, batch: dict, embeddings_only: bool = False) -> dict:
        if not isinstance(batch, dict) or not {"images", "input_ids", "attention_mask"} <= set(batch):
            got = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
            raise ValueError(f"batch must be a dict with images, input_ids and attention_mask, got {got}")
        if self.training and self.config.clamp_logit_scale:
            self.itc.clamp_()  # CLIP clamps 1/temperature at 100 after every step; before each is the same
        image_emb = self.encode_image(batch["images"])
        text_emb = self.encode_text(batch["input_ids"], batch["attention_mask"])
        if embeddings_only:
            return {"image_emb": image_emb, "text_emb": text_emb}
        return self.loss_from_embeddings(image_emb, text_emb)

    def loss_from_embeddings(self, image_emb: torch.Tensor, text_emb: torch.Tensor,
                             learn_temperature: bool = True) -> dict:
        """ITC loss of ``image_emb (B, E)`` against ``text_emb (B, E)`` -> ``{"loss", "temperature"}``.

        ``learn_temperature=False`` scores with a detached temperature: gradient accumulation
        over k micro-batches evaluates the global-batch loss k times and must differentiate it
        with respect to the temperature once only.
        """
        if learn_temperature:
            loss = self.itc(image_emb, text_emb)
        else:
            loss = functional_call(self.itc, {"logit_scale": self.itc.logit_scale.detach()}, (image_emb, text_emb))
        # A tensor, not a float: reading it needs no host-device sync (and no graph break).
        return {"loss": loss, "temperature": self.itc.logit_scale.detach().neg().exp()}

    @torch.no_grad()
    def similarity(self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   batch_size: int = 256) -> torch.Tensor:
        """Cosine similarity (N_images, N_texts), encoded in chunks of ``batch_size``."""
        img = torch.cat([self.encode_image(images[i:i + batch_size]) for i in range(0, len(images), batch_size)])
        txt = torch.cat([self.encode_text(input_ids[i:i + batch_size], attention_mask[i:i + batch_size])
                         for i in range(0, len(input_ids), batch_size)])
        return img @ txt.T


# ---------------------------------------------------------------------- Hugging Face interop

# HF CLIPModel names outside the towers -> ours.
_EMBEDDING_RULES = [
    ("text_model.embeddings.token_embedding.", "text_embed.token_embedding."),
    ("text_model.embeddings.position_embedding.", "text_embed.position_embedding."),
    ("vision_model.embeddings.", "image_embed."), ("logit_scale", "itc.logit_scale"),
]


def _rules(model: CLIP) -> list[tuple[str, str]]:
    c = model.config
    return _EMBEDDING_RULES + [(theirs, "towers." + ours)
                               for theirs, ours in clip_tower_rules(c.text_layers, c.vision_layers)]


def _rename(state: dict, rules: list[tuple[str, str]]) -> dict:
    out = {}
    for name, tensor in state.items():
        for src, dst in rules:
            if name.startswith(src):
                out[dst + name[len(src):]] = tensor
                break
    return out


@torch.no_grad()
def from_transformers(hf_model) -> CLIP:
    """A transformers ``CLIPModel`` -> our ``CLIP`` with its weights (the towers through
    ``fusion.hf_import.load_from_hf_clip``, which checks the configs; the embeddings and the
    logit scale copied). Its text end-of-text token must be our ``[SEP]`` (id 3)."""
    if type(hf_model).__name__ != "CLIPModel":
        raise ValueError(f"hf_model must be a transformers CLIPModel, got {type(hf_model).__name__}")
    tc, vc = hf_model.config.text_config, hf_model.config.vision_config
    if tc.eos_token_id != SEP_ID:
        raise ValueError(f"hf_model's text_config.eos_token_id must be {SEP_ID} (our [SEP]), got {tc.eos_token_id}")
    if tc.intermediate_size / tc.hidden_size != vc.intermediate_size / vc.hidden_size:
        raise ValueError("hf_model's towers must share the MLP ratio intermediate_size / hidden_size")
    if tc.hidden_act != "gelu" or vc.hidden_act != "gelu":
        raise ValueError(f"hf_model must use hidden_act='gelu' (ours), got {tc.hidden_act!r} / {vc.hidden_act!r}")
    towers = load_from_hf_clip(hf_model)  # checks the towers' names map one to one
    config = CLIPConfig(vocab_size=tc.vocab_size, image_size=vc.image_size, patch_size=vc.patch_size,
                        vision_width=vc.hidden_size, vision_layers=vc.num_hidden_layers,
                        vision_heads=vc.num_attention_heads, text_width=tc.hidden_size,
                        text_layers=tc.num_hidden_layers, text_heads=tc.num_attention_heads,
                        context_length=tc.max_position_embeddings, embed_dim=hf_model.config.projection_dim,
                        mlp_ratio=tc.intermediate_size / tc.hidden_size)
    model = CLIP(config)
    state = _rename(hf_model.state_dict(), _EMBEDDING_RULES)
    state.update({"towers." + k: v for k, v in towers.state_dict().items()})
    model.load_state_dict(state, strict=True)
    return model.eval()


@torch.no_grad()
def to_transformers(model: CLIP):
    """Our ``CLIP`` (ViT) -> a transformers ``CLIPModel`` with the same weights, in eval mode: its
    ``get_image_features`` / ``get_text_features`` (normalised) equal our ``encode_image`` /
    ``encode_text``. The end-of-text token is our ``[SEP]``; ``save_pretrained`` it like any HF model."""
    from transformers import CLIPConfig as HFConfig, CLIPModel

    if not isinstance(model, CLIP):
        raise ValueError(f"model must be a course CLIP, got {type(model).__name__}")
    c = model.config
    if c.vision != "vit":
        raise ValueError(f"only vision='vit' has a CLIPModel equivalent, got vision={c.vision!r}")
    ffn = lambda width: int(round(c.mlp_ratio * width))  # noqa: E731
    text = dict(vocab_size=c.vocab_size, hidden_size=c.text_width, intermediate_size=ffn(c.text_width),
                num_hidden_layers=c.text_layers, num_attention_heads=c.text_heads,
                max_position_embeddings=c.context_length, hidden_act="gelu", layer_norm_eps=1e-5,
                pad_token_id=PAD_ID, bos_token_id=CLS_ID, eos_token_id=SEP_ID, projection_dim=c.embed_dim)
    vision = dict(hidden_size=c.vision_width, intermediate_size=ffn(c.vision_width),
                  num_hidden_layers=c.vision_layers, num_attention_heads=c.vision_heads, image_size=c.image_size,
                  patch_size=c.patch_size, hidden_act="gelu", layer_norm_eps=1e-5, projection_dim=c.embed_dim)
    hf = CLIPModel(HFConfig(text_config=text, vision_config=vision, projection_dim=c.embed_dim,
                            logit_scale_init_value=float(model.itc.logit_scale))).eval()
    ours = model.state_dict()
    state = {}
    for name in hf.state_dict():
        for theirs, mine in _rules(model):
            if name.startswith(theirs) and mine + name[len(theirs):] in ours:
                state[name] = ours[mine + name[len(theirs):]].detach().clone()
                break
    missing = sorted(set(hf.state_dict()) - set(state))
    if missing:
        raise RuntimeError(f"to_transformers left HF weights unset: {missing[:5]}")
    hf.load_state_dict(state, strict=True)
    return hf


# ---------------------------------------------------------------------- a plain training loop (notebook 22)


def clip_optimizer(model: CLIP, lr: float, weight_decay: float = 0.1, logit_scale_lr: float | None = None,
                   betas: tuple[float, float] = (0.9, 0.98), eps: float = 1e-6) -> torch.optim.AdamW:
    """open_clip's AdamW: weight decay on matrices only (not on gains, biases or the logit scale),
    betas (0.9, 0.98), eps 1e-6; the logit scale in a group of its own, at ``logit_scale_lr``
    (``None``: ``lr``), so notebook 22 can push the temperature hard and see what the clamp does."""
    if not isinstance(model, CLIP):
        raise ValueError(f"model must be a course CLIP, got {type(model).__name__}")
    scale = model.itc.logit_scale
    rest = [p for p in model.parameters() if p.requires_grad and p is not scale]
    groups = [{"params": [p for p in rest if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0}]
    if scale.requires_grad:
        groups.append({"params": [scale], "weight_decay": 0.0, "lr": lr if logit_scale_lr is None else logit_scale_lr})
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)


def fit(model: CLIP, batches, steps: int, lr: float, warmup: int = 0, weight_decay: float = 0.1,
        logit_scale_lr: float | None = None, grad_clip: float | None = 1.0) -> list[dict]:
    """Train ``model`` for ``steps`` steps on ``batches(step)`` (a callable, e.g. ``StepBatches``):
    AdamW (``clip_optimizer``), linear warmup then cosine decay, global gradient clipping, and CLIP's
    clamp of the logit scale after each step when ``config.clamp_logit_scale``. Returns one record
    per step ``{"loss", "scale" (= 1/temperature after the step), "grad_norm"}``; a non-finite loss
    stops the run (its record says so) instead of raising: a diverged run is a result here."""
    from course_lib.train import move_to_device, warmup_cosine_schedule

    if not callable(batches):
        raise ValueError(f"batches must be a callable step -> batch, got {type(batches).__name__}")
    optimizer = clip_optimizer(model, lr, weight_decay, logit_scale_lr)
    schedule = warmup_cosine_schedule(optimizer, warmup, steps)
    device = next(model.parameters()).device
    params = [p for group in optimizer.param_groups for p in group["params"]]
    records = []
    model.train()
    for step in range(steps):
        batch = move_to_device(batches(step), device)
        loss = model(batch)["loss"]
        if not torch.isfinite(loss):
            records.append({"loss": float(loss), "scale": float(model.itc.logit_scale.exp()), "grad_norm": math.nan})
            break
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip else math.inf)
        optimizer.step()
        schedule.step()
        if model.config.clamp_logit_scale:
            model.itc.clamp_()  # open_clip_train: after every optimizer step
        records.append({"loss": loss.item(), "scale": model.itc.logit_scale.exp().item(), "grad_norm": norm.item()})
    model.eval()
    return records
