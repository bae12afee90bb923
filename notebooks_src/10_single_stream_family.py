# %% [markdown]
# # 10 · The single-stream family: VisualBERT, B2T2, Unicoder-VL, VL-BERT
#
# **What you will build.** The first vision-language BERTs of 2019, the *object-detector era*: an image is
# the set of regions a detector found, and one transformer reads them together with the words. You
# build **VisualBERT** from its parts and check it against Hugging Face `transformers`; then each of
# its siblings as *the one change it made*, trained side by side on the same ShapeWorld regions:
#
# | system | the change | objectives | paper |
# | --- | --- | --- | --- |
# | **VisualBERT** | BERT over `[text; regions]`, a segment embedding tells the modalities apart | MLM + ITM | Li et al. (2019) *VisualBERT: A Simple and Performant Baseline for Vision and Language* |
# | **B2T2** | no region tokens: each box is **summed into the word that names it** | MLM + ITM | Alberti et al. (2019) *Fusion of Detected Objects in Text for Visual Question Answering* |
# | **Unicoder-VL** | regions with their box geometry; **masked object classification** | MLM + MOC + VLM (ITM) | Li et al. (2020) *Unicoder-VL: A Universal Encoder for Vision and Language by Cross-modal Pre-training* |
# | **VL-BERT** | every word also carries the **whole image**; a masked RoI is blanked there too; **no ITM** | MLM + masked RoI classification | Su et al. (2020) *VL-BERT: Pre-training of Generic Visual-Linguistic Representations* |
#
# **The problem they solved.** BERT (Devlin et al. 2019) had shown that one pretrained transformer,
# fine-tuned, beats task-specific architectures on every language task. Vision-and-language tasks (VQA,
# captioning, retrieval, visual commonsense) each had their own hand-built model. These papers asked
# how little must change to make BERT see: a detector (Faster R-CNN, Anderson et al. 2018) turns the
# image into a few dozen "visual words" with features and boxes, and the rest is BERT. They disagreed
# on *where* the visual words enter and on *which* objectives teach the alignment, and two of their
# answers are tested here with 3 seeds each: B2T2's claim that early fusion beats late fusion, and
# VL-BERT's finding that image-text matching did not help.
#
# **Where this sits in the course.** Part I built the parts: region features (notebook 03), the
# single-stream fusion (04), MLM and masked region classification (05), ITM (06). Part II assembles them
# into the systems, one family per notebook; `course_lib.models` holds each system, and
# `python -m course_lib.pretrain --model=visualbert` (or `b2t2`, `unicoder_vl`, `vl_bert`) trains it at
# GPU scale on real region features (see the README).
#
# *Terms in English and Chinese: [glossary](../GLOSSARY.md).*

# %% [parameters]
SCALE = "cpu"  # "cpu": about a minute; "gpu": bigger model, longer run; "smoke": a few steps (what the tests run)

# %%
RUN = {
    "smoke": dict(dim=64, heads=4, layers=1, mlp_ratio=2.0, steps=12, claim_steps=8, finetune_steps=6,
                  batch_size=16, claim_batch_size=16, lr=2e-3, train_scenes=200, val_scenes=60, qa_scenes=100,
                  retrieval_pairs=20, seeds=(0, 1, 2)),
    "cpu": dict(dim=64, heads=4, layers=1, mlp_ratio=2.0, steps=250, claim_steps=120, finetune_steps=60,
                batch_size=64, claim_batch_size=32, lr=2e-3, train_scenes=3000, val_scenes=300, qa_scenes=1000,
                retrieval_pairs=50, seeds=(0, 1, 2)),
    "gpu": dict(dim=256, heads=8, layers=4, mlp_ratio=4.0, steps=3000, claim_steps=1500, finetune_steps=1000,
                batch_size=256, claim_batch_size=256, lr=5e-4, train_scenes=40000, val_scenes=2000, qa_scenes=20000,
                retrieval_pairs=200, seeds=(0, 1, 2)),
}[SCALE]
from course_lib.thresholds import assert_learned  # asserts at SCALE cpu/gpu; reports at smoke
RUN

# %%
import copy
import tempfile
import time

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F
from IPython.display import Markdown, display

from course_lib.utils import count_parameters, get_device, seed_everything

seed_everything(0, threads=2)
from course_lib.data import ShapeWorld, WorldConfig
from course_lib.data.datasets import build_tokenizer
from course_lib.data.language import QUESTION_TYPES, answer_vocabulary
from course_lib.data.regions import ShapeWorldRegions, blank_boxes, whole_image_features
from course_lib.evaluate import VQAFineTuner, chance_recall_at_k, fused_retrieval
from course_lib.features.text import MASK_ID, SEP_ID
from course_lib.models.registry import build_model
from course_lib.train import TrainConfig, train
from course_lib.viz import draw_boxes, plot_losses, show_image

device = get_device()
start_time = time.perf_counter()

# %% [markdown]
# ## 1. Data: ShapeWorld through a detector
#
# Scenes of one or two objects (a smaller world than Part I's two or three: these systems learn matching
# only after a few hundred steps, and this keeps them inside a minute), each with its canonical caption
# ("a small green circle and a large yellow square", objects left to right). The image side is what
# the 2019 models saw: ShapeWorld's **simulated detector** (notebook 05) proposes boxes, misses an
# object now and then, invents a false positive, and gives each box a soft class distribution over the
# 18 (colour, shape) classes plus "no object". `course_lib.data.regions.ShapeWorldRegions` turns scenes
# into the **region batch** every system here reads; its keys are the same as the ones
# `course_lib.data.region_shards` reads from real bottom-up-attention features:
#
# - `region_feats (B, R, 108)`: RoIAlign of the pixels in each box on a $6 \times 6$ grid (the stand-in for
#   the detector's 2048-d vector), `region_boxes (B, R, 4)` normalised corners, `region_mask (B, R)`;
# - `region_labels (B, R)` and `region_probs (B, R, 19)`: the detector's top class and distribution (the
#   targets of masked region classification);
# - `image_feat (B, 108)`: the whole image pooled like one region (B2T2's `[IMAGE]`, VL-BERT's text tokens);
# - `token_box (B, L)`: which region a word names, B2T2's token-box matrix (section 4).

