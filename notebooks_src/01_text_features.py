# %% [markdown]
# # 01 · Text features: how a sentence becomes vectors
#
# Every vision-language model starts its text side the same way, the way BERT does:
#
# 1. a **subword tokenizer** cuts a caption into pieces from a fixed vocabulary
#    (WordPiece: Schuster & Nakajima, 2012; Wu et al., 2016, *Google's Neural Machine Translation
#    System*; Devlin et al., 2019, *BERT: Pre-training of Deep Bidirectional Transformers for
#    Language Understanding*);
# 2. each piece becomes a vector: **word + position + token-type embeddings**, summed and
#    normalised (BERT, section 3, "Input/Output Representations" and
#    Fig. 2); positions either learned or **sinusoidal** (Vaswani et al.,
#    2017, *Attention Is All You Need*, section 3.5);
# 3. pretraining hides some pieces and asks the model to recover them: **masked language
#    modelling**, with BERT's 15% / 80-10-10 recipe.
#
# In this notebook you build each of these from scratch, check each against `course_lib`, and
# finish with a first tiny model that learns to fill in masked words of ShapeWorld captions,
# **without attention** (that is notebook 02), so you can see what embeddings alone learn.
#
# **Where this sits in the course.** Of the three questions every VLP model answers
# (*features*, *fusion*, *objectives*), this notebook is the text half of the first one.
# The token-type embedding built here is what single-stream models later use to tell text
# tokens from image tokens, and masked language modelling comes back in notebook 05, conditioned
# on the image.
#
# *Terms in English and Chinese: [glossary](../GLOSSARY.md).*

# %% [parameters]
SCALE = "cpu"  # "cpu": about a minute; "gpu": bigger model, longer run; "smoke": a few steps (what the tests run)

# %%
import math
import tempfile
from collections import Counter
from pathlib import Path

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from torch import nn

from course_lib.utils import count_parameters, seed_everything

seed_everything(0, threads=2)
RUN = {
    "smoke": dict(preset="cpu-tiny", corpus_scenes=300, mlm_scenes=300, dim=64, hidden=128, window=2,
                  steps=10, batch_size=32, lr=3e-3),
    "cpu": dict(preset="cpu-tiny", corpus_scenes=2000, mlm_scenes=3000, dim=64, hidden=128, window=2,
                steps=500, batch_size=64, lr=3e-3),
    "gpu": dict(preset="gpu-small", corpus_scenes=20000, mlm_scenes=50000, dim=256, hidden=1024, window=2,
                steps=5000, batch_size=512, lr=1e-3),
}[SCALE]
from course_lib.thresholds import assert_learned  # asserts at SCALE cpu/gpu; reports at smoke

# %% [markdown]
# ## 1. The corpus
#
# A tokenizer is trained on the text it will read. `world.corpus(n)` collects every kind of
# sentence ShapeWorld produces for `n` scenes: captions, referring phrases, questions and their
# answers, and true/false statements about pairs of images.

# %%
# NBVAL_CHECK_OUTPUT
from course_lib.data import ShapeWorld, WorldConfig

world = ShapeWorld(WorldConfig())
corpus = world.corpus(RUN["corpus_scenes"])
print(f"{len(corpus)} texts from {RUN['corpus_scenes']} scenes, for example:")
for text in corpus[:5] + corpus[5:12:3] + corpus[-60:-50:4]:
    print("   ", text)

# %% [markdown]
# ## 2. Subwords: WordPiece
#
# A model reads a fixed vocabulary of ids. Which units should it be made of?
#
# - **words**: a sentence is short, but the vocabulary is open: every new word ("purple",
#   "hexagons") is unknown, `[UNK]`, and the vocabulary of real text runs into millions;
# - **characters**: nothing is ever unknown, but sequences get five times longer and every word
#   must be spelled out again by the model;
# - **subwords** sit in between: frequent words are one piece, rare words are split into a few
#   frequent pieces, and every word can still be written.
#
# WordPiece writes a word as its longest prefix that is in the vocabulary, then the longest piece
# of the rest, and so on; a piece that continues a word carries the prefix `##`. BERT's vocabulary
# has 30,000 pieces. The vocabulary is *learned*: start from single characters and repeatedly add
# the most useful merge of two pieces until the vocabulary has the requested size. (Google's
# WordPiece picks the merge that most increases the corpus likelihood; the `tokenizers` library we
# use counts pair frequencies, as BPE does, Sennrich et al. 2016, then encodes the WordPiece way.)
#
# `course_lib.features.text.train_tokenizer` wraps the `tokenizers` library (the reference
# implementation, in Rust): BERT's normaliser (lower case, no accents), BERT's pre-tokenizer (split
# on spaces and punctuation), a WordPiece model and the special tokens. The learned vocabulary is
# made deterministic, so every run of this notebook gets the same ids.

