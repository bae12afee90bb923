# %% [markdown]
# # 13 · Oscar: object tags as anchors
#
# **What you will build.** Oscar (Li et al. 2020): a single-stream BERT like VisualBERT (notebook 10) with
# one more input. Beside the caption and the detected regions, it reads the **object tags**: the class
# names the detector gave the regions, written as words. Every example is a **triple**:
#
# $$\big(\underbrace{w}_{\text{words}},\; \underbrace{q}_{\text{object tags}},\; \underbrace{v}_{\text{regions}}\big)
# \quad\longrightarrow\quad \texttt{[CLS]}\; w\; \texttt{[SEP]}\; q\; \texttt{[SEP]}\; v$$
#
# and the tags are embedded by the **same word embeddings** as the caption: the tag *circle* and the word
# *circle* are one vector. Two objectives: the masked token loss over words **and** tags, and a
# **contrastive loss with polluted tags**: half of the time the tags are replaced by another image's, and
# a classifier on `[CLS]` says whether the triple was polluted. You will build the triple and the
# polluted-tag loss from scratch and check them against `course_lib`, pretrain Oscar on ShapeWorld,
# look at where its words attend among the tags, test the paper's claim with and without tags at two
# sizes of paired data (3 seeds each), and measure what wrong tags cost.
#
# **The problem it solved.** The region BERTs of 2019 (VisualBERT, UNITER, ...) concatenate region features
# and words and leave self-attention to find which region a word is about, "in a brute force manner":
# alignment is a weakly supervised problem, and region features of overlapping objects are ambiguous.
# Oscar's observation: the salient objects of an image can be detected accurately, and they are often
# mentioned in its caption. The detector's labels are words, so they can sit in the sentence's own
# embedding space, where matching *dog* (tag) with *dog* (word) is trivial; the tags are **anchor points**
# from which the harder region-word alignment can be learned. Pretrained on 6.5 million pairs, Oscar set
# new states of the art on six well-established understanding and generation tasks (it was evaluated on
# retrieval, VQA, GQA, NLVR2, captioning and novel object captioning); its successor VinVL (Oscar+) kept
# the triple, made the contrastive loss three-way and brought a better detector.
#
# **Papers.** Li, Yin, Li, Zhang, Hu, Zhang, Wang, Hu, Dong, Wei, Choi & Gao (2020) *Oscar: Object-Semantics
# Aligned Pre-training for Vision-Language Tasks* (ECCV); Zhang et al. (2021) *VinVL: Revisiting Visual
# Representations in Vision-Language Models* (Oscar+); Li et al. (2019) *VisualBERT*; Anderson et al. (2018)
# *Bottom-Up and Top-Down Attention* (the detector).
#
# **Where this sits in the course.** Part II, the region-feature systems: notebook 10 built the single-stream
# encoders from a caption and regions; Oscar adds the detector's *words*. The recipe from the original code
# (`microsoft/Oscar`, `oscar/datasets/oscar_tsv.py`) is in `shared/reference/RECIPES.md` (2.13) and
# `RECIPES-2.md` (section 15); the model is `course_lib.models.oscar`
# (`python -m course_lib.pretrain --model=oscar` at GPU scale).
#
# *Terms in English and Chinese: [glossary](../GLOSSARY.md).*

# %% [parameters]
SCALE = "cpu"  # "cpu": about a minute; "gpu": bigger model, longer run; "smoke": a few steps (what the tests run)

# %%
RUN = {
    "smoke": dict(dim=64, heads=4, layers=1, mlp_ratio=2.0, steps=12, claim_steps=8, finetune_steps=6,
                  batch_size=16, claim_batch_size=16, lr=2e-3, train_scenes=200, scarce_scenes=50, val_scenes=60,
                  retrieval_pairs=20, seeds=(0, 1, 2)),
    "cpu": dict(dim=64, heads=4, layers=1, mlp_ratio=2.0, steps=250, claim_steps=150, finetune_steps=80,
                batch_size=64, claim_batch_size=32, lr=2e-3, train_scenes=3000, scarce_scenes=100, val_scenes=300,
                retrieval_pairs=50, seeds=(0, 1, 2)),
    "gpu": dict(dim=256, heads=8, layers=4, mlp_ratio=4.0, steps=3000, claim_steps=1500, finetune_steps=1000,
                batch_size=256, claim_batch_size=256, lr=5e-4, train_scenes=40000, scarce_scenes=1000,
                val_scenes=2000, retrieval_pairs=200, seeds=(0, 1, 2)),
}[SCALE]
from course_lib.thresholds import assert_learned  # asserts at SCALE cpu/gpu; reports at smoke
RUN

# %%
import copy
import dataclasses
import time

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F
from IPython.display import Markdown, display

from course_lib.utils import count_parameters, get_device, seed_everything

seed_everything(0, threads=None if SCALE == "gpu" else 1)
from course_lib.data import ShapeWorld, WorldConfig
from course_lib.data.datasets import build_tokenizer
from course_lib.data.regions import ShapeWorldRegions
from course_lib.data.simulated_detector import DetectorConfig
from course_lib.evaluate import chance_recall_at_k, fused_retrieval, pair_batch
from course_lib.features.text import MASK_ID, PAD_ID, mask_tokens
from course_lib.models.registry import build_model
from course_lib.objectives.polluted import pollute
from course_lib.train import TrainConfig, train
from course_lib.viz import draw_boxes, plot_losses, show_image

device = get_device()
start_time = time.perf_counter()