# %%
world = ShapeWorld(WorldConfig(min_objects=1, max_objects=2, seed=0))
tokenizer = build_tokenizer(world, vocab_size=128, num_scenes=300)
CONTEXT, MAX_REGIONS = 20, 4  # longest question: 17 tokens; at most 2 objects + false positives


def region_source(split):
    return ShapeWorldRegions(world, tokenizer, CONTEXT, max_regions=MAX_REGIONS, split=split, caption="description")


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


# %%
# NBVAL_CHECK_OUTPUT
print("train scenes", len(train_data["input_ids"]), "| val scenes", len(val_data["input_ids"]),
      "| vocabulary", len(tokenizer))
for key in ("input_ids", "region_feats", "region_boxes", "region_mask", "region_probs", "image_feat", "token_box"):
    print(f"{key:15s}", tuple(train_data[key].shape))
print("regions per image: mean", round(train_data["region_mask"].sum(1).float().mean().item(), 2))

# %%
k = 0  # the first validation scene, followed through the notebook
class_names = [world.config.class_name(c) for c in range(world.num_classes)]
mask_k = val_data["region_mask"][k]
tokens_k = tokenizer.convert_ids_to_tokens(val_data["input_ids"][k][val_data["attention_mask"][k].bool()])
refs_k = val_data["token_box"][k][: len(tokens_k)].tolist()
fig, ax = plt.subplots(figsize=(3.2, 3.2))
draw_boxes(show_image(val_data["images"][k], ax=ax, title="detected regions"),
           val_data["region_boxes"][k][mask_k] * 32,
           [f"{r}: {class_names[c]}" if c >= 0 else f"{r}: ?" for r, c in enumerate(val_data["region_labels"][k][mask_k].tolist())])
plt.show()
print("caption tokens and the region each names (B2T2's token-box references):")
print("  ".join(f"{t}" + (f"→{r}" if r >= 0 else "") for t, r in zip(tokens_k, refs_k)))

# %% [markdown]
# The detector's boxes carry its top class; a caption's shape words point to the region detected from
# that object (an object the detector missed points nowhere).
#
# ## 2. VisualBERT, from its parts
#
# VisualBERT is BERT with a second kind of input token. A caption token is embedded as in BERT,
# $x_i = w_i + p_i + s_A$ (word, position, segment A); a region $j$ with detector feature $f_j$ becomes
# $x_j = W f_j + b + s_{V}$: a linear projection into the word space plus the visual segment vector, and
# *no* position (the same position for every region: a set has no order). The two sequences are
# concatenated, normalised, and read by an ordinary BERT with **merged attention**, every token attending
# to every token of both modalities (notebook 04):
#
# $$h = \mathrm{BERT}\big(\mathrm{LN}([x_1 \ldots x_L;\; x_{L+1} \ldots x_{L+R}])\big)$$
#
# The pretraining heads are BERT's: an MLM head on the caption tokens (tied to the word embeddings) and
# a "does this sentence match this image?" head on the pooled `[CLS]` (ITM, "sentence-image prediction"
# in the paper; its negatives are pairs whose regions come from another image of the batch). Below,
# the input embedding written out by hand, checked against `course_lib.models.visualbert`, then the
# whole model checked against `transformers`' own `VisualBertForPreTraining` with the same weights.

# %%
torch.manual_seed(0)
visualbert = build_model("visualbert", "cpu-tiny", vocab_size=len(tokenizer), context_length=CONTEXT,
                         layers=RUN["layers"], dim=RUN["dim"], heads=RUN["heads"], mlp_ratio=RUN["mlp_ratio"])


def visualbert_input(model, input_ids, region_feats):
    """VisualBERT's input sequence, by hand: ``(B, L)`` ids, ``(B, R, F)`` features -> ``(B, L + R, D)``."""
    fusion = model.fusion
    L = input_ids.shape[1]
    text = model.word_embeddings.weight[input_ids] + fusion.position_embeddings.weight[:L] + fusion.type_embeddings.weight[0]
    image = region_feats @ model.visual_projection.weight.T + model.visual_projection.bias + fusion.type_embeddings.weight[1]
    x = torch.cat([text, image], dim=1)  # (B, L + R, D)
    return F.layer_norm(x, x.shape[-1:], fusion.embed_norm.weight, fusion.embed_norm.bias, fusion.embed_norm.eps)


batch = rows(val_data, torch.arange(8))
ours = visualbert_input(visualbert, batch["input_ids"], batch["region_feats"])
library = visualbert.fusion.embed(visualbert.word_embeddings(batch["input_ids"]),
                                  visualbert.visual_projection(batch["region_feats"]))
torch.testing.assert_close(ours, library)

from transformers import VisualBertConfig, VisualBertForPreTraining

from course_lib.models.visualbert import from_transformers, to_transformers

hf_config = VisualBertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                             intermediate_size=64, visual_embedding_dim=108, max_position_embeddings=CONTEXT,
                             hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
torch.manual_seed(1)
hf_model = VisualBertForPreTraining(hf_config).eval()  # built from a config: no download


def hf_logits(hf, batch):
    with torch.no_grad():
        out = hf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                 visual_embeds=batch["region_feats"], visual_attention_mask=batch["region_mask"].long())
    return out.prediction_logits[:, : batch["input_ids"].shape[1]], out.seq_relationship_logits


def course_logits(model, batch):
    model.eval()
    with torch.no_grad():
        out = model.encode(batch)
        return model.mlm_head(out.text), model.itm_head(out.pooled)


copied = from_transformers(hf_model)
for theirs, mine in zip(hf_logits(hf_model, batch), course_logits(copied, batch)):
    torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=1e-5)

# %%
# NBVAL_CHECK_OUTPUT
print("our input embedding equals course_lib's VisualBERT:", True)
print("course_lib VisualBERT with transformers' weights gives its MLM and ITM logits (atol 1e-5):", True)
print("VisualBERT parameters:", count_parameters(visualbert))

