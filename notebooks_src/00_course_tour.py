# %% [markdown]
# # 00 · Course tour: vision-language pretraining in one picture
#
# **Vision-language pretraining (VLP)** learns, from many image–text pairs, representations that
# connect what is *seen* with what is *said*. Pretrained once, such a model is then reused for
# retrieval (find the image for a caption), visual question answering, reasoning over image
# pairs, grounding a phrase to a box, captioning and zero-shot classification.
#
# In this course you build every classic VLP system from scratch (VisualBERT, ViLBERT, LXMERT,
# UNITER, Oscar, CLIP, ALBEF, BLIP, CoCa, VLMo, X-VLM and more), train each on a laptop CPU in
# about a minute, and watch it really learn. This notebook is the map:
#
# 1. the three questions every VLP model answers;
# 2. **ShapeWorld**, the small synthetic world every notebook trains on, with all its annotations;
# 3. the downstream tasks;
# 4. a first model, a tiny CLIP (Radford et al., 2021), trained here in about 40 seconds.

# %% [parameters]
SCALE = "cpu"  # "cpu": the cpu-tiny preset, about a minute; "gpu": bigger model, longer run

# %%
import matplotlib.pyplot as plt
import torch

from course_lib.utils import seed_everything

seed_everything(0, threads=2)
RUN = {
    "cpu": dict(preset="cpu-tiny", train_scenes=20000, steps=220, batch_size=128, lr=2e-3),
    "gpu": dict(preset="gpu-small", train_scenes=200000, steps=5000, batch_size=256, lr=5e-4),
}[SCALE]

# %% [markdown]
# ## 1. Three questions
#
# The surveys of the field (e.g. Chen et al., 2023, *VLP: A Survey on Vision-Language
# Pre-training*; Du et al., 2022) explain any VLP model by three questions, and `course_lib` is laid out
# the same way, so you can find every idea by the question it answers:
#
# | question | what it asks | `course_lib` | examples |
# |---|---|---|---|
# | **features** | how do text, images and video become vectors? | `features/` | WordPiece tokens; detector regions (OD-RF); CNN grids; ViT patches |
# | **fusion** | where and how do the two modalities interact? | `fusion/` | single-stream (VisualBERT), co-attention (ViLBERT), two towers (CLIP), fusion encoder (ALBEF), mixture of experts (VLMo) |
# | **objectives** | which losses teach the alignment? | `objectives/` | masked language / vision modelling, image-text matching, contrastive learning, word-region alignment by optimal transport |
#
# A model file in `course_lib/models/` then reads like the paper's figure: this extractor, that
# fusion, these losses. The notebooks follow the same order: text features (01), the transformer
# (02), image and video features (03), fusion styles (04), objectives (05), optimal transport (06),
# then one system after another, and finally scaling up to real data on GPUs (20).

# %% [markdown]
# ## 2. ShapeWorld
#
# Nothing can be downloaded while you learn (a classroom, an offline laptop, CI), so the course
# ships a generator of a small visual world with **complete ground truth**. A scene holds one to
# three coloured shapes; everything about it is a pure function of `(seed, split, index)`: scene 7
# of the training split is the same on every machine, at every resolution.

# %%
# NBVAL_CHECK_OUTPUT
from course_lib.data import DetectorConfig, ShapeWorld, WorldConfig

world = ShapeWorld(WorldConfig(image_size=32, held_out=(("red", "circle"),)))
print("colours:", world.config.colors)
print("shapes: ", world.config.shapes, "| sizes:", world.config.sizes)
print("classes (colour x shape):", world.num_classes)
scene = world.scene(7)
print([o.name for o in scene.objects])

# %% [markdown]
# Every scene comes with its boxes, class ids and attributes, the pairwise relations between
# its objects (a *scene graph*, as Visual Genome stores it), several captions from a small
# grammar, a referring phrase for each object, and questions with their answers:

# %%
# NBVAL_CHECK_OUTPUT
from course_lib.widgets import describe_scene

print(describe_scene(scene))

# %% [markdown]
# The same scene can be rendered at any size: 32 px for the notebooks, 224 px for GPU runs.
# Boxes are stored normalised to [0, 1]; `scene.boxes(size)` gives the exact pixel boxes of the
# rendering at that size.

# %%
from course_lib.viz import image_grid, show_image, show_scene

fig, axes = plt.subplots(1, 3, figsize=(10, 3.6))
for ax, size in zip(axes, (32, 64, 224)):
    show_scene(world.render(scene, size), scene.boxes(size), [o.name for o in scene.objects], ax=ax)
    ax.set_title(f"{size} px")
plt.tight_layout()
plt.show()

