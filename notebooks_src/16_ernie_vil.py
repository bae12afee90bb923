# %% [markdown]
# # 16 · ERNIE-ViL: mask what the scene graph says, and predict it from the image
#
# **What you will build.** ERNIE-ViL (Yu et al., AAAI 2021, *ERNIE-ViL: Knowledge Enhanced Vision-Language
# Representations through Scene Graphs*): ViLBERT's two streams joined by co-attention (notebook 14), with
# one change in what the words' masking chooses. Each caption is parsed into a **scene graph** (the
# objects it names, their attributes, the relations between them), and pretraining masks the words of
# those nodes and predicts them from the image: **scene-graph prediction**. You build a scene-graph parser
# for ShapeWorld's captions and check it against ShapeWorld's ground-truth graphs; build the masking from
# scratch (whole nodes at the paper's 30%, BERT's 80/10/10) and check it against `course_lib`; pretrain
# ERNIE-ViL; score it on **fine-grained** tasks (VQA accuracy per question type, near-miss retrieval); and
# test the paper's claim against plain random MLM at equal steps, over 3 seeds.
#
# **The problem it solved.** Random MLM (BERT's, and every vision-language model's before it) masks 15% of
# the tokens wherever they fall: "a", "is", "and", "there" as often as "red" or "left of". A function word
# is predictable from the caption alone, so a good part of the masked-word signal never asks the model to
# look at the image; and nothing pushes it to learn *which* attribute goes with *which* object, or *how*
# two objects are related, which is what tells "a red circle left of a blue square" from "a blue circle
# left of a red square". ERNIE-ViL masks exactly those words: the paper reported gains on VQA, VCR,
# referring expressions and retrieval over the same model trained with random masking (its Table 5; its
# pretraining code was never released, so the rates are the paper's word).
#
# **Where this sits.** Notebook 05 built MLM, 06 ITM, 14 ViLBERT, whose model (`course_lib.models.vilbert`)
# ERNIE-ViL subclasses: only the text masking and the losses it feeds change. ShapeWorld's scene graphs
# (notebook 00) give what no real dataset gives, the true graph of every image, to check the parser with.
# `python -m course_lib.pretrain --model=ernie_vil` runs the same model at GPU scale.
#
# *Terms in English and Chinese: [glossary](../GLOSSARY.md).*

# %% [parameters]
SCALE = "cpu"  # "cpu": about a minute; "gpu": bigger model, longer run; "smoke": a few steps (what the tests run)

# %%
RUN = {
    "smoke": dict(steps=6, batch_size=16, lr=2e-3, retrieval_steps=3, vqa_steps=3, finetune_batch_size=16,
                  train_scenes=48, val_scenes=24, qa_scenes=24, retrieval_pairs=8, size=dict(layers=1),
                  caption_scenes=40, agreement_scenes=40, mask_draws=2),
    # the protocol of the committed claim (benchmarks/ernie_vil_claim.py): the live run can be compared
    "cpu": dict(steps=400, batch_size=64, lr=2e-3, retrieval_steps=60, vqa_steps=200, finetune_batch_size=64,
                train_scenes=2000, val_scenes=200, qa_scenes=600, retrieval_pairs=100, size=dict(layers=1),
                caption_scenes=300, agreement_scenes=1000, mask_draws=20),
    "gpu": dict(steps=3000, batch_size=256, lr=5e-4, retrieval_steps=500, vqa_steps=1500, finetune_batch_size=256,
                train_scenes=40000, val_scenes=2000, qa_scenes=20000, retrieval_pairs=200,
                size=dict(layers=4, text_only_layers=2, image_dim=256, bi_dim=256, heads=8, image_heads=8,
                          bi_heads=8, dim=256), caption_scenes=1000, agreement_scenes=5000, mask_draws=20),
}[SCALE]
from course_lib.thresholds import assert_learned  # asserts at SCALE cpu/gpu; reports at smoke
RUN

# %%
import json
import re
import time
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
from IPython.display import Markdown, display

from course_lib.utils import get_device, seed_everything

seed_everything(0, threads=2)
import course_lib
from course_lib.data import ShapeWorld, WorldConfig
from course_lib.data.datasets import build_tokenizer
from course_lib.data.regions import ShapeWorldRegions
from course_lib.data.scene_graph import (ROLE_IDS, ShapeWorldSceneGraphs, agreement_rates, parse_scene_graph,
                                         scene_graph_text)