# %% [markdown]
# The parity check covers the pretraining heads too: with `transformers`' weights copied in, our model
# gives the same masked-word logits and the same matched/not-matched logits (within $10^{-5}$, float32
# arithmetic in another order). Section 8 goes the other way and exports a trained course model.
#
# ## 3. Four systems, side by side
#
# Each sibling is a `course_lib.models.region_bert.RegionBert` with its own `embed` (how words and
# regions become input tokens) and its own objectives, at the same size and trained on the same batches:
#
# - **B2T2** (section 4): the caption alone is the sequence; boxes are added *into* the words;
# - **Unicoder-VL** (section 5): regions embedded with their 5-d box geometry ($x_1, y_1, x_2, y_2$,
#   area), as ViLBERT does; plus **MOC**, masked object classification: 15% of the regions have their
#   feature set to zero and the model predicts the detector's label of each;
# - **VL-BERT** (section 6): every token is a *linguistic* part plus a *visual* part; a word's visual part
#   is the whole image, a region's linguistic part a learned `[IMG]` token; masked RoI classification
#   against the detector's soft distribution, and no ITM.
#
# MLM and the region loss are scored on matched pairs only (a masked word of a caption that belongs to
# another image cannot be recovered from this one), and every caption is masked, matched or not, or
# the ITM head could tell the pairs apart by the presence of `[MASK]`. (The first version of
# `region_bert` masked only the matched captions; ITM reached a loss of 0.3 while scoring retrieval at
# chance: a textbook shortcut.)

# %%
SIZE = dict(vocab_size=len(tokenizer), context_length=CONTEXT, layers=RUN["layers"], dim=RUN["dim"],
            heads=RUN["heads"], mlp_ratio=RUN["mlp_ratio"])
SYSTEMS = ("visualbert", "b2t2", "unicoder_vl", "vl_bert")


def pretrain(name, seed=0, steps=None, batch_size=None, **overrides):
    """``name`` at the notebook's size, pretrained from scratch on ShapeWorld regions -> (model, history)."""
    torch.manual_seed(seed)
    model = build_model(name, "cpu-tiny", **SIZE, **overrides)
    steps = steps or RUN["steps"]
    history = train(model, sampler(train_data, batch_size or RUN["batch_size"], seed),
                    TrainConfig(steps=steps, lr=RUN["lr"], warmup_steps=min(20, steps), seed=seed, progress=False,
                                log_every=0, device=device))
    return model.cpu().eval(), history


models, histories = {}, {}
for name in SYSTEMS:
    models[name], histories[name] = pretrain(name)

# %%
fig, axes = plt.subplots(1, 3, figsize=(13, 3.2))
for key, ax in zip(("mlm", "itm", "mrc"), axes):
    runs = {n: h for n, h in histories.items() if key in h.records[0]}
    plot_losses(runs, ax=ax, smooth=0.9, key=key)
    ax.set_title({"mlm": "MLM (masked words)", "itm": "ITM (matched or not)", "mrc": "masked region classification"}[key])
axes[1].axhline(np.log(2), color="grey", ls=":", lw=1)
plt.tight_layout()
plt.show()

# %% [markdown]
# Three objectives, four systems (a system appears in a panel when it has that objective). The grey line
# in the ITM panel is $\ln 2$, the loss of a constant 50/50 guess: ITM sits on it for its first steps
# (a matching signal is a *product* of a text feature and an image feature, both small at the start),
# then leaves it. What each system has learned, on validation scenes it never saw:
#
# - **MLM on grounded words**: the accuracy on masked colour and shape words, and the same with the image
#   swapped for another one (a *control*: a model that reads the image must fall towards chance);
# - **retrieval** for the systems pretrained with ITM: rank the captions for each image by the ITM head
#   (`course_lib.evaluate.fused_retrieval`, every image scored with every caption);
# - **masked region classification** for Unicoder-VL and VL-BERT: the detector's label of a hidden
#   region, against predicting the most frequent class.

# %%
COLOR_IDS = [tokenizer.convert_tokens_to_ids(c) for c in world.config.colors]
SHAPE_IDS = [tokenizer.convert_tokens_to_ids(s) for s in world.config.shapes]
GROUNDED = torch.tensor(COLOR_IDS + SHAPE_IDS)


@torch.no_grad()
def grounded_word_accuracy(model, data, swap_images=False):
    """Masking one colour or shape word per caption at a time: accuracy of the MLM head."""
    data = dict(data)
    if swap_images:  # each caption with the next scene's regions
        for key in ("region_feats", "region_boxes", "region_mask", "region_labels", "region_probs", "image_feat", "images"):
            data[key] = data[key].roll(1, 0)
        data["token_box"] = torch.full_like(data["token_box"], -1)
    ids = data["input_ids"]
    hits, total = 0, 0
    for col in range(ids.shape[1]):
        target = ids[:, col]
        rows_ = torch.isin(target, GROUNDED)
        if not rows_.any():
            continue
        masked = ids[rows_].clone()
        masked[:, col] = MASK_ID
        out = model.encode(dict(rows(data, rows_), input_ids=masked))
        pred = model.mlm_head(out.text[:, col])  # (n, V)
        hits += (pred.argmax(-1) == target[rows_]).sum().item()
        total += int(rows_.sum())
    return hits / total


@torch.no_grad()
def region_class_accuracy(model, data, captions=None):
    """Hide one labelled region per image (the first); accuracy of the region head on its label.
    ``captions``: replace the captions (e.g. the next scene's)."""
    data = dict(data) if captions is None else dict(data, **captions)
    labelled = data["region_labels"][:, 0] >= 0
    data = rows(data, labelled)
    hidden = torch.zeros_like(data["region_mask"])
    hidden[:, 0] = True
    out = model.encode(data, hidden_regions=hidden)
    pred = model.mrc_head(out.image[:, 0])[:, :-1]  # the object classes ("no object" is never a label)
    return (pred.argmax(-1) == data["region_labels"][:, 0]).float().mean().item()


label_counts = torch.bincount(train_data["region_labels"][train_data["region_mask"] & (train_data["region_labels"] >= 0)],
                              minlength=world.num_classes)
