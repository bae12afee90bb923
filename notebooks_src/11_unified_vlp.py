# %% [markdown]
# # 11 · Unified VLP: one transformer that captions and answers
#
# **What you will build.** Unified VLP (Zhou et al. 2020): **one** shared transformer that both *writes*
# captions and *answers* questions about an image. It is a BERT over `[CLS] regions [SEP] caption [SEP]`,
# pretrained with one objective (predict masked caption words) under **two self-attention masks, chosen
# per sample**:
#
# | mask | who sees whom | what it teaches | used downstream for |
# | --- | --- | --- | --- |
# | **seq2seq** (75% of the samples) | every token sees the image part; a caption word sees the words *before* it and itself; the image never sees the caption | to write the caption left to right, from the image | captioning |
# | **bidirectional** (25%) | everyone sees everyone | BERT's masked language model, conditioned on the image | VQA |
#
# You will build both masks from scratch and draw them, check them against `course_lib`, pretrain the
# model on ShapeWorld regions, caption the validation images by the paper's **left-to-right `[MASK]`
# prediction** and score the captions twice (BLEU-4/CIDEr against the reference captions, and whether
# each caption is *true* of its image), fine-tune the same weights for VQA, and test the paper's headline
# claim over 3 seeds.
#
# **The problem it solved.** The vision-language BERTs of 2019 (VisualBERT, ViLBERT, LXMERT, UNITER;
# notebook 10) are *encoders*: every token sees every other, which is what understanding tasks (VQA,
# retrieval) want, and what generation forbids (a word being written cannot look at the words after it).
# Captioning kept its own encoder-decoder models, pretrained separately if at all. UniLM (Dong et al.
# 2019) had shown, for text, that one transformer can do both if only the self-attention mask changes.
# Unified VLP carried that to images: the same weights, pretrained once on Conceptual Captions, set the
# state of the art in captioning (COCO, Flickr30k) and were competitive on VQA 2.0, and the mask alone
# decides which task the model is doing.
#
# **Papers.** Zhou, Palangi, Zhang, Hu, Corso & Gao (2020) *Unified Vision-Language Pre-Training for Image
# Captioning and VQA* (AAAI); Dong et al. (2019) *Unified Language Model Pre-training for Natural Language
# Understanding and Generation* (UniLM); Devlin et al. (2019) *BERT*; Anderson et al. (2018) *Bottom-Up and
# Top-Down Attention* (the detector); Papineni et al. (2002) *BLEU*; Vedantam et al. (2015) *CIDEr*.
#
# **Where this sits in the course.** Part II, the region-feature systems. Notebook 10 built the
# single-stream encoders; this one keeps the single stream and adds generation. Later notebooks generate
# with a *separate* decoder instead (BLIP, CoCa: notebooks 24 and 25). The recipe followed here, with the
# original code's details, is in `shared/reference/RECIPES-2.md` (section 4), and the model is
# `course_lib.models.unified_vlp` (`python -m course_lib.pretrain --model=unified_vlp` at GPU scale).
#
# *Terms in English and Chinese: [glossary](../GLOSSARY.md).*

# %% [parameters]
SCALE = "cpu"  # "cpu": about a minute; "gpu": bigger model, longer run; "smoke": a few steps (what the tests run)

# %%
RUN = {
    "smoke": dict(dim=64, heads=4, layers=2, mlp_ratio=2.0, steps=12, finetune_steps=6, batch_size=16, lr=2e-3,
                  warmup=4, train_scenes=200, val_scenes=60, qa_scenes=100, claim_steps=6, claim_finetune_steps=4,
                  claim_batch_size=16, claim_train_scenes=100, claim_val_scenes=40, seeds=(0, 1, 2)),
    "cpu": dict(dim=64, heads=4, layers=2, mlp_ratio=2.0, steps=600, finetune_steps=100, batch_size=64, lr=2e-3,
                warmup=20, train_scenes=2000, val_scenes=200, qa_scenes=1000, claim_steps=300, claim_finetune_steps=50,
                claim_batch_size=32, claim_train_scenes=1000, claim_val_scenes=100, seeds=(0, 1, 2)),
    "gpu": dict(dim=256, heads=8, layers=4, mlp_ratio=4.0, steps=5000, finetune_steps=1000, batch_size=256, lr=5e-4,
                warmup=200, train_scenes=40000, val_scenes=2000, qa_scenes=20000, claim_steps=2000,
                claim_finetune_steps=500, claim_batch_size=128, claim_train_scenes=20000, claim_val_scenes=1000,
                seeds=(0, 1, 2)),
}[SCALE]
from course_lib.thresholds import assert_learned  # asserts at SCALE cpu/gpu; reports at smoke
RUN

# %%
import math
import time
from collections import Counter

import matplotlib.pyplot as plt
import numpy as np
import torch
from IPython.display import Markdown, display

from course_lib.utils import count_parameters, get_device, seed_everything

seed_everything(0, threads=2)
from course_lib.data import ShapeWorld, WorldConfig
from course_lib.data.datasets import build_tokenizer
from course_lib.data.language import answer_vocabulary
from course_lib.data.regions import ShapeWorldRegions
from course_lib.evaluate import (VQAFineTuner, caption_is_true, caption_metrics, caption_truth_rate,
                                 most_frequent_caption, parse_caption)
from course_lib.features.text import CLS_ID, MASK_ID, PAD_ID, SEP_ID
from course_lib.fusion.attention_masks import bidirectional_mask, seq2seq_mask
from course_lib.models.registry import build_model
from course_lib.objectives.mlm import IGNORE_INDEX, mask_target_tokens
from course_lib.train import TrainConfig, train
from course_lib.viz import draw_boxes, plot_losses, show_image