from course_lib.evaluate.fine_grained import (NEAR_MISS_KINDS, fine_grained_chance, fine_grained_scores,
                                              shapeworld_fine_grained_tasks)
from course_lib.evaluate.region_tasks import FinetuneBudget, batch_sampler, rows
from course_lib.features.text import MASK_ID
from course_lib.models.region_bert import mask_caption
from course_lib.models.registry import build_model
from course_lib.objectives.scene_graph import mask_scene_graph_nodes
from course_lib.train import TrainConfig, train
from course_lib.viz import plot_losses, show_image

device = get_device()
start_time = time.perf_counter()

# %% [markdown]
# ## 1. A world with relations, and its captions
#
# Relations need two objects, so every scene here has exactly two. Each scene's caption is one of its
# five, drawn from three templates: a **list** of the objects left to right ("a large red circle and a blue
# square"), a **relation** between them ("a red circle is left of a blue square", four in ten captions),
# or a **count** ("there is one circle and two objects"). The tokenizer's vocabulary (191 word pieces)
# keeps every word of the grammar whole.

# %%
world = ShapeWorld(WorldConfig(min_objects=2, max_objects=2, seed=0))
tokenizer = build_tokenizer(world, vocab_size=192, num_scenes=300)
CONTEXT, MAX_REGIONS = 20, 4
for scene in world.scenes(range(3)):
    print(" | ".join(scene.captions[:3]))

# %% [markdown]
# ## 2. Scene graphs from captions
#
# ERNIE-ViL runs SPICE's parser over each caption. Ours reads ShapeWorld's grammar: the **relation**
# template is one regular expression. Written out, for the relation captions only, giving the graph in
# Visual Genome's layout (the one `Scene.scene_graph` uses):

# %%
PHRASE = r"an? (?:(small|large) )?(\w+) (\w+)"  # article, optional size, colour, shape
RELATION = re.compile(PHRASE + r" is (left of|right of|above|below|bigger than|smaller than) " + PHRASE)


def parse_relation(caption):
    """``"a red circle is left of a blue square"`` -> its scene graph, or None for another template."""
    m = RELATION.fullmatch(caption)
    if m is None:
        return None
    s_size, s_color, s_shape, predicate, o_size, o_color, o_shape = m.groups()
    objects = [{"id": 0, "name": s_shape, "attributes": [a for a in (s_size, s_color) if a]},
               {"id": 1, "name": o_shape, "attributes": [a for a in (o_size, o_color) if a]}]
    return {"objects": objects, "relations": [{"subject": 0, "predicate": predicate, "object": 1}]}


captions = [c for s in world.scenes(range(RUN["caption_scenes"])) for c in s.captions]
ours = [(c, parse_relation(c)) for c in captions]
relation_captions = [(c, g) for c, g in ours if g is not None]
for caption, graph in relation_captions:
    assert graph == parse_scene_graph(caption).to_dict()

# %%
# NBVAL_CHECK_OUTPUT
print(f"{len(relation_captions)} of {len(captions)} captions are relations; our parser's graphs equal "
      "course_lib's on every one:", True)
print(parse_scene_graph(relation_captions[0][0]).to_dict())

# %% [markdown]
# `course_lib.data.scene_graph.parse_scene_graph` reads all three templates (its count captions give each
# noun its number as an attribute, as SPICE does: "two circles" is a circle node with the attribute
# "two") and keeps, for every node, the **characters** of its words in the caption; a caption outside the
# grammar is an error that names it (or, with `strict=False`, an empty graph: nothing to mask).
#
# **Is the parser right?** ShapeWorld knows every image's true graph. `graph_agreement` checks each parsed
# node against it: a list caption's objects must be the scene's, left to right, with their attributes; a
# relation must be one of the scene's true relations between objects matching its two nodes; a count
# must be exact. Over the captions of 1000 scenes (at `SCALE="cpu"`), and, to show that the check can fail, of a world whose
# captions are half of the time another scene's (notebook 00's noise knob):

# %%
def agreement(w, n):
    scenes = w.scenes(range(n))
    return agreement_rates([c for s in scenes for c in s.captions], [s.scene_graph for s in scenes for _ in s.captions])