majority_class = label_counts.float().max().item() / label_counts.sum().item()
is_grounded = torch.isin(val_data["input_ids"], GROUNDED)
share_colour = torch.isin(val_data["input_ids"], torch.tensor(COLOR_IDS)).sum() / is_grounded.sum()
grounded_chance = (share_colour / 6 + (1 - share_colour) / 3).item()  # a guess among the colours or the shapes
retrieval_val = rows(val_data, torch.arange(RUN["retrieval_pairs"]))
retrieval_chance = chance_recall_at_k(torch.arange(RUN["retrieval_pairs"]), (1, 5))

results = {}
for name, model in models.items():
    r = {"MLM grounded words": grounded_word_accuracy(model, val_data),
         "  with the wrong image": grounded_word_accuracy(model, val_data, swap_images=True)}
    if model.config.itm_weight > 0:
        r["retrieval R@1 (zero-shot)"] = fused_retrieval(model, retrieval_val, (1,))["mean_recall"]
    if model.config.mrc_weight > 0:
        r["masked region class"] = region_class_accuracy(model, val_data)
    results[name] = r

# %%
rows_md = ["| | " + " | ".join(SYSTEMS) + " | chance |", "|---" * (len(SYSTEMS) + 2) + "|"]
chance = {"MLM grounded words": grounded_chance, "  with the wrong image": grounded_chance,
          "retrieval R@1 (zero-shot)": retrieval_chance["i2t_R@1"], "masked region class": majority_class}
for metric, level in chance.items():
    cells = [f"{results[n][metric]:.2f}" if metric in results[n] else "—" for n in SYSTEMS]
    rows_md.append(f"| {metric.strip()}{' (control)' if metric.startswith('  ') else ''} | " + " | ".join(cells) + f" | {level:.2f} |")
display(Markdown("\n".join(rows_md)))
for name in SYSTEMS:
    assert_learned(results[name]["MLM grounded words"] > grounded_chance + 0.15,
                   f"{name}: grounded-word MLM {results[name]['MLM grounded words']:.2f} (chance {grounded_chance:.2f})", SCALE)
    assert_learned(results[name]["  with the wrong image"] < results[name]["MLM grounded words"] - 0.1,
                   f"{name}: MLM does not use the image (control {results[name]['  with the wrong image']:.2f})", SCALE)
for name in ("visualbert", "b2t2"):
    assert_learned(results[name]["retrieval R@1 (zero-shot)"] > 5 * retrieval_chance["i2t_R@1"],
                   f"{name}: retrieval R@1 {results[name]['retrieval R@1 (zero-shot)']:.2f} "
                   f"(chance {retrieval_chance['i2t_R@1']:.2f})", SCALE)
for name in ("unicoder_vl", "vl_bert"):
    assert_learned(results[name]["masked region class"] > majority_class + 0.3,
                   f"{name}: masked region class {results[name]['masked region class']:.2f} "
                   f"(most frequent class {majority_class:.2f})", SCALE)

# %%
def describe_results():
    r = results
    lines = [f"- **Every system grounds its words**: a masked colour or shape word is recovered "
             f"{min(r[n]['MLM grounded words'] for n in SYSTEMS):.2f}–{max(r[n]['MLM grounded words'] for n in SYSTEMS):.2f} "
             f"of the time, and {max(r[n]['  with the wrong image'] for n in SYSTEMS):.2f} at most with another scene's "
             f"regions (chance {grounded_chance:.2f}): the words are predicted from the image, not from the caption alone."]
    best = max(SYSTEMS, key=lambda n: r[n]["MLM grounded words"])
    lines.append(f"- **{best}** grounds words best in this budget.")
    itm = {n: r[n]["retrieval R@1 (zero-shot)"] for n in SYSTEMS if "retrieval R@1 (zero-shot)" in r[n]}
    low = [n for n, v in itm.items() if v < 3 * retrieval_chance["i2t_R@1"]]
    if low:
        lines.append(f"- **Retrieval by the ITM head**: {', '.join(low)} did not leave chance in {RUN['steps']} steps "
                     "(its ITM curve above is still near the ln 2 line); section 7 gives every system the same "
                     "ITM fine-tuning budget.")
    return "\n".join(lines)


display(Markdown(describe_results()))

# %% [markdown]
# ## 4. B2T2: boxes inside the words
#
# B2T2 asked a different question: why add the regions as extra tokens at all? A caption already says
# which objects matter, so put each box's feature **into the embedding of the word that refers to it**.
# The input is the text `[CLS] [IMAGE] caption [SEP]` and, after BERT's embedding $e_t$ (word + position +
# segment, LayerNorm):
#
# $$e_t \;\leftarrow\; e_t + \tanh\Big(W \sum_k M_{tk}\, f_k + b\Big), \qquad M_{tk} = 1 \text{ if token } t \text{ names box } k$$
#
# with $M$ the 0/1 **token-box matrix** and the whole image's feature at `[IMAGE]`. Then a plain BERT over
# the text. In the paper's data (VCR) the questions reference boxes explicitly ("is [1] happy?"); in
# ShapeWorld a caption's shape word names an object, and the region detected from that object is its box
# (`token_box` in the batch). That is **early fusion**: the image is in the transformer's input. The
# paper's baseline is **late fusion**, a dual encoder: BERT reads the text alone and meets the image
# only at the end, $s = \mathrm{pooled} \cdot \tanh(W f_{\text{image}} + b)$. The paper found early
# fusion clearly better on VCR. Here is the matrix, by hand, against `course_lib.models.b2t2`:

# %%
def token_box_matrix(token_box, num_regions):
    """B2T2's 0/1 token-box matrix ``M (B, L, R)`` from ``token_box (B, L)`` (-1: the token names no box)."""
    M = torch.zeros(*token_box.shape, num_regions)
    b, t = (token_box >= 0).nonzero(as_tuple=True)
    M[b, t, token_box[b, t]] = 1.0
    return M


M = token_box_matrix(batch["token_box"], MAX_REGIONS)
torch.testing.assert_close(M, models["b2t2"].token_box_matrix(batch))