# %%
# NBVAL_CHECK_OUTPUT
from course_lib.features.text import SPECIAL_TOKENS, encode, load_tokenizer, save_tokenizer, train_tokenizer

tokenizer = train_tokenizer(corpus, vocab_size=256)
vocab = tokenizer.get_vocab()  # {piece: id}
pieces = sorted(vocab, key=vocab.get)
print("vocabulary size:", len(vocab), "(asked for at most 256)")
print("special tokens: ", {tok: vocab[tok] for tok in SPECIAL_TOKENS})
print("first pieces:   ", pieces[5:40])
print("last pieces:    ", pieces[-16:])

# %% [markdown]
# The trainer stopped below 256: once every word of this small world is a single piece there is
# nothing left to merge. The five **special tokens** are not text:
#
# | token | id | role |
# |---|---|---|
# | `[PAD]` | 0 | fills short sequences up to the batch's length; masked out of attention |
# | `[UNK]` | 1 | a word that cannot be written with the vocabulary |
# | `[CLS]` | 2 | first token of every sequence; its output vector summarises the whole input (classification) |
# | `[SEP]` | 3 | ends a segment; separates the two texts of a pair |
# | `[MASK]` | 4 | stands for a hidden token in masked language modelling (section 5) |
#
# ### The vocabulary size is a trade-off
# Train on the same text with smaller vocabularies and count the pieces per word of held-out
# text (validation scenes): fewer pieces in the vocabulary, longer sequences.

# %%
held_out_words = " ".join(world.corpus(100, split="val")).replace(",", " ").replace("?", " ").split()
sentence = "a large magenta triangle is left of the cyan circle"
for size in (60, 100, 140, 256):
    small = train_tokenizer(corpus[:4000], vocab_size=size)
    per_word = sum(len(small.tokenize(w)) for w in held_out_words) / len(held_out_words)
    print(f"vocab {len(small):3d}: {per_word:.2f} pieces per word | {' '.join(small.tokenize(sentence))}")

# %% [markdown]
# ### Words the corpus never saw
# A word outside the corpus is still written with pieces. Only a word with a character the
# vocabulary lacks becomes `[UNK]` as a whole: ShapeWorld never uses the letter *k*, so "pink"
# cannot be spelled.

# %%
# NBVAL_CHECK_OUTPUT
for text in ("a purple hexagon", "a pink circle", "the cyanish squares"):
    print(f"{text!r:24} -> {tokenizer.tokenize(text)}")

# %% [markdown]
# ### Encoding a batch
# `encode` adds `[CLS] ... [SEP]`, maps pieces to ids and pads the batch to its longest text.
# The `attention_mask` is 1 on real tokens and 0 on padding: every later layer uses it to ignore
# the padding.

# %%
# NBVAL_CHECK_OUTPUT
captions = list(world.scene(3).captions[:3])
batch = encode(tokenizer, captions)
print("input_ids     ", tuple(batch["input_ids"].shape))
print(batch["input_ids"])
print("attention_mask")
print(batch["attention_mask"])
print(tokenizer.convert_ids_to_tokens(batch["input_ids"][1]))

# %% [markdown]
# A **pair** of texts is written `[CLS] A [SEP] B [SEP]`, and each token also gets a
# `token_type_id`: 0 for segment A, 1 for segment B. BERT uses it for sentence pairs (next sentence
# prediction, question + passage); vision-language models use the same embedding to tell the
# modalities apart (ViLT's modal-type embedding, VisualBERT's segment embedding for image regions).

# %%
# NBVAL_CHECK_OUTPUT
question, answer, _ = world.scene(3).questions[2]
pair = tokenizer(world.scene(3).description, question)
for name in ("input_ids", "token_type_ids"):
    print(f"{name:15}", pair[name])
print(tokenizer.convert_ids_to_tokens(pair["input_ids"]), "->", answer)

# %% [markdown]
# ### Save and load
# A tokenizer is part of a model: it is saved next to its weights and must come back with the
# same ids. `save_tokenizer` / `load_tokenizer` use `transformers`' `save_pretrained` /
# `from_pretrained` on a local folder (nothing is downloaded).

# %%
# NBVAL_CHECK_OUTPUT
with tempfile.TemporaryDirectory() as folder:
    save_tokenizer(tokenizer, folder)
    print("saved files:", sorted(p.name for p in Path(folder).iterdir()))
    reloaded = load_tokenizer(folder)
same = torch.equal(encode(reloaded, corpus[:200])["input_ids"], encode(tokenizer, corpus[:200])["input_ids"])
print("reloaded tokenizer gives the same ids:", same)
assert same