n = RUN["agreement_scenes"]
clean = agreement(ShapeWorld(WorldConfig(min_objects=2, max_objects=3, seed=0)), n)
noisy = agreement(ShapeWorld(WorldConfig(min_objects=2, max_objects=3, seed=0, caption_noise=0.5)), n)
display(Markdown(f"| captions (5 per scene, {n} scenes of 2-3 objects) | parsed | objects agree | attributes agree | "
                 "relations agree |\n|---|---|---|---|---|\n"
                 + "\n".join(f"| {name} | {r['parsed']:.3f} | {r['objects']:.3f} | {r['attributes']:.3f} | "
                             f"{r['relations']:.3f} |" for name, r in (("the scene's own", clean),
                                                                        ("half from other scenes", noisy)))))

# %%
# NBVAL_CHECK_OUTPUT
print("every caption parses and every parsed node agrees with the true graph:", all(v == 1.0 for v in clean.values()))
print("captions of other scenes disagree (relations agree < 0.9):", noisy["relations"] < 0.9)

# %% [markdown]
# The agreement is perfect because the grammar is the parser: the real ERNIE-ViL's parser makes mistakes,
# and its masks inherit them. The noisy row shows what a wrong caption looks like to the check.
#
# ## 3. Scene-graph masking
#
# The tokens of each caption get the **role** of their node (1 object, 2 attribute, 3 relation, 0 none)
# and the node's **index** (`token_annotations`, from the tokenizer's character offsets):

# %%
example = scene_graph_text(tokenizer, [relation_captions[0][0], captions[2]], CONTEXT)
names = {v: k for k, v in ROLE_IDS.items()}
for b in range(2):
    real = example["attention_mask"][b].bool()
    tokens = tokenizer.convert_ids_to_tokens(example["input_ids"][b][real])
    print("  ".join(f"{t}/{names[int(r)][:3]}{int(n) if n >= 0 else ''}"
                    for t, r, n in zip(tokens, example["sg_roles"][b][real], example["sg_nodes"][b][real])))

# %% [markdown]
# ERNIE-ViL's three tasks choose **nodes**, not tokens:
#
# | task | what is masked | rate |
# |---|---|---|
# | object prediction | the words of object nodes | 30% of the objects |
# | attribute prediction | the attribute words of object-attribute pairs | 30% of the pairs |
# | relation prediction | the words of relation nodes (both words of "left of") | 30% of the relations |
#
# A chosen node's tokens then follow BERT's rule, decided once per node: all `[MASK]` (80%), all random
# tokens (10%), or all left as they are (10%). Our one addition: a caption with nodes of which none was
# drawn gets one, drawn uniformly (UNITER's rule for MLM), so that every caption teaches something.
# From scratch, drawing the random numbers in the library's order, so that the same generator gives the
# same masks:

# %%
SPECIAL = torch.tensor([0, 1, 2, 3, 4])  # [PAD] [UNK] [CLS] [SEP] [MASK]


def sgp_mask(ids, roles, nodes, vocab_size, rate, generator):
    """(B, L) ids, roles, nodes -> masked ids, labels (-100 where not chosen)."""
    B, N = len(ids), int(nodes.max()) + 1
    node_role = torch.zeros(B, N, dtype=torch.long)  # the role of each node of each caption (0: absent)
    for b in range(B):
        for l in range(ids.shape[1]):
            if nodes[b, l] >= 0:
                node_role[b, nodes[b, l]] = roles[b, l]
    present = node_role > 0
    chosen = (torch.rand(B, N, generator=generator) < rate) & present  # 30% of the nodes of every role
    scores = torch.rand(B, N, generator=generator).masked_fill(~present, -1.0)
    for b in range(B):
        if present[b].any() and not chosen[b].any():
            chosen[b, scores[b].argmax()] = True  # at least one node per caption
    action = torch.rand(B, N, generator=generator)  # one draw per node: [MASK] / random / unchanged
    normal = torch.tensor([i for i in range(vocab_size) if i not in SPECIAL])
    random_ids = normal[torch.randint(len(normal), ids.shape, generator=generator)]
    masked, labels = ids.clone(), torch.full_like(ids, -100)
    for b in range(B):
        for l in range(ids.shape[1]):
            k = int(nodes[b, l])
            if k >= 0 and chosen[b, k]:
                labels[b, l] = ids[b, l]
                if action[b, k] < 0.8:
                    masked[b, l] = MASK_ID
                elif action[b, k] < 0.9:
                    masked[b, l] = random_ids[b, l]
    return masked, labels


