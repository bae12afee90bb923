# %% [markdown]
# # 21 · Pixel-BERT: from pixels, no detector
#
# **What you will build.** Pixel-BERT (Huang et al. 2020): a single-stream BERT like VisualBERT (notebook
# 10), but its visual tokens are not detected regions. A **CNN reads the pixels** and every cell of its
# feature map becomes a token; the CNN is **trained end to end** with the transformer, by the same masked
# language modelling (MLM) and image-text matching (ITM) losses. Its one new trick is **random pixel
# sampling**: at each pretraining step only a random subset of the cells (the paper's 100) enters the
# transformer; fine-tuning and testing read them all. You will sample cells from scratch and check the
# result against `course_lib`, build the visual embedding, pretrain Pixel-BERT on ShapeWorld, fine-tune it
# for retrieval and VQA, and test the paper's two claims with 3 seeds: sampling **improves the downstream
# tasks** and **speeds up training**; then compare it with VisualBERT on the same scenes and tasks: what does
# dropping the detector cost or gain?
#
# **The problem it solved.** Every vision-language BERT before it (notebooks 10-13) saw an image through a
# Faster R-CNN trained on Visual Genome and then frozen. Its boxes are limited to the detector's categories,
# they miss what the detector was not trained for (the *shape* of a scene, the state of an object), a region
# cannot be learned for the task, and detection is slow. Pixel-BERT aligns words with **pixels**: the visual
# encoder is a plain ImageNet CNN whose features are learned from the image-text losses, with no boxes
# anywhere. Feeding all of a ResNet's ~1000 cells per image to BERT is expensive; keeping 100 random ones
# per step cuts that cost and acts like dropout on the image: the model must learn from incomplete visual
# input, which the paper reports makes it more robust and better downstream. With a ResNeXt-152 it matched
# or beat the region models on VQA, NLVR2 and retrieval.
#
# **Papers.** Huang, Zeng, Liu, Fu & Fu (2020) *Pixel-BERT: Aligning Image Pixels with Text by Deep
# Multi-Modal Transformers* (arXiv:2004.00849); Li et al. (2019) *VisualBERT* (notebook 10); Jiang et al.
# (2020) *In Defense of Grid Features for Visual Question Answering*; Kim et al. (2021) *ViLT* (its random
# patch sampling is the closest public code to Pixel-BERT's, which was never released).
#
# **Where this sits in the course.** Part III, end-to-end systems: notebook 03 built grid features and the
# sampler, notebook 04 the single-stream fusion, 05-06 MLM and ITM, 10 the detector-based VisualBERT, 20 the
# machinery to train at GPU scale. Pixel-BERT is the first system here trained from pixels; CLIP (22) and
# ALBEF (23) follow. The model is `course_lib.models.pixel_bert`; `python -m course_lib.pretrain
# --model=pixel_bert` trains it on image-text shards (see the README).
#
# *Terms in English and Chinese: [glossary](../GLOSSARY.md).*

# %% [parameters]
SCALE = "cpu"  # "cpu": about a minute; "gpu": bigger model, longer run; "smoke": a few steps (what the tests run)

# %%
RUN = {
    "smoke": dict(dim=64, heads=4, layers=1, mlp_ratio=2.0, steps=4, batch_size=8, lr=2e-3, retrieval_steps=2,
                  vqa_steps=2, finetune_batch_size=8, train_scenes=32, val_scenes=16, qa_scenes=16,
                  retrieval_pairs=8, timing_steps=1),
    "cpu": dict(dim=64, heads=4, layers=1, mlp_ratio=2.0, steps=300, batch_size=64, lr=2e-3, retrieval_steps=60,
                vqa_steps=150, finetune_batch_size=64, train_scenes=2000, val_scenes=200, qa_scenes=600,
                retrieval_pairs=50, timing_steps=4),
    "gpu": dict(dim=256, heads=8, layers=4, mlp_ratio=4.0, steps=3000, batch_size=256, lr=5e-4, retrieval_steps=500,
                vqa_steps=1500, finetune_batch_size=256, train_scenes=40000, val_scenes=2000, qa_scenes=20000,
                retrieval_pairs=200, timing_steps=50),
}[SCALE]
from course_lib.thresholds import assert_learned  # asserts at SCALE cpu/gpu; reports at smoke
RUN