# %% [markdown]
# ## 1. Data: regions, and what the detector called them
#
# The world of notebook 10: scenes of one or two objects, each with its canonical caption ("a small green
# circle and a large yellow square", objects left to right), seen through ShapeWorld's **simulated
# detector**, which jitters boxes, misses an object now and then, invents false positives, and gives every
# box a class distribution over the 18 (colour, shape) classes plus "no object". Its top class is the box's
# label, and Oscar's tags are those labels' **names**: `ShapeWorldRegions(..., tag_tokens=T)` adds
#
# - `tag_ids (B, T)`: the class names of each image's labelled regions, in the detector's order, as word
#   pieces of the caption tokenizer, then `[SEP]` (a box whose top class is "no object" gets no tag);
# - `tag_mask (B, T)`: 1 for a real tag token.
#
# This is Oscar's `od_labels` (the detector's labels joined by spaces, duplicates and all): the tags are
# *data*, tokenised like a second sentence. For real region features the labels are ids into the
# detector's vocabulary (1,600 Visual Genome classes); `course_lib.features.tags.ObjectTags` turns them
# into tags given the class names (section 7).

# %%
world = ShapeWorld(WorldConfig(min_objects=1, max_objects=2, seed=0))
tokenizer = build_tokenizer(world, vocab_size=128, num_scenes=300)
CONTEXT, MAX_REGIONS, TAG_TOKENS = 20, 4, 10  # at most 4 boxes x 2 words + [SEP] = 9 tag tokens
CLEAN = DetectorConfig()  # the default detector, notebook 10's
NOISY = DetectorConfig(confidence=1.0)  # the same boxes, far less sure of their classes (section 6)


def region_source(split, detector=CLEAN):
    return ShapeWorldRegions(world, tokenizer, CONTEXT, max_regions=MAX_REGIONS, split=split, caption="description",
                             detector=detector, tag_tokens=TAG_TOKENS)


train_data = region_source("train")(range(RUN["train_scenes"]))
val_data = region_source("val")(range(RUN["val_scenes"]))


def rows(data, index):
    """The rows ``index`` of every tensor of a region batch."""
    return {k: v[index] for k, v in data.items()}


def sampler(data, batch_size, seed):
    """``step -> batch``: random rows of ``data``, the same for the same (seed, step)."""
    n = len(data["input_ids"])
    return lambda step: rows(data, torch.randint(n, (batch_size,), generator=torch.Generator().manual_seed(
        seed * 100_003 + step)))


def tokens(ids, mask):
    return tokenizer.convert_ids_to_tokens(ids[mask.bool()])


# %%
# NBVAL_CHECK_OUTPUT
print("train scenes", len(train_data["input_ids"]), "| val scenes", len(val_data["input_ids"]),
      "| vocabulary", len(tokenizer))
for key in ("input_ids", "tag_ids", "tag_mask", "region_feats", "region_boxes", "region_labels"):
    print(f"{key:14s}", tuple(train_data[key].shape))
k = 0  # the first validation scene, followed through the notebook
print("caption:", " ".join(tokens(val_data["input_ids"][k], val_data["attention_mask"][k])))
print("tags:   ", " ".join(tokens(val_data["tag_ids"][k], val_data["tag_mask"][k])))

# %% [markdown]
# How good are the tags? A tag is **right** when its box came from a real object of that class, **wrong**
# when the detector named the object's class wrongly or when it tagged a false positive. The same scenes
# through a **noisier** detector (`confidence=1.0` instead of 4: the true class's logit is raised by 1
# instead of 4 above standard-normal noise, while the classes that share its colour or its shape get 1.5)
# keep exactly their boxes, and so their region features, but not their names:

# %%
def tag_precision(split, n, detector):
    """Share of the detector's tags (labelled boxes) that name the class of the object the box came from."""
    scenes = world.scenes(range(n), split)
    regions = region_source(split, detector).regions(scenes)
    labels, source = regions["region_labels"], regions["region_source"]
    truth = torch.full_like(labels, -1)
    for b, scene in enumerate(scenes):
        real = source[b] >= 0
        truth[b, real] = torch.as_tensor(scene.class_ids)[source[b, real]]
    tagged = labels >= 0
    return (labels == truth)[tagged].float().mean().item()


noisy_val = region_source("val", NOISY)(range(RUN["val_scenes"]))
assert torch.equal(noisy_val["region_feats"], val_data["region_feats"])  # the same boxes and features...
precision_clean = tag_precision("val", RUN["val_scenes"], CLEAN)
precision_noisy = tag_precision("val", RUN["val_scenes"], NOISY)

# %%
# NBVAL_CHECK_OUTPUT
print(f"right tags: {precision_clean:.2f} with the clean detector, {precision_noisy:.2f} with the noisy one "
      "(same boxes, same region features)")

# %%
class_names = [world.config.class_name(c) for c in range(world.num_classes)]
fig, axes = plt.subplots(1, 2, figsize=(7, 3.4))
for ax, data, title in ((axes[0], val_data, "clean detector"), (axes[1], noisy_val, "noisy detector")):
    mask_k = data["region_mask"][k]
    names = [class_names[c] if c >= 0 else "no object" for c in data["region_labels"][k][mask_k].tolist()]
    draw_boxes(show_image(data["images"][k], ax=ax, title=f"{title}\ntags: "
                          + " ".join(tokens(data["tag_ids"][k], data["tag_mask"][k])[:-1])),
               data["region_boxes"][k][mask_k] * 32, names)
plt.tight_layout()
plt.show()

