# %% [markdown]
# # 04 · Fusion styles side by side
#
# **What you will build.** One small task - *image-text matching* (ITM): does this caption describe
# this image? - trained eight times, once with each way VLP models let the two modalities meet:
#
# | style | where text and image interact | systems |
# | --- | --- | --- |
# | single-stream | one transformer over `[text; image]`: *merged attention* | VisualBERT (Li et al. 2019), UNITER (Chen et al. 2020), VL-BERT |
# | dual-stream | *co-attention*: each stream's queries attend to the other's keys/values | ViLBERT (Lu et al. 2019), 12-in-1 |
# | cross-modality encoder | text and image encoders, then cross layers (one cross-attention shared by both directions) | LXMERT (Tan & Bansal 2019) |
# | two-tower | nowhere but a dot product of two pooled embeddings | CLIP (Radford et al. 2021), ALIGN |
# | fusion encoder | cross-attention layers inside the text encoder | ALBEF (Li et al. 2021), BLIP (Li et al. 2022) |
# | multiway | shared self-attention, a feed-forward *expert* per modality | VLMo (Bao et al. 2022), BEiT-3 |
# | encoder-decoder | a causal text decoder cross-attending to the image | BLIP's decoder, CoCa (Yu et al. 2022) |
# | three-stream | one encoder run on text alone, image alone and the pair | UNIMO (Li et al. 2021) |
#
# Every style gets the same inputs (patch tokens from a tiny `PatchEmbedding`, text tokens from
# `TextEmbeddings`), the same sizes and the same number of steps; the table at the end compares
# accuracy, parameters, FLOPs and training time. You will rebuild the wiring of two styles from scratch
# (ViLBERT's co-attention block, VLMo's modality experts) and check them against `course_lib`, draw the
# attention maps of three styles, score the two-tower style the way CLIP does, and measure why
# retrieval systems use two towers.
#
# **Where this sits in the course.** The three questions of every VLP model: **1. features** (notebooks
# 01 and 03: text, image and video tokens), **2. fusion** - where and how do the modalities interact? -
# this notebook, built from the attention layers of notebook 02, and **3. objectives** (notebook 05 on:
# MLM, ITM, ITC, ...). ITM is the simplest objective that *needs* fusion: neither the caption alone
# nor the image alone says anything about whether they match.

# %% [parameters]
SCALE = "cpu"  # "cpu": the cpu-tiny preset, about a minute; "gpu": bigger model, longer run

# %%
RUN = {
    "cpu": dict(dim=64, heads=4, layers=1, mlp_ratio=2.0, patch=8, align_steps=100, steps=160, batch_size=64,
                lr=2e-3, train_scenes=3000, val_scenes=500),
    "gpu": dict(dim=256, heads=8, layers=4, mlp_ratio=4.0, patch=4, align_steps=500, steps=3000, batch_size=128,
                lr=5e-4, train_scenes=50000, val_scenes=2000),
}[SCALE]
RUN

# %%
import copy
import math
import time

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from IPython.display import Markdown, display
from torch import nn

from course_lib.utils import get_device, seed_everything

seed_everything(0, threads=2)
from course_lib.data import ShapeWorld, WorldConfig
from course_lib.data.datasets import build_tokenizer
from course_lib.features.patch import PatchEmbedding
from course_lib.features.text import TextEmbeddings, encode
from course_lib.fusion.registry import FUSION_STYLES, build_fusion
from course_lib.nn import init_weights
from course_lib.train import TrainConfig, train
from course_lib.viz import attention_heatmap, attention_on_image, plot_losses, show_image

device = get_device()
start_time = time.perf_counter()

# %% [markdown]
# ## 1. The task: does the caption match the image?
#
# Scenes of one or two objects, each with its canonical caption ("a large red circle and a small blue
# square", objects left to right). A training pair keeps its own caption half of the time; otherwise the
# caption is swapped for the caption of another random scene (UNITER's ITM negatives). The label is 1
# when the caption is exactly the image's own description. Chance is the share of the majority label,
# about 0.5.

# %%
world = ShapeWorld(WorldConfig(image_size=32, max_objects=2, seed=0))
tokenizer = build_tokenizer(world, vocab_size=128, num_scenes=300)


def load_split(split: str, size: int):
    """Images (N, 3, 32, 32), caption ids (N, L), caption mask (N, L), caption strings and caption numbers
    (N,) of ``size`` scenes; two scenes with the same description share a caption number."""
    scenes = world.scenes(range(size), split)
    captions = [s.description for s in scenes]
    ids = encode(tokenizer, captions)
    number_of = {c: i for i, c in enumerate(sorted(set(captions)))}
    numbers = torch.tensor([number_of[c] for c in captions])
    return world.images(range(size), split), ids["input_ids"], ids["attention_mask"].bool(), captions, numbers