# %%
import json
import time
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
from IPython.display import Markdown, display

import course_lib
from course_lib.utils import count_parameters, seed_everything

seed_everything(0, threads=2)
from course_lib.data import ShapeWorld, WorldConfig
from course_lib.data.datasets import build_tokenizer
from course_lib.data.language import answer_vocabulary
from course_lib.evaluate.region_tasks import (FinetuneBudget, RegionTaskData, batch_sampler,
                                              finetune_retrieval, finetune_vqa, rows)
from course_lib.data.regions import ShapeWorldRegions
from course_lib.features.pixel_sampling import PixelSampler
from course_lib.flops import count_forward_flops
from course_lib.nn import TransformerLayer
from course_lib.models.registry import build_model
from course_lib.train import TrainConfig, train
from course_lib.viz import plot_losses, show_image

start_time = time.perf_counter()

# %% [markdown]
# ## 1. Data: the pixels of notebook 10's scenes
#
# The same world as notebook 10 (one or two objects, 32-pixel images, each scene with its canonical caption
# "a small green circle and a large yellow square"), read through `ShapeWorldRegions`, so that the very same
# batches can feed VisualBERT in section 6. A region batch carries the pixels too (`images (B, 3, 32, 32)`
# uint8): Pixel-BERT reads only `images`, `input_ids` and `attention_mask` and ignores the detector's boxes.
# The downstream tasks are those of notebooks 10-12 (`course_lib.evaluate.region_tasks`): retrieval after ITM
# fine-tuning, and VQA with a fresh answer head on the pooled output, both on held-out (validation) scenes.

# %%
world = ShapeWorld(WorldConfig(min_objects=1, max_objects=2, seed=0))
tokenizer = build_tokenizer(world, vocab_size=128, num_scenes=300)
CONTEXT = 20


def source(split):
    return ShapeWorldRegions(world, tokenizer, CONTEXT, max_regions=4, split=split, caption="description")


val_pairs = source("val")(range(RUN["val_scenes"]))
data = RegionTaskData(pretrain=source("train")(range(RUN["train_scenes"])), val=val_pairs,
                      retrieval=rows(val_pairs, torch.arange(RUN["retrieval_pairs"])),
                      qa_train=source("train").questions(range(RUN["qa_scenes"])),
                      qa_val=source("val").questions(range(RUN["val_scenes"])), ground_train=None, ground_val=None,
                      num_answers=len(answer_vocabulary(world.config)))
chance = {  # retrieval: a random caption; VQA: always the most frequent training answer
    "retrieval R@1": 1 / RUN["retrieval_pairs"],
    "VQA": (data.qa_val["answers"] == torch.bincount(data.qa_train["answers"]).argmax()).float().mean().item()}

# %%
# NBVAL_CHECK_OUTPUT
print("pretraining pairs", len(data.pretrain["input_ids"]), "| questions", len(data.qa_train["answers"]),
      "train,", len(data.qa_val["answers"]), "val | answers", data.num_answers)
print("images", tuple(data.pretrain["images"].shape), data.pretrain["images"].dtype,
      "| input_ids", tuple(data.pretrain["input_ids"].shape))

# %% [markdown]
# ## 2. Pixel features and random pixel sampling, from scratch
#
# The visual encoder is a CNN: each stride-2 stage halves the resolution. Pixel-BERT's ResNet-50 has stride 32
# (an 800-pixel image gives a map of about 25 × 40 cells); here one stage of the course's `SmallCNN` turns a
# 32-pixel image into a **16 × 16 map of 256 cells**, and each cell's channel vector, projected to the model
# width and given its row and column embedding (`GridFeatures`, notebook 03), is one **pixel feature**.
#
# **Random pixel sampling** keeps `k` of the $N = 256$ cells per image, drawn without replacement,
# independently for every image and at every step; the kept indices are sorted so they can be drawn on the
# image. With $k = 100$ the transformer reads 100 + 20 tokens instead of 256 + 20. A cheap way to draw `k`
# distinct cells for a whole batch at once: give every cell a uniform random number and keep the `k` smallest.

