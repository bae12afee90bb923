# %% [markdown]
# # 03 · Image and video features: regions, grids, patches, pixels, kaleido patches, visual words
#
# **What you will build.** One ShapeWorld scene goes through every way VLP models have turned an image
# into a sequence of vectors, and you draw what each one sees:
#
# | extractor | tokens | papers |
# | --- | --- | --- |
# | **region features** (OD-RF): detector boxes → RoIAlign on a CNN map → vector + 5-d box geometry | one per detected object | Anderson et al. 2018 (*Bottom-Up and Top-Down Attention*), ViLBERT (Lu et al. 2019), LXMERT, UNITER |
# | **grid features** (CNN-GF): every cell of a CNN feature map | $h \times w$ | Jiang et al. 2020 (*In Defense of Grid Features for VQA*), Pixel-BERT |
# | **Pixel-BERT sampling**: 100 random cells of the grid at training time | 100 | Huang et al. 2020 (*Pixel-BERT*) |
# | **patch features** (ViT-PF): $p \times p$ patches, one linear map | $HW/p^2$ | Dosovitskiy et al. 2021 (ViT), ViLT (Kim et al. 2021), CLIP, ALBEF |
# | **kaleido patches**: the image cut at 5 scales | 55 | Kaleido-BERT (Zhuge et al. 2021) |
# | **video**: per-frame vectors + time embeddings; VideoBERT's visual words (hierarchical k-means) | frames / clips | VideoBERT (Sun et al. 2019) |
#
# You will write three of the pieces **from scratch** and check each against `course_lib`: RoIAlign's
# bilinear sampling for one box (He et al. 2017, *Mask R-CNN*), the 5-d box geometry vector, and
# patchify (equal to a strided convolution). Then you will **train** a small classifier on region
# features and measure what happens when the boxes come from an imperfect detector instead of the
# ground truth.
#
# **Where this sits in the course.** Every VLP model answers three questions (the surveys of Du et al.
# 2022, *A Survey of Vision-Language Pre-Trained Models*, and Gan et al. 2022, *Vision-Language
# Pre-training: Basics, Recent Advances, and Future Trends*, are organised around them):
# **1. features** - how do text, images and video become vectors? - **2. fusion** - where do the
# modalities meet? - **3. objectives** - which losses teach the alignment? Notebook 01 answered
# question 1 for text and notebook 02 built the attention layers; this notebook answers question 1 for
# images and video; notebook 04 is question 2.
# The surveys' main point about image features is the one to watch for in every figure below:
# **region features keep only what the detector found; grids and patches keep the whole image.**

# %% [parameters]
SCALE = "cpu"  # "cpu": the cpu-tiny preset, about a minute; "gpu": bigger model, longer run

# %%
RUN = {
    "cpu": dict(detector_steps=300, classifier_steps=150, train_scenes=1500, val_scenes=400, batch_size=48,
                dim=64, videos=48),
    "gpu": dict(detector_steps=1500, classifier_steps=2000, train_scenes=20000, val_scenes=2000, batch_size=128,
                dim=256, videos=400),
}[SCALE]
RUN

# %%
import time

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from course_lib.utils import get_device, seed_everything

seed_everything(0, threads=2)
from course_lib.data import DetectorConfig, ShapeWorld, WorldConfig
from course_lib.data.datasets import VideoDataset
from course_lib.evaluate import box_iou
from course_lib.features.cnn import SmallCNN
from course_lib.features.detector import DetectorTraining, TinyDetector, train_detector
from course_lib.features.grid import GridFeatures
from course_lib.features.kaleido import KaleidoEmbedding, kaleido_patches
from course_lib.features.patch import PatchEmbedding, patchify
from course_lib.features.pixel_sampling import PixelSampler
from course_lib.features.region import RegionFeatures, box_geometry
from course_lib.features.roi_align import roi_align
from course_lib.features.video import FrameFeatures, clip_features, hierarchical_kmeans
from course_lib.viz import draw_boxes, image_grid, plot_losses, show_image

device = get_device()
start_time = time.perf_counter()

# %% [markdown]
# ## 1. One scene
#
# ShapeWorld (notebook 00) gives every scene's ground truth: the objects, their pixel boxes and their
# classes (a class is a (colour, shape) pair, 6 × 3 = 18 of them, like Visual Genome's fine-grained
# object classes). We pick one validation scene with three objects and follow it through the whole
# notebook. The same scene can be rendered at any resolution: 32 px for the models, 60 px for the
# kaleido patches, 64 px for the Pixel-BERT figure.