fig, ax = plt.subplots(figsize=(6, 2.2))
n_tokens = len(tokens_k)
ax.imshow(M[k, :n_tokens].T, cmap="Greens", aspect="auto", vmin=0, vmax=1)
ax.set_xticks(range(n_tokens), tokens_k, rotation=60, fontsize=8)
ax.set_yticks(range(MAX_REGIONS), [f"region {r}" for r in range(MAX_REGIONS)], fontsize=8)
ax.set_title("token-box matrix M of the example caption (green: the token names that region)", fontsize=9)
plt.show()

# %% [markdown]
# Each shape word has exactly one green cell: its region's feature is added to it. Every other word gets
# $\tanh(b)$ (zero at initialisation), and `[IMAGE]` (not drawn) the whole image. Now the claim, three
# seeds each, early against late fusion at the same budget (`claim_steps` steps, batch `claim_batch_size`),
# scored on validation pairs by ITM (half the pairs matched, half with another scene's regions; chance
# 0.5) and by retrieval R@1:

# %%
@torch.no_grad()
def itm_accuracy(model, data):
    """ITM on every validation scene twice: with its own regions (label 1) and the next scene's (0)."""
    n = len(data["input_ids"])
    from course_lib.evaluate import pair_batch

    own = pair_batch(data, torch.arange(n), torch.arange(n))
    other = pair_batch(data, torch.arange(n).roll(1), torch.arange(n))
    model.eval()
    predicted = torch.cat([model.itm_logits(own).argmax(-1), model.itm_logits(other).argmax(-1)])
    return (predicted == torch.cat([torch.ones(n), torch.zeros(n)])).float().mean().item()


def mean_spread(values):
    return f"{np.mean(values):.3f} ± {np.std(values):.3f}"


claim_b2t2 = {fusion: {"ITM accuracy": [], "retrieval R@1": []} for fusion in ("early", "late")}
for fusion in ("early", "late"):
    for seed in RUN["seeds"]:
        model, _ = pretrain("b2t2", seed=seed, steps=RUN["claim_steps"], batch_size=RUN["claim_batch_size"], fusion=fusion)
        claim_b2t2[fusion]["ITM accuracy"].append(itm_accuracy(model, val_data))
        claim_b2t2[fusion]["retrieval R@1"].append(fused_retrieval(model, retrieval_val, (1,))["mean_recall"])

# %%
table = ["| B2T2 | ITM accuracy (chance 0.5) | retrieval R@1 (chance %.2f) |" % retrieval_chance["i2t_R@1"], "|---|---|---|"]
for fusion, scores in claim_b2t2.items():
    table.append(f"| {fusion} fusion | {mean_spread(scores['ITM accuracy'])} | {mean_spread(scores['retrieval R@1'])} |")
display(Markdown("\n".join(table)))
early, late = (np.mean(claim_b2t2[f]["ITM accuracy"]) for f in ("early", "late"))
held = min(claim_b2t2["early"]["ITM accuracy"]) > max(claim_b2t2["late"]["ITM accuracy"])
if held:
    verdict = "held on ShapeWorld: every early-fusion seed beat every late-fusion seed"
elif early > late:
    verdict = "pointed the same way on ShapeWorld, but the seeds overlap, so this budget does not settle it"
else:
    verdict = "did not hold on ShapeWorld: late fusion scored as well or better"
display(Markdown(f"**The paper's claim {verdict}** (ITM {early:.3f} early against {late:.3f} late, means of 3 seeds)."))
assert_learned(early > 0.6, f"B2T2 early fusion ITM accuracy {early:.2f} (chance 0.5)", SCALE)

# %% [markdown]
# The argument for early fusion: a late-fusion model must compress the caption into one vector *before* it
# sees the image, and then compare it with one vector of the image: "a red circle and a blue square"
# against "a blue circle and a red square" differ only in which colour goes with which shape, and a dot
# product of two summaries cannot bind them. With the boxes inside the words, attention can ask "is the
# box under *circle* red?" directly.
#
# ## 5. Unicoder-VL: masked object classification
#
# Unicoder-VL (no official code; the recipe is the paper's) is VisualBERT with ViLBERT's region
# embedding, $\mathrm{LN}(W_f f + W_g g)$ with the 5-d geometry $g = (x_1, y_1, x_2, y_2, \text{area})$,
# and a third objective, **MOC**: hide 15% of the regions by setting their features to zero *after* the
# detector (the box stays: the model knows *where*, not *what*), and predict each hidden region's
# detected label with a cross-entropy:
#
# $$\mathcal{L}_{\mathrm{MOC}} = -\frac{1}{|H|}\sum_{j \in H} \log P_\theta\big(c_j \,\big|\, w,\; v_{\setminus H}\big)$$
#
# (the hard-label version of notebook 05's MRC). By hand, against the library:

# %%
unicoder = models["unicoder_vl"]
hidden = torch.zeros_like(batch["region_mask"])
hidden[:, 0] = True  # hide the first region of every image
zeroed = dict(batch, region_feats=batch["region_feats"].masked_fill(hidden[..., None], 0.0))
with torch.no_grad():
    out = unicoder.encode(zeroed)  # the features are zero: nothing of the hidden region but its box
    logits = unicoder.mrc_head(out.image)  # (B, R, C + 1)
    scored = hidden & (batch["region_labels"] >= 0)
    moc = F.cross_entropy(logits[scored], batch["region_labels"][scored])
    library_moc = unicoder.region_class_loss(unicoder.encode(batch, hidden_regions=hidden).image, batch, scored)
torch.testing.assert_close(moc, library_moc)

# %%
# NBVAL_CHECK_OUTPUT
print("our MOC loss equals course_lib's Unicoder-VL region_class_loss:", True)

# %%
captions_next = {"input_ids": val_data["input_ids"].roll(1, 0), "attention_mask": val_data["attention_mask"].roll(1, 0),
                 "token_box": torch.full_like(val_data["token_box"], -1)}
moc_true = region_class_accuracy(unicoder, val_data)
moc_wrong = region_class_accuracy(unicoder, val_data, captions_next)

# %%
print(f"Unicoder-VL: label of a hidden region {moc_true:.2f} with the true caption, {moc_wrong:.2f} with "
      f"another scene's caption (most frequent class {majority_class:.2f})")