# %%
from course_lib.features.cnn import SmallCNN
from course_lib.features.grid import GridFeatures

torch.manual_seed(0)
grid = GridFeatures(SmallCNN(3, channels=(32,)), dim=RUN["dim"], max_grid=16)
images = data.val["images"][:4].float() / 255  # (4, 3, 32, 32)
with torch.no_grad():
    feature_map = grid.backbone(images)  # (4, 32, 16, 16)
    tokens = grid.embed_map(feature_map)  # (4, 256, D) in raster order


def sample_cells(tokens, num_samples, generator):
    """Tokens (B, N, D) -> (picked (B, k, D), indices (B, k)): k random distinct cells per image, sorted."""
    B, N, D = tokens.shape
    noise = torch.rand(B, N, generator=generator)  # one uniform number per cell
    indices = noise.argsort(dim=1)[:, :num_samples].sort(dim=1).values  # the k smallest, in raster order
    return tokens.gather(1, indices[:, :, None].expand(B, num_samples, D)), indices


picked, indices = sample_cells(tokens, 100, torch.Generator().manual_seed(7))
library = PixelSampler(100)(tokens, torch.Generator().manual_seed(7), sample=True)
torch.testing.assert_close(picked, library.tokens)
torch.testing.assert_close(indices, library.indices)
assert (indices[:, 1:] > indices[:, :-1]).all()  # distinct, sorted

# %%
# NBVAL_CHECK_OUTPUT
print("feature map", tuple(feature_map.shape), "-> tokens", tuple(tokens.shape), "-> sampled", tuple(picked.shape))
print("from scratch == course_lib PixelSampler: True")
print("eval mode keeps every cell:", tuple(PixelSampler(100).eval()(tokens).tokens.shape))

# %% [markdown]
# Below, the kept cells of one image at two pretraining steps (bright) and the dropped ones (dark): each step
# sees a different 39% of the image, and over the steps every cell is seen.

# %%
fig, axes = plt.subplots(1, 3, figsize=(7.5, 2.6))
show_image(data.val["images"][0], ax=axes[0], title="image (32 px)")
for step, ax in zip((1, 2), axes[1:]):
    _, kept = sample_cells(tokens[:1], 100, torch.Generator().manual_seed(step))
    mask = torch.zeros(256)
    mask[kept[0]] = 1.0
    shown = images[0] * (0.25 + 0.75 * mask.view(16, 16).repeat_interleave(2, 0).repeat_interleave(2, 1))
    show_image(shown, ax=ax, title=f"step {step}: 100 of 256 cells")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 3. The model: CNN → pixel tokens (+ the semantic embedding) → one BERT
#
# Pixel-BERT's input is BERT's, with the pixels appended:
#
# $$\hat w_i = \mathrm{LN}(w_i + p_i + s_w), \qquad \hat v_k = v_k + s_v, \qquad
# h = \mathrm{BERT}\big([\texttt{[CLS]}, \hat w_1 \dots \hat w_n, \texttt{[SEP]}, \hat v_1 \dots \hat v_k]\big)$$
#
# where $v_k$ are the (sampled) pixel features and $s_v$ a learned **semantic embedding** that tells BERT a
# token is visual, as $s_w$ does for words: in `course_lib` these are the single-stream fusion's two type
# vectors (notebook 04). The objectives are VisualBERT's (notebook 10): **MLM** (15% of the words, BERT's
# 80/10/10 rule, scored on matched pairs) and **ITM** on the pooled `[CLS]`, half of the pairs given another
# image of the batch. Both losses flow back into the CNN: the visual encoder is learned, not frozen.
# `course_lib.models.pixel_bert.PixelBert` composes `SmallCNN`, `GridFeatures`, `PixelSampler`,
# `SingleStreamFusion`, `MLMHead` and the ITM helpers of the region systems; its `forward` is the pretraining
# step and samples, while `encode`, used by fine-tuning and evaluation, reads every cell.