probe = scene_graph_text(tokenizer, captions[:200], CONTEXT)  # 200 captions (smoke: fewer)
mine = sgp_mask(probe["input_ids"], probe["sg_roles"], probe["sg_nodes"], len(tokenizer), 0.3,
                torch.Generator().manual_seed(0))
library = mask_scene_graph_nodes(probe["input_ids"], probe["sg_roles"], probe["sg_nodes"], len(tokenizer), probs=0.3,
                                 generator=torch.Generator().manual_seed(0))
torch.testing.assert_close(mine, library)

# %%
# NBVAL_CHECK_OUTPUT
print("our scene-graph masking equals course_lib's mask_scene_graph_nodes on every caption:", True)

# %% [markdown]
# How different is it from random MLM? Over the captions of the first 300 scenes, 20 draws each, the
# share of each kind of word that ends up masked, and what share of the masked tokens are words with no
# node ("a", "is", "and", "there": predictable without the image). ERNIE-ViL keeps random MLM beside the
# graph's nodes (its `mask_text` is ViLBERT's, then the nodes on top):

# %%
everything = scene_graph_text(tokenizer, captions, CONTEXT)
ids, roles = everything["input_ids"], everything["sg_roles"]
counts = {"plain random MLM (15%)": [], "scene-graph nodes only (30%)": [], "ERNIE-ViL: random MLM + nodes": []}
g = torch.Generator().manual_seed(1)
everyone = torch.ones(len(ids), dtype=torch.bool)
for _ in range(RUN["mask_draws"]):
    plain = mask_caption(ids, everything["attention_mask"], everyone, len(tokenizer), 0.15, generator=g)[1] != -100
    nodes_only = mask_scene_graph_nodes(ids, roles, everything["sg_nodes"], len(tokenizer), generator=g)[1] != -100
    for name, chosen in zip(counts, (plain, nodes_only, plain | nodes_only)):
        counts[name].append(chosen)
real_words = (everything["attention_mask"] > 0) & ~torch.isin(ids, SPECIAL)
table = ["| masking | objects masked | attributes masked | relation words masked | words of no node masked | "
         "masked tokens that are words of no node | masked tokens per caption |", "|---|---|---|---|---|---|---|"]
for name, draws in counts.items():
    chosen = torch.stack(draws)  # (draws, N, L)
    share = [chosen[:, roles == r].float().mean().item() for r in (1, 2, 3)]
    none = roles.eq(0) & real_words
    table.append(f"| {name} | " + " | ".join(f"{s:.2f}" for s in share) + f" | {chosen[:, none].float().mean():.2f} | "
                 f"{(chosen & none).sum() / chosen.sum():.2f} | {chosen.sum() / (len(draws) * len(ids)):.2f} |")
display(Markdown("\n".join(table)))

# %% [markdown]
# Random MLM spends its masks on every word alike, about 15% of each kind, and more than a third of what it
# masks are words of no node. The nodes alone are masked at about a third (30%, plus the one forced node
# of the captions that drew none); ERNIE-ViL's mix masks scene-graph words at about three times random
# MLM's rate, and **more tokens per caption** in all: a difference the claim of section 6 cannot separate
# from *which* words are masked (the paper's comparison has the same property).
#
# ## 4. ERNIE-ViL in `course_lib`
#
# `course_lib.models.ernie_vil.ErnieViL` is ViLBERT (`course_lib.models.vilbert`) with two methods
# overridden: `mask_text` (ViLBERT's random MLM, then the nodes on top) and `objective_losses` (a masked
# word whose role is predicted leaves the `mlm` loss for its role's: `object`, `attribute`, `relation`,
# each a cross-entropy through the same tied MLM head). MRC-kl and ITM are ViLBERT's. The scene graph
# travels in the batch (`sg_roles`, `sg_nodes`; `ShapeWorldSceneGraphs` wraps a region source). The
# comparison of section 6 is one override: `object_weight=attribute_weight=relation_weight=0` is plain
# random MLM, ViLBERT exactly (the tests check it with copied weights).
#
# The model: one co-attention block, text and image streams of width 64 (the cpu-tiny preset with
# `layers=1`). The data: 2000 training scenes, each with its caption and graph; for evaluation
# (`course_lib.evaluate.fine_grained`):
#
# - **VQA per question type**: ShapeWorld's questions (exist, count, color, shape, relation: "is the red
#   circle left of the square?"), each type beside its own chance, the accuracy of always giving that
#   type's most frequent training answer;
# - **near misses**: each validation image with its caption, and with the caption changed in *one*
#   scene-graph node so that it becomes false: an object ("circle" → "square"), an attribute ("red" →
#   "green", "small" → "large", a count) or a relation ("left of" → "above"; checked false with
#   `caption_is_true`, since "above" may also hold). After ITM fine-tuning, how often the own caption gets
#   the higher match score; chance 0.5.