device = get_device()
start_time = time.perf_counter()

# %% [markdown]
# ## 1. Data: ShapeWorld scenes, their detected regions and five captions each
#
# Scenes of one or two objects (as in notebook 10: with three, this small model needs several times the
# steps to ground its captions, more than a minute allows). Each scene has **five captions** drawn from
# ShapeWorld's templates ("there is a small red circle", "a red circle is left of a blue square", "there
# are two circles and two objects", ...), as each COCO image has five, and the paper trains on every one
# of them: a training pair is (a scene's regions, one of its captions). The five captions of a validation
# scene are the **references** its generated caption is scored against.
#
# The image side is the region batch of notebook 10 (`course_lib.data.regions.ShapeWorldRegions`): the
# simulated detector's boxes, a 108-number RoIAlign feature per box (the stand-in for the detector's
# 2048-d vector), and the detector's class distribution over the 18 (colour, shape) classes plus "no
# object", which Unified VLP uses in a way the other systems do not (section 3).

# %%
world = ShapeWorld(WorldConfig(min_objects=1, max_objects=2, seed=0))
tokenizer = build_tokenizer(world, vocab_size=128, num_scenes=300)
CONTEXT, MAX_REGIONS = 18, 4  # tokens of a caption or question ([CLS] and [SEP] included); region slots


def region_source(split, context=CONTEXT, max_regions=MAX_REGIONS, source_world=world):
    return ShapeWorldRegions(source_world, tokenizer, context, max_regions=max_regions, split=split)


def caption_pairs(split, size, context=CONTEXT, max_regions=MAX_REGIONS, source_world=world):
    """Every (scene, caption) pair of scenes ``0 .. size - 1``: a region batch with ``5 * size`` rows, the
    scenes, and the image side of each scene once (a batch to caption)."""
    source = region_source(split, context, max_regions, source_world)
    scenes = source_world.scenes(range(size), split)
    images = source.regions(scenes)
    images.pop("region_source")
    captions = [c for s in scenes for c in s.captions]
    rows = torch.arange(size).repeat_interleave(len(scenes[0].captions))
    pairs = {k: v[rows] for k, v in images.items() if k != "images"}
    pairs.update(source.text(captions))
    return pairs, scenes, images


def sampler(data, batch_size, seed):
    """``step -> batch``: random rows of ``data``, the same for the same (seed, step)."""
    n = len(data["input_ids"])
    return lambda step: {k: v[torch.randint(n, (batch_size,), generator=torch.Generator().manual_seed(
        seed * 100_003 + step))] for k, v in data.items()}


train_pairs, train_scenes, _ = caption_pairs("train", RUN["train_scenes"])
val_pairs, val_scenes, val_images = caption_pairs("val", RUN["val_scenes"])
val_refs = [list(s.captions) for s in val_scenes]
qa_train = region_source("train").questions(range(RUN["qa_scenes"]))
qa_val = region_source("val").questions(range(RUN["val_scenes"]))
long_questions = int((qa_train["attention_mask"].sum(1) == CONTEXT).sum())

# %%
# NBVAL_CHECK_OUTPUT
print("train scenes", len(train_scenes), "| caption pairs", len(train_pairs["input_ids"]), "| val scenes",
      len(val_scenes), "| vocabulary", len(tokenizer))
for key in ("input_ids", "region_feats", "region_boxes", "region_mask", "region_probs"):
    print(f"{key:13s}", tuple(train_pairs[key].shape))
print("longest training caption:", int(train_pairs["attention_mask"].sum(1).max()), "tokens; questions cut at",
      CONTEXT, "tokens:", long_questions, "of", len(qa_train["input_ids"]))

# %%
k = 0  # the first validation scene, followed through the notebook
class_names = [world.config.class_name(c) for c in range(world.num_classes)]
mask_k = val_images["region_mask"][k]
fig, ax = plt.subplots(figsize=(3, 3))
draw_boxes(show_image(val_images["images"][k], ax=ax, title="validation scene 0: detected regions"),
           val_images["region_boxes"][k][mask_k] * 32,
           [f"r{r + 1}: {class_names[c]}" if c >= 0 else f"r{r + 1}: ?"
            for r, c in enumerate(val_images["region_labels"][k][mask_k].tolist())])
plt.show()
print("its five reference captions:")
for caption in val_refs[k]:
    print("  ", caption)

# %% [markdown]
# ## 2. The two masks, from scratch
#
# Unified VLP's input is one sequence, the image part first:
#
# $$\underbrace{[\mathrm{CLS}]\; r_1 \ldots r_R\; [\mathrm{SEP}]}_{\text{source: } S = R + 2 \text{ positions}}\;\;
# \underbrace{w_1 \ldots w_n\; [\mathrm{SEP}]\; [\mathrm{PAD}] \ldots}_{\text{target: the caption}}$$
#
# A self-attention mask is an $N \times N$ table, one row per query, one column per key, True where the
# query may attend to the key. The **bidirectional** mask is BERT's: every row sees every real key. The
# **seq2seq** mask is four blocks:
#
# | | keys in the source | keys in the target |
# | --- | --- | --- |
# | **queries in the source** | all (the image is encoded bidirectionally) | none (the image never sees the caption) |
# | **queries in the target** | all (every word reads the whole image) | lower triangle (word $t$ sees words $\le t$) |
#
# Padding keys (region slots the detector did not fill, `[PAD]` after the caption) are hidden in both.
# Below, the seq2seq mask of validation scene 0 is assembled from its four blocks and checked against the
# mask the model builds (`course_lib.fusion.attention_masks`, returned by `model.encode` in
# `extras["attn_mask"]`).

