# %% [markdown]
# # 05 · Masked modelling: MLM and MVM (MRFR, MRC, MRC-kl)
#
# **What you will build.** The *masked* pretraining objectives of the detector-era vision-language
# models: hide part of one modality and recover it from the rest, the other modality included. Each is
# written from scratch in a few lines, checked against `course_lib.objectives`, and then trained
# *together* on one small single-stream model:
#
# | objective | the question the model must answer | loss | systems |
# | --- | --- | --- | --- |
# | **MLM**, masked language modelling | which word was hidden here, *given the image*? | cross-entropy on masked words | BERT (Devlin et al. 2019) → VisualBERT, LXMERT, UNITER, ALBEF |
# | **MVM: MRFR**, masked region feature regression | what did the hidden region look like? | L2 to its feature | LXMERT (Tan & Bansal 2019), UNITER (Chen et al. 2020) |
# | **MVM: MRC**, masked region classification | which class is the hidden region (the detector's top guess)? | cross-entropy | LXMERT, Unicoder-VL, UNITER |
# | **MVM: MRC-kl**, with soft labels | the detector's *whole* class distribution | KL divergence | ViLBERT (Lu et al. 2019), UNITER |
#
# **The problem they solved.** A caption and an image come as a pair, with no label saying which word
# describes which region. BERT had shown that hiding words and predicting them teaches a language model
# from raw text; the vision-language models of 2019-2020 made the hidden word depend on the *image*
# ("a small [MASK] circle": only the picture knows the colour) and added the mirror task, hiding a
# region and recovering it from the caption. Both force the model to find, without supervision, the
# region a word is about. You will measure exactly that: every accuracy next to its chance level and
# next to a *control* where the other modality is swapped for a wrong one, which must fall to chance.
# You will also see what a soft label (the detector's whole distribution) teaches that a hard one does
# not.
#
# **Papers.** Devlin et al. (2019) *BERT* (section 3.1, masked LM and its 80/10/10 rule); Tan & Bansal
# (2019) *LXMERT* (its vision task, masked object prediction: RoI-feature regression and detected-label
# classification); Lu et al. (2019) *ViLBERT* (masked multi-modal modelling, with the KL divergence to
# the detector's class distribution); Chen et al. (2020) *UNITER: UNiversal Image-TExt Representation
# Learning* (section 3.2: MLM, MRFR, MRC, MRC-kl and conditional masking); Hinton et al. (2015)
# *Distilling the Knowledge in a Neural Network*.
#
# **Where this sits in the course.** The three questions of every VLP model: **1. features** (notebooks
# 01 and 03), **2. fusion** (notebook 04), and **3. objectives**: which losses teach the alignment?
# This notebook covers the masked objectives; notebook 06 the matching and contrastive ones (ITM with
# random and hard negatives, ITC); notebook 07 word-region alignment by optimal transport.
#
# *Terms in English and Chinese: [glossary](../GLOSSARY.md).*

# %% [parameters]
SCALE = "cpu"  # "cpu": about a minute; "gpu": bigger model, longer run; "smoke": a few steps (what the tests run)

# %%
RUN = {
    "smoke": dict(dim=64, heads=4, layers=2, mlp_ratio=2.0, steps=20, batch_size=16, lr=2e-3,
                  train_scenes=300, val_scenes=100),
    "cpu": dict(dim=64, heads=4, layers=2, mlp_ratio=2.0, steps=300, batch_size=64, lr=2e-3,
                train_scenes=3000, val_scenes=500),
    "gpu": dict(dim=256, heads=8, layers=4, mlp_ratio=4.0, steps=4000, batch_size=256, lr=5e-4,
                train_scenes=20000, val_scenes=2000),
}[SCALE]
from course_lib.thresholds import assert_learned  # asserts at SCALE cpu/gpu; reports at smoke
RUN

# %%
import math
import time

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
from course_lib.data.simulated_detector import DetectorConfig
from course_lib.features.region import box_geometry, pad_regions
from course_lib.features.roi_align import roi_align
from course_lib.features.text import CLS_ID, MASK_ID, PAD_ID, SEP_ID, UNK_ID, TextEmbeddings, encode, mask_tokens
from course_lib.fusion.registry import build_fusion
from course_lib.nn import init_weights
from course_lib.objectives.mlm import MLMHead, masked_lm_loss
from course_lib.objectives.mvm import (feature_regression_loss, mask_regions, region_class_loss_hard,
                                       region_class_loss_kl)
from course_lib.train import TrainConfig, train
from course_lib.viz import draw_boxes, plot_losses, show_image

device = get_device()
start_time = time.perf_counter()

# %% [markdown]
# ## 1. Data: captions and detected regions
#
# Scenes of two or three objects, each with its canonical caption ("a small green circle, a large
# yellow square and ...", objects listed left to right), so that a hidden word or region can only be
# recovered by relating the two modalities: "the colour of the *second* object from the left".
#
# The image side is what the detector-era models saw (notebook 03): ShapeWorld's **simulated
# detector** proposes boxes (jittered, sometimes missing an object, sometimes inventing one) and gives
# each box a **soft class distribution** over the 18 (colour, shape) classes plus "no object", with
# extra mass on classes that share a colour or a shape with the truth, as a real detector confuses
# similar classes. Each box becomes
#
# - a **feature**: RoIAlign of the pixels inside the box on a $6 \times 6$ grid, $6 \cdot 6 \cdot 3 = 108$
#   numbers, standardised (mean 0, variance 1 per dimension over the training regions); it stands in
#   for the 2048-d Faster R-CNN feature of the papers, and it is the target of MRFR;
# - a **geometry** vector, UNITER's 7-d $(x_1, y_1, x_2, y_2, w, h, wh)$, normalised by the image side;
# - the detector's **class distribution**, 19 numbers: the target of MRC (its top class) and MRC-kl (all
#   of it).
#
# Scenes where the detector found nothing are dropped (there is nothing to mask).