# %%
t0 = time.perf_counter()
data = shapeworld_fine_grained_tasks(world, tokenizer, CONTEXT, MAX_REGIONS, RUN["train_scenes"], RUN["val_scenes"],
                                     RUN["qa_scenes"], RUN["retrieval_pairs"])
chance = fine_grained_chance(data)
SIZE = dict(vocab_size=len(tokenizer), context_length=CONTEXT, text_only_layers=0, image_dim=64, bi_dim=64,
            mlp_ratio=2.0)
SIZE.update(RUN["size"])
print(f"data in {time.perf_counter() - t0:.1f} s")
k = int((data.near_kinds == 2).nonzero()[0])
print("a near miss:", tokenizer.decode(data.near_own["input_ids"][k], skip_special_tokens=True), "->",
      tokenizer.decode(data.near_miss["input_ids"][k], skip_special_tokens=True))

# %%
# NBVAL_CHECK_OUTPUT
print("near misses per kind:", {kind: int((data.near_kinds == i).sum() > 0) for i, kind in enumerate(NEAR_MISS_KINDS)})

# %% [markdown]
# ## 5. Pretraining, and what the masked-word heads learned
#
# `steps` steps of batch `batch_size`, every objective on every batch, seed 0; the same protocol as the
# committed claim (section 6), so this run is its seed-0 ERNIE-ViL line.

# %%
def pretrain(seed=0, **overrides):
    """ERNIE-ViL with ``overrides``, pretrained from scratch -> (model, history)."""
    torch.manual_seed(seed)
    model = build_model("ernie_vil", "cpu-tiny", **SIZE, **overrides)
    history = train(model, batch_sampler(data.pretrain, RUN["batch_size"], seed),
                    TrainConfig(steps=RUN["steps"], lr=RUN["lr"], warmup_steps=min(20, RUN["steps"]), seed=seed,
                                progress=False, log_every=0, device=device))
    return model.cpu().eval(), history


t0 = time.perf_counter()
model, history = pretrain()
print(f"pretrained in {time.perf_counter() - t0:.1f} s")
fig, axes = plt.subplots(1, 3, figsize=(13, 3))
for key in ("mlm", "object", "attribute", "relation"):
    plot_losses({key: history}, ax=axes[0], smooth=0.8, key=key)
axes[0].set_title("masked words, by role")
plot_losses(history, ax=axes[1], smooth=0.8, key="itm")
axes[1].axhline(np.log(2), color="grey", ls=":", lw=1)
axes[1].set_title("ITM")
plot_losses(history, ax=axes[2], smooth=0.8, key="mrckl")
axes[2].set_title("MRC-kl")
plt.tight_layout()
plt.show()

# %% [markdown]
# The `mlm` curve (words of no node, "a", "is", "and") falls near zero at once: those words need no
# image. The three scene-graph losses are what is left to learn. Do they come from the image? For every
# validation caption, mask **all** the words of one role (objects, attributes or relations) and predict
# them, once with the caption's own image and once with another scene's image (the next one): if the
# model reads its answers off the image, the other image must hurt.

# %%
@torch.no_grad()
def role_accuracy(model, batch, role, images_from):
    """Share of the words of ``role`` predicted right (argmax) when all of them are masked."""
    target = batch["sg_roles"] == ROLE_IDS[role]
    pairs = {**batch, **{k: v[images_from] for k, v in batch.items() if k.startswith("region") or k == "image_feat"}}
    logits = model.mlm_head(model.encode(pairs, batch["input_ids"].masked_fill(target, MASK_ID)).text)
    return (logits.argmax(-1) == batch["input_ids"])[target].float().mean().item()


val = ShapeWorldSceneGraphs(ShapeWorldRegions(world, tokenizer, CONTEXT, max_regions=MAX_REGIONS, split="val"))(
    range(RUN["val_scenes"]))