# %%
SIZE = dict(vocab_size=len(tokenizer), context_length=CONTEXT, dim=RUN["dim"], heads=RUN["heads"],
            layers=RUN["layers"], mlp_ratio=RUN["mlp_ratio"])
torch.manual_seed(0)
model = build_model("pixel_bert", "cpu-tiny", **SIZE)
batch = rows(data.val, torch.arange(4))
with torch.no_grad():
    pixel_tokens, _ = model.pixel_tokens(batch["images"])  # (4, 256, D): every cell
    merged = model.fusion.embed(model.word_embeddings(batch["input_ids"]), pixel_tokens)
    s_v = model.fusion.type_embeddings.weight[1]  # the semantic embedding of the pixels
    torch.testing.assert_close(merged[:, CONTEXT:], model.fusion.embed_norm(pixel_tokens + s_v))
    full, sampled = model.eval().encode(batch), model.encode(batch, sample=True)

# %%
# NBVAL_CHECK_OUTPUT
c = model.config
print(f"cnn {c.cnn_channels} stride {c.stride}: {c.grid} x {c.grid} = {c.cells} cells, {c.num_samples} sampled "
      f"in pretraining")
print("fused text", tuple(full.text.shape), "| pixels read: all", tuple(full.image.shape), "| sampled",
      tuple(sampled.image.shape))
print("parameters", count_parameters(model), "| of which the CNN", count_parameters(model.pixels.backbone))

# %% [markdown]
# ## 4. Pretraining, and the time per step
#
# Pretraining on the training scenes' captions (`course_lib.train`, AdamW with warmup and cosine decay).
# Then the claim "sampling speeds up training", measured: the time of a pretraining step with 100 sampled
# cells and with all 256, in this process, alternating the two, a few repeats. This depends on the machine
# and on what else runs on it; the FLOPs of a transformer layer over 276 and over 120 tokens (counted by
# PyTorch; exercise 2 derives them) say what the transformer alone would save.

# %%
t0 = time.perf_counter()
history = train(model, batch_sampler(data.pretrain, RUN["batch_size"], 0),
                TrainConfig(steps=RUN["steps"], lr=RUN["lr"], warmup_steps=min(20, RUN["steps"]), seed=0,
                            progress=False, log_every=0, device="cpu"))
pretrain_seconds = time.perf_counter() - t0
ax = plot_losses({k: history.values(k) for k in ("mlm", "itm")}, smooth=0.9)
ax.set_title(f"Pixel-BERT pretraining ({RUN['steps']} steps, {pretrain_seconds:.0f} s on this machine)")
plt.show()

# %%
def step_seconds(num_samples, steps):
    """Mean seconds of a pretraining step (forward, backward, AdamW) of a fresh model."""
    torch.manual_seed(0)
    m = build_model("pixel_bert", "cpu-tiny", **SIZE, num_samples=num_samples)
    opt = torch.optim.AdamW(m.parameters(), lr=RUN["lr"])
    b = rows(data.pretrain, torch.arange(RUN["batch_size"]))
    m(b)["loss"].backward()  # warm-up
    t = time.perf_counter()
    for _ in range(steps):
        opt.zero_grad()
        m(b)["loss"].backward()
        opt.step()
    return (time.perf_counter() - t) / steps


timing = {"sampled": [], "every cell": []}
for repeat in range(3):  # alternate, so that a busy moment of the machine hits both alike
    timing["sampled"].append(step_seconds(100, RUN["timing_steps"]))
    timing["every cell"].append(step_seconds(0, RUN["timing_steps"]))