# %% [markdown]
# Same boxes, different names: every wrong name is a wrong tag, and the model reads the tags as words.
#
# ## 2. The triple, from scratch
#
# Oscar's input is BERT's sentence pair with the image after it. The caption is sentence A (segment A,
# `[CLS] w [SEP]`), the tags sentence B (segment B, `q [SEP]`), packed as a tokenizer packs a pair: the
# tags start right after the caption's `[SEP]` and the padding goes to the end, so positions count on
# from the caption into the tags. Every token is embedded by the same word table. A region is Oscar's
# `img_embedding`, one linear map of the detector feature with its 6-d box appended,
# $f \oplus (x_1, y_1, x_2, y_2, w, h)$, then LayerNorm:
#
# $$x_i = E[\text{token}_i] + p_i + s_{A\,\text{or}\,B}, \qquad
#   x_j = \mathrm{LN}\big(W\,[f_j;\, g_j] + b\big) + s_V, \qquad
#   h = \mathrm{BERT}\big(\mathrm{LN}([x_{\text{words}};\, x_{\text{tags}};\, x_{\text{regions}}])\big)$$
#
# The triple's text, written row by row, and the input embedding, written out, against
# `course_lib.models.oscar`:

# %%
SIZE = dict(vocab_size=len(tokenizer), context_length=CONTEXT, max_tag_tokens=TAG_TOKENS, layers=RUN["layers"],
            dim=RUN["dim"], heads=RUN["heads"], mlp_ratio=RUN["mlp_ratio"])
torch.manual_seed(0)
oscar = build_model("oscar", "cpu-tiny", **SIZE)


def triple_text(input_ids, attention_mask, tag_ids, tag_mask):
    """``[CLS] w [SEP] q [SEP]`` for every row, then padding: ids, mask, segments, each (B, L + T)."""
    B, width = input_ids.shape[0], input_ids.shape[1] + tag_ids.shape[1]
    ids = torch.full((B, width), PAD_ID)
    mask, segments = torch.zeros(B, width, dtype=torch.long), torch.zeros(B, width, dtype=torch.long)
    for b in range(B):
        words, tags = input_ids[b][attention_mask[b].bool()], tag_ids[b][tag_mask[b].bool()]
        n, m = len(words), len(tags)
        ids[b, :n], ids[b, n:n + m] = words, tags
        mask[b, :n + m] = 1
        segments[b, n:n + m] = 1  # segment B: the tags and their [SEP]
    return ids, mask, segments


def oscar_input(model, batch, ids, segments):
    """The embedded triple ``(B, L + T + R, D)``, by hand."""
    fusion, regions = model.fusion, model.region_embedding
    text = (model.word_embeddings.weight[ids] + segments[..., None] * model.tag_segment.weight[0]
            + fusion.position_embeddings.weight[: ids.shape[1]] + fusion.type_embeddings.weight[0])
    boxes = batch["region_boxes"]
    g = torch.cat([boxes, boxes[..., 2:3] - boxes[..., 0:1], boxes[..., 3:4] - boxes[..., 1:2]], dim=-1)  # 6-d
    W = torch.cat([regions.feature_proj.weight, regions.geometry_proj.weight], dim=1)  # one Linear of [f; g]
    b = regions.feature_proj.bias + regions.geometry_proj.bias
    v = F.layer_norm(torch.cat([batch["region_feats"], g], dim=-1) @ W.T + b, (W.shape[0],),
                     regions.norm.weight, regions.norm.bias, regions.norm.eps)
    x = torch.cat([text, v + fusion.type_embeddings.weight[1]], dim=1)
    return F.layer_norm(x, x.shape[-1:], fusion.embed_norm.weight, fusion.embed_norm.bias, fusion.embed_norm.eps)


batch = rows(val_data, torch.arange(8))
ids, mask, segments = triple_text(batch["input_ids"], batch["attention_mask"], batch["tag_ids"], batch["tag_mask"])
for ours, library in zip((ids, mask, segments), oscar.text_sequence(batch)):
    torch.testing.assert_close(ours, library)
with torch.no_grad():
    text, image, _ = oscar.embed(batch, ids, segments)
    torch.testing.assert_close(oscar_input(oscar, batch, ids, segments), oscar.fusion.embed(text, image))

# %%
# NBVAL_CHECK_OUTPUT
print("our triple text (ids, mask, segments) equals course_lib's Oscar text_sequence:", True)
print("our embedded triple equals course_lib's:", True)
print("Oscar parameters:", count_parameters(oscar))
row = ids[k][mask[k].bool()]
print(" ".join(f"{t}/{'AB'[s]}" for t, s in zip(tokenizer.convert_ids_to_tokens(row), segments[k][mask[k].bool()])))

# %% [markdown]
# Each token with its segment: the caption in A, the tags in B. The tag *circle* and the word *circle*
# share their embedding; only the segment and the position tell them apart.
#
# ## 3. The two objectives, from scratch
#
# **Masked token loss over words and tags.** BERT's recipe (15% of the tokens chosen, 80% of those become
# `[MASK]`, 10% a random token, 10% stay) runs over the whole text of the triple, caption and tags alike.
# A masked tag can be recovered from the caption (the word that names it) or from the regions (the object
# it names); a masked word from the tags or the regions.
#
# **Contrastive loss with polluted tags.** Oscar sees the tags and the regions as the image side,
# $h' = [q; v]$, and pollutes it: with probability 0.5 the tag sequence is replaced by another image's
# (`oscar_tsv.py: random_sent`, label "polluted"), and a binary classifier on the pooled `[CLS]` learns
# to tell:
#
# $$\mathcal{L}_C = -\,\mathbb{E}\,\big[\,y \log p_\theta(\text{matched} \mid w, q', v) + (1 - y)\log p_\theta(\text{polluted} \mid w, q', v)\,\big]$$
#
# One rule beyond the paper: a row that borrowed tags *identical* to its own is not polluted (two
# scenes of one object of the same class have the same tags; how often that happens here is printed
# below, and in a corpus of real images with long tag sequences it is rare). The loss, written out,
# against `course_lib`:

# %%
def polluted_tag_loss(model, batch, prob=0.5):
    """Oscar's contrastive loss by hand: replace a share ``prob`` of the tag sequences by another row's."""
    B = batch["input_ids"].shape[0]
    replaced = torch.rand(B) < prob
    replaced[0], replaced[-1] = False, True  # one triple of each kind at least
    offset = torch.randint(1, B, (B,))  # another row: i + offset (mod B), never i itself
    source = torch.where(replaced, (torch.arange(B) + offset) % B, torch.arange(B))
    tag_ids, tag_mask = batch["tag_ids"][source], batch["tag_mask"][source]
    matched = (tag_ids == batch["tag_ids"]).all(1) & (tag_mask == batch["tag_mask"]).all(1)
    logits = model.itm_logits(dict(batch, tag_ids=tag_ids, tag_mask=tag_mask))  # (B, 2): class 1 = matched
    return F.cross_entropy(logits, matched.long()), matched


contrastive_only = build_model("oscar", "cpu-tiny", **SIZE, mlm_weight=0.0)
contrastive_only.load_state_dict(oscar.state_dict())
torch.manual_seed(3)
ours, matched = polluted_tag_loss(contrastive_only, batch)
torch.manual_seed(3)
library = contrastive_only(batch)["contrastive"]
torch.testing.assert_close(ours, library)
torch.manual_seed(3)
_, library_matched, _ = pollute(batch, ("tag_ids", "tag_mask"), 0.5)
assert torch.equal(matched, library_matched)

n_train = len(train_data["tag_ids"])
other_row = (torch.arange(n_train) + torch.randint(1, n_train, (n_train,), generator=torch.Generator().manual_seed(0))
             ) % n_train  # another training scene for each, drawn at random
identical_share = (train_data["tag_ids"] == train_data["tag_ids"][other_row]).all(1).float().mean().item()
torch.manual_seed(1)
masked, labels = mask_tokens(ids[k:k + 1], len(tokenizer), MASK_ID, mask_prob=0.3)

# %%
# NBVAL_CHECK_OUTPUT
print("our polluted-tag loss equals course_lib's Oscar contrastive loss:", True)
print("triples still matched in this batch of 8:", matched.tolist())
print(f"training scenes whose tags equal those of another scene drawn at random: {identical_share:.1%}")
words = tokenizer.convert_ids_to_tokens(masked[0][mask[k].bool()])
print("masked triple text:", " ".join(w if l < 0 else f"[{w}←{t}]" for w, l, t in zip(
    words, labels[0][mask[k].bool()].tolist(), tokenizer.convert_ids_to_tokens(ids[k][mask[k].bool()]))))

# %% [markdown]
# In the masked example, `[x←y]` marks a chosen position: its token `y` now reads `x` (`[MASK]`, a random
# token, or `y` itself) and must be predicted. Words and tags are both candidates, the special tokens
# never. (`course_lib` masks every row, polluted or not, so that the presence of `[MASK]` never tells the
# contrastive head anything, and scores the masked tokens of polluted triples too: their caption still
# belongs with their regions, Oscar's `mask_loss_for_unmatched=1`.)
#
# ## 4. Pretraining Oscar
#
# The notebook's size (one layer of width 64, as notebook 10), `steps` steps at batch `batch_size`:

# %%
def pretrain(seed=0, data=None, steps=None, batch_size=None, **overrides):
    """Oscar at the notebook's size, pretrained from scratch on ShapeWorld regions -> (model, history)."""
    torch.manual_seed(seed)
    model = build_model("oscar", "cpu-tiny", **{**SIZE, **overrides})
    steps = steps or RUN["steps"]
    history = train(model, sampler(train_data if data is None else data, batch_size or RUN["batch_size"], seed),
                    TrainConfig(steps=steps, lr=RUN["lr"], warmup_steps=min(20, steps), seed=seed, progress=False,
                                log_every=0, device=device))
    return model.cpu().eval(), history


oscar, history = pretrain()
fig, axes = plt.subplots(1, 2, figsize=(9, 3))
for key, ax in zip(("mlm", "contrastive"), axes):
    plot_losses({"Oscar": history}, ax=ax, smooth=0.9, key=key)
    ax.set_title({"mlm": "masked tokens (words and tags)", "contrastive": "polluted tags (matched or not)"}[key])
axes[1].axhline(np.log(2), color="grey", ls=":", lw=1)
plt.tight_layout()
plt.show()

# %% [markdown]
# The grey line is $\ln 2$, a 50/50 guess. What the pretrained model learned, on validation scenes:
#
# - **polluted tags**: every scene with its own tags (matched) and with the next scene's (polluted; the
#   scenes whose tags happen to be the same are left out), chance 0.5;
# - **masked tags**: one colour or shape tag masked at a time, recovered by the MLM head, with the true
#   caption, and with another scene's caption (the tag can then only come from the regions), against a
#   guess among the colours or the shapes.

# %%
COLOR_IDS = [tokenizer.convert_tokens_to_ids(c) for c in world.config.colors]
SHAPE_IDS = [tokenizer.convert_tokens_to_ids(s) for s in world.config.shapes]
GROUNDED = torch.tensor(COLOR_IDS + SHAPE_IDS)