# %%
S, T = MAX_REGIONS + 2, CONTEXT - 1  # source: [CLS] + region slots + [SEP]; target: the caption after [CLS]


def seq2seq_by_blocks(S, T):
    """The seq2seq mask of one sequence without padding: ``(S + T, S + T)`` bool."""
    top = torch.cat([torch.ones(S, S), torch.zeros(S, T)], dim=1)  # the image part sees only itself
    bottom = torch.cat([torch.ones(T, S), torch.ones(T, T).tril()], dim=1)  # a word: all the image, earlier words
    return torch.cat([top, bottom], dim=0).bool()


one = {key: value[k:k + 1] for key, value in val_pairs.items()}  # scene 0 with its first caption
one_valid = torch.cat([torch.ones(1), one["region_mask"][0].float(), torch.ones(1),
                       one["attention_mask"][0, 1:].float()]).bool()  # (N,) the real positions
ours = {"seq2seq": seq2seq_by_blocks(S, T) & one_valid[None, :],  # padding keys hidden
        "bidirectional": one_valid[None, :].expand(S + T, S + T)}

torch.manual_seed(0)
model = build_model("unified_vlp", "cpu-tiny", vocab_size=len(tokenizer), context_length=CONTEXT,
                    max_regions=MAX_REGIONS, dim=RUN["dim"], heads=RUN["heads"], layers=RUN["layers"],
                    mlp_ratio=RUN["mlp_ratio"], init_std=0.8 / math.sqrt(RUN["dim"]))
library = {name: model.encode(one, mode=mode).extras["attn_mask"][0]
           for name, mode in (("seq2seq", "s2s"), ("bidirectional", "bi"))}
for name in ours:
    torch.testing.assert_close(ours[name], library[name])
torch.testing.assert_close(ours["seq2seq"], seq2seq_mask(one_valid[None], S)[0])
torch.testing.assert_close(ours["bidirectional"], bidirectional_mask(one_valid[None])[0])
print("both masks, built from their blocks, equal the library's")

# %%
tokens = tokenizer.convert_ids_to_tokens(one["input_ids"][0].tolist())
labels = (["[CLS]"] + [f"r{r + 1}" if real else "(r)" for r, real in enumerate(one["region_mask"][0].tolist())]
          + ["[SEP]"] + [t if t != "[PAD]" else "·" for t in tokens[1:]])
fig, axes = plt.subplots(1, 2, figsize=(12, 5.6))
for ax, (name, mask) in zip(axes, ours.items()):
    ax.imshow(mask.float().numpy(), cmap="Blues", vmin=0, vmax=1.3)
    ax.axhline(S - 0.5, color="crimson", linewidth=1)
    ax.axvline(S - 0.5, color="crimson", linewidth=1)
    ax.set_xticks(range(S + T), labels, rotation=90, fontsize=7)
    ax.set_yticks(range(S + T), labels, fontsize=7)
    ax.set_xlabel("key (attended to)")
    ax.set_ylabel("query")
    segments = "0 (image part), 1 (text part)" if name == "bidirectional" else "4 (image part), 5 (text part)"
    ax.set_title(f"{name} mask; segment ids {segments}", fontsize=9)
fig.suptitle(f'validation scene 0, caption "{val_refs[k][0]}": blue = may attend', fontsize=10)
fig.tight_layout()

# %% [markdown]
# Left, the seq2seq mask: the top-left block (the image part) is full, the block to its right empty, and the
# caption (bottom right) is a staircase. The red lines separate source and target. The columns of the
# region slots the detector left empty, `(r)`, and of the padding after the caption, `·`, are blank in both
# masks. Right, the bidirectional mask: every row sees every real key.
#
# **The segment ids say which mask is in use.** Each token gets a segment embedding, as in BERT: Unified VLP
# gives the image part and the caption segments 0 and 1 under the bidirectional mask, and 4 and 5 under
# the seq2seq mask (the paper's `--new_segment_ids`; 2 and 3 are UniLM's left-to-right language model,
# unused). So the model always knows whether it may look ahead, and one set of weights can learn both
# behaviours.
#
# What the seq2seq mask guarantees, measured on the (untrained) model: the image part's outputs cannot
# depend on the caption, and the output at caption position $t$ cannot depend on the words after $t$.
# Change them, and nothing before them moves; under the bidirectional mask everything does.

# %%
batch8 = {key: value[:8] for key, value in val_pairs.items()}
other = {**batch8, "input_ids": batch8["input_ids"].roll(5, dims=0),  # the captions of other scenes
         "attention_mask": batch8["attention_mask"].roll(5, dims=0)}
with torch.no_grad():
    for mode in ("s2s", "bi"):
        a, b = model.encode(batch8, mode=mode), model.encode(other, mode=mode)
        print(f"{mode:3s} mask: the image part's outputs change by at most {(a.image - b.image).abs().max():.1e} "
              f"when the caption is replaced")
    ids = batch8["input_ids"].clone()
    later = ids.clone()
    later[:, 3:] = torch.where(later[:, 3:] > SEP_ID, 5 + (later[:, 3:] + 17) % (len(tokenizer) - 5), later[:, 3:])
    a, b = model.encode(batch8, ids, mode="s2s"), model.encode(batch8, later, mode="s2s")
    print(f"s2s mask: words 1-2 change by at most {(a.text[:, :3] - b.text[:, :3]).abs().max():.1e} when words 3+ "
          f"are replaced (words 3+ themselves: {(a.text[:, 3:] - b.text[:, 3:]).abs().max():.2f})")