# %% [markdown]
# A gallery of training scenes with one caption each. Captions vary on purpose: some list every
# object, some state a relation, some only count. That is what web captions are like: true, but
# each one only partly describes its image.

# %%
scenes = world.scenes(range(8))
image_grid([world.render(s, 64) for s in scenes], titles=[s.captions[0] for s in scenes], ncols=4,
           figsize=(14, 6))
plt.show()

# %% [markdown]
# ### The simulated detector
# The region-based systems of 2019–2020 (ViLBERT, LXMERT, UNITER, ...) never saw true boxes: a
# Faster R-CNN gave them jittered boxes, missed some objects, invented others, and gave every
# box a soft distribution over classes. ShapeWorld's simulated detector reproduces these
# imperfections with knobs (`box_noise`, `miss_rate`, `false_positives`, `confidence`), so later
# notebooks can measure what each costs. Green: ground truth; yellow: detections with their top
# class and its probability.

# %%
from course_lib.viz import draw_boxes

detector = DetectorConfig(box_noise=0.08, miss_rate=0.2, false_positives=0.8)
fig, axes = plt.subplots(1, 4, figsize=(12, 3.4))
for ax, i in zip(axes, range(20, 24)):
    s = world.scene(i)
    det = world.detect(s, detector)
    names = [f"{world.config.class_name(c) if p[-1] < 0.5 else 'no object'} {p.max():.2f}"
             for c, p in zip(det.labels, det.class_probs)]
    show_scene(world.render(s, 128), s.boxes(128), ax=ax)
    draw_boxes(ax, det.pixel_boxes(128), names, color="yellow")
    for patch in ax.patches[: len(s.objects)]:
        patch.set_edgecolor("lime")
plt.tight_layout()
plt.show()

# %% [markdown]
# ### Pairs, videos, noise and a compositional split
# - **Image pairs with a statement** that is true or false (as in NLVR2), balanced 50/50.
# - **Videos**: objects moving in straight lines, with captions of the motion (for VideoBERT and
#   frame order modelling).
# - **Caption noise**: a knob replaces a fraction of captions by captions of other scenes, as web
#   data is noisy (what ALBEF's distillation and BLIP's CapFilt are for).
# - **A compositional split**: here the red circle never appears in training; the
#   `"compositional"` split has one in every scene, to test generalisation to unseen combinations.

# %%
from course_lib.data.datasets import PairDataset
from course_lib.data.video import make_video, render_video

pairs = PairDataset(world, "train", size=4)
fig, axes = plt.subplots(2, 4, figsize=(12, 5.4))
for k in range(2):
    item = pairs[k]
    show_image(item["left"], ax=axes[k, 0], title="left")
    show_image(item["right"], ax=axes[k, 1], title="right")
    axes[k, 1].text(1.1, 0.5, f'"{item["statement"]}"\n→ {bool(item["label"])}', transform=axes[k, 1].transAxes,
                    fontsize=10, va="center")
    axes[k, 2].axis("off")
    axes[k, 3].axis("off")
plt.show()
video = make_video(world, 3, num_frames=6)
image_grid(list(render_video(world, video, 64)), titles=[f"t={t}" for t in range(6)], ncols=6, figsize=(12, 2.4))
plt.suptitle(video.captions[-1])
plt.show()
held_out = world.scene(0, "compositional")
print("a compositional-split scene:", [o.name for o in held_out.objects])

# %% [markdown]
# ### Browse the world
# Move the slider to walk through scenes; change the split or the rendering size. (In a static
# view of this notebook, the widget shows its first scene only.)

# %%
from course_lib.widgets import scene_browser

scene_browser(world)

# %% [markdown]
# ## 3. Downstream tasks
# Each task has a torch `Dataset` in `course_lib.data.datasets`, and every system of the course is
# evaluated on the same ones:
#
# | task | dataset | the question | metric |
# |---|---|---|---|
# | image↔text retrieval | `ImageTextDataset` | which caption goes with this image (and back)? | Recall@K |
# | VQA | `VQADataset` | answer a question about the image | accuracy |
# | NLVR-like reasoning | `PairDataset` | is the statement true of the image pair? | accuracy |
# | visual grounding | `GroundingDataset` | which box does the phrase refer to? | acc@IoU 0.5 |
# | captioning | `ImageTextDataset` | describe the image | BLEU / exact match |
# | zero-shot classification | prompts such as "a red circle" | which class, without training on classes? | accuracy |

# %%
# NBVAL_CHECK_OUTPUT
from course_lib.data.datasets import GroundingDataset, ImageTextDataset, VQADataset