# %% [markdown]
# ## 3. Embeddings: word + position + token type
#
# Token ids are arbitrary numbers; a model needs vectors. BERT gives every input token $i$ the sum
# of three learned vectors, then normalises:
#
# $$ e_i = \mathrm{LayerNorm}\big(W[x_i] + P[i] + T[t_i]\big), \qquad W \in \mathbb{R}^{V\times D},\;
#    P \in \mathbb{R}^{L_{max}\times D},\; T \in \mathbb{R}^{2\times D} $$
#
# where $x_i$ is the token id, $i$ its position and $t_i$ its token type. A lookup table row
# `nn.Embedding(V, D).weight[x]` is the same as a one-hot vector times a matrix, so summing the
# three is the same as one linear layer applied to the concatenated one-hot codes. The `[PAD]` row
# of $W$ is kept at zero (`padding_idx`), so padding adds nothing and gets no gradient.
#
# We write it from scratch:

# %%
from course_lib.features.text import PAD_ID, TextEmbeddings
from course_lib.nn import init_weights


class ScratchEmbeddings(nn.Module):
    """word + position + token type, then LayerNorm: (B, L) ids -> (B, L, D)."""

    def __init__(self, vocab_size, dim, max_positions=32, num_types=2):
        super().__init__()
        self.word = nn.Embedding(vocab_size, dim, padding_idx=PAD_ID)
        self.position = nn.Embedding(max_positions, dim)
        self.token_type = nn.Embedding(num_types, dim)
        self.norm = nn.LayerNorm(dim, eps=1e-12)

    def forward(self, input_ids, token_type_ids):
        positions = torch.arange(input_ids.shape[1])  # (L,) 0, 1, 2, ...
        x = self.word(input_ids) + self.position(positions) + self.token_type(token_type_ids)  # (B, L, D)
        return self.norm(x)


# %% [markdown]
# and check it against `course_lib`'s `TextEmbeddings` (whose submodules carry BERT's names, so a
# Hugging Face BERT's weights load into it directly): copy our weights over, run both on the same
# pair of texts, and compare.

# %%
# NBVAL_CHECK_OUTPUT
ours = ScratchEmbeddings(len(vocab), dim=16)
library = TextEmbeddings(len(vocab), dim=16, max_positions=32)
with torch.no_grad():
    library.word_embeddings.weight.copy_(ours.word.weight)
    library.position_embeddings.weight.copy_(ours.position.weight)
    library.token_type_embeddings.weight.copy_(ours.token_type.weight)
    library.LayerNorm.load_state_dict(ours.norm.state_dict())

pairs = tokenizer([c for c in captions], ["what color is the circle?"] * 3, padding=True, return_tensors="pt")
mine = ours(pairs["input_ids"], pairs["token_type_ids"])
torch.testing.assert_close(mine, library(pairs["input_ids"], pairs["token_type_ids"]))
print("embeddings", tuple(mine.shape), "- our version matches the library's")

# %% [markdown]
# ## 4. Positions: learned or sinusoidal
#
# Attention (notebook 02) treats its input as a *set*: shuffle the tokens and every output is
# shuffled the same way. "a red circle left of a blue square" and "a blue circle left of a red
# square" would look alike. Position embeddings break the symmetry. BERT learns a table $P$, one
# row per position; Vaswani et al. (2017) use a fixed table of sines and cosines of geometrically
# spaced frequencies:
#
# $$ PE_{(p,\,2i)} = \sin\!\big(p / 10000^{2i/D}\big), \qquad PE_{(p,\,2i+1)} = \cos\!\big(p / 10000^{2i/D}\big) $$
#
# Pair $i$ of columns is a clock hand turning at angular speed $\omega_i = 10000^{-2i/D}$: the
# first pairs turn fast (one turn every $2\pi$ positions), the last ones barely move, so together
# they give every position a distinct code. First the slow, obvious version, one number at a time,
# checked against the library:

# %%
from course_lib.features.text import sinusoidal_positions