@torch.no_grad()
def polluted_tag_accuracy(model, data):
    other = dict(data, tag_ids=data["tag_ids"].roll(1, 0), tag_mask=data["tag_mask"].roll(1, 0))
    differs = (other["tag_ids"] != data["tag_ids"]).any(1)
    own = model.itm_logits(data).argmax(-1) == 1
    polluted = model.itm_logits(rows(other, differs)).argmax(-1) == 0
    return torch.cat([own, polluted]).float().mean().item()


@torch.no_grad()
def masked_tag_accuracy(model, data, captions=None):
    """Mask one colour or shape tag per scene at a time; accuracy of the MLM head at that tag."""
    data = dict(data) if captions is None else dict(data, **captions)
    ids, mask, segments = model.text_sequence(data)
    hits, total = 0, 0
    for col in range(ids.shape[1]):
        target = ids[:, col]
        rows_ = (segments[:, col] == 1) & torch.isin(target, GROUNDED)
        if not rows_.any():
            continue
        masked = ids[rows_].clone()
        masked[:, col] = MASK_ID
        out = model.encode(rows(data, rows_), text=(masked, mask[rows_], segments[rows_]))
        hits += (model.mlm_head(out.text[:, col]).argmax(-1) == target[rows_]).sum().item()
        total += int(rows_.sum())
    return hits / total


captions_next = {"input_ids": val_data["input_ids"].roll(1, 0), "attention_mask": val_data["attention_mask"].roll(1, 0)}
share_colour = (torch.isin(val_data["tag_ids"], torch.tensor(COLOR_IDS)).sum()
                / torch.isin(val_data["tag_ids"], GROUNDED).sum())
guess = (share_colour / len(COLOR_IDS) + (1 - share_colour) / len(SHAPE_IDS)).item()
learned = {"polluted": polluted_tag_accuracy(oscar, val_data), "tag": masked_tag_accuracy(oscar, val_data),
           "tag, wrong caption": masked_tag_accuracy(oscar, val_data, captions_next)}

# %%
display(Markdown("\n".join([
    "| pretrained Oscar, validation | accuracy | chance |", "|---|---|---|",
    f"| polluted or not | {learned['polluted']:.2f} | 0.50 |",
    f"| masked tag, true caption | {learned['tag']:.2f} | {guess:.2f} |",
    f"| masked tag, another scene's caption | {learned['tag, wrong caption']:.2f} | {guess:.2f} |"])))
assert_learned(learned["polluted"] > 0.6, f"polluted-tag accuracy {learned['polluted']:.2f} (chance 0.50)", SCALE)
assert_learned(learned["tag"] > guess + 0.3, f"masked tag accuracy {learned['tag']:.2f} (chance {guess:.2f})", SCALE)
from_regions = learned["tag, wrong caption"] > guess + 0.1
display(Markdown(
    f"With another scene's caption a masked tag is recovered {learned['tag, wrong caption']:.2f} of the time "
    f"(chance {guess:.2f}): " + ("the model reads it off the regions, so pretraining tied tags to the regions "
                                  "they name." if from_regions else
                                  "close to chance, so the model recovers tags mostly from the caption's words, "
                                  "not from the regions.")))

# %% [markdown]
# **Words and tags in the attention.** Does a caption word look at the tag that is the same word? Below,
# the self-attention of the example scene (averaged over the heads), from the caption's tokens to the tags
# and the regions; then, over all validation scenes, the share of a colour or shape word's attention to the
# tags that lands on the **identical** tag (its anchor), against the share a uniform spread over the tag
# tokens would give.

# %%
with torch.no_grad():
    out = oscar.encode(batch, return_attention=True)
attention = out.attentions[0]["self"][k].mean(0)  # (L', L'), the example scene, mean over the heads
n_words, n_tags = int(batch["attention_mask"][k].sum()), int(batch["tag_mask"][k].sum())
L_text = ids.shape[1]
regions_k = batch["region_mask"][k].nonzero().flatten()
columns = list(range(n_words, n_words + n_tags)) + [L_text + int(r) for r in regions_k]
fig, ax = plt.subplots(figsize=(6, 3.6))
ax.imshow(attention[:n_words][:, columns], cmap="viridis", aspect="auto")
ax.set_yticks(range(n_words), tokens(batch["input_ids"][k], batch["attention_mask"][k]), fontsize=8)
ax.set_xticks(range(len(columns)), tokens(batch["tag_ids"][k], batch["tag_mask"][k])
              + [f"region {int(r)}" for r in regions_k], rotation=60, fontsize=8)
ax.set_title("attention from the caption (rows) to the tags and the regions", fontsize=9)
plt.show()


@torch.no_grad()
def anchor_attention(model, data):
    """For colour and shape words with an identical tag: their attention to it as a share of their attention
    to all tag tokens, and what a uniform spread over the tag tokens would give."""
    out = model.encode(data, return_attention=True)
    attn = out.attentions[0]["self"].mean(1)  # (B, L', L')
    ids_, mask_, segments_ = model.text_sequence(data)
    shares, uniform = [], []
    for b in range(len(ids_)):
        is_tag = (segments_[b] == 1) & mask_[b].bool()
        for i in (torch.isin(ids_[b], GROUNDED) & (segments_[b] == 0)).nonzero().flatten():
            anchor = is_tag & (ids_[b] == ids_[b, i])
            if anchor.any():
                to_tags = attn[b, i, : len(is_tag)][is_tag].sum()
                shares.append((attn[b, i, : len(is_tag)][anchor].sum() / to_tags).item())
                uniform.append(anchor.sum().item() / is_tag.sum().item())
    return float(np.mean(shares)), float(np.mean(uniform))