speedup = np.mean(timing["every cell"]) / np.mean(timing["sampled"])
layer = TransformerLayer(RUN["dim"], RUN["heads"], RUN["mlp_ratio"])
predicted = (count_forward_flops(layer, (torch.randn(1, 256 + CONTEXT, RUN["dim"]),))
             / count_forward_flops(layer, (torch.randn(1, 100 + CONTEXT, RUN["dim"]),)))
display(Markdown(
    "| pretraining step (batch %d) | ms / step (mean ± std of 3) |\n|---|---|\n" % RUN["batch_size"]
    + "\n".join(f"| {k} | {1000 * np.mean(v):.1f} ± {1000 * np.std(v):.1f} |" for k, v in timing.items())
    + f"\n\nOn this machine, now: sampling makes a step **{speedup:.2f}×** "
    + ("faster." if speedup > 1 else "slower.") + f" A transformer layer over every cell counts {predicted:.2f}× "
    "the FLOPs of the sampled one; the CNN and the heads are not sampled, so a whole step saves less. "
    "(The times are machine-dependent: rerun the cell.)"))

# %% [markdown]
# ## 5. Downstream: retrieval and VQA
#
# Each task fine-tunes a copy of the pretrained model, reading every cell (`course_lib.evaluate.region_tasks`,
# the protocol of notebooks 10-12): **retrieval** fine-tunes ITM alone and ranks every image against every
# caption of `retrieval_pairs` validation pairs by the ITM score (R@1, mean of both directions; chance is one
# over the number of pairs); **VQA** trains a fresh answer head on the pooled output (chance: always answering
# the most frequent training answer).

# %%
budget = FinetuneBudget(retrieval_steps=RUN["retrieval_steps"], vqa_steps=RUN["vqa_steps"], grounding_steps=1,
                        batch_size=RUN["finetune_batch_size"], lr=RUN["lr"], warmup_steps=10)
model.eval()
live = {"retrieval R@1": finetune_retrieval(model, data, budget, seed=0, device="cpu")["R@1"],
        "VQA": finetune_vqa(model, data, budget, seed=0, device="cpu")}
for task, value in live.items():
    print(f"{task}: {value:.3f}   (chance {chance[task]:.3f})")

# %%
assert_learned(live["retrieval R@1"] > 5 * chance["retrieval R@1"],
               f"retrieval R@1 {live['retrieval R@1']:.3f} (chance {chance['retrieval R@1']:.3f}, bar 5x chance)",
               SCALE)
assert_learned(live["VQA"] > chance["VQA"] + 0.15,
               f"VQA {live['VQA']:.3f} (majority answer {chance['VQA']:.3f}, bar +0.15)", SCALE)

# %% [markdown]
# ## 6. The claims, over 3 seeds
#
# Three pretraining setups per seed do not fit in a minute of CPU. `benchmarks/pixel_bert_sampling.py` runs
# them with this notebook's world and model and writes every seed's scores and step times to
# `benchmarks/results/pixel_bert_sampling.json`, committed with the command that reproduced it; we load it.
# The lines: Pixel-BERT pretrained with sampling (100 of 256 cells) and without (every cell), the same
# model with no pretraining at all (fine-tuned from random weights), and **VisualBERT** (notebook 10) on
# the detector's regions of the same scenes, the same pretraining steps and the same fine-tuning.
# VisualBERT is also scored on grounding by region scoring (acc@0.5 of the chosen detected box); Pixel-BERT
# has no boxes to choose from, so the task does not exist for it. The time per step was measured in that run
# (one process per seed, side by side, the lines one after the other in each), on a busy shared machine: it is
# that machine's, at that moment; the ratio between the lines is what carries over.

# %%
results = json.loads((Path(course_lib.__file__).resolve().parent.parent / "benchmarks" / "results"
                      / "pixel_bert_sampling.json").read_text())
ROWS = {row["line"]: row for row in results["rows"]}
TASKS = ("retrieval R@1", "VQA", "grounding")