# %%
world = ShapeWorld(WorldConfig(min_objects=2, max_objects=3, seed=0))
tokenizer = build_tokenizer(world, vocab_size=128, num_scenes=300)
detector = DetectorConfig()  # the defaults: 5% box jitter, 5% misses, 0.2 false positives per image
NUM_LABELS = world.num_classes + 1  # 18 (colour, shape) classes + "no object" (the last column)
NO_OBJECT = F.one_hot(torch.tensor(NUM_LABELS - 1), NUM_LABELS).float()


def load_split(split: str, size: int):
    """Tensors for the scenes ``0 .. size - 1`` of ``split`` that have at least one detection, and the scenes:
    caption ids/mask ``(N, L)``, region features ``(N, R, 108)``, geometry ``(N, R, 7)``, region mask ``(N, R)``,
    detector distributions ``(N, R, 19)``, the real object each box came from ``(N, R)`` (-1: a false positive)."""
    scenes = world.scenes(range(size), split)
    detections = [world.detect(s, detector) for s in scenes]
    keep = [i for i, d in enumerate(detections) if len(d) > 0]
    scenes, detections = [scenes[i] for i in keep], [detections[i] for i in keep]
    images = world.images(keep, split)  # (N, 3, 32, 32)
    boxes = [torch.from_numpy(d.pixel_boxes(32)) for d in detections]
    rois = torch.cat([torch.cat([torch.full((len(b), 1), float(i)), b], 1) for i, b in enumerate(boxes)])  # (K, 5)
    feats = roi_align(images, rois, output_size=6, spatial_scale=1.0, sampling_ratio=2).flatten(1)  # (K, 108)
    geometry = box_geometry(rois[:, 1:], 32, "7d")  # (K, 7)
    probs = torch.cat([torch.from_numpy(d.class_probs) for d in detections])  # (K, 19)
    source = torch.cat([torch.from_numpy(d.matched_object) for d in detections]).float()[:, None]  # (K, 1)
    feats, mask, geometry, probs, source = pad_regions([len(b) for b in boxes], feats, geometry, probs, source)
    probs[~mask] = NO_OBJECT  # padding rows stay valid distributions (they are never masked or scored)
    text = encode(tokenizer, [s.description for s in scenes], max_length=32)
    data = dict(input_ids=text["input_ids"], text_mask=text["attention_mask"].bool(), feats=feats,
                geometry=geometry, region_mask=mask, det_probs=probs, source=source[..., 0].long())
    return data, scenes, images, boxes


train_data, train_scenes, _, _ = load_split("train", RUN["train_scenes"])
val_data, val_scenes, val_images, val_boxes = load_split("val", RUN["val_scenes"])
real = train_data["region_mask"]
feat_mean, feat_std = train_data["feats"][real].mean(0), train_data["feats"][real].std(0) + 1e-3
for data in (train_data, val_data):  # standardise; padding stays exactly 0
    data["feats"] = (data["feats"] - feat_mean) / feat_std * data["region_mask"][..., None]
FEATURE_DIM = train_data["feats"].shape[-1]

# %%
# NBVAL_CHECK_OUTPUT
print("train scenes", len(train_scenes), "| val scenes", len(val_scenes), "| vocabulary", len(tokenizer))
print("captions", tuple(train_data["input_ids"].shape), "| region features", tuple(train_data["feats"].shape),
      "| geometry", tuple(train_data["geometry"].shape), "| detector distributions", tuple(train_data["det_probs"].shape))
print("regions per image: mean", round(train_data["region_mask"].sum(1).float().mean().item(), 2),
      "| false positives", int(((train_data["source"] < 0) & real).sum()), "of", int(real.sum()))

# %%
k = 0  # the first validation scene, followed through the notebook
class_names = [world.config.class_name(c) for c in range(world.num_classes)] + ["no object"]
probs_k = val_data["det_probs"][k][val_data["region_mask"][k]]  # (boxes, 19)
top = probs_k[:, :-1].argmax(1)
fig, axes = plt.subplots(1, 2, figsize=(10, 3.2), gridspec_kw={"width_ratios": [1, 2.4]})
draw_boxes(show_image(val_images[k], ax=axes[0], title="detector boxes, top class"), val_boxes[k],
           [f"{r}: {class_names[c]}" for r, c in enumerate(top.tolist())])
for r in range(len(probs_k)):
    axes[1].bar(np.arange(NUM_LABELS) + 0.2 * r, probs_k[r].numpy(), width=0.2, label=f"box {r}")
axes[1].set_xticks(range(NUM_LABELS), class_names, rotation=75, fontsize=7)
axes[1].set_ylabel("detector probability")
axes[1].legend(fontsize=8)
axes[1].set_title(f'caption: "{val_scenes[k].description}"', fontsize=9)
fig.tight_layout()