anchor_share, anchor_uniform = anchor_attention(oscar, val_data)

# %%
ratio = anchor_share / anchor_uniform
display(Markdown(
    f"A colour or shape word gives **{anchor_share:.2f}** of its attention to the tags to its identical tag, "
    f"against {anchor_uniform:.2f} for a uniform spread ({ratio:.1f} times as much): " +
    ("words do look up their anchors." if ratio > 1.5 else
     "in this one-layer model words single out their anchors only weakly." if ratio > 1.1 else
     "no more than a uniform spread: in this one-layer model words do not single out their anchors.")))

# %% [markdown]
# ## 5. The paper's claim: tags help alignment, most when paired data is scarce
#
# Oscar's ablation pretrains with and without tags and fine-tunes both on the downstream tasks. Without
# tags, Oscar is the BERT-style pretraining before it (`use_tags=False`: `[CLS] w [SEP] v`, and with no
# tags to pollute, the contrastive loss pollutes the regions, which is ITM). We do that at **two sizes of
# paired data**: the same model pretrained on `scarce_scenes` image-caption pairs and on all `train_scenes`,
# 3 seeds each, `claim_steps` steps at batch `claim_batch_size`. Two measures on the validation scenes:
#
# - **matching after pretraining**: each caption with its own image and with the next scene's (image and
#   tags together), scored by the `[CLS]` head as it came out of pretraining (chance 0.5);
# - **retrieval after fine-tuning**: ITM fine-tuning for `finetune_steps` steps at batch `batch_size` on the same
#   pairs (negatives
#   are other pairs' images, with their tags), then R@1 over `retrieval_pairs` validation pairs, every image
#   scored with every caption (`course_lib.evaluate.fused_retrieval`), mean of both directions.

# %%
@torch.no_grad()
def itm_accuracy(model, data):
    """Every validation caption with its own image (label 1) and the next scene's image and tags (label 0)."""
    n = len(data["input_ids"])
    own = pair_batch(data, torch.arange(n), torch.arange(n))
    other = pair_batch(data, torch.arange(n).roll(1), torch.arange(n))
    predicted = torch.cat([model.itm_logits(own).argmax(-1), model.itm_logits(other).argmax(-1)])
    return (predicted == torch.cat([torch.ones(n), torch.zeros(n)])).float().mean().item()


def finetune_itm(model, data, seed):
    """ITM alone for ``finetune_steps`` steps on ``data`` (image negatives carry their tags)."""
    tuned = copy.deepcopy(model)
    tuned.config = dataclasses.replace(model.config, mlm_weight=0.0, contrastive_weight=0.0, itm_weight=1.0)
    train(tuned, sampler(data, RUN["batch_size"], seed + 11),
          TrainConfig(steps=RUN["finetune_steps"], lr=RUN["lr"], warmup_steps=min(10, RUN["finetune_steps"]),
                      seed=seed, progress=False, log_every=0, device=device))
    return tuned.cpu().eval()


def recall_1(model, data):
    r = fused_retrieval(model, rows(data, torch.arange(RUN["retrieval_pairs"])), (1,))
    return (r["i2t_R@1"] + r["t2i_R@1"]) / 2


def mean_spread(values):
    return f"{np.mean(values):.3f} ± {np.std(values):.3f}"


retrieval_chance = chance_recall_at_k(torch.arange(RUN["retrieval_pairs"]), (1,))["i2t_R@1"]
SIZES = {"scarce": RUN["scarce_scenes"], "all": RUN["train_scenes"]}
claim, kept = {}, {}
for size, n in SIZES.items():
    pool = rows(train_data, torch.arange(n))
    for use_tags in (True, False):
        scores = claim[size, use_tags] = {"matching": [], "R@1": [], "matching, noisy tags": [], "R@1, noisy tags": []}
        for seed in RUN["seeds"]:
            model, _ = pretrain(seed, pool, RUN["claim_steps"], RUN["claim_batch_size"], use_tags=use_tags)
            tuned = finetune_itm(model, pool, seed)
            scores["matching"].append(itm_accuracy(model, val_data))
            scores["R@1"].append(recall_1(tuned, val_data))
            if size == "all":  # section 6: the same models, tags from the noisy detector
                scores["matching, noisy tags"].append(itm_accuracy(model, noisy_val))
                scores["R@1, noisy tags"].append(recall_1(tuned, noisy_val))
            if seed == RUN["seeds"][0]:
                kept[size, use_tags] = model, tuned

# %%
table = [f"| paired data | tags | matching after pretraining (chance 0.50) | retrieval R@1 after fine-tuning "
         f"(chance {retrieval_chance:.2f}) |", "|---|---|---|---|"]
for (size, use_tags), scores in claim.items():
    table.append(f"| {SIZES[size]} pairs | {'with' if use_tags else 'without'} | {mean_spread(scores['matching'])} | "
                 f"{mean_spread(scores['R@1'])} |")
display(Markdown("\n".join(table)))


def gain(size, metric):
    """With tags minus without, the two means; and the larger of the two spreads."""
    a, b = claim[size, True][metric], claim[size, False][metric]
    return np.mean(a) - np.mean(b), max(np.std(a), np.std(b))


