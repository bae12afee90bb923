"""Zero-shot evaluation of a two-tower model (CLIP): classes written as prompts, prompt ensembles,
the linear probe it is compared with, and the compositional checks of notebook 22.

A model here is anything with ``encode_image(images (B, 3, H, W)) -> (B, E)`` and
``encode_text(input_ids (B, L), attention_mask (B, L)) -> (B, E)``, both L2-normalised
(``course_lib.models.clip.CLIP``).

- ``zero_shot_weights``: one embedding per class, the normalised mean of its prompts' normalised
  embeddings over the templates (CLIP's prompt ensembling, Radford et al. 2021 §3.1.4);
- ``linear_probe``: multinomial logistic regression on frozen image embeddings, fitted with L-BFGS
  (CLIP's linear-probe protocol, §3.2);
- ``single_object_set``: the single-object scenes of a split, labelled by their (colour, shape) class;
- ``attribute_swap``: a scene's description with two objects' colours swapped ("a red circle and a
  blue square" -> "a blue circle and a red square"), and ``binding_accuracy``: how often the image
  prefers its true description to the swapped one (chance 0.5);
- ``description_retrieval``: Recall@K between images and their canonical descriptions, with chance.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import replace

import torch
import torch.nn.functional as F

from course_lib.data.language import describe
from course_lib.data.shapeworld import nameable_pairs
from course_lib.evaluate.retrieval import chance_recall_at_k, recall_at_k
from course_lib.features.text import encode

# Template sets for ShapeWorld's (colour, shape) classes. The training descriptions read
# "a large red circle and a small ...", single objects "a large red circle".
TEMPLATES: dict[str, tuple[str, ...]] = {
    "bare name": ("{color} {shape}",),
    "a {name}": ("a {color} {shape}",),
    "there is a {name}": ("there is a {color} {shape}",),
    "sizes (2)": ("a large {color} {shape}", "a small {color} {shape}"),
}
TEMPLATES["ensemble (all 5)"] = tuple(t for name in list(TEMPLATES) for t in TEMPLATES[name])


def _check_model(model) -> None:
    for method in ("encode_image", "encode_text"):
        if not callable(getattr(model, method, None)):
            raise ValueError(f"model must have an {method} method (a two-tower model such as CLIP)")


def fill(template: str, color: str, shape: str) -> str:
    """``"a {color} {shape}"`` -> ``"a red circle"``, with "an" before a vowel."""
    if not isinstance(template, str) or "{color}" not in template or "{shape}" not in template:
        raise ValueError(f"template must be a string with {{color}} and {{shape}}, got {template!r}")
    return re.sub(r"\ba (?=[aeiou])", "an ", template.format(color=color, shape=shape))


@torch.no_grad()
def embed_texts(model, tokenizer, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
    """``texts`` -> ``(N, E)`` normalised text embeddings."""
    _check_model(model)
    if isinstance(texts, str) or len(texts) == 0:
        raise ValueError("texts must be a non-empty sequence of strings")
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(texts), batch_size):
        enc = encode(tokenizer, list(texts[i:i + batch_size]))
        out.append(model.encode_text(enc["input_ids"].to(device), enc["attention_mask"].to(device)))
    return torch.cat(out)


@torch.no_grad()
def embed_images(model, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """``images (N, 3, H, W)`` -> ``(N, E)`` normalised image embeddings."""
    _check_model(model)
    device = next(model.parameters()).device
    return torch.cat([model.encode_image(images[i:i + batch_size].to(device)) for i in range(0, len(images), batch_size)])


@torch.no_grad()
def zero_shot_weights(model, tokenizer, classes: Sequence[tuple[str, str]], templates: Sequence[str]) -> torch.Tensor:
    """``(C, E)`` class embeddings: for each ``(colour, shape)``, the mean over ``templates`` of the
    normalised prompt embeddings, normalised again (a single template: its embedding)."""
    if len(classes) == 0 or isinstance(templates, str) or len(templates) == 0:
        raise ValueError("classes and templates must be non-empty sequences (templates: a list of strings)")
    prompts = [fill(t, color, shape) for color, shape in classes for t in templates]
    emb = embed_texts(model, tokenizer, prompts).view(len(classes), len(templates), -1)
    return F.normalize(emb.mean(1), dim=-1)


def zero_shot_accuracy(image_emb: torch.Tensor, weights: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy of ``argmax(image_emb (N, E) @ weights (C, E)^T)`` against ``labels (N,)``."""
    if image_emb.shape[-1] != weights.shape[-1] or len(image_emb) != len(labels):
        raise ValueError(f"image_emb {tuple(image_emb.shape)}, weights {tuple(weights.shape)} and labels "
                         f"{tuple(labels.shape)} do not fit together")
    return ((image_emb @ weights.T).argmax(1).cpu() == labels.cpu()).float().mean().item()