own, other = torch.arange(len(val["input_ids"])), torch.arange(len(val["input_ids"])).roll(1)
readback = {role: (role_accuracy(model, val, role, own), role_accuracy(model, val, role, other))
            for role in ("object", "attribute", "relation")}
display(Markdown("| masked role (all its words) | own image | another scene's image |\n|---|---|---|\n" + "\n".join(
    f"| {role} | {a:.3f} | {b:.3f} |" for role, (a, b) in readback.items())))
assert_learned(readback["attribute"][0] > readback["attribute"][1] + 0.15,
               f"attribute words from the own image {readback['attribute'][0]:.3f}, from another image "
               f"{readback['attribute'][1]:.3f} (what the caption alone gives)", SCALE)
looks = [role for role, (a, b) in readback.items() if a > b + 0.1]
display(Markdown(
    "With another scene's image, " + (f"the accuracy on {' and '.join(looks)} words drops by more than 0.1: the "
    "model reads them off the image. " if looks else "no role's accuracy drops by more than 0.1. ")
    + (f"Relation words are predicted about as well without their image ({readback['relation'][0]:.3f} with it, "
       f"{readback['relation'][1]:.3f} without): the model guesses them from the rest of the caption (which objects, "
       "which sizes, one word or two), not from where the objects are."
       if abs(readback["relation"][0] - readback["relation"][1]) <= 0.1 else
       "Relation words too depend on the image." if "relation" in looks else
       "Relation words are predicted *better* with another scene's image.")))

# %% [markdown]
# What it predicts, for a few validation captions with their relation masked:

# %%
shown = [i for i in range(len(val["input_ids"])) if (val["sg_roles"][i] == ROLE_IDS["relation"]).any()][:3]
fig, axes = plt.subplots(1, len(shown), figsize=(4 * len(shown), 3.6), squeeze=False)
for ax, i in zip(axes[0], shown):
    example = rows(val, torch.tensor([i]))
    target = example["sg_roles"] == ROLE_IDS["relation"]
    masked = example["input_ids"].masked_fill(target, MASK_ID)
    with torch.no_grad():
        probs = model.mlm_head(model.encode(example, masked).text).softmax(-1)[0]
    first = int(target[0].nonzero()[0])  # the relation's first word: "left", "above", "bigger"...
    top = probs[first].topk(3)
    show_image(example["images"][0], ax=ax)
    text = tokenizer.decode(masked[0], skip_special_tokens=False).replace("[CLS] ", "").split(" [SEP]")[0]
    guesses = ", ".join(f"{tokenizer.convert_ids_to_tokens(int(t))} {p:.2f}" for p, t in zip(top.values, top.indices))
    ax.set_title(f"{text}\n{guesses}", fontsize=8)
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 6. Fine-grained evaluation, and the paper's claim
#
# Every pretrained model is fine-tuned the same way (a copy per task): VQA for `vqa_steps` steps with a
# fresh answer head, ITM for `retrieval_steps` steps (half the pairs given another image) before the
# near-miss ranking and retrieval R@1 over `retrieval_pairs` validation pairs.

# %%
budget = FinetuneBudget(retrieval_steps=RUN["retrieval_steps"], vqa_steps=RUN["vqa_steps"],
                        batch_size=RUN["finetune_batch_size"], lr=RUN["lr"], warmup_steps=10)
t0 = time.perf_counter()
live = fine_grained_scores(model, data, budget, seed=0, device=device)
print(f"fine-tuned and scored in {time.perf_counter() - t0:.1f} s")
display(Markdown("| score (ERNIE-ViL, seed 0) | ours | chance |\n|---|---|---|\n" + "\n".join(
    f"| {name} | {live[name]:.3f} | {chance[name]:.3f} |" for name in chance)))
assert_learned(live["VQA color"] > chance["VQA color"] + 0.15,
               f"VQA on colour questions {live['VQA color']:.3f} (most frequent answer {chance['VQA color']:.3f})",
               SCALE)
assert_learned(live["near miss attribute"] > 0.65,
               f"own caption above its attribute near miss {live['near miss attribute']:.3f} (chance 0.5)", SCALE)

