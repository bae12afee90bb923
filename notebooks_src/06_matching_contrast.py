# %% [markdown]
# # 06 · Matching and contrast: ITM with random and hard negatives, ITC
#
# **What you will build.** The two objectives that teach a vision-language model to *score a pair*,
# each written from scratch, checked against `course_lib.objectives`, and trained on one small model:
#
# | objective | the question the model must answer | loss | systems |
# | --- | --- | --- | --- |
# | **ITM**, image-text matching | does this caption describe this image? | 2-way cross-entropy on the fused [CLS] | UNITER (Chen et al. 2020, random negatives from the whole image pool), ALBEF (Li et al. 2021, hard negatives) |
# | **ITC**, image-text contrastive | which caption of the batch belongs to this image? | symmetric InfoNCE, learned temperature | CLIP (Radford et al. 2021), ALIGN, ALBEF |
#
# **The problem they solved.** The masked objectives of notebook 05 only ever see captions with their
# own image. Retrieval ("find the image for this caption") and verification ("is this caption true of
# this image?") need a *score for any pair*, and that needs negatives, pairs that do not match. ITM
# puts a classifier on the fused representation: an accurate judge, but one transformer pass per pair.
# ITC compares two separately computed embeddings: every caption against every image of a batch in one
# matrix product, cheap enough for millions of candidates. ALBEF uses both: ITC proposes, ITM decides,
# and ITC's similarities choose the *hard* negatives that ITM learns the most from.
#
# You will measure what each learned (every score next to its chance level), draw the loss curves and
# the similarity matrix, and compare ITM trained with UNITER's random negatives against ALBEF's hard
# negatives over 3 seeds, on captions that differ from the truth by one word.
#
# **Papers.** Chen et al. (2020) *UNITER: UNiversal Image-TExt Representation Learning* (section 3.2,
# ITM; the negatives come from its code, `data/itm.py`); Radford et al. (2021) *Learning Transferable
# Visual Models From Natural Language Supervision* (CLIP: the symmetric loss, section 2.3 and its Figure 3
# pseudocode; the learned temperature, section 2.5); van den Oord et al. (2018) *Representation Learning with
# Contrastive Predictive Coding* (InfoNCE); Li et al. (2021) *Align before Fuse* (ALBEF: ITC before
# fusion, ITM with hard negatives, and ITC-then-ITM retrieval).
#
# **Where this sits in the course.** The three questions of every VLP model: **1. features** (notebooks
# 01 and 03), **2. fusion** (notebook 04), and **3. objectives**: notebook 05 covered the masked
# objectives (MLM, MRFR, MRC, MRC-kl); this one the matching and contrastive ones; notebook 07 adds
# word-region alignment by optimal transport.
#
# *Terms in English and Chinese: [glossary](../GLOSSARY.md).*

# %% [parameters]
SCALE = "cpu"  # "cpu": about a minute; "gpu": bigger model, longer run; "smoke": a few steps (what the tests run)

# %%
RUN = {
    "smoke": dict(dim=64, heads=4, unimodal_layers=1, fusion_layers=2, mlp_ratio=2.0, steps=20, itm_steps=6,
                  branch_seeds=(0, 1, 2), batch_size=16, branch_batch_size=16, lr=2e-3, itm_lr=1e-3, train_scenes=300, val_scenes=100,
                  rerank_k=8),
    "cpu": dict(dim=64, heads=4, unimodal_layers=1, fusion_layers=2, mlp_ratio=2.0, steps=300, itm_steps=60,
                branch_seeds=(0, 1, 2), batch_size=64, branch_batch_size=32, lr=2e-3, itm_lr=1e-3, train_scenes=3000, val_scenes=500,
                rerank_k=8),
    "gpu": dict(dim=256, heads=8, unimodal_layers=2, fusion_layers=4, mlp_ratio=4.0, steps=4000, itm_steps=1000,
                branch_seeds=(0, 1, 2), batch_size=256, branch_batch_size=256, lr=5e-4, itm_lr=2e-4, train_scenes=20000, val_scenes=2000,
                rerank_k=16),
}[SCALE]
from course_lib.thresholds import assert_learned  # asserts at SCALE cpu/gpu; reports at smoke
RUN

# %%
import math
import time
from dataclasses import replace

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F
from IPython.display import Markdown, display
from torch import nn

from course_lib.utils import count_parameters, get_device, seed_everything

seed_everything(0, threads=2)
from course_lib.data import ShapeWorld, WorldConfig
from course_lib.data.datasets import build_tokenizer
from course_lib.data.language import full_description
from course_lib.data.simulated_detector import DetectorConfig
from course_lib.features.region import box_geometry, pad_regions
from course_lib.features.roi_align import roi_align
from course_lib.features.text import TextEmbeddings, encode
from course_lib.fusion.registry import build_fusion
from course_lib.nn import TransformerEncoder, init_weights
from course_lib.objectives.itc import ContrastiveLoss, contrastive_loss
from course_lib.objectives.itm import itm_loss, sample_hard_negatives
from course_lib.train import TrainConfig, train
from course_lib.viz import plot_losses, plot_similarity

device = get_device()
start_time = time.perf_counter()

# %% [markdown]
# ## 1. Data: captions and detected regions
#
# The data of notebook 05: scenes of two or three objects with their canonical captions ("a small green
# circle, a large yellow square and ...", objects left to right), and on the image side the boxes of
# ShapeWorld's **simulated detector** (jittered, sometimes missing an object, sometimes inventing one).
# Each box becomes a 108-d RoIAlign feature (standardised) and UNITER's 7-d geometry. Here the
# detector's class distributions are not needed: matching and contrast only ask whether a caption and
# a set of regions belong together.

