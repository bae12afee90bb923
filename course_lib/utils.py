"""Small helpers shared by the whole library: seeding, devices, argument checks."""

from __future__ import annotations

import os
import random

import numpy as np
import torch


def seed_everything(seed: int = 0, threads: int | None = None) -> torch.Generator:
    """Seed Python, NumPy and torch (CPU and CUDA); optionally fix the number of CPU threads.

    Returns a ``torch.Generator`` seeded with ``seed`` for code that wants its own stream.
    Fixing ``threads`` matters for bit-for-bit repeatable CPU results: a reduction split over
    a different number of threads adds its terms in a different order. The environment variable
    ``COURSE_THREADS`` overrides ``threads`` (the test command sets it when it runs notebooks in
    parallel processes, one thread each).
    """
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    threads = int(os.environ.get("COURSE_THREADS", 0)) or threads
    if threads is not None:
        torch.set_num_threads(threads)
    return torch.Generator().manual_seed(seed)


def get_device(name: str | None = None) -> torch.device:
    """``"cuda"`` when a GPU is visible, else ``"cpu"``; ``name`` forces a choice.

    The environment variable ``COURSE_DEVICE`` overrides the automatic choice.
    """
    name = name or os.environ.get("COURSE_DEVICE")
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def check_one_of(name: str, value, valid) -> None:
    """Raise ``ValueError`` naming ``name`` if ``value`` is not one of ``valid``."""
    valid = list(valid)
    if value not in valid:
        raise ValueError(f"{name}={value!r} is not valid; expected one of {valid}")


def check_shape(name: str, tensor: torch.Tensor, shape: tuple) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``tensor.shape`` matches ``shape``.

    ``shape`` may hold ``None`` for any size, e.g. ``check_shape("boxes", b, (None, 4))``.
    """
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    ok = tensor.dim() == len(shape) and all(s is None or s == t for s, t in zip(shape, tensor.shape))
    if not ok:
        want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
        raise ValueError(f"{name} must have shape {want}, got {tuple(tensor.shape)}")


def count_parameters(module: torch.nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (optionally only those with ``requires_grad``)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def mean_spread(values, digits: int = 3) -> str:
    """``"mean ± std"`` of the values that are not ``None`` (``"n/a"`` when none): a table cell of seeds."""
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    return f"{np.mean(values):.{digits}f} ± {np.std(values):.{digits}f}"


def git_commit(root=None) -> str:
    """The commit measured (short hash), with ``+uncommitted`` when tracked files differ from it; ``"unknown"``
    outside a git checkout. What a benchmark writes beside its numbers."""
    import subprocess
    from pathlib import Path

    root = Path(root) if root is not None else Path(__file__).resolve().parent.parent

    def git(*args):
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True).stdout.strip()

    try:
        head, dirty = git("rev-parse", "--short", "HEAD"), git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+uncommitted" if dirty else "")
