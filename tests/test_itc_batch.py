"""A contrastive batch of one pair has no negatives: its loss is exactly 0 and teaches nothing.

The fault: ``--global_batch=1`` trained a CLIP model at loss 0.0000 with no warning, because
``ContrastiveLoss`` on a batch of 1 returned 0. The training module and the pretraining config
now refuse it, saying why; the functional ``contrastive_loss`` keeps the true value, 0, which
``course_lib.checks`` grades (a learner's InfoNCE must give 0 for a single pair).
"""

import pytest
import torch

from course_lib.objectives.itc import ContrastiveLoss, contrastive_loss
from course_lib.pretrain import PretrainConfig, main


def test_contrastive_loss_module_refuses_a_single_pair():
    criterion = ContrastiveLoss()
    with pytest.raises(ValueError, match=r"at least 2 image-text pairs, got 1: .*no negatives.*loss is exactly 0"):
        criterion(torch.randn(1, 8), torch.randn(1, 8))
    two = criterion(torch.randn(2, 8), torch.randn(2, 8))
    assert two.item() > 0  # two pairs: one negative each, a real loss


def test_functional_loss_of_one_pair_is_its_true_value_zero():
    assert contrastive_loss(torch.randn(1, 8), torch.randn(1, 8), 10.0).item() == pytest.approx(0.0, abs=1e-6)


def test_pretrain_refuses_a_global_batch_of_one(capsys):
    with pytest.raises(ValueError, match=r"global_batch must be >= 2 for the contrastive model 'clip', got 1"):
        PretrainConfig(global_batch=1)
    with pytest.raises(SystemExit) as exit_info:
        main(["--global_batch=1", "--steps=2"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: global_batch must be >= 2") and "Traceback" not in err