# %%
world = ShapeWorld(WorldConfig(image_size=32, seed=0))
SCENE_INDEX = next(i for i in range(100) if len(world.scene(i, "val")) == 3)
scene = world.scene(SCENE_INDEX, "val")
image = world.images([SCENE_INDEX], "val")[0]  # (3, 32, 32) in [0, 1]
gt_boxes = torch.from_numpy(scene.boxes(32))  # (3, 4) pixels x1, y1, x2, y2
names = [world.config.class_name(c) for c in scene.class_ids]
ax = show_image(image, title=scene.description)
draw_boxes(ax, gt_boxes, names);

# %%
# NBVAL_CHECK_OUTPUT
print("image", tuple(image.shape), "| objects", len(scene), "| classes", world.num_classes)
print("ground-truth boxes (pixels):", gt_boxes.int().tolist())

# %% [markdown]
# ## 2. Region features (OD-RF)
#
# The detector-era models (ViLBERT, LXMERT, VisualBERT, UNITER, Oscar...) never looked at pixels
# directly. A Faster R-CNN trained on Visual Genome proposed 10-100 boxes per image, and each box became
# one visual token: the detector's CNN feature pooled inside the box (RoIAlign) plus an embedding of
# where the box is. Three things decide what those tokens contain: **which boxes** (the detector),
# **how the box is pooled** (RoIAlign), and **how its position is encoded** (the geometry vector).
#
# ### 2.1 Where the boxes come from
#
# Three sources of boxes for our scene:
# - the **ground truth** (no real model ever has it);
# - ShapeWorld's **simulated detector** (`world.detect`): jittered boxes, a 5% chance of missing an
#   object, some false positives, and a soft class distribution per box (what MRC-kl learns from);
# - a **tiny detector trained right here** for a few seconds (`course_lib.features.detector`, a
#   CenterNet-like head on a `SmallCNN`): each cell of an 8 × 8 map predicts "an object's centre is in
#   me", its class and its box.

# %%
t0 = time.perf_counter()
detector = TinyDetector(world.num_classes, channels=(16, 32), hidden=32)
detector, detector_losses = train_detector(
    world, detector=detector, config=DetectorTraining(steps=RUN["detector_steps"], batch_size=32, lr=5e-3))
detector_seconds = time.perf_counter() - t0
print(f"detector trained for {RUN['detector_steps']} steps in {detector_seconds:.1f} s; "
      f"loss {detector_losses[0]:.2f} -> {np.mean(detector_losses[-10:]):.2f}")

# %%
simulated = world.detect(scene, DetectorConfig())
sim_boxes = torch.from_numpy(simulated.pixel_boxes(32))  # (N', 4)
trained_boxes, trained_probs = detector.detect(image[None])[0]  # (N'', 4), (N'', 19)

fig, axes = plt.subplots(1, 3, figsize=(9, 3.3))
for ax, (title, boxes, probs) in zip(axes, [
        ("ground truth", gt_boxes, None),
        ("simulated detector", sim_boxes, torch.from_numpy(simulated.class_probs)),
        ("tiny trained detector", trained_boxes, trained_probs)]):
    show_image(image, ax=ax, title=f"{title}: {len(boxes)} boxes")
    labels = names if probs is None else [world.config.class_name(int(p[:-1].argmax())) for p in probs]
    draw_boxes(ax, boxes, labels)
fig.tight_layout()

# %% [markdown]
# The left panel is what region features would be with a perfect detector. The middle and right
# panels are what the models actually got: boxes a little off, sometimes a missed object (its token
# simply does not exist) or a box on empty background. Whatever the detector misses is gone for every
# later stage: no amount of pretraining brings back an object that has no token.
#
# ### 2.2 RoIAlign from scratch, for one box
#
# RoIAlign (He et al. 2017) pools a fixed $p_h \times p_w$ grid of features inside a box of any size.
# The box is mapped onto the feature map (multiply by `spatial_scale` = 1 / stride, and shift by half
# a cell so that pixel 0..W covers map cells 0..w-1), cut into $p_h \times p_w$ bins, and each bin is
# the average of $g \times g$ regularly spaced samples. A sample lands between cell centres, so it is
# **bilinearly interpolated** - never rounded to a cell, which was RoIPool's flaw.
#
# Bilinear interpolation has a neat form: along one axis, the weight of cell $i$ for a coordinate $y$
# is the "tent" $\max(0, 1 - |y - i|)$, non-zero only for the two cells around $y$. In two
# dimensions the weights multiply:
#
# $$ f(y, x) = \sum_{i, j} \max(0, 1 - |y - i|)\,\max(0, 1 - |x - j|)\, f_{ij}. $$
#
# A sample just outside the map is clamped onto the border (torchvision's convention, which
# `course_lib` follows), one more than a cell outside counts as zero.

# %%
def tent_weights(coord: float, size: int) -> torch.Tensor:
    """Bilinear weights ``(size,)`` of one coordinate on an axis of ``size`` cells (centres at 0..size-1)."""
    if coord < -1.0 or coord > size:
        return torch.zeros(size)  # too far outside: the sample counts as 0
    c = min(max(coord, 0.0), size - 1.0)  # clamp onto the border cells
    return (1.0 - (c - torch.arange(size, dtype=torch.float32)).abs()).clamp(min=0.0)