vqa = VQADataset(world, "val", size=200)
grounding = GroundingDataset(world, "val", size=200)
print(f"200 scenes give {len(vqa)} VQA questions and {len(grounding)} grounding phrases")
print("answers:", vqa.answers)
print("a VQA item:", vqa[3]["question"], "->", vqa.answers[vqa[3]["answer"]])
print("a grounding item:", grounding[3]["phrase"], "->", [round(v, 3) for v in grounding[3]["box"].tolist()])

# %% [markdown]
# ## 4. A first model: a tiny CLIP
#
# CLIP (Radford et al., 2021) is the simplest VLP model that really works: an image encoder and a
# text encoder, trained so that the embedding of an image is close to the embedding of its own
# caption and far from the other captions in the batch. For a batch of $B$ pairs with
# L2-normalised embeddings $v_i$ (images) and $t_j$ (texts), the similarity matrix is
# $S_{ij} = v_i^\top t_j / \tau$ with a learned temperature $\tau$, and the loss is the symmetric
# cross-entropy with the matching pairs on the diagonal:
#
# $$\mathcal L = \frac12\Big[\frac1B\sum_i -\log\frac{e^{S_{ii}}}{\sum_j e^{S_{ij}}}
#               + \frac1B\sum_j -\log\frac{e^{S_{jj}}}{\sum_i e^{S_{ij}}}\Big]$$
#
# You will build it piece by piece later (features in 01–03, two towers in 04, the loss in 05);
# here we use the library's version as a preview: a ViT with 4-pixel patches and a 2-layer text
# transformer, both of width 64. First a tokenizer trained on ShapeWorld's text:

# %%
# NBVAL_CHECK_OUTPUT
import tempfile

from course_lib.data.datasets import Collator, StepBatches, build_tokenizer
from course_lib.models.clip import CLIP, CLIPConfig

tokenizer = build_tokenizer(world, directory=tempfile.mkdtemp())
train_set = ImageTextDataset(world, "train", size=RUN["train_scenes"], captions="description")
val_set = ImageTextDataset(world, "val", size=1000, captions="description")
model = CLIP(CLIPConfig.from_preset(RUN["preset"], vocab_size=len(tokenizer)))
print("vocabulary:", len(tokenizer), "tokens")
print(f"CLIP parameters: {sum(p.numel() for p in model.parameters()):,}")
print("one caption as tokens:", tokenizer.tokenize(val_set.scenes[0].description))

# %% [markdown]
# Training: AdamW with warmup and a cosine schedule, batches of 128 captions and images.
# `StepBatches` makes batch number `k` a deterministic function of `k`, so this run gives the
# same losses every time (and a resumed run the same losses as an uninterrupted one).

# %%
from course_lib.train import TrainConfig, train
from course_lib.viz import plot_losses

batches = StepBatches(train_set, Collator(tokenizer, caption="first"), RUN["batch_size"], seed=0)
config = TrainConfig(steps=RUN["steps"], lr=RUN["lr"], warmup_steps=RUN["steps"] // 10, weight_decay=0.1,
                     progress=False, log_every=0)
history = train(model, batches, config)
plot_losses({"CLIP (ITC loss)": history}, smooth=0.9)
plt.axhline(torch.log(torch.tensor(RUN["batch_size"] * 1.0)).item(), ls="--", c="gray", label="chance: ln B")
plt.legend()
plt.show()

# %% [markdown]
# ### Did it learn?
# We embed 1,000 held-out scenes and their descriptions and rank. Two scenes can have the same
# description (same objects, same order, different positions); a retrieved image counts as a hit
# when its description matches. The chance level is what a random ranking would score.

# %%
from course_lib.evaluate import chance_recall_at_k, recall_at_k
from course_lib.features.text import encode

model.eval()
descriptions = [s.description for s in val_set.scenes]
tokens = encode(tokenizer, descriptions)
similarity = model.similarity(val_set.all_images(), tokens["input_ids"], tokens["attention_mask"])
positives = torch.tensor([[a == b for b in descriptions] for a in descriptions])
recall = recall_at_k(similarity, positives, ks=(1, 5))
chance = chance_recall_at_k(positives, k=(1, 5))
for key in ("t2i_R@1", "t2i_R@5", "i2t_R@1", "i2t_R@5"):
    print(f"{key}: {recall[key]:.3f}   (chance {chance[key]:.4f})")

# %%
# NBVAL_CHECK_OUTPUT
THRESHOLD = 0.08  # text->image R@1 over 1,000 held-out images; chance is printed above (about 0.004)
print("text->image R@1 above", THRESHOLD, ":", recall["t2i_R@1"] > THRESHOLD)
assert recall["t2i_R@1"] > THRESHOLD, f"R@1 {recall['t2i_R@1']:.3f} is too close to chance {chance['t2i_R@1']:.4f}"