# %% [markdown]
# With its feature gone, the only evidence for the hidden region's class is the caption (and the other
# regions, which show *other* objects): the accuracy with another scene's caption measures how much of
# MOC the caption carries, and the gap is the cross-modal part of the objective.
#
# ## 6. VL-BERT: the whole image in every word, and no peeking
#
# VL-BERT writes every input element as a **linguistic part + a visual part** (+ segment + position):
#
# - a caption word: its word embedding + the **whole image**, pooled like one more region;
# - a region: a learned `[IMG]` token + its feature and box; every region has the **same position**;
# - the visual parts pass a LayerNorm whose gain starts at **0**: the model starts as a text BERT and
#   learns the image in.
#
# Its region objective classifies a masked RoI against the detector's *soft* distribution. And here is
# the catch the paper had to fix: if a region is masked but the **whole-image** feature (added to every
# word) was pooled from the original pixels, the masked object is still visible there, and the model can
# *peek*: it learns to read the class from the whole image instead of from the caption. VL-BERT sets the
# masked box's pixels to zero **before** the whole image is pooled (`MASK_RAW_PIXELS`;
# `course_lib.data.regions.blank_boxes`, exercise 1 writes it). The leak and the fix, on the example
# scene:

# %%
vl_bert = models["vl_bert"]
images_k = val_data["images"][k:k + 1].float() / 255
hide_k = torch.zeros(1, MAX_REGIONS, dtype=torch.bool)
hide_k[0, 0] = True
blanked_k = blank_boxes(images_k, val_data["region_boxes"][k:k + 1], hide_k)
fig, axes = plt.subplots(1, 3, figsize=(9.5, 3))
show_image(images_k[0], ax=axes[0], title="image: region 0 is masked")
show_image(blanked_k[0], ax=axes[1], title="what the whole-image token sees (fixed)")
change = (whole_image_features(images_k) - whole_image_features(blanked_k)).abs().view(3, 6, 6).sum(0)
axes[2].imshow(change, cmap="magma")
axes[2].set_title("|change| of the whole-image feature\n(6 x 6 bins, summed over colour)", fontsize=9)
axes[2].axis("off")
plt.tight_layout()
plt.show()

# %% [markdown]
# Left, the image with its masked region; middle, the pixels the fixed model pools for the whole-image
# token; right, where the whole-image feature changed: exactly the bins that covered the hidden object.
# Is the hidden object's class really readable there? A **linear probe** (a softmax regression trained on
# the training scenes) predicts the class of region 0 from the whole-image feature alone, pooled from the
# original pixels (the leak) or with region 0 blanked (the fix):

# %%
def whole_image_with_region0(data, blank_it):
    """``(N, 108)`` whole-image features, region 0 blanked or not, for the scenes whose region 0 has a label."""
    keep = data["region_labels"][:, 0] >= 0
    images = data["images"][keep].float() / 255
    if blank_it:
        hide = torch.zeros(int(keep.sum()), MAX_REGIONS, dtype=torch.bool)
        hide[:, 0] = True
        images = blank_boxes(images, data["region_boxes"][keep], hide)
    return whole_image_features(images), data["region_labels"][keep, 0]


def probe_accuracy(blank_it):
    x, y = whole_image_with_region0(train_data, blank_it)
    x_val, y_val = whole_image_with_region0(val_data, blank_it)
    probe = torch.nn.Linear(x.shape[1], world.num_classes)
    optimizer = torch.optim.Adam(probe.parameters(), lr=0.05)
    for _ in range(150):
        optimizer.zero_grad()
        F.cross_entropy(probe(x), y).backward()
        optimizer.step()
    return (probe(x_val).argmax(-1) == y_val).float().mean().item()


torch.manual_seed(0)
probe_leak, probe_fixed = probe_accuracy(False), probe_accuracy(True)

# %%
print(f"linear probe, class of region 0 from the whole-image feature: {probe_leak:.2f} from the original pixels, "
      f"{probe_fixed:.2f} with region 0 blanked (most frequent class {majority_class:.2f})")

# %% [markdown]
# That is the leak: without blanking, the whole-image token, added to every word, carries the class of
# the masked region, and a model can learn to read it from there instead of from the caption and the
# context. With blanking, what remains is the other objects (and the object's absence). Does our small
# model actually exploit it? Train VL-BERT once more with the fix turned off (`blank_masked=False`), then
# ask both models for the class of a hidden region, with the true caption and with another scene's caption:

# %%
leaky, leaky_history = pretrain("vl_bert", blank_masked=False)
peek = {}
for label, model in (("fixed (VL-BERT)", vl_bert), ("leaky (no blanking)", leaky)):
    peek[label] = (region_class_accuracy(model, val_data), region_class_accuracy(model, val_data, captions_next))

# %%
table = [f"| VL-BERT | masked RoI class, true caption | with another scene's caption | most frequent class |", "|---|---|---|---|"]
for label, (true, wrong_) in peek.items():
    table.append(f"| {label} | {true:.2f} | {wrong_:.2f} | {majority_class:.2f} |")
display(Markdown("\n".join(table)))
fixed_drop = peek["fixed (VL-BERT)"][0] - peek["fixed (VL-BERT)"][1]
leaky_drop = peek["leaky (no blanking)"][0] - peek["leaky (no blanking)"][1]
peeks = peek["leaky (no blanking)"][1] > majority_class + 0.1
display(Markdown(
    f"With another scene's caption the fixed model falls to {peek['fixed (VL-BERT)'][1]:.2f} and the leaky one to "
    f"{peek['leaky (no blanking)'][1]:.2f}: " +
    ("the leaky model still finds the hidden object in the whole-image token: it learned to peek, and its "
     "region objective teaches it correspondingly less about the caption." if peeks else
     "in this budget the leaky model did **not** learn to peek, so the fix made no measurable difference "
     "here; the probe shows the information it closes off. (One difference that may matter: the whole-image "
     "token enters through a LayerNorm whose gain starts at 0; we did not test why the model ignores it.)")))