# %%
world = ShapeWorld(WorldConfig(min_objects=2, max_objects=3, seed=0))
tokenizer = build_tokenizer(world, vocab_size=128, num_scenes=300)
detector = DetectorConfig()  # the defaults: 5% box jitter, 5% misses, 0.2 false positives per image


def load_split(split: str, size: int):
    """Tensors for the scenes ``0 .. size - 1`` of ``split`` that have at least one detection, and the scenes:
    caption ids/mask ``(N, L)``, region features ``(N, R, 108)``, geometry ``(N, R, 7)``, region mask ``(N, R)``."""
    scenes = world.scenes(range(size), split)
    detections = [world.detect(s, detector) for s in scenes]
    keep = [i for i, d in enumerate(detections) if len(d) > 0]
    scenes, detections = [scenes[i] for i in keep], [detections[i] for i in keep]
    images = world.images(keep, split)  # (N, 3, 32, 32)
    boxes = [torch.from_numpy(d.pixel_boxes(32)) for d in detections]
    rois = torch.cat([torch.cat([torch.full((len(b), 1), float(i)), b], 1) for i, b in enumerate(boxes)])  # (K, 5)
    feats = roi_align(images, rois, output_size=6, spatial_scale=1.0, sampling_ratio=2).flatten(1)  # (K, 108)
    geometry = box_geometry(rois[:, 1:], 32, "7d")  # (K, 7)
    feats, mask, geometry = pad_regions([len(b) for b in boxes], feats, geometry)
    text = encode(tokenizer, [s.description for s in scenes], max_length=32)
    data = dict(input_ids=text["input_ids"], text_mask=text["attention_mask"].bool(), feats=feats,
                geometry=geometry, region_mask=mask)
    return data, scenes


train_data, train_scenes = load_split("train", RUN["train_scenes"])
val_data, val_scenes = load_split("val", RUN["val_scenes"])
real = train_data["region_mask"]
feat_mean, feat_std = train_data["feats"][real].mean(0), train_data["feats"][real].std(0) + 1e-3
for data in (train_data, val_data):  # standardise; padding stays exactly 0
    data["feats"] = (data["feats"] - feat_mean) / feat_std * data["region_mask"][..., None]
FEATURE_DIM = train_data["feats"].shape[-1]
POOL = len(train_scenes)  # the whole image pool UNITER draws its negatives from

# %%
# NBVAL_CHECK_OUTPUT
print("train scenes", len(train_scenes), "| val scenes", len(val_scenes), "| vocabulary", len(tokenizer))
print("captions", tuple(train_data["input_ids"].shape), "| region features", tuple(train_data["feats"].shape),
      "| geometry", tuple(train_data["geometry"].shape))

# %% [markdown]
# ## 2. One small model with ALBEF's layout
#
# ```
# caption ids ──► TextEmbeddings ──► text encoder (1 layer) ──┬──► [CLS] ──► proj ──┐
#                                                             │                    ├── ITC
# regions ──► LN(W_f f) + LN(W_g g) ──► image encoder (1 layer) ┬──► mean ──► proj ──┘
#                                                             │
#                  single-stream fusion over [text; regions] (2 layers, merged attention)
#                                       │ pooled [CLS]
#                                    ITM head (2 outputs)
# ```
#
# - **unimodal encoders** give each modality its own contextual tokens; ITC compares their pooled
#   summaries (a two-tower model, notebook 04), so it can score every caption against every image of
#   the batch in one matrix product;
# - the **fusion** is one transformer over `[text; regions]` (UNITER's single stream), and the ITM head
#   is one linear layer with two outputs on its pooled [CLS];
# - the regions are embedded as in UNITER (feature and geometry each projected and LayerNorm-ed, summed,
#   normalised again).
#
# Weights are initialised with standard deviation $0.8/\sqrt{D}$ instead of BERT's 0.02, for the reason
# notebook 04 measured: at $D = 64$, BERT's value makes every cross-modal product tiny and ITM sits on
# its $\ln 2$ plateau.

# %%
D = RUN["dim"]
INIT_STD = 0.8 / math.sqrt(D)


