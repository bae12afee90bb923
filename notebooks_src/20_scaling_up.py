# %% [markdown]
# # 20 · Scaling up: from the CPU notebook to a GPU run
#
# Every notebook so far trained a model of a few hundred thousand parameters on two CPU cores for
# about a minute. The papers trained the same kinds of models with a hundred million parameters
# or more, on hundreds of millions of image-text pairs, on many GPUs for days. This notebook is
# the bridge. It adds no new answer to the course's three questions (features, fusion,
# objectives); it runs the answers you already have at the papers' scale. You will:
#
# 1. compare the **presets**, `cpu-tiny` up to `gpu-base` (CLIP's ViT-B/16), by parameters and FLOPs,
#    counted by hand and by PyTorch, without building the big model in memory;
# 2. run **the pretraining command** itself, `course_lib.pretrain`, at `cpu-tiny` on ShapeWorld,
#    and check that it learns;
# 3. see what each GPU ingredient buys, building each one from scratch and checking it against the
#    library: **bf16 autocast** (Kalamkar et al., 2019), **fused attention** (Dao et al., 2022,
#    *FlashAttention*), **`torch.compile`**, **fused AdamW** (Loshchilov & Hutter, 2019),
#    **gradient accumulation** for a contrastive loss (Gao et al., 2021, *GradCache*; open_clip's
#    `--accum-freq`) and **DDP** (Li et al., 2020, *PyTorch Distributed*);
# 4. launch it on 1 and N GPUs with `torchrun`;
# 5. read **MFU**, model FLOPs utilisation (Chowdhery et al., 2022, *PaLM*, appendix B), and avoid
#    its classic pitfalls;
# 6. write and read **webdataset shards**, the format that streams real datasets from disk.
#
# The model is CLIP (Radford et al., 2021, *Learning Transferable Visual Models From Natural
# Language Supervision*) as the course builds it in `course_lib.models.clip`; its figures to beat
# come from open_clip (Ilharco et al., 2021; Cherti et al., 2023).
#
# *Terms in English and Chinese: [glossary](../GLOSSARY.md).*

# %% [parameters]
SCALE = "cpu"  # "cpu": about a minute; "gpu": bigger model, longer run; "smoke": a few steps (what the tests run)

# %%
import math
import tempfile
import time
from pathlib import Path

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F

from course_lib.utils import count_parameters, seed_everything

seed_everything(0, threads=2)
RUN = {
    "smoke": dict(preset="cpu-tiny", steps=12, global_batch=16, lr=3e-3, warmup=2, num_workers=0, compile=False,
                  log_every=4, eval_scenes=200, shard_steps=4),
    "cpu": dict(preset="cpu-tiny", steps=250, global_batch=64, lr=3e-3, warmup=25, num_workers=0, compile=False,
                log_every=50, eval_scenes=1000, shard_steps=40),
    "gpu": dict(preset="gpu-small", steps=5000, global_batch=512, lr=5e-4, warmup=500, num_workers=8, compile=True,
                log_every=250, eval_scenes=1000, shard_steps=40),
}[SCALE]
from course_lib.thresholds import assert_learned  # asserts at SCALE cpu/gpu; reports at smoke
WORKDIR = Path(tempfile.mkdtemp(prefix="course-20-"))  # the run's checkpoint, tokenizer and shards

# %% [markdown]
# ## 1. Presets: one model, four sizes
#
# A preset is data, not code: a `ModelSize` of widths, depths and resolutions in
# `course_lib.presets.PRESETS`. The CLIP class is the same at every size. `gpu-base` is the papers'
# size: a ViT-B/16 image tower (224 px images cut into 16 px patches, 12 layers of width 768) and
# CLIP's 12-layer text transformer of width 512 over 77 tokens.
#
# How much does a forward pass cost? Count it by hand first. A linear layer $y = xW^\top$ with
# $W \in \mathbb R^{d_\text{out}\times d_\text{in}}$ does $d_\text{in} d_\text{out}$ multiply-adds per
# token, **2 FLOPs** each (one multiply, one add; the convention of open_clip's profile and of PaLM).
# One transformer layer of width $D$ over $N$ tokens, with an MLP of width $rD$, does
#
# $$\underbrace{2N\,(4D^2)}_{q,\,k,\,v,\,\text{out}} + \underbrace{2N\,(2rD^2)}_{\text{MLP}}
#   + \underbrace{2\cdot 2N^2D}_{QK^\top \text{ and } PV}$$
#
# FLOPs. The image tower adds the patch embedding ($2 \cdot N_p \cdot 3p^2 \cdot D$ for $N_p$ patches of
# $p\times p$ pixels) and its class token ($N = N_p + 1$); each tower ends with a projection to the
# joint space ($2DE$). Layer norms, GELUs and softmaxes are a few FLOPs per element, negligible
# next to the products, and not counted. Written from scratch:

# %%
from course_lib.presets import PRESETS


def tower_flops(tokens: int, width: int, layers: int, mlp_ratio: float) -> int:
    """Forward FLOPs of ``layers`` transformer layers over ``tokens`` tokens of width ``width``."""
    linear = 2 * tokens * (4 * width * width + 2 * width * int(mlp_ratio * width))
    attention = 2 * 2 * tokens * tokens * width  # Q K^T and P V
    return layers * (linear + attention)