# %% [markdown]
# **VL-BERT's finding: no ITM.** The paper tried adding "sentence-image relationship prediction" (ITM)
# and found that it *lowered* VCR, VQA and RefCOCO+ accuracy, so VL-BERT pretrains with MLM and masked
# RoI classification only. We test it the way the paper measured it: pretrain with and without ITM
# (3 seeds each, `claim_steps` steps), fine-tune each on ShapeWorld VQA for `finetune_steps` steps, and
# compare VQA accuracy. The questions ("what color is the circle?", "how many squares are there?", "is
# there a red triangle?", "is the small circle left of the square?") come with their scenes' regions
# (`ShapeWorldRegions.questions`); the answer is one of 14 classes.

# %%
qa_source = region_source("train")
train_qa = qa_source.questions(range(RUN["qa_scenes"]))
val_qa = region_source("val").questions(range(RUN["val_scenes"]))
ANSWERS = answer_vocabulary(world.config)
majority_answer = torch.bincount(train_qa["answers"], minlength=len(ANSWERS)).argmax()
vqa_majority = (val_qa["answers"] == majority_answer).float().mean().item()


def finetune_vqa(model, seed=0):
    """VQA accuracy on validation questions after ``finetune_steps`` steps of fine-tuning (a fresh head)."""
    torch.manual_seed(seed)
    tuner = VQAFineTuner(model, len(ANSWERS))
    train(tuner, sampler(train_qa, RUN["batch_size"], seed + 7),
          TrainConfig(steps=RUN["finetune_steps"], lr=RUN["lr"], warmup_steps=min(10, RUN["finetune_steps"]),
                      seed=seed, progress=False, log_every=0, device=device))
    return tuner.cpu().accuracy(val_qa)


claim_vl = {"no ITM (VL-BERT)": [], "with ITM": []}
for label, itm_weight in (("no ITM (VL-BERT)", 0.0), ("with ITM", 1.0)):
    for seed in RUN["seeds"]:
        model, _ = pretrain("vl_bert", seed=seed, steps=RUN["claim_steps"], batch_size=RUN["claim_batch_size"],
                            itm_weight=itm_weight)
        claim_vl[label].append(finetune_vqa(model, seed))

# %%
table = [f"| VL-BERT pretraining | VQA accuracy after fine-tuning (majority answer {vqa_majority:.2f}) |", "|---|---|"]
for label, scores in claim_vl.items():
    table.append(f"| {label} | {mean_spread(scores)} |")
display(Markdown("\n".join(table)))
no_itm, with_itm = (np.mean(v) for v in claim_vl.values())
spread = max(np.std(v) for v in claim_vl.values())
verdict = ("held: pretraining without ITM gave the better VQA model" if no_itm - with_itm > spread else
           "did not reproduce: ITM made VQA better" if with_itm - no_itm > spread else
           "could not be decided here: the difference is within the seeds' spread")
display(Markdown(f"**VL-BERT's finding {verdict}** ({no_itm:.3f} without ITM, {with_itm:.3f} with; "
                 f"largest spread ± {spread:.3f})."))
assert_learned(min(no_itm, with_itm) > vqa_majority + 0.1,
               f"VL-BERT VQA {min(no_itm, with_itm):.2f} (majority answer {vqa_majority:.2f})", SCALE)

# %% [markdown]
# ## 7. The four on the same downstream tasks
#
# Every system, pretrained in section 3, fine-tuned the same way: **VQA** (a fresh `VQAHead` on the pooled
# output, `finetune_steps` steps, `course_lib.evaluate.VQAFineTuner`) and **retrieval** (ITM fine-tuned
# for `finetune_steps` steps with random negatives, every caption and image unmasked, then
# `fused_retrieval`: VL-BERT has no ITM head from pretraining, so every system gets the same ITM
# budget). Chance is printed beside each column.

# %%
def finetune_itm(model, seed=0):
    """Retrieval R@1 after ``finetune_steps`` steps of ITM alone (MLM and region losses off)."""
    tuned = copy.deepcopy(model)
    tuned.config = type(model.config)(**{**model.config.__dict__, "mlm_weight": 0.0, "itm_weight": 1.0,
                                         "mrc_weight": 0.0})
    train(tuned, sampler(train_data, RUN["batch_size"], seed + 11),
          TrainConfig(steps=RUN["finetune_steps"], lr=RUN["lr"], warmup_steps=min(10, RUN["finetune_steps"]),
                      seed=seed, progress=False, log_every=0, device=device))
    return fused_retrieval(tuned.cpu(), retrieval_val, (1, 5))


downstream = {}
for name in SYSTEMS:
    downstream[name] = {"VQA": finetune_vqa(copy.deepcopy(models[name]))}
    downstream[name].update(finetune_itm(models[name]))

# %%
table = ["| system | VQA accuracy | retrieval R@1 (mean of both directions) | R@5 |", "|---|---|---|---|"]
for name in SYSTEMS:
    d = downstream[name]
    table.append(f"| {name} | {d['VQA']:.2f} | {(d['i2t_R@1'] + d['t2i_R@1']) / 2:.2f} | {(d['i2t_R@5'] + d['t2i_R@5']) / 2:.2f} |")
table.append(f"| *chance* | *{vqa_majority:.2f} (majority answer)* | *{retrieval_chance['i2t_R@1']:.2f}* | "
             f"*{retrieval_chance['i2t_R@5']:.2f}* |")
display(Markdown("\n".join(table)))
r1 = {n: (downstream[n]["i2t_R@1"] + downstream[n]["t2i_R@1"]) / 2 for n in SYSTEMS}
weak = [n for n in SYSTEMS if r1[n] < 3 * retrieval_chance["i2t_R@1"]]
display(Markdown(f"Retrieval after the same ITM fine-tuning: best {max(r1, key=r1.get)} ({max(r1.values()):.2f}); "
                 + (f"{', '.join(weak)} stayed near chance: {RUN['finetune_steps']} steps of ITM were not enough "
                    "to leave the plateau from its pretrained weights." if weak else
                    "every system is well above chance.")))
for name in SYSTEMS:
    assert_learned(downstream[name]["VQA"] > vqa_majority + 0.1,
                   f"{name}: VQA {downstream[name]['VQA']:.2f} (majority answer {vqa_majority:.2f})", SCALE)