class MatchingVLP(nn.Module):
    """Unimodal encoders with ITC projections, and a single-stream fusion with an ITM head (ALBEF's layout)."""

    def __init__(self):
        super().__init__()
        layers = dict(dim=D, num_heads=RUN["heads"], mlp_ratio=RUN["mlp_ratio"])
        self.text_embeddings = TextEmbeddings(len(tokenizer), D, max_positions=32)
        self.region_feature = nn.Sequential(nn.Linear(FEATURE_DIM, D), nn.LayerNorm(D))
        self.region_geometry = nn.Sequential(nn.Linear(7, D), nn.LayerNorm(D))
        self.region_norm = nn.LayerNorm(D)
        self.text_encoder = TransformerEncoder(RUN["unimodal_layers"], **layers)
        self.image_encoder = TransformerEncoder(RUN["unimodal_layers"], **layers)
        self.text_proj, self.image_proj = nn.Linear(D, D), nn.Linear(D, D)
        self.itc = ContrastiveLoss(init_temperature=0.07)  # holds the learnable logit_scale = ln(1 / 0.07)
        self.fusion = build_fusion("single_stream", num_layers=RUN["fusion_layers"], text_positions=False, **layers)
        self.itm_head = nn.Linear(D, 2)
        init_weights(self, std=INIT_STD)

    def encode_text(self, input_ids, text_mask):
        """``(B, L)`` ids -> ``(B, L, D)`` contextual text tokens (text only)."""
        return self.text_encoder(self.text_embeddings(input_ids), key_mask=text_mask)[0]

    def encode_image(self, feats, geometry, region_mask):
        """``(B, R, 108)``, ``(B, R, 7)`` -> ``(B, R, D)`` contextual region tokens (image only)."""
        x = self.region_norm(self.region_feature(feats) + self.region_geometry(geometry))
        return self.image_encoder(x, key_mask=region_mask)[0]

    def embeddings(self, text, text_mask, image, region_mask):
        """The ITC embeddings: text [CLS] and the mean of the real regions, projected: ``(B, D)``, ``(B, D)``."""
        weights = region_mask.float()[..., None]
        image_mean = (image * weights).sum(1) / weights.sum(1)
        return self.text_proj(text[:, 0]), self.image_proj(image_mean)

    def match_logits(self, text, text_mask, image, region_mask):
        """ITM logits ``(B, 2)`` (column 1: matched) from the fused [CLS] of unimodal tokens."""
        return self.itm_head(self.fusion(text, text_mask, image, region_mask).pooled)


torch.manual_seed(0)
model = MatchingVLP()

# %%
# NBVAL_CHECK_OUTPUT
print("parameters:", count_parameters(model))
print("initial temperature", round(model.itc.temperature, 4), "| logit scale", round(model.itc.logit_scale.exp().item(), 2))

# %% [markdown]
# ## 3. ITM: image-text matching, and where its negatives come from
#
# A binary classifier on the fused [CLS] says whether the caption describes the image:
#
# $$\mathcal{L}_{\mathrm{ITM}} = -\,\mathbb{E}_{(w, v, y)} \log P_\theta(y \mid w, v), \qquad y \in \{0: \text{mismatched}, 1: \text{matched}\},$$
#
# a 2-way cross-entropy. The positives are the dataset's pairs; the negatives have to be made:
#
# - **UNITER** keeps each caption and, with probability 0.5, replaces its image by one drawn at
#   random from the **whole image pool** of the dataset, not from the batch. In its code
#   (`data/itm.py`), `ItmDataset.new_epoch` draws a label per caption (`neg_sample_p = 0.5`) and, for
#   a negative, calls `sample_negative(self.all_imgs, [img_fname], 1)`: a uniform draw among *all*
#   the dataset's images, redrawn if it hit the caption's own image. Only then are the pairs batched.
#   This matters there because UNITER's batches are not uniform samples: its `TokenBucketSampler`
#   sorts pairs by length (caption tokens plus regions) and fills each batch with pairs of similar
#   length, so an in-batch negative would share the positive's length (its number of words and of
#   boxes), a shortcut of its own, and a batch split over 8 GPUs holds few candidates;
# - **ALBEF** samples **hard negatives** from the ITC similarities *of the batch*: for each caption, a
#   negative image $j \ne i$ drawn with probability $\propto \exp(s_{ij})$, the softmax of its row of
#   ITC logits, and for each image a negative caption the same way. Then it scores $B$ positives and
#   $2B$ negatives. The negatives the contrastive model finds most similar are drawn most often: a
#   caption that differs by one colour, not by everything. Those weights are exercise 2;
#   `course_lib.objectives.itm.sample_hard_negatives` draws from them (captions that are identical to
#   the positive are excluded too, as X-VLM does for captions of the same image).
#
# UNITER's pairs from scratch (a uniform offset $1 \le o < N$ added modulo the pool size $N$: a uniform
# draw among the $N - 1$ other images, the same distribution as UNITER's draw-and-retry), and ALBEF's
# batch layout. (Our batches *are* uniform samples of the training set, so here an in-batch random
# negative would also be a uniform draw from the pool; we follow UNITER because that is its recipe, not
# because it measurably changes this notebook's numbers, which we did not compare.)

# %%
def uniter_itm_images(index, pool_size, generator, neg_prob=0.5):
    """UNITER's ITM pairs: for captions ``index (B,)``, the image of each pair ``(B,)`` (its own, or with
    probability ``neg_prob`` one drawn uniformly from the other ``pool_size - 1`` images of the whole
    pool) and ``swapped (B,)`` bool, True where the image was replaced."""
    swapped = torch.rand(index.shape, generator=generator) < neg_prob
    offset = torch.randint(1, pool_size, index.shape, generator=generator)  # never 0: never the image itself
    return torch.where(swapped, (index + offset) % pool_size, index), swapped


def albef_itm_pairs(batch_size, neg_image_idx, neg_text_idx):
    """ALBEF's ITM batch as (text, image) indices ``(3B,)``, ``(3B,)`` and labels: B positives (i, i),
    B (i, neg_image_idx[i]), B (neg_text_idx[i], i); labels 1, 0, 0. Indices < B are the batch's own."""
    own = torch.arange(batch_size, device=neg_image_idx.device)
    texts = torch.cat([own, own, neg_text_idx])
    images = torch.cat([own, neg_image_idx, own])
    labels = torch.cat([torch.ones(batch_size), torch.zeros(2 * batch_size)]).long().to(own.device)
    return texts, images, labels