def clip_forward_flops(size) -> tuple[int, int]:
    """(image tower, text tower) forward FLOPs per sample of a CLIP at preset ``size``."""
    patches = (size.image_size // size.patch_size) ** 2
    image = (2 * patches * 3 * size.patch_size**2 * size.vision_width  # patch embedding
             + tower_flops(patches + 1, size.vision_width, size.vision_layers, size.mlp_ratio)
             + 2 * size.vision_width * size.embed_dim)  # projection
    text = (tower_flops(size.context_length, size.text_width, size.text_layers, size.mlp_ratio)
            + 2 * size.text_width * size.embed_dim)
    return image, text


image_by_hand, text_by_hand = clip_forward_flops(PRESETS["gpu-base"])
print(f"gpu-base by hand: image {image_by_hand / 1e9:.2f} + text {text_by_hand / 1e9:.2f} GFLOPs")

# %% [markdown]
# Now let PyTorch count. `course_lib.flops.count_forward_flops` runs one forward pass under
# `torch.utils.flop_counter.FlopCounterMode`, which records every matrix product. We build each
# preset's CLIP on the **meta device**: its tensors have shapes and dtypes but no storage, so the
# 124 M parameters of `gpu-base` take no memory, no initialisation time, and the FLOPs still come out
# exactly, from the shapes alone. Our hand count matches the library's count at every size:

# %%
# NBVAL_CHECK_OUTPUT
from course_lib.flops import count_forward_flops
from course_lib.models.registry import build_model

forward_flops = {}  # preset -> (image, text) FLOPs per sample
print(f"{'preset':>9} {'image':>6} {'vision':>8} {'text':>8} {'params':>9} {'forward GFLOPs/sample':>22}")
for name, size in PRESETS.items():
    with torch.device("meta"):
        clip = build_model("clip", name)
        images = torch.zeros(1, 3, size.image_size, size.image_size)
        tokens = torch.zeros(1, size.context_length, dtype=torch.long)
    counted = (count_forward_flops(clip.visual, images),
               count_forward_flops(clip.text, (tokens, torch.ones_like(tokens))))
    torch.testing.assert_close(counted, clip_forward_flops(size), rtol=0, atol=0)  # exact integers
    forward_flops[name] = counted
    vision, text = f"{size.vision_width}x{size.vision_layers}", f"{size.text_width}x{size.text_layers}"
    print(f"{name:>9} {size.image_size:>4}px {vision:>8} {text:>8} "
          f"{count_parameters(clip) / 1e6:>8.2f}M {sum(counted) / 1e9:>10.3f} = {counted[0] / 1e9:.3f} + "
          f"{counted[1] / 1e9:.3f}")
base_parameter_tensors = len(list(clip.parameters()))  # gpu-base, used in section 3.4
image_gflops, text_gflops = (f / 1e9 for f in forward_flops["gpu-base"])
print(f"gpu-base: {image_gflops:.1f} + {text_gflops:.1f} = {image_gflops + text_gflops:.1f} GFLOPs; "
      "open_clip's profile of ViT-B/16: 35.1 + 6.0 = 41.1")

# %% [markdown]
# Our `gpu-base` CLIP costs 41.1 GFLOPs per image-text pair, exactly what open_clip's profile lists
# for its ViT-B/16 (image 35.1 + text 6.0): the same architecture, counted the same way. From
# `cpu-tiny` to `gpu-base` the forward cost grows about 1,900 times and the parameters about 530
# times (the vocabulary of our text tower is ShapeWorld's 256 words, not CLIP's 49,408 BPE tokens,
# which is why we have 124 M parameters where open_clip has 150 M; embeddings are looked up, not
# multiplied, so they cost no FLOPs). The image tower dominates: 197 tokens of width 768 against 77
# of width 512. Training costs about **3 x** the forward pass (exercise 3 shows why).

# %%
fig, ax = plt.subplots(figsize=(6, 3))
positions = torch.arange(len(forward_flops)).float()
for shift, (tower, label) in zip((-0.2, 0.2), enumerate(("image tower", "text tower"))):
    ax.bar(positions + shift, [flops[tower] / 1e9 for flops in forward_flops.values()], width=0.4, label=label)
ax.set_xticks(positions, list(forward_flops))
ax.set_yscale("log")
ax.set_ylabel("forward GFLOPs / sample")
ax.set_title("the same CLIP at four sizes")
ax.legend()
plt.show()

# %% [markdown]
# ## 2. The pretraining command, at `cpu-tiny`
#
# `course_lib.pretrain` is the script a GPU job runs (`python -m course_lib.pretrain --preset=...`);
# here we call its Python entry point with the same configuration. Data come from ShapeWorld,
# rendered on the fly (by DataLoader worker processes on a GPU machine; here in the main process,
# as both CPU cores are busy with the model): sample $i$ of the stream is training scene $i$ with one
# of its captions, so the run is the same with any number of workers or GPUs. One progress line
# every `log_every` steps reports the loss, the throughput, peak memory and MFU (which a CPU cannot
# report: section 5 explains why).

# %%
from course_lib.pretrain import PretrainConfig, pretrain

config = PretrainConfig(model="clip", preset=RUN["preset"], data="shapeworld", steps=RUN["steps"],
                        global_batch=RUN["global_batch"], lr=RUN["lr"], warmup=RUN["warmup"],
                        num_workers=RUN["num_workers"], compile=RUN["compile"], log_every=RUN["log_every"],
                        out_dir=str(WORKDIR / "run"), seed=0, overwrite=True)  # overwrite: cells can rerun
started = time.perf_counter()
result = pretrain(config)
train_seconds = time.perf_counter() - started
print(f"trained in {train_seconds:.0f} s")

# %% [markdown]
# ### Did it learn?
# The contrastive loss of a batch of $B$ pairs starts at **$\ln B$**: an untrained model spreads each
# image's probability evenly over the $B$ captions. It cannot reach 0 on ShapeWorld either: two
# scenes in a batch can share a caption ("there is one circle and two objects"), and then no model
# can tell which one is meant.

# %%
from course_lib.viz import plot_losses

chance_loss = math.log(config.global_batch)
final_loss = result.history.mean_last(20)
ax = plot_losses({f"CLIP {config.preset}, batch {config.global_batch}": result.history}, smooth=0.9)
ax.axhline(chance_loss, ls="--", c="gray", label=f"chance: ln {config.global_batch}")
ax.legend()
plt.show()
print(f"final loss {final_loss:.2f} (chance ln B = {chance_loss:.2f})")

# %%
# NBVAL_CHECK_OUTPUT
print("final loss below 0.8 x chance:", final_loss < 0.8 * chance_loss)
assert_learned(final_loss < 0.8 * chance_loss, f"loss {final_loss:.2f} is too close to chance {chance_loss:.2f}", SCALE)

# %% [markdown]
# A lower training loss is not yet learning: we score **held-out** scenes (the validation split,
# never seen in training). Two checks:
# - **retrieval**: embed 1,000 validation images and their full descriptions ("a large red circle and
#   a small blue square"), and for each image rank the 1,000 descriptions; a hit is a top-ranked
#   description equal to the image's own (two scenes can share one). The model never saw these
#   exact sentences: training captions list the objects (with or without their sizes), or state one
#   relation, or count.
# - **zero-shot classification** (CLIP's party trick): for the single-object scenes, write each of the
#   18 (colour, shape) classes as a prompt, "there is a red circle", and pick the closest.

# %%
from course_lib.data.shapeworld import ShapeWorld
from course_lib.evaluate import chance_recall_at_k, recall_at_k
from course_lib.features.text import encode, load_tokenizer

model = result.model.eval()
device = next(model.parameters()).device
world = ShapeWorld(seed=config.seed)  # the world pretrain rendered (seed = the run's seed)
tokenizer = load_tokenizer(WORKDIR / "run" / "tokenizer")
image_size = model.config.image_size


def render(scenes) -> torch.Tensor:
    """Scenes -> images (N, 3, S, S) float in [0, 1] on the model's device."""
    return torch.from_numpy(world.render_batch(scenes, image_size)).permute(0, 3, 1, 2).float().div(255).to(device)


val_scenes = world.scenes(range(RUN["eval_scenes"]), "val")
descriptions = [s.description for s in val_scenes]
enc = {k: v.to(device) for k, v in encode(tokenizer, descriptions, max_length=model.config.context_length).items()}
val_images = render(val_scenes)
similarity = model.similarity(val_images, enc["input_ids"], enc["attention_mask"]).float().cpu()  # (N, N)
positives = torch.tensor([[a == b for b in descriptions] for a in descriptions])
recall, chance = recall_at_k(similarity, positives, ks=(1, 5)), chance_recall_at_k(positives, k=(1, 5))
for key in ("i2t_R@1", "i2t_R@5", "t2i_R@1", "t2i_R@5"):
    print(f"{key}: {recall[key]:.3f}   (chance {chance[key]:.4f})")

single = [s for s in world.scenes(range(2000), "val") if len(s.objects) == 1]
classes = [world.config.class_name(c) for c in range(world.num_classes)]
prompts = {k: v.to(device) for k, v in encode(tokenizer, [f"there is a {c}" for c in classes]).items()}
with torch.no_grad():
    class_emb = model.encode_text(prompts["input_ids"], prompts["attention_mask"])  # (18, E)
    predicted = (model.encode_image(render(single)) @ class_emb.T).argmax(1).cpu()
truth = torch.tensor([int(s.class_ids[0]) for s in single])
zero_shot, zero_shot_chance = (predicted == truth).float().mean().item(), 1 / len(classes)
print(f"zero-shot accuracy on {len(single)} single-object scenes: {zero_shot:.3f} (chance {zero_shot_chance:.3f})")

# %%
# NBVAL_CHECK_OUTPUT
R1_THRESHOLD, ZERO_SHOT_THRESHOLD = 0.03, 0.15
print(f"image->text R@1 above {R1_THRESHOLD} (chance {chance['i2t_R@1']:.4f}):", recall["i2t_R@1"] > R1_THRESHOLD)
print(f"zero-shot above {ZERO_SHOT_THRESHOLD} (chance {zero_shot_chance:.3f}):", zero_shot > ZERO_SHOT_THRESHOLD)
assert_learned(recall["i2t_R@1"] > R1_THRESHOLD,
               f"R@1 {recall['i2t_R@1']:.3f} too close to chance {chance['i2t_R@1']:.4f}", SCALE)
assert_learned(zero_shot > ZERO_SHOT_THRESHOLD,
               f"zero-shot {zero_shot:.3f} too close to chance {zero_shot_chance:.3f}", SCALE)

# %% [markdown]
# What the model ranks first: for four held-out images, the two descriptions it scores highest
# (✓ = the image's own). Most of its mistakes are near misses: the right colours with one wrong
# shape, a wrong size, or one object too many or too few. Sizes appear in only some training
# captions, so they are learned last; this is what more steps and a bigger model (the `"gpu"` scale)
# are for.

# %%
from course_lib.viz import show_image

fig, axes = plt.subplots(1, 4, figsize=(13, 3.6))
for ax, i in zip(axes, range(4)):
    show_image(val_images[i].cpu(), ax=ax)
    top = similarity[i].topk(2).indices.tolist()
    ax.set_title("\n".join(("✓ " if positives[i, j] else "✗ ") + descriptions[j].replace(" and ", ",\n   ")
                           for j in top), fontsize=7, loc="left")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 3. What each GPU ingredient buys
#
# The run above used none of the GPU machinery: a CPU computes in float32, one process, no
# compiler. On a GPU, `pretrain` switches on six things. Each is a few lines; here is what each one
# does, checked at tiny size on the CPU.
#
# ### 3.1 bf16 autocast
# A float32 number has 1 sign bit, 8 exponent bits and 23 mantissa bits. **bfloat16** keeps the sign
# and the 8 exponent bits and only 7 mantissa bits (Kalamkar et al., 2019): the same range as
# float32, about 3 significant digits. float16 spends its bits the other way (5 exponent, 10 mantissa):
# more digits, but it overflows above 65,504 and flushes tiny gradients to zero, which is why float16
# training needs loss scaling and bf16 does not. On an H100, bf16 matrix products run on tensor cores
# at 989 TFLOP/s, against 67 TFLOP/s for plain float32: **that** is what bf16 buys, together with
# half the bytes for every activation stored for the backward pass.

# %%
# NBVAL_CHECK_OUTPUT
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    info = torch.finfo(dtype)
    print(f"{str(dtype):>15}: eps {info.eps:.1e}, max {info.max:.1e}, smallest normal {info.tiny:.1e}")
big = torch.tensor(70000.0)
print("70,000 as float16:", big.half().item(), "| as bfloat16:", big.bfloat16().item())
print("1e-6 squared, float16:", (torch.tensor(1e-6).half() ** 2).item(), "| bfloat16:",
      f"{(torch.tensor(1e-6).bfloat16() ** 2).item():.2e}")

# %% [markdown]
# `torch.autocast` does not convert the model: the weights stay float32 (so the optimizer's small
# updates are not lost to rounding), and inside the `with` block each matrix product casts its
# inputs to bf16, while numerically delicate operations (softmax, layer norm, the loss) run in
# float32. The loss of our model on a batch, both ways, agrees to about bf16's precision:

# %%
from course_lib.data.onthefly import ShapeWorldPairs

pairs = ShapeWorldPairs(world, tokenizer, model.config.context_length)
batch = pairs(range(32))  # 32 training pairs, images uint8 (B, 3, H, W)
batch = {**batch, "images": batch["images"].float().div(255)}
batch = {key: value.to(device) for key, value in batch.items()}
with torch.no_grad():
    loss_fp32 = model(batch)["loss"]
    with torch.autocast(device.type, dtype=torch.bfloat16):
        projected = model.towers.image_projection(torch.randn(2, model.config.vision_width, device=device))
        loss_bf16 = model(batch)["loss"]
print(f"a linear layer's output under autocast: {projected.dtype}; the loss: {loss_bf16.dtype}")
print(f"loss float32 {loss_fp32.item():.4f}, under bf16 autocast {loss_bf16.item():.4f}")
torch.testing.assert_close(loss_bf16, loss_fp32, rtol=5e-2, atol=0)  # bf16 keeps ~3 significant digits

# %% [markdown]
# ### 3.2 Fused attention
# Attention as the paper writes it, $\mathrm{softmax}(QK^\top/\sqrt d)\,V$, computes the full
# $(B, H, N, N)$ score matrix, writes it to memory, reads it back for the softmax, writes the
# probabilities, and keeps them for the backward pass. FlashAttention (Dao et al., 2022) computes the
# same result tile by tile in fast on-chip memory with a running softmax and never stores the matrix;
# the backward pass recomputes it. PyTorch exposes it (and a memory-efficient variant) as
# `F.scaled_dot_product_attention`. Here is the explicit version, from scratch, with a key padding
# mask (True = a real token), against the fused one:

# %%
def explicit_attention(q, k, v, key_mask):
    """q, k, v (B, H, N, d), key_mask (B, N) bool -> (B, H, N, d), the paper's formula."""
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (B, H, N, N), stored in memory
    scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))  # padding keys get no weight
    return scores.softmax(dim=-1) @ v  # (B, H, N, d)