train_data = load_split("train", RUN["train_scenes"])
val_data = load_split("val", RUN["val_scenes"])
pixel_mean = train_data[0].mean(dim=(0, 2, 3), keepdim=True)  # (1, 3, 1, 1), per colour channel
pixel_std = train_data[0].std(dim=(0, 2, 3), keepdim=True)


def make_pairs(data, image_idx: torch.Tensor, generator: torch.Generator) -> dict:
    """Half the pairs keep their caption, half get another scene's; label 1 = the caption matches."""
    images, ids, mask, captions, numbers = data
    swap = torch.rand(len(image_idx), generator=generator) < 0.5
    caption_idx = torch.where(swap, torch.randint(len(captions), image_idx.shape, generator=generator), image_idx)
    labels = numbers[image_idx] == numbers[caption_idx]  # the caption is the image's own description
    return {"images": (images[image_idx] - pixel_mean) / pixel_std, "input_ids": ids[caption_idx],
            "text_mask": mask[caption_idx], "labels": labels.float(), "image_idx": image_idx,
            "caption_idx": caption_idx,
            # for the contrastive warm-up: each image's own caption, and which images share a caption
            "own_ids": ids[image_idx], "own_mask": mask[image_idx],
            "same_caption": numbers[image_idx][:, None] == numbers[image_idx][None, :]}


def itm_batch(step: int) -> dict:
    """Training batch number ``step``: a deterministic function of the step (exact resume)."""
    g = torch.Generator().manual_seed(step)
    return make_pairs(train_data, torch.randint(RUN["train_scenes"], (RUN["batch_size"],), generator=g), g)


val_batch = make_pairs(val_data, torch.arange(RUN["val_scenes"]), torch.Generator().manual_seed(1234))
chance = max(val_batch["labels"].mean().item(), 1 - val_batch["labels"].mean().item())