batch_index = torch.randint(POOL, (64,), generator=torch.Generator().manual_seed(5))
images_of_pairs, swapped = uniter_itm_images(batch_index, POOL, torch.Generator().manual_seed(6))
texts, images, labels = albef_itm_pairs(4, torch.tensor([1, 0, 3, 2]), torch.tensor([2, 3, 0, 1]))
itm_logits = torch.randn(12, 2, generator=torch.Generator().manual_seed(6))
torch.testing.assert_close(F.cross_entropy(itm_logits, labels), itm_loss(itm_logits, labels))

# %%
# NBVAL_CHECK_OUTPUT
negatives = images_of_pairs[swapped]
print("negatives in a batch of 64: between 20 and 44:", 20 <= len(negatives) <= 44,
      "| never the caption's own image:", bool((negatives != batch_index[swapped]).all()))
print("most negatives come from outside the batch (the whole pool):",
      (~torch.isin(negatives, batch_index)).float().mean().item() > 0.8)
print("ALBEF pairs for B = 4; texts ", texts.tolist())
print("                        images", images.tolist())
print("                        labels", labels.tolist())

# %% [markdown]
# ## 4. ITC: image-text contrastive learning
#
# CLIP's objective: for a batch of $B$ pairs, L2-normalise the image embeddings $\hat v_i$ and text
# embeddings $\hat t_j$, form the logits $S_{ij} = s\,\langle \hat v_i, \hat t_j \rangle$ with a **learned**
# scale $s = e^{\text{logit\_scale}} = 1/\tau$, and classify the right partner in both directions:
#
# $$\mathcal{L}_{\mathrm{ITC}} = \frac{1}{2}\Big[\frac{1}{B}\sum_i -\log \frac{e^{S_{ii}}}{\sum_j e^{S_{ij}}}
#   \;+\; \frac{1}{B}\sum_j -\log \frac{e^{S_{jj}}}{\sum_i e^{S_{ij}}}\Big].$$
#
# This is InfoNCE (van den Oord et al. 2018): a lower bound on the mutual information between the two
# views, tighter as $B$ grows, and the reason contrastive models love big batches. $s$ starts at
# $1/0.07 \approx 14.3$ and is clamped at 100 after every optimizer step (CLIP: "to prevent scaling the
# logits by more than 100, which we found necessary to prevent training instability"). Why learn it?
# Cosines live in $[-1, 1]$: with $s = 1$ the softmax can never become confident, however well aligned
# the embeddings. The table shows the loss of a batch of 64 perfectly aligned pairs (each text equals
# its image, random directions in 64-d) and of 64 unrelated pairs, at several scales; ln 64 = 4.16 is a
# uniform guess. (The loss itself is exercise 1; here `course_lib`'s `contrastive_loss`.)

# %%
g = torch.Generator().manual_seed(7)
aligned = torch.randn(64, 64, generator=g)
unrelated = torch.randn(64, 64, generator=g)
rows = ["| scale $s$ | temperature | aligned pairs | unrelated pairs |", "| ---: | ---: | ---: | ---: |"]
for scale in (1.0, 1 / 0.07, 30.0, 100.0):
    rows.append(f"| {scale:.1f} | {1 / scale:.3f} | {contrastive_loss(aligned, aligned, scale):.3f} "
                f"| {contrastive_loss(aligned, unrelated, scale):.3f} |")
display(Markdown("\n".join(rows)))

# %% [markdown]
# With $s = 1$ even perfect alignment costs almost as much as a random guess: the temperature decides
# how sharp the model may be, and learning it lets the model sharpen as its embeddings improve. The
# price of a large scale is visible on the right: confident mistakes cost a lot more, which is why the
# scale is capped.
#
# In ALBEF, ITC does a third job besides retrieval and hard-negative mining: it **aligns the unimodal
# encoders before fusion** ("align before fuse"), so the fusion layers receive text and region tokens
# that already live in a shared space (notebook 04 measured how much that speeds up ITM).
#
# ## 5. Pretraining with ITM and ITC
#
# **Batches.** Training batch number `step` is a deterministic function of the step: 64 scenes and, for
# ITM, UNITER's pairs: each caption with its own image, or (probability 0.5) with an image drawn from
# the whole pool of training images. A drawn image whose caption is identical to the caption's own
# (two scenes with the same objects) is labelled a match: it is one.
#
# **One step** (`pretraining_losses`): encode the captions, their own images and the ITM images with
# the unimodal encoders; **ITC** on the pooled embeddings of the captions and their own images; **ITM**
# on the fused [CLS] of each caption with its ITM image; the loss is the unweighted sum, as in ALBEF.
# After each optimizer step, the callback clamps the ITC scale to $[1, 100]$, as CLIP's training loop
# does.

# %%
def same_caption(ids, other_ids=None):
    """``(B, B')`` bool: True where two captions are identical (such a "negative" would be a positive)."""
    other_ids = ids if other_ids is None else other_ids
    return (ids[:, None, :] == other_ids[None, :, :]).all(-1)


def gather(index, prefix=""):
    """The training tensors of the scenes ``index``, keys prefixed by ``prefix``."""
    return {prefix + key: value[index] for key, value in train_data.items()}