def fused_attention(q, k, v, key_mask):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask[:, None, None, :])


g = torch.Generator().manual_seed(0)
B, H, N, d = 64, 4, 65, 16  # cpu-tiny's image tower: 64 patches + the class token, 4 heads of 16
q, k, v = (torch.randn(B, H, N, d, generator=g) for _ in range(3))
key_mask = torch.arange(N)[None, :] < torch.randint(1, N + 1, (B,), generator=g)[:, None]  # (B, N)
torch.testing.assert_close(fused_attention(q, k, v, key_mask), explicit_attention(q, k, v, key_mask))
print("explicit and fused attention agree")


def time_ms(fn, *args, repeat: int = 20) -> float:
    """Median wall time of ``fn(*args)`` in milliseconds (after one warm-up call)."""
    fn(*args)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - start)
    return 1e3 * sorted(times)[len(times) // 2]


print(f"CPU, B={B}, H={H}, N={N}, d={d}: explicit {time_ms(explicit_attention, q, k, v, key_mask):.2f} ms, "
      f"fused {time_ms(fused_attention, q, k, v, key_mask):.2f} ms")
scores_gib = 256 * 12 * 197**2 * 2 / 2**30  # gpu-base image tower, batch 256, bf16
print(f"gpu-base, batch 256: the explicit path stores {scores_gib:.2f} GiB of attention scores per layer, "
      f"{12 * scores_gib:.1f} GiB over the 12 image layers; the fused path none")

# %% [markdown]
# On a CPU at this size the gain is modest and varies from run to run (we measured the fused
# kernel anywhere from twice as fast to slower on a busy machine): a 65 x 65 score matrix sits in
# the CPU's cache anyway. On a GPU the saved memory traffic is the point, and the saved memory lets a
# bigger batch fit. The
# library's attention does exactly this: `course_lib.nn.MultiHeadAttention` takes the fused path,
# unless you ask for the attention map (to plot it), which only the explicit path can give. Both
# give the same output:

# %%
from course_lib.nn import MultiHeadAttention

attention = MultiHeadAttention(dim=64, num_heads=4)
x = torch.randn(8, N, 64, generator=g)
with torch.no_grad():
    fast, no_map = attention(x, key_mask=key_mask[:8])
    slow, attention_map = attention(x, key_mask=key_mask[:8], return_attention=True)
torch.testing.assert_close(fast, slow)
print("library attention: fused path == explicit path; map only from the explicit one:", no_map is None,
      tuple(attention_map.shape))

# %% [markdown]
# ### 3.3 `torch.compile`
# In eager mode every operation is a separate GPU kernel that reads its inputs from memory and
# writes its output back: a layer norm, then a GELU, then a residual add are three round trips.
# `torch.compile(model)` captures the Python code as a graph (TorchDynamo) and generates fused
# kernels for it (TorchInductor, in Triton), so chains of element-wise operations run as one kernel
# and the Python overhead of launching thousands of small kernels disappears. For open_clip's
# ViT-B/16 on one H100 it raises training throughput from about 1,650 to 2,490 samples/s (+51%):
# open_clip 3.3.0, torch 2.11, bf16, batch 256, synthetic data, measured on one H100 80GB in
# November 2026 for this course's reference notes (the course's own GPU benchmark,
# `benchmarks/bench_pretrain.py --preset gpu-base --compile both`, has not run on a GPU yet; its
# CPU figures are in BENCHMARKS.md).
#
# The costs: the first step compiles (tens of seconds to minutes; `pretrain` leaves the first log
# interval out of its steady-state throughput), every new input shape compiles again (`pretrain`
# therefore pads every caption to the full context length), and it needs a C compiler and, on GPUs,
# Triton (Windows users often run without it). Compiling on a CPU would take longer than this whole
# notebook, so we do not run it here: on a GPU, `--compile=True`.
#
# ### 3.4 Fused AdamW
# AdamW (Loshchilov & Hutter, 2019) keeps two running averages per parameter, the gradient $m$ and
# its square $v$, and takes a step scaled by their ratio, with the weight decay applied directly to
# the weights (decoupled) rather than through the gradient. For step $t$, learning rate $\eta$ and
# weight decay $\lambda$:
#
# $$\theta \leftarrow \theta(1 - \eta\lambda),\quad m \leftarrow \beta_1 m + (1-\beta_1) g,\quad
#   v \leftarrow \beta_2 v + (1-\beta_2) g^2,\quad
#   \theta \leftarrow \theta - \eta\,\frac{m/(1-\beta_1^t)}{\sqrt{v/(1-\beta_2^t)} + \epsilon}$$
#
# Written from scratch, one tensor at a time:

# %%
def adamw_step(params, states, step, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1):
    """One AdamW step, in place, for every tensor of ``params`` (with ``.grad``); ``states``: (m, v) per tensor."""
    beta1, beta2 = betas
    with torch.no_grad():
        for p, (m, v) in zip(params, states):
            p.mul_(1 - lr * weight_decay)  # decoupled weight decay
            m.mul_(beta1).add_(p.grad, alpha=1 - beta1)  # running mean of the gradient
            v.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)  # running mean of its square
            m_hat, v_hat = m / (1 - beta1**step), v / (1 - beta2**step)  # bias corrections
            p.sub_(lr * m_hat / (v_hat.sqrt() + eps))