# %% [markdown]
# Left: the boxes of the simulated detector and their top class. Right: its class distribution for each
# box: a peak on the true class and a share on the classes with the same colour or the same shape. That
# share is information a hard label throws away, and MRC-kl keeps (section 4). An object the detector
# missed (5% of them; compare the caption with the boxes) has no region at all: no region objective can
# ever be about it, and the words that describe it cannot be grounded.
#
# ## 2. One small single-stream model for the four masked losses
#
# The model has UNITER's layout (single-stream, notebook 04): no separate text or image encoder, one
# transformer over the concatenation `[text; regions]`, and one head per objective on its outputs:
#
# ```
# caption ids ──► TextEmbeddings (word + position + type) ──────────┐
#                                                                    ├─► single-stream transformer over
# regions ──► LN( LN(W_f f) + LN(W_g g) ), masked: f ─► 0 + m ───────┘   [text; regions] (2 layers)
#                                                                          │ text tokens   │ region tokens
#                                                                       MLM head     MRFR / MRC / MRC-kl heads
# ```
#
# - **UNITER's region embedding**: feature and geometry each projected and LayerNorm-ed, summed, and
#   normalised again; a **masked region** has its feature replaced by a learned *mask embedding* $m$
#   (UNITER zeroes the feature and adds a learned vector) while its geometry stays: the model knows
#   *where* the hidden object is, not *what* it is;
# - the **MLM head** is BERT's (`MLMHead`: Linear, GELU, LayerNorm, then the word-embedding matrix
#   transposed); the three **MVM heads** have the same shape with 108 (MRFR) or 19 (MRC, MRC-kl)
#   outputs, as UNITER's `RegionFeatureRegression` and `RegionClassification`.
#
# Weights are initialised with standard deviation $0.8/\sqrt{D}$ instead of BERT's 0.02, for the reason
# notebook 04 measured: BERT's value is tuned for $D = 768$, and at $D = 64$ it makes every cross-modal
# product tiny (there, ITM with BERT's value made no progress in 600 steps).

# %%
D = RUN["dim"]
INIT_STD = 0.8 / math.sqrt(D)


def mlp_head(out_dim: int) -> nn.Module:
    """UNITER's region heads: Linear -> GELU -> LayerNorm -> Linear, ``(..., D) -> (..., out_dim)``."""
    return nn.Sequential(nn.Linear(D, D), nn.GELU(), nn.LayerNorm(D), nn.Linear(D, out_dim))


class MaskedVLP(nn.Module):
    """UNITER-style single-stream model with an MLM head and three MVM heads."""

    def __init__(self):
        super().__init__()
        self.text_embeddings = TextEmbeddings(len(tokenizer), D, max_positions=32)
        self.region_feature = nn.Sequential(nn.Linear(FEATURE_DIM, D), nn.LayerNorm(D))
        self.region_geometry = nn.Sequential(nn.Linear(7, D), nn.LayerNorm(D))
        self.region_norm = nn.LayerNorm(D)
        self.mask_embedding = nn.Parameter(torch.zeros(FEATURE_DIM))  # added to a masked (zeroed) feature
        self.fusion = build_fusion("single_stream", dim=D, num_heads=RUN["heads"], num_layers=RUN["layers"],
                                   mlp_ratio=RUN["mlp_ratio"], text_positions=False)
        self.mlm_head = MLMHead(D, len(tokenizer), tie_to=self.text_embeddings.word_embeddings)
        self.mrfr_head, self.mrc_head, self.mrc_kl_head = mlp_head(FEATURE_DIM), mlp_head(NUM_LABELS), mlp_head(NUM_LABELS)
        init_weights(self, std=INIT_STD)

    def embed_regions(self, feats, geometry, masked=None):
        """``(B, R, 108)``, ``(B, R, 7)`` -> region tokens ``(B, R, D)``; ``masked (B, R)`` bool hides those
        regions' features (zeroed, plus the learned mask embedding), keeping their geometry."""
        if masked is not None:
            feats = feats.masked_fill(masked[..., None], 0.0) + masked[..., None] * self.mask_embedding
        return self.region_norm(self.region_feature(feats) + self.region_geometry(geometry))

    def forward(self, input_ids, text_mask, feats, geometry, region_mask, masked=None):
        """Caption ids ``(B, L)`` and regions -> the fusion's output: ``.text (B, L, D)``, ``.image (B, R, D)``."""
        return self.fusion(self.text_embeddings(input_ids), text_mask,
                           self.embed_regions(feats, geometry, masked), region_mask)


torch.manual_seed(0)
model = MaskedVLP()

# %%
# NBVAL_CHECK_OUTPUT
print("parameters:", count_parameters(model))

# %% [markdown]
# ## 3. MLM: masked language modelling, conditioned on the image
#
# BERT's recipe, unchanged: choose 15% of the caption's tokens (never [CLS], [SEP], [PAD]); replace
# 80% of the chosen ones by [MASK], 10% by a random word, and leave 10% unchanged; predict the original
# token at every chosen position. In a VLP model the prediction sees the image too:
#
# $$\mathcal{L}_{\mathrm{MLM}} = -\,\mathbb{E}_{(w, v)} \frac{1}{|M|}\sum_{i \in M} \log P_\theta\big(w_i \,\big|\, w_{\setminus M},\, v\big)$$
#
# where $M$ is the set of chosen positions, $w_{\setminus M}$ the corrupted caption and $v$ the regions.
# Why not always [MASK]? [MASK] never occurs when the model is used later; the random 10% forces the
# model to keep a useful representation of *every* token (any of them might be wrong), and the
# unchanged 10% ties that representation to the word actually observed.
#
# On ShapeWorld captions the objective is visibly cross-modal: in "a small [MASK] circle, a large
# yellow square" nothing in the text says which colour is missing, only the image does (chance: 1 in
# 6 colours). We write the masking and the loss from scratch and check them against `course_lib`:
# with the same random generator, the masking must agree *exactly*.