def train_batch(step: int, seed: int = 0, batch_size: int = RUN["batch_size"]) -> dict:
    """Training batch number ``step``: the scenes, UNITER's ITM images for them (pool negatives), and one
    more caption and image per scene drawn from the pool (the random negatives of section 7)."""
    g = torch.Generator().manual_seed(step + 100_000 * seed)
    idx = torch.randint(POOL, (batch_size,), generator=g)
    itm_idx, _ = uniter_itm_images(idx, POOL, g)
    batch = {**gather(idx), **gather(itm_idx, "itm_")}
    batch["itm_labels"] = (batch["input_ids"] == batch["itm_input_ids"]).all(-1).long()  # own image, or same caption
    pool_text, pool_image = (idx + torch.randint(1, POOL, (2, len(idx)), generator=g)) % POOL  # never the scene itself
    batch.update(gather(pool_text, "pool_text_"), **gather(pool_image, "pool_image_"))
    return batch


def pretraining_losses(model, batch):
    """UNITER's ITM (half the pairs get an image from the whole pool) + ITC, on one batch."""
    ids, text_mask, B = batch["input_ids"], batch["text_mask"], len(batch["input_ids"])
    text = model.encode_text(ids, text_mask)  # (B, L, D)
    both = model.encode_image(torch.cat([batch["feats"], batch["itm_feats"]]),  # own images, then ITM images
                              torch.cat([batch["geometry"], batch["itm_geometry"]]),
                              torch.cat([batch["region_mask"], batch["itm_region_mask"]]))
    image, itm_image = both[:B], both[B:]  # (B, R, D) each
    text_emb, image_emb = model.embeddings(text, text_mask, image, batch["region_mask"])
    itc = model.itc(image_emb, text_emb)
    logits = model.match_logits(text, text_mask, itm_image, batch["itm_region_mask"])  # (B, 2)
    itm = itm_loss(logits, batch["itm_labels"])
    return {"loss": itm + itc, "ITM": itm, "ITC": itc,
            "ITM accuracy": (logits.argmax(1) == batch["itm_labels"]).float().mean()}


def clamp_temperature(net):
    """A training callback: after every optimizer step, keep exp(logit_scale) in [1, 100] (CLIP)."""
    return lambda step, history: net.itc.clamp_()


t0 = time.perf_counter()
history = train(model, train_batch, TrainConfig(steps=RUN["steps"], lr=RUN["lr"], warmup_steps=20, progress=False,
                                                log_every=0, device=device),
                loss_fn=pretraining_losses, callback=clamp_temperature(model))
print(f"{RUN['steps']} steps in {time.perf_counter() - t0:.1f} s; final temperature {model.itc.temperature:.3f}")

# %%
fig, axes = plt.subplots(1, 2, figsize=(10, 3))
for ax, (name, guess) in zip(axes, {"ITM": math.log(2), "ITC": math.log(RUN["batch_size"])}.items()):
    plot_losses({name: history}, ax=ax, smooth=0.9, key=name)
    ax.axhline(guess, color="grey", linestyle="--", linewidth=0.8)
    ax.set_ylim(0, max(guess, max(history.values(name))) * 1.05)
    ax.get_legend().remove()
    ax.set_title(f"{name} (dashed: an uninformed guess, {guess:.2f})", fontsize=10)
fig.tight_layout()

# %% [markdown]
# **ITC** moves first: after a few steps at its guess it falls steeply, since it compares whole
# embeddings and gets a 64-way signal from every pair. **ITM** sits on its $\ln 2$ plateau for a few
# dozen steps (a constant guess: "match" and "no match" are equally frequent) and drops only once ITC
# has fallen: the fusion must first discover which region a word is about before it can compare them,
# and aligned unimodal tokens make that easier, ALBEF's "align before fuse" that notebook 04 measured.
# It ends far below its plateau: random negatives are easy, most of them share no object with the
# caption.
#
# ## 6. What ITM and ITC learned
#
# On the held-out validation scenes, each score next to its chance level:
#
# - **ITM**: every validation image with its own caption, and with the caption of another scene;
#   accuracy over both kinds of pair, chance 0.5;
# - **ITC**: image → text retrieval among all validation captions: R@1, chance $1/N$.

# %%
val = {key: value.to(device) for key, value in val_data.items()}
N = len(val_scenes)
VAL_SAME = same_caption(val["input_ids"])  # (N, N) captions that are identical count as matches
shuffled = torch.randperm(N, generator=torch.Generator().manual_seed(0)).to(device)


@torch.no_grad()
def itm_match_prob(net, input_ids, text_mask, image_idx):
    """P(match) from the ITM head for captions ``(M, L)`` against the val images ``image_idx (M,)``."""
    logits = net.match_logits(net.encode_text(input_ids, text_mask), text_mask,
                              net.encode_image(val["feats"][image_idx], val["geometry"][image_idx],
                                               val["region_mask"][image_idx]), val["region_mask"][image_idx])
    return logits.softmax(-1)[:, 1]


@torch.no_grad()
def itc_similarity(net):
    """Cosine similarities ``(N images, N captions)`` of the val ITC embeddings."""
    text = net.encode_text(val["input_ids"], val["text_mask"])
    image = net.encode_image(val["feats"], val["geometry"], val["region_mask"])
    text_emb, image_emb = net.embeddings(text, val["text_mask"], image, val["region_mask"])
    return F.normalize(image_emb, dim=-1) @ F.normalize(text_emb, dim=-1).T