def bilinear(feature_map: torch.Tensor, y: float, x: float) -> torch.Tensor:
    """``feature_map (C, h, w)`` at the point ``(y, x)`` in cell units -> ``(C,)``."""
    _, h, w = feature_map.shape
    return torch.einsum("i,cij,j->c", tent_weights(y, h), feature_map, tent_weights(x, w))


def roi_align_one_box(feature_map, box, output_size=(7, 7), spatial_scale=0.25, samples=2):
    """``feature_map (C, h, w)``, pixel ``box (4,)`` -> pooled ``(C, ph, pw)`` (aligned=True)."""
    ph, pw = output_size
    x1, y1, x2, y2 = (box * spatial_scale - 0.5).tolist()  # box in map cells, half-cell shift
    bin_h, bin_w = (y2 - y1) / ph, (x2 - x1) / pw
    out = torch.zeros(feature_map.shape[0], ph, pw)
    for r in range(ph):
        for c in range(pw):
            for sy in range(samples):  # g x g samples at the centres of a sub-grid of the bin
                for sx in range(samples):
                    y = y1 + (r + (sy + 0.5) / samples) * bin_h
                    x = x1 + (c + (sx + 0.5) / samples) * bin_w
                    out[:, r, c] += bilinear(feature_map, y, x)
    return out / samples**2

# %% [markdown]
# Run it on the feature map of the trained detector's backbone (stride 4: an 8 × 8 map of a 32 px
# image) for the first object of our scene, and compare with `course_lib.features.roi_align.roi_align`,
# which does every box of a batch at once with two matrix products per image.

# %%
with torch.no_grad():
    feature_map = detector.backbone(image[None])  # (1, 32, 8, 8)
ours = roi_align_one_box(feature_map[0], gt_boxes[0], output_size=(7, 7), spatial_scale=1 / 4)
library = roi_align(feature_map, [gt_boxes[:1]], output_size=(7, 7), spatial_scale=1 / 4,
                    sampling_ratio=2, aligned=True)[0]
torch.testing.assert_close(ours, library, atol=1e-5, rtol=1e-5)
print("our RoIAlign matches course_lib's:", tuple(ours.shape))

# %% [markdown]
# Our version matches the library's. RoIAlign's output is then average-pooled to one $C$-vector per
# box: everything outside the box, the background, the neighbours, the layout, is gone from it.
#
# ### 2.3 The 5-d box geometry
#
# Pooling forgets *where* the box was. ViLBERT (Lu et al. 2019) adds it back with a 5-d vector: the
# corners divided by the image size and the fraction of the image the box covers,
#
# $$ g = \left(\frac{x_1}{W}, \frac{y_1}{H}, \frac{x_2}{W}, \frac{y_2}{H}, \frac{(x_2 - x_1)(y_2 - y_1)}{W H}\right), $$
#
# projected to the model width and added to the projected RoI feature, then LayerNorm:
# $\mathrm{token} = \mathrm{LN}(W_f f + W_g g)$. (UNITER uses 7 numbers, adding $w$ and $h$; LXMERT 4;
# `course_lib.features.region` has all three.) For our first box, by hand:

# %%
x1, y1, x2, y2 = gt_boxes[0].tolist()
W = H = 32
geometry_by_hand = torch.tensor([x1 / W, y1 / H, x2 / W, y2 / H, (x2 - x1) * (y2 - y1) / (W * H)])
torch.testing.assert_close(geometry_by_hand, box_geometry(gt_boxes[:1], (H, W), "5d")[0])
print("5-d geometry of", names[0], "=", [round(v, 4) for v in geometry_by_hand.tolist()], "- matches box_geometry")

# %% [markdown]
# `RegionFeatures` puts the pieces together: backbone → RoIAlign → mean → $\mathrm{LN}(W_f f + W_g g)$,
# padded to the largest number of boxes in the batch with a mask. With `train_backbone=False` the
# backbone is frozen, like the frozen Faster R-CNN of the 2019 models.

# %%
# NBVAL_CHECK_OUTPUT
regions = RegionFeatures(detector.backbone, dim=RUN["dim"], geometry="5d", train_backbone=False)
out = regions(image[None], [gt_boxes])
print("tokens", tuple(out.tokens.shape), "| mask", out.mask.tolist(), "| pooled", tuple(out.pooled.shape),
      "| geometry", tuple(out.geometry.shape))

