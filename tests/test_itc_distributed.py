"""ITC across 2 processes (torchrun, gloo, CPU) equals the single-process full-batch loss and gradient."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

WORKER = Path(__file__).with_name("_itc_ddp_worker.py")
ROOT = WORKER.parent.parent
# Tolerance: everything runs in float64, so only summation order differs: 1e-10 absolute.
TOL = dict(atol=1e-10, rtol=0)

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with the gloo backend is unavailable")


def _load_worker():
    spec = importlib.util.spec_from_file_location("_itc_ddp_worker", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(distributed results, single-process reference) for every variant."""
    worker = _load_worker()
    out = tmp_path_factory.mktemp("itc") / "results.pt"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(WORKER), str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    reference = {name: worker.contrastive_step(flags) for name, flags in worker.VARIANTS.items()}
    return torch.load(out), reference


def _assert_param_grads(got: dict, want: dict, scale: float = 1.0):
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name] * scale, **TOL, msg=name)


def test_gather_with_grad_matches_single_process(runs):
    dist_runs, reference = runs
    got, want = dist_runs["gather_with_grad"], reference["gather_with_grad"]
    world = got["world_size"]
    # Every rank computes the global loss ...
    torch.testing.assert_close(got["losses"], want["loss"].expand(world), **TOL)
    # ... so the gather's backward sums world identical contributions into each feature ...
    torch.testing.assert_close(got["image_feat_grad"], world * want["image_feat_grad"], **TOL)
    torch.testing.assert_close(got["text_feat_grad"], world * want["text_feat_grad"], **TOL)
    # ... and DDP's averaging makes parameter gradients exactly the single-process ones.
    _assert_param_grads(got["param_grads"], want["param_grads"])


def test_local_loss_with_gather_with_grad_matches_single_process(runs):
    dist_runs, reference = runs
    got, want = dist_runs["gather_with_grad_local_loss"], reference["gather_with_grad_local_loss"]
    torch.testing.assert_close(got["losses"].mean(), want["loss"], **TOL)   # mean of local losses
    _assert_param_grads(got["param_grads"], want["param_grads"])


def test_plain_gather_divides_encoder_gradients_by_world_size(runs):
    # open_clip's gather without gradient: each rank only differentiates its own rows.
    dist_runs, reference = runs
    got, want = dist_runs["plain_gather"], reference["plain_gather"]
    world = got["world_size"]
    torch.testing.assert_close(got["losses"], want["loss"].expand(world), **TOL)
    torch.testing.assert_close(got["image_feat_grad"], want["image_feat_grad"], **TOL)
    encoder_grads = {k: v for k, v in got["param_grads"].items() if k != "logit_scale"}
    _assert_param_grads(encoder_grads, {k: want["param_grads"][k] for k in encoder_grads}, 1 / world)
    torch.testing.assert_close(got["param_grads"]["logit_scale"], want["param_grads"]["logit_scale"], **TOL)