@torch.no_grad()
def itm_and_itc_scores(net) -> dict:
    """ITM accuracy on (own caption, another scene's caption) pairs; ITC similarities and R@1 (image -> text)."""
    everyone = torch.arange(N, device=device)
    p_own = itm_match_prob(net, val["input_ids"], val["text_mask"], everyone)
    p_other = itm_match_prob(net, val["input_ids"][shuffled], val["text_mask"][shuffled], everyone)
    label_other = VAL_SAME[everyone, shuffled]
    sim = itc_similarity(net)
    return {"ITM accuracy": ((p_own > 0.5).float().mean() + ((p_other > 0.5) == label_other).float().mean()).item() / 2,
            "ITC R@1": VAL_SAME[everyone, sim.argmax(1)].float().mean().item(), "sim": sim}


model.eval()
itm_itc = itm_and_itc_scores(model)
display(Markdown("\n".join([
    "| objective | measure | value | chance |", "| --- | --- | ---: | ---: |",
    f"| ITM | accuracy (own / other caption) | {itm_itc['ITM accuracy']:.3f} | 0.500 |",
    f"| ITC | image → text R@1 among {N} | {itm_itc['ITC R@1']:.3f} | {1 / N:.3f} |"])))

# %%
# NBVAL_CHECK_OUTPUT
print("ITM accuracy > 0.8 (chance 0.5):", itm_itc["ITM accuracy"] > 0.8)
print(f"ITC R@1 > 0.3 (chance 1/{N}):", itm_itc["ITC R@1"] > 0.3)
assert_learned(itm_itc["ITM accuracy"] > 0.8 and itm_itc["ITC R@1"] > 0.3,
               f"ITM accuracy {itm_itc['ITM accuracy']:.3f} (> 0.8, chance 0.5), "
               f"ITC R@1 {itm_itc['ITC R@1']:.3f} (> 0.3, chance {1 / N:.3f})", SCALE)

# %% [markdown]
# The ITC similarities between the first 16 validation images (rows) and their captions (columns):
# a bright diagonal means each image is closest to its own caption; bright off-diagonal cells are
# captions that share most of their objects with the image's own. Those are exactly the negatives ALBEF
# would draw for ITM.

# %%
plot_similarity(itm_itc["sim"][:16, :16].cpu(), title="ITC cosine similarity, val images x captions");

# %% [markdown]
# ## 7. ITM: random negatives against hard negatives
#
# The model above learned ITM with UNITER's random negatives. Now we continue from it, in two kinds of
# branch that differ in one thing only, for `itm_steps` more steps of ITM + ITC with ALBEF's layout ($B$
# positives, $B$ negative images, $B$ negative captions; $B = 32$ here, to fit six branches in the budget):
#
# - **random**: each negative drawn uniformly from the whole pool of training scenes (UNITER's source);
# - **hard**: each negative drawn from the batch with `sample_hard_negatives`, from the softmax of the
#   current ITC logits (ALBEF).
#
# Each kind runs with 3 seeds (the seed sets the batches and the draws); all six branches start from the
# same pretrained weights, so the spread we report is that of the continuation, not of pretraining.
#
# Why branch from one pretrained model rather than pretrain twice? It is cheaper, and it is a controlled
# experiment: the branches start from the same weights, so any difference comes from the negatives
# alone. It is also kinder to ITM. ALBEF uses hard negatives from the first step, but its encoders start
# from BERT and a pretrained ViT; ours start from nothing. When we tried hard negatives from step one
# (in an earlier version of this course, on a model with one fusion layer), ITC learned within a few
# dozen steps, the sampled negatives became near-copies of the positives while the ITM head had no idea
# yet what matching means, and ITM sat on its plateau (always answering "no match"). Easy negatives
# first, hard ones later: a curriculum.
#
# **How to tell the difference.** Two tests on the validation scenes:
# - **near misses**: each image's own caption, and the same caption with *one* attribute of *one* object
#   changed (a colour or a shape), e.g. "a small green circle, ..." → "a small green *triangle*, ...".
#   We report how often each is classified correctly, and how often the true caption gets the higher
#   match probability (a ranking, independent of the 0.5 threshold); chance 0.5 for both;
# - **re-ranking**, how ALBEF retrieves: ITC proposes each image's top-`rerank_k` captions among all
#   validation captions, ITM re-orders them; R@1 after re-ranking.

# %%
def itm_stage_losses(model, batch, negatives: str):
    """ITM (ALBEF's B positives + 2B negatives, drawn ``"random"`` from the pool or ``"hard"`` from the batch) + ITC."""
    ids, text_mask, region_mask = batch["input_ids"], batch["text_mask"], batch["region_mask"]
    B = len(ids)
    text = model.encode_text(ids, text_mask)  # (B, L, D)
    image = model.encode_image(batch["feats"], batch["geometry"], region_mask)  # (B, R, D)
    text_emb, image_emb = model.embeddings(text, text_mask, image, region_mask)
    itc = model.itc(image_emb, text_emb)
    if negatives == "hard":  # candidates: the batch itself; ALBEF's draw from the ITC softmax
        with torch.no_grad():
            sim_i2t = model.itc.logit_scale.exp() * F.normalize(image_emb, dim=-1) @ F.normalize(text_emb, dim=-1).T
        neg_image, neg_text = sample_hard_negatives(sim_i2t, sim_i2t.T, same_image=same_caption(ids))
        text_ids, texts_, text_masks, image_ids, images_, region_masks = ids, text, text_mask, ids, image, region_mask
    else:  # candidates: the batch, then one caption and one image per scene drawn from the whole pool
        text_ids = torch.cat([ids, batch["pool_text_input_ids"]])  # (2B, L)
        text_masks = torch.cat([text_mask, batch["pool_text_text_mask"]])
        texts_ = torch.cat([text, model.encode_text(batch["pool_text_input_ids"], batch["pool_text_text_mask"])])
        image_ids = torch.cat([ids, batch["pool_image_input_ids"]])  # the caption of each candidate image
        region_masks = torch.cat([region_mask, batch["pool_image_region_mask"]])
        images_ = torch.cat([image, model.encode_image(batch["pool_image_feats"], batch["pool_image_geometry"],
                                                       batch["pool_image_region_mask"])])
        neg_image = neg_text = torch.arange(B, 2 * B, device=ids.device)
    t, i, labels = albef_itm_pairs(B, neg_image, neg_text)  # (3B,) each
    labels = torch.where(same_caption(text_ids[t], image_ids[i]).diagonal(), 1, labels)  # identical captions match
    logits = model.match_logits(texts_[t], text_masks[t], images_[i], region_masks[i])
    itm = itm_loss(logits, labels)
    return {"loss": itm + itc, "ITM": itm, "ITC": itc}