# %% [markdown]
# Read the table as a comparison at one small budget, not a ranking of the papers: each system got
# `steps` pretraining steps and `finetune_steps` of fine-tuning per task, with one seed. The systems that
# enter the image differently (B2T2 in the words, VL-BERT in every word plus the regions) answer
# questions through the same pooled `[CLS]`, so the VQA column compares what their pretraining put there.
#
# ## 8. Export to `transformers`
#
# The course's VisualBERT, trained above, becomes a Hugging Face `VisualBertForPreTraining`
# (`course_lib.models.visualbert.to_transformers`), is saved with `save_pretrained`, and is loaded back by
# `transformers` alone; its masked-word and matching logits must be those of the course model.

# %%
from transformers.utils import logging as hf_logging

hf_logging.disable_progress_bar()  # no progress bars for a model of 59k parameters
exported = to_transformers(models["visualbert"])
with tempfile.TemporaryDirectory() as directory:
    exported.save_pretrained(directory)
    reloaded = VisualBertForPreTraining.from_pretrained(directory).eval()
for theirs, mine in zip(hf_logits(reloaded, batch), course_logits(models["visualbert"], batch)):
    torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=1e-5)

# %%
# NBVAL_CHECK_OUTPUT
print("the trained VisualBERT, saved and reloaded by transformers, gives the same logits (atol 1e-5):", True)

# %% [markdown]
# At GPU scale the same models train on real detector features (36 regions × 2048-d per image, the
# bottom-up-attention TSV release converted by `data_scripts/shard_regions.py`):
#
# ```bash
# python -m course_lib.pretrain --model=visualbert --preset=gpu-base --data=region_shards \
#     --data_path=shards/coco-regions --model.num_region_classes=1601 --global_batch=512 --steps=100000
# ```
#
# ## Summary
#
# - **VisualBERT**: `[text; regions]` into one BERT, a segment embedding for each modality; MLM + ITM. It is
#   `transformers`' `VisualBertForPreTraining`, weights and all, in both directions.
# - **B2T2**: no region tokens; each box is summed into the word that names it (the token-box matrix), the
#   whole image into `[IMAGE]`; early against late fusion measured over 3 seeds above.
# - **Unicoder-VL**: regions with box geometry, and masked object classification from zeroed features.
# - **VL-BERT**: a linguistic and a visual part in every token, the whole image in every word, masked
#   RoIs blanked in the pixels so the whole image cannot leak them, and no ITM (tested above).
#
# **Deviations from the papers** (to fit a CPU minute; the library's docstrings list them): 1-layer
# models of width 64; features are RoIAlign of pixels, not a Faster R-CNN's; VL-BERT's box enters as 4
# raw coordinates (the paper: a sinusoidal embedding), with one sentence segment and no `[END]` token or
# text-only corpus; B2T2 marks `[IMAGE]` with `[UNK]`; region classification hides no minimum of regions per
# image and ITM is scored on pairs with nothing hidden (UNITER's one-modality-at-a-time rule), because
# with one or two objects a forced minimum hides the whole image.
#
# **Next**: notebook 11 trains one transformer both to understand and to generate (Unified VLP), and
# notebook 12 measures which of these objectives matter (UNITER's ablation).
#
# ## Exercises
#
# **Exercise 1 - no peeking.** Write `blank(images, boxes, hide)`: `images (B, 3, H, W)` floats,
# `boxes (B, R, 4)` corners $x_1, y_1, x_2, y_2$ normalised to [0, 1], `hide (B, R)` bool → a copy of the
# images where every pixel whose **centre** $\big((x + 0.5)/W, (y + 0.5)/H\big)$ lies inside a box to hide
# (bounds included) is 0 in all channels. Do not modify `images`.

# %% [exercise]
from course_lib.checks.systems import check_blank_boxes


def blank(images, boxes, hide):
    raise NotImplementedError("pixel centres, a (B, R, H, W) inside test per box, any over the hidden boxes, zero")


check_blank_boxes(blank)

# %% [solution]
from course_lib.checks.systems import check_blank_boxes


def blank(images, boxes, hide):
    B, _, H, W = images.shape
    ys = (torch.arange(H) + 0.5) / H  # (H,) pixel centres
    xs = (torch.arange(W) + 0.5) / W  # (W,)
    x1, y1, x2, y2 = boxes.unbind(-1)  # (B, R) each
    in_y = (ys >= y1[..., None]) & (ys <= y2[..., None])  # (B, R, H)
    in_x = (xs >= x1[..., None]) & (xs <= x2[..., None])  # (B, R, W)
    covered = (in_y[..., :, None] & in_x[..., None, :] & hide[..., None, None]).any(1)  # (B, H, W)
    return images.masked_fill(covered[:, None], 0.0)


check_blank_boxes(blank)

# %% [markdown]
# **Exercise 2 - B2T2's visual input.** Write `b2t2_visual(token_box, region_feats, image_feat)`:
# `token_box (B, L)` (the region each token names, -1 for none), `region_feats (B, R, F)`, `image_feat (B, F)`
# → the `(B, L + 1, F)` tensor that B2T2 passes through $\tanh(W \cdot + b)$: row $t$ is the feature of the
# region token $t$ names (zeros for none), and a row holding the whole image is **inserted at position 1**,
# after `[CLS]`, for the `[IMAGE]` token. Hint: the token-box matrix of section 4, and a batched matrix product.

# %% [exercise]
from course_lib.checks.systems import check_b2t2_visual_input


def b2t2_visual(token_box, region_feats, image_feat):
    raise NotImplementedError("M @ region_feats, then insert image_feat after the first row")


check_b2t2_visual_input(b2t2_visual)

# %% [solution]
from course_lib.checks.systems import check_b2t2_visual_input


def b2t2_visual(token_box, region_feats, image_feat):
    M = F.one_hot(token_box.clamp(min=0), region_feats.shape[1]).float() * (token_box >= 0)[..., None]  # (B, L, R)
    boxes = M @ region_feats  # (B, L, F): each token's box feature, zeros where it names none
    return torch.cat([boxes[:, :1], image_feat[:, None], boxes[:, 1:]], dim=1)  # [CLS], [IMAGE], the rest


check_b2t2_visual_input(b2t2_visual)