# %% [markdown]
# ### What did it learn?
# For a few held-out descriptions, the five images the model ranks highest. Look at which
# mistakes it makes: usually the right objects with a wrong size, or one object of three wrong.
# Colour is learned first, then shape, then size and order.

# %%
queries = [0, 1, 2]
fig, axes = plt.subplots(len(queries), 6, figsize=(12, 2.3 * len(queries)))
for row, q in enumerate(queries):
    axes[row, 0].text(0, 0.5, descriptions[q].replace(", ", ",\n").replace(" and ", "\nand "), fontsize=8,
                      va="center")
    axes[row, 0].axis("off")
    for col, i in enumerate(similarity[:, q].topk(5).indices.tolist()):
        show_image(val_set.image(i), ax=axes[row, col + 1],
                   title=("✓" if positives[i, q] else "✗") + f" {similarity[i, q]:.2f}")
plt.tight_layout()
plt.show()

# %% [markdown]
# ### Zero-shot classification
# CLIP's party trick: classify images into classes it was never trained to classify, by writing
# each class as a caption ("a prompt") and picking the caption whose embedding is closest.
# On the held-out scenes with a single object, we classify its colour and shape (18 classes)
# with two prompts per class, "a large red circle" and "a small red circle", averaged
# (prompt ensembling, as CLIP does with its 80 ImageNet templates).

# %%
single = [i for i, s in enumerate(val_set.scenes) if len(s.objects) == 1]
classes = [world.config.class_name(c) for c in range(world.num_classes)]
prompts = [f"a {size} {name}" for name in classes for size in ("large", "small")]
enc = encode(tokenizer, prompts)
with torch.no_grad():
    text_emb = model.encode_text(enc["input_ids"], enc["attention_mask"]).view(len(classes), 2, -1).mean(1)
    image_emb = model.encode_image(val_set.all_images()[single])
predicted = (image_emb @ torch.nn.functional.normalize(text_emb, dim=-1).T).argmax(1)
truth = torch.tensor([val_set.scenes[i].class_ids[0] for i in single])
zero_shot = (predicted == truth).float().mean().item()
print(f"zero-shot accuracy on {len(single)} single-object scenes: {zero_shot:.2f} (chance {1 / len(classes):.3f})")
# No threshold here: this tiny model saw single-object captions in only a third of its training
# scenes. Exercise for the curious: train longer (SCALE = "gpu") and watch this number climb.

# %% [markdown]
# ## Exercises
# 1. **Read the ground truth.** Write `count_color(scene, color)` that returns how many objects of
#    that colour a scene holds.
# 2. **Score retrieval yourself.** Write `t2i_recall_at_1(similarity, positives)`: for each text
#    (a column), is the highest-scoring image one of its positives? Return the fraction of texts
#    for which it is.
# 3. **The chance level.** Write `chance_t2i_recall_at_1(positives)`: the expected text→image R@1 of
#    a random ranking. (Hint: a text with $p$ matching images among $N$ is hit with probability $p/N$.)
#
# Run the cells; the check functions say what is right or what to fix.

# %% [exercise]
from course_lib.checks.shapeworld import check_chance_recall_at_1, check_count_color, check_text_to_image_recall_at_1


def count_color(scene, color):
    ...  # your code: look at scene.objects


def t2i_recall_at_1(similarity, positives):
    ...  # similarity (Ni, Nt), positives (Ni, Nt) bool


def chance_t2i_recall_at_1(positives):
    ...


check_count_color(count_color)
check_text_to_image_recall_at_1(t2i_recall_at_1)
check_chance_recall_at_1(chance_t2i_recall_at_1)

# %% [solution]
from course_lib.checks.shapeworld import check_chance_recall_at_1, check_count_color, check_text_to_image_recall_at_1


def count_color(scene, color):
    return sum(obj.color == color for obj in scene.objects)


def t2i_recall_at_1(similarity, positives):
    best_image = similarity.argmax(dim=0)  # (Nt,) the top image of each text
    hits = positives[best_image, torch.arange(similarity.shape[1])]
    return hits.float().mean().item()


def chance_t2i_recall_at_1(positives):
    matching_images = positives.sum(dim=0).float()  # (Nt,)
    return (matching_images[matching_images > 0] / positives.shape[0]).mean().item()


check_count_color(count_color)
check_text_to_image_recall_at_1(t2i_recall_at_1)
check_chance_recall_at_1(chance_t2i_recall_at_1)

# %% [markdown]
# ## What's next
# Notebook 01 opens the first question, features, with text: how a sentence becomes a sequence
# of vectors a transformer can read.