# %% [markdown]
# ## 3. Grid features (CNN-GF) and Pixel-BERT's random sampling
#
# "In Defense of Grid Features" (Jiang et al. 2020) showed that the detector is not needed: take the
# CNN's feature map, and let every cell be a token, with a 2-d position embedding
# $\mathrm{row}[r] + \mathrm{col}[c]$. Nothing is thrown away: background, context and any object the
# detector would have missed are all in some cell. The price is more tokens (64 here, hundreds in
# real models) and tokens that do not line up with objects.
#
# Pixel-BERT (Huang et al. 2020) uses grid features end to end and, during pretraining, keeps only
# **100 random cells** per image: cheaper, and a regulariser (no single cell can be relied on). At
# evaluation every cell is used. 100 cells need a map with more than 100 of them, so for this figure
# we render the scene at 64 px (a 16 × 16 map at stride 4).

# %%
grid = GridFeatures(SmallCNN(channels=(16, 32)), dim=RUN["dim"])
image64 = world.images([SCENE_INDEX], "val", image_size=64)[0]  # (3, 64, 64)
sampler = PixelSampler(num_samples=100).train()
with torch.no_grad():
    grid_tokens = grid(image[None])  # (1, 64, D): an 8 x 8 map of the 32 px image
    sampled = sampler(grid(image64[None]), generator=torch.Generator().manual_seed(0))  # 100 of 256 cells

# %%
# NBVAL_CHECK_OUTPUT
print("grid tokens", tuple(grid_tokens.shape), "| Pixel-BERT keeps", tuple(sampled.tokens.shape),
      "of", grid(image64[None]).shape[1], "cells")
sampler.eval()
print("at evaluation:", tuple(sampler(grid(image64[None]).detach()).tokens.shape))

# %% [markdown]
# ## 4. Patch features (ViT-PF), from scratch
#
# ViT (Dosovitskiy et al. 2021) removed the CNN too: cut the image into $p \times p$ patches, flatten
# each to a vector of $C p^2$ numbers and map it linearly to the model width. ViLT (Kim et al. 2021)
# brought this to VLP: the visual embedding became a single linear layer, and the transformer does all
# the work. Here is patchify the slow, obvious way: loop over the patch grid in raster order.

# %%
def patchify_loops(images: torch.Tensor, p: int) -> torch.Tensor:
    """``(B, C, H, W)`` -> ``(B, N, C*p*p)``: patches in raster order, each flattened (channel, row, column)."""
    B, C, H, W = images.shape
    patches = []
    for top in range(0, H, p):  # patch rows, top to bottom
        for left in range(0, W, p):  # patch columns, left to right
            patches.append(images[:, :, top:top + p, left:left + p].reshape(B, C * p * p))
    return torch.stack(patches, dim=1)  # (B, N, C*p*p)


P = 8
ours = patchify_loops(image[None], P)
torch.testing.assert_close(ours, patchify(image[None], P), atol=0, rtol=0)
print("our patchify matches course_lib's:", tuple(ours.shape))

# %% [markdown]
# Our version matches the library's exactly. Every library implements the "patchify, then linear"
# step as **one convolution with kernel $p$ and stride $p$**: each output position is the dot product
# of the kernel with one patch. The two are the same computation when the linear weight is the
# kernel flattened in (channel, row, column) order - the order we used:

# %%
embed = PatchEmbedding(32, P, dim=RUN["dim"], cls_token=False)
conv = embed.patch_embedding  # Conv2d(3, D, kernel_size=8, stride=8)
with torch.no_grad():
    by_conv = conv(image[None]).flatten(2).transpose(1, 2)  # (1, 16, D)
    by_linear = patchify_loops(image[None], P) @ conv.weight.reshape(conv.out_channels, -1).T + conv.bias
torch.testing.assert_close(by_linear, by_conv, atol=1e-5, rtol=1e-5)
print("patchify + linear == strided conv:", tuple(by_conv.shape))

# %% [markdown]
# ## 5. Kaleido patches
#
# Kaleido-BERT (Zhuge et al. 2021, for fashion) cuts the image at **five scales**: the whole image,
# then 2 × 2, 3 × 3, 4 × 4 and 5 × 5 grids, 1 + 4 + 9 + 16 + 25 = 55 patches from the global look
# down to small details. Each patch gets its own token (plus a level embedding). The side must divide
# by 1..5, so we render the scene at 60 px.

# %%
image60 = world.images([SCENE_INDEX], "val", image_size=60)[0]  # (3, 60, 60)
levels = kaleido_patches(image60[None])  # [(1, l*l, 3, 60/l, 60/l) for l = 1..5]
kaleido = KaleidoEmbedding(dim=RUN["dim"])

# %%
# NBVAL_CHECK_OUTPUT
print("patches per level:", [tuple(x.shape[1:]) for x in levels])
print("kaleido tokens:", tuple(kaleido(image60[None]).shape))

# %% [markdown]
# ## 6. Every extractor on the same scene
#
# Here is what each extractor turns our scene into. Each panel shows the image regions its tokens
# come from.