# %%
SPECIAL_IDS = torch.tensor([PAD_ID, UNK_ID, CLS_ID, SEP_ID, MASK_ID])


def bert_masking(input_ids, vocab_size, generator, mask_prob=0.15):
    """``(B, L)`` ids -> corrupted ids ``(B, L)`` and labels ``(B, L)`` (the original id where chosen, else -100)."""
    normal_ids = torch.tensor([i for i in range(vocab_size) if i not in SPECIAL_IDS])
    chosen = (torch.rand(input_ids.shape, generator=generator) < mask_prob) & ~torch.isin(input_ids, SPECIAL_IDS)
    action = torch.rand(input_ids.shape, generator=generator)  # one draw decides [MASK] / random / keep
    random_ids = normal_ids[torch.randint(len(normal_ids), input_ids.shape, generator=generator)]
    corrupted = torch.where(chosen & (action < 0.8), MASK_ID, input_ids)  # 80%: [MASK]
    corrupted = torch.where(chosen & (action >= 0.8) & (action < 0.9), random_ids, corrupted)  # 10%: random
    labels = torch.where(chosen, input_ids, -100)  # the remaining 10% keep their word but are still predicted
    return corrupted, labels


def mlm_loss(logits, labels):
    """Mean cross-entropy over the chosen positions: ``(B, L, V)``, ``(B, L)`` -> scalar."""
    chosen = labels != -100
    return F.cross_entropy(logits[chosen], labels[chosen])


ids = train_data["input_ids"]
ours = bert_masking(ids, len(tokenizer), torch.Generator().manual_seed(1))
library = mask_tokens(ids, len(tokenizer), MASK_ID, generator=torch.Generator().manual_seed(1))
chosen = ours[1] != -100
logits = torch.randn(*ids.shape, len(tokenizer), generator=torch.Generator().manual_seed(2))
torch.testing.assert_close(mlm_loss(logits, ours[1]), masked_lm_loss(logits, ours[1]), atol=1e-6, rtol=1e-6)

# %%
# NBVAL_CHECK_OUTPUT
print("our masking equals course_lib's mask_tokens:", torch.equal(ours[0], library[0]) and torch.equal(ours[1], library[1]))
maskable = ~torch.isin(ids, SPECIAL_IDS)
share = chosen.sum() / maskable.sum()
as_mask = (ours[0][chosen] == MASK_ID).float().mean()
as_random = ((ours[0][chosen] != MASK_ID) & (ours[0][chosen] != ids[chosen])).float().mean()
print(f"chosen: 15% of words (within 1 point): {abs(share - 0.15) < 0.01}; "
      f"[MASK] 80%: {abs(as_mask - 0.8) < 0.02}; random 10%: {abs(as_random - 0.1) < 0.02}")
print("special tokens never chosen:", not torch.isin(ids[chosen], SPECIAL_IDS).any().item())
print("our loss equals masked_lm_loss (atol 1e-6): True")

# %% [markdown]
# (A random replacement can draw the original word by chance, so "random" counts a little under 10%.)
#
# ## 4. MVM: three ways to predict a hidden region
#
# UNITER's masked region modelling hides regions instead of words: each region is masked with
# probability 0.15, at least one per image; its feature is replaced by the mask embedding, its geometry
# kept; the model sees the **whole caption** and the other regions. UNITER masks **one modality at a
# time** (*conditional masking*): if "red" were masked in the caption *and* the red circle in the image,
# nothing would be left to recover either from. Three heads read the fused output $h_i$ of a masked
# region $i$:
#
# - **MRFR** (feature regression): $\;\ell = \lVert W h_i - f_i \rVert_2^2$, averaged over the masked
#   regions' feature elements (UNITER's `mse_loss(...).mean()`). The target $f_i$ is the region's own
#   feature before masking: the model must *imagine the pixels* of the hidden object from its
#   description.
# - **MRC** (classification, hard label): $\;\ell = -\log q_i[c_i]$ with $q_i = \mathrm{softmax}(W h_i)$
#   and $c_i = \arg\max_{c \le C} p_i[c]$, the detector's top object class ("no object" is never a
#   target). The model learns *what* is there, as far as the detector knew.
# - **MRC-kl** (classification, soft label): $\;\ell = D_{\mathrm{KL}}(p_i \,\Vert\, q_i) = \sum_c p_i[c]
#   \,(\log p_i[c] - \log q_i[c])$, the detector's whole distribution $p_i$ as target (ViLBERT, UNITER).
#   A hard label says "red circle"; the soft one also says "possibly another red object, or another
#   circle", and "maybe nothing at all" for a doubtful box. This is knowledge distillation from the
#   detector; you write it in exercise 1, the notebook uses `course_lib`'s `region_class_loss_kl`.
#
# Masking and the first two losses from scratch, checked against `course_lib`:

# %%
def mask_some_regions(feats, region_mask, generator, prob=0.15):
    """UNITER's region masking: ``(B, R, F)``, ``(B, R)`` -> zeroed features and ``masked (B, R)`` bool."""
    masked = (torch.rand(region_mask.shape, generator=generator) < prob) & region_mask
    fallback = torch.rand(region_mask.shape, generator=generator).masked_fill(~region_mask, -1).argmax(1)  # (B,)
    none = ~masked.any(1)  # images where no region was drawn get one real region at random
    masked[none, fallback[none]] = True
    return feats.masked_fill(masked[..., None], 0.0), masked


def mrfr_loss(predicted, target, masked):
    """L2 between the predicted and the original features of the masked regions, mean over elements."""
    return ((predicted[masked] - target[masked]) ** 2).mean()


def mrc_hard_loss(logits, detector_probs, masked):
    """Cross-entropy to the detector's top object class (the "no object" column is never a target)."""
    target = detector_probs[..., :-1].argmax(-1)  # (B, R)
    return F.cross_entropy(logits[masked], target[masked])


feats, region_mask = train_data["feats"][:256], train_data["region_mask"][:256]
ours = mask_some_regions(feats, region_mask, torch.Generator().manual_seed(3))
library = mask_regions(feats, region_mask, generator=torch.Generator().manual_seed(3))
g = torch.Generator().manual_seed(4)
predicted, class_logits = torch.randn(feats.shape, generator=g), torch.randn(256, feats.shape[1], NUM_LABELS, generator=g)
detector_probs = train_data["det_probs"][:256]
torch.testing.assert_close(mrfr_loss(predicted, feats, ours[1]), feature_regression_loss(predicted, feats, ours[1]),
                           atol=1e-6, rtol=1e-6)
torch.testing.assert_close(mrc_hard_loss(class_logits, detector_probs, ours[1]),
                           region_class_loss_hard(class_logits, detector_probs, ours[1]), atol=1e-6, rtol=1e-6)

# %%
# NBVAL_CHECK_OUTPUT
print("our region masking equals course_lib's mask_regions:", torch.equal(ours[0], library[0]) and torch.equal(ours[1], library[1]))
print("every image has a masked region:", bool(ours[1].any(1).all()), "| only real regions masked:",
      bool((ours[1] <= region_mask).all()))
print("MRFR and MRC equal feature_regression_loss and region_class_loss_hard (atol 1e-6): True")

# %% [markdown]
# With two or three regions per image, "at least one" dominates: most images get exactly one region
# masked. The MRC-kl loss is zero exactly when the model reproduces the detector's distribution, and
# a model that always answers the detector's top class with certainty pays $-\log p_i[c_i]$ where the
# detector was unsure, plus an infinite price on every class the detector gave some mass and the model
# none: it is pushed to keep the doubt.
#
# ## 5. Pretraining with the four masked losses
#
# **Batches.** Training batch number `step` is a deterministic function of the step: 64 scenes, the
# caption masked for MLM and the regions masked for MVM by the library functions we just checked
# (UNITER does its masking in the data loader as well).
#
# **One step** (`masked_losses`), with UNITER's conditional masking:
# 1. the **masked caption with the intact regions** goes through the model: **MLM** on its text outputs;
# 2. the **intact caption with the masked regions** goes through the model: **MRFR, MRC, MRC-kl** on its
#    region outputs. The two groups are stacked into one batch of $2B$ pairs, one pass;
# 3. the total loss is the unweighted sum. UNITER instead samples one task per step with mixing
#    ratios (its config `pretrain-indomain-base-8gpu.json`: ITM : MLM : MRFR : MRC-kl = 2 : 2 : 1 : 1);
#    summing costs more per step but gives every objective a gradient every step, which suits a short
#    run. (ITM, the fifth task of that mix, is notebook 06's.)

# %%
def train_batch(step: int) -> dict:
    """Training batch number ``step``: scenes, caption masked for MLM, regions masked for MVM."""
    g = torch.Generator().manual_seed(step)
    idx = torch.randint(len(train_scenes), (RUN["batch_size"],), generator=g)
    batch = {key: value[idx] for key, value in train_data.items()}
    batch["mlm_ids"], batch["mlm_labels"] = mask_tokens(batch["input_ids"], len(tokenizer), MASK_ID, generator=g)
    batch["region_masked"] = mask_regions(batch["feats"], batch["region_mask"], generator=g)[1]
    return batch


def masked_losses(model, batch):
    """MLM + MRFR + MRC + MRC-kl on one batch, one modality masked at a time (conditional masking)."""
    ids, text_mask, region_mask = batch["input_ids"], batch["text_mask"], batch["region_mask"]
    masked, B = batch["region_masked"], len(ids)
    no_region_masked = torch.zeros_like(masked)
    out = model(torch.cat([batch["mlm_ids"], ids]), text_mask.repeat(2, 1),  # (2B, L): masked caption, then intact
                batch["feats"].repeat(2, 1, 1), batch["geometry"].repeat(2, 1, 1), region_mask.repeat(2, 1),
                torch.cat([no_region_masked, masked]))  # (2B, R): intact regions, then masked
    mlm = masked_lm_loss(model.mlm_head(out.text[:B]), batch["mlm_labels"])
    regions = out.image[B:]  # (B, R, D) fused tokens of the pairs whose regions were masked
    mrfr = feature_regression_loss(model.mrfr_head(regions), batch["feats"], masked)
    mrc = region_class_loss_hard(model.mrc_head(regions), batch["det_probs"], masked)
    mrc_kl = region_class_loss_kl(model.mrc_kl_head(regions), batch["det_probs"], masked)
    return {"loss": mlm + mrfr + mrc + mrc_kl, "MLM": mlm, "MRFR": mrfr, "MRC": mrc, "MRC-kl": mrc_kl}