# %%
# NBVAL_CHECK_OUTPUT
print("train scenes", len(train_data[3]), "| val pairs", len(val_batch["labels"]), "| vocabulary", len(tokenizer))
print("image tokens: [CLS] +", (32 // RUN["patch"]) ** 2, "patches | text tokens (padded):", train_data[1].shape[1])

# %%
print(f"matching pairs in val: {val_batch['labels'].mean():.3f}; chance accuracy {chance:.3f}")
fig, axes = plt.subplots(1, 4, figsize=(12, 3.2))
for ax, k in zip(axes, range(4)):
    caption = val_data[3][val_batch["caption_idx"][k]]
    show_image(val_data[0][k], ax=ax, title=f"label {int(val_batch['labels'][k])}")
    ax.text(0.5, -0.05, caption, transform=ax.transAxes, ha="center", va="top", fontsize=8, wrap=True)
fig.tight_layout()

# %% [markdown]
# ## 2. Shared inputs, different fusion
#
# Every style receives already-embedded tokens through the same interface
# (`course_lib.fusion.registry`): `style(text (B, Lt, D), text_mask, image (B, Li, D), image_mask)`
# returns contextualised tokens, a pooled summary and, on request, the attention maps. So the rest of the
# model is the same for all eight:
#
# - text: `TextEmbeddings` (word + position + type, notebook 01);
# - image: `PatchEmbedding` (notebook 03), $8 \times 8$ patches of the normalised image plus a [CLS] token;
# - a matching head on the pooled output: a linear layer giving one logit, trained with binary
#   cross-entropy.
#
# **Two towers are scored differently.** A two-tower model has no joint representation to put a
# head on: its pooled output is a *pair* of embeddings, $t$ (text) and $v$ (image). Its matching score
# is their **cosine similarity**, scaled by a learned temperature as in CLIP, plus a learned threshold:
# $s = e^{\tau} \cos(t, v) + b$. (A linear head on the concatenation $[t; v]$ would be wrong: it
# is a sum of a text term and an image term, and cannot express "these two agree".)
#
# **Making ITM learnable in a few seconds.** ITM from scratch is a hard start: at initialisation the
# matching signal is a *product* of a text feature and an image feature, both tiny, so the loss sits on
# its $\ln 2$ plateau (a constant guess): with BERT's initialisation and nothing else, our models made no
# progress in 600 steps. Two fixes, the same for every style:
#
# - the fusion layers are initialised with standard deviation $0.8/\sqrt{D}$ instead of BERT's 0.02.
#   BERT's value is tuned for $D = 768$ (where $0.8/\sqrt{768} \approx 0.03$); at $D = 64$ it makes
#   every cross-modal product tiny;
# - ALBEF's lesson, **align before fuse** (Li et al. 2021): a contrastive loss (ITC) pulls each image's
#   mean patch token towards the mean token of its own caption and away from the other captions of the
#   batch. It trains only the inputs of the fusion (word and patch embeddings), gets a strong gradient
#   from step one (a $B$-way choice instead of a yes/no), and hands the fusion layers tokens in which
#   "red" and red patches already point the same way. We run it alone first (step 1 below), then keep
#   it on while each style trains: the loss is ITM + ITC, and we report ITM.

# %%
D = RUN["dim"]
COMMON = dict(dim=D, num_heads=RUN["heads"], num_layers=RUN["layers"], mlp_ratio=RUN["mlp_ratio"])
STYLE_OPTIONS = {name: dict(COMMON) for name in FUSION_STYLES}
STYLE_OPTIONS["single_stream"]["text_positions"] = False  # TextEmbeddings already added positions
INIT_STD = 0.8 / math.sqrt(D)


class Inputs(nn.Module):
    """The extractors every style shares: caption ids ``(B, Lt)`` -> text tokens ``(B, Lt, D)``,
    images ``(B, 3, 32, 32)`` -> [CLS] + patch tokens ``(B, 1 + 16, D)``."""

    def __init__(self):
        super().__init__()
        self.text_embeddings = TextEmbeddings(len(tokenizer), D, max_positions=32)
        self.patch_embeddings = PatchEmbedding(32, RUN["patch"], D)

    def forward(self, input_ids, images):
        return self.text_embeddings(input_ids), self.patch_embeddings(images)

    def align_loss(self, batch: dict, temperature: float = 0.1) -> torch.Tensor:
        """Symmetric InfoNCE (ITC) between each image's mean patch token and the mean token of its own
        caption, against the other captions of the batch; images that share a caption are all positives."""
        text, image = self(batch["own_ids"], batch["images"])  # (B, Lt, D), (B, 1 + P, D)
        mask = batch["own_mask"].float()[..., None]  # (B, Lt, 1)
        text = (text * mask).sum(1) / mask.sum(1)  # (B, D) mean over real tokens
        image = image[:, 1:].mean(1)  # (B, D) mean over patches, without [CLS]
        sim = F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).T / temperature  # (B, B)
        targets = batch["same_caption"].float()
        targets = targets / targets.sum(1, keepdim=True)  # each row sums to 1
        return (F.cross_entropy(sim, targets) + F.cross_entropy(sim.T, targets)) / 2


class CosineScore(nn.Module):
    """Two-tower matching score: ``exp(log_scale) * cos(t, v) + bias`` for pooled pairs ``(B, E), (B, E)``."""

    def __init__(self, scale: float = 10.0):
        super().__init__()
        self.log_scale = nn.Parameter(torch.tensor(math.log(scale)))
        self.bias = nn.Parameter(torch.zeros(()))

    def forward(self, pooled) -> torch.Tensor:
        text_emb, image_emb = pooled
        return self.log_scale.exp() * F.cosine_similarity(text_emb, image_emb, dim=-1) + self.bias  # (B,)


class ITMModel(nn.Module):
    """Caption ids + images -> one matching logit per pair ``(B,)``, with the fusion style ``style`` in the
    middle; starts from a copy of the (aligned) shared ``inputs``."""

    def __init__(self, style: str, inputs: Inputs):
        super().__init__()
        self.style = style
        self.inputs = copy.deepcopy(inputs)
        self.fusion = init_weights(build_fusion(style, **STYLE_OPTIONS[style]), std=INIT_STD)
        self.head = CosineScore() if style == "two_tower" else nn.Linear(D, 1)

    def forward(self, batch: dict, return_attention: bool = False):
        text, image = self.inputs(batch["input_ids"], batch["images"])  # (B, Lt, D), (B, Li, D)
        out = self.fusion(text, batch["text_mask"], image, None, return_attention=return_attention)
        logits = self.head(out.pooled) if self.style == "two_tower" else self.head(out.pooled)[:, 0]
        return logits, out


def itm_loss(model, batch):
    logits, _ = model(batch)
    itm = F.binary_cross_entropy_with_logits(logits, batch["labels"])
    align = model.inputs.align_loss(batch)  # kept on while the fusion trains, as in ALBEF
    return {"loss": itm + align, "itm": itm, "align": align,
            "accuracy": ((logits > 0).float() == batch["labels"]).float().mean()}

# %% [markdown]
# **Step 1, once for all styles: align.** The shared extractors are trained alone with ITC for a few
# steps (no transformer, so it costs about a second). Every style then starts from a copy of them.

# %%
torch.manual_seed(0)
inputs = Inputs()
align_history = train(inputs, itm_batch,
                      TrainConfig(steps=RUN["align_steps"], lr=RUN["lr"], warmup_steps=10, progress=False,
                                  log_every=0, device=device),
                      loss_fn=lambda model, batch: model.align_loss(batch))
inputs.cpu()
print(f"ITC loss {align_history.losses[0]:.2f} -> {align_history.mean_last(10):.2f} "
      f"(ln {RUN['batch_size']} = {math.log(RUN['batch_size']):.2f} is a random guess)")

# %% [markdown]
# ## 3. Two styles from scratch
#
# ### 3.1 ViLBERT's co-attention block
#
# ViLBERT (Lu et al. 2019) keeps two streams. They meet in *co-attention* blocks, where "the keys and
# values from each modality are passed as input to the other modality's multi-headed attention block":
# the text attends over the image and the image over the text, **both computed from the block's
# inputs**, each followed by a residual, a LayerNorm and a feed-forward of its own stream:
#
# $$ t' = \mathrm{LN}(t + \mathrm{MHA}(Q{=}t, K{=}V{=}v)), \quad v' = \mathrm{LN}(v + \mathrm{MHA}(Q{=}v, K{=}V{=}t)), \qquad
#    t'' = \mathrm{LN}(t' + \mathrm{FFN}_t(t')), \quad v'' = \mathrm{LN}(v' + \mathrm{FFN}_v(v')). $$
#
# Here is the wiring from scratch; the attention and MLP modules come from a `course_lib` block (the
# attention computation itself is exercise 2).

# %%
def co_attention_block(block, text, text_mask, image, image_mask):
    """ViLBERT's connection layer: ``(B, Lt, D)``, ``(B, Li, D)`` -> new text, new image, both maps."""
    text_att, text_to_image = block.text_to_image.attn(text, image, key_mask=image_mask, return_attention=True)
    image_att, image_to_text = block.image_to_text.attn(image, text, key_mask=text_mask, return_attention=True)
    text_mid = block.text_to_image.norm(text + text_att)  # both directions read the *inputs* t and v
    image_mid = block.image_to_text.norm(image + image_att)
    new_text = block.text_norm(text_mid + block.text_mlp(text_mid))  # a feed-forward per stream
    new_image = block.image_norm(image_mid + block.image_mlp(image_mid))
    return new_text, new_image, text_to_image, image_to_text


torch.manual_seed(0)
dual = init_weights(build_fusion("dual_stream", **STYLE_OPTIONS["dual_stream"]), std=0.2).eval()
block = dual.co_attention[0]
text = torch.randn(2, 6, D)
image = torch.randn(2, 17, D)
text_mask = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])  # the second caption is shorter
image_mask = torch.ones(2, 17, dtype=torch.bool)
with torch.no_grad():
    ours = co_attention_block(block, text, text_mask, image, image_mask)
    new_text, new_image, maps = block(text, text_mask, image, image_mask, return_attention=True)
