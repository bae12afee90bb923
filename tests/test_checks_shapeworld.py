"""The grading functions of notebook 00 accept right answers and reject wrong ones with a message."""

import pytest
import torch

from course_lib.checks import ExerciseError
from course_lib.checks.shapeworld import check_chance_recall_at_1, check_count_color, check_text_to_image_recall_at_1


def test_count_color(capsys):
    check_count_color(lambda scene, color: sum(o.color == color for o in scene.objects))
    assert "PASS" in capsys.readouterr().out
    with pytest.raises(ExerciseError, match="your function says"):
        check_count_color(lambda scene, color: len(scene.objects))


def test_recall_at_1():
    def right(sim, pos):
        return pos.T[torch.arange(sim.shape[1]), sim.argmax(0)].float().mean().item()

    check_text_to_image_recall_at_1(right)
    with pytest.raises(ExerciseError, match="R@1"):
        check_text_to_image_recall_at_1(lambda sim, pos: pos[torch.arange(sim.shape[0]), sim.argmax(1)].float().mean())  # image->text


def test_chance():
    check_chance_recall_at_1(lambda pos: (pos.sum(0).float() / pos.shape[0]).mean().item())
    with pytest.raises(ExerciseError):
        check_chance_recall_at_1(lambda pos: 1 / pos.shape[0])