def verdict(metric, what):
    lines = []
    for size in SIZES:
        d, s = gain(size, metric)
        effect = ("tags helped" if d > s else "tags hurt" if -d > s else "no difference beyond the seeds' spread")
        lines.append(f"{SIZES[size]} pairs: {effect} ({d:+.3f}, spread ± {s:.3f})")
    (d_scarce, s_scarce), (d_all, s_all) = gain("scarce", metric), gain("all", metric)
    if d_scarce > s_scarce and d_scarce > d_all + max(s_scarce, s_all):
        held = "**held**: tags helped, and more with scarce pairs"
    elif d_scarce > s_scarce or d_all > s_all:
        held = ("**held in part**: tags helped, but not more with scarce pairs than with all of them" if
                d_scarce <= d_all + max(s_scarce, s_all) else "**held in part**")
    elif -d_scarce > s_scarce or -d_all > s_all:
        held = "**did not reproduce**: tags made it worse"
    else:
        held = "**could not be decided**: the differences are within the seeds' spread"
    return f"- {what}: the claim {held}. " + "; ".join(lines) + "."


display(Markdown(verdict("matching", "**Matching after pretraining**") + "\n"
                 + verdict("R@1", "**Retrieval after fine-tuning**")))
assert_learned(max(np.mean(claim["all", t]["matching"]) for t in (True, False)) > 0.6,
               f"matching after pretraining {max(np.mean(claim['all', t]['matching']) for t in (True, False)):.2f} "
               "(chance 0.50)", SCALE)
assert_learned(max(np.mean(claim["all", t]["R@1"]) for t in (True, False)) > 3 * retrieval_chance,
               f"retrieval R@1 {max(np.mean(claim['all', t]['R@1']) for t in (True, False)):.2f} "
               f"(chance {retrieval_chance:.2f})", SCALE)

# %% [markdown]
# **What the tagged model matches on.** A one-layer model that reads tags can compare the caption with
# them in a cheap way: *how many* objects each names. Split the mismatched validation pairs (caption of one
# scene, image and tags of the next) by whether the two scenes name the same number of objects, for the
# seed-0 models pretrained on all pairs, before and after their ITM fine-tuning. (The cue is strong in
# ShapeWorld, where a caption names every object; a real caption mentions a few of the dozens of tags a
# detector writes.)

# %%
@torch.no_grad()
def mismatch_accuracy_by_count(model, data):
    n = len(data["input_ids"])
    other = pair_batch(data, torch.arange(n).roll(1), torch.arange(n))
    rejected = model.itm_logits(other).argmax(-1) == 0
    objects = torch.isin(data["input_ids"], torch.tensor(SHAPE_IDS)).sum(1)  # shape words per caption
    same = objects == objects.roll(1)
    return rejected[same].float().mean().item(), rejected[~same].float().mean().item()


by_count = {(t, stage): mismatch_accuracy_by_count(kept["all", t][i], val_data)
            for t in (True, False) for i, stage in enumerate(("pretrained", "fine-tuned"))}
table = ["| all pairs, seed 0 | mismatch rejected: same number of objects | different number |", "|---|---|---|"]
for (use_tags, stage), (same, different) in by_count.items():
    table.append(f"| {'with' if use_tags else 'without'} tags, {stage} | {same:.2f} | {different:.2f} |")
display(Markdown("\n".join(table)))
same_t, diff_t = by_count[True, "pretrained"]
same_f, diff_f = by_count[True, "fine-tuned"]
counting = diff_t - same_t > 0.3
display(Markdown(
    f"Pretrained, the tagged model rejects {diff_t:.2f} of the mismatches whose scenes differ in the number of "
    f"objects and {same_t:.2f} of those that do not: " +
    ("most of its matching is counting, a shortcut the tags make easy (it compares two lengths, not which "
     "objects). " if counting else "it does not lean on the count alone. ") +
    (f"After fine-tuning: {diff_f:.2f} and {same_f:.2f}, " + (
        "so fine-tuning did not teach it to look past the count." if diff_f - same_f > 0.3 else
        "so fine-tuning taught it to look past the count.") if counting else "")))

# %% [markdown]
# ## 6. What wrong tags cost
#
# The models of section 5 pretrained on all pairs, scored again on the same validation scenes, now tagged
# by the noisy detector of section 1: identical boxes and region features, only the names differ. A model
# without tags is the control: it never reads them.

# %%
table = ["| pretrained on all pairs | matching, clean tags | matching, noisy tags | R@1, clean tags | "
         "R@1, noisy tags |", "|---|---|---|---|---|"]
for use_tags in (True, False):
    s = claim["all", use_tags]
    table.append(f"| {'with' if use_tags else 'without'} tags | {mean_spread(s['matching'])} | "
                 f"{mean_spread(s['matching, noisy tags'])} | {mean_spread(s['R@1'])} | "
                 f"{mean_spread(s['R@1, noisy tags'])} |")
display(Markdown("\n".join(table)))
with_tags, control = claim["all", True], claim["all", False]
assert control["matching"] == control["matching, noisy tags"]  # without tags, the noisy detector changes nothing
costs, lost = [], []
for metric, name in (("matching", "matching after pretraining"), ("R@1", "R@1 after fine-tuning")):
    clean, noisy = with_tags[metric], with_tags[f"{metric}, noisy tags"]
    d, s = np.mean(clean) - np.mean(noisy), max(np.std(clean), np.std(noisy))
    if d > s:
        lost.append(name)
    costs.append(f"{name} goes from {np.mean(clean):.3f} to {np.mean(noisy):.3f} ("
                 + ("a loss beyond the seeds' spread" if d > s else "a gain beyond the seeds' spread" if -d > s
                    else "within the seeds' spread") + f", ± {s:.3f})")