def sinusoidal_loop(num_positions, dim):
    table = torch.zeros(num_positions, dim)
    for p in range(num_positions):
        for i in range(dim // 2):
            angle = p / 10000 ** (2 * i / dim)
            table[p, 2 * i] = math.sin(angle)
            table[p, 2 * i + 1] = math.cos(angle)
    return table


torch.testing.assert_close(sinusoidal_loop(32, 64), sinusoidal_positions(32, 64), atol=1e-6, rtol=0)
print("our sinusoidal table matches the library's")

# %% [markdown]
# **Why sines and cosines?** The paper: "we hypothesized it would allow the model to easily learn
# to attend by relative positions, since for any fixed offset $k$, $PE_{pos+k}$ can be represented
# as a linear function of $PE_{pos}$." For each pair of columns, moving $k$ positions is a rotation
# by the angle $k\,\omega_i$:
#
# $$ \begin{pmatrix} \sin((p+k)\omega) \\ \cos((p+k)\omega) \end{pmatrix} =
#    \begin{pmatrix} \cos k\omega & \sin k\omega \\ -\sin k\omega & \cos k\omega \end{pmatrix}
#    \begin{pmatrix} \sin p\omega \\ \cos p\omega \end{pmatrix} $$
#
# The same matrix works at every position $p$. We build it for $k = 3$ and check:

# %%
table = sinusoidal_positions(64, 16)
k, omega = 3, 10000 ** (-torch.arange(0, 16, 2) / 16)  # (D/2,) the speed of each pair
rotation = torch.zeros(16, 16)
for i, w in enumerate(omega.tolist()):
    c, s = math.cos(k * w), math.sin(k * w)
    rotation[2 * i:2 * i + 2, 2 * i:2 * i + 2] = torch.tensor([[c, s], [-s, c]])
torch.testing.assert_close(table[:-k] @ rotation.T, table[k:], atol=1e-5, rtol=0)
print(f"PE[p + {k}] = R PE[p] for all p: one fixed linear map shifts every position by {k}")

# %% [markdown]
# Left: the table (rows are positions, columns dimensions): fast stripes on the left, slowly
# varying columns on the right. Right: the dot product of every pair of positions. It depends only
# on the distance $|p - q|$ (the bands are parallel to the diagonal) and falls off with it: nearby
# positions have similar codes. That is what a learned table has to discover from data.

# %%
table = sinusoidal_positions(48, RUN["dim"])
fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
image = axes[0].imshow(table, cmap="RdBu", aspect="auto")
axes[0].set(title="sinusoidal table", xlabel="dimension", ylabel="position")
fig.colorbar(image, ax=axes[0])
image = axes[1].imshow(table @ table.T, cmap="viridis")
axes[1].set(title="dot product of positions p and q", xlabel="q", ylabel="p")
fig.colorbar(image, ax=axes[1])
plt.tight_layout()
plt.show()

# %% [markdown]
# Vaswani et al. found both choices "produced nearly identical results" and kept sines because
# they might extrapolate to longer sequences. BERT, ViT and most VLP models learn the table;
# `TextEmbeddings(positions="sinusoidal")` gives the fixed one. In section 7 we look at a learned
# table after training.
#
# ## 5. BERT's masking recipe
#
# Masked language modelling (BERT, section 3.1, "Task #1: Masked LM"): choose 15% of the tokens at
# random and train the model to predict them from the rest. Of the chosen tokens,
#
# - 80% are replaced by `[MASK]`,
# - 10% by a random token,
# - 10% are left unchanged.
#
# Why not always `[MASK]`? `[MASK]` never appears when the model is used later, and "the
# Transformer encoder does not know which words it will be asked to predict or which have been
# replaced by random words, so it is forced to keep a distributional contextual representation of
# every input token." Special tokens (`[CLS]`, `[SEP]`, `[PAD]`) are never chosen. The labels are the
# original ids at chosen positions and $-100$ elsewhere, the value `F.cross_entropy` ignores.
#
# From scratch, step by step, on a batch of captions:

# %%
from course_lib.features.text import CLS_ID, MASK_ID, SEP_ID, UNK_ID, mask_tokens

special_ids = torch.tensor([PAD_ID, UNK_ID, CLS_ID, SEP_ID, MASK_ID])
ordinary_ids = torch.tensor([i for i in range(len(vocab)) if i not in special_ids])
ids = encode(tokenizer, [c for s in world.scenes(range(400)) for c in s.captions])["input_ids"]  # (B, L)

generator = torch.Generator().manual_seed(0)
can_choose = ~torch.isin(ids, special_ids)  # (B, L) never a special token
chosen = (torch.rand(ids.shape, generator=generator) < 0.15) & can_choose  # 15% of the ordinary tokens
action = torch.rand(ids.shape, generator=generator)  # one draw decides what happens to a chosen token
to_mask = chosen & (action < 0.8)  # 80%: [MASK]
to_random = chosen & (action >= 0.8) & (action < 0.9)  # 10%: a random ordinary token
random_ids = ordinary_ids[torch.randint(len(ordinary_ids), ids.shape, generator=generator)]  # (B, L)

masked = ids.clone()
masked[to_mask] = MASK_ID
masked[to_random] = random_ids[to_random]
labels = torch.where(chosen, ids, -100)  # predict the original where chosen, ignore elsewhere

print("original:", tokenizer.decode(ids[0], skip_special_tokens=False))
print("masked:  ", tokenizer.decode(masked[0], skip_special_tokens=False))
print("labels:  ", labels[0].tolist())

# %% [markdown]
# We drew the random numbers in the same order as `course_lib`'s `mask_tokens`, so with the same
# seed the library must give exactly the same corruption:

# %%
# NBVAL_CHECK_OUTPUT
lib_masked, lib_labels = mask_tokens(ids, len(vocab), MASK_ID, generator=torch.Generator().manual_seed(0))
print("identical to the library on a seeded case:", torch.equal(masked, lib_masked) and torch.equal(labels, lib_labels))
assert torch.equal(masked, lib_masked) and torch.equal(labels, lib_labels)

# %% [markdown]
# And the rates, measured over the whole batch for our version and for the library with a
# different seed. They should all sit near 15% / 80% / 10% / 10% (a random replacement draws the
# original token again once in ~180 times, which counts as "kept").

# %%
def masking_rates(ids, masked, labels):
    chosen = labels != -100
    n = chosen.sum().item()
    return {"chosen": n / (~torch.isin(ids, special_ids)).sum().item(),
            "[MASK]": ((masked == MASK_ID) & chosen).sum().item() / n,
            "random": ((masked != ids) & (masked != MASK_ID) & chosen).sum().item() / n,
            "kept": ((masked == ids) & chosen).sum().item() / n,
            "specials touched": (chosen & torch.isin(ids, special_ids)).sum().item()}


ours_rates = masking_rates(ids, masked, labels)
lib_rates = masking_rates(ids, *mask_tokens(ids, len(vocab), MASK_ID, generator=torch.Generator().manual_seed(1)))
print(f"{'':18}{'ours':>8}{'library':>9}{'BERT':>7}")
for name, bert in zip(ours_rates, (0.15, 0.8, 0.1, 0.1, 0)):
    print(f"{name:18}{ours_rates[name]:8.3f}{lib_rates[name]:9.3f}{bert:7.2f}")
for rates in (ours_rates, lib_rates):
    assert abs(rates["chosen"] - 0.15) < 0.01 and abs(rates["[MASK]"] - 0.8) < 0.03 and rates["specials touched"] == 0

# %% [markdown]
# ## 6. A first masked-word model, without attention
#
# Now we train embeddings with this objective. The model must not see the masked word, but may see
# its neighbours. Without attention (notebook 02), the classic choices are a fixed **window** of
# neighbours, as in Collobert & Weston (2008), and the **average** of the context words, as in
# word2vec's CBOW (Mikolov et al., 2013). We take both: for each position $i$,
#
# $$ h_i = \big[e_{i-2};\, e_{i-1};\, e_i;\, e_{i+1};\, e_{i+2};\, \tfrac{1}{n}\textstyle\sum_j e_j\big], \qquad
#    \mathrm{logits}_i = W_2\, \mathrm{GELU}(W_1 h_i) $$
#
# where $e$ are the `TextEmbeddings` (word + learned position, the whole sentence is segment 0) of
# the *masked* sentence, so $e_i$ is the `[MASK]` vector at a masked position. The sentence
# average weighs every word the same, whatever it says: that fixed weighting is exactly what
# attention will replace with learned, content-dependent weights.

# %%
class WindowMLM(nn.Module):
    """Masked-word prediction from a window of neighbours and the sentence mean: (B, L) -> (B, L, V)."""

    def __init__(self, vocab_size, dim, hidden, window=2, max_positions=32):
        super().__init__()
        self.window = window
        self.embeddings = TextEmbeddings(vocab_size, dim, max_positions=max_positions)
        self.mlp = nn.Sequential(nn.Linear((2 * window + 2) * dim, hidden), nn.GELU(), nn.Linear(hidden, vocab_size))

    def forward(self, input_ids, attention_mask):
        B, L = input_ids.shape
        e = self.embeddings(input_ids)  # (B, L, D)
        padded = F.pad(e, (0, 0, self.window, self.window))  # (B, L + 2w, D) zeros beyond both ends
        windows = padded.unfold(1, 2 * self.window + 1, 1)  # (B, L, D, 2w + 1)
        windows = windows.transpose(2, 3).reshape(B, L, -1)  # (B, L, (2w + 1) D) neighbours side by side
        real = attention_mask[..., None].float()  # (B, L, 1)
        mean = (e * real).sum(1, keepdim=True) / real.sum(1, keepdim=True)  # (B, 1, D) the sentence average
        h = torch.cat([windows, mean.expand(B, L, -1)], dim=-1)  # (B, L, (2w + 2) D)
        return self.mlp(h)  # (B, L, V)

    def loss(self, batch):
        logits = self(batch["masked_ids"], batch["attention_mask"])
        chosen = batch["labels"] != -100
        accuracy = (logits.argmax(-1)[chosen] == batch["labels"][chosen]).float().mean()
        return {"loss": F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten()), "accuracy": accuracy}


