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
# 4. a first model, a tiny CLIP (Radford et al., 2021), trained here in about a minute.
#
# *Terms in English and Chinese: [glossary](../GLOSSARY.md).*

# %% [parameters]
SCALE = "cpu"  # "cpu": about a minute; "gpu": bigger model, longer run; "smoke": a few steps (what the tests run)

# %%
import matplotlib.pyplot as plt
import torch

from course_lib.utils import seed_everything

seed_everything(0, threads=2)
RUN = {
    "smoke": dict(preset="cpu-tiny", train_scenes=2000, steps=8, batch_size=32, lr=2e-3),
    "cpu": dict(preset="cpu-tiny", train_scenes=20000, steps=220, batch_size=128, lr=2e-3),
    "gpu": dict(preset="gpu-small", train_scenes=200000, steps=5000, batch_size=256, lr=5e-4),
}[SCALE]
from course_lib.thresholds import assert_learned  # asserts at SCALE cpu/gpu; reports at smoke

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
# (02), image and video features (03), fusion styles (04), masked modelling (05), matching and contrast (06), optimal transport (07),
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
import textwrap

scenes = world.scenes(range(8))
image_grid([world.render(s, 64) for s in scenes], titles=[textwrap.fill(s.captions[0], 40) for s in scenes],
           ncols=4, figsize=(13, 7.2))
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
# - **A compositional split**: here the red circle is held out. It never appears in a scene of
#   the train, val or test split, and no text of those splits names it, not even a question
#   answered "no" (a model that read "is there a red circle? no" a thousand times would have
#   learnt something about the pair). The `"compositional"` split has one in every scene, to test
#   generalisation to a combination of a colour and a shape never seen together.

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
fig = image_grid(list(render_video(world, video, 64)), titles=[f"t={t}" for t in range(6)], ncols=6,
                 figsize=(12, 2.7))
fig.suptitle(f'video caption: "{video.captions[-1]}"', fontsize=10)
fig.tight_layout()  # again, now with the title: it gets its own row above the frame titles
plt.show()


def names_red_circle(scene):  # in a caption, a referring phrase or a question
    texts = [*scene.captions, scene.description, *scene.region_phrases, *(q for q, _, _ in scene.questions)]
    return any("red circle" in text for text in texts)


for split in ("train", "compositional"):
    sample = world.scenes(range(500), split)
    shown = sum(any(o.color == "red" and o.shape == "circle" for o in s.objects) for s in sample)
    print(f"{split}: of 500 scenes, {shown} show a red circle and {sum(map(names_red_circle, sample))} name one")
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
# You will build it piece by piece later (features in 01–03, two towers in 04, the loss in 06);
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
assert_learned(recall["t2i_R@1"] > THRESHOLD,
               f"R@1 {recall['t2i_R@1']:.3f} is too close to chance {chance['t2i_R@1']:.4f}", SCALE)

# %% [markdown]
# ### What did it learn?
# Before looking at rankings, look at the numbers the model ranks with. A similarity is a cosine in
# $[-1, 1]$, but the loss never sees a cosine alone: it sees the logit $S_{ij} = s\,\cos_{ij}$, with
# $s = 1/\tau$ the learnt *logit scale* (CLIP, Radford et al. 2021, §2.5: $\tau$ starts at 0.07 and
# $s$ is clipped at 100). A softmax only cares about differences between logits, so what matters
# is how far apart the cosines of competing images are, multiplied by $s$. The cell prints where the
# cosines lie, how crowded the top of each ranking is, and what probability
# $p(\text{image}\mid\text{text}) = \operatorname{softmax}_i(s\cos_{ij})$ the model gives its top image
# among the 1,000.

# %%
import math

scale = model.itc.logit_scale.exp().item()  # s = 1 / tau, learnt
start_scale = 1 / model.config.init_temperature
# Adam moves a parameter by about lr per step at most (Kingma & Ba 2015, §2.1), and the
# logit scale is a parameter like any other: so log s can move by about sum(lr) in this run.
reach = start_scale * math.exp(sum(r["lr"] for r in history.records))
print(f"logit scale s: {start_scale:.1f} at the start, {scale:.1f} after training "
      f"(CLIP's clip: 100; the most Adam could reach in {RUN['steps']} steps: about {reach:.1f})")
q01, q50, q99 = similarity.flatten().quantile(torch.tensor([0.01, 0.5, 0.99])).tolist()
print(f"cosine of all 1,000 x 1,000 pairs: median {q50:.3f}, 1st to 99th percentile {q01:.3f} to {q99:.3f}")
print(f"cosine of an image and its own description: mean {similarity[positives].mean():.3f}")
top5 = similarity.topk(5, dim=0).values  # (5, texts): each description's five best cosines
print(f"best cosine of a description: lowest {top5[0].min():.3f}, median {top5[0].median():.3f}")
gap = (top5[0] - top5[4]).median().item()
print(f"best minus 5th-best cosine of a description: median {gap:.4f}, that is {scale * gap:.3f} in logits")
crowd = (similarity >= top5[0] - 0.01).sum(0).float().median().item()
print(f"images within 0.01 of a description's best cosine: median {crowd:.0f}")
prob = (scale * similarity).softmax(dim=0)  # (images, texts): p(image | text) over the gallery
print(f"p(top image | text): median {prob.max(0).values.median():.3f} (uniform over the gallery: {1 / len(prob):.3f})")

