"""Fault suite, pretraining: ``kill -9`` at random steps, then resume, must give exactly the run
that was never killed; and a run that would replace a checkpoint refuses, in one line, exit 2.

The pretraining command runs as a real process (``python -m course_lib.pretrain``), killed with
SIGKILL right after it prints a chosen step: the kill lands wherever that process is by then
(training the next step, or writing a checkpoint). The steps are drawn at random; set
``FAULT_SEED`` to replay a failure (the seed is in every assertion message).
"""

import os
import random
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from course_lib.checkpoint import load_checkpoint
from course_lib.models.registry import build_model
from course_lib.pretrain import parse_args, pretrain

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, OMP_NUM_THREADS="1", COURSE_THREADS="1", PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
STEPS = 16
# Synthetic data (no tokenizer to build), the CNN image tower (its loss moves from the first step),
# accumulation over 2 micro-batches (the GradCache path), a checkpoint after every step.
ARGS = ["--data=synthetic", "--global_batch=8", "--micro_batch=4", f"--steps={STEPS}", "--checkpoint_every=1",
        "--log_every=1", "--num_workers=0", "--lr=3e-3", "--warmup=2", "--model.vision=cnn"]


def launch(out_dir, *extra, kill_after_step=None, timeout=240):
    """Run the command; SIGKILL it once it has printed ``step kill_after_step/``. Returns (code, stdout, stderr)."""
    proc = subprocess.Popen([sys.executable, "-m", "course_lib.pretrain", *ARGS, f"--out_dir={out_dir}", *extra],
                            cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    watchdog = threading.Timer(timeout, proc.kill)  # a hung run fails the test instead of hanging it
    watchdog.start()
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if kill_after_step is not None and line.startswith(f"step {kill_after_step}/"):
                os.kill(proc.pid, signal.SIGKILL)
                break
        stdout = "".join(lines) + proc.stdout.read()
        stderr = proc.stderr.read()
        proc.wait()
    finally:
        watchdog.cancel()
    return proc.returncode, stdout, stderr


def saved_run(out_dir) -> dict:
    """The history, weights and optimizer state in ``out_dir/checkpoint.pt``."""
    state = torch.load(Path(out_dir) / "checkpoint.pt", weights_only=True)
    return {"step": state["step"], "history": state["history"]["records"], "model": state["model"],
            "optimizer": state["optimizer"]["state"]}


def assert_same(a, b, where=""):
    """Exactly equal nested dicts / lists of tensors and numbers."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    else:
        assert a == b, where


def test_kill_9_at_random_steps_then_resume_gives_the_uninterrupted_run(tmp_path):
    seed = int(os.environ.get("FAULT_SEED", random.SystemRandom().randrange(10**6)))
    rng = random.Random(seed)
    kills = sorted(rng.sample(range(2, STEPS - 1), 3))
    note = f"FAULT_SEED={seed}, kills after steps {kills}"

    torch.set_num_threads(1)
    straight = pretrain(parse_args([*ARGS, f"--out_dir={tmp_path / 'straight'}"]))
    killed = tmp_path / "killed"
    code, out, err = launch(killed, kill_after_step=kills[0])
    assert code == -signal.SIGKILL, (note, err[-2000:])
    assert "starting fresh" in out, note
    for kill in kills[1:] + [None]:
        on_disk = load_checkpoint(killed / "checkpoint.pt", build_model("clip", "cpu-tiny", vision="cnn"),
                                  restore_rng=False)["step"]  # whole, never half-written
        code, out, err = launch(killed, "--resume=True", kill_after_step=kill)
        assert f"resuming from step {on_disk} of checkpoint" in out, (note, out[:500], err[-2000:])
        if kill is not None and kill > on_disk:
            assert code == -signal.SIGKILL, (note, err[-2000:])
        else:
            assert code == 0, (note, err[-2000:])
    assert not list(killed.glob(".checkpoint.pt.*.tmp")), note  # temp files of killed saves are cleaned up

    resumed, reference = saved_run(killed), saved_run(tmp_path / "straight")
    assert resumed["step"] == STEPS and [r["step"] for r in resumed["history"]] == list(range(1, STEPS + 1)), note
    assert_same(resumed, reference, note)  # losses, lr, grad norms, weights, Adam moments: bit for bit
    assert [r["loss"] for r in resumed["history"]] == straight.history.losses, note
    first = torch.load(killed / "checkpoint.pt", weights_only=True)["history"]["records"][0]["loss"]
    assert first != resumed["history"][-1]["loss"], note  # the weights really moved


def test_a_run_that_finds_a_checkpoint_refuses_in_one_line_and_exit_2(tmp_path):
    # The fault: a run without --resume=True silently replaced a step-N checkpoint with a step-2 one.
    pretrain(parse_args([*ARGS, "--steps=3", f"--out_dir={tmp_path}"]))
    before = (tmp_path / "checkpoint.pt").read_bytes()
    code, out, err = launch(tmp_path, "--steps=2")
    assert code == 2, err[-2000:]
    assert err.count("\n") == 1 and err.startswith("error: checkpoint ") and "Traceback" not in err
    assert "already exists" in err and "resume=True to continue it, overwrite=True to replace it" in err
    assert (tmp_path / "checkpoint.pt").read_bytes() == before


@pytest.mark.parametrize("damage", ["truncated", "foreign pickle"])
def test_resume_from_a_damaged_checkpoint_says_what_is_wrong(tmp_path, damage):
    pretrain(parse_args([*ARGS, "--steps=2", f"--out_dir={tmp_path}"]))
    path = tmp_path / "checkpoint.pt"
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:1000])
        expected = "is corrupt or incomplete"
    else:
        state = torch.load(path, weights_only=True)
        state["extra"]["payload"] = Payload()
        torch.save(state, path)
        expected = "holds Python objects that weights_only loading does not allow"
    with pytest.raises(ValueError, match=expected) as info:
        pretrain(parse_args([*ARGS, "--steps=3", f"--out_dir={tmp_path}", "--resume=True"]))
    assert ("delete it" in str(info.value)) == (damage == "truncated")


class Payload:
    """Unpickling it would run a command: weights_only loading must refuse it."""

    def __reduce__(self):
        return (os.system, ("echo this must never run",))