ours = [torch.nn.Parameter(p.detach().cpu().clone()) for p in model.parameters()]
theirs = [torch.nn.Parameter(p.detach().cpu().clone()) for p in model.parameters()]
fused = torch.optim.AdamW(theirs, lr=1e-3, weight_decay=0.1, fused=True)
states = [(torch.zeros_like(p), torch.zeros_like(p)) for p in ours]
for step in range(1, 4):
    for a, b in zip(ours, theirs):
        a.grad = b.grad = torch.randn(a.shape, generator=g)
    adamw_step(ours, states, step)
    fused.step()
torch.testing.assert_close(ours, theirs)
print(f"our AdamW == torch's fused AdamW after 3 steps on the model's {len(ours)} parameter tensors")

# %% [markdown]
# Our loop runs about ten small operations per tensor. On a GPU each is a kernel launch of a few
# microseconds, whatever the tensor's size, and the optimizer reads and writes every parameter,
# gradient and state several times. `foreach=True` batches each operation over all tensors;
# `fused=True` does the whole update of every tensor in one pass over memory. Timed on the CPU:

# %%
def timed_optimizer(**kind) -> float:
    params = [torch.nn.Parameter(p.detach().cpu().clone()) for p in model.parameters()]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)
    optimizer = torch.optim.AdamW(params, lr=1e-3, **kind)
    return time_ms(optimizer.step)