# %% [markdown]
# ## 3. The model: one BERT, a new way to embed regions, one loss
#
# `course_lib.models.unified_vlp.UnifiedVLP` follows the original code (`LuoweiZhou/VLP`):
#
# - **Region tokens.** A region slot's *word* embedding is replaced by an MLP of its feature,
#   $\mathrm{ReLU}(W_2\,\mathrm{ReLU}(W_1 f))$ (the paper starts $W_1$ from the detector's own fc7 layer),
#   and its *position* embedding by $\mathrm{ReLU}(W_p\,[\mathrm{LN}(g);\,\mathrm{LN}(p)])$: a 6-number
#   geometry $g$ (the box corners, its area, the detector's confidence) and the detector's whole class
#   distribution $p$, each normalised without learned parameters. Other systems add the box to the
#   feature (notebooks 03, 10); here the box *is* the region's position, and the class distribution
#   tells the model what the detector thought it saw.
# - **Positions run on** through the sequence: `[CLS]` 0, the regions 1..R (replaced as above), `[SEP]`
#   R + 1, the caption from R + 2. Then BERT: segment embedding added, LayerNorm, a post-LN transformer.
# - **One objective.** Only caption tokens (and the caption's final `[SEP]`, which teaches the model to
#   stop) are masked, exactly $n_{pred} = \min(3, \max(1, \mathrm{round}(0.15\,n)))$ of a caption of $n$
#   words, each replaced by `[MASK]` (80%), a random word (10%) or kept (10%), and predicted by BERT's MLM
#   head. Under the seq2seq mask a masked word sees only the image and the words before it: that is
#   caption generation, trained as a cloze. Each sample gets the seq2seq mask with probability 0.75
#   (`s2s_prob`) and the bidirectional one with 0.25 (`bi_prob`), the paper's pretraining mix.
#
# Sizes: RUN's width and depth, the course's initialisation $0.8/\sqrt{D}$ (notebook 05 explains why
# BERT's 0.02 starves a narrow model), 4 region slots.

# %%
# NBVAL_CHECK_OUTPUT
print("parameters:", count_parameters(model))
print("s2s_prob", model.config.s2s_prob, "| bi_prob", model.config.bi_prob, "| max_pred", model.config.max_pred,
      "| position table", model.position_embeddings.num_embeddings, "rows | segment table",
      model.segment_embeddings.num_embeddings, "rows")
g = torch.Generator().manual_seed(0)
masked, labels_ = mask_target_tokens(val_pairs["input_ids"][:5], val_pairs["attention_mask"][:5], len(tokenizer),
                                     generator=g)
for row in range(5):
    n_words = int(((val_pairs["input_ids"][row] > MASK_ID) & val_pairs["attention_mask"][row].bool()).sum())
    shown = [t for t, keep in zip(tokenizer.convert_ids_to_tokens(masked[row].tolist()),
                                  val_pairs["attention_mask"][row].bool()) if keep][1:]
    print(f"{n_words:2d} words -> {int((labels_[row] != IGNORE_INDEX).sum())} predicted:", " ".join(shown))

# %% [markdown]
# A caption of up to 9 words has one token to predict ($0.15 \times 9 = 1.35$ rounds to 1), a longer one two.
# The draw above shows the three fates of a chosen token: `[MASK]` (captions 2, 3 and 4), a random word
# (caption 1: "is" became the piece `##ta`), or itself (caption 5: the chosen token was kept, so nothing looks
# masked, and the model must still predict it). That is few predictions per caption; the paper pays that
# price for a loss that works under both masks.
#
# ## 4. Pretraining with both masks
#
# `RUN["steps"]` steps of AdamW on random (scene, caption) pairs; `forward` returns the loss over every
# predicted token (the paper's) and the same loss over the seq2seq samples (`mlm_s2s`) and over the
# bidirectional ones (`mlm_bi`).

# %%
t0 = time.perf_counter()
history = train(model, sampler(train_pairs, RUN["batch_size"], seed=0),
                TrainConfig(steps=RUN["steps"], lr=RUN["lr"], warmup_steps=RUN["warmup"], progress=False, log_every=0,
                            device=device, seed=0))
final = {key: np.mean([r[key] for r in history.records[-50:]]) for key in ("mlm_s2s", "mlm_bi")}
print(f"{RUN['steps']} steps in {time.perf_counter() - t0:.1f} s | mean of the last 50 steps: seq2seq samples "
      f"{final['mlm_s2s']:.3f}, bidirectional samples {final['mlm_bi']:.3f}")
fig, ax = plt.subplots(figsize=(6, 3))
plot_losses({"seq2seq samples (mlm_s2s)": [r["mlm_s2s"] for r in history.records],
             "bidirectional samples (mlm_bi)": [r["mlm_bi"] for r in history.records]}, ax=ax, smooth=0.95)
ax.axhline(math.log(len(tokenizer)), color="grey", linestyle="--", linewidth=0.8)
ax.set_ylabel("masked-token loss")
ax.set_title(f"dashed: ln V = {math.log(len(tokenizer)):.2f}, a uniform guess", fontsize=9);