def near_miss(scene, rng: np.random.Generator) -> str:
    """The scene's caption with one attribute (colour or shape) of one object changed."""
    objects = list(scene.objects)
    i = int(rng.integers(len(objects)))
    if rng.random() < 0.5:
        objects[i] = replace(objects[i], color=str(rng.choice([c for c in world.config.colors if c != objects[i].color])))
    else:
        objects[i] = replace(objects[i], shape=str(rng.choice([s for s in world.config.shapes if s != objects[i].shape])))
    return full_description(replace(scene, objects=tuple(objects)))


rng = np.random.default_rng(0)
near_misses = [near_miss(s, rng) for s in val_scenes]
near_ids = {key: value.to(device) for key, value in encode(tokenizer, near_misses, max_length=32).items()}
print(f'"{val_scenes[0].description}"  ->  "{near_misses[0]}"')


@torch.no_grad()
def hard_pair_scores(net) -> dict:
    everyone = torch.arange(N, device=device)
    p_own = itm_match_prob(net, val["input_ids"], val["text_mask"], everyone)
    p_near = itm_match_prob(net, near_ids["input_ids"], near_ids["attention_mask"].bool(), everyone)
    sim = itc_similarity(net)
    K = RUN["rerank_k"]
    candidates = sim.topk(K, dim=1).indices  # (N, K) ITC's best captions for each image
    flat = candidates.flatten()
    p = itm_match_prob(net, val["input_ids"][flat], val["text_mask"][flat], everyone.repeat_interleave(K)).view(N, K)
    reranked = candidates[everyone, p.argmax(1)]
    return {"own caption accepted": (p_own > 0.5).float().mean().item(),
            "near miss rejected": (p_near < 0.5).float().mean().item(),
            "own caption ranked above near miss": (p_own > p_near).float().mean().item(),
            "ITC R@1": VAL_SAME[everyone, sim.argmax(1)].float().mean().item(),
            f"R@1 after ITM re-ranks ITC's top {K}": VAL_SAME[everyone, reranked].float().mean().item()}


pretrained_scores = hard_pair_scores(model)
branch_scores, branch_histories = {"random": [], "hard": []}, {}
t0 = time.perf_counter()
for negatives in ("random", "hard"):
    for seed in RUN["branch_seeds"]:
        branch = MatchingVLP()
        branch.load_state_dict(model.state_dict())  # every branch starts from the pretrained model
        history_ = train(branch, lambda step, seed=seed: train_batch(step, 1 + seed, RUN["branch_batch_size"]),
                         TrainConfig(steps=RUN["itm_steps"], lr=RUN["itm_lr"], warmup_steps=min(10, RUN["itm_steps"]),
                                     progress=False, log_every=0, device=device, seed=seed),
                         loss_fn=lambda net, batch, negatives=negatives: itm_stage_losses(net, batch, negatives),
                         callback=clamp_temperature(branch))
        branch_scores[negatives].append(hard_pair_scores(branch.eval()))
        branch_histories.setdefault(f"{negatives} negatives (seed {seed})", history_)
print(f"{len(RUN['branch_seeds'])} seeds x 2 kinds of negatives, {RUN['itm_steps']} steps each, "
      f"in {time.perf_counter() - t0:.1f} s")

# %%
def mean_spread(values) -> str:
    """``mean ± standard deviation`` over seeds."""
    return f"{np.mean(values):.3f} ± {np.std(values):.3f}"


names = list(pretrained_scores)
rows = ["| | after pretraining | random negatives (UNITER) | hard negatives (ALBEF) |", "| --- | ---: | ---: | ---: |"]
rows += [f"| {name} | {pretrained_scores[name]:.3f} | "
         + " | ".join(mean_spread([s[name] for s in branch_scores[kind]]) for kind in ("random", "hard")) + " |"
         for name in names]
display(Markdown("\n".join(rows) + f"\n\nmean ± standard deviation over {len(RUN['branch_seeds'])} seeds"))
fig, ax = plt.subplots(figsize=(6, 3))
plot_losses({name: h for name, h in branch_histories.items() if "seed 0" in name}, ax=ax, smooth=0.9, key="ITM")
ax.set_title("ITM loss while continuing (seed 0; the hard branch's task is harder)", fontsize=9);