for label, kind in (("one tensor at a time", dict(foreach=False)), ("foreach", dict(foreach=True)),
                    ("fused", dict(fused=True))):
    print(f"AdamW step, {label:>20}: {timed_optimizer(**kind):.2f} ms")
print(f"gpu-base has {base_parameter_tensors} parameter tensors: about {10 * base_parameter_tensors:,} kernel "
      "launches per step one tensor at a time, a handful fused")

# %% [markdown]
# `course_lib.train.make_optimizer`, which `pretrain` uses, asks for the fused kernel whenever all
# parameters are on a GPU.
#
# ### 3.5 Gradient accumulation, for a contrastive loss
# CLIP trained with a global batch of 32,768 pairs. No GPU holds the activations of such a batch,
# so the batch is cut into $k$ **micro-batches** that go through the model one after the other, and
# their gradients are added up before the optimizer step. For a loss that is a mean over samples this
# is exact: $\nabla \frac1B\sum_i \ell_i = \frac1k \sum_{m} \nabla \big(\frac{1}{B/k}\sum_{i \in m} \ell_i\big)$.
#
# **The contrastive loss is not a sum over samples.** Each image's loss is a softmax over all $B$
# captions of the batch: the other captions are its negatives. Splitting the batch into micro-batches
# of $b$ pairs silently trains with $b - 1$ negatives instead of $B - 1$: a different, easier loss
# (its chance level is $\ln b$, not $\ln B$), and a different gradient:

# %%
def gradients(model) -> dict:
    return {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}


def micro_batches(batch: dict, k: int) -> list[dict]:
    return [{key: value.chunk(k)[m] for key, value in batch.items()} for m in range(k)]  # k x (B/k, ...)


model.train()
model.zero_grad()
full_loss = model(batch)["loss"]
full_loss.backward()
full_grads = gradients(model)

K = 4  # 4 micro-batches of 8 pairs
model.zero_grad()
naive_losses = []
for micro in micro_batches(batch, K):
    loss = model(micro)["loss"]
    (loss / K).backward()
    naive_losses.append(loss.item())
naive_grads = gradients(model)
gap = max((naive_grads[n] - full_grads[n]).abs().max().item() for n in full_grads)
print(f"batch of 32: loss {full_loss.item():.3f}; mean over 4 micro-batches of 8: {sum(naive_losses) / K:.3f}")
print(f"largest gradient difference of naive accumulation: {gap:.2e} (the gradients are about "
      f"{max(g.abs().max().item() for g in full_grads.values()):.1e})")

# %% [markdown]
# **GradCache** (Gao et al., 2021) keeps the global batch exact at the memory cost of one
# micro-batch. The loss depends on the model only through the $B$ embeddings. So:
# 1. embed every micro-batch **without** gradient (cheap in memory: no activations kept) and cache
#    the $B$ image and text embeddings;
# 2. for each micro-batch $m$ in turn, embed it again **with** gradient, put these fresh embeddings
#    in place of its cached ones, compute the full-batch loss, and backpropagate: only micro-batch
#    $m$'s activations are alive, and its parameters receive exactly their share of the full-batch
#    gradient.
#
# Summed over $m$, the gradient is the full-batch gradient. Only the learnable temperature needs
# care: every one of the $k$ losses depends on it directly, so its gradient is taken from one of them
# only. The price is one extra forward pass per micro-batch (about a third more compute). From
# scratch:

# %%
def gradcache_backward(model, batch: dict, k: int) -> torch.Tensor:
    """Accumulate in ``.grad`` the exact gradient of the contrastive loss of the whole ``batch``,
    holding the activations of one micro-batch of B/k pairs at a time. Returns the loss."""
    micros = micro_batches(batch, k)
    with torch.no_grad():
        cached = [model(micro, embeddings_only=True) for micro in micros]  # k x {"image_emb", "text_emb"}: (b, E)
    for m, micro in enumerate(micros):
        fresh = model(micro, embeddings_only=True)  # with gradient, micro-batch m only
        embeddings = {key: torch.cat([c[key] for c in cached[:m]] + [fresh[key]] + [c[key] for c in cached[m + 1:]])
                      for key in fresh}  # (B, E)
        loss = model.loss_from_embeddings(**embeddings, learn_temperature=m == k - 1)["loss"]
        loss.backward()
    return loss.detach()


model.zero_grad()
cached_loss = gradcache_backward(model, batch, K)
torch.testing.assert_close(cached_loss, full_loss.detach())
torch.testing.assert_close(gradients(model), full_grads, rtol=1e-4, atol=1e-6)  # float32 sums in another order
model.zero_grad()
model.eval()
print(f"GradCache: loss {cached_loss.item():.3f} and every gradient equal to the full batch's")

# %% [markdown]
# `pretrain` does exactly this whenever `micro_batch` is smaller than the batch per process (its
# `_accumulate_contrastive`). One step with the whole batch of 32 and one step with 4 micro-batches
# of 8 give the same loss and the same gradients:

# %%
def one_step(micro_batch: int):
    step_config = PretrainConfig(model="clip", preset="cpu-tiny", steps=1, global_batch=32, micro_batch=micro_batch,
                                 grad_clip=0.0, num_workers=0, tokenizer=str(WORKDIR / "run" / "tokenizer"),
                                 out_dir=str(WORKDIR / f"step-{micro_batch}"), log_every=1, overwrite=True)
    run = pretrain(step_config)
    return run.history.last(), gradients(run.model)


whole_loss, whole_grads = one_step(micro_batch=0)  # 0: the whole batch at once
accumulated_loss, accumulated_grads = one_step(micro_batch=8)  # 32 = 8 x 4 accumulation steps
torch.testing.assert_close(accumulated_loss, whole_loss, rtol=1e-5, atol=1e-6)
torch.testing.assert_close(accumulated_grads, whole_grads, rtol=1e-4, atol=1e-6)
print("pretrain: accumulation over 4 micro-batches == one batch of 32 (loss and gradients)")

# %% [markdown]
# ### 3.6 DDP: many GPUs, one model
# `torchrun --nproc_per_node N` starts N copies of the program, one per GPU, and tells each its
# `RANK`, `LOCAL_RANK` and `WORLD_SIZE` through environment variables
# (`course_lib.distributed.init_distributed` reads them). Every process holds a full copy of the model
# and trains on its own slice of the global batch; `DistributedDataParallel` averages the gradients
# across processes during the backward pass, in buckets, overlapping the communication with the rest
# of the backward computation (Li et al., 2020). The global batch is then
#
# $$B = \text{micro\_batch} \times \text{accumulation steps} \times \text{world size},$$
#
# and `pretrain` keeps $B$ fixed whatever the number of GPUs: 8 GPUs need 8 times fewer
# accumulation steps than 1 (exercise 2 computes the plan).
#
# For the contrastive loss, DDP's averaging is not enough: each GPU's images must also meet the
# captions of **all** GPUs as negatives. `course_lib.objectives.itc` gathers the embeddings of every
# process with an autograd-aware `all_gather` (open_clip's `gather_with_grad`), so every process
# computes the global-batch loss and the gradients equal those of one process with the whole batch.
# (A gather without gradient gives gradients divided by the world size.) The test suite checks this:
# two CPU processes with the `gloo` backend produce the same step as one process
# (`tests/test_pretrain.py`).
#
# ## 4. Launching it
# Every field of `PretrainConfig` is a command-line option `--key=value`, type-checked (an unknown
# key is an error that lists the valid ones). The commands for a real CLIP run, `gpu-base` on CC3M
# shards (see `data_scripts/README.md`), with a global batch of 4,096:

# %%
# NBVAL_CHECK_OUTPUT
import shlex

from course_lib.pretrain import parse_args

GPU_RUN = dict(preset="gpu-base", data="shards", data_path="shards/cc3m", global_batch=4096, micro_batch=256,
               steps=20000, lr=5e-4, warmup=2000, compile=True, num_workers=12, out_dir="runs/clip-base-cc3m",
               checkpoint_every=1000)
options = " ".join(f"--{key}={value}" for key, value in GPU_RUN.items())
commands = {
    "1 GPU": f"python -m course_lib.pretrain {options}",
    "8 GPUs, one machine": f"torchrun --standalone --nproc_per_node=8 -m course_lib.pretrain {options}",
    "2 machines x 8 GPUs (run on each, node_rank 0 and 1)":
        "torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --master_addr=10.0.0.1 --master_port=29500 "
        f"-m course_lib.pretrain {options}",
    "DDP smoke test on a laptop (2 CPU processes, gloo)":
        "torchrun --standalone --nproc_per_node=2 -m course_lib.pretrain --device=cpu --data=synthetic "
        "--steps=4 --global_batch=16 --num_workers=0",
}
for label, command in commands.items():
    print(f"# {label}\n{command}\n")
argv = shlex.split(commands["1 GPU"])[3:]
print("the command parses back to the same config:", parse_args(argv) == PretrainConfig(**GPU_RUN))