t0 = time.perf_counter()
history = train(model, train_batch, TrainConfig(steps=RUN["steps"], lr=RUN["lr"], warmup_steps=20, progress=False,
                                                log_every=0, device=device),
                loss_fn=masked_losses)
print(f"{RUN['steps']} steps in {time.perf_counter() - t0:.1f} s")

# %% [markdown]
# Each objective's loss, with the value of an uninformed guess (dashed): $\ln V$ for MLM (any word of the
# vocabulary), 1 for MRFR (predicting the mean feature, the features being standardised), $\ln 19$ for
# MRC, and for MRC-kl the KL from the detector's distribution to the uniform one.

# %%
p = train_data["det_probs"][real]
uniform_kl = (math.log(NUM_LABELS) + (p * torch.log(p.clamp_min(1e-12))).sum(-1)).mean().item()
guesses = {"MLM": math.log(len(tokenizer)), "MRFR": 1.0, "MRC": math.log(NUM_LABELS), "MRC-kl": uniform_kl}
fig, axes = plt.subplots(1, 4, figsize=(14, 3))
for ax, (name, guess) in zip(axes.flat, guesses.items()):
    plot_losses({name: history}, ax=ax, smooth=0.9, key=name)
    ax.axhline(guess, color="grey", linestyle="--", linewidth=0.8)
    ax.set_ylim(0, max(guess, max(history.values(name))) * 1.05)
    ax.get_legend().remove()
    ax.set_title(name, fontsize=10)
fig.tight_layout()

# %% [markdown]
# Every curve ends far below its guess line (MRFR and MRC start above it: an untrained head is
# confidently wrong), but they do not move together:
#
# - **MLM** falls first and fast: many masked tokens can be read off the caption itself ("a", "and", the
#   comma), so the language part is learned in a few dozen steps; the slow tail is the grounded part,
#   the colours and shapes;
# - **MRC** and **MRC-kl** stay near their guess for the first few dozen steps, then drop: the signature
#   of learning to *bind* across modalities. The model must first discover which words describe the
#   hidden region (through its kept geometry and the left-to-right order of the caption); only then can
#   it copy their meaning into the region;
# - **MRFR** ends highest relative to its guess: a regression target holds everything about the
#   pixels, including what no caption says (where exactly the object sits inside a jittered box).
#
# ## 6. What each objective learned
#
# Every objective is measured on the held-out validation scenes, next to its chance level and next to
# a **control**: the same question asked with the *other* modality taken from a different scene. If an
# objective really taught cross-modal grounding, the control must fall to chance.
#
# - **MLM**: each colour word, and separately each shape word, of each caption is masked in turn (one per
#   pass) and predicted; chance 1/6 for colours, 1/3 for shapes (they are uniform in ShapeWorld, and
#   independent across objects, so the rest of the caption does not help);
# - **MRC / MRC-kl / MRFR**: each detected box that comes from a real object is masked in turn; the top
#   class (of the 18 object classes) is compared with the detector's, chance 1/18; the KL of each head
#   to the detector's distribution; the MRFR error against 1.0 (predicting the mean).

# %%
COLOR_IDS = torch.tensor(tokenizer.convert_tokens_to_ids(list(world.config.colors)))
SHAPE_IDS = torch.tensor(tokenizer.convert_tokens_to_ids(list(world.config.shapes)))
val = {key: value.to(device) for key, value in val_data.items()}
N = len(val_scenes)


def other(index, shift: int):
    """The scene ``shift`` places further on (the control's "wrong" partner); shift 0 is the scene itself."""
    return (index + shift) % N


@torch.no_grad()
def mlm_accuracy(net, word_ids, shift: int = 0) -> float:
    """Mask each occurrence of ``word_ids`` in the val captions (one per pass); accuracy of the MLM head
    when the regions come from the scene ``shift`` places further on."""
    ids, text_mask = val["input_ids"], val["text_mask"]
    rows, cols = torch.isin(ids, word_ids.to(device)).nonzero(as_tuple=True)
    corrupted = ids[rows].clone()
    corrupted[torch.arange(len(rows)), cols] = MASK_ID
    j = other(rows, shift)
    out = net(corrupted, text_mask[rows], val["feats"][j], val["geometry"][j], val["region_mask"][j])
    predicted = net.mlm_head(out.text[torch.arange(len(rows)), cols]).argmax(-1)
    return (predicted == ids[rows, cols]).float().mean().item()


@torch.no_grad()
def masked_region_outputs(net, shift: int = 0):
    """Mask each val region that comes from a real object (one per pass), with the caption of the scene
    ``shift`` places further on: scene and box indices ``(K,)``, ``(K,)``, fused masked tokens ``(K, D)``."""
    rows, cols = (val["region_mask"] & (val["source"] >= 0)).nonzero(as_tuple=True)
    masked = torch.zeros(len(rows), val["feats"].shape[1], dtype=torch.bool, device=device)
    masked[torch.arange(len(rows)), cols] = True
    j = other(rows, shift)
    out = net(val["input_ids"][j], val["text_mask"][j], val["feats"][rows], val["geometry"][rows],
              val["region_mask"][rows], masked)
    return rows, cols, out.image[torch.arange(len(rows)), cols]