# %%
def draw_grid(ax, size, cells, color="white"):
    for k in range(1, cells):
        ax.axhline(k * size / cells - 0.5, color=color, linewidth=0.6)
        ax.axvline(k * size / cells - 0.5, color=color, linewidth=0.6)


fig, axes = plt.subplots(2, 4, figsize=(12, 6.4))
panels = axes.flat
for title, boxes in [("GT regions", gt_boxes), ("simulated detector", sim_boxes),
                     ("trained detector", trained_boxes)]:
    ax = next(panels)
    show_image(image, ax=ax, title=f"{title}: {len(boxes)} tokens")
    draw_boxes(ax, boxes)
ax = next(panels)
show_image(image, ax=ax, title="grid cells (stride 4): 64 tokens")
draw_grid(ax, 32, 8)
ax = next(panels)
show_image(image, ax=ax, title=f"patches {P}x{P}: {32 // P * 32 // P} tokens")
draw_grid(ax, 32, 32 // P, color="yellow")
ax = next(panels)
show_image(image64, ax=ax, title="Pixel-BERT: 100 of 256 cells")
rows, cols = sampled.indices[0] // 16, sampled.indices[0] % 16
ax.scatter(cols * 4 + 1.5, rows * 4 + 1.5, s=9, c="white", marker="s")
for ax, level in zip(panels, (2, 5)):
    show_image(image60, ax=ax, title=f"kaleido level {level}x{level} (of 1..5)")
    draw_grid(ax, 60, level, color="cyan")
fig.tight_layout()

# %% [markdown]
# What each keeps and loses (the surveys' comparison, on our scene):
#
# | extractor | tokens here | keeps | loses |
# | --- | --- | --- | --- |
# | regions | 1 per box (3, or what the detector found) | objects as units, aligned with nouns; few tokens | the background and context, relations outside boxes, **any missed object**; needs a detector (slow, frozen, trained on a fixed label set) |
# | grid | 64 | everything, with 2-d positions; trainable end to end | object boundaries; many tokens |
# | Pixel-BERT sampling | 100 at training | everything on average, cheaper | at each step, the cells that were not drawn |
# | patches | 16 | everything; the cheapest extractor (one linear layer) | small details inside a patch, unless patches are small (more tokens) |
# | kaleido | 55 | coarse and fine views at once | cost; patches cut across objects |
#
# In the top row, the trained detector's boxes are a little off, and where a detector misses an object
# the region representation has no token for it at all. The grid and patch panels cover the whole
# image: whatever is in the scene reaches the transformer.

# %% [markdown]
# ## 7. Video features
#
# ShapeWorld videos are short clips of objects moving in straight lines (`course_lib.data.video`).
# The simplest video tokens are **per-frame features plus a temporal embedding** (which frame), the
# analogue of a word's position: `FrameFeatures` encodes each frame with an image encoder and adds
# `time[t]`.
#
# VideoBERT (Sun et al. 2019) went further: it made video **discrete** so that BERT's masked language
# modelling applies unchanged. Features of 1.5 s clips are clustered by **hierarchical k-means**
# (k = 12 per level, 4 levels: $12^4 = 20736$ "visual words"), and each clip becomes the id of its leaf
# cluster. Here: clips of 2 frames, features from the trained detector's backbone (frozen), k = 4 and
# 2 levels, so 16 visual words.

# %%
videos = VideoDataset(world, split="train", size=RUN["videos"], num_frames=8)
frames = torch.stack([videos[i]["frames"] for i in range(len(videos))])  # (V, 8, 3, 32, 32)
frame_tokens = FrameFeatures(SmallCNN(channels=(16, 32)), dim=RUN["dim"], max_frames=8)(frames[:2])
with torch.no_grad():
    maps = detector.backbone(frames.flatten(0, 1))  # (V*8, 32, 8, 8)
    per_frame = F.adaptive_avg_pool2d(maps, 2).flatten(1).reshape(len(videos), 8, -1)  # (V, 8, 128): 2x2 layout
clips = clip_features(per_frame, clip_length=2)  # (V, 4, 128)
codebook = hierarchical_kmeans(clips.flatten(0, 1), branching=4, depth=2, generator=torch.Generator().manual_seed(0))
words = codebook.assign(clips.flatten(0, 1)).reshape(len(videos), 4)  # (V, 4) visual-word ids

# %%
# NBVAL_CHECK_OUTPUT
print("videos", tuple(frames.shape), "| frame tokens", tuple(frame_tokens.shape), "| clip features", tuple(clips.shape))
print("visual vocabulary:", codebook.num_words, "words (4 ** 2)")

# %%
print(int(codebook.valid[-1].sum()), "of the", codebook.num_words, "leaf centroids are in use")
print(videos[0]["caption"], "-> visual words", words[0].tolist())
image_grid(frames[0], titles=[f"t={t} w{int(words[0, t // 2])}" for t in range(8)], ncols=8, figsize=(12, 2));

# %%
shown = torch.bincount(words.flatten(), minlength=codebook.num_words).argsort(descending=True)[:4]
examples, titles = [], []
for w in shown.tolist():
    video_ids, clip_ids = (words == w).nonzero(as_tuple=True)
    for v, c in list(zip(video_ids.tolist(), clip_ids.tolist()))[:6]:
        examples.append(frames[v, 2 * c])
        titles.append(f"word {w}")
image_grid(examples, titles=titles, ncols=6, figsize=(9, 1.7 * len(shown)));

# %% [markdown]
# The film strip shows one video as a sentence of 4 visual words. Each row of the second figure shows
# clips that fell into the same visual word: they share their coarse content (which colours sit in which
# quarter of the image), whatever the exact objects are. That is both the strength of the idea (a
# discrete vocabulary makes BERT's recipe apply to video) and its weakness (a clip's details are
# rounded to the nearest centroid: 20736 words in the paper, 16 here).

# %% [markdown]
# ## 8. Learning: what the boxes cost a region classifier
#
# Now the experiment behind the surveys' claim. We train a small model on region features to predict
# each object's class (18 classes, chance $1/18$) from its box: RoIAlign + 5-d geometry
# (`RegionFeatures`) and a linear head, trained on **ground-truth boxes**, with two backbones:
#
# - a `SmallCNN` **trained from scratch** with the classifier (end to end);
# - the trained detector's backbone, **frozen** - the 2019 recipe, where the region features came
#   from a fixed Faster R-CNN and only the layers above it learned.
#
# Then we evaluate on held-out scenes with four sources of boxes: the ground truth, the simulated
# detector, a much noisier simulated detector, and our tiny trained detector. An object counts as
# correct only if some box covers it (IoU ≥ 0.5 for the trained detector; the simulated detector says
# which object each box came from) **and** that box is classified right; an object that no box found is
# an error - exactly what a region-feature model experiences.

# %%
train_scenes = world.scenes(range(RUN["train_scenes"]), "train")
train_images = world.images(range(RUN["train_scenes"]), "train")
train_boxes = [torch.from_numpy(s.boxes(32)) for s in train_scenes]
train_classes = [torch.from_numpy(s.class_ids) for s in train_scenes]


class RegionClassifier(nn.Module):
    """Images ``(B, 3, 32, 32)`` + boxes ``list[(N_i, 4)]`` -> class logits ``(K, num_classes)``, one row per box
    (the boxes of image 0 first)."""

    def __init__(self, backbone: nn.Module, train_backbone: bool, dim: int, num_classes: int):
        super().__init__()
        self.regions = RegionFeatures(backbone, dim, geometry="5d", output_size=4, train_backbone=train_backbone)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, images, boxes):
        out = self.regions(images, boxes)
        return self.head(out.tokens[out.mask])  # (K, C)


