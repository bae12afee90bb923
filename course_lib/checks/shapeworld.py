"""Checks for notebook 00 (course tour): reading ShapeWorld's ground truth and scoring retrieval."""

from __future__ import annotations

import torch

from course_lib.checks.verdict import expect, expect_close, passed
from course_lib.data import ShapeWorld, WorldConfig
from course_lib.evaluate import chance_recall_at_k, recall_at_k


def check_count_color(count_color) -> None:
    """``count_color(scene, color) -> int``: how many objects of ``color`` the scene holds."""
    name = "check_count_color"
    world = ShapeWorld(WorldConfig(seed=11))
    cases = 0
    for i in range(60):
        scene = world.scene(i)
        for color in world.config.colors:
            want = sum(o.color == color for o in scene.objects)
            got = count_color(scene, color)
            expect(isinstance(got, int), name, f"return a Python int, got {type(got).__name__}")
            expect(got == want, name, f"scene {i} has {want} {color} object(s), your function says {got}. "
                                      f"Objects: {[o.name for o in scene.objects]}")
            cases += 1
    passed(name, f"{cases} (scene, colour) cases agree with the ground truth")


def _random_case(seed: int, n_images: int = 12, n_texts: int = 15):
    g = torch.Generator().manual_seed(seed)
    sim = torch.randn(n_images, n_texts, generator=g)
    positives = torch.zeros(n_images, n_texts, dtype=torch.bool)
    positives[torch.randint(n_images, (n_texts,), generator=g), torch.arange(n_texts)] = True
    return sim, positives


def check_text_to_image_recall_at_1(recall_fn) -> None:
    """``recall_fn(similarity (Ni, Nt), positives (Ni, Nt) bool) -> float``: text->image R@1."""
    name = "check_text_to_image_recall_at_1"
    for seed in range(5):
        sim, pos = _random_case(seed)
        want = recall_at_k(sim, pos, ks=1)["t2i_R@1"]
        got = recall_fn(sim, pos)
        expect_close(torch.as_tensor(float(got)), torch.tensor(want), name, "text->image R@1")
    sim = torch.eye(4)
    expect(abs(float(recall_fn(sim, torch.eye(4, dtype=torch.bool))) - 1.0) < 1e-6, name,
           "a perfect similarity matrix (the identity) must give R@1 = 1")
    passed(name, "matches course_lib.evaluate.recall_at_k on 5 random cases and the perfect case")


def check_chance_recall_at_1(chance_fn) -> None:
    """``chance_fn(positives (Ni, Nt) bool) -> float``: expected text->image R@1 of a random ranking."""
    name = "check_chance_recall_at_1"
    for seed in range(5):
        _, pos = _random_case(seed)
        pos[0, :3] = True  # some texts with two matching images
        want = chance_recall_at_k(pos, k=1)["t2i_R@1"]
        got = chance_fn(pos)
        expect_close(torch.as_tensor(float(got)), torch.tensor(want), name, "chance R@1")
    passed(name, "matches course_lib.evaluate.chance_recall_at_k (texts with several matching images included)")