for a, b in zip(ours, (new_text, new_image, maps["text_to_image"], maps["image_to_text"])):
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
print("our co-attention block matches course_lib's CoAttentionLayer")

# %% [markdown]
# Our version matches the library's. Note what co-attention does *not* have: no token attends to
# tokens of its own modality inside this block (ViLBERT follows each block with an ordinary
# transformer layer per stream for that).
#
# ### 3.2 VLMo's mixture of modality experts
#
# VLMo (Bao et al. 2022) goes the other way: one sequence `[text; image]`, **one shared
# self-attention** (merged attention, as single-stream), but the feed-forward is chosen by modality:
# "each block contains a pool of modality-specific experts and a shared self-attention layer". With
# VLMo's pre-LN and layer scale $\gamma$:
#
# $$ x \leftarrow x + \gamma_1 \odot \mathrm{Attn}(\mathrm{LN}(x)), \qquad
#    x_m \leftarrow x_m + \gamma_2 \odot \mathrm{FFN}_m(\mathrm{LN}_m(x_m)), \quad m \in \{\text{text}, \text{image}\}. $$
#
# The experts are also why VLMo can serve as *two towers* for retrieval (run each modality alone with its
# own expert) and as a fused model for VQA.

# %%
def multiway_layer(layer, x, key_mask, num_text: int):
    """``x (B, Lt + Li, D)`` (text first) -> ``(B, Lt + Li, D)``: shared attention, routed experts."""
    attended, _ = layer.attn(layer.attn_norm(x), key_mask=key_mask)  # every token sees every token
    x = x + layer.gamma_1 * attended
    routed = torch.cat([layer.text_expert(x[:, :num_text]),  # text tokens -> text FFN
                        layer.image_expert(x[:, num_text:])], dim=1)  # image tokens -> image FFN
    return x + layer.gamma_2 * routed