def region_batch(step: int) -> dict:
    g = torch.Generator().manual_seed(step)
    idx = torch.randint(len(train_scenes), (RUN["batch_size"],), generator=g).tolist()
    return {"images": train_images[idx], "boxes": [train_boxes[i] for i in idx],
            "classes": torch.cat([train_classes[i] for i in idx])}


def region_loss(model, batch):
    logits = model(batch["images"], batch["boxes"])
    return {"loss": F.cross_entropy(logits, batch["classes"]),
            "accuracy": (logits.argmax(1) == batch["classes"]).float().mean()}


from course_lib.train import TrainConfig, train

backbones = {"trainable SmallCNN": (SmallCNN(channels=(16, 32)), True),
             "frozen detector backbone": (detector.backbone, False)}
classifiers, histories = {}, {}
for name, (backbone, trainable) in backbones.items():
    torch.manual_seed(0)
    classifiers[name] = RegionClassifier(backbone, trainable, RUN["dim"], world.num_classes)
    t0 = time.perf_counter()
    histories[name] = train(classifiers[name], region_batch,
                            TrainConfig(steps=RUN["classifier_steps"], lr=3e-3, warmup_steps=10, progress=False,
                                        log_every=0, device=device), loss_fn=region_loss)
    print(f"{name}: {RUN['classifier_steps']} steps in {time.perf_counter() - t0:.1f} s")
plot_losses(histories, smooth=0.8);

# %% [markdown]
# Both losses fall from $\ln 18 \approx 2.9$. The frozen backbone ends lower: the detector already
# learned class-discriminative features (its head predicted classes), so only the small layers on top
# have to learn - what made the 2019 models cheap to pretrain, and also what capped them: a frozen
# detector can only describe what its own training labels named.

# %%
val_scenes = world.scenes(range(RUN["val_scenes"]), "val")
val_images = world.images(range(RUN["val_scenes"]), "val")
noisy = DetectorConfig(box_noise=0.25, miss_rate=0.2, false_positives=0.5)