# %% [markdown]
# Both losses fall far below the uniform guess, and the bidirectional one ends lower: a masked word there
# also sees the words *after* it ("a red [MASK] is left of a blue square": the rest of the caption narrows
# it down), while under the seq2seq mask "a red [MASK]" has only the image and the words before it. The gap
# between the curves is what writing left to right costs.
#
# ## 5. Captioning: one `[MASK]` at a time
#
# To write a caption, the model is given `[CLS] regions [SEP] [MASK]` under the seq2seq mask and predicts
# the `[MASK]`; the prediction takes its place, a new `[MASK]` is appended, and so on until it writes
# `[SEP]` (or reaches 20 tokens, the paper's limit; here `CONTEXT - 1` = 17). Greedy: the most likely word
# each time (the paper uses beam search of 5 on its test set), never a special token other than `[SEP]`, and
# not `[SEP]` first (the paper's `min_len`), so no caption is empty. Because no position can see the positions
# after it, the earlier positions' states are the same at every step: the original decoder caches them
# and computes only the new column; `UnifiedVLP.generate` recomputes them (simpler, same result).
#
# Step by step, for validation scene 0 (its three most likely tokens at each step; with a vocabulary of 128
# WordPiece tokens some words are spelled in pieces, `##` marking a continuation, and the model writes them
# one piece at a time like any other token):

# %%
model.eval()
scene0 = {key: value[k:k + 1] for key, value in val_images.items() if key != "images"}
written = torch.full((1, 1), CLS_ID)
steps_table = ["| step | input after the regions | the model's top 3 for [MASK] |", "|---|---|---|"]
with torch.no_grad():
    for step in range(CONTEXT - 1):
        ids = torch.cat([written, torch.full((1, 1), MASK_ID)], dim=1)  # [CLS] w_1 ... w_t [MASK]
        out = model.encode({**scene0, "attention_mask": torch.ones_like(ids)}, ids, mode="s2s")
        probs = model.mlm_head(out.text[:, -1]).softmax(-1)[0]  # the prediction at [MASK]
        top = probs.topk(3)
        shown = " ".join(tokenizer.convert_ids_to_tokens(ids[0].tolist()))
        steps_table.append(f"| {step + 1} | `{shown}` | " + ", ".join(
            f"{tokenizer.convert_ids_to_tokens(int(i))} ({p:.2f})" for p, i in zip(top.values, top.indices)) + " |")
        written = torch.cat([written, top.indices[:1][None]], dim=1)
        if int(top.indices[0]) == SEP_ID:
            break
display(Markdown("\n".join(steps_table)))
caption0 = model.generate_captions(scene0, tokenizer)[0]
print(f'generate(): "{caption0}" | true of the scene: {caption_is_true(caption0, val_scenes[k])}')

# %% [markdown]
# Now every validation scene, scored two ways against the **most-frequent-caption baseline** (the training
# caption that occurs most often, written for every image: what the language prior alone scores):
#
# - **BLEU-4** and **CIDEr** (`caption_metrics`, the COCO evaluation's scorers): n-gram overlap with the
#   scene's five reference captions. BLEU-4 is the geometric mean of 1- to 4-gram precisions with a brevity
#   penalty; CIDEr weighs each n-gram by how rare it is among the references of all images (TF-IDF), so a
#   caption scores for saying what is *specific* to its image. Scores are fractions (papers print ×100).
# - **Truth** (`caption_truth_rate`): the share of generated captions that are *true* of their scene, read by
#   a parser of ShapeWorld's grammar. n-gram metrics reward "there is a large red circle" for a small red
#   circle almost fully; truth does not.

# %%
t0 = time.perf_counter()
captions = model.generate_captions({key: v for key, v in val_images.items() if key != "images"}, tokenizer)
baseline_caption = most_frequent_caption([c for s in train_scenes for c in s.captions])
baseline_captions = [baseline_caption] * len(val_scenes)
scores = {"Unified VLP (greedy)": {**caption_metrics(captions, val_refs),
                                   "truth": caption_truth_rate(captions, val_scenes)},
          f'baseline: "{baseline_caption}"': {**caption_metrics(baseline_captions, val_refs),
                                               "truth": caption_truth_rate(baseline_captions, val_scenes)}}
print(f"captioned {len(captions)} scenes in {time.perf_counter() - t0:.1f} s")
table = ["| captions of the val scenes | BLEU-4 | CIDEr | truth |", "|---|---:|---:|---:|"]
for name, s in scores.items():
    table.append(f"| {name} | {s['BLEU-4']:.3f} | {s['CIDEr']:.3f} | {s['truth']:.3f} |")
display(Markdown("\n".join(table)))

# %%
# NBVAL_CHECK_OUTPUT
ours_scores, base_scores = scores.values()
checks = {f"{metric} above the most-frequent-caption baseline + {margin}":
          ours_scores[metric] > base_scores[metric] + margin
          for metric, margin in (("BLEU-4", 0.05), ("CIDEr", 0.5), ("truth", 0.15))}
for claim, holds in checks.items():
    print(f"{claim}: {holds}")
failed = [claim for claim, holds in checks.items() if not holds]
assert_learned(not failed, f"failed: {failed}; model {ours_scores}, baseline {base_scores}", SCALE)

# %%
show = list(range(12))
fig, axes = plt.subplots(2, 6, figsize=(13, 5.2))
for ax, i in zip(axes.flat, show):
    true = caption_is_true(captions[i], val_scenes[i])
    show_image(val_images["images"][i], ax=ax)
    words = captions[i].split()
    ax.set_title(" ".join(words[:4]) + ("\n" + " ".join(words[4:]) if len(words) > 4 else ""), fontsize=8,
                 color="green" if true else "crimson")
fig.suptitle("generated captions of the first 12 validation scenes (green: true of the scene, red: false)",
             fontsize=10)
fig.tight_layout()

# %% [markdown]
# Which of ShapeWorld's templates does the captioner choose, and how often is each true?