# %% [markdown]
# **The claim.** The paper: scene-graph prediction beats random masking, and most on the tasks that need
# the details (its Table 5 adds object, attribute and relation prediction one by one; each helps).
# Here: the same model and protocol, pretrained with ERNIE-ViL's masking or with plain random MLM (the
# three scene-graph weights at 0), each for the same number of steps, over 3 seeds, each fine-tuned as
# above. Twelve runs do not fit in a minute of CPU: `benchmarks/ernie_vil_claim.py` runs them with this
# notebook's protocol and writes `benchmarks/results/ernie_vil_claim.json`, which we load.

# %%
results = json.loads((Path(course_lib.__file__).resolve().parent.parent / "benchmarks" / "results"
                      / "ernie_vil_claim.json").read_text())
ARMS = {arm["arm"]: arm for arm in results["arms"]}
seeds = len(ARMS["sgp"]["scores"]["VQA all"])


def ms(values):
    return f"{np.mean(values):.3f} ± {np.std(values):.3f}"


def compare(name):
    """(difference of the means, the larger std) of a score, ERNIE-ViL minus plain MLM."""
    a, b = ARMS["sgp"]["scores"][name], ARMS["mlm"]["scores"][name]
    return np.mean(a) - np.mean(b), max(np.std(a), np.std(b))


def beats_chance(arm, name):
    """Whether an arm's mean is above the score's chance level by more than its spread (at least 0.02)."""
    values = ARMS[arm]["scores"][name]
    return np.mean(values) - results["chance"][name] > max(np.std(values), 0.02)


def verdict(name):
    if not (beats_chance("sgp", name) or beats_chance("mlm", name)):
        return "neither beats chance"
    diff, spread = compare(name)
    return "better" if diff > spread else "worse" if diff < -spread else "within the spread"


table = [f"| score | {ARMS['sgp']['name']} | {ARMS['mlm']['name']} | difference | chance | ERNIE-ViL is |",
         "|---|---|---|---|---|---|"]
for name in results["chance"]:
    diff, _ = compare(name)
    table.append(f"| {name} | {ms(ARMS['sgp']['scores'][name])} | {ms(ARMS['mlm']['scores'][name])} | {diff:+.3f} | "
                 f"{results['chance'][name]:.3f} | {verdict(name)} |")
display(Markdown("\n".join(table) + f"\n\nmean ± standard deviation over {seeds} seeds; `{results['command']}` "
                 f"(commit {results['commit']}, {results['date']}, {results['total_seconds'] / 60:.0f} min); "
                 f"near misses per kind: {results['near_misses']}."))

# %%
committed = {name: ARMS["sgp"]["scores"][name][0] for name in live}
same = all(abs(live[name] - committed[name]) < 1e-3 for name in live)
print(f"the live run and the committed seed-0 ERNIE-ViL line: {'the same' if same else 'different'} "
      f"(largest difference {max(abs(live[n] - committed[n]) for n in live):.3f}; the same on the same machine and "
      "thread count)")

# %% [markdown]
# **Did the direction hold?** A score moves the paper's way when ERNIE-ViL's mean is above plain MLM's by
# more than the larger of the two seed spreads, and against it when below by as much; a score on which
# neither arm beats its chance level (by more than its spread) tests nothing and is counted apart. The
# fine-grained scores are the attribute and relation questions and near misses (colour and shape
# questions ask for attributes; "relation" questions for relations):

# %%
FINE = ["VQA color", "VQA shape", "VQA relation", "near miss object", "near miss attribute", "near miss relation"]
by = {v: [n for n in FINE if verdict(n) == v] for v in ("better", "worse", "within the spread", "neither beats chance")}
overall = [n for n in ("VQA all", "near miss all", "retrieval R@1") if verdict(n) in ("better", "worse")]
tested = len(FINE) - len(by["neither beats chance"])
display(Markdown(
    f"**Of the {len(FINE)} fine-grained scores, ERNIE-ViL's scene-graph prediction was better on {len(by['better'])}, "
    f"worse on {len(by['worse'])} and within the seeds' spread on {len(by['within the spread'])}; on "
    f"{len(by['neither beats chance'])} neither arm beat chance** ({seeds} seeds each). "
    + "".join(f"{v.capitalize()}: {', '.join(names)}. " for v, names in by.items() if names)
    + ("The paper's direction held on most of the scores that tested it. " if tested and len(by["better"]) > tested / 2
       and not by["worse"] else
       "The paper's claim, that scene-graph prediction improves the fine-grained tasks, "
       + ("held on some of them and not on the others here. " if by["better"] else "did not reproduce here. "))
    + ("On the overall scores: " + ", ".join(f"{n} {verdict(n)}" for n in overall) + "." if overall else
       "The overall scores (VQA over all questions, all near misses, retrieval R@1) moved within the spread.")))