# %% [markdown]
# Resuming: add `--resume=True` to the same command (a run that finds a checkpoint in `out_dir` and
# was given neither `--resume=True` nor `--overwrite=True` refuses to start, so a finished run is
# never overwritten by mistake); `checkpoint_every` steps a checkpoint is saved
# atomically, and the resumed run continues with exactly the losses an uninterrupted one would have
# had (also tested). `--grad_checkpointing=True` recomputes each layer's activations in the backward
# pass instead of storing them: less memory for about one more forward pass of compute, when even one
# micro-batch does not fit.
#
# ## 5. Reading MFU
# Samples per second depend on the model; **model FLOPs utilisation** does not: it is the fraction of
# the hardware's peak that the model's own arithmetic uses,
#
# $$\text{MFU} = \frac{\text{samples/s} \times \text{training FLOPs per sample}}{\text{number of GPUs} \times \text{peak FLOP/s}},
#   \qquad \text{training FLOPs} \approx 3 \times \text{forward FLOPs}.$$
#
# Three things make an MFU figure right or wrong:
# - **the peak of the GPU you ran on**, dense, in the precision you trained in. nanoGPT hard-codes an
#   A100's 312 TFLOP/s, so on an H100 its "MFU" read 104% (nanoGPT PR #464). `course_lib.flops`
#   looks the peak up in a table by the name `torch.cuda.get_device_name()` reports. Data sheets also
#   print a "with sparsity" peak, twice the dense one, that dense training never reaches.
# - **synchronise before reading the clock.** A GPU runs asynchronously: the Python loop only queues
#   kernels and races ahead. Timing without `torch.cuda.synchronize()` measures how fast kernels were
#   queued, not run, and MFU can exceed 100% (nanoGPT PR #527). `course_lib.flops.Throughput` syncs
#   at every measurement.
# - **count the model's FLOPs, not the hardware's**: activation checkpointing recomputes a forward
#   pass, which is real work but not model FLOPs (that would be *hardware* FLOPs utilisation).

# %%
# NBVAL_CHECK_OUTPUT
from course_lib.flops import PEAK_FLOPS, mfu

print("dense bf16 peaks (TFLOP/s):", ", ".join(f"{k} {v / 1e12:g}" for k, v in PEAK_FLOPS.items() if v))
samples_per_s, open_clip_gflops = 2490, 41.1  # open_clip ViT-B/16, batch 256, bf16, compiled, one H100
by_hand = samples_per_s * 3 * open_clip_gflops * 1e9 / 989e12
ours = mfu(samples_per_s, 3 * sum(forward_flops["gpu-base"]), "NVIDIA H100 80GB HBM3")
a100_peak = samples_per_s * 3 * open_clip_gflops * 1e9 / 312e12
sparse_peak = samples_per_s * 3 * open_clip_gflops * 1e9 / 1979e12
print(f"open_clip on an H100: 2,490 x 3 x 41.1 GFLOPs / 989 TFLOP/s = {100 * by_hand:.1f}% MFU")
print(f"with our count of gpu-base and course_lib.flops.mfu: {100 * ours:.1f}%")
print(f"the same run against an A100's peak (nanoGPT's constant): {100 * a100_peak:.1f}%; "
      f"against the sparse peak: {100 * sparse_peak:.1f}%")

# %%
fig, ax = plt.subplots(figsize=(6, 2.6))
labels = ["H100 dense bf16\n989 TFLOP/s (right)", "A100 constant\n312 TFLOP/s", "H100 'with sparsity'\n1979 TFLOP/s"]
ax.barh(labels, [100 * by_hand, 100 * a100_peak, 100 * sparse_peak], color=["tab:green", "tab:red", "tab:red"])
ax.set_xlabel("MFU (%) of the same 2,490 samples/s")
ax.invert_yaxis()
plt.show()

# %% [markdown]
# 31% is a typical, honest figure for a compiled ViT-B/16 on one H100; nanoGPT's GPT-2 run reaches
# 37% on an A100, and well-tuned large language model runs reach 40-55%. `benchmarks/bench_pretrain.py`
# measures ours the same way (`python benchmarks/bench_pretrain.py --compile=on`).
#
# MFU also tells you how long a run will take before you start it: time = total training FLOPs /
# (GPUs x peak x MFU). For the 8-GPU command above:

# %%
# NBVAL_CHECK_OUTPUT
total_flops = GPU_RUN["steps"] * GPU_RUN["global_batch"] * 3 * sum(forward_flops["gpu-base"])
hours = total_flops / (8 * 989e12 * by_hand) / 3600
print(f"{GPU_RUN['steps']:,} steps x {GPU_RUN['global_batch']:,} samples = "
      f"{GPU_RUN['steps'] * GPU_RUN['global_batch'] / 1e6:.0f} M samples: {total_flops:.2e} FLOPs, "
      f"about {hours:.1f} hours on 8 H100s at {100 * by_hand:.0f}% MFU")

# %% [markdown]
# A CPU has no entry in the table (its peak depends on the cores, the vector units and the clock),
# so our run printed "MFU n/a". Its achieved rate is still worth reading:

# %%
rate = result.samples_per_s or config.steps * config.global_batch / train_seconds  # steady state, else overall
achieved = rate * result.flops_per_sample
print(f"{config.preset} on this machine: {rate:.0f} samples/s x "
      f"{result.flops_per_sample / 1e9:.3f} GFLOPs = {achieved / 1e9:.1f} GFLOP/s "
      f"(an H100 at 31% MFU: about 300,000 GFLOP/s)")

# %% [markdown]
# ## 6. Webdataset shards
# Real datasets are millions of small JPEG files. Opening each one at random is slow on any disk
# and on network file systems. The **webdataset** format stores the samples in plain tar files,
# **shards** of a few thousand samples each, read sequentially: `000042.jpg`, `000042.txt`,
# `000042.json` form sample `000042`. Under `torchrun` each process reads its own shards and each
# DataLoader worker a subset of those; shuffling happens over the shard list and in a buffer.
#
# `course_lib.data.shards.write_shards` writes them (each shard under a temporary name, renamed when
# complete, with a manifest, so an interrupted job resumes); `ShardDataset` streams them back. The
# `data_scripts/` download COCO, Flickr30k, CC3M, Visual Genome and VQA v2 and shard them this way.
# Here: 48 held-out ShapeWorld scenes at 64 px, 16 per shard.

# %%
# NBVAL_CHECK_OUTPUT
from course_lib.data.shards import ShardDataset, write_shards

shard_scenes = world.scenes(range(48), "val")
pixels = world.render_batch(shard_scenes, 64)  # (48, 64, 64, 3) uint8
samples = ({"__key__": f"val{i:06d}", "jpg": pixels[i], "txt": scene.description, "json": scene.scene_graph}
           for i, scene in enumerate(shard_scenes))