# %%
kinds = Counter()
true_by_kind = Counter()
for caption, scene in zip(captions, val_scenes):
    claim = parse_caption(caption)
    kind = "does not parse" if claim is None else type(claim).__name__.replace("Claim", "").lower()
    kinds[kind] += 1
    true_by_kind[kind] += caption_is_true(caption, scene)
table = ["| template | generated | true |", "|---|---:|---:|"]
for kind, n in kinds.most_common():
    table.append(f"| {kind} | {n} | {true_by_kind[kind]} ({true_by_kind[kind] / n:.0%}) |")
display(Markdown("\n".join(table)))

# %% [markdown]
# In the run stored here every generated caption parses (the table has no "does not parse" row): the model
# has learned ShapeWorld's grammar, and what it gets wrong is the grounding. List captions ("there is a green
# square", "there is a magenta circle", ...) are mostly true, relation captions mostly false, and the count
# template of the baseline caption is chosen once. The figure shows the same: six of its seven one-object
# scenes are captioned correctly (the small green circle became "a large yellow triangle"), and every
# two-object scene's caption is false somewhere (a colour or the relation). A relation needs both
# objects *and* their order, read from the box geometry, which 600 steps have not taught; and greedy
# decoding never changes its mind: once "is" is written (step 4 in the table for scene 0, at probability
# 0.64 against 0.34 for "and"), the caption has to be a relation.
#
# ## 6. VQA from the same weights
#
# For understanding, the same transformer reads `[CLS] regions [SEP] question [SEP]` under the
# **bidirectional** mask (segments 0/1), and the answer is read from the elementwise product of two final
# states, $h_{[\mathrm{CLS}]} \odot h_{[\mathrm{SEP}]}$, the `[CLS]` and the `[SEP]` after the regions (the
# paper's VQA input; `encode(batch).pooled`), through the course's `VQAHead` (an MLP over the answer set,
# trained with binary cross-entropy). `course_lib.evaluate.VQAFineTuner` fine-tunes head and transformer
# together on ShapeWorld's questions (exist, count, colour, shape, relation); the baseline is the majority
# answer of the training questions.

# %%
answers = answer_vocabulary(world.config)
majority = Counter(qa_train["answers"].tolist()).most_common(1)[0][0]
majority_acc = (qa_val["answers"] == majority).float().mean().item()
vqa = VQAFineTuner(model, len(answers))
t0 = time.perf_counter()
train(vqa, sampler(qa_train, RUN["batch_size"], seed=7),
      TrainConfig(steps=RUN["finetune_steps"], lr=RUN["lr"], warmup_steps=min(10, RUN["finetune_steps"]),
                  progress=False, log_every=0, device=device, seed=0))
vqa_acc = vqa.accuracy(qa_val)
print(f"fine-tuned {RUN['finetune_steps']} steps in {time.perf_counter() - t0:.1f} s | VQA accuracy on "
      f"{len(qa_val['answers'])} val questions {vqa_acc:.3f} | majority answer '{answers[majority]}' "
      f"{majority_acc:.3f}")
assert_learned(vqa_acc > majority_acc + 0.2, f"VQA accuracy {vqa_acc:.2f} (majority answer {majority_acc:.2f})", SCALE)

# %% [markdown]
# ## 7. The paper's claim: one model serves both
#
# Zhou et al. compare pretraining with the seq2seq mask only (`s2s_prob` 1, `bi_prob` 0), the bidirectional
# mask only (0 / 1) and the mix (0.75 / 0.25), and report that the mix is about as good as seq2seq-only on
# captioning and about as good as bidirectional-only on VQA: unification costs little on either task.
#
# Here, 3 seeds per setting, at a smaller budget than above so that nine runs fit: a **one-object world**
# (short captions, quickly grounded), `claim_steps` pretraining steps of batch `claim_batch_size`, then
# captioning scored as above (straight after pretraining: on ShapeWorld pretraining *is* caption training;
# the paper fine-tunes on COCO with the seq2seq mask first) and VQA after `claim_finetune_steps` steps of
# fine-tuning with the bidirectional mask.

# %%
claim_world = ShapeWorld(WorldConfig(min_objects=1, max_objects=1, seed=0))
CLAIM_CONTEXT, CLAIM_REGIONS = 12, 3
claim_train, claim_train_scenes, _ = caption_pairs("train", RUN["claim_train_scenes"], CLAIM_CONTEXT, CLAIM_REGIONS,
                                                   claim_world)
_, claim_val_scenes, claim_val_images = caption_pairs("val", RUN["claim_val_scenes"], CLAIM_CONTEXT, CLAIM_REGIONS,
                                                      claim_world)
claim_val_images.pop("images")
claim_refs = [list(s.captions) for s in claim_val_scenes]
claim_qa_train = region_source("train", CLAIM_CONTEXT, CLAIM_REGIONS, claim_world).questions(
    range(RUN["claim_train_scenes"]))
claim_qa_val = region_source("val", CLAIM_CONTEXT, CLAIM_REGIONS, claim_world).questions(range(RUN["claim_val_scenes"]))
claim_answers = len(answer_vocabulary(claim_world.config))
SETTINGS = {"seq2seq only (1 / 0)": 1.0, "unified (0.75 / 0.25)": 0.75, "bidirectional only (0 / 1)": 0.0}