@torch.no_grad()
def mvm_scores(net, shift: int = 0) -> dict:
    """Top-class accuracy and KL to the detector of both MRC heads, and the MRFR error, on masked val boxes."""
    rows, cols, h = masked_region_outputs(net, shift)
    target = val["det_probs"][rows, cols]  # (K, 19)
    scores = {"MRFR error": F.mse_loss(net.mrfr_head(h), val["feats"][rows, cols]).item()}
    for name, head in (("MRC", net.mrc_head), ("MRC-kl", net.mrc_kl_head)):
        logits = head(h)
        scores[f"{name} accuracy"] = (logits[:, :-1].argmax(-1) == target[:, :-1].argmax(-1)).float().mean().item()
        scores[f"{name} KL"] = F.kl_div(F.log_softmax(logits, -1), target, reduction="batchmean").item()
    return scores


model.eval()
results = {"MLM colour": mlm_accuracy(model, COLOR_IDS), "MLM colour, wrong image": mlm_accuracy(model, COLOR_IDS, 1),
           "MLM shape": mlm_accuracy(model, SHAPE_IDS), "MLM shape, wrong image": mlm_accuracy(model, SHAPE_IDS, 1)}
mvm, mvm_wrong = mvm_scores(model), mvm_scores(model, 1)
rows = ["| objective | measure | right pair | control: wrong partner | chance / guess |", "| --- | --- | ---: | ---: | ---: |",
        f"| MLM | colour word accuracy | {results['MLM colour']:.3f} | {results['MLM colour, wrong image']:.3f} | {1 / 6:.3f} |",
        f"| MLM | shape word accuracy | {results['MLM shape']:.3f} | {results['MLM shape, wrong image']:.3f} | {1 / 3:.3f} |",
        f"| MRC | top-class accuracy | {mvm['MRC accuracy']:.3f} | {mvm_wrong['MRC accuracy']:.3f} | {1 / 18:.3f} |",
        f"| MRC-kl | top-class accuracy | {mvm['MRC-kl accuracy']:.3f} | {mvm_wrong['MRC-kl accuracy']:.3f} | {1 / 18:.3f} |",
        f"| MRC | KL to the detector (lower is better) | {mvm['MRC KL']:.3f} | {mvm_wrong['MRC KL']:.3f} | {uniform_kl:.3f} |",
        f"| MRC-kl | KL to the detector (lower is better) | {mvm['MRC-kl KL']:.3f} | {mvm_wrong['MRC-kl KL']:.3f} | {uniform_kl:.3f} |",
        f"| MRFR | squared error per element | {mvm['MRFR error']:.3f} | {mvm_wrong['MRFR error']:.3f} | 1.000 |"]
display(Markdown("\n".join(rows)))

# %%
# NBVAL_CHECK_OUTPUT
checks = {
    "MLM colour accuracy > 0.6 (chance 1/6)": results["MLM colour"] > 0.6,
    "MLM shape accuracy > 0.5 (chance 1/3)": results["MLM shape"] > 0.5,
    "MLM needs the image: a wrong image costs > 0.3 of colour accuracy":
        results["MLM colour"] - results["MLM colour, wrong image"] > 0.3,
    "MRC accuracy > 0.6 (chance 1/18)": mvm["MRC accuracy"] > 0.6,
    "MRC needs the caption: the wrong caption brings it under 0.2": mvm_wrong["MRC accuracy"] < 0.2,
    "MRFR error < 0.6 (1.0 = predicting the mean)": mvm["MRFR error"] < 0.6,
    "MRC-kl matches the detector better than MRC (lower KL)": mvm["MRC-kl KL"] < mvm["MRC KL"],
}
for claim, holds in checks.items():
    print(f"{claim}: {holds}")
failed = [claim for claim, holds in checks.items() if not holds]
assert_learned(not failed, f"failed: {failed}; results {results}, {mvm}", SCALE)

# %% [markdown]
# The controls are the heart of the table. With the wrong image, MLM falls to chance on colours and
# shapes: the words it recovers come from the regions, not from a language prior. With the wrong
# caption, MRC falls to chance: the hidden region's class comes from the caption, found through the
# region's *position* (its geometry is kept) and the left-to-right order of the caption. MRFR's error
# grows *above* 1 with a wrong caption: the model confidently imagines the object the wrong caption
# describes.
#
# The two classification heads pick the detector's top class about equally often, but the MRC-kl head is
# closer to the detector's distribution (lower KL). How sure is each of them? The mean probability each
# gives its top class, over all masked boxes and over the boxes where the detector itself hesitated (its
# top class below 0.6), and the distributions for the first such box of the validation set:

# %%
rows_, cols_, h = masked_region_outputs(model)
with torch.no_grad():
    dists = {"detector (the MRC-kl target)": val["det_probs"][rows_, cols_],
             "MRC head (hard labels)": model.mrc_head(h).softmax(-1),
             "MRC-kl head (soft labels)": model.mrc_kl_head(h).softmax(-1)}
unsure = dists["detector (the MRC-kl target)"][:, :-1].max(-1).values < 0.6
for name, dist in dists.items():
    top = dist.max(-1).values
    print(f"{name:30s} mean top probability: all boxes {top.mean():.2f}, where the detector hesitated {top[unsure].mean():.2f}")
i = int(unsure.nonzero()[0, 0])  # the first box on which the detector hesitated
fig, ax = plt.subplots(figsize=(10, 3))
for offset, (name, dist) in enumerate(dists.items()):
    ax.bar(np.arange(NUM_LABELS) + 0.27 * (offset - 1), dist[i].cpu().numpy(), width=0.27, label=name)