torch.manual_seed(0)
multiway = init_weights(build_fusion("multiway", **STYLE_OPTIONS["multiway"]), std=0.2).eval()
joint = torch.cat([text, image], dim=1)  # (2, 6 + 17, D)
joint_mask = torch.cat([text_mask, image_mask], dim=1)
with torch.no_grad():
    torch.testing.assert_close(multiway_layer(multiway.layers[0], joint, joint_mask, num_text=6),
                               multiway.layers[0](joint, joint_mask, 6)[0], atol=1e-5, rtol=1e-5)
print("our multiway layer matches course_lib's MultiwayLayer")

# %% [markdown]
# ## 4. What each style costs, before training
#
# Same width, heads and depth for all: the number of parameters and the forward FLOPs for one pair
# (counted by `torch.utils.flop_counter`, matrix products only, in the table of section 5) differ
# because the styles build different stacks. Single-stream is one stack shared by both modalities: the
# fewest parameters. Dual-stream and the cross-modality encoder have a stack per modality *plus*
# cross layers: about four times the parameters and twice the FLOPs. Three-stream has one encoder
# (few parameters) but runs it three times (text, image, pair). Two-tower has two stacks but the
# fewest FLOPs per pair, since no token ever attends across modalities.

# %%
# NBVAL_CHECK_OUTPUT
text_len, image_len = train_data[1].shape[1], (32 // RUN["patch"]) ** 2 + 1
costs = {}
for name in FUSION_STYLES:
    style = build_fusion(name, **STYLE_OPTIONS[name])
    costs[name] = (style.num_parameters(), style.flops(1, text_len, image_len))
    print(f"{name:16s} {costs[name][0]:7d} parameters")

# %% [markdown]
# ## 5. Training every style
#
# **Step 2: fuse.** Each style starts from a copy of the aligned extractors and trains on ITM (+ ITC)
# with the same data, steps, batch size, learning rate and seed. `course_lib.train.train` runs AdamW
# with a short warmup and a cosine decay.

# %%
models, histories, seconds, accuracies = {}, {}, {}, {}
config = TrainConfig(steps=RUN["steps"], lr=RUN["lr"], warmup_steps=20, progress=False, log_every=0, device=device)
for name in FUSION_STYLES:
    torch.manual_seed(0)
    models[name] = ITMModel(name, inputs)
    t0 = time.perf_counter()
    histories[name] = train(models[name], itm_batch, config, loss_fn=itm_loss)
    seconds[name] = time.perf_counter() - t0
    models[name].eval()
    with torch.no_grad():
        batch = {k: v.to(device) for k, v in val_batch.items()}
        logits, _ = models[name](batch)
    accuracies[name] = ((logits > 0).float() == batch["labels"]).float().mean().item()
    print(f"{name:16s} {seconds[name]:5.1f} s   val accuracy {accuracies[name]:.3f}")

# %%
fig, ax = plt.subplots(figsize=(7, 3.5))
plot_losses(histories, ax=ax, smooth=0.9, key="itm")
ax.axhline(math.log(2), color="grey", linestyle="--", linewidth=0.8)
ax.set_title("ITM loss per fusion style (dashed: ln 2, a constant guess)");

# %%
WHERE = {"single_stream": "merged self-attention", "dual_stream": "co-attention blocks",
         "cross_modality": "shared cross-attention layers", "two_tower": "cosine of pooled embeddings",
         "fusion_encoder": "cross-attention in the text encoder", "multiway": "shared attention, modality FFNs",
         "encoder_decoder": "causal decoder's cross-attention", "three_stream": "joint pass of a shared encoder"}
rows = ["| style | interaction | val accuracy | parameters (K) | forward MFLOP / pair | training (s) |",
        "| --- | --- | ---: | ---: | ---: | ---: |"]
for name in FUSION_STYLES:
    params, flops = costs[name]
    rows.append(f"| {name} | {WHERE[name]} | {accuracies[name]:.3f} | {params / 1e3:.1f} | {flops / 1e6:.2f} "
                f"| {seconds[name]:.1f} |")
rows.append(f"| *chance* | | {chance:.3f} | | | |")
display(Markdown("\n".join(rows)))

# %%
# NBVAL_CHECK_OUTPUT
fused = {name: acc for name, acc in accuracies.items() if name != "two_tower"}
best_fused = max(fused, key=fused.get)
loss_drops = {name: sum(h.values("itm")[:20]) / 20 - h.mean_last(20, "itm") for name, h in histories.items()}
print(f"every style trains (ITM loss falls by more than 0.05): {all(d > 0.05 for d in loss_drops.values())}")
print(f"the best fusion style beats 0.75 (chance ~0.5): {fused[best_fused] > 0.75}")
print(f"two-tower beats 0.7: {accuracies['two_tower'] > 0.7}")
assert all(d > 0.05 for d in loss_drops.values()), f"a style did not train: {loss_drops}"
assert fused[best_fused] > 0.75, f"best fused style {best_fused}: {fused[best_fused]:.2f} (chance {chance:.2f})"
assert accuracies["two_tower"] > 0.7, f"two-tower {accuracies['two_tower']:.2f} (chance {chance:.2f})"

# %% [markdown]
# Every style leaves the $\ln 2$ line and ends well above chance, but not at the same speed: this is a
# comparison at a *fixed, tiny budget*, not of what each style can reach. Things to notice:
#
# - the styles with a stack per modality plus cross layers (dual-stream, cross-modality) pay about twice
#   the FLOPs of single-stream for the same width and depth, and have the most parameters to fit;
# - the multiway transformer tends to start slowly: VLMo's layer scale ($\gamma = 0.1$) damps every
#   residual branch at first, which stabilises deep models and costs speed in a one-layer one;
# - the two-tower model learns this task fast even though its modalities never attend to each other:
#   "which objects of which colour" is a bag of attributes that a single vector per side can hold. Tasks
#   that need token-level alignment (which object is left of which, counting, a question about one
#   object) are where fused models pull ahead.

# %% [markdown]
# ## 6. What the models look at
#
# Attention maps of three styles for one matching validation pair. Each shows a different place where
# the modalities meet.

# %%
k = int(torch.nonzero(val_batch["labels"] == 1)[0])  # the first matching val pair
example = {key: value[k:k + 1].to(device) for key, value in val_batch.items()}
n_text = int(example["text_mask"].sum())
words = tokenizer.convert_ids_to_tokens(example["input_ids"][0, :n_text].tolist())
patch_grid = (32 // RUN["patch"], 32 // RUN["patch"])
with torch.no_grad():
    outputs = {name: models[name](example, return_attention=True)[1]
               for name in ("single_stream", "dual_stream", "fusion_encoder")}
print("caption:", val_data[3][k])

# %%
merged = outputs["single_stream"].attentions[-1]["self"][0].mean(0)  # (Lt + Li, Lt + Li), heads averaged
Lt = example["input_ids"].shape[1]
keep = list(range(n_text)) + list(range(Lt, merged.shape[0]))  # drop padded text positions
labels = words + ["[IMG]"] + [f"p{i}" for i in range(merged.shape[0] - Lt - 1)]
attention_heatmap(merged[keep][:, keep], labels, labels, title="single-stream: merged self-attention (last layer)");

# %% [markdown]
# **Merged attention** (single-stream): one $(L_t + L_i) \times (L_t + L_i)$ map. The top-left block is
# text attending to text, the top-right block text to image, and so on: all four kinds of interaction
# happen in one softmax, in every layer. Look at the rows of the colour and shape words and at which
# patch columns they pick.

# %%
def words_on_image(maps, title: str):
    """For each content word, its attention over the image patches (heads averaged), drawn on the image."""
    content = [i for i, w in enumerate(words) if w not in ("[CLS]", "[SEP]", "a", "an", "and", ",")]
    fig, axes = plt.subplots(1, len(content), figsize=(2.1 * len(content), 2.4), squeeze=False)
    for ax, i in zip(axes[0], content):
        weights = maps[0].mean(0)[i, 1:]  # over the patches, without the image [CLS]
        attention_on_image(val_data[0][k], weights, grid=patch_grid, ax=ax, title=words[i])
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()


words_on_image(outputs["dual_stream"].attentions[0]["text_to_image"], "dual-stream co-attention: text -> image")
words_on_image(outputs["fusion_encoder"].attentions[-1]["text_to_image"],
               "fusion encoder cross-attention: text -> image")

# %% [markdown]
# **Co-attention** (ViLBERT) and **cross-attention** (ALBEF/BLIP's fusion encoder) both let each word
# query the image patches; the maps show, word by word, which $8 \times 8$ patches it read (red = more).
# After a few seconds of training the maps are coarse, but a word such as a colour tends to land on
# patches of an object of that colour. The two-tower model has no such map at all: its only contact
# between modalities is one number, the cosine.
#
# **All eight side by side.** For every style, the text-to-image attention of its last layer that has
# one (words down, the image's [CLS] and 16 patches across, heads averaged). For merged attention
# (single-stream, multiway, three-stream's joint pass) it is the text-rows, image-columns block of the
# joint map, and each row does not sum to 1 because the rest of its mass went to text tokens;
# co-attention, LXMERT's cross layer, the fusion encoder and the decoder have a separate
# cross-attention whose rows sum to 1. Two-tower has no cross-modal attention: its panel shows the
# text tower's self-attention instead, the only map it has (a triangle: like CLIP's, the text tower is
# causal, and its last token, [SEP], is the pooled embedding).

# %%
def text_to_image_map(name: str, out) -> tuple[torch.Tensor, str]:
    """The last layer's text -> image attention of style ``name``, heads averaged: ``(Lt, Li)``, and a label."""
    Lt = example["input_ids"].shape[1]
    for layer in reversed(out.attentions):
        for key in ("text_to_image", "self", "joint"):
            if key in layer:
                maps = layer[key][0].mean(0)  # (queries, keys), heads averaged
                return (maps if key == "text_to_image" else maps[:Lt, Lt:]), key
    return out.attentions[0]["text_self"][0].mean(0), "text_self (no cross-modal map)"


with torch.no_grad():
    every_output = {name: models[name](example, return_attention=True)[1] for name in FUSION_STYLES}
fig, axes = plt.subplots(2, 4, figsize=(16, 6.5))
for ax, name in zip(axes.flat, FUSION_STYLES):
    maps, kind = text_to_image_map(name, every_output[name])
    columns = words if kind.startswith("text_self") else ["[IMG]"] + [f"p{i}" for i in range(maps.shape[1] - 1)]
    attention_heatmap(maps[:n_text, :len(columns)], words, columns, ax=ax, title=f"{name}: {kind}")
fig.tight_layout()

# %% [markdown]
# Read the panels with the table above beside them. The cross-attention styles (dual-stream,
# cross-modality, fusion encoder, encoder-decoder) give each word a full distribution over the
# patches, so their rows can be sharp. In the merged-attention styles the text-to-image block holds
# whatever share of each word's attention went to the image, so how bright the block is tells you how
# much the last layer mixes the modalities at all. The maps differ from style to style even though
# the inputs and the training were the same: where a model *can* look shapes what it learns to look
# at.
#
# ## 7. Why retrieval systems use two towers
#
# To rank $N$ captions for each of $N$ images, a fused model must run once per **pair**: $N^2$ forward
# passes. A two-tower model runs each tower once per item, $2N$ passes, and scores every pair with one
# matrix product of normalised embeddings, which can even be computed ahead of time for a whole
# gallery. Measured here on 64 × 64 validation pairs:

# %%
N = 64
images_n = (val_data[0][:N] - pixel_mean) / pixel_std
ids_n, mask_n = val_data[1][:N], val_data[2][:N]
two_tower, single = models["two_tower"], models["single_stream"]
with torch.no_grad():
    t0 = time.perf_counter()
    t_tokens = two_tower.inputs.text_embeddings(ids_n.to(device))
    _, text_emb, _ = two_tower.fusion.encode_text(t_tokens, mask_n.to(device))  # N text passes
    _, image_emb, _ = two_tower.fusion.encode_image(two_tower.inputs.patch_embeddings(images_n.to(device)),
                                                    torch.ones(N, image_len, dtype=torch.bool, device=device))
    sim_two_tower = F.normalize(image_emb, dim=-1) @ F.normalize(text_emb, dim=-1).T  # (N, N) in one product
    two_tower_seconds = time.perf_counter() - t0

    t0 = time.perf_counter()
    image_idx = torch.arange(N).repeat_interleave(N)  # every (image, caption) pair
    caption_idx = torch.arange(N).repeat(N)
    pairs = {"images": images_n[image_idx].to(device), "input_ids": ids_n[caption_idx].to(device),
             "text_mask": mask_n[caption_idx].to(device)}
    sim_single = single(pairs)[0].reshape(N, N)  # N * N fused passes
    single_seconds = time.perf_counter() - t0

same = torch.tensor([[a == b for b in val_data[3][:N]] for a in val_data[3][:N]])  # (N, N) true matches
for name, sim in (("two-tower", sim_two_tower), ("single-stream", sim_single)):
    r1 = same[torch.arange(N), sim.argmax(1).cpu()].float().mean().item()
    print(f"{name:14s} image->text R@1 {r1:.2f} (chance {same.float().mean():.2f})")
print(f"scoring {N} x {N} pairs: two-tower {two_tower_seconds * 1e3:.0f} ms, "
      f"single-stream {single_seconds * 1e3:.0f} ms ({single_seconds / two_tower_seconds:.0f}x slower)")

# %% [markdown]
# Both models can rank, but the cost grows as $2N$ for two towers and as $N^2$ for fused models; with
# a million images it is the difference between one matrix product and a trillion transformer passes.
# This is the trade-off the later systems are built around:
#
# - **where interaction happens** decides what a model can express: a single cosine (two-tower) cannot
#   say "the red object is *left of* the circle"; merged attention, co-attention and cross-attention
#   can, token by token;
# - **cost**: fused styles pay per pair; dual-stream and cross-modality encoders also pay for two
#   stacks plus cross layers;
# - **retrieval speed**: only two towers pre-compute embeddings. So ALBEF and BLIP keep both: a
#   two-tower stage (ITC) to retrieve candidates fast, and a fusion encoder (ITM) to re-rank the top
#   few; VLMo's multiway transformer is one set of weights that can run either way.

# %%
print(f"notebook ran in {time.perf_counter() - start_time:.0f} s")

# %% [markdown]
# ## Exercises
#
# **Exercise 1 - the merged-attention input.** A single-stream model (VisualBERT, UNITER) feeds one
# transformer with the concatenation of the two modalities. Write `merged_input(text, text_mask, image,
# image_mask, type_embeddings)`: `text (B, Lt, D)`, `image (B, Li, D)`, their bool masks and the type
# table `(2, D)` (row 0 = text, row 1 = image) → `x (B, Lt + Li, D)`, text first, each token plus its
# modality's type embedding, and the joint key mask `(B, Lt + Li)` (bool, padding stays False), which lets
# every real token attend to every real token of both modalities.

# %% [exercise]
from course_lib.checks.fusion import check_merged_input


def merged_input(text, text_mask, image, image_mask, type_embeddings):
    raise NotImplementedError("add the type embeddings, concatenate tokens and masks")


check_merged_input(merged_input)

# %% [solution]
from course_lib.checks.fusion import check_merged_input


def merged_input(text, text_mask, image, image_mask, type_embeddings):
    x = torch.cat([text + type_embeddings[0], image + type_embeddings[1]], dim=1)  # (B, Lt + Li, D)
    mask = torch.cat([text_mask.bool(), image_mask.bool()], dim=1)  # (B, Lt + Li), True = real token
    return x, mask


check_merged_input(merged_input)

# %% [markdown]
# **Exercise 2 - one co-attention step.** Write the text half of a ViLBERT co-attention block: text
# queries attend to image keys and values. `layer` is a `CrossAttentionSublayer` with
# `layer.attn.query/key/value/out` (linear layers), `layer.attn.num_heads` and `layer.norm`. Compute
# $Q = W_q t$, $K = W_k v$, $V = W_v v$, split $D$ into heads, scores $QK^\top/\sqrt{d_{head}}$ with the
# padded image tokens set to $-\infty$, softmax over the image tokens, the weighted sum of $V$, heads
# merged, `out`, then the residual and the LayerNorm: return `(LN(text + out), attention (B, H, Lt, Li))`.

# %% [exercise]
from course_lib.checks.fusion import check_co_attention_step


def co_attention_step(layer, text, image, image_mask):
    mha = layer.attn
    B, Lt, D = text.shape
    H = mha.num_heads
    raise NotImplementedError("project, split heads, scaled scores, mask, softmax, weighted sum, merge, residual + LN")


check_co_attention_step(co_attention_step)

# %% [solution]
from course_lib.checks.fusion import check_co_attention_step


def co_attention_step(layer, text, image, image_mask):
    mha = layer.attn
    B, Lt, D = text.shape
    H = mha.num_heads
    d = D // H

    def split_heads(x):  # (B, N, D) -> (B, H, N, d)
        return x.view(B, x.shape[1], H, d).transpose(1, 2)

    q = split_heads(mha.query(text))  # (B, H, Lt, d): text queries
    k, v = split_heads(mha.key(image)), split_heads(mha.value(image))  # (B, H, Li, d): image keys, values
    scores = q @ k.transpose(-2, -1) / math.sqrt(d)  # (B, H, Lt, Li)
    scores = scores.masked_fill(~image_mask.bool()[:, None, None, :], float("-inf"))
    attention = scores.softmax(dim=-1)  # over the image tokens
    out = (attention @ v).transpose(1, 2).reshape(B, Lt, D)  # heads merged back
    return layer.norm(text + mha.out(out)), attention


check_co_attention_step(co_attention_step)