# %% [markdown]
# The data: every caption of the training scenes, tokenized once; each step draws a batch and masks
# it afresh with a generator seeded by the step number (RoBERTa's *dynamic masking*, Liu et al.
# 2019: a caption is masked differently every time it is seen, and a rerun sees the same batches).
# Held-out captions come from the validation scenes.

# %%
# NBVAL_CHECK_OUTPUT
def caption_ids(split, num_scenes):
    texts = [c for s in world.scenes(range(num_scenes), split) for c in s.captions]
    return encode(tokenizer, texts, max_length=32)


train_text = caption_ids("train", RUN["mlm_scenes"])
val_text = caption_ids("val", 500)


def mlm_batch(step):
    g = torch.Generator().manual_seed(step)
    rows = torch.randint(len(train_text["input_ids"]), (RUN["batch_size"],), generator=g)
    ids, mask = train_text["input_ids"][rows], train_text["attention_mask"][rows]
    ids, mask = ids[:, : mask.sum(1).max()], mask[:, : mask.sum(1).max()]  # drop all-padding columns
    masked, labels = mask_tokens(ids, len(vocab), MASK_ID, generator=g)
    return {"masked_ids": masked, "attention_mask": mask, "labels": labels}


model = init_weights(WindowMLM(len(vocab), RUN["dim"], RUN["hidden"], RUN["window"]))  # BERT's N(0, 0.02)
print("training captions:", tuple(train_text["input_ids"].shape), "| held-out:", tuple(val_text["input_ids"].shape))
print("parameters:", count_parameters(model))