# %% [markdown]
# Most cosines are **not** near 1: over all pairs the median is close to 0 and the 1st to 99th
# percentiles span almost the whole of $[-1, 1]$. What is near 1 is the top of every ranking: the
# best cosine of even the worst-served description is above 0.9, an image and its own description
# score above 0.97 on average, and the images the model confuses with it score nearly as high. The
# five best images of a description lie within about a hundredth of a cosine of each other, which
# the learnt scale $s$ turns into less than a fifth of a logit: close to a tie. So the softmax shares
# the probability among the handful of images close to the best, and the top one gets about 5%
# (uniform would be 0.1%).
#
# The loss only ever sees $s$ times a difference of cosines. To separate two images whose
# descriptions differ by one word, the model must open a gap between their cosines, and a gap of
# 0.01 is worth only $0.01\,s$ in the loss; a larger $s$ would make the same gap count for more.
# CLIP learns $s$ and lets it grow up to 100, but here it moved only a little from its start,
# $1/0.07 \approx 14.3$: in a run this short, Adam cannot move $\log s$ by more than about the sum
# of the learning rates, and the printed bound shows that 100 was out of reach. (The released CLIP
# models end at the clip, $s = 100$.)

# %% [markdown]
# Now four descriptions drawn at random from the 1,000 (seed 0, so always the same four), each
# with the five images the model ranks highest. Above each image: ✓ if its description is the
# query's, its cosine, and $p(\text{image}\mid\text{text})$. Beside each query: how many of the
# 1,000 images match it and the rank of the first that does. The cell also prints how often the
# model hits on these four, beside its rates on all 1,000, so you can tell a lucky draw from a
# typical one.

# %%
draw = torch.Generator().manual_seed(0)
queries = torch.randperm(len(descriptions), generator=draw)[:4].tolist()
order = similarity.argsort(dim=0, descending=True)  # (images, texts): ranking of the images for each text
first_hit = [int(positives[order[:, q], q].float().argmax()) + 1 for q in queries]  # rank of the first match
print(f"these {len(queries)} queries: R@1 {sum(r <= 1 for r in first_hit)}/{len(queries)}, "
      f"R@5 {sum(r <= 5 for r in first_hit)}/{len(queries)}; "
      f"all 1,000: R@1 {recall['t2i_R@1']:.3f}, R@5 {recall['t2i_R@5']:.3f}")
fig, axes = plt.subplots(len(queries), 6, figsize=(12, 2.5 * len(queries)))
for row, (q, rank) in enumerate(zip(queries, first_hit)):
    text = descriptions[q].replace(", ", ",\n").replace(" and ", "\nand ")
    axes[row, 0].text(0, 0.5, f"{text}\n\n{int(positives[:, q].sum())} matching image(s);\nfirst at rank {rank}",
                      fontsize=8, va="center")
    axes[row, 0].axis("off")
    for col, i in enumerate(order[:5, q].tolist()):
        show_image(val_set.image(i), ax=axes[row, col + 1],
                   title=("✓" if positives[i, q] else "✗") + f" cos {similarity[i, q]:.4f}\np = {prob[i, q]:.1%}")
plt.tight_layout()
plt.show()

# %% [markdown]
# What kind of mistakes does it make? Over all 1,000 descriptions, compare the objects of the
# top-ranked image with the query's: a near miss has the same objects in another left-to-right
# order or with another size; the others get one object or more wrong in colour or shape, or the
# number of objects wrong.

# %%
from collections import Counter


def mistake(query, found):
    """What the top image ``found`` gets wrong about the ``query`` scene."""
    if query.description == found.description:
        return "hit"
    if len(query.objects) != len(found.objects):
        return "wrong number of objects"
    wanted = Counter((o.color, o.shape) for o in query.objects)
    wrong = len(query.objects) - sum((wanted & Counter((o.color, o.shape) for o in found.objects)).values())
    if wrong == 0:
        return "near miss: same objects, other order or size"
    return "one object wrong (colour or shape)" if wrong == 1 else "two or three objects wrong"


kinds = Counter(mistake(val_set.scenes[q], val_set.scenes[i]) for q, i in enumerate(order[0].tolist()))
for kind in ("hit", "near miss: same objects, other order or size", "one object wrong (colour or shape)",
             "two or three objects wrong", "wrong number of objects"):
    print(f"{kind:<46} {kinds[kind]:>4} / {len(descriptions)}")

# %% [markdown]
# The mistakes are seldom near misses. Of the 720 descriptions whose top image is wrong, 11 get
# the right objects in another order or size, 100 get one object wrong, and the other 609 get two
# or three objects wrong or the number of objects wrong. The figure agrees: the five cosines of a
# row differ in the third decimal and $p$ hardly changes along it, and each ✗ image shares part of
# its query (a shape, a colour, the number of objects) but not all of it. So after 220 steps this
# tiny model ranks an exact match first for 28% of the descriptions and in its top five for about
# half, and when it is wrong it is usually far off: two objects or more wrong, or the wrong number
# of objects, for 609 of the 720.

# %% [markdown]
# ### Try it yourself: a retrieval playground
# Type a description in the box (then press Enter) to see the five images the model ranks highest
# for it among the first 500 held-out scenes, with their cosine similarity (three decimals: as
# measured above, the top of a ranking is crowded); ✓ marks an image whose own description is
# exactly what you typed. Below, pick an image with the slider to see the five
# descriptions it ranks highest (✓: its own). The images and descriptions are embedded once, when
# this cell runs. Things to try: change one colour, one shape or one size and see which images
# move; swap the order of two objects; type a word the model never read ("purple") and it says so.
# (In a static view of this notebook the playground shows its first state only.)

# %%
from course_lib.widgets import retrieval_playground

retrieval_playground(model, tokenizer, val_set.all_images()[:500], descriptions[:500], k=5)

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