display(Markdown(
    f"With {precision_noisy:.0%} of the tags right instead of {precision_clean:.0%}, for the tagged models "
    + " and ".join(costs) + "; the models without tags score exactly the same, since their input did not change. "
    + (f"Wrong tags cost the tagged models their {' and their '.join(lost)}: what a model learned to read from the "
       "tags passes the detector's mistakes on." if lost else
       "At this budget the tagged models did not measurably depend on the tags being right.")))

# %% [markdown]
# ## 7. At GPU scale, on real detector features
#
# On real data the tags are the names of the detector's classes: region shards (written by
# `data_scripts/shard_regions.py` from a bottom-up-attention TSV) store each region's class id, and
# `--model.tag_names_file` gives the class names, one per line (line *i* names class *i*, the detector's
# `objects_vocab.txt`); `course_lib.features.tags.ObjectTags` turns ids into tags with the caption
# tokenizer, as section 1 did for ShapeWorld:
#
# ```bash
# python -m course_lib.pretrain --model=oscar --preset=gpu-base --data=region_shards \
#     --data_path=shards/coco-regions --model.num_region_classes=1601 \
#     --model.tag_names_file=objects_vocab.txt --global_batch=512 --steps=100000
# ```
#
# (`--model.use_tags=False` is the no-tags ablation.) The `gpu-base` preset is BERT-base (12 layers, width
# 768, BERT's 30,522-token vocabulary), 2048-d region features and up to 32 tag tokens.

# %%
# NBVAL_CHECK_OUTPUT
big = build_model("oscar", "gpu-base")
print(f"Oscar @ gpu-base: {count_parameters(big) / 1e6:.1f}M parameters, text {big.config.context_length} + "
      f"{big.config.max_tag_tokens} tag tokens, regions of {big.config.region_feat_dim} features")
del big

# %% [markdown]
# ## Summary
#
# - **The triple** `[CLS] w [SEP] q [SEP] v`: the detector's class names as a second sentence (segment B)
#   in the caption's own embedding space, regions as one linear map of feature and 6-d box.
# - **Masked tokens over words and tags**, and the **contrastive loss with polluted tags**: half of the
#   triples get another image's tags, and `[CLS]` says which.
# - **The claim**, with and without tags at two sizes of paired data over 3 seeds: the verdicts of section
#   5, computed from the numbers above, one for matching straight after pretraining and one for retrieval
#   after fine-tuning, and what the tagged model's matching rests on.
# - **Wrong tags**: the same models scored with a noisier detector's tags; the models without tags are the
#   control (section 6).
#
# **Deviations from the paper** (to fit a CPU minute): a 1-layer model of width 64 trained from scratch
# (Oscar starts from BERT-base, whose text side already knows that two identical words match); ShapeWorld
# features are RoIAlign of pixels, and its tags, colour and shape, are nearly a full description of a
# scene (real tags are a few nouns of a longer caption); the polluting tags come from another image of the
# batch, not of the whole dataset, and a polluted triple whose borrowed tags equal its own counts as
# matched; segment B is the shared fusion's text segment plus a learned offset; the cost of
# wrong tags is measured at test time, on models pretrained with clean tags.
#
# **Next**: notebook 14 gives each modality its own stream and lets them meet in co-attention (ViLBERT).
#
# ## Exercises
#
# **Exercise 1 - Oscar's tag sentence.** Write `tag_text(region_labels, region_mask, class_names)`:
# `region_labels (B, R)` class ids (-1 for "no object"), `region_mask (B, R)` bool (True for a real region),
# `class_names` a list of strings → a list of B strings: the names of each image's real, labelled regions,
# in order, joined by one space (`""` when there are none). Duplicates stay: two circles are two tags.

# %% [exercise]
from course_lib.checks.oscar import check_tag_text


def tag_text(region_labels, region_mask, class_names):
    raise NotImplementedError("for each row, the names of the regions that are real and labelled, joined by spaces")


check_tag_text(tag_text)

# %% [solution]
from course_lib.checks.oscar import check_tag_text


def tag_text(region_labels, region_mask, class_names):
    return [" ".join(class_names[c] for c, real in zip(labels.tolist(), mask.tolist()) if real and c >= 0)
            for labels, mask in zip(region_labels, region_mask)]


check_tag_text(tag_text)

# %% [markdown]
# **Exercise 2 - the anchors.** Write `anchor_matrix(input_ids, attention_mask, tag_ids, tag_mask)`: a caption
# `(B, L)` and its tags `(B, T)`, each with its 0/1 mask → a `(B, L, T)` bool matrix, True where caption
# token $i$ and tag token $j$ are the same word piece, both real and neither a special token (`[PAD]`,
# `[UNK]`, `[CLS]`, `[SEP]`, `[MASK]`, ids 0 to 4). These are the pairs section 4 measured the attention of.

# %% [exercise]
from course_lib.checks.oscar import check_anchor_matrix


def anchor_matrix(input_ids, attention_mask, tag_ids, tag_mask):
    raise NotImplementedError("compare every caption token with every tag token, then keep real, non-special ones")


check_anchor_matrix(anchor_matrix)

# %% [solution]
from course_lib.checks.oscar import check_anchor_matrix


def anchor_matrix(input_ids, attention_mask, tag_ids, tag_mask):
    special = torch.arange(5)  # [PAD] [UNK] [CLS] [SEP] [MASK]
    words = attention_mask.bool() & ~torch.isin(input_ids, special)  # (B, L)
    tags = tag_mask.bool() & ~torch.isin(tag_ids, special)  # (B, T)
    return (input_ids[:, :, None] == tag_ids[:, None, :]) & words[:, :, None] & tags[:, None, :]


check_anchor_matrix(anchor_matrix)

# %%
print(f"notebook ran in {time.perf_counter() - start_time:.0f} s")