def ms(values, digits=3):
    values = [v for v in values if v is not None]
    return f"{np.mean(values):.{digits}f} ± {np.std(values):.{digits}f}" if values else "n/a"


table = ["| line | retrieval R@1 | VQA | grounding acc@0.5 | ms / pretraining step |", "|---|---|---|---|---|"]
for row in ROWS.values():
    step_ms = [1000 * s for s in row["seconds_per_step"]]
    table.append(f"| {row['name']} | " + " | ".join(ms(row["scores"][t]) for t in TASKS)
                 + f" | {ms(step_ms, 1) if step_ms else 'n/a'} |")
cb = results["chance"]
table.append(f"| *chance* | *{cb['retrieval R@1']:.3f}* | *{cb['VQA']:.3f}* | *{cb['grounding']:.3f}* | |")
seeds = len(ROWS["sampled"]["scores"]["VQA"])
display(Markdown("\n".join(table) + f"\n\nmean ± std over {seeds} seeds; `{results['command']}` (commit "
                 f"{results['commit']}, {results['date']}, {results['total_seconds'] / 60:.0f} min, one thread)."))
for task in ("retrieval R@1", "VQA"):  # the seeds one by one: how much a single run can be trusted
    print(f"{task:13s} per seed: " + " | ".join(f"{line} {[round(v, 3) for v in row['scores'][task]]}"
                                                for line, row in ROWS.items()))

# %% [markdown]
# Section 5's live run used the same protocol as the committed "sampled" line, seed 0; on the same machine and
# thread count it gives the same numbers, elsewhere they may differ in the last digits:

# %%
committed = {t: ROWS["sampled"]["scores"][t][0] for t in ("retrieval R@1", "VQA")}
same = all(abs(live[t] - committed[t]) < 1e-3 for t in committed)
print(f"live {[round(live[t], 3) for t in committed]}, committed seed 0 {[round(committed[t], 3) for t in committed]}: "
      f"{'the same' if same else 'different'}")

# %% [markdown]
# **Verdicts.** A difference *holds* when the two means differ by more than the larger of the two seed
# spreads (standard deviations), is *reversed* when it goes the other way by as much, and is *not decided*
# otherwise. The sentences below are computed from the table.

# %%
def compare(a, b, key):
    """(difference of means a - b, verdict) for ``key`` of lines a and b."""
    if key == "step":
        va, vb = ROWS[a]["seconds_per_step"], ROWS[b]["seconds_per_step"]
    else:
        va, vb = ROWS[a]["scores"][key], ROWS[b]["scores"][key]
    diff, spread = np.mean(va) - np.mean(vb), max(np.std(va), np.std(vb))
    return diff, "holds" if diff > spread else "is reversed" if diff < -spread else "is not decided"


sentences = []
for task in ("retrieval R@1", "VQA"):
    diff, verdict = compare("sampled", "all_cells", task)
    sentences.append(f"- *Sampling improves {task}*: {verdict} ({diff:+.3f}, sampled − every cell).")
diff, verdict = compare("all_cells", "sampled", "step")
ratio = np.mean(ROWS["all_cells"]["seconds_per_step"]) / np.mean(ROWS["sampled"]["seconds_per_step"])
sentences.append(f"- *Sampling speeds up pretraining*: {verdict} (a step takes {1000 * diff:+.1f} ms without "
                 f"sampling, {ratio:.2f}× the sampled step's time, on that machine).")
for task in ("retrieval R@1", "VQA"):
    diff, verdict = compare("sampled", "none", task)
    sentences.append(f"- *Pretraining helps Pixel-BERT on {task}*: {verdict} ({diff:+.3f} against no pretraining).")
for task in ("retrieval R@1", "VQA"):
    diff, verdict = compare("sampled", "visualbert", task)
    sentences.append(f"- *Pixel-BERT beats VisualBERT on {task}*: {verdict} ({diff:+.3f}, Pixel-BERT − VisualBERT).")
display(Markdown("\n".join(sentences)))