# %%
from course_lib.train import TrainConfig, train
from course_lib.viz import plot_losses

config = TrainConfig(steps=RUN["steps"], lr=RUN["lr"], warmup_steps=RUN["steps"] // 10, progress=False, log_every=0)
history = train(model, mlm_batch, config, loss_fn=lambda m, b: m.loss(b))
ax = plot_losses({"masked-word loss": history}, smooth=0.9)
ax.axhline(math.log(len(vocab)), color="grey", linestyle=":", label="uniform guess, ln V")
ax.legend()
plt.show()

# %% [markdown]
# ### Held-out accuracy, against the majority baseline
# On the validation captions we choose 15% of the tokens as in training but replace *all* of them
# by `[MASK]` (no random or kept tokens), so every scored position is truly hidden. The baseline
# that knows no context always answers the most frequent masked word.

# %%
val_masked, val_labels = mask_tokens(val_text["input_ids"], len(vocab), MASK_ID, replace_prob=1.0, random_prob=0.0,
                                     generator=torch.Generator().manual_seed(1234))
model.eval()
with torch.no_grad():
    predicted = model(val_masked, val_text["attention_mask"]).argmax(-1)
scored = val_labels != -100
truth, guess = val_labels[scored], predicted[scored]
accuracy = (guess == truth).float().mean().item()
top_word, top_count = Counter(truth.tolist()).most_common(1)[0]
majority = top_count / len(truth)
print(f"{len(truth)} masked words; accuracy {accuracy:.2f} "
      f"(majority baseline {majority:.2f}: always '{tokenizer.convert_ids_to_tokens(top_word)}')")


# %% [markdown]
# Which words can be recovered from text alone? Group the masked words by kind. *exact* is the
# accuracy; *kind* counts a guess as right when it is a word of the right kind (any colour for a
# colour, any number for a number).

# %%
WORD_KINDS = {
    "colour": world.config.colors,
    "shape": world.config.shapes + tuple(s + "s" for s in world.config.shapes),
    "size": world.config.sizes,
    "number": ("zero", "one", "two", "three", "four", "five", "six"),
    "relation": ("left", "right", "above", "below", "bigger", "smaller"),
}
kind_of = {vocab[w]: kind for kind, words in WORD_KINDS.items() for w in words if w in vocab}
print(f"{'kind':10}{'count':>7}{'exact':>7}{'kind':>7}")
for kind in list(WORD_KINDS) + ["other"]:
    rows = torch.tensor([kind_of.get(t, "other") == kind for t in truth.tolist()])
    same_kind = torch.tensor([kind_of.get(g, "other") == kind for g in guess[rows].tolist()])
    exact = (guess[rows] == truth[rows]).float().mean().item()
    print(f"{kind:10}{int(rows.sum()):7d}{exact:7.2f}{same_kind.float().mean().item():7.2f}")

# %% [markdown]
# That overall accuracy flatters the model: the function words ("a", "and", "is", "of") are almost
# half of the masked words and are nearly free. So the threshold below is on the **content words**
# alone (colours, shapes, sizes and relations), each against its own baseline: which *kind* of word
# is missing (a trivial model always answers the most frequent kind), and which exact word (a
# trivial model always answers the most frequent content word).

# %%
# NBVAL_CHECK_OUTPUT
CONTENT = ("colour", "shape", "size", "relation")
content = torch.tensor([kind_of.get(t, "other") in CONTENT for t in truth.tolist()])
content_truth, content_guess = truth[content], guess[content]
kind_right = torch.tensor([kind_of.get(g) == kind_of[t] for g, t in zip(content_guess.tolist(), content_truth.tolist())])
kind_accuracy = kind_right.float().mean().item()
kind_baseline = max(Counter(kind_of[t] for t in content_truth.tolist()).values()) / len(content_truth)
word_accuracy = (content_guess == content_truth).float().mean().item()
word_baseline = Counter(content_truth.tolist()).most_common(1)[0][1] / len(content_truth)
print(f"{len(content_truth)} masked content words")
print(f"right kind of word: {kind_accuracy:.2f} (always the most frequent kind: {kind_baseline:.2f})")
print(f"exact word:         {word_accuracy:.2f} (always the most frequent content word: {word_baseline:.2f})")
print("content words: right kind above 0.9 and above twice its baseline:",
      kind_accuracy > 0.9 and kind_accuracy > 2 * kind_baseline)
assert_learned(kind_accuracy > 0.9 and kind_accuracy > 2 * kind_baseline,
               f"content words of the right kind {kind_accuracy:.2f}, baseline {kind_baseline:.2f}", SCALE)

# %% [markdown]
# The model nearly always knows *what kind* of word is missing (the grammar tells it), and the
# function words come out almost exactly. But which colour? From the text
# alone, "a small [MASK] circle" is any of six colours: exact colour accuracy sits near chance
# (1/6), and the same goes for shapes and sizes that the sentence does not repeat. **The missing
# information is in the image.** That is the whole point of vision-language pretraining: in
# notebook 05 the same masked-word task, conditioned on the image, must get the colours right.
#
# ## 7. What the embeddings learned
#
# Words that fill the same slots of the grammar receive the same gradients, so they end up with
# similar vectors ("you shall know a word by the company it keeps", Firth 1957). Below, the learned
# word vectors of the content words projected on their first two principal components (PCA), and
# the cosine similarity between some of them.

# %%
words = [w for kind in WORD_KINDS.values() for w in kind if w in vocab]
kinds = [kind_of[vocab[w]] for w in words]
with torch.no_grad():
    vectors = model.embeddings.word_embeddings.weight[[vocab[w] for w in words]]  # (n, D)
centred = vectors - vectors.mean(0)
_, _, components = torch.linalg.svd(centred, full_matrices=False)
xy = centred @ components[:2].T  # (n, 2)
unit = F.normalize(vectors, dim=-1)

fig, axes = plt.subplots(1, 2, figsize=(13, 5))
palette = dict(zip(WORD_KINDS, ["tab:red", "tab:blue", "tab:green", "tab:purple", "tab:orange"]))
for kind in WORD_KINDS:
    sel = [i for i, k in enumerate(kinds) if k == kind]
    axes[0].scatter(xy[sel, 0], xy[sel, 1], color=palette[kind], label=kind)
for i, w in enumerate(words):
    axes[0].annotate(w, xy[i].tolist(), fontsize=8, xytext=(3, 3), textcoords="offset points")
axes[0].set(title="word embeddings, first two principal components")
axes[0].legend(fontsize=8)
show = ["red", "blue", "green", "yellow", "circle", "square", "triangle", "small", "large", "one", "two", "left"]
sel = [words.index(w) for w in show]
image = axes[1].imshow(unit[sel] @ unit[sel].T, cmap="RdBu_r", vmin=-1, vmax=1)
axes[1].set_xticks(range(len(show)), show, rotation=60)
axes[1].set_yticks(range(len(show)), show)
axes[1].set_title("cosine similarity of word embeddings")
fig.colorbar(image, ax=axes[1])
plt.tight_layout()
plt.show()

# %% [markdown]
# The colour words gather in one tight group, the two sizes in another, the plural shapes in a
# third: the model learned the *kinds* of words, the syntax of ShapeWorld, without ever being
# told (all embeddings started as small random vectors, BERT's initialisation). Inside a kind the
# vectors are nearly interchangeable: text alone says nothing about what "red" looks like. The
# similarity table shows the same: blocks of high similarity along the diagonal, one per kind.
#
# Finally the model's **learned** position table, next to the sinusoidal one, as similarity
# matrices (cosine). The learned rows started as small random vectors, nearly orthogonal (only
# the diagonal is bright). Training gave structure only where the task needed it: some groups of
# positions acquired similar vectors (bright blocks), nothing like the smooth bands of the
# sinusoidal table. Positions 16 and beyond, which no training caption reaches, never received a
# gradient and are still random: a learned table cannot say anything about lengths it never saw.

# %%
with torch.no_grad():
    learned = F.normalize(model.embeddings.position_embeddings.weight, dim=-1)  # (32, D)
fixed = F.normalize(sinusoidal_positions(32, RUN["dim"]), dim=-1)
fig, axes = plt.subplots(1, 2, figsize=(9, 3.8))
for ax, table, title in ((axes[0], learned, "learned positions (after training)"),
                         (axes[1], fixed, "sinusoidal positions")):
    image = ax.imshow(table @ table.T, cmap="viridis", vmin=-1, vmax=1)
    ax.set(title=title, xlabel="position q", ylabel="position p")
fig.colorbar(image, ax=axes)
plt.show()

# %% [markdown]
# ## Exercises
#
# 1. **BERT's masking.** Write `my_mask_tokens(input_ids, vocab_size, mask_token_id,
#    special_token_ids, generator)` that returns `(masked_ids, labels)`: choose 15% of the
#    non-special tokens; of those, 80% become `mask_token_id`, 10% a random non-special token, 10%
#    stay; labels are the original ids at chosen positions and -100 elsewhere. Use `generator` for
#    every random draw. The check measures the rates on a large batch.
# 2. **Sinusoidal positions, vectorised.** Write `my_sinusoidal_positions(num_positions, dim)`
#    without Python loops: build the `(P, D/2)` matrix of angles $p\,\omega_i$ by broadcasting, then
#    fill the even columns with sines and the odd ones with cosines.
# 3. **WordPiece by hand.** Write `wordpiece(word, vocab)`: the greedy longest-match-first encoding
#    of one lower-case word with the vocabulary `{piece: id}`. Take the longest prefix in the
#    vocabulary, then the longest `"##" + ...` piece of the rest, and so on; if at some point no
#    piece matches, the whole word is `["[UNK]"]`. The check compares it with the trained tokenizer
#    on words it saw and words it never saw.

# %% [exercise]
from course_lib.checks.text import check_mask_tokens, check_sinusoidal_positions, check_wordpiece


def my_mask_tokens(input_ids, vocab_size, mask_token_id, special_token_ids, generator):
    ...  # your code: return masked_ids, labels
    raise NotImplementedError


def my_sinusoidal_positions(num_positions, dim):
    ...  # your code: a (num_positions, dim) tensor, no Python loops
    raise NotImplementedError


def wordpiece(word, vocab):
    ...  # your code: a list of pieces, e.g. ["cyan", "##i", "##s", "##h"]
    raise NotImplementedError


check_mask_tokens(my_mask_tokens)
check_sinusoidal_positions(my_sinusoidal_positions)
check_wordpiece(wordpiece, tokenizer)

# %% [solution]
from course_lib.checks.text import check_mask_tokens, check_sinusoidal_positions, check_wordpiece


def my_mask_tokens(input_ids, vocab_size, mask_token_id, special_token_ids, generator):
    special = torch.tensor(list(special_token_ids))
    ordinary = torch.tensor([i for i in range(vocab_size) if i not in special_token_ids])
    chosen = (torch.rand(input_ids.shape, generator=generator) < 0.15) & ~torch.isin(input_ids, special)
    action = torch.rand(input_ids.shape, generator=generator)
    random_ids = ordinary[torch.randint(len(ordinary), input_ids.shape, generator=generator)]
    masked_ids = input_ids.clone()
    masked_ids[chosen & (action < 0.8)] = mask_token_id
    swap = chosen & (action >= 0.8) & (action < 0.9)
    masked_ids[swap] = random_ids[swap]
    labels = torch.where(chosen, input_ids, -100)
    return masked_ids, labels


def my_sinusoidal_positions(num_positions, dim):
    position = torch.arange(num_positions, dtype=torch.float64)[:, None]  # (P, 1)
    omega = 10000.0 ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)  # (D/2,)
    angles = position * omega  # (P, D/2)
    table = torch.empty(num_positions, dim, dtype=torch.float64)
    table[:, 0::2], table[:, 1::2] = torch.sin(angles), torch.cos(angles)
    return table.float()


def wordpiece(word, vocab):
    pieces, start = [], 0
    while start < len(word):
        for end in range(len(word), start, -1):  # longest candidate first
            piece = word[start:end] if start == 0 else "##" + word[start:end]
            if piece in vocab:
                pieces.append(piece)
                start = end
                break
        else:  # nothing matched: the whole word is unknown
            return ["[UNK]"]
    return pieces


check_mask_tokens(my_mask_tokens)
check_sinusoidal_positions(my_sinusoidal_positions)
check_wordpiece(wordpiece, tokenizer)

# %% [markdown]
# ## What's next
# The window model sees a fixed neighbourhood and a plain average of the sentence: it cannot decide
# *which* other words matter for the one it predicts. Notebook 02 builds **attention**, which
# learns those weights from the content, and the transformer around it.