ax.set_xticks(range(NUM_LABELS), class_names, rotation=75, fontsize=7)
ax.set_ylabel("probability")
ax.set_title(f"box {int(cols_[i])} masked; caption: \"{val_scenes[int(rows_[i])].description}\"", fontsize=9)
ax.legend(fontsize=8);

# %% [markdown]
# The hard-label head is **over-confident**: trained to put all its mass on one class, it is more sure
# than the detector on average, and just as sure on the boxes where the detector hesitated. The
# soft-label head **hedges** instead. It cannot know *which* box the detector hesitated on (the box's
# features are hidden and the detector's noise is random), so it learns the detector's *typical* doubt
# about such an object: some mass on the classes that share its colour or its shape, some on "no
# object". That is the knowledge a soft target carries and a hard one throws away.

# %% [markdown]
# **Try MLM yourself.** The caption of the first validation scene with one token hidden: choose which
# one to mask and read the MLM head's five most likely tokens given the scene's own regions (left),
# and given the regions of another scene (right; choose it with the slider). The hidden token's bar is
# green. The pictures are for you: the model reads the RoIAlign features and geometry of the
# detector's boxes, not the pixels. Things to try: hide a colour or a shape and compare the two sides;
# hide "a" or "and", which the caption alone gives away.

# %%
from course_lib.widgets import masked_word_playground


@torch.no_grad()
def predict_masked(j, input_ids, attention_mask, net=model):
    """MLM logits ``(B, L, V)`` for captions ``(B, L)``, all read with the regions of validation scene ``j``."""
    B, text_mask = len(input_ids), attention_mask.bool().to(device)
    region_mask = val["region_mask"][j:j + 1]
    regions = net.embed_regions(val["feats"][j:j + 1], val["geometry"][j:j + 1])  # (1, R, D)
    out = net.fusion(net.text_embeddings(input_ids.to(device)), text_mask, regions.expand(B, -1, -1),
                     region_mask.expand(B, -1))
    return net.mlm_head(out.text)


first_colour = next(t for t in tokenizer.tokenize(val_scenes[0].description) if t in world.config.colors)
masked_word_playground(predict_masked, tokenizer, val_scenes[0].description, list(range(N)), pictures=val_images,
                       word=first_colour)


# %% [markdown]
# ## 7. What each masked objective teaches
#
# - **MLM** teaches the model to *ground words*: a masked colour or shape can only be recovered by
#   finding the right region and reading its appearance (the wrong-image control falls to chance). It
#   also keeps the language side a language model (function words, word order), which is why every
#   VLP model of the detector era kept it.
# - **MRFR** teaches the reverse direction, *imagining the region* from the text: the richest target
#   (every feature of the region) and the noisiest, since the feature also holds what no caption says.
#   LXMERT and UNITER keep it next to classification.
# - **MRC** teaches *what* is there, as a discrete class, and inherits the detector's mistakes as
#   label noise; it makes the head over-confident.
# - **MRC-kl** teaches the same *and the detector's uncertainty*: a soft target is a better teacher than
#   its argmax (knowledge distillation, Hinton et al. 2015). UNITER's ablation (its Table 2) found
#   MRC-kl + MRFR the best pair of region objectives.
#
# None of them ever shows the model a *mismatched* pair: every caption here describes its image. Telling
# a matching pair from a mismatched one (ITM) and ranking all captions against all images (ITC) are the
# next notebook's objectives; UNITER trains all of them together, and later notebooks assemble these
# pieces into systems: UNITER (MLM + ITM + MRFR + MRC-kl + WRA), LXMERT (MLM + feature regression +
# labels + matching + QA), ALBEF and BLIP (ITC + ITM with hard negatives + MLM or LM).

# %%
print(f"notebook ran in {time.perf_counter() - start_time:.0f} s")

# %% [markdown]
# ## Exercise
#
# **Exercise 1 - MRC-kl.** Write `mrc_kl(logits, detector_probs, masked_positions)`: `logits (B, N, C+1)`
# from the region head, `detector_probs (B, N, C+1)` (rows sum to 1, some entries exactly 0),
# `masked_positions (B, N)` bool → the scalar $\frac{1}{|M|}\sum_{i \in M} \sum_c p_i[c]\,(\log p_i[c] -
# \log q_i[c])$ with $q_i = \mathrm{softmax}(\text{logits}_i)$ and $0 \log 0 = 0$. Only masked regions count.
# Hint: `F.log_softmax`, and `torch.xlogy(p, p)` computes $p \log p$ with $0 \log 0 = 0$.

# %% [exercise]
from course_lib.checks.objectives import check_mrc_kl


def mrc_kl(logits, detector_probs, masked_positions):
    raise NotImplementedError("log-softmax of the masked regions, KL(detector || model) per region, mean")


check_mrc_kl(mrc_kl)

# %% [solution]
from course_lib.checks.objectives import check_mrc_kl


def mrc_kl(logits, detector_probs, masked_positions):
    log_q = F.log_softmax(logits[masked_positions], dim=-1)  # (M, C + 1) the model's log-distribution
    p = detector_probs[masked_positions]  # (M, C + 1) the detector's distribution
    return (torch.xlogy(p, p) - p * log_q).sum(-1).mean()  # KL per masked region, averaged


check_mrc_kl(mrc_kl)