# %%
# NBVAL_CHECK_OUTPUT
rejected = {kind: np.mean([s["near miss rejected"] for s in branch_scores[kind]]) for kind in branch_scores}
ranked = min(s["own caption ranked above near miss"] for kind in branch_scores for s in branch_scores[kind])
print("hard negatives reject more near misses (mean over seeds, by > 0.1):", rejected["hard"] > rejected["random"] + 0.1)
print("every branch ranks the own caption above its near miss more than 80% of the time (chance 0.5):", ranked > 0.8)
assert_learned(rejected["hard"] > rejected["random"] + 0.1, f"near misses rejected: {rejected}", SCALE)
assert_learned(ranked > 0.8, f"lowest share of own captions ranked above their near miss: {ranked:.3f}", SCALE)

# %% [markdown]
# What we measured, over 3 seeds:
#
# - **Hard negatives change what "no" means.** The hard branches reject far more near misses than the
#   random ones (second row: a gap of about 0.28, several times the seed-to-seed spread). Shown, at
#   every step, captions that differ from the truth by little, they learned that a single wrong word
#   is a mismatch. The price is in the first row: they also accept fewer true captions. Their
#   operating point moved towards strictness, which is what a verifier of retrieval candidates should
#   do. The loss curves say the same: the hard branch's ITM loss starts high (its negatives fool the
#   pretrained head) and is still falling when the branch ends.
# - **Threshold-free, nothing changed in this budget.** How often the true caption gets a higher match
#   probability than its near miss (third row) is the same for both kinds of negatives, within the
#   spread, and no higher than after pretraining: 60 steps of hard negatives moved the decision
#   threshold rather than sharpening the ranking.
# - **Re-ranking does not beat ITC alone in a model this small.** ALBEF retrieves this way (ITC proposes
#   the top $k$, ITM re-orders them) with a 6-layer fusion encoder trained on millions of pairs; our two
#   fusion layers trained for seconds are a weaker judge of close candidates than the contrastive
#   embeddings, and re-ranking ITC's top 8 *loses* recall with either kind of negatives (last row against
#   the ITC row), the two kinds within each other's spread. The course makes no claim here that hard
#   negatives help retrieval: at this scale they did not.
#
# ## 8. What matching and contrast teach
#
# - **ITM** teaches *verification* of a whole pair in the fused representation: the objective behind
#   re-ranking and VQA-style reasoning. What it learns depends on its negatives: random ones (from the
#   whole pool, as UNITER draws them) teach coarse matching, hard ones the fine distinctions (one word,
#   one attribute).
# - **ITC** teaches *alignment of the unimodal embeddings*: cheap retrieval over millions of items (one
#   matrix product), the hard negatives for ITM, and tokens that are already aligned before fusion.
#   It never looks at token-to-token interactions, so it cannot tell "red circle, blue square" from
#   "blue circle, red square" once the pooled vectors agree: that is ITM's job.
#
# Neither says *which word* goes with *which region*: ITM judges the pair as a whole, ITC compares two
# pooled vectors. Notebook 05's masked objectives find that correspondence implicitly; notebook 07 adds
# UNITER's explicit one, word-region alignment by optimal transport.

# %%
print(f"notebook ran in {time.perf_counter() - start_time:.0f} s")

# %% [markdown]
# ## Exercises
#
# **Exercise 1 - CLIP's loss.** Write `info_nce(image_feats, text_feats, logit_scale)`: features `(B, D)`
# (not normalised), `logit_scale` the multiplier $s = 1/\tau$ (a float or a scalar tensor, already
# exponentiated) → the symmetric InfoNCE of section 4, a scalar. L2-normalise both, logits
# $s\,\hat V \hat T^\top$, cross-entropy against the diagonal for the rows (image → text) and for the columns
# (text → image), and average the two.

# %% [exercise]
from course_lib.checks.objectives import check_info_nce


def info_nce(image_feats, text_feats, logit_scale):
    raise NotImplementedError("normalise, scaled similarity matrix, cross-entropy both ways, average")


check_info_nce(info_nce)

# %% [solution]
from course_lib.checks.objectives import check_info_nce


def info_nce(image_feats, text_feats, logit_scale):
    image, text = F.normalize(image_feats, dim=-1), F.normalize(text_feats, dim=-1)
    logits = logit_scale * image @ text.T  # (B, B): row i = image i against every caption
    targets = torch.arange(len(image), device=image.device)  # the partner of i is i
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2


check_info_nce(info_nce)

# %% [markdown]
# **Exercise 2 - ALBEF's hard-negative weights.** Write `hard_negative_weights(sim)`: `sim (B, B)` holds
# the ITC logits of query $i$ (row) against candidate $j$ (column) → `weights (B, B)`, where row $i$ is
# the probability of drawing candidate $j$ as query $i$'s negative: the softmax of row $i$, with the
# positive (the diagonal) set to exactly 0, renormalised so each row sums to 1. (`torch.multinomial(weights,
# 1)` then draws the negatives.) Do not modify `sim`.

# %% [exercise]
from course_lib.checks.objectives import check_hard_negative_weights


def hard_negative_weights(sim):
    raise NotImplementedError("row softmax, zero the diagonal, renormalise the rows")


check_hard_negative_weights(hard_negative_weights)

# %% [solution]
from course_lib.checks.objectives import check_hard_negative_weights


def hard_negative_weights(sim):
    weights = F.softmax(sim, dim=1)  # row i: how similar each candidate looks to query i
    weights = weights.masked_fill(torch.eye(len(sim), dtype=torch.bool, device=sim.device), 0.0)  # never the positive
    return weights / weights.sum(1, keepdim=True)


check_hard_negative_weights(hard_negative_weights)

