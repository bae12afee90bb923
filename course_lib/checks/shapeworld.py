"""Checks for notebook 00 (course tour): reading ShapeWorld's ground truth and scoring retrieval."""

from __future__ import annotations

import torch

from course_lib.checks.verdict import as_number, call_learner, check_callable, expect, expect_close, passed
from course_lib.data import ShapeWorld, WorldConfig
from course_lib.evaluate import chance_recall_at_k, recall_at_k


def check_count_color(count_color) -> None:
    """``count_color(scene, color) -> int``: how many objects of ``color`` the scene holds."""
    name = "check_count_color"
    check_callable("count_color", count_color, name)
    world = ShapeWorld(WorldConfig(seed=11))
    cases = 0
    for i in range(60):
        scene = world.scene(i)
        for color in world.config.colors:
            want = sum(o.color == color for o in scene.objects)
            got = call_learner(name, count_color, scene, color)
            expect(isinstance(got, int), name, f"return a Python int, got {type(got).__name__} "
                                               "(a tensor or numpy number: convert it with int(...))")
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
    check_callable("recall_fn", recall_fn, name)
    for seed in range(5):
        sim, pos = _random_case(seed)
        want = recall_at_k(sim, pos, ks=1)["t2i_R@1"]
        got = as_number(name, call_learner(name, recall_fn, sim.clone(), pos.clone()), "text->image R@1")
        if abs(got - want) > 1e-5:
            i2t = recall_at_k(sim, pos, ks=1)["i2t_R@1"]
            expect(abs(got - i2t) > 1e-5, name, f"your R@1 is {got:.4f}, the image->text R@1: for each TEXT "
                                                "(a column), take the best image (argmax over dim 0)")
        expect_close(torch.tensor(got), torch.tensor(want), name, f"text->image R@1 of random case {seed}")
    got = as_number(name, call_learner(name, recall_fn, torch.eye(4), torch.eye(4, dtype=torch.bool)), "R@1")
    expect(abs(got - 1.0) < 1e-6, name, f"a perfect similarity matrix (the identity) must give R@1 = 1, got {got:.4f}")
    passed(name, "matches course_lib.evaluate.recall_at_k on 5 random cases and the perfect case")


def check_chance_recall_at_1(chance_fn) -> None:
    """``chance_fn(positives (Ni, Nt) bool) -> float``: expected text->image R@1 of a random ranking."""
    name = "check_chance_recall_at_1"
    check_callable("chance_fn", chance_fn, name)
    for seed in range(5):
        _, pos = _random_case(seed)
        pos[0, :3] = True  # some texts with two matching images
        want = chance_recall_at_k(pos, k=1)["t2i_R@1"]
        got = as_number(name, call_learner(name, chance_fn, pos.clone()), "chance R@1")
        expect_close(torch.tensor(got), torch.tensor(want), name,
                     f"chance R@1 of random case {seed} (a text with p matching images among N is hit with "
                     "probability p / N; average over the texts)")
    passed(name, "matches course_lib.evaluate.chance_recall_at_k (texts with several matching images included)")