if any("relation" in n for n in by["neither beats chance"]):
    display(Markdown(
        "On relations, at this scale, neither pretraining learned enough for the fine-tuned model to beat chance: the "
        "claim was not tested there, only found out of reach"
        + (" (section 5 saw the same: the masked relation words are not read off the image)."
           if "relation" not in looks else ".")))

# %% [markdown]
# ## Summary
#
# - **Scene graphs from captions**: a parser reads each caption into objects, attributes and relations, each
#   node tied to its words; on ShapeWorld the grammar is the parser, and the true graph of every image
#   checks it (perfect agreement on the world's own captions, far from it on captions of other scenes).
# - **Scene-graph prediction** masks whole nodes (30% of the objects, of the object-attribute pairs, of the
#   relations; BERT's 80/10/10 per node) on top of random MLM, and scores each role's words in its own loss.
#   The model is ViLBERT otherwise: two overridden methods in `course_lib.models.ernie_vil`.
# - **Fine-grained evaluation** (`course_lib.evaluate.fine_grained`): VQA accuracy per question type beside
#   its own chance, and near misses that differ from the truth in one node; the claim's table and verdict
#   above come from `benchmarks/ernie_vil_claim.py` over 3 seeds.
#
# **Deviations from the paper**: a one-block two-stream model of width 64, from scratch, 400 steps (the
# paper: ViLBERT-base sizes, initialised from ERNIE 2.0, pretrained on CC + SBU); ShapeWorld's grammar
# for SPICE's parser (no parsing errors); one forced node per caption that drew none; the region features
# are RoIAlign of pixels through the simulated detector (notebook 10); VQA and near-miss ranking on
# ShapeWorld for VCR, VQA, RefCOCO+ and Flickr30K.
#
# **Next**: notebook 17 builds UNIMO, which learns from images, text and pairs in one model.
#
# ## Exercises
#
# **Exercise 1 - whole-node masking.** Write `node_tokens(word_nodes, chosen)`: `word_nodes (B, L)` the node
# index of each token (-1 for a token of no node), `chosen (B, N)` bool, the nodes chosen in each caption
# → `(B, L)` bool, True at every token whose node is chosen in its own row (all the tokens of "left of").

# %% [exercise]
from course_lib.checks.ernie_vil import check_node_tokens


def node_tokens(word_nodes, chosen):
    raise NotImplementedError("gather chosen at word_nodes.clamp(min=0) along dim 1, keep the tokens with a node")


check_node_tokens(node_tokens)

# %% [solution]
from course_lib.checks.ernie_vil import check_node_tokens


def node_tokens(word_nodes, chosen):
    on_node = word_nodes >= 0  # (B, L)
    return chosen.gather(1, word_nodes.clamp(min=0)) & on_node


check_node_tokens(node_tokens)

# %% [markdown]
# **Exercise 2 - accuracy per question type.** Write `accuracy_per_type(logits, answers, question_types)`:
# `logits (N, A)`, `answers (N,)`, `question_types (N,)` indices into
# `course_lib.data.language.QUESTION_TYPES` → a dict `{type name: accuracy}` for every type that occurs,
# plus `"all"`: the share of questions whose argmax answer is right.

# %% [exercise]
from course_lib.checks.ernie_vil import check_accuracy_by_type
from course_lib.data.language import QUESTION_TYPES


def accuracy_per_type(logits, answers, question_types):
    raise NotImplementedError("compare logits.argmax(1) with answers, average per type present, and over all")


check_accuracy_by_type(accuracy_per_type)

# %% [solution]
from course_lib.checks.ernie_vil import check_accuracy_by_type
from course_lib.data.language import QUESTION_TYPES


def accuracy_per_type(logits, answers, question_types):
    right = (logits.argmax(1) == answers).float()
    out = {name: right[question_types == k].mean().item() for k, name in enumerate(QUESTION_TYPES)
           if (question_types == k).any()}
    out["all"] = right.mean().item()
    return out


check_accuracy_by_type(accuracy_per_type)

# %%
print(f"notebook ran in {time.perf_counter() - start_time:.0f} s")