def boxes_and_owners(source: str):
    """Per val image: boxes ``(N', 4)`` and, per box, the index of the object it covers (-1: none)."""
    out = []
    detections = detector.detect(val_images) if source == "trained detector" else None
    for k, s in enumerate(val_scenes):
        gt = torch.from_numpy(s.boxes(32))
        if source == "ground truth":
            out.append((gt, torch.arange(len(gt))))
        elif "simulated" in source:
            det = world.detect(s, DetectorConfig() if source == "simulated detector" else noisy)
            out.append((torch.from_numpy(det.pixel_boxes(32)), torch.from_numpy(det.matched_object)))
        else:
            boxes = detections[k][0]
            owner = torch.full((len(boxes),), -1)
            if len(boxes):
                best, j = box_iou(boxes, gt).max(1)  # each box's best ground-truth object
                owner = torch.where(best >= 0.5, j, owner)
            out.append((boxes, owner))
    return out


@torch.no_grad()
def object_accuracy(classifier: nn.Module, per_image) -> tuple[float, float]:
    """(fraction of objects covered by a box, fraction covered AND classified right)."""
    classifier.eval()
    boxes = [b.float().to(device) for b, _ in per_image]
    predictions = classifier(val_images.to(device), boxes).argmax(1).cpu()  # (K,) every box of every image
    found = right = total = 0
    for k, (image_boxes, owner) in enumerate(per_image):
        pred, predictions = predictions[:len(image_boxes)], predictions[len(image_boxes):]  # this image's
        for obj, cls in enumerate(val_scenes[k].class_ids.tolist()):
            mine = owner == obj  # the boxes that cover object obj
            found += bool(mine.any())
            right += bool((pred[mine] == cls).any())
            total += 1
    return found / total, right / total


sources = ["ground truth", "simulated detector", "noisy simulated detector", "trained detector"]
boxes_by_source = {source: boxes_and_owners(source) for source in sources}
results = {(source, name): object_accuracy(model, boxes_by_source[source])
           for source in sources for name, model in classifiers.items()}
chance = 1 / world.num_classes
print(f"{'boxes from':26s} {'objects found':>14s}" + "".join(f"{name:>26s}" for name in classifiers)
      + f"   (accuracy; chance {chance:.3f})")
for source in sources:
    found = results[source, "trainable SmallCNN"][0]
    print(f"{source:26s} {found:14.3f}" + "".join(f"{results[source, name][1]:26.3f}" for name in classifiers))

# %%
# NBVAL_CHECK_OUTPUT
gt_accuracy = {name: results["ground truth", name][1] for name in classifiers}
noisy_accuracy = {name: results["noisy simulated detector", name][1] for name in classifiers}
for name in classifiers:
    print(f"{name}: accuracy with ground-truth boxes above 0.7: {gt_accuracy[name] > 0.7}; "
          f"the noisy detector costs more than 0.1: {noisy_accuracy[name] < gt_accuracy[name] - 0.1}")
for name in classifiers:
    assert gt_accuracy[name] > 0.7, f"{name}: accuracy {gt_accuracy[name]:.2f} with GT boxes (chance {chance:.2f})"
    assert noisy_accuracy[name] < gt_accuracy[name] - 0.1, "a detector that misses 20% of objects must cost accuracy"

# %% [markdown]
# With ground-truth boxes both classifiers are right for most objects, far above chance ($1/18$). The
# default simulated detector costs a little: boxes slightly off, about 5% of the objects missed. The
# noisy detector (a fifth of the objects missed, boxes jittered by a quarter of their size) costs much
# more: a missed object is an error whatever the classifier does, and a shifted box pools background.
# Our tiny trained detector, after a few seconds of training, finds most objects but not all: look at
# its "objects found" column, an upper bound on any region model that uses its boxes. This is why the
# end-to-end models of 2021 (ViLT, ALBEF, CLIP) dropped the detector for grids and patches: the
# transformer then sees every pixel and learns what to look at.
#
# Below, validation scenes with the trained detector's boxes, classified by the frozen-backbone model:
# green = covers an object and is classified right, red = wrong class or no object under it. Objects
# with no box at all are the ones a region model never sees.

# %%
trained = boxes_by_source["trained detector"]
probe = classifiers["frozen detector backbone"]
fig, axes = plt.subplots(1, 6, figsize=(12, 2.4))
with torch.no_grad():
    for ax, k in zip(axes, range(6)):
        boxes, owner = trained[k]
        classes = val_scenes[k].class_ids.tolist()
        show_image(val_images[k], ax=ax, title=f"{len(boxes)} boxes, {len(classes)} objects")
        if len(boxes):
            pred = probe(val_images[k:k + 1].to(device), [boxes.to(device)]).argmax(1).tolist()
            ok = [o >= 0 and p == classes[o] for p, o in zip(pred, owner.tolist())]
            draw_boxes(ax, boxes, [world.config.class_name(p) for p in pred],
                       color=["lime" if good else "red" for good in ok])