summary = write_shards(samples, WORKDIR / "shards", prefix="shapeworld-val", max_count=16)
print(f"{len(summary.shards)} shards, {summary.samples} samples:",
      sorted(path.name for path in (WORKDIR / "shards").iterdir()))

stream = ShardDataset(WORKDIR / "shards")
read_back = list(stream)
print("read back:", len(read_back), "samples; keys in order:", [s["key"] for s in read_back] == [
    f"val{i:06d}" for i in range(48)], "| captions equal:", [s["text"] for s in read_back] == [
    s.description for s in shard_scenes])
print("first sample:", read_back[0]["key"], tuple(read_back[0]["image"].shape), repr(read_back[0]["text"]),
      read_back[0]["meta"]["objects"][0]["name"])
jpeg_error = (torch.stack([s["image"] for s in read_back]) - torch.from_numpy(pixels).permute(0, 3, 1, 2) / 255).abs()
print("mean JPEG error below 0.02 (quality 95):", jpeg_error.mean().item() < 0.02)

# %%
from course_lib.viz import image_grid

image_grid([s["image"] for s in read_back[:6]], titles=[s["text"].replace(" and ", "\nand ") for s in read_back[:6]],
           ncols=6, figsize=(14, 3))
plt.show()

# %% [markdown]
# The images come back from JPEG, a little blurred at the edges (mean error under 2%); captions and
# JSON come back exactly. `pretrain` reads the same shards with `--data=shards --data_path=DIR`,
# resizing the images to the preset's resolution and learning a tokenizer from the shards' captions.
# Forty steps of batch 16 over these 48 pairs: the training loss starts at chance ($\ln 16$, the
# loss of a model that cannot tell the 16 captions of a batch apart) and falls well below it. With
# so few pairs this is memorisation, not learning that generalises: it shows that the shards are
# read, decoded and trained on, which is all a pipeline check can show.

# %%
shard_run = pretrain(PretrainConfig(model="clip", preset="cpu-tiny", data="shards", data_path=str(WORKDIR / "shards"),
                                    steps=RUN["shard_steps"], global_batch=16, lr=2e-3, warmup=4, num_workers=0,
                                    log_every=10, out_dir=str(WORKDIR / "shard-run"), overwrite=True))
first, last = shard_run.history.losses[0], shard_run.history.mean_last(10)
print(f"trained {RUN['shard_steps']} steps on the shards: loss {first:.2f} at the start, {last:.2f} over the "
      f"last 10 steps (chance ln 16 = {math.log(16):.2f})")
assert_learned(last < 0.8 * math.log(16), f"shard run: loss {last:.2f}, chance {math.log(16):.2f}", SCALE)

# %% [markdown]
# ## Exercises
# 1. **MFU.** Write `my_mfu(samples_per_s, flops_per_sample, peak)`: the fraction of the peak FLOP/s
#    `peak` used by `samples_per_s` samples per second of `flops_per_sample` training FLOPs each.
#    Raise a `ValueError` that names `peak` when the peak is not positive.
# 2. **The batch plan.** Write `batch_plan(global_batch, world_size, max_micro_batch)` returning
#    `(micro_batch, accumulation)` such that `micro_batch * accumulation * world_size == global_batch`,
#    `micro_batch <= max_micro_batch` (what fits in one GPU's memory), with the largest such
#    micro-batch (the fewest accumulation steps). Raise `ValueError` when `world_size` processes cannot
#    share the global batch equally. What plan does the 8-GPU command above get with micro-batches of at
#    most 256? And on one GPU?
# 3. **FLOPs of a linear layer.** Write `linear_flops(batch_size, in_features, out_features)`: the FLOPs
#    of one forward and one backward pass of `nn.Linear(in_features, out_features)` on an input of shape
#    `(batch_size, in_features)` that needs its gradient (as inside a network). Count 2 FLOPs per
#    multiply-add and ignore the bias. Hint: the backward pass computes the gradient of the input
#    (for the layers below) and of the weight, each a matrix product the size of the forward one.
#    This is where "training = 3 x forward" comes from.
#
# Run the cells; the check functions say what is right or what to fix.

# %% [exercise]
from course_lib.checks.scaling import check_batch_plan, check_linear_flops, check_mfu


def my_mfu(samples_per_s, flops_per_sample, peak):
    ...  # your code: achieved FLOP/s over peak FLOP/s


def batch_plan(global_batch, world_size, max_micro_batch):
    ...  # your code: return (micro_batch, accumulation)


def linear_flops(batch_size, in_features, out_features):
    ...  # your code


check_mfu(my_mfu)
check_batch_plan(batch_plan)
check_linear_flops(linear_flops)

# %% [solution]
from course_lib.checks.scaling import check_batch_plan, check_linear_flops, check_mfu


def my_mfu(samples_per_s, flops_per_sample, peak):
    if not peak > 0:
        raise ValueError(f"peak must be a positive FLOP/s figure, got {peak!r}")
    return samples_per_s * flops_per_sample / peak


def batch_plan(global_batch, world_size, max_micro_batch):
    if global_batch % world_size:
        raise ValueError(f"global_batch={global_batch} is not a multiple of world_size={world_size}")
    per_process = global_batch // world_size
    micro_batch = max(m for m in range(1, min(max_micro_batch, per_process) + 1) if per_process % m == 0)
    return micro_batch, per_process // micro_batch


def linear_flops(batch_size, in_features, out_features):
    one_product = 2 * batch_size * in_features * out_features  # x W^T, dL/dy W, or dL/dy^T x
    return 3 * one_product  # forward, input gradient, weight gradient


check_mfu(my_mfu)
check_batch_plan(batch_plan)
check_linear_flops(linear_flops)
print("8 GPUs:", batch_plan(4096, 8, 256), "| 1 GPU:", batch_plan(4096, 1, 256))

# %% [markdown]
# ## What's next
# You now have every piece of a real pretraining job: the model at the papers' size, the command that
# trains it on one GPU or many, the figures that say whether the hardware is used well, and the data
# format that feeds it. `data_scripts/README.md` takes you from a dataset's download page to shards;
# `benchmarks/bench_pretrain.py` measures the throughput against open_clip's. Try `SCALE = "gpu"` at
# the top of this notebook on a GPU: the same cells train `gpu-small` on ShapeWorld at 224 px.