def claim_run(s2s_prob, seed):
    """Pretrain one setting, then score its captions and its fine-tuned VQA accuracy."""
    torch.manual_seed(seed)
    net = build_model("unified_vlp", "cpu-tiny", vocab_size=len(tokenizer), context_length=CLAIM_CONTEXT,
                      max_regions=CLAIM_REGIONS, dim=RUN["dim"], heads=RUN["heads"], layers=RUN["layers"],
                      mlp_ratio=RUN["mlp_ratio"], init_std=0.8 / math.sqrt(RUN["dim"]), s2s_prob=s2s_prob,
                      bi_prob=1.0 - s2s_prob)
    train(net, sampler(claim_train, RUN["claim_batch_size"], seed),
          TrainConfig(steps=RUN["claim_steps"], lr=RUN["lr"], warmup_steps=min(10, RUN["claim_steps"]), progress=False,
                      log_every=0, device=device, seed=seed))
    caps = net.generate_captions(claim_val_images, tokenizer)
    result = {**caption_metrics(caps, claim_refs), "truth": caption_truth_rate(caps, claim_val_scenes)}
    tuner = VQAFineTuner(net, claim_answers)
    train(tuner, sampler(claim_qa_train, RUN["claim_batch_size"], seed + 50),
          TrainConfig(steps=RUN["claim_finetune_steps"], lr=RUN["lr"], warmup_steps=min(5, RUN["claim_finetune_steps"]),
                      progress=False, log_every=0, device=device, seed=seed))
    result["VQA"] = tuner.accuracy(claim_qa_val)
    return result


t0 = time.perf_counter()
claim = {name: [claim_run(p, seed) for seed in RUN["seeds"]] for name, p in SETTINGS.items()}
print(f"{len(SETTINGS) * len(RUN['seeds'])} runs in {time.perf_counter() - t0:.1f} s")

# %%
def mean_spread(values):
    return f"{np.mean(values):.3f} ± {np.std(values):.3f}"


claim_base = most_frequent_caption([c for s in claim_train_scenes for c in s.captions])
claim_base_scores = {**caption_metrics([claim_base] * len(claim_val_scenes), claim_refs),
                     "truth": caption_truth_rate([claim_base] * len(claim_val_scenes), claim_val_scenes)}
claim_majority = Counter(claim_qa_train["answers"].tolist()).most_common(1)[0][0]
claim_majority_acc = (claim_qa_val["answers"] == claim_majority).float().mean().item()
metrics = ("CIDEr", "BLEU-4", "truth", "VQA")
table = ["| pretraining masks (s2s / bi) | CIDEr | BLEU-4 | caption truth | VQA accuracy |", "|---|---|---|---|---|"]
for name, runs in claim.items():
    table.append(f"| {name} | " + " | ".join(mean_spread([r[m] for r in runs]) for m in metrics) + " |")
table.append(f"| baselines (most frequent caption; majority answer) | {claim_base_scores['CIDEr']:.3f} | "
             f"{claim_base_scores['BLEU-4']:.3f} | {claim_base_scores['truth']:.3f} | {claim_majority_acc:.3f} |")
display(Markdown("\n".join(table) + "\n\nmean ± standard deviation over seeds " + str(RUN["seeds"])))
for name, runs in claim.items():
    print(f"{name:27s} per seed: " + " | ".join(f"{m} " + ", ".join(f"{r[m]:.2f}" for r in runs) for m in metrics))


def compare(a, b, metric):
    """Setting ``a`` against setting ``b`` on ``metric``: the difference of the means, in words."""
    values_a, values_b = [r[metric] for r in claim[a]], [r[metric] for r in claim[b]]
    diff, spread = np.mean(values_a) - np.mean(values_b), max(np.std(values_a), np.std(values_b), 0.005)
    where = "within the seeds' spread of" if abs(diff) <= spread else "ahead of" if diff > 0 else "behind"
    return diff <= -spread, f"{a} is {where} {b} ({metric} {diff:+.3f}, largest spread ± {spread:.3f})"


unified, s2s_only, bi_only = "unified (0.75 / 0.25)", "seq2seq only (1 / 0)", "bidirectional only (0 / 1)"
lines = []
for task, metric, specialist in (("captioning", "CIDEr", s2s_only), ("VQA", "VQA", bi_only)):
    behind, words = compare(unified, specialist, metric)
    lines.append(f"**Claim, {task}: unified ≈ {specialist}.** {'Did not hold' if behind else 'Held'}: {words}.")
for task, metric, other_only in (("captioning", "CIDEr", bi_only), ("VQA", "VQA", s2s_only)):
    _, words = compare(other_only, unified, metric)
    lines.append(f"*Does the mask matter for {task} at this scale?* {words}.")
display(Markdown("  \n".join(lines)))
assert_learned(np.mean([r["truth"] for r in claim[unified]]) > claim_base_scores["truth"] + 0.05,
               f"unified caption truth {np.mean([r['truth'] for r in claim[unified]]):.2f} (most frequent caption "
               f"{claim_base_scores['truth']:.2f})", SCALE)