# %% [markdown]
# ## 7. What we built, and what differs from the paper
#
# - **Pixel features** from a CNN trained end to end with BERT, by MLM and ITM alone; no detector, no boxes.
# - **Random pixel sampling** in the pretraining step only (100 of 256 cells here; the paper: 100 of a
#   ResNet's ~1000), every cell at fine-tuning and test time; `num_samples=0` is the ablation.
# - **The visual embedding**: the pixel feature plus a learned semantic embedding $s_v$.
# - **The claims**, over 3 seeds: the table and the verdicts above say which held on ShapeWorld. The step
#   times are one machine's; a transformer layer's FLOPs (exercise 2) say what sampling saves at most.
#
# **Deviations from the paper** (to fit a CPU minute; `course_lib.models.pixel_bert`'s docstring lists them):
# a one-stage CNN of 32 channels on 32-pixel images trained from scratch (the paper: an ImageNet-pretrained
# ResNet-50 or ResNeXt-152 on images resized to 800 × 1333), a 1-layer transformer of width 64 (the paper:
# BERT-base from its weights, 12 layers, 768), a few hundred steps on a few thousand captions (the paper:
# COCO + Visual Genome captions); the cells keep `GridFeatures`' row and column embeddings (the paper adds
# only $s_v$: its ResNet's large receptive field carries position, our one-stage CNN's does not, and
# ShapeWorld asks "left of"); 100 of 256 cells is 39% of the map, where the paper keeps about 10%.
#
# **Next**: notebook 22 builds CLIP: two towers and a contrastive loss instead of one fused BERT.
#
# ## Exercises
#
# **Exercise 1 - random pixel sampling.** Write `sample_pixels(tokens, num_samples, generator)`: `tokens
# (B, N, D)` → `(picked (B, k, D), indices (B, k))`: for every image, `k` distinct cells drawn uniformly at
# random with `generator` (independently per image), their indices sorted, and the tokens at those indices.

# %% [exercise]
from course_lib.checks.pixel_bert import check_sample_pixels


def sample_pixels(tokens, num_samples, generator):
    raise NotImplementedError("a random number per cell (torch.rand with the generator), keep the k smallest, "
                              "sort the indices, gather the tokens")


check_sample_pixels(sample_pixels)

# %% [solution]
from course_lib.checks.pixel_bert import check_sample_pixels


def sample_pixels(tokens, num_samples, generator):
    B, N, D = tokens.shape
    noise = torch.rand(B, N, generator=generator)
    indices = noise.argsort(dim=1)[:, :num_samples].sort(dim=1).values  # (B, k)
    return tokens.gather(1, indices[:, :, None].expand(B, num_samples, D)), indices


check_sample_pixels(sample_pixels)

# %% [markdown]
# **Exercise 2 - what sampling saves.** Write `layer_flops(n, dim, mlp_ratio)`: the forward FLOPs of one
# transformer layer over `n` tokens of width `dim` (one sample): the query, key, value and output projections
# ($4 d^2$ multiply-adds per token), the MLP ($2 r d^2$), and attention: $Q K^\top$ and the weighted sum of $V$
# ($n^2 d$ each). A multiply-add is 2 FLOPs. With it, explain section 4's predicted ratio: which term makes a
# layer over 276 tokens cost more than 276 / 120 = 2.3 times a layer over 120?

# %% [exercise]
from course_lib.checks.pixel_bert import check_layer_flops


def layer_flops(n, dim, mlp_ratio):
    raise NotImplementedError("2 * (multiply-adds of the six matrices on n tokens + the two n x n attention "
                              "products)")


check_layer_flops(layer_flops)

# %% [solution]
from course_lib.checks.pixel_bert import check_layer_flops


def layer_flops(n, dim, mlp_ratio):
    return 2 * n * (4 + 2 * mlp_ratio) * dim * dim + 4 * n * n * dim


check_layer_flops(layer_flops)

# %%
print(f"notebook ran in {time.perf_counter() - start_time:.0f} s")