fig.tight_layout()
print(f"notebook ran in {time.perf_counter() - start_time:.0f} s")

# %% [markdown]
# ## Exercises
#
# Each exercise rewrites one piece of this notebook in another form; the check function grades your
# version against `course_lib` and tells you what is wrong.
#
# **Exercise 1 - patchify without loops.** Write `patchify(images, p)` with `reshape` and `permute`
# only (no Python loop): `(B, C, H, W)` → `(B, N, C*p*p)`, patches in raster order, each flattened
# (channel, row, column). Hint: split `H` into `(H/p, p)` and `W` into `(W/p, p)`, then bring the two
# grid axes to the front.

# %% [exercise]
from course_lib.checks.features import check_patchify


def my_patchify(images: torch.Tensor, p: int) -> torch.Tensor:
    B, C, H, W = images.shape
    raise NotImplementedError("reshape to (B, C, H/p, p, W/p, p), permute, reshape")


check_patchify(my_patchify)

# %% [solution]
from course_lib.checks.features import check_patchify


def my_patchify(images: torch.Tensor, p: int) -> torch.Tensor:
    B, C, H, W = images.shape
    x = images.reshape(B, C, H // p, p, W // p, p)  # (B, C, gh, p, gw, p)
    x = x.permute(0, 2, 4, 1, 3, 5)  # (B, gh, gw, C, p, p)
    return x.reshape(B, (H // p) * (W // p), C * p * p)  # (B, N, C*p*p)


check_patchify(my_patchify)

# %% [markdown]
# **Exercise 2 - the 5-d geometry of many boxes.** Write `geometry_5d(boxes, image_size)`: pixel boxes
# `(N, 4)` and `image_size = (H, W)` → `(N, 5)` rows $(x_1/W, y_1/H, x_2/W, y_2/H, \text{area}/(WH))$,
# for all boxes at once (no loop). Careful: images need not be square.

# %% [exercise]
from course_lib.checks.features import check_box_geometry_5d


def geometry_5d(boxes: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
    H, W = image_size
    ...


check_box_geometry_5d(geometry_5d)

# %% [solution]
from course_lib.checks.features import check_box_geometry_5d


def geometry_5d(boxes: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
    H, W = image_size
    corners = boxes / torch.tensor([W, H, W, H], dtype=boxes.dtype)  # (N, 4) in [0, 1]
    area = (corners[:, 2] - corners[:, 0]) * (corners[:, 3] - corners[:, 1])  # (N,) fraction of the image
    return torch.cat([corners, area[:, None]], dim=1)  # (N, 5)


check_box_geometry_5d(geometry_5d)

# %% [markdown]
# **Exercise 3 - bilinear interpolation with four neighbours.** Our `bilinear` used tent weights over
# every cell. Write the textbook version: for a point $(y, x)$ with $0 \le y \le h-1$, $0 \le x \le w-1$,
# take the cell $(y_0, x_0) = (\lfloor y \rfloor, \lfloor x \rfloor)$, its neighbours $y_1 = y_0 + 1$,
# $x_1 = x_0 + 1$ (clamped to the last row/column), the fractions $t_y = y - y_0$, $t_x = x - x_0$, and
#
# $$ f = (1-t_y)(1-t_x) f_{y_0 x_0} + (1-t_y)\,t_x f_{y_0 x_1} + t_y (1-t_x) f_{y_1 x_0} + t_y t_x f_{y_1 x_1}. $$

# %% [exercise]
from course_lib.checks.features import check_bilinear_at_point


def bilinear_four_neighbours(feature_map: torch.Tensor, y: float, x: float) -> torch.Tensor:
    C, h, w = feature_map.shape
    raise NotImplementedError("find the four neighbours, their weights, and sum")


check_bilinear_at_point(bilinear_four_neighbours)

# %% [solution]
import math

from course_lib.checks.features import check_bilinear_at_point


def bilinear_four_neighbours(feature_map: torch.Tensor, y: float, x: float) -> torch.Tensor:
    C, h, w = feature_map.shape
    y0, x0 = min(math.floor(y), h - 1), min(math.floor(x), w - 1)
    y1, x1 = min(y0 + 1, h - 1), min(x0 + 1, w - 1)  # clamped: at the last row/column y1 == y0
    ty, tx = y - y0, x - x0
    return ((1 - ty) * (1 - tx) * feature_map[:, y0, x0] + (1 - ty) * tx * feature_map[:, y0, x1]
            + ty * (1 - tx) * feature_map[:, y1, x0] + ty * tx * feature_map[:, y1, x1])


check_bilinear_at_point(bilinear_four_neighbours)