# %% [markdown]
# How to read it. The claim has two halves, each tested with a rule fixed before the runs: it **held** unless
# unified is *behind* the specialist by more than the larger standard deviation of the two. The last two
# lines ask the question behind the claim: does the mask a model was pretrained with matter for the task at
# all? In the run stored here:
#
# - **Captioning: the claim did not hold at this budget, narrowly.** Seq2seq only scored a higher CIDEr
#   than unified on seeds 0 and 2 (4.68 against 3.99, 4.40 against 4.28) and unified the higher on seed 1
#   (4.52 against 4.51); the means differ by 0.27, a little more than one standard deviation of three
#   seeds, which is weak evidence. A likely reason: the unified model spends a quarter of its 300 steps
#   under the bidirectional mask, a quarter less practice at writing; the paper's 30 epochs over 3 million
#   captions leave both models far more of it.
# - **Bidirectional only is erratic at captioning.** It was never trained to write from left to right
#   (every `[MASK]` it learned from could see the words after it, and segments 4/5 were never used), yet it is
#   decoded with the seq2seq mask. On two seeds it still captions about as well as the others (CIDEr 3.63 and
#   4.58: one-object captions are predictable from the image and the words before them); on seed 2 none of
#   its captions is true (truth 0.00). The seeds spread so widely that even this mean gap of 0.89 CIDEr is
#   within its standard deviation. The paper fine-tuned every model with the seq2seq mask before scoring
#   captions, which this budget skips.
# - **VQA: the claim held, trivially.** All three settings end between 0.53 and 0.56 after 50 steps of
#   fine-tuning, each within the others' spread: at this budget the pretraining mask makes no measurable
#   difference to VQA, so the test cannot tell the settings apart.
#
# So, at this scale: one model does serve both tasks (unified is far above the captioning baselines and the
# majority answer), the VQA half of the claim held without separating anything, and the captioning half
# missed by about one standard deviation. Whether that gap closes with longer pretraining is the next
# experiment to run (`SCALE = "gpu"`).
#
# ## 8. What Unified VLP teaches
#
# - **The mask is the task.** One set of weights, two masks: seq2seq for generation (the image part is
#   encoded once, without the caption; each word is predicted from the image and the words before it),
#   bidirectional for understanding. The segment ids tell the model which mask it is under.
# - **Generation as a cloze.** No decoder and no separate language-model loss: the masked-token loss on
#   the caption, under the seq2seq mask, *is* left-to-right generation, and decoding repeats it one
#   `[MASK]` at a time.
# - **Score captions for truth, not only n-grams.** BLEU and CIDEr reward the words of the references;
#   on ShapeWorld we can also ask whether a caption is true, and it is the stricter judge.
# - **What came next.** UNIMO (notebook 17) kept the seq2seq mask; SimVLM's PrefixLM is the same mask with
#   the prefix reaching into the text; BLIP and CoCa (notebooks 24, 25) went back to a separate decoder that
#   shares or cross-attends to the encoder.

# %%
print(f"notebook ran in {time.perf_counter() - start_time:.0f} s")

# %% [markdown]
# ## Exercises
#
# **Exercise 1 - the seq2seq mask, batched.** Write `seq2seq_mask(key_valid, source_len)`: `key_valid (B, N)`
# bool (True for a real position), `source_len` an int (the length of `[CLS] regions [SEP]`) → `(B, N, N)`
# bool, True where query `i` may attend to key `j`: every query sees the real keys of the source
# (`j < source_len`); a query in the target also sees the real target keys `j <= i`; a query in the source
# never sees the target. Hint: compare `torch.arange(N)[:, None]` (queries) with `torch.arange(N)[None, :]`
# (keys), then AND with `key_valid[:, None, :]`.

# %% [exercise]
from course_lib.checks.unified_vlp import check_seq2seq_mask


def seq2seq_mask(key_valid, source_len):
    raise NotImplementedError("queries down, keys across: the source for all, the target causally, padding hidden")


check_seq2seq_mask(seq2seq_mask)

# %% [solution]
from course_lib.checks.unified_vlp import check_seq2seq_mask


def seq2seq_mask(key_valid, source_len):
    N = key_valid.shape[1]
    i = torch.arange(N)[:, None]  # (N, 1) queries
    j = torch.arange(N)[None, :]  # (1, N) keys
    visible = (j < source_len) | ((i >= source_len) & (j <= i))  # (N, N): the source for all, the target causally
    return visible[None] & key_valid.bool()[:, None, :]  # (B, N, N), padding keys hidden


check_seq2seq_mask(seq2seq_mask)

# %% [markdown]
# **Exercise 2 - captioning by `[MASK]` prediction.** Write `mask_decode(predict, batch_size, max_len)`, the
# greedy loop of `UnifiedVLP.generate`: start every row with `[CLS]`; at each step call
# `predict(ids)` with `ids (B, t + 2)` = `[CLS] w_1 ... w_t [MASK]` (the words written so far, then
# `[MASK]`), take the arg-max of the returned logits `(B, V)` as the next word; a row that has written
# `[SEP]` writes `[PAD]` from then on; stop when every row has written `[SEP]` or after `max_len` steps.
# Return the written words `(B, T)`, without `[CLS]`. The ids `CLS_ID`, `MASK_ID`, `SEP_ID`, `PAD_ID` are
# imported for you.

# %% [exercise]
from course_lib.checks.unified_vlp import check_mask_decoding
from course_lib.features.text import CLS_ID, MASK_ID, PAD_ID, SEP_ID


def mask_decode(predict, batch_size, max_len):
    raise NotImplementedError("append [MASK], predict it, write the arg-max in its place; stop at [SEP]")


check_mask_decoding(mask_decode)

# %% [solution]
from course_lib.checks.unified_vlp import check_mask_decoding
from course_lib.features.text import CLS_ID, MASK_ID, PAD_ID, SEP_ID


def mask_decode(predict, batch_size, max_len):
    ids = torch.full((batch_size, 1), CLS_ID)
    done = torch.zeros(batch_size, dtype=torch.bool)
    for _ in range(max_len):
        step = torch.cat([ids, torch.full((batch_size, 1), MASK_ID)], dim=1)  # [CLS] w_1 ... w_t [MASK]
        word = predict(step).argmax(-1).masked_fill(done, PAD_ID)  # (B,), [PAD] after [SEP]
        ids = torch.cat([ids, word[:, None]], dim=1)
        done |= word == SEP_ID
        if done.all():
            break
    return ids[:, 1:]


check_mask_decoding(mask_decode)