def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, num_classes: int,
                 weight_decay: float = 1e-3, max_iter: int = 200) -> torch.Tensor:
    """Multinomial logistic regression on frozen features, fitted by L-BFGS (full batch, L2 penalty
    ``weight_decay``); returns the test logits ``(N_test, num_classes)``. Deterministic."""
    if train_x.dim() != 2 or test_x.shape[1:] != train_x.shape[1:] or len(train_x) != len(train_y):
        raise ValueError(f"train_x (N, D), train_y (N,), test_x (M, D) expected, got {tuple(train_x.shape)}, "
                         f"{tuple(train_y.shape)}, {tuple(test_x.shape)}")
    if len(train_y) and (train_y.min() < 0 or train_y.max() >= num_classes):
        raise ValueError(f"train_y must hold classes in [0, {num_classes}), got {train_y.min()}..{train_y.max()}")
    x, y = train_x.detach().float().cpu(), train_y.long().cpu()
    linear = torch.nn.Linear(x.shape[1], num_classes)
    torch.nn.init.zeros_(linear.weight), torch.nn.init.zeros_(linear.bias)
    optimizer = torch.optim.LBFGS(linear.parameters(), lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(linear(x), y) + weight_decay * linear.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    with torch.no_grad():
        return linear(test_x.detach().float().cpu())


def single_object_set(dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images (N, 3, H, W), labels (N,))``: the single-object scenes of a ShapeWorld dataset
    (``course_lib.data.datasets.ImageTextDataset``), labelled by their class id."""
    keep = [i for i, s in enumerate(dataset.scenes) if len(s.objects) == 1]
    if not keep:
        raise ValueError("the dataset holds no single-object scene")
    labels = torch.tensor([int(dataset.scenes[i].class_ids[0]) for i in keep])
    return dataset.all_images()[keep], labels


def attribute_swap(scene) -> str | None:
    """The scene's description with the colours of its first two objects that differ in both colour
    and shape swapped (every other word the same); ``None`` when no such pair exists or the swap
    would name a (colour, shape) pair this split never names (a held-out one)."""
    objects = list(scene.objects)
    allowed = nameable_pairs(scene.config, scene.split)
    for i in range(len(objects)):
        for j in range(i + 1, len(objects)):
            a, b = objects[i], objects[j]
            if a.color == b.color or a.shape == b.shape:
                continue
            if (b.color, a.shape) not in allowed or (a.color, b.shape) not in allowed:
                continue
            words = [describe(o) for o in objects]
            words[i], words[j] = describe(replace(a, color=b.color)), describe(replace(b, color=a.color))
            return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]
    return None


@torch.no_grad()
def binding_accuracy(model, tokenizer, images: torch.Tensor, true_texts: Sequence[str],
                     swapped_texts: Sequence[str]) -> float:
    """Fraction of images whose embedding is closer to ``true_texts[i]`` than to ``swapped_texts[i]``
    (the same words, two objects' attributes exchanged). Chance: 0.5; a bag of words: 0.5."""
    if not len(images) == len(true_texts) == len(swapped_texts) or len(images) == 0:
        raise ValueError(f"images, true_texts and swapped_texts must have the same non-zero length, got "
                         f"{len(images)}, {len(true_texts)}, {len(swapped_texts)}")
    img = embed_images(model, images)
    true, swapped = embed_texts(model, tokenizer, true_texts), embed_texts(model, tokenizer, swapped_texts)
    return ((img * true).sum(1) > (img * swapped).sum(1)).float().mean().item()


@torch.no_grad()
def description_retrieval(model, tokenizer, images: torch.Tensor, descriptions: Sequence[str],
                          ks=(1, 5)) -> tuple[dict[str, float], dict[str, float]]:
    """``(recall, chance)``: image<->text Recall@K between ``images`` and their ``descriptions``; an
    identical description counts as a positive (two scenes can share one)."""
    if len(images) != len(descriptions):
        raise ValueError(f"images ({len(images)}) and descriptions ({len(descriptions)}) must have the same length")
    similarity = embed_images(model, images) @ embed_texts(model, tokenizer, descriptions).T
    positives = torch.tensor([[a == b for b in descriptions] for a in descriptions])
    return recall_at_k(similarity.cpu(), positives, ks=ks), chance_recall_at_k(positives, k=ks)
